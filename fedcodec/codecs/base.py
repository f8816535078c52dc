"""The codec protocol, the model spec both ends agree on, and the codec registry.

A codec turns a client's update (one float32 tensor per entry of the model spec) into ``bytes``
and back. Codecs that change *how* the client trains (FedMRN trains a latent update inside seeded
noise instead of the weights) also supply a :class:`Parametrization`; the engine runs it without
knowing which codec it came from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, PayloadError
from . import wire

Update = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: str  # "weight": conv/linear kernel; "param": other trainable; "buffer": running stats

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class ModelSpec:
    """Ordered list of the float tensors that travel between clients and server."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def from_model(cls, model: nn.Module, local: frozenset[str] | set[str] = frozenset()) -> "ModelSpec":
        """The model's float tensors, except those named in ``local`` (personalized tensors that
        stay on each client and never travel)."""
        weights = {id(m.weight) for m in model.modules()
                   if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d))}
        specs = [TensorSpec(n, tuple(p.shape), "weight" if id(p) in weights else "param")
                 for n, p in model.named_parameters() if n not in local]
        specs += [TensorSpec(n, tuple(b.shape), "buffer") for n, b in model.named_buffers()
                  if b.is_floating_point() and n not in local]
        return cls(tuple(specs))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def numel(self, roles: tuple[str, ...] = ("weight", "param", "buffer")) -> int:
        return sum(t.numel for t in self.tensors if t.role in roles)

    def select(self, roles: tuple[str, ...]) -> list[TensorSpec]:
        return [t for t in self.tensors if t.role in roles]

    @property
    def fingerprint(self) -> bytes:
        blob = json.dumps([[t.name, list(t.shape), t.role] for t in self.tensors]).encode()
        return hashlib.blake2b(blob, digest_size=8).digest()

    def flatten(self, update: Mapping[str, torch.Tensor], specs: list[TensorSpec]) -> np.ndarray:
        """Concatenate the named tensors into one float32 vector (C order)."""
        if not specs:
            return np.zeros(0, np.float32)
        return torch.cat([update[t.name].detach().reshape(-1).float() for t in specs]).numpy()

    def unflatten(self, flat: np.ndarray, specs: list[TensorSpec]) -> Update:
        out, pos = {}, 0
        for t in specs:
            out[t.name] = torch.from_numpy(flat[pos:pos + t.numel].reshape(t.shape))
            pos += t.numel
        return out


@dataclass
class CodecContext:
    """What a codec knows about the message at hand.

    ``seed`` is the 64-bit seed of this client-round (a codec may send it, FedMRN does); ``rng`` is a
    torch generator for the client's stochastic choices, derived from the same seed.

    ``reference`` is the model the update is relative to (the global model the client trained from;
    the server holds the same one), for codecs whose symbols are defined against it (FedPM).
    ``state`` is the client's own store, kept by the client across rounds and never sent (error
    feedback keeps its residual there); the engine checkpoints it. On the server, ``decode`` and
    ``accept_setup`` get the server's store *for that client* instead (the AE codec keeps the
    client's decoder there). Both are None where unavailable.
    ``metrics`` collects numbers a codec reports about this message (an AE's reconstruction error);
    the engine averages them over the round's clients into the round record.
    """

    spec: ModelSpec
    client: int
    round: int
    seed: int = 0
    rng: torch.Generator | None = None
    reference: Update | None = None
    state: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class Prepass:
    """A codec's request to see local training before it can encode (the AE codec's "weights
    dataset"): the client trains ``epochs`` epochs (None: its usual local epochs) from the model it
    received, records the update ``snapshots`` times at evenly spaced steps, and hands the snapshots
    to :meth:`Codec.fit`. The pre-pass model is thrown away; the round's own training follows."""

    epochs: int | None
    snapshots: int


class Parametrization:
    """How a codec reparametrizes local training. The engine calls, in order:

    ``init()`` → trainable latent tensors; for every step ``deltas(latent, progress)`` →
    the update added to the frozen global weight in the forward pass (``progress`` runs from 0 to 1);
    at the end ``finish(latent)`` → the update handed to :meth:`Codec.encode`.

    ``init()`` may return extra trainable tensors under names that are not model tensors (FedBAT's
    learned step sizes), and ``finish()`` may return side values under names containing ``/`` that
    only its own codec's ``encode`` reads; the engine passes them through untouched.
    """

    names: tuple[str, ...] = ()
    #: the latent tensors' learning rate is the client's lr times this; they get no weight decay
    lr_scale: float = 1.0

    def init(self) -> Update:
        raise NotImplementedError

    def deltas(self, latent: Update, progress: float) -> Update:
        raise NotImplementedError

    def finish(self, latent: Update) -> Update:
        raise NotImplementedError


class Codec:
    """Encode a client update to bytes and decode it back.

    Subclasses set ``codec_id`` and implement :meth:`encode_body` / :meth:`decode_body`; the envelope
    (magic, version, codec id, spec fingerprint, length, CRC) is handled here, as is the rejection of
    non-finite decoded values.
    """

    codec_id: ClassVar[str]
    lossless: ClassVar[bool] = False
    #: encodes every value on its own (fp32, fp16), so it can carry a whole model, not only an update
    carries_models: ClassVar[bool] = False
    #: writes its data as symbol sections (BodyWriter.symbols), so the entropy stage applies
    symbolic: ClassVar[bool] = False
    #: entropy-code the symbol sections (set by build_codec(..., entropy=True); wire id gets "+ec")
    entropy: bool = False
    #: keeps client state in ``ctx.state`` (error feedback): the engine must supply a store
    stateful: bool = False

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization | None:
        return None

    # -- codecs that learn from the client's updates (the AE codec) ---------------------------------
    def prepass(self, ctx: CodecContext) -> Prepass | None:
        """Client side, before local training: a :class:`Prepass` if this client must (re)fit its
        codec from local training snapshots this round (first selection, refresh), else None."""
        return None

    def fit(self, snapshots: list[Update], ctx: CodecContext) -> bytes:
        """Client side: fit the codec to the pre-pass ``snapshots``, keep what the client needs in
        ``ctx.state``, and return the *setup message* the server needs to decode this client's
        payloads (the AE codec's decoder). The engine sends it uplink and counts it in the ledger."""
        raise NotImplementedError(f"{type(self).__name__} asks for no pre-pass")

    def accept_setup(self, message: bytes, ctx: CodecContext) -> None:
        """Server side: validate a client's setup message and keep it in ``ctx.state`` (the server's
        store for that client). Raises :class:`PayloadError`; a rejected message changes nothing."""
        raise PayloadError("setup", f"codec {self.codec_id!r} takes no setup messages", ctx.client)

    def writer(self) -> wire.BodyWriter:
        """A body writer that stores symbol sections the way this codec was built to."""
        return wire.BodyWriter(entropy=self.entropy)

    # -- server-side hooks (defaults: plain FedAvg semantics) --------------------------------------
    def init_global(self, params: Update, spec: ModelSpec) -> Update:
        """The global model the run starts from, given the model's initial weights."""
        return params

    def aggregate(self, spec: ModelSpec, global_params: Update,
                  updates: list[tuple[int, float, Update]]) -> dict[str, torch.Tensor]:
        """The float64 step added to the global model, from decoded ``(client, weight, update)``
        triples sorted by client id. Default: the weight-normalised mean."""
        return weighted_mean(spec, updates)

    def eval_params(self, params: Update, spec: ModelSpec, seed: int) -> Update:
        """The weights to evaluate for global model ``params`` (FedPM samples a mask from them)."""
        return params

    # -- wire --------------------------------------------------------------------------------------
    def encode(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        return wire.pack(self.codec_id, ctx.spec.fingerprint, self.encode_body(update, ctx))

    def decode(self, payload: bytes, ctx: CodecContext) -> Update:
        try:
            body = wire.unpack(payload, self.codec_id, ctx.spec.fingerprint)
            reader = wire.BodyReader(body, entropy=self.entropy)
            update = self.decode_body(reader, ctx)
            reader.finish()
            for name, t in update.items():
                if not np.isfinite(t.detach().numpy()).all():  # numpy's check is ~10x faster here
                    raise PayloadError("nonfinite", f"tensor {name!r} holds NaN or Inf values")
        except PayloadError as err:
            raise err.for_client(ctx.client) from None
        return update

    def encode_body(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        raise NotImplementedError

    def decode_body(self, reader: wire.BodyReader, ctx: CodecContext) -> Update:
        raise NotImplementedError


def weighted_mean(spec: ModelSpec, updates: list[tuple[int, float, Update]]) -> dict[str, torch.Tensor]:
    """Sum of ``weight / total * update`` in float64, accumulated in the given (client-id) order."""
    total = sum(w for _, w, _ in updates)
    out = {}
    for t in spec.tensors:
        acc = torch.zeros(t.shape, dtype=torch.float64)
        for _, w, upd in updates:
            acc += upd[t.name].to(torch.float64) * (w / total)
        out[t.name] = acc
    return out


def split_specs(spec: ModelSpec) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(compressed, dense): the conv/linear kernels every lossy codec compresses, and the rest
    (biases, BatchNorm parameters and running statistics) that travel as float32. The same split
    for every codec keeps their side information equal."""
    return spec.select(("weight",)), spec.select(("param", "buffer"))


@dataclass
class CodecInfo:
    factory: Callable[..., Codec]
    summary: str
    options: dict = field(default_factory=dict)


_REGISTRY: dict[str, CodecInfo] = {}


def register(name: str, summary: str, **defaults):
    """Class decorator: make ``name`` buildable by :func:`build_codec` with ``defaults``."""

    def deco(cls):
        _REGISTRY[name] = CodecInfo(cls, summary, dict(defaults))
        return cls

    return deco


def available_codecs() -> dict[str, CodecInfo]:
    return dict(_REGISTRY)


#: options every codec accepts: the composable stages
STAGE_OPTIONS = {"ef": False, "entropy": False}


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"codec option {name} expects true or false, got {value!r}")


def build_codec(name: str, **options) -> Codec:
    """Build codec ``name``; the stage options ``ef`` (error feedback) and ``entropy`` (range-code
    the symbol sections) apply to any codec they make sense for."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    info = _REGISTRY[name]
    unknown = set(options) - set(info.options) - set(STAGE_OPTIONS)
    if unknown:
        raise ConfigError(f"codec {name!r} has no option(s) {sorted(unknown)}; "
                          f"its options are {sorted(info.options) + sorted(STAGE_OPTIONS)}")
    ef = _flag("ef", options.pop("ef", False))
    entropy = _flag("entropy", options.pop("entropy", False))
    codec = info.factory(**{**info.options, **options})
    if entropy:
        if not codec.symbolic:
            raise ConfigError(f"codec {name!r} writes no symbols (it sends plain floats), so entropy=true "
                              "has nothing to code; use it with fedmrn, signsgd, qsgd, topk, fedpm or fedbat")
        codec.entropy = True
        codec.codec_id = f"{codec.codec_id}+ec"
    if ef:
        if codec.lossless:
            raise ConfigError(f"codec {name!r} is lossless: error feedback would always carry zero")
        from .stages import ErrorFeedback

        codec = ErrorFeedback(codec)
    return codec
