import struct
import zlib

import pytest

from fedcodec.codecs import wire
from fedcodec.errors import PayloadError

FP = b"\x01" * 8


def test_round_trip_and_overhead():
    body = bytes(range(50))
    payload = wire.pack("abc", FP, body)
    assert len(payload) == len(body) + wire.envelope_overhead("abc")
    assert bytes(wire.unpack(payload, "abc", FP)) == body


def _recrc(buf: bytearray) -> bytes:
    buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
    return bytes(buf)


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: p[:3], "truncated"),
    (lambda p: p[:-1], "size"),
    (lambda p: p + b"\x00", "size"),
    (lambda p: b"XXXX" + p[4:], "magic"),
    (lambda p: _recrc(bytearray(p[:4] + b"\x09" + p[5:])), "version"),
    (lambda p: p[:12] + bytes([p[12] ^ 0x40]) + p[13:], "checksum"),
])
def test_malformed_envelopes(mutate, reason):
    payload = wire.pack("abc", FP, b"hello world")
    with pytest.raises(PayloadError) as info:
        wire.unpack(mutate(payload), "abc", FP)
    assert info.value.reason == reason


def test_wrong_codec_and_wrong_model():
    payload = wire.pack("abc", FP, b"x")
    with pytest.raises(PayloadError, match="codec"):
        wire.unpack(payload, "abd", FP)
    with pytest.raises(PayloadError, match="different model"):
        wire.unpack(payload, "abc", b"\x02" * 8)


def test_declared_body_length_checked_before_use():
    payload = bytearray(wire.pack("abc", FP, b"x" * 10))
    struct.pack_into("<I", payload, 4 + 2 + 3 + 8, 2**32 - 1)  # declare a 4 GiB body
    with pytest.raises(PayloadError) as info:
        wire.unpack(_recrc(payload), "abc", FP)
    assert info.value.reason == "size"


def test_reader_bounds():
    r = wire.BodyReader(memoryview(b"\x01\x02\x03"))
    assert r.u8() == 1
    with pytest.raises(PayloadError, match="truncated"):
        r.array("<f4", 10**12, "huge")
    with pytest.raises(PayloadError, match="trailing"):
        r.finish()


def test_error_names_client():
    err = PayloadError("checksum", "bad").for_client(42)
    assert "client 42" in str(err) and err.client == 42 and err.reason == "checksum"
