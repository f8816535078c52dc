"""Unbiased stochastic uniform quantization with a per-tensor max-norm scale (``qsgd``).

This is the FedPAQ-style quantizer (Reisizadeh et al., 2020; the uniform grid of QSGD's analysis):
each conv/linear kernel ("weight" role) is scaled by its own ``M = max |Δ|`` and every element is
rounded at random to one of the two neighbouring points of the grid of ``s + 1`` equally spaced
values over ``[-M, M]``, with the probabilities that make the result unbiased
(``E[decode] = Δ``; the error of one element is below ``2M / s``). ``s = levels`` (1..255); ``s = 1``
is 1-bit stochastic binarization to ``±M``. It is *not* QSGD's sign + magnitude variant with an L2
norm scale (Alistarh et al., 2017): here the sign is part of the level index and the scale is the
max norm, so the largest element is always exact.

Biases, BatchNorm parameters and running statistics travel as float32. The uplink body is::

    levels u8 | M f32 per compressed tensor (spec order) | grid indices (1 symbol section,
    alphabet levels + 1, n symbols) | float32 dense values

Index ``q`` of a tensor with scale ``M`` decodes to the float32 value ``M * g[q]`` with
``g[q] = float32(2q - s) / float32(s)`` (one correctly rounded division), which is
``-M + 2M·q/s`` with the endpoints ``±M`` (and ``0`` for ``q = s/2``) exact and no overflow even
for ``M`` near the float32 maximum. ``M = 0`` decodes to zeros (the encoder sends ``q = s // 2``).
In fixed-width mode the indices take ``ceil(n · ceil(log2(s + 1)) / 8)`` bytes; ``entropy=true``
range codes them, which pays off because most updates put most of their mass near 0.

The decoder reads ``levels`` from the body (payloads are self-describing, like FedMRN's) and rejects
levels outside 1..255 and scales that are negative or not finite. An update holding NaN or Inf
still encodes (its scale is not finite) and the server rejects it, as it would a float32 one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..errors import ConfigError, PayloadError
from .base import CodecContext, KernelCodec, Options, TensorSpec, split_specs
from .registry import register
from .signsgd import read_scales
from .symbols import fixed_size
from .wire import BodyReader, BodyWriter

MAX_LEVELS = 255


def grid(levels: int) -> np.ndarray:
    """The ``levels + 1`` grid points over [-1, 1] as float32 (``g[q] = (2q - s) / s``)."""
    s = np.float32(levels)
    return (np.arange(levels + 1, dtype=np.float32) * np.float32(2) - s) / s


def quantize(x: np.ndarray, m: np.float32, levels: int, u: np.ndarray) -> np.ndarray:
    """Grid indices (uint8) of ``x`` for scale ``m = max |x|``, rounding up where ``u < frac``."""
    if not (np.isfinite(m) and m > 0):
        return np.full(x.shape, levels // 2, np.uint8)
    # |x| <= m, so x / m is in [-1, 1] (a correctly rounded division cannot leave it), and t in
    # [0, levels] with t = levels exactly at x = m and 0 at x = -m: no clipping needed
    t = x / m
    t += np.float32(1)
    t *= np.float32(levels / 2)  # exact: levels / 2 is a multiple of 0.5
    lo = np.floor(t)
    t -= lo  # the fractional part: P(round up)
    q = lo.astype(np.uint8)
    q += u < t
    return q


def quantize_segments(flat: np.ndarray, sizes: list[int], levels: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale ``max |x|`` of each consecutive segment of ``flat`` of the given ``sizes``, uint8
    grid indices of all of ``flat``), rounding up where ``u < frac`` (``u``: one draw per value)."""
    maxima = np.zeros(len(sizes), np.float32)
    q = np.empty(flat.size, np.uint8)
    pos = 0
    for i, size in enumerate(sizes):
        seg = flat[pos:pos + size]
        maxima[i] = np.abs(seg).max() if seg.size else 0.0
        q[pos:pos + size] = quantize(seg, maxima[i], levels, u[pos:pos + size])
        pos += size
    return maxima, q


def dequantize_segments(q: np.ndarray, maxima: np.ndarray, sizes: list[int], levels: int) -> np.ndarray:
    """The float32 values ``M * g[q]`` of grid indices ``q`` whose consecutive segments of the given
    ``sizes`` have scales ``maxima`` (the inverse of :func:`quantize_segments`)."""
    points = grid(levels)
    values = np.empty(len(q), np.float32)
    pos = 0
    for i, size in enumerate(sizes):
        np.multiply(points[q[pos:pos + size]], maxima[i], out=values[pos:pos + size])
        pos += size
    return values


@dataclass(frozen=True)
class QSGDOptions(Options):
    levels: int = 4

    def check(self) -> None:
        if not 1 <= self.levels <= MAX_LEVELS:
            raise ConfigError(f"levels must be an integer in 1..{MAX_LEVELS}, got {self.levels!r}")


@register("qsgd", "unbiased stochastic uniform quantization, max-norm scale per tensor (FedPAQ-style)")
class QSGDCodec(KernelCodec):
    codec_id = "qsgd"
    options_type = QSGDOptions
    symbolic = True

    def encode_kernels(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], ctx: CodecContext,
                       w: BodyWriter) -> None:
        if ctx.rng is None:
            raise ConfigError("qsgd rounds at random and needs the client's generator (CodecContext.rng)")
        compressed, levels = split_specs(ctx.spec)[0], self.options.levels
        u = torch.rand(flat.size, generator=ctx.rng, dtype=torch.float32).numpy()
        maxima, q = quantize_segments(flat, [t.numel for t in compressed], levels, u)
        w.u8(levels).raw(maxima.astype("<f4", copy=False))
        w.symbols(q, levels + 1)

    def decode_kernels(self, reader: BodyReader, compressed: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        n = sum(t.numel for t in compressed)
        levels = reader.u8("levels")
        if levels != self.options.levels:
            raise PayloadError("binding", f"levels {levels}; this run quantizes to {self.options.levels} levels")
        maxima = read_scales(reader, len(compressed), "tensor maxima")
        if not self.entropy:
            self.check_size(reader, ctx, fixed_size(n, levels + 1), " after the scales")
        q = reader.symbols(n, levels + 1, "grid indices")
        return dequantize_segments(q, maxima, [t.numel for t in compressed], levels)
