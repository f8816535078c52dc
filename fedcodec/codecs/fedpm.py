"""FedPM: clients learn Bernoulli masks over frozen random weights (Isik et al., ICLR 2023).

Every conv/linear kernel ("weight" role) is *masked*: its weights are frozen at a seeded random
init ``w0`` and only a keep-probability ``theta`` per weight is learned. BatchNorm parameters and
running statistics and biases train normally and travel as float32, as in FedMRN.

Frozen weights: signed Kaiming constant, ``w0 = ±sqrt(2 / fan_in)`` with ``fan_in = prod(shape[1:])``.
The signs are one Rademacher stream over all masked tensors concatenated in spec order, from
NumPy's PCG64 seeded with the codec option ``weight_seed`` (:func:`frozen_weights`,
bit-identical on every machine). ``weight_seed`` is part of the run configuration both ends share;
it is not sent.

The global model holds the *expected* network: a masked tensor's global value is ``w0 * theta``, so
``theta = global / w0`` (:meth:`FedPM.init_global` starts from ``theta = 0.5``). Everything else
in the engine (downlink, checkpoints, overflow checks) therefore sees ordinary float tensors.

Local training (:class:`BernoulliMaskTraining`): latent scores ``s = logit(clamp(theta, EPS, 1 - EPS))``
with ``EPS = 1e-3`` (so a score starts finite even where the global ``theta`` is 0 or 1, and at most
``|logit(EPS)| ~ 6.9`` from 0). Every forward pass samples ``m ~ Bernoulli(sigmoid(s))`` from the
client's generator and uses the weight ``w0 * m``; the gradient reaches ``s`` straight through the
sampling, as if the weight were ``w0 * sigmoid(s)``. The update handed to the encoder is the expected
one, ``w0 * sigmoid(s) - global``. The scores train either in the client's optimizer at its lr times
``score_lr_scale`` (``optimizer = "sgd"``, the default: their gradient is the weight gradient times
``w0 * sigmoid'(s)``, so plain SGD barely moves them without a large scale) or in an Adam of their own
at ``score_lr`` (``optimizer = "adam"``, as the paper's code does; the BatchNorm values and biases
beside them keep the client's optimizer, :class:`fedcodec.fl.client.OptimizerPair`).

Encoding: ``theta' = clamp((reference + update) / w0, 0, 1)`` (``reference`` = the model the client
trained from, :attr:`CodecContext.reference`), one mask ``m ~ Bernoulli(theta')`` is drawn with
``ctx.rng`` and sent. The body is::

    mask bits (one symbol section, alphabet 2, n = all masked weights) | float32 dense values

i.e. ``ceil(n / 8) + 4 * n_dense`` bytes in fixed mode. With ``entropy=true`` the mask bits are range
coded with one model per bucket of the reference's ``theta = clamp(reference / w0, 0, 1)``
(:data:`CONTEXTS` equal buckets of [0, 1]): both ends hold the reference before the bits, and a bit is
1 with a probability close to it. This needs the reference to be bit-identical at both ends, which
the engine guarantees (the server decodes against what the downlink delivered). An entropy-coded
body longer than any valid one (:func:`max_entropy_body`) is rejected before the contexts are built.

Decoding: ``update = w0 * m - reference`` for masked tensors, so ``reference + update`` is the sampled
network ``w0 * m`` (up to one float32 rounding). A decode without ``ctx.reference`` is rejected
(``PayloadError`` reason ``"reference"``): the mask alone does not determine an update.

Aggregation (:meth:`FedPM.aggregate`): Bayesian, with a uniform ``Beta(1, 1)`` prior reset every
round: ``theta_new = (1 + sum_k m_k) / (2 + K)`` over the ``K`` accepted clients (``estimate =
"mean"``, the default), unweighted (every client's mask counts once, as in the paper), and the step is
``w0 * theta_new - global``. ``estimate = "mode"`` takes the posterior's mode instead, as the paper's
code does: ``theta_new = clamp(sum_k m_k / K, clip, 1 - clip)`` (``clip`` 0.01 by default), so weights
every client kept or dropped become near-sure rather than being pulled back toward 1/2 each round
(with ``prior_strength = L``: ``clamp((L theta + sum_k m_k) / (L + K), clip, 1 - clip)``). With
``prior_strength = L > 0`` the prior is instead ``Beta(1 + L theta, 1 + L (1 - theta))`` centred on
the current global ``theta`` (``L`` pseudo-masks carried over from the previous rounds), so
``theta_new = (1 + L theta + sum_k m_k) / (2 + L + K)``: with few clients per round, the reset
posterior re-estimates every probability from K samples (noise ``sqrt(theta (1-theta) / K)``, about
0.16 for K = 10), which can swamp what one round of local training moves; carrying the prior damps it. The masks
are recovered as ``m_k = round((u_k + global) / w0)``, i.e. assuming every client's reference is the
current global model. Under the default float32 downlink that is exact; under a lossy downlink the
reference differs from the global model by the downlink's error, far below ``|w0| / 2``, and the
rounding still recovers ``m_k`` exactly. Dense tensors: the example-weighted mean.

Evaluation (:meth:`FedPM.eval_params`): the evaluated network is one sample ``w0 * m``,
``m ~ Bernoulli(theta)``, drawn with a ``torch.Generator`` seeded with the evaluation seed
(deterministic; ``eval_mask = "sample"``, the paper's), or ``m = theta > 1/2`` (``"threshold"``), or
the expected weights ``w0 * theta`` (``"expected"``); dense tensors as they are.

The ``fedpm`` method is the paper's recipe (Adam on the scores, the posterior mode, a sampled mask);
``fedpm-sgd`` is fedcodec's earlier one (SGD on the scores at 10^4 times the lr, the posterior mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..errors import ConfigError, PayloadError
from .algorithms import Algorithm, Parametrization, weighted_mean
from .base import CodecContext, KernelCodec, ModelSpec, Options, TensorSpec, Update, dense_count, split_specs
from .registry import register
from .wire import BodyReader, BodyWriter

#: scores start at logit(clamp(theta, EPS, 1 - EPS))
EPS = 1e-3
#: buckets of the reference's theta used as entropy-coding contexts
CONTEXTS = 8
#: what :meth:`FedPM.eval_params` evaluates (option ``eval_mask``)
EVAL_MASKS = ("sample", "threshold", "expected")


def fan_in(t: TensorSpec) -> int:
    return max(int(np.prod(t.shape[1:], dtype=np.int64)), 1)


def frozen_weights(seed: int, specs: list[TensorSpec]) -> np.ndarray:
    """The frozen weights of ``specs`` concatenated (float32): ``±sqrt(2 / fan_in)``, signs from PCG64(seed)."""
    n = sum(t.numel for t in specs)
    signs = np.random.Generator(np.random.PCG64(seed)).integers(0, 2, n, dtype=np.int8).astype(np.float32)
    signs *= np.float32(2)
    signs -= np.float32(1)
    scale = np.repeat(np.array([math.sqrt(2.0 / fan_in(t)) for t in specs], np.float32),
                      [t.numel for t in specs]) if specs else np.zeros(0, np.float32)
    return signs * scale


def theta_contexts(reference: np.ndarray, w0: np.ndarray) -> np.ndarray:
    """Entropy-coding context of each mask bit: the bucket of ``clamp(reference / w0, 0, 1)`` (uint8;
    float32 operations in place, so both ends get the same buckets with one float array of scratch)."""
    theta = reference / w0
    np.clip(theta, np.float32(0), np.float32(1), out=theta)
    np.nan_to_num(theta, copy=False, nan=0.5)
    theta *= np.float32(CONTEXTS)
    out = theta.astype(np.uint8)
    np.minimum(out, np.uint8(CONTEXTS - 1), out=out)
    return out


def max_entropy_body(n: int, n_dense: int) -> int:
    """An upper bound on an entropy-coded body: count tables, word count, at most 32 bits per mask bit
    (the range coder's probabilities have at most 32-bit precision) plus a few words of flush, and the
    dense values. Longer bodies are rejected before anything model-sized is computed."""
    return 8 * CONTEXTS + 4 + 4 * (n + 8) + 4 * n_dense


class BernoulliMaskTraining(Parametrization):
    """Learn mask scores over frozen weights ``w0``; see the module docstring."""

    def __init__(self, specs: list[TensorSpec], w0: dict[str, torch.Tensor], global_params: Update,
                 gen: torch.Generator | None, lr_scale: float = 1.0, optimizer: str | None = None,
                 lr: float | None = None):
        self.names = tuple(t.name for t in specs)
        self.lr_scale, self.optimizer, self.lr = lr_scale, optimizer, lr
        self.w0, self.gen = w0, gen
        self.base = {n: global_params[n].detach().float() for n in self.names}

    def init(self) -> Update:
        return {n: torch.logit((self.base[n] / self.w0[n]).clamp(EPS, 1 - EPS)).requires_grad_()
                for n in self.names}

    def deltas(self, latent: Update, progress: float) -> Update:
        out = {}
        for n in self.names:
            w0, p = self.w0[n], torch.sigmoid(latent[n])
            with torch.no_grad():
                value = w0 * (self.uniform(p.shape) < p) - self.base[n]
            soft = w0 * p
            out[n] = value + (soft - soft.detach())  # value w0*m; gradient as if w0*sigmoid(s)
        return out

    def finish(self, latent: Update) -> Update:
        with torch.no_grad():
            return {n: self.w0[n] * torch.sigmoid(latent[n]) - self.base[n] for n in self.names}


def _seed(value) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        seed = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        seed = int(value)
    else:
        raise ConfigError(f"weight_seed must be an integer, got {value!r}")
    if not 0 <= seed < 2**64:
        raise ConfigError(f"weight_seed must be in 0..2**64-1, got {seed}")
    return seed


@dataclass(frozen=True)
class FedPMOptions(Options):
    weight_seed: int = 0
    #: the mask scores' gradient is the weight gradient times w0 * sigmoid'(s) (about 0.01-0.1 here),
    #: so with the client's SGD lr they barely move; this multiplies their learning rate only
    score_lr_scale: float = 1.0
    prior_strength: float = 0.0
    #: the scores' optimizer: "sgd" (the client's optimizer at its lr times ``score_lr_scale``) or
    #: "adam" (Adam of their own at ``score_lr``, as the paper's code; BatchNorm keeps the client's)
    optimizer: str = "sgd"
    score_lr: float = 0.1
    #: the evaluated network: "sample" (one mask m ~ Bernoulli(theta), the paper's), "threshold"
    #: (m = theta > 1/2) or "expected" (the weights w0 * theta)
    eval_mask: str = "sample"
    #: the new theta from the round's Beta posterior: its "mean" (shrunk toward 1/2 by the uniform
    #: prior: at most (K + 1) / (K + 2) with K masks) or its "mode" (the paper's code: the fraction of
    #: masks set, so unanimous clients make a weight sure)
    estimate: str = "mean"
    #: with estimate "mode", theta is kept in [clip, 1 - clip] (the paper's code sends masks as
    #: clip / 1 - clip), so a weight every client dropped can still come back
    clip: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_seed", _seed(self.weight_seed))  # up to 2**64-1: may come as a string
        super().__post_init__()

    def check(self) -> None:
        if not self.prior_strength >= 0:
            raise ConfigError(f"prior_strength must be a number >= 0, got {self.prior_strength!r}")
        if not self.score_lr_scale > 0:
            raise ConfigError(f"score_lr_scale must be a positive number, got {self.score_lr_scale!r}")
        if not (math.isfinite(self.score_lr) and self.score_lr > 0):
            raise ConfigError(f"score_lr must be a positive number, got {self.score_lr!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be sgd or adam (the mask scores' optimizer), got {self.optimizer!r}")
        if not 0 <= self.clip < 0.5:
            raise ConfigError(f"clip must be in [0, 0.5), got {self.clip!r}")
        if self.estimate not in ("mean", "mode"):
            raise ConfigError(f"estimate must be mean or mode (of the Beta posterior), got {self.estimate!r}")
        if self.eval_mask not in EVAL_MASKS:
            raise ConfigError(f"eval_mask must be one of {', '.join(EVAL_MASKS)}, got {self.eval_mask!r}")


class FrozenWeights:
    """The frozen weights ``w0`` of option ``weight_seed``, shared by FedPM's codec and algorithm."""

    options: FedPMOptions

    def _w0_flat(self, spec: ModelSpec) -> np.ndarray:
        cache = self.__dict__.setdefault("_w0_cache", {})
        fp = spec.fingerprint
        if fp not in cache:
            w0 = frozen_weights(self.options.weight_seed, split_specs(spec)[0])
            w0.setflags(write=False)
            cache[fp] = w0
        return cache[fp]

    def frozen(self, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """The frozen weights ``w0`` of the masked tensors of ``spec``, one tensor per name."""
        masked = split_specs(spec)[0]
        return ModelSpec(tuple(masked)).unflatten(self._w0_flat(spec).copy(), masked)


class FedPM(FrozenWeights, Algorithm):
    """Mask training, the Beta posterior and the sampled evaluation network (module docstring)."""

    additive_step = False  # the posterior sets theta directly; the "step" only encodes the new model

    def init_global(self, params: Update, spec: ModelSpec) -> Update:
        out = dict(params)
        for name, w0 in self.frozen(spec).items():
            out[name] = w0 * 0.5
        return out

    def own_aggregate(self, spec: ModelSpec) -> list[str]:
        return [t.name for t in split_specs(spec)[0]]

    def aggregate(self, spec: ModelSpec, global_params: Update,
                  updates: list[tuple[int, float, Update]]) -> dict[str, torch.Tensor]:
        dense = split_specs(spec)[1]
        step = weighted_mean(ModelSpec(tuple(dense)), updates)
        k = len(updates)
        for name, w0 in self.frozen(spec).items():
            w0 = w0.to(torch.float64)
            g = global_params[name].to(torch.float64)
            count = torch.zeros_like(g)
            for _, _, upd in updates:
                count += torch.round((upd[name].to(torch.float64) + g) / w0).clamp(0, 1)
            lam = self.options.prior_strength
            theta = (g / w0).clamp(0, 1)
            if self.options.estimate == "mode" and lam + k > 0:
                clip = self.options.clip
                step[name] = w0 * ((lam * theta + count) / (lam + k)).clamp(clip, 1 - clip) - g
            else:
                step[name] = w0 * ((1.0 + lam * theta + count) / (2.0 + lam + k)) - g
        return step

    def eval_params(self, params: Update, spec: ModelSpec, seed: int) -> Update:
        if self.options.eval_mask == "expected":
            return dict(params)
        masked = split_specs(spec)[0]
        w0 = torch.from_numpy(self._w0_flat(spec).copy())
        theta = (torch.from_numpy(spec.flatten(params, masked)) / w0).clamp(0, 1)
        if self.options.eval_mask == "threshold":
            keep = theta > 0.5
        else:
            keep = torch.rand(theta.shape, generator=torch.Generator().manual_seed(int(seed) % 2**63)) < theta
        return dict(params) | spec.unflatten((w0 * keep).numpy(), masked)

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization:
        masked, _ = split_specs(ctx.spec)
        o = self.options
        if o.optimizer == "adam":
            return BernoulliMaskTraining(masked, self.frozen(ctx.spec), global_params, ctx.rng,
                                         optimizer="adam", lr=o.score_lr)
        return BernoulliMaskTraining(masked, self.frozen(ctx.spec), global_params, ctx.rng, o.score_lr_scale)


@register("fedpm", "Bernoulli masks over frozen random weights, Bayesian aggregation (FedPM)", algorithm=FedPM)
class FedPMCodec(FrozenWeights, KernelCodec):
    codec_id = "fedpm"
    options_type = FedPMOptions
    symbolic = True

    def _contexts(self, ref: np.ndarray, w0: np.ndarray) -> tuple[np.ndarray | None, int]:
        return (theta_contexts(ref, w0), CONTEXTS) if self.entropy else (None, 1)

    def encode_kernels(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], ctx: CodecContext,
                       w: BodyWriter) -> None:
        if ctx.reference is None:
            raise ConfigError("fedpm encodes against the model the client trained from: CodecContext.reference "
                              "is missing")
        w0 = self._w0_flat(ctx.spec)
        ref = ctx.spec.flatten(ctx.reference, split_specs(ctx.spec)[0])
        theta = torch.from_numpy((ref + flat) / w0).clamp(0, 1)
        bits = (torch.rand(theta.shape, generator=ctx.rng) < theta).numpy()
        w.symbols(bits, 2, *self._contexts(ref, w0))

    def decode_kernels(self, reader: BodyReader, masked: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        if ctx.reference is None:
            raise PayloadError("reference", "fedpm decodes a mask relative to the model the client trained from, "
                                            "but the decoder was given no CodecContext.reference")
        n, n_dense = sum(t.numel for t in masked), dense_count(ctx.spec)
        if not self.entropy:
            self.check_size(reader, ctx, (n + 7) // 8)
        elif reader.remaining > max_entropy_body(n, n_dense):
            raise PayloadError("size", f"body carries {reader.remaining} bytes; an entropy-coded mask for this "
                                       f"model takes at most {max_entropy_body(n, n_dense)}")
        w0 = self._w0_flat(ctx.spec)
        ref = ctx.spec.flatten(ctx.reference, masked)
        bits = reader.symbols(n, 2, "mask bits", *self._contexts(ref, w0))
        values = np.where(bits.astype(bool), w0, np.float32(0)) - ref
        return values.astype(np.float32, copy=False)
