"""FedMRN: the update is seeded random noise times a learned 1-bit mask (Li et al., ACM MM 2024).

Every conv/linear kernel ("weight" role) is masked; BatchNorm parameters and running statistics
train normally and travel as float32. The uplink body is::

    seed u64 | mask kind u8 | generator << 4 | noise kind u8 | alpha f32 | mask bits ceil(n/8)
    | float32 dense values

The server regenerates the noise from the seed with the same generator (:func:`make_noise`: NumPy's
SFC64 raw words, a bit stream NumPy keeps stable across platforms and versions) and rebuilds
``noise * mask`` exactly. The generator number (now 2) is in the high 4 bits of the noise byte, so a
payload whose noise came from another generator is refused (``version``) instead of decoded wrong.
Both ends work in pieces of :data:`CHUNK` values that stay in the CPU cache: more than 100 M weights
per second for encode + decode on one core (``benchmarks/throughput.py``). The fields
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

The mask that is sent draws each bit as ``d < 65536 p - 0.5`` with ``d`` a 16-bit draw from SFC64
seeded by the client's generator (private to the client): ``P(bit = 1)`` is within ``2**-17`` of
``p``, and exactly 0 or 1 where ``p`` is.

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
#: the noise generator this version makes and reads (the high 4 bits of the payload's noise byte)
GENERATOR = 2
#: values per piece of the chunked encode/decode (fits the L2 cache with its temporaries)
CHUNK = 1 << 15
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


def _draws16(bitgen: np.random.BitGenerator, count: int) -> np.ndarray:
    """The next ``count`` 16-bit draws of ``bitgen``: its raw 64-bit words, least significant 16 bits
    first (the same on big- and little-endian machines); consumes ``ceil(count / 4)`` words."""
    return bitgen.random_raw((count + 3) // 4).astype("<u8", copy=False).view("<u2")[:count]


def noise_chunks(seed: int, n: int, kind: str, alpha: float, chunk: int = CHUNK):
    """``make_noise(seed, n, kind, alpha)`` in pieces: yields ``(start, stop, values)`` with at most
    ``chunk`` values each (a multiple of 64), so a codec can work on cache-sized pieces."""
    if kind not in NOISES:
        raise ConfigError(f"unknown noise {kind!r}; choose one of {NOISES}")
    if chunk % 64:
        raise ValueError(f"chunk must be a multiple of 64, got {chunk}")
    a = np.float32(alpha)
    if kind == "gaussian":  # NumPy's float32 ziggurat on the same bit generator, then the floor
        g = np.random.Generator(np.random.SFC64(seed))
        for s in range(0, n, chunk):
            m = min(n - s, chunk)
            v = g.standard_normal(m, dtype=np.float32)
            v *= a
            small = np.flatnonzero(np.abs(v) < NOISE_FLOOR)
            if small.size:
                v[small] = np.where(v[small] < 0, -NOISE_FLOOR, NOISE_FLOOR)
            yield s, s + m, v
        return
    bitgen = np.random.SFC64(seed)
    if kind == "uniform":
        step = np.float32(a / np.float32(32768))  # exact: a power-of-two division
        for s in range(0, n, chunk):
            m = min(n - s, chunk)
            v = np.subtract(_draws16(bitgen, m), np.float32(32767.5), dtype=np.float32)  # exact
            v *= step
            yield s, s + m, v
    else:  # rademacher: one bit per value, 64 per word, least significant first
        for s in range(0, n, chunk):
            m = min(n - s, chunk)
            words = bitgen.random_raw((m + 63) // 64).astype("<u8", copy=False)
            bits = np.unpackbits(words.view(np.uint8), count=m, bitorder="little")
            yield s, s + m, np.where(bits.view(bool), a, -a)


def make_noise(seed: int, n: int, kind: str, alpha: float) -> np.ndarray:
    """``n`` float32 noise values from ``seed``; bit-identical on every machine (generator 2).

    The bits are NumPy's SFC64 raw 64-bit words (a bit stream NumPy keeps stable across versions):

    * uniform: each word gives four 16-bit draws ``k``; the value is ``alpha * (k - 32767.5) / 32768``,
      uniform over 65,536 levels symmetric about 0 in ``(-alpha, alpha)``, never 0 (the smallest
      magnitude is ``alpha / 65536``), rounded once to float32;
    * rademacher: each word gives 64 signs (bit 1: ``+alpha``, bit 0: ``-alpha``);
    * gaussian: ``alpha * N(0, 1)`` by NumPy's float32 ziggurat on SFC64, magnitudes below 1e-8
      raised to 1e-8 (keeping the sign) so ``U / N`` stays finite.

    Generator 1 (NumPy ``PCG64`` floats, before 2026-11-30) is retired: it cost 2x the time per value.
    """
    out = np.empty(n, np.float32)
    for s, e, v in noise_chunks(seed, n, kind, alpha):
        out[s:e] = v
    return out


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
        n = flat.size
        binary = o.mask == "binary"
        # the stochastic mask's draws: 16 bits per weight from SFC64 seeded by the client's generator
        draws = np.random.SFC64(int(torch.randint(0, 2**63 - 1, (), generator=ctx.rng))) if o.sm else None
        w.u64(ctx.seed).u8(MASKS.index(o.mask)).u8(GENERATOR << 4 | NOISES.index(o.noise)).f32(o.alpha)
        packed = np.empty((n + 7) // 8, np.uint8)
        bits = np.empty(n, np.uint8) if self.entropy else None
        contexts, k = (np.empty(n, np.uint8), CONTEXTS) if self.entropy and o.noise != "rademacher" else (None, 1)
        for s, e, noise in noise_chunks(ctx.seed, n, o.noise, o.alpha):
            if contexts is not None:
                contexts[s:e] = noise_contexts(noise, o.noise, o.alpha)[0]
            r = np.divide(flat[s:e], noise, out=noise)  # the ratio U / N (the noise is not needed again)
            if draws is not None:
                # bit = draw < 65536 p - 0.5 with p = mask_probability(r), a 16-bit draw: P(bit) is within
                # 2**-17 of p, and exactly 0 / 1 where p is; no clipping needed (p < 0 or > 1 decide alone)
                if binary:
                    r *= np.float32(65536)
                    r -= np.float32(0.5)
                else:  # p = (r + 1) / 2
                    r *= np.float32(32768)
                    r += np.float32(32767.5)
                b = np.less(_draws16(draws, e - s), r)
            else:  # the rounded mask: p > 0.5
                b = r > np.float32(0.5 if binary else 0.0)
            packed[s // 8:(e + 7) // 8] = np.packbits(b, bitorder="little")
            if bits is not None:
                bits[s:e] = b
        if self.entropy:
            w.symbols(bits, 2, contexts, k)
        else:
            w.raw(packed)  # the fixed-width symbol section, packed here in one pass with the rest

    def decode_kernels(self, reader: BodyReader, masked: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        n = sum(t.numel for t in masked)
        seed = reader.u64("seed")
        mask_i, noise_byte = reader.u8("mask kind"), reader.u8("noise kind")
        alpha = reader.f32("alpha")
        o = self.options
        generator, noise_i = noise_byte >> 4, noise_byte & 15
        if generator != GENERATOR:
            raise PayloadError("version", f"the noise was made with FedMRN noise generator {generator or 1}; "
                                          f"this fedcodec makes and reads generator {GENERATOR} only (a "
                                          "payload from an older fedcodec: update the client)")
        if mask_i >= len(MASKS) or noise_i >= len(NOISES):
            raise PayloadError("field", f"unknown mask kind {mask_i} or noise kind {noise_i}")
        if (MASKS[mask_i], NOISES[noise_i], alpha) != (o.mask, o.noise, o.alpha):
            # the run fixes them: a client may not pick its own scale (alpha x 1000 is a boosted update)
            raise PayloadError("binding", f"mask {MASKS[mask_i]}, noise {NOISES[noise_i]}, alpha {alpha:.8g}; this "
                                          f"run uses mask {o.mask}, noise {o.noise}, alpha {o.alpha:.8g}")
        if seed != ctx.seed:
            raise PayloadError("binding", f"seed {seed:#x} is not this client-round's seed: the payload was made "
                                          "for another round or client (a replay)")
        values = np.empty(n, np.float32)
        if self.entropy:  # the contexts come from the noise, before the bits can be read
            contexts = np.empty(n, np.uint8) if o.noise != "rademacher" else None
            for s, e, noise in noise_chunks(seed, n, o.noise, o.alpha):
                values[s:e] = noise
                if contexts is not None:
                    contexts[s:e] = noise_contexts(noise, o.noise, o.alpha)[0]
            mask = reader.symbols(n, 2, "mask bits", contexts, CONTEXTS if contexts is not None else 1)
            packed = np.packbits(mask.astype(np.uint8), bitorder="little")
            chunks = ((s, min(n, s + CHUNK), values[s:s + CHUNK]) for s in range(0, n, CHUNK))
        else:
            self.check_size(reader, ctx, (n + 7) // 8, " after its fields")
            packed = np.frombuffer(reader.take((n + 7) // 8, "mask bits"), np.uint8)
            if n % 8 and packed[-1] >> (n % 8):
                raise PayloadError("field", "mask bits: padding bits after the last symbol are not zero")
            chunks = noise_chunks(seed, n, o.noise, o.alpha)
        for s, e, noise in chunks:  # noise * mask: {0, 1} for binary, {-1, +1} for signed
            b = np.unpackbits(packed[s // 8:(e + 7) // 8], count=e - s, bitorder="little")
            v = values[s:e]
            if o.mask == "binary":
                np.multiply(noise, b, out=v)
            else:  # noise * -1 where the bit is 0: flip the float32 sign bit, exact
                flip = (b ^ np.uint8(1)).astype(np.uint32)
                flip <<= np.uint32(31)
                np.bitwise_xor(noise.view(np.uint32), flip, out=v.view(np.uint32))
        return values
