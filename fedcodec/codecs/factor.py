"""Seeded factors: each kernel's update is ``B · A``, ``A`` regenerated from the seed, ``B`` trained and sent.

Every conv/linear kernel ("weight" role) of shape ``out × in × k × k`` is viewed as an ``out × in·k·k``
matrix ``W`` (``out × in`` for a linear layer; a 1-D kernel is ``n × 1``). Its update is
``ΔW = B · A`` with

* ``A`` (``r × cols``) a random basis both ends regenerate from the client-round's seed
  (:attr:`CodecContext.seed`), and
* ``B`` (``out × r``) trained directly, from zero, by local SGD (:class:`FactorTraining`, through the
  algorithm seam: ``W = W_global + B·A`` in every forward pass), then quantized (QSGD's unbiased
  stochastic rounding, one max-norm scale per kernel) and sent.

Where the rank reaches the column count (``r >= cols``; CNN4's first conv has 9 columns) the factor
would cost as much as the kernel: ``r = cols`` and ``A`` is the identity, so ``B`` *is* ``ΔW``.

**Per client, not per round.** ``A`` comes from the per-(run, round, client) seed, so each client of a
round trains in its own random row space and the server's average ``Σ w_k B_k A_k`` spans up to
``K · r`` directions per layer instead of ``r``; it costs nothing (both ends already know the seed),
and the averaged step is a better estimate of the full-gradient step (the mean of K independent
random projections rather than one projection of the mean).

**The basis.** ``A = σ · a · 2^-F`` with ``a`` an integer matrix, ``σ = 1/sqrt(r)`` (variance
``1/r``, as in LoRA-style random factors: a step of ``B`` moves the loss, to first order, as much as
the same plain SGD step on ``W``) and

* ``basis = "gaussian"`` (default): ``a = rint(2^12 · z)``, ``z`` NumPy's float32 standard normals
  (:func:`fedcodec.codecs.fedmrn.make_noise` with ``noise = "gaussian"``, alpha 1), ``F = 12``;
* ``basis = "rademacher"``: ``a = ±1`` (``make_noise``'s sign bits), ``F = 0``.

One stream serves all kernels: ``make_noise(seed, Σ r_l · cols_l, basis, 1.0)`` (FedMRN's noise
generator 2: NumPy's SFC64 raw words, a bit stream NumPy keeps stable), cut kernel after kernel in
spec order (identity kernels take none), each ``A_l`` row-major. The decoder rebuilds a kernel from
grid indices ``q`` (``s = levels``, scale ``M``) as ::

    ΔW = float32( ((2q - s) @ a) * c ),    c = float64(M) * σ / (s * 2^F)

with ``(2q - s) @ a`` a float64 matrix product whose every partial sum is an integer below 2^53
(|2q - s| <= 255, |a| < 2^16, r < 2^16): exact in any summation order, so the server's update is the
same bits on every machine, BLAS and thread count. (The identity case is ``float32((2q - s) * c)``.)
Training runs in float32 with ``A`` rounded to float32 (:func:`training_basis`).

**Wire.** The uplink body (fixed-width mode: every section bit-packed) is::

    seed u64 | generator << 4 | basis u8 | levels u8 | dense_levels u8 | rank u16 per kernel
    | scale M f32 per kernel | grid indices of B (1 symbol section, alphabet levels + 1,
      Σ out_l · r_l symbols; kernel after kernel, each B row-major) | dense part

The dense part is :mod:`fedcodec.codecs.densequant`'s (``dense_levels > 0``: per tensor a scale and
low-bit deltas, running variances in log space; ``dense_levels = 0``: float32 values as in every
other codec). With ``entropy = true`` both symbol sections are range coded (``factor+ec``). Every
header field is bound to the run: the seed must be the client-round's (a replay is refused,
``binding``), the generator this one (``version``), and basis, levels, dense_levels and every rank the
configured ones (``binding``); the scales must be finite and non-negative (``field``).

**Which B is sent.** :class:`FactorTraining` hands the codec ``B`` itself as the side value
``"<kernel>/factor"``; the codec quantizes it plus the least-squares factor (``lstsq`` against
``A``) of whatever part of the kernel update ``B · A`` does not explain (nothing, unless error
feedback added its memory). Without a side value (the codec on its own, or any update) ``B`` is the
least-squares factor of the whole kernel update: the codec projects any update onto the row space.

**Ranks.** ``rank`` is the default; ``schedule = "R:K,..."`` makes ``K`` the rank from round ``R`` on
(rounds counted from 1, entries in increasing round order); ``layers = "L:K,..."`` fixes kernel ``L``
(its tensor name, or its index among the kernels in spec order) at rank ``K`` whatever the round.
Every rank is then capped at the kernel's column count.
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
from .fedmrn import GENERATOR, make_noise
from .qsgd import MAX_LEVELS, quantize_segments
from .registry import register
from .signsgd import read_scales
from .symbols import fixed_size
from .wire import BodyReader, BodyWriter

BASES = ("gaussian", "rademacher")
#: fractional bits of the integer Gaussian basis ``a = rint(2^F z)``
GAUSS_BITS = 12
MAX_RANK = 0xFFFF
#: suffix of the side value carrying a kernel's trained factor ``B`` (``finish`` → ``encode``)
SIDE = "/factor"


def _pairs(text: str, what: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition(":")
        if not (sep and key and value.isdigit() and 1 <= int(value) <= MAX_RANK):
            raise ConfigError(f"factor option {what} expects comma-separated KEY:RANK pairs with ranks in "
                              f"1..{MAX_RANK} (e.g. \"1:32,11:16\"), got {item!r}")
        out.append((key, int(value)))
    return out


@dataclass(frozen=True)
class FactorOptions(Options):
    rank: int = 32
    levels: int = 15
    dense_levels: int = 15
    basis: str = "gaussian"
    schedule: str = ""
    layers: str = ""

    def check(self) -> None:
        if not 1 <= self.rank <= MAX_RANK:
            raise ConfigError(f"rank must be an integer in 1..{MAX_RANK}, got {self.rank!r}")
        if not 1 <= self.levels <= MAX_LEVELS:
            raise ConfigError(f"levels must be an integer in 1..{MAX_LEVELS}, got {self.levels!r}")
        if not 0 <= self.dense_levels <= MAX_LEVELS:
            raise ConfigError(f"dense_levels must be 0 (float32) or an integer in 1..{MAX_LEVELS}, "
                              f"got {self.dense_levels!r}")
        if self.basis not in BASES:
            raise ConfigError(f"unknown basis {self.basis!r}; choose one of {BASES}")
        rounds = [k for k, _ in _pairs(self.schedule, "schedule")]
        if not all(r.isdigit() and int(r) >= 1 for r in rounds) or [int(r) for r in rounds] != sorted(
                {int(r) for r in rounds}):
            raise ConfigError(f"factor option schedule expects ROUND:RANK pairs with rounds >= 1 in increasing "
                              f"order, got {self.schedule!r}")
        _pairs(self.layers, "layers")

    def ranks(self, kernels: list[TensorSpec], round_num: int) -> list[int]:
        """The rank of each kernel in round ``round_num``, capped at its column count."""
        base = self.rank
        for r, k in _pairs(self.schedule, "schedule"):
            if round_num >= int(r):
                base = k
        fixed = dict(_pairs(self.layers, "layers"))
        names = {t.name for t in kernels}
        for key in fixed:
            if not (key in names or (key.isdigit() and int(key) < len(kernels))):
                raise ConfigError(f"factor option layers names {key!r}, which is no kernel of this model; its "
                                  f"kernels are {[t.name for t in kernels]} (or their indices 0..{len(kernels) - 1})")
        out = []
        for i, t in enumerate(kernels):
            r = fixed.get(t.name, fixed.get(str(i), base))
            out.append(min(r, shape2d(t)[1]))
        return out


def shape2d(t: TensorSpec) -> tuple[int, int]:
    """``(out, cols)``: a kernel as a matrix (conv kernels as ``out × in·k·k``)."""
    out = t.shape[0] if t.shape else 1
    return out, t.numel // out if out else 0


def integer_bases(seed: int, kernels: list[TensorSpec], ranks: list[int], basis: str) -> list[np.ndarray | None]:
    """The integer matrices ``a`` (float64, ``r × cols``) of every kernel; None where ``A`` is the
    identity (``r = cols``). See the module docstring."""
    sizes = [r * shape2d(t)[1] if r < shape2d(t)[1] else 0 for t, r in zip(kernels, ranks)]
    stream = make_noise(seed, sum(sizes), basis, 1.0)
    if basis == "gaussian":
        stream *= np.float32(2 ** GAUSS_BITS)  # exact (a power of two)
        np.rint(stream, out=stream)
    out, pos = [], 0
    for t, r, size in zip(kernels, ranks, sizes):
        out.append(stream[pos:pos + size].astype(np.float64).reshape(r, -1) if size else None)
        pos += size
    return out


def basis_factor(rank: int, basis: str) -> float:
    """``σ · 2^-F``: ``A = a *`` this (float64)."""
    return 1.0 / math.sqrt(rank) / (2 ** GAUSS_BITS if basis == "gaussian" else 1)


def training_basis(a: np.ndarray, rank: int, basis: str) -> torch.Tensor:
    """``A`` as the float32 tensor local training uses."""
    return torch.from_numpy((a * basis_factor(rank, basis)).astype(np.float32))


def reconstruct(q: np.ndarray, scale: float, levels: int, a: np.ndarray | None, rank: int, basis: str) -> np.ndarray:
    """``ΔW`` (float32, ``out × cols``) from the grid indices ``q`` (``out × r``) of ``B``, exactly as
    the module docstring defines it."""
    signed = q.astype(np.float64) * 2.0 - levels  # the integers 2q - s
    if a is None:
        return (signed * (float(np.float32(scale)) / levels)).astype(np.float32)
    c = float(np.float32(scale)) * basis_factor(rank, basis) / levels
    with np.errstate(over="ignore"):  # an absurd scale gives Inf, which decode rejects
        return ((signed @ a) * c).astype(np.float32)


class FactorTraining(Parametrization):
    """Train ``B`` (from zero) for ``ΔW = B · A`` in every kernel; see the module docstring."""

    def __init__(self, kernels: list[TensorSpec], ranks: list[int], bases: dict[str, torch.Tensor]):
        self.names = tuple(t.name for t in kernels)
        self.shapes = {t.name: t.shape for t in kernels}
        self.sizes = {t.name: (shape2d(t)[0], r) for t, r in zip(kernels, ranks)}
        self.bases = bases  # only the kernels with a random basis (the identity ones are absent)

    def init(self) -> Update:
        return {n: torch.zeros(self.sizes[n], requires_grad=True, device=self.device) for n in self.names}

    def _delta(self, n: str, b: torch.Tensor) -> torch.Tensor:
        a = self.bases.get(n)
        return (b if a is None else b @ a).reshape(self.shapes[n])

    def deltas(self, latent: Update, progress: float) -> Update:
        return {n: self._delta(n, latent[n]) for n in self.names}

    def finish(self, latent: Update) -> Update:
        with torch.no_grad():
            out = {n: self._delta(n, latent[n]) for n in self.names}
            out.update({n + SIDE: latent[n].detach().clone() for n in self.names})
        return out


class Factor(Algorithm):
    """Local training of the factors ``B`` inside the client-round's bases (the codec's seed)."""

    options: FactorOptions

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization:
        o = self.options
        kernels = split_specs(ctx.spec)[0]
        ranks = o.ranks(kernels, ctx.round)
        bases = {t.name: training_basis(a, r, o.basis)
                 for t, r, a in zip(kernels, ranks, integer_bases(ctx.seed, kernels, ranks, o.basis)) if a is not None}
        return FactorTraining(kernels, ranks, bases)


@register("factor", "update B·A per kernel: A regenerated from the seed, B trained and quantized", algorithm=Factor)
class FactorCodec(KernelCodec):
    codec_id = "factor"
    options_type = FactorOptions
    symbolic = True
    options: FactorOptions

    def __init__(self, options: FactorOptions | None = None, entropy: bool = False):
        super().__init__(options, entropy)
        self.dense_levels = self.options.dense_levels

    def factors(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], kernels: list[TensorSpec],
                ranks: list[int], bases: list[np.ndarray | None]) -> list[np.ndarray]:
        """The float32 ``B`` of every kernel (see "Which B is sent" in the module docstring)."""
        out, pos = [], 0
        for t, r, a in zip(kernels, ranks, bases):
            rows, cols = shape2d(t)
            w = flat[pos:pos + t.numel].reshape(rows, cols)
            pos += t.numel
            if a is None:
                out.append(w)
                continue
            side = update.get(t.name + SIDE)
            if side is not None:
                if tuple(side.shape) != (rows, r):
                    raise ConfigError(f"side value {t.name + SIDE!r} has shape {tuple(side.shape)}, the rank-{r} "
                                      f"factor of {t.name!r} is {(rows, r)}: trained with other ranks")
                b = side.detach().float().cpu()
                # the kernel update training produced from it, computed as training did
                resid = w - (b @ training_basis(a, r, self.options.basis)).numpy()
                b = b.numpy()
            else:
                b, resid = np.zeros((rows, r), np.float32), w
            if np.any(resid):  # what B·A does not explain (error feedback's memory, any update)
                full = a * basis_factor(r, self.options.basis)
                b = b + np.linalg.lstsq(full.T, resid.T.astype(np.float64), rcond=None)[0].T.astype(np.float32)
            out.append(np.ascontiguousarray(b, np.float32))
        return out

    def encode_kernels(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], ctx: CodecContext,
                       w: BodyWriter) -> None:
        if ctx.rng is None:
            raise ConfigError("factor rounds at random and needs the client's generator (CodecContext.rng)")
        o = self.options
        kernels = split_specs(ctx.spec)[0]
        ranks = o.ranks(kernels, ctx.round)
        bases = integer_bases(ctx.seed, kernels, ranks, o.basis)
        factors = self.factors(flat, update, kernels, ranks, bases)
        flat_b = np.concatenate([b.reshape(-1) for b in factors]) if factors else np.zeros(0, np.float32)
        u = torch.rand(flat_b.size, generator=ctx.rng, dtype=torch.float32).numpy()
        maxima, q = quantize_segments(flat_b, [b.size for b in factors], o.levels, u)
        w.u64(ctx.seed).u8(GENERATOR << 4 | BASES.index(o.basis)).u8(o.levels).u8(o.dense_levels)
        w.raw(np.asarray(ranks, "<u2")).raw(maxima.astype("<f4", copy=False))
        w.symbols(q, o.levels + 1)

    def decode_kernels(self, reader: BodyReader, kernels: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        o = self.options
        seed = reader.u64("seed")
        kind = reader.u8("basis")
        levels, dense_levels = reader.u8("levels"), reader.u8("dense levels")
        sent = [int(r) for r in reader.array("<u2", len(kernels), "ranks")]
        generator, basis_i = kind >> 4, kind & 15
        if generator != GENERATOR:
            raise PayloadError("version", f"the bases were made with noise generator {generator}; this fedcodec "
                                          f"makes and reads generator {GENERATOR} only")
        if basis_i >= len(BASES):
            raise PayloadError("field", f"unknown basis {basis_i}")
        ranks = o.ranks(kernels, ctx.round)
        if (BASES[basis_i], levels, dense_levels, sent) != (o.basis, o.levels, o.dense_levels, ranks):
            raise PayloadError("binding", f"basis {BASES[basis_i]}, levels {levels}, dense levels {dense_levels}, "
                                          f"ranks {sent}; this run uses basis {o.basis}, levels {o.levels}, dense "
                                          f"levels {o.dense_levels} and, in round {ctx.round}, ranks {ranks}")
        if seed != ctx.seed:
            raise PayloadError("binding", f"seed {seed:#x} is not this client-round's seed: the payload was made "
                                          "for another round or client (a replay)")
        maxima = read_scales(reader, len(kernels), "factor scales")
        sizes = [shape2d(t)[0] * r for t, r in zip(kernels, ranks)]
        if not self.entropy:
            self.check_size(reader, ctx, fixed_size(sum(sizes), levels + 1), " after the scales")
        q = reader.symbols(sum(sizes), levels + 1, "factor indices")
        bases = integer_bases(seed, kernels, ranks, o.basis)
        values = np.empty(sum(t.numel for t in kernels), np.float32)
        pos = at = 0
        for t, r, a, size, m in zip(kernels, ranks, bases, sizes, maxima):
            values[pos:pos + t.numel] = reconstruct(q[at:at + size].reshape(-1, r), m, levels, a, r, o.basis).reshape(-1)
            pos += t.numel
            at += size
        return values
