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

**Learned rows: a decoder learned from the run, shared, and free on the wire** (``learned = k > 0``,
the "AE v2" of issue 17; Gaussian basis only). The first ``k_l <= min(k, r_l)`` rows of each ``A_l``
are not random: they are the top right singular vectors of ``H_l = W_l - W0_l``, the kernel's whole
change since the run's initial model ``W0`` (:meth:`bind_initial`; both ends build it from the
run's seed) to the model the client trained from (:attr:`CodecContext.reference`, which the server
holds too). ``H`` is the sum of every aggregated update so far, i.e. the decoded updates of all past
rounds: its leading row space holds a large share of the next updates (RESULTS §6) while a random
``r``-row basis holds about ``r / cols`` of them. Both ends compute it, so the decoder costs no byte
in either direction; the remaining ``r_l - k_l`` rows stay seeded (fresh directions every
client-round). Per kernel (float64, :func:`learned_rows`): ``U S V^T = svd(H)`` (through the
eigendecomposition of the smaller Gram matrix, :func:`top_right_singular`); rows ``i < k`` with
``S_i > 1e-6 · S_0`` are kept (none while ``H = 0``, so round 1 is all seeded); each kept ``v`` gets
the sign that makes its largest-magnitude entry positive and becomes ``a = rint(2^12 · clip(g · sqrt(r)
· v, ±LEARNED_CLIP))`` (``g = learned_gain``, default 1; ``|a| < 2^16``), then ``A`` is ``σ · a · 2^-12``
as for the seeded rows, i.e. the learned rows of ``A`` are ``g · v``. With ``g = 1`` an SGD step on
``B`` moves ``W`` along the learned directions exactly as plain SGD would (``AᵀA = Σ v vᵀ`` there);
rows of length ``sqrt(cols / r)`` like the Gaussian ones would multiply the step along the directions
that carry most of the gradient by ``cols / r`` (36 on CNN4's last conv), which a probe showed to
slow training (RESULTS §6). An SVD is not bit-reproducible across BLAS builds and
thread counts, so the payload carries the kept counts and an 8-byte BLAKE2b digest of the learned
integers; a server that derives other rows refuses the payload (``PayloadError`` reason ``basis``)
rather than decode it against another basis. In one process (``fedcodec run``) both ends compute the
same bits; on Flower the nodes must run the same NumPy/BLAS build to agree.

**Wire.** The uplink body (fixed-width mode: every section bit-packed) is::

    seed u64 | generator << 4 | learned << 3 | basis u8 | levels u8 | dense_levels u8
    | rank u16 per kernel | [learned: kept rows u16 per kernel | digest 8 bytes]
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

import hashlib
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
#: bit of the basis byte that says the payload's bases start with learned rows
LEARNED_FLAG = 8
#: a learned row's unit-variance entries are clipped to this before rounding, so |a| < 2^16
LEARNED_CLIP = 15.99
#: a learned row is kept only if its singular value exceeds this fraction of the kernel's largest
LEARNED_TOL = 1e-6
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
    #: leading rows of every A learned from the model's history (module docstring); 0: all seeded
    learned: int = 0
    #: a learned row's length relative to the one that makes a step of B move W along it exactly as
    #: plain SGD would (module docstring)
    learned_gain: float = 1.0

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
        if not 0 <= self.learned <= MAX_RANK:
            raise ConfigError(f"learned must be an integer in 0..{MAX_RANK}, got {self.learned!r}")
        if not (math.isfinite(self.learned_gain) and 0 < self.learned_gain <= 16):
            raise ConfigError(f"learned_gain must be a number in (0, 16], got {self.learned_gain!r}")
        if self.learned and self.basis != "gaussian":
            raise ConfigError("learned rows sit beside Gaussian rows (same integer grid); use basis=gaussian")
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


def top_right_singular(h: np.ndarray, k: int) -> np.ndarray:
    """The top ``<= k`` right singular vectors of ``h`` (rows, float64), those whose singular value
    exceeds ``LEARNED_TOL`` times the largest, from the eigendecomposition of the smaller Gram
    matrix (an ``out × out`` one for a conv kernel: ~50x faster than the SVD of ``h``)."""
    wide = h.shape[0] <= h.shape[1]
    w, vec = np.linalg.eigh(h @ h.T if wide else h.T @ h)  # ascending
    w, vec = w[::-1][:k], vec[:, ::-1][:, :k]
    sv = np.sqrt(np.maximum(w, 0.0))
    keep = int(np.count_nonzero(sv > LEARNED_TOL * sv[0])) if sv[0] > 0 else 0
    # wide: vec holds left singular vectors u, and v = uᵀh / s; else vec holds the v themselves
    return (vec[:, :keep].T @ h) / sv[:keep, None] if wide else vec[:, :keep].T.copy()


def learned_rows(reference: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor],
                 kernels: list[TensorSpec], ranks: list[int], learned: int,
                 gain: float = 1.0) -> tuple[list[np.ndarray], bytes]:
    """The learned leading rows of every kernel's integer basis (float64, ``k_l × cols``, maybe no
    rows; none where ``A`` is the identity) from the history ``reference - initial``, and the 8-byte
    digest of the kept counts and integers that binds a payload to them (module docstring)."""
    rows, digest = [], hashlib.blake2b(digest_size=8)
    for t, r in zip(kernels, ranks):
        out, cols = shape2d(t)
        k = min(learned, r, out) if r < cols else 0
        a = np.zeros((0, cols))
        if k:
            h = (reference[t.name].detach().cpu().to(torch.float64)
                 - initial[t.name].detach().cpu().to(torch.float64)).reshape(out, cols).numpy()
            if np.any(h):
                v = top_right_singular(h, k)
                v = v * np.where(v[np.arange(len(v)), np.abs(v).argmax(1)] < 0, -1.0, 1.0)[:, None]
                a = np.rint(np.clip(v * (gain * math.sqrt(r)), -LEARNED_CLIP, LEARNED_CLIP) * 2 ** GAUSS_BITS)
        rows.append(a)
        digest.update(np.uint16(len(a)).tobytes() + a.astype("<i4").tobytes())
    return rows, digest.digest()


def integer_bases(seed: int, kernels: list[TensorSpec], ranks: list[int], basis: str,
                  learned: list[np.ndarray] | None = None) -> list[np.ndarray | None]:
    """The integer matrices ``a`` (float64, ``r × cols``) of every kernel: its ``learned`` rows
    (:func:`learned_rows`; none by default), then seeded ones; None where ``A`` is the identity
    (``r = cols``). See the module docstring."""
    lead = learned if learned is not None else [np.zeros((0, shape2d(t)[1])) for t in kernels]
    sizes = [(r - len(a)) * shape2d(t)[1] if r < shape2d(t)[1] else 0 for t, r, a in zip(kernels, ranks, lead)]
    stream = make_noise(seed, sum(sizes), basis, 1.0)
    if basis == "gaussian":
        stream *= np.float32(2 ** GAUSS_BITS)  # exact (a power of two)
        np.rint(stream, out=stream)
    out, pos = [], 0
    for t, r, size, a in zip(kernels, ranks, sizes, lead):
        if r >= shape2d(t)[1]:
            out.append(None)
            continue
        seeded = stream[pos:pos + size].astype(np.float64).reshape(-1, shape2d(t)[1])
        out.append(np.concatenate([a, seeded]) if len(a) else seeded)
        pos += size
    return out


class History:
    """The run's initial model, for learned rows (``learned > 0``), and the last rows derived from it
    (one model's rows serve a whole round of clients on the server)."""

    options: FactorOptions
    initial: dict[str, torch.Tensor] | None = None

    def bind_initial(self, params: Mapping[str, torch.Tensor]) -> None:
        """Keep the run's initial model ``W0`` (both ends build it from the run's seed)."""
        self.initial = {n: v.detach().to("cpu", torch.float32, copy=True) for n, v in params.items()}
        self._initial_key = hashlib.blake2b(b"".join(v.numpy().tobytes() for v in self.initial.values()),
                                            digest_size=16).digest()

    def learned(self, reference: Mapping[str, torch.Tensor] | None, kernels: list[TensorSpec],
                ranks: list[int], client: int | None = None) -> tuple[list[np.ndarray] | None, bytes]:
        """:func:`learned_rows` of ``reference`` (None, b"" when ``learned = 0``)."""
        if not self.options.learned:
            return None, b""
        if self.initial is None:
            raise ConfigError("factor with learned > 0 derives rows from the run's history and needs its initial "
                              "model (Uplink.bind_initial); fedcodec run and fedcodec flower bind it, a stock "
                              "Flower app cannot: use learned=0 there")
        if reference is None:
            raise PayloadError("reference", "learned rows come from the model the client trained from, but no "
                                            "CodecContext.reference was given", client)
        key = hashlib.blake2b(b"".join(reference[t.name].detach().cpu().to(torch.float32).numpy().tobytes()
                                       for t in kernels) + np.asarray(ranks + [self.options.learned], "<u4").tobytes()
                              + np.float64(self.options.learned_gain).tobytes() + self._initial_key,
                              digest_size=16).digest()
        if key not in _ROWS:  # the codec and the algorithm of a client, the server's round: one derivation
            if len(_ROWS) >= 4:
                _ROWS.pop(next(iter(_ROWS)))
            _ROWS[key] = learned_rows(reference, self.initial, kernels, ranks, self.options.learned,
                                      self.options.learned_gain)
        return _ROWS[key]


#: the last few derivations of learned rows, by (reference, ranks, learned, initial model) digest
_ROWS: dict[bytes, tuple[list[np.ndarray], bytes]] = {}


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


class Factor(History, Algorithm):
    """Local training of the factors ``B`` inside the client-round's bases (the codec's seed, and
    the learned rows of the model the client trained from)."""

    options: FactorOptions

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization:
        o = self.options
        kernels = split_specs(ctx.spec)[0]
        ranks = o.ranks(kernels, ctx.round)
        lead, _ = self.learned(global_params, kernels, ranks, ctx.client)
        bases = {t.name: training_basis(a, r, o.basis)
                 for t, r, a in zip(kernels, ranks, integer_bases(ctx.seed, kernels, ranks, o.basis, lead))
                 if a is not None}
        return FactorTraining(kernels, ranks, bases)


@register("factor", "update B·A per kernel: A regenerated from the seed, B trained and quantized", algorithm=Factor)
class FactorCodec(History, KernelCodec):
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
        lead, digest = self.learned(ctx.reference, kernels, ranks, ctx.client)
        bases = integer_bases(ctx.seed, kernels, ranks, o.basis, lead)
        factors = self.factors(flat, update, kernels, ranks, bases)
        flat_b = np.concatenate([b.reshape(-1) for b in factors]) if factors else np.zeros(0, np.float32)
        u = torch.rand(flat_b.size, generator=ctx.rng, dtype=torch.float32).numpy()
        maxima, q = quantize_segments(flat_b, [b.size for b in factors], o.levels, u)
        flag = LEARNED_FLAG if o.learned else 0
        w.u64(ctx.seed).u8(GENERATOR << 4 | flag | BASES.index(o.basis)).u8(o.levels).u8(o.dense_levels)
        w.raw(np.asarray(ranks, "<u2"))
        if o.learned:
            w.raw(np.asarray([len(a) for a in lead], "<u2")).raw(np.frombuffer(digest, np.uint8))
        w.raw(maxima.astype("<f4", copy=False))
        w.symbols(q, o.levels + 1)

    def decode_kernels(self, reader: BodyReader, kernels: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        o = self.options
        seed = reader.u64("seed")
        kind = reader.u8("basis")
        levels, dense_levels = reader.u8("levels"), reader.u8("dense levels")
        sent = [int(r) for r in reader.array("<u2", len(kernels), "ranks")]
        generator, flag, basis_i = kind >> 4, kind & LEARNED_FLAG, kind & (LEARNED_FLAG - 1)
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
        if bool(flag) != bool(o.learned):
            raise PayloadError("binding", f"the payload's bases {'start' if flag else 'do not start'} with learned "
                                          f"rows; this run uses learned={o.learned}")
        lead = None
        if o.learned:
            kept = [int(k) for k in reader.array("<u2", len(kernels), "learned row counts")]
            digest = bytes(reader.take(8, "learned rows digest"))
            lead, mine = self.learned(ctx.reference, kernels, ranks, ctx.client)
            if kept != [len(a) for a in lead] or digest != mine:
                raise PayloadError("basis", f"the client's learned rows (counts {kept}, digest {digest.hex()}) are not "
                                            f"the server's (counts {[len(a) for a in lead]}, digest {mine.hex()}): "
                                            "both ends must derive them from the same model with the same "
                                            "NumPy/BLAS build", ctx.client)
        maxima = read_scales(reader, len(kernels), "factor scales")
        sizes = [shape2d(t)[0] * r for t, r in zip(kernels, ranks)]
        if not self.entropy:
            self.check_size(reader, ctx, fixed_size(sum(sizes), levels + 1), " after the scales")
        q = reader.symbols(sum(sizes), levels + 1, "factor indices")
        bases = integer_bases(seed, kernels, ranks, o.basis, lead)
        values = np.empty(sum(t.numel for t in kernels), np.float32)
        pos = at = 0
        for t, r, a, size, m in zip(kernels, ranks, bases, sizes, maxima):
            values[pos:pos + t.numel] = reconstruct(q[at:at + size].reshape(-1, r), m, levels, a, r, o.basis).reshape(-1)
            pos += t.numel
            at += size
        return values
