"""The versioned, self-describing envelope every payload travels in.

Layout (all integers little-endian)::

    magic      4 bytes   b"FCDC"
    version    u8        WIRE_VERSION
    id_len     u8        length of the codec id
    codec id   id_len    ASCII, e.g. b"fedmrn"
    spec fp    8 bytes   fingerprint of the model spec (tensor names, shapes, roles)
    body_len   u32       length of the codec's body
    body       body_len  codec-specific
    crc32      u32       CRC-32 of everything above

The fingerprint stands in for the full list of shapes: a decoder accepts a payload only when the
sender's model spec is identical to its own, so every size it later derives from the spec is
trusted, and every size read from the body is checked against the bytes that are actually there
before anything is allocated.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from ..errors import PayloadError

MAGIC = b"FCDC"
WIRE_VERSION = 1
_FIXED = struct.Struct("<4sBB")
_TAIL = struct.Struct("<8sI")
_CRC = struct.Struct("<I")
MAX_BODY = 2**32 - 1


def envelope_overhead(codec_id: str) -> int:
    """Bytes the envelope adds around a body for ``codec_id``."""
    return _FIXED.size + len(codec_id) + _TAIL.size + _CRC.size


def pack(codec_id: str, spec_fp: bytes, body: bytes | bytearray | memoryview) -> bytes:
    """Wrap ``body`` in the envelope."""
    cid = codec_id.encode("ascii")
    if not 0 < len(cid) < 256:
        raise ValueError(f"codec id {codec_id!r} must be 1..255 ASCII characters")
    if len(spec_fp) != 8:
        raise ValueError("spec fingerprint must be 8 bytes")
    if len(body) > MAX_BODY:
        raise ValueError("body larger than 4 GiB")
    head = _FIXED.pack(MAGIC, WIRE_VERSION, len(cid)) + cid + _TAIL.pack(spec_fp, len(body))
    out = bytearray(head)
    out += body
    out += _CRC.pack(zlib.crc32(out))
    return bytes(out)


def unpack(payload: bytes, codec_id: str, spec_fp: bytes) -> memoryview:
    """Validate the envelope and return a view of the body. Raises :class:`PayloadError`."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError("type", f"expected bytes, got {type(payload).__name__}")
    view = memoryview(payload).cast("B")
    n = len(view)
    if n < _FIXED.size:
        raise PayloadError("truncated", f"{n} bytes is shorter than the envelope header")
    magic, version, id_len = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise PayloadError("magic", f"expected magic {MAGIC!r}, got {bytes(magic)!r}")
    if version != WIRE_VERSION:
        raise PayloadError("version", f"wire version {version} is not supported (this is {WIRE_VERSION})")
    head_len = _FIXED.size + id_len + _TAIL.size
    if n < head_len + _CRC.size:
        raise PayloadError("truncated", f"{n} bytes is shorter than the {head_len + _CRC.size}-byte envelope")
    got_id = bytes(view[_FIXED.size:_FIXED.size + id_len])
    if got_id != codec_id.encode("ascii"):
        raise PayloadError("codec", f"payload is for codec {got_id.decode('ascii', 'replace')!r}, "
                                    f"this decoder is {codec_id!r}")
    fp, body_len = _TAIL.unpack_from(view, _FIXED.size + id_len)
    if body_len != n - head_len - _CRC.size:
        raise PayloadError("size", f"header declares a {body_len}-byte body but {n - head_len - _CRC.size} "
                                   "bytes follow")
    (crc,) = _CRC.unpack_from(view, n - _CRC.size)
    if zlib.crc32(view[:n - _CRC.size]) != crc:
        raise PayloadError("checksum", "CRC-32 mismatch: the payload was corrupted in transit")
    if fp != spec_fp:
        raise PayloadError("spec", "payload was made for a different model (spec fingerprint mismatch)")
    return view[head_len:n - _CRC.size]


class BodyWriter:
    """Accumulates a body from typed fields.

    ``entropy`` selects how :meth:`symbols` sections are stored: fixed-width bit packing, or range
    coding with a two-pass categorical model (:mod:`fedcodec.codecs.symbols`).
    """

    def __init__(self, entropy: bool = False) -> None:
        self._buf = bytearray()
        self.entropy = entropy

    def u8(self, v: int) -> "BodyWriter":
        self._buf += struct.pack("<B", v)
        return self

    def u64(self, v: int) -> "BodyWriter":
        self._buf += struct.pack("<Q", v)
        return self

    def f32(self, v: float) -> "BodyWriter":
        self._buf += struct.pack("<f", v)
        return self

    def raw(self, data: bytes | bytearray | memoryview | np.ndarray) -> "BodyWriter":
        self._buf += memoryview(data).cast("B") if isinstance(data, np.ndarray) else data
        return self

    def u32(self, v: int) -> "BodyWriter":
        self._buf += struct.pack("<I", v)
        return self

    def symbols(self, values: np.ndarray, alphabet: int, contexts: np.ndarray | None = None,
                num_contexts: int = 1) -> "BodyWriter":
        """Integer symbols in ``0..alphabet-1``; ``contexts`` (known to the decoder too) lets the
        entropy coder keep one model per context."""
        from .symbols import write_symbols

        self._buf += write_symbols(values, alphabet, self.entropy, contexts, num_contexts)
        return self

    def getvalue(self) -> bytes:
        return bytes(self._buf)


class BodyReader:
    """Reads typed fields from a body; every read is bounds-checked before it allocates."""

    def __init__(self, body: memoryview, entropy: bool = False):
        self._view = body
        self._pos = 0
        self.entropy = entropy

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise PayloadError("truncated", f"{what} needs {n} bytes but only {self.remaining} remain")
        out = self._view[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self, what: str = "u8") -> int:
        return self._take(1, what)[0]

    def u64(self, what: str = "u64") -> int:
        return struct.unpack("<Q", self._take(8, what))[0]

    def f32(self, what: str = "f32") -> float:
        return struct.unpack("<f", self._take(4, what))[0]

    def u32(self, what: str = "u32") -> int:
        return struct.unpack("<I", self._take(4, what))[0]

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` raw bytes (bounds-checked)."""
        return self._take(n, what)

    def symbols(self, count: int, alphabet: int, what: str, contexts: np.ndarray | None = None,
                num_contexts: int = 1) -> np.ndarray:
        """``count`` symbols written by :meth:`BodyWriter.symbols` (int64, each checked < alphabet)."""
        from .symbols import read_symbols

        return read_symbols(self, count, alphabet, self.entropy, what, contexts, num_contexts)

    def array(self, dtype: np.dtype | str, count: int, what: str) -> np.ndarray:
        """``count`` items of little-endian ``dtype``, copied out of the payload."""
        dt = np.dtype(dtype).newbyteorder("<")
        raw = self._take(count * dt.itemsize, what)
        return np.frombuffer(raw, dtype=dt).astype(dt.newbyteorder("="), copy=True)

    def finish(self) -> None:
        if self.remaining:
            raise PayloadError("size", f"{self.remaining} unexpected trailing bytes in the body")
