"""Top-k sparsification: send the ``k`` largest-magnitude weights, with compactly coded positions.

The conv/linear kernels ("weight" role) are concatenated in spec order into one vector of ``n``
elements and the ``k = ceil(fraction · n)`` (at least 1 when ``n > 0``; ``fraction`` is read as the
decimal it is written as, so ``0.07 · 100`` keeps 7) largest magnitudes are kept globally, across
tensors; ties go to the lower index, so the choice is deterministic. Everything else decodes to 0.
Biases, BatchNorm parameters and running statistics travel as float32. The uplink body is::

    k u32 | gap classes (1 symbol section, alphabet 33, k symbols) | mantissas ceil(B / 8) bytes
    | k float32 kept values (ascending index order) | float32 dense values

Positions ``idx_0 < idx_1 < ...`` are sent as gaps ``g_i = idx_i - idx_{i-1} - 1`` (``g_0 = idx_0``),
Elias-gamma style: the class ``c_i = bit_length(g_i + 1)`` (1..32) is a symbol, and the mantissa
``(g_i + 1) - 2^(c_i - 1)`` follows in ``c_i - 1`` bits. The mantissas are one bit stream,
least significant bit first, element after element, ``B = Σ (c_i - 1)`` bits packed into
``ceil(B / 8)`` bytes with zero padding. In fixed-width mode a class takes 6 bits, so the position
of a kept value costs ``6 + c_i - 1`` bits, about ``5 + log2(1 / fraction)``; ``entropy=true``
range codes the classes, which are strongly concentrated around ``log2(1 / fraction)``.

The decoder checks ``k <= n`` before it allocates anything, that every class is in 1..32, that the
mantissa bytes are there and their padding is zero, and that the last position is below ``n``. An
update holding NaN treats it as the largest magnitude, so it is sent and the server rejects it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping

import numpy as np
import torch

from ..errors import ConfigError, PayloadError
from .base import CodecContext, KernelCodec, Options, TensorSpec
from .registry import register
from .wire import BodyReader, BodyWriter

CLASSES = 33  # class symbols 1..32; 0 is never sent
MAX_N = 2**32 - 1  # g + 1 <= n must fit 32 bits, and k is a u32


def keep_count(fraction: float, n: int) -> int:
    """``ceil(fraction · n)``, at least 1 when ``n > 0``, computed on ``fraction``'s decimal value."""
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(Fraction(str(fraction)) * n)))


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the ``k`` largest ``|values|`` (ties: lower index first; NaN is largest).

    Same set as ``np.sort(np.argsort(-|v|, kind="stable")[:k])``, in O(n): everything strictly above
    the k-th largest magnitude, then the lowest-indexed elements equal to it.
    """
    n = values.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, np.int64)
    mag = np.abs(values)
    if np.isnan(mag).any():
        mag[np.isnan(mag)] = np.inf
    threshold = np.partition(mag, n - k)[n - k]
    above = mag > threshold
    missing = k - int(np.count_nonzero(above))
    ties = np.flatnonzero(mag == threshold)[:missing]
    above[ties] = True
    return np.flatnonzero(above)


def bit_length(x: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of each positive integer ``x < 2^53`` (exact, via the float64 exponent)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


def encode_positions(idx: np.ndarray) -> tuple[np.ndarray, bytes]:
    """(classes, packed mantissa bytes) of ascending positions ``idx``."""
    gaps1 = np.diff(idx, prepend=-1).astype(np.int64)  # g + 1 >= 1
    classes = bit_length(gaps1)
    widths = classes - 1
    mantissas = gaps1 - (np.int64(1) << widths)
    total = int(widths.sum())
    if total == 0:
        return classes, b""
    owner = np.repeat(np.arange(idx.size), widths)
    starts = np.cumsum(widths) - widths
    shift = np.arange(total, dtype=np.int64) - starts[owner]
    bits = ((mantissas[owner] >> shift) & 1).astype(np.uint8)
    return classes, np.packbits(bits, bitorder="little").tobytes()


def decode_positions(classes: np.ndarray, raw: np.ndarray, n: int) -> np.ndarray:
    """Ascending positions from ``classes`` (each checked in 1..32) and the mantissa bytes ``raw``."""
    k = classes.size
    if k and (classes.min() < 1 or classes.max() > 32):
        bad = classes[(classes < 1) | (classes > 32)][0]
        raise PayloadError("field", f"gap class {int(bad)} outside 1..32")
    widths = classes - 1
    total = int(widths.sum())
    if total % 8 and raw[-1] >> (total % 8):
        raise PayloadError("field", "padding bits after the last gap mantissa are not zero")
    starts = np.cumsum(widths) - widths
    # a mantissa has at most 31 bits starting anywhere in a byte: 5 bytes from its first one hold it
    padded = np.concatenate([raw, np.zeros(5, np.uint8)])
    first = starts >> 3
    window = np.zeros(k, np.uint64)
    for b in range(5):
        window |= padded[first + b].astype(np.uint64) << np.uint64(8 * b)
    mantissas = (window >> (starts & 7).astype(np.uint64)) & ((np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1))
    gaps1 = (np.int64(1) << widths) + mantissas.astype(np.int64)
    idx = np.cumsum(gaps1) - 1
    if k and idx[-1] >= n:
        raise PayloadError("field", f"position {int(idx[-1])} is beyond the {n} compressed weights")
    return idx


@dataclass(frozen=True)
class TopKOptions(Options):
    fraction: float = 0.01

    def check(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be a number in (0, 1], got {self.fraction!r}")


@register("topk", "global top-k sparsification with Elias-gamma coded positions")
class TopKCodec(KernelCodec):
    codec_id = "topk"
    options_type = TopKOptions
    symbolic = True

    def encode_kernels(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], ctx: CodecContext,
                       w: BodyWriter) -> None:
        if flat.size > MAX_N:
            raise ConfigError(f"topk codes positions in 32 bits; {flat.size} weights are too many")
        idx = top_indices(flat, keep_count(self.options.fraction, flat.size))
        classes, mantissas = encode_positions(idx)
        w.u32(idx.size)
        w.symbols(classes, CLASSES)
        w.raw(mantissas).raw(flat[idx].astype("<f4", copy=False))

    def decode_kernels(self, reader: BodyReader, compressed: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        n = sum(t.numel for t in compressed)
        k = reader.u32("k")
        if k > n:
            raise PayloadError("field", f"k = {k} kept values, but the model has only {n} compressed weights")
        if k > keep_count(self.options.fraction, n):
            raise PayloadError("binding", f"k = {k} kept values; this run keeps {keep_count(self.options.fraction, n)}"
                                          f" (fraction {self.options.fraction:g} of {n})")
        classes = reader.symbols(k, CLASSES, "gap classes")
        if k and (classes.min() < 1):
            raise PayloadError("field", "gap class 0 outside 1..32")
        nbytes = (int((classes - 1).sum()) + 7) // 8
        if nbytes > reader.remaining:
            raise PayloadError("truncated", f"gap mantissas need {nbytes} bytes but only {reader.remaining} remain")
        raw = np.frombuffer(reader.take(nbytes, "gap mantissas"), np.uint8)
        idx = decode_positions(classes, raw, n)
        self.check_size(reader, ctx, 4 * k, f" after the positions ({k} kept values)")
        values = np.zeros(n, np.float32)
        values[idx] = reader.array("<f4", k, "kept values")
        return values
