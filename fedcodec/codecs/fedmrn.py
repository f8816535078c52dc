"""FedMRN: the update is seeded random noise times a learned 1-bit mask (Li et al., ACM MM 2024).

Every conv/linear kernel ("weight" role) is masked; BatchNorm parameters and running statistics
train normally and travel as float32. The uplink body is::

    seed u64 | mask kind u8 | noise kind u8 | alpha f32 | mask bits ceil(n/8) | float32 dense values

The server regenerates the noise from the seed with the same generator (NumPy's PCG64, whose bit
stream is stable across platforms and versions) and rebuilds ``noise * mask`` exactly. The fields
are bound to the run: the mask kind, noise kind and alpha must be the configured ones and the seed
the one derived for (run, round, client) (:attr:`CodecContext.seed` on the server), so a client
cannot choose its own scale, and a payload replayed from another round or client is rejected.

The mask bits are one symbol section (:mod:`fedcodec.codecs.symbols`): packed 8 per byte, or with
``entropy=true`` range coded with one two-pass model per bucket of the noise magnitude ``|N|``.
Both ends know the noise before the bits, so the buckets cost nothing, and they matter: a binary
mask bit is 1 with probability ``clip(U/N, 0, 1)``, which depends strongly on ``|N|``.

Masking, for latent update ``U`` and noise ``N`` (``r = U / N``):

* binary: ``p = clip(r, 0, 1)``, ``m ~ Bernoulli(p)`` in {0, 1}, update ``N * m``;
* signed: ``p = clip((r + 1) / 2, 0, 1)``, ``m = 2 Bernoulli(p) - 1`` in {-1, +1}, update ``N * m``.

``sm`` (stochastic masking) draws ``m`` afresh at every forward pass; with ``sm`` off the mask is the
deterministic rounding ``p > 0.5``. ``pm`` (progressive masking) uses the mask for each element
with probability ``t / T`` at local step ``t`` of ``T`` and the continuous ``clip(r) * N`` otherwise.
PSM is ``sm`` and ``pm`` together (the paper's default). Gradients pass straight through the
masking and clipping. After training a fresh mask is drawn from the final ``p`` (rounded when
``sm`` is off); that mask is what is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..errors import ConfigError, PayloadError
from .algorithms import Algorithm, Parametrization
from .base import CodecContext, KernelCodec, ModelSpec, Options, TensorSpec, Update, split_specs
from .registry import register
from .wire import BodyReader, BodyWriter

MASKS = ("binary", "signed")
NOISES = ("uniform", "gaussian", "rademacher")
NOISE_FLOOR = np.float32(1e-8)
#: magnitude buckets used as entropy-coding contexts, and |N|/alpha where the last bucket starts
CONTEXTS = 8
_CONTEXT_RANGE = {"uniform": 1.0, "gaussian": 2.5, "rademacher": 0.0}


def noise_contexts(noise: np.ndarray, kind: str, alpha: float) -> tuple[np.ndarray | None, int]:
    """Entropy-coding context of each mask bit: a bucket of ``|N| / alpha`` (none for ±1 noise)."""
    top = _CONTEXT_RANGE[kind]
    if top == 0.0:
        return None, 1
    scaled = np.abs(noise).astype(np.float64) * (CONTEXTS / (top * float(alpha)))  # float64: no overflow
    return np.minimum(scaled, CONTEXTS - 1).astype(np.uint8), CONTEXTS


def make_noise(seed: int, n: int, kind: str, alpha: float) -> np.ndarray:
    """``n`` float32 noise values from ``seed``; bit-identical on every machine.

    uniform: ``alpha * U(-1, 1)``; gaussian: ``alpha * N(0, 1)``; rademacher: ``alpha * ±1``.
    Magnitudes below 1e-8 are raised to 1e-8 (keeping the sign) so ``U / N`` stays finite.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    a = np.float32(alpha)
    # in-place float32 arithmetic: the same operations in the same order as ``(u * 2 - 1) * a``
    if kind == "uniform":
        noise = rng.random(n, dtype=np.float32)
        noise *= np.float32(2)
        noise -= np.float32(1)
    elif kind == "gaussian":
        noise = rng.standard_normal(n, dtype=np.float32)
    elif kind == "rademacher":
        noise = rng.integers(0, 2, n, dtype=np.int8).astype(np.float32)
        noise *= np.float32(2)
        noise -= np.float32(1)
    else:
        raise ConfigError(f"unknown noise {kind!r}; choose one of {NOISES}")
    noise *= a
    small = np.flatnonzero(np.abs(noise) < NOISE_FLOOR)
    if small.size:
        noise[small] = np.where(noise[small] < 0, -NOISE_FLOOR, NOISE_FLOOR)
    return noise


def mask_probability(ratio: torch.Tensor, mask: str) -> torch.Tensor:
    """P(bit = 1) for latent/noise ratio ``ratio``."""
    if mask == "binary":
        return ratio.clamp(0.0, 1.0)
    return ((ratio + 1.0) * 0.5).clamp(0.0, 1.0)


def bits_to_mask(bits: torch.Tensor, mask: str) -> torch.Tensor:
    """{0,1} bits as the mask's values: {0,1} for binary, {-1,+1} for signed."""
    bits = bits.to(torch.float32)
    return bits if mask == "binary" else bits * 2.0 - 1.0


def progressive_probability(step: int, total_steps: int) -> float:
    """PM's chance that an element uses its mask at local step ``step`` (0-based) of ``total_steps``."""
    return (step + 1) / total_steps


class MaskedNoiseTraining(Parametrization):
    """Train a latent update ``U`` (reset to 0) inside frozen noise; see the module docstring."""

    def __init__(self, specs: list[TensorSpec], noise: dict[str, torch.Tensor], mask: str,
                 sm: bool, pm: bool, gen: torch.Generator):
        self.names = tuple(t.name for t in specs)
        self.noise = noise
        self.mask, self.sm, self.pm, self.gen = mask, sm, pm, gen

    def init(self) -> Update:
        return {n: torch.zeros_like(self.noise[n], requires_grad=True) for n in self.names}

    def _sample(self, p: torch.Tensor) -> torch.Tensor:
        if self.sm:
            bits = self.uniform(p.shape) < p
        else:
            bits = p > 0.5
        return bits_to_mask(bits, self.mask)

    def _continuous(self, ratio: torch.Tensor) -> torch.Tensor:
        return ratio.clamp(0.0, 1.0) if self.mask == "binary" else ratio.clamp(-1.0, 1.0)

    def deltas(self, latent: Update, progress: float) -> Update:
        out = {}
        for n in self.names:
            u, noise = latent[n], self.noise[n]
            with torch.no_grad():
                ratio = u / noise
                value = self._sample(mask_probability(ratio, self.mask))
                if self.pm:
                    keep = self.uniform(u.shape) < progress
                    value = torch.where(keep, value, self._continuous(ratio))
                value = value * noise
            out[n] = value + (u - u.detach())  # exact forward value; straight-through: d(out)/dU = 1
        return out

    def finish(self, latent: Update) -> Update:
        with torch.no_grad():
            return {n: self._continuous(latent[n] / self.noise[n]) * self.noise[n] for n in self.names}


@dataclass(frozen=True)
class FedMRNOptions(Options):
    mask: str = "binary"
    noise: str = "uniform"
    alpha: float = 0.01
    sm: bool = True
    pm: bool = True

    def check(self) -> None:
        if self.mask not in MASKS:
            raise ConfigError(f"unknown mask {self.mask!r}; choose one of {MASKS}")
        if self.noise not in NOISES:
            raise ConfigError(f"unknown noise {self.noise!r}; choose one of {NOISES}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha}")
        object.__setattr__(self, "alpha", float(np.float32(self.alpha)))  # the value the wire carries


def noise_tensors(options: FedMRNOptions, seed: int, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """The noise of ``specs`` (the masked tensors) for ``seed``, one tensor per name."""
    flat = make_noise(seed, sum(t.numel for t in specs), options.noise, options.alpha)
    return ModelSpec(tuple(specs)).unflatten(flat, specs)


class FedMRN(Algorithm):
    """FedMRN's local training: a latent update inside the client-round's noise (the codec's seed)."""

    options: FedMRNOptions

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization:
        o = self.options
        masked = split_specs(ctx.spec)[0]
        return MaskedNoiseTraining(masked, noise_tensors(o, ctx.seed, masked), o.mask, o.sm, o.pm, ctx.rng)


@register("fedmrn", "1-bit mask over seeded random noise (FedMRN)", algorithm=FedMRN)
class FedMRNCodec(KernelCodec):
    codec_id = "fedmrn"
    options_type = FedMRNOptions
    symbolic = True
    options: FedMRNOptions

    def encode_kernels(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], ctx: CodecContext,
                       w: BodyWriter) -> None:
        o = self.options
        noise = torch.from_numpy(make_noise(ctx.seed, flat.size, o.noise, o.alpha))
        ratio = torch.from_numpy(flat).div_(noise)  # a fresh copy: in place is safe
        # mask_probability(), in place (same float32 operations)
        p = ratio.clamp_(0.0, 1.0) if o.mask == "binary" else ratio.add_(1.0).mul_(0.5).clamp_(0.0, 1.0)
        bits = (torch.rand(p.shape, generator=ctx.rng) < p) if o.sm else (p > 0.5)
        w.u64(ctx.seed).u8(MASKS.index(o.mask)).u8(NOISES.index(o.noise)).f32(o.alpha)
        contexts, k = noise_contexts(noise.numpy(), o.noise, o.alpha) if self.entropy else (None, 1)
        w.symbols(bits.numpy(), 2, contexts, k)

    def decode_kernels(self, reader: BodyReader, masked: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        n = sum(t.numel for t in masked)
        seed = reader.u64("seed")
        mask_i, noise_i = reader.u8("mask kind"), reader.u8("noise kind")
        alpha = reader.f32("alpha")
        o = self.options
        if mask_i >= len(MASKS) or noise_i >= len(NOISES):
            raise PayloadError("field", f"unknown mask kind {mask_i} or noise kind {noise_i}")
        if (MASKS[mask_i], NOISES[noise_i], alpha) != (o.mask, o.noise, o.alpha):
            # the run fixes them: a client may not pick its own scale (alpha x 1000 is a boosted update)
            raise PayloadError("binding", f"mask {MASKS[mask_i]}, noise {NOISES[noise_i]}, alpha {alpha:.8g}; this "
                                          f"run uses mask {o.mask}, noise {o.noise}, alpha {o.alpha:.8g}")
        if seed != ctx.seed:
            raise PayloadError("binding", f"seed {seed:#x} is not this client-round's seed: the payload was made "
                                          "for another round or client (a replay)")
        if not self.entropy:
            self.check_size(reader, ctx, (n + 7) // 8, " after its fields")
        values = make_noise(seed, n, NOISES[noise_i], alpha)
        contexts, k = noise_contexts(values, NOISES[noise_i], alpha) if self.entropy else (None, 1)
        mask = reader.symbols(n, 2, "mask bits", contexts, k).astype(np.float32)
        if MASKS[mask_i] == "signed":  # bits_to_mask(), in numpy: {0,1} -> {-1,+1}
            mask *= np.float32(2)
            mask -= np.float32(1)
        values *= mask  # noise * mask
        return values
