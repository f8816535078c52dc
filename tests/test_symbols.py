"""Symbol sections: fixed-width packing and range coding (the entropy stage)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcodec.codecs import wire
from fedcodec.codecs.symbols import fixed_size, width
from fedcodec.errors import PayloadError


def roundtrip(values, alphabet, entropy, contexts=None, k=1):
    body = wire.BodyWriter(entropy=entropy).symbols(values, alphabet, contexts, k).getvalue()
    reader = wire.BodyReader(memoryview(body), entropy=entropy)
    out = reader.symbols(len(values), alphabet, "test", contexts, k)
    reader.finish()
    return body, out


@pytest.mark.parametrize("alphabet", [1, 2, 3, 5, 8, 33, 256, 1000])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
@pytest.mark.parametrize("entropy", [False, True])
def test_roundtrip_is_exact(alphabet, n, entropy):
    values = np.random.default_rng(n + alphabet).integers(0, alphabet, n)
    body, out = roundtrip(values, alphabet, entropy)
    assert np.array_equal(out, values)
    if not entropy:
        assert len(body) == fixed_size(n, alphabet) == math.ceil(n * width(alphabet) / 8)


def test_binary_fixed_mode_is_numpy_packbits():
    bits = np.random.default_rng(0).integers(0, 2, 77)
    body, _ = roundtrip(bits, 2, False)
    assert body == np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


@pytest.mark.parametrize("p", [0.02, 0.1, 0.3])
def test_entropy_coding_approaches_the_empirical_entropy(p):
    n = 200_000
    bits = (np.random.default_rng(1).random(n) < p).astype(np.int64)
    body, out = roundtrip(bits, 2, True)
    assert np.array_equal(out, bits)
    q = bits.mean()
    h = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    table = 2 * 4 + 4  # counts of the two symbols + word count
    assert 8 * (len(body) - table) / n <= h * 1.01 + 64 / n  # range coder: within 1% plus a word
    assert len(body) < fixed_size(n, 2)


def test_contexts_code_each_group_with_its_own_model():
    """Bits that are predictable from a context both ends know cost (almost) nothing."""
    rng = np.random.default_rng(2)
    n = 100_000
    contexts = rng.integers(0, 4, n)
    bits = (contexts >= 2).astype(np.int64)  # fully determined by the context
    body_ctx, out = roundtrip(bits, 2, True, contexts, 4)
    assert np.array_equal(out, bits)
    body_plain, _ = roundtrip(bits, 2, True)
    assert len(body_ctx) < 100 < len(body_plain) / 50


def test_declared_counts_must_match_the_expected_number_of_symbols():
    values = np.arange(10) % 3
    body = bytearray(wire.BodyWriter(entropy=True).symbols(values, 3).getvalue())
    body[0] += 1  # first count now says 5 instead of 4: total 11 != 10
    with pytest.raises(PayloadError) as err:
        wire.BodyReader(memoryview(bytes(body)), entropy=True).symbols(10, 3, "levels")
    assert err.value.reason == "size"


def test_a_huge_declared_word_count_is_rejected_before_allocating():
    values = np.zeros(100, np.int64)
    body = bytearray(wire.BodyWriter(entropy=True).symbols(values, 2).getvalue())
    body[8:12] = (2**32 - 1).to_bytes(4, "little")  # word count
    with pytest.raises(PayloadError) as err:
        wire.BodyReader(memoryview(bytes(body)), entropy=True).symbols(100, 2, "bits")
    assert err.value.reason == "truncated"


def test_corrupted_words_are_detected_by_the_counts():
    values = (np.random.default_rng(3).random(5000) < 0.3).astype(np.int64)
    body = bytearray(wire.BodyWriter(entropy=True).symbols(values, 2).getvalue())
    body[len(body) // 2] ^= 0x5A
    with pytest.raises(PayloadError) as err:
        wire.BodyReader(memoryview(bytes(body)), entropy=True).symbols(5000, 2, "bits")
    assert err.value.reason == "entropy"


def test_fixed_width_rejects_symbols_outside_the_alphabet_and_set_padding():
    # alphabet 5 takes 3 bits; the value 7 fits the bits but not the alphabet
    raw = np.packbits(np.array([1, 1, 1, 0, 0, 0, 0, 0], np.uint8), bitorder="little").tobytes()
    with pytest.raises(PayloadError):
        wire.BodyReader(memoryview(raw)).symbols(2, 5, "levels")
    with pytest.raises(PayloadError):  # 3 one-bit symbols, padding bit 4 set
        wire.BodyReader(memoryview(bytes([0b1000]))).symbols(3, 2, "bits")
