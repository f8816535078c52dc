"""Low-bit dense values: the biases and BatchNorm tensors a :class:`KernelCodec` does not compress.

Every :class:`~fedcodec.codecs.base.KernelCodec` sends the tensors outside its kernels (biases,
BatchNorm weights and biases, running means and variances: 1,920 values on CNN4) as float32 by
default, 7,680 B per update on CNN4, which caps any codec near 200x. With ``dense_levels = s``
(1..255) they travel as deltas quantized like QSGD's (:mod:`fedcodec.codecs.qsgd`): per tensor one
float32 scale ``M = max |x|`` and an unbiased stochastic rounding of each value onto the grid of
``s + 1`` points over ``[-M, M]``. The dense part of the body is then::

    M f32 per dense tensor (spec order) | grid indices (1 symbol section, alphabet s + 1,
    one symbol per dense value, spec order)

In fixed-width mode that is ``4 * tensors + ceil(values * ceil(log2(s + 1)) / 8)`` bytes (CNN4,
``s = 15``: ``4 * 16 + 960 = 1,024`` B); with the codec's entropy stage the section is range coded.

A running variance (a tensor whose name ends in ``running_var``) is coded in log space against the
variance ``v`` of the reference model (:attr:`CodecContext.reference`, the model the client trained
from, which the server holds too): ``x = log(max(v + d, F) / max(v, F))`` with ``F = 1e-30``, computed
in float64 and rounded to float32, is what is quantized, and the decoder's delta is
``max(v, F) * expm1(x)`` (float64, rounded to float32): the decoded variance ``max(v, F) * exp(x)``
is positive whatever the rounding, and a relative change costs the same bits at every scale. The
other tensors are quantized as plain deltas.

The rounding draws are the client's (:attr:`CodecContext.rng`, one float32 U[0, 1) per value). A
scale that is negative or not finite is rejected (``field``); an update holding NaN or Inf encodes
(its scale is not finite) and the server rejects it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..errors import ConfigError
from .base import CodecContext, ModelSpec, TensorSpec, Update, split_specs
from .qsgd import dequantize_segments, quantize_segments
from .signsgd import read_scales
from .symbols import fixed_size
from .wire import BodyReader, BodyWriter

#: floor of a running variance in the log-space coding
VAR_FLOOR = 1e-30


def is_variance(t: TensorSpec) -> bool:
    return t.name.endswith("running_var")


def dense_size(spec: ModelSpec, levels: int) -> int:
    """Bytes of the dense part in fixed-width mode."""
    dense = split_specs(spec)[1]
    return 4 * len(dense) + fixed_size(sum(t.numel for t in dense), levels + 1)


def _reference_variance(ctx: CodecContext, t: TensorSpec) -> np.ndarray:
    if ctx.reference is None or t.name not in ctx.reference:
        raise ConfigError(f"dense_levels codes the running variance {t.name!r} relative to the model the client "
                          "trained from (CodecContext.reference); pass it, or set dense_levels=0 (float32)")
    v = ctx.reference[t.name].detach().reshape(-1).double().cpu().numpy()
    return np.maximum(v, VAR_FLOOR)


def encode_dense(w: BodyWriter, update: Mapping[str, torch.Tensor], ctx: CodecContext, levels: int) -> None:
    """Write the dense part of ``update`` (see the module docstring)."""
    if ctx.rng is None:
        raise ConfigError("dense_levels rounds at random and needs the client's generator (CodecContext.rng)")
    dense = split_specs(ctx.spec)[1]
    parts = []
    for t in dense:
        d = update[t.name].detach().reshape(-1).cpu()
        if is_variance(t):
            v = _reference_variance(ctx, t)
            with np.errstate(invalid="ignore"):  # NaN stays NaN (the scale then is not finite)
                x = np.log(np.maximum(v + d.double().numpy(), VAR_FLOOR) / v)
            parts.append(x.astype(np.float32))
        else:
            parts.append(d.float().numpy())
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    u = torch.rand(flat.size, generator=ctx.rng, dtype=torch.float32).numpy()
    maxima, q = quantize_segments(flat, [t.numel for t in dense], levels, u)
    w.raw(maxima.astype("<f4", copy=False))
    w.symbols(q, levels + 1)


def decode_dense(reader: BodyReader, ctx: CodecContext, levels: int) -> Update:
    """Read the dense part: one float32 delta tensor per dense tensor of the spec."""
    dense = split_specs(ctx.spec)[1]
    maxima = read_scales(reader, len(dense), "dense scales")
    sizes = [t.numel for t in dense]
    q = reader.symbols(sum(sizes), levels + 1, "dense values")
    values = dequantize_segments(q, maxima, sizes, levels)
    out, pos = {}, 0
    for t in dense:
        x = values[pos:pos + t.numel]
        if is_variance(t):
            with np.errstate(over="ignore"):  # an absurd scale gives Inf, which decode rejects
                x = (_reference_variance(ctx, t) * np.expm1(x.astype(np.float64))).astype(np.float32)
        out[t.name] = torch.from_numpy(x.reshape(t.shape))
        pos += t.numel
    return out
