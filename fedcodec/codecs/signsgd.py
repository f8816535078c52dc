"""SignSGD with a per-tensor scale: one bit per weight, plus the mean magnitude of each kernel.

Every conv/linear kernel ("weight" role) is reduced to its signs and one float32 scale, the mean
absolute value ``||Δ||₁ / d`` of that tensor; BatchNorm parameters, biases and running statistics
travel as float32. The uplink body is::

    scale f32 per compressed tensor (spec order) | sign bits (1 symbol section, alphabet 2, n symbols)
    | float32 dense values

A sign symbol is 1 where ``Δ >= 0`` (so ``-0.0`` and ``0.0`` send 1) and 0 elsewhere (NaN too); the
decoded value is ``+scale`` for 1 and ``-scale`` for 0, exactly. In fixed-width mode the bits take
``ceil(n / 8)`` bytes; with ``entropy=true`` they are range coded (which only pays for skewed signs).
The scale is ``mean |Δ|`` accumulated in float64 and rounded to float32 once. The decoder rejects a
scale that is negative or not finite.

With ``ef=true`` this is EF-SignSGD (Karimireddy et al., 2019): the error-feedback stage keeps
``Δ - scale·sign(Δ)`` and adds it to the next round's update.

Server side, ``vote=false`` (default) applies the usual example-weighted mean of the decoded updates.
``vote=true`` aggregates by majority vote (signSGD with majority vote, Bernstein et al., 2018) scaled
by the clients' magnitudes: for a compressed tensor the step is ::

    sign( Σ_k sign(u_k) ) · Σ_k (w_k / W) · scale_k,      scale_k = mean |u_k|

an *unweighted* vote per element (a tie gives 0) times the example-weighted mean of the clients'
scales, where each client's scale is recovered from its decoded update (exact, since every element
is ``±scale``). A client whose tensor is all zero (scale 0) abstains in that tensor's vote, since
``sign(±0) = 0``. Dense tensors take the example-weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..errors import PayloadError
from .algorithms import Algorithm, weighted_mean
from .base import CodecContext, KernelCodec, ModelSpec, Options, TensorSpec, Update, split_specs
from .registry import register
from .symbols import fixed_size
from .wire import BodyReader, BodyWriter


def tensor_scales(flat: np.ndarray, specs: list[TensorSpec]) -> np.ndarray:
    """``mean |x|`` of each tensor's slice of ``flat`` (float64 accumulation), as float32."""
    out = np.zeros(len(specs), np.float32)
    pos = 0
    for i, t in enumerate(specs):
        seg = flat[pos:pos + t.numel]
        out[i] = np.abs(seg).mean(dtype=np.float64) if seg.size else 0.0
        pos += t.numel
    return out


def read_scales(reader: BodyReader, count: int, what: str) -> np.ndarray:
    """``count`` float32 scales, each checked finite and >= 0."""
    scales = reader.array("<f4", count, what)
    bad = ~(np.isfinite(scales) & (scales >= 0))
    if bad.any():
        raise PayloadError("field", f"{what}: {float(scales[bad][0])} is not a finite non-negative scale")
    return scales


@dataclass(frozen=True)
class SignSGDOptions(Options):
    vote: bool = False


class SignSGD(Algorithm):
    """The example-weighted mean, or with ``vote`` the scaled majority vote of the module docstring."""

    options: SignSGDOptions

    def own_aggregate(self, spec: ModelSpec) -> list[str]:
        return [t.name for t in split_specs(spec)[0]] if self.options.vote else []

    def aggregate(self, spec: ModelSpec, global_params: Update,
                  updates: list[tuple[int, float, Update]]) -> dict[str, torch.Tensor]:
        if not self.options.vote:
            return weighted_mean(spec, updates)
        compressed, dense = split_specs(spec)
        out = weighted_mean(ModelSpec(tuple(dense)), updates)
        total = sum(w for _, w, _ in updates)
        for t in compressed:
            votes = torch.zeros(t.shape, dtype=torch.float64)
            scale = 0.0
            for _, w, upd in updates:
                u = upd[t.name].to(torch.float64)
                votes += torch.sign(u)
                if u.numel():
                    scale += (w / total) * float(u.abs().mean())
            out[t.name] = torch.sign(votes) * scale
        return out


@register("signsgd", "1 bit per weight times a per-tensor mean magnitude (signSGD; EF-SignSGD with ef=true)",
          algorithm=SignSGD)
class SignSGDCodec(KernelCodec):
    codec_id = "signsgd"
    options_type = SignSGDOptions
    symbolic = True

    def encode_kernels(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], ctx: CodecContext,
                       w: BodyWriter) -> None:
        w.raw(tensor_scales(flat, split_specs(ctx.spec)[0]).astype("<f4", copy=False))
        w.symbols((flat >= 0).view(np.uint8), 2)

    def decode_kernels(self, reader: BodyReader, compressed: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        n = sum(t.numel for t in compressed)
        scales = read_scales(reader, len(compressed), "tensor scales")
        if not self.entropy:
            self.check_size(reader, ctx, fixed_size(n, 2), " after the scales")
        bits = reader.symbols(n, 2, "sign bits")
        values = np.empty(n, np.float32)
        pos = 0
        for t, scale in zip(compressed, scales):
            end = pos + t.numel
            values[pos:end] = np.where(bits[pos:end] != 0, scale, -scale)
            pos = end
        return values
