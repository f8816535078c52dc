"""FedBAT: the update is binarized with a learned step size (Li et al., ICML 2024).

Every conv/linear kernel ("weight" role) is binarized; BatchNorm parameters and running statistics
and biases train normally and travel as float32, as in FedMRN.

Local training (:class:`StochasticBinaryTraining`) learns, per binarized tensor, an update ``Δ``
(latent, reset to 0 every round) and a step size ``α > 0`` (latent, initialised to the codec option
``step``). ``α`` is kept positive by learning ``log α`` (latent name ``"<tensor>/log_step"``, not a
model tensor); the gradient that reaches ``α`` is the one the weight ``global + α·b`` gives it
(``d/dα = b`` per element, hence ``d/d log α = α·b``). Every forward pass draws
``b ∈ {-1, +1}`` with ``P(b = +1) = clip((Δ/α + 1) / 2, 0, 1)`` (stochastic binarization, unbiased
for ``|Δ| ≤ α``) from the client's generator and uses the weight ``global + α·b``; the gradient reaches
``Δ`` straight through the sampling (``d/dΔ = 1``). At the end the parametrization returns
``clip(Δ, -α, α)`` per tensor and the side value ``"<tensor>/step"`` = ``α`` (a 0-d float32 tensor),
which only this codec's encoder reads.

Encoding: per binarized tensor the step ``α`` is its side value when the update carries one, else
(the codec applied to an arbitrary update) ``max |u|`` of that tensor (the smallest normal float32
if the tensor is all zeros). Bits ``b ~ Bernoulli(clip((u/α + 1) / 2, 0, 1))`` are drawn with
``ctx.rng`` (bit 1 stands for ``+α``). The body is::

    α float32 per binarized tensor (spec order) | bits (one symbol section, alphabet 2, n = all
    binarized weights) | float32 dense values

i.e. ``4 * k + ceil(n / 8) + 4 * n_dense`` bytes in fixed mode for ``k`` binarized tensors; with
``entropy=true`` the bits are range coded (one model). Decoding: ``α · (2b - 1)``; every ``α`` must be
finite and positive. Aggregation: the example-weighted mean (the default algorithm's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..errors import ConfigError, PayloadError
from .algorithms import Algorithm, Parametrization
from .base import CodecContext, KernelCodec, Options, TensorSpec, Update, split_specs
from .registry import register
from .wire import BodyReader, BodyWriter

#: suffix of the side value carrying a tensor's step size (``finish`` → ``encode``)
STEP = "/step"
#: suffix of the latent tensor holding a tensor's log step size during local training
LOG_STEP = "/log_step"
#: the step sent for an all-zero tensor when no step is given: any positive step is unbiased there
ZERO_STEP = float(np.finfo(np.float32).tiny)


def binarize_probability(u: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """P(b = +1) for update ``u`` and step ``alpha``."""
    return ((u / alpha + 1.0) * 0.5).clamp(0.0, 1.0)


class StochasticBinaryTraining(Parametrization):
    """Learn ``Δ`` and ``log α`` per binarized tensor; see the module docstring."""

    def __init__(self, specs: list[TensorSpec], step: float, gen: torch.Generator | None):
        self.specs = specs
        self.names = tuple(t.name for t in specs)
        self.step, self.gen = step, gen

    def init(self) -> Update:
        out = {}
        for t in self.specs:
            out[t.name] = torch.zeros(t.shape, device=self.device, requires_grad=True)
            out[t.name + LOG_STEP] = torch.tensor(math.log(self.step), dtype=torch.float32, device=self.device,
                                                  requires_grad=True)
        return out

    def deltas(self, latent: Update, progress: float) -> Update:
        out = {}
        for n in self.names:
            u, alpha = latent[n], torch.exp(latent[n + LOG_STEP])
            with torch.no_grad():
                p = binarize_probability(u, alpha)
                b = (self.uniform(u.shape) < p).to(torch.float32) * 2.0 - 1.0
            out[n] = alpha * b + (u - u.detach())  # d/dΔ = 1 (straight through), d/dα = b
        return out

    def finish(self, latent: Update) -> Update:
        out = {}
        with torch.no_grad():
            for n in self.names:
                alpha = torch.exp(latent[n + LOG_STEP]).to(torch.float32)
                out[n] = torch.maximum(torch.minimum(latent[n], alpha), -alpha)
                out[n + STEP] = alpha.clone()
        return out


@dataclass(frozen=True)
class FedBATOptions(Options):
    step: float = 0.005

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "step", float(self.step))
        except (TypeError, ValueError):
            raise ConfigError(f"step must be a number, got {self.step!r}") from None
        super().__post_init__()

    def check(self) -> None:
        step = self.step
        if not (math.isfinite(step) and step > 0 and np.isfinite(np.float32(step)) and np.float32(step) > 0):
            raise ConfigError(f"step must be a positive finite float32, got {step}")


class FedBAT(Algorithm):
    """FedBAT's local training: the update and a step size per binarized tensor."""

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization:
        return StochasticBinaryTraining(split_specs(ctx.spec)[0], self.options.step, ctx.rng)


def steps(update: Mapping[str, torch.Tensor], specs: list[TensorSpec]) -> np.ndarray:
    """The float32 step of each tensor in ``specs``: its side value, else ``max |u|``."""
    out = np.zeros(len(specs), np.float32)
    for i, t in enumerate(specs):
        side = update.get(t.name + STEP)
        if side is not None:
            if side.numel() != 1:
                raise ConfigError(f"side value {t.name + STEP!r} must hold one step size, has {side.numel()}")
            out[i] = np.float32(float(side.reshape(-1)[0]))
        else:
            u = update[t.name]
            out[i] = np.float32(float(u.detach().abs().max())) if u.numel() else np.float32(ZERO_STEP)
            if out[i] == 0:
                out[i] = np.float32(ZERO_STEP)
    return out


@register("fedbat", "stochastic binarization of the update with a learned step size (FedBAT)", algorithm=FedBAT)
class FedBATCodec(KernelCodec):
    codec_id = "fedbat"
    options_type = FedBATOptions
    symbolic = True

    def encode_kernels(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], ctx: CodecContext,
                       w: BodyWriter) -> None:
        binarized = split_specs(ctx.spec)[0]
        alphas = steps(update, binarized)
        per_element = torch.from_numpy(np.repeat(alphas, [t.numel for t in binarized]))
        p = binarize_probability(torch.from_numpy(flat), per_element)
        bits = (torch.rand(p.shape, generator=ctx.rng) < p).numpy()
        w.raw(alphas.astype("<f4", copy=False)).symbols(bits, 2)

    def decode_kernels(self, reader: BodyReader, binarized: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        k, n = len(binarized), sum(t.numel for t in binarized)
        if not self.entropy:
            self.check_size(reader, ctx, 4 * k + (n + 7) // 8)
        alphas = reader.array("<f4", k, "step sizes")
        bad = ~(np.isfinite(alphas) & (alphas > 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise PayloadError("field", f"step size {alphas[i]} of tensor {binarized[i].name!r} is not a positive "
                                        "finite number")
        bits = reader.symbols(n, 2, "sign bits")
        per_element = np.repeat(alphas, [t.numel for t in binarized])
        return np.where(bits.astype(bool), per_element, -per_element)
