"""How symbol sections (mask bits, quantization levels, index classes) are stored in a body.

A codec hands :meth:`BodyWriter.symbols` an array of integers in ``0..alphabet-1`` and never packs
bits itself; whether the section is bit-packed or entropy coded is the codec's ``entropy`` stage,
chosen at build time (``--set codec.entropy=true``, wire id suffix ``+ec``).

Fixed width (the default)::

    ceil(count * w / 8) bytes, w = ceil(log2(alphabet)) bits per symbol, least significant bit
    first, zero padding (for alphabet 2 this is numpy's little-endian ``packbits``)

Entropy coded (two-pass: count, then code with the counted frequencies)::

    per context: alphabet x u32 symbol counts
    u32 word count | word count x u32 range-coder words (``constriction``'s RangeEncoder)

Symbols are coded context by context (the symbols of context 0 in their order, then context 1, ...);
``contexts`` is an array the decoder can compute before it reads the section (for FedMRN: a bucket
of the regenerated noise magnitude), so it costs nothing on the wire. The decoder checks every count
against the number of symbols it expects before it decodes anything.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import PayloadError

MAX_ALPHABET = 1 << 16


def width(alphabet: int) -> int:
    """Bits per symbol in fixed-width mode."""
    return max(int(alphabet - 1).bit_length(), 0)


def fixed_size(count: int, alphabet: int) -> int:
    return (count * width(alphabet) + 7) // 8


def _check(alphabet: int, num_contexts: int) -> None:
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet must be in 1..{MAX_ALPHABET}, got {alphabet}")
    if num_contexts < 1:
        raise ValueError("num_contexts must be >= 1")


def _groups(count: int, contexts: np.ndarray | None, num_contexts: int) -> list[np.ndarray] | None:
    if contexts is None or num_contexts == 1:
        return None
    if len(contexts) != count:
        raise ValueError(f"{len(contexts)} contexts for {count} symbols")
    small = contexts.astype(np.uint8 if num_contexts <= 256 else np.uint16)  # numpy radix-sorts these
    order = np.argsort(small, kind="stable")
    bounds = np.searchsorted(small[order], np.arange(num_contexts + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(num_contexts)]


def _pack_groups(values: np.ndarray, w: int) -> np.ndarray:
    """LSB-first packing for w <= 8: every 8 symbols fill exactly w bytes, built as one uint64."""
    groups = -(-len(values) // 8)
    padded = np.zeros(groups * 8, np.uint64)
    padded[:len(values)] = values
    padded = padded.reshape(groups, 8)
    acc = np.zeros(groups, np.uint64)
    for j in range(8):
        acc |= padded[:, j] << np.uint64(j * w)
    return acc.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :w].reshape(-1)


def _unpack_groups(raw: np.ndarray, w: int, count: int) -> np.ndarray:
    groups = -(-count // 8)
    buf = np.zeros((groups, 8), np.uint8)
    flat = np.zeros(groups * w, np.uint8)
    flat[:len(raw)] = raw
    buf[:, :w] = flat.reshape(groups, w)
    acc = buf.reshape(-1).view("<u8")
    mask = np.uint64((1 << w) - 1)
    out = np.empty((groups, 8), np.int64)
    for j in range(8):
        out[:, j] = (acc >> np.uint64(j * w)) & mask
    return out.reshape(-1)[:count]


def _model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def write_symbols(values: np.ndarray, alphabet: int, entropy: bool, contexts: np.ndarray | None = None,
                  num_contexts: int = 1) -> bytes:
    _check(alphabet, num_contexts)
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= alphabet):
        raise ValueError(f"symbols outside 0..{alphabet - 1}")
    if not entropy:
        w = width(alphabet)
        if w == 0 or not values.size:
            return b""
        if w == 1:
            return np.packbits(values.astype(np.uint8), bitorder="little").tobytes()
        if w <= 8:
            return _pack_groups(values, w)[:fixed_size(len(values), alphabet)].tobytes()
        bits = ((values.astype(np.uint32)[:, None] >> np.arange(w, dtype=np.uint32)) & 1).astype(np.uint8)
        return np.packbits(bits.reshape(-1), bitorder="little").tobytes()
    import constriction

    groups = _groups(len(values), contexts, num_contexts)
    parts = [values] if groups is None else [values[g] for g in groups]
    table = bytearray()
    enc = constriction.stream.queue.RangeEncoder()
    for part in parts:
        counts = np.bincount(part, minlength=alphabet).astype("<u4")
        table += counts.tobytes()
        if part.size and alphabet > 1:
            enc.encode(part.astype(np.int32), _model(counts.astype(np.float64)))
    words = enc.get_compressed().astype("<u4") if values.size and alphabet > 1 else np.zeros(0, "<u4")
    return bytes(table) + struct.pack("<I", len(words)) + words.tobytes()


def read_symbols(reader, count: int, alphabet: int, entropy: bool, what: str,
                 contexts: np.ndarray | None = None, num_contexts: int = 1) -> np.ndarray:
    _check(alphabet, num_contexts)
    if not entropy:
        w = width(alphabet)
        if w == 0:
            return np.zeros(count, np.int64)
        raw = np.frombuffer(reader.take(fixed_size(count, alphabet), what), np.uint8)
        nbits = count * w
        if nbits % 8 and raw[-1] >> (nbits % 8):
            raise PayloadError("field", f"{what}: padding bits after the last symbol are not zero")
        bits = np.unpackbits(raw, count=nbits, bitorder="little")
        if w == 1:
            return bits.astype(np.int64)
        if w <= 8:
            out = _unpack_groups(raw, w, count)
        else:
            out = bits.reshape(count, w).astype(np.int64) @ (np.int64(1) << np.arange(w, dtype=np.int64))
        if out.size and out.max() >= alphabet:
            raise PayloadError("field", f"{what}: symbol {int(out.max())} outside the alphabet of {alphabet}")
        return out
    if contexts is None or num_contexts == 1:
        sizes = [count]
    else:  # the group sizes from the contexts, before the (allocating) sort below
        if len(contexts) != count:
            raise ValueError(f"{len(contexts)} contexts for {count} symbols")
        sizes = [int(v) for v in np.bincount(contexts, minlength=num_contexts)[:num_contexts]]
    tables = []
    for c, size in enumerate(sizes):
        counts = reader.array("<u4", alphabet, f"{what}: symbol counts").astype(np.int64)
        if int(counts.sum()) != size:
            raise PayloadError("size", f"{what}: counts of context {c} add up to {int(counts.sum())}, "
                                       f"expected {size} symbols")
        tables.append(counts)
    nwords = reader.u32(f"{what}: word count")
    if 4 * nwords > reader.remaining:
        raise PayloadError("truncated", f"{what}: {nwords} coder words declared, {reader.remaining} bytes remain")
    words = reader.array("<u4", nwords, f"{what}: coder words").astype(np.uint32)
    groups = _groups(count, contexts, num_contexts)
    out = np.zeros(count, np.int64)
    if alphabet == 1 or count == 0:
        return out
    import constriction

    try:
        dec = constriction.stream.queue.RangeDecoder(words)
        decoded = []
        for counts, size in zip(tables, sizes):
            if size:
                # a context whose counts say "all one symbol" still decodes through the model
                decoded.append(np.asarray(dec.decode(_model(counts.astype(np.float64)), size), np.int64))
            else:
                decoded.append(np.zeros(0, np.int64))
    except Exception as err:  # constriction reports malformed streams with its own exceptions
        raise PayloadError("entropy", f"{what}: the range-coded stream does not decode ({err})") from None
    for counts, part in zip(tables, decoded):
        if part.size and not np.array_equal(np.bincount(part, minlength=alphabet), counts):
            raise PayloadError("entropy", f"{what}: decoded symbols do not match the declared counts")
    if groups is None:
        return decoded[0]
    for g, part in zip(groups, decoded):
        out[g] = part
    return out
