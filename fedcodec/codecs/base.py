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
    def from_model(cls, model: nn.Module) -> "ModelSpec":
        weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}
        specs = [TensorSpec(n, tuple(p.shape), "weight" if id(p) in weights else "param")
                 for n, p in model.named_parameters()]
        specs += [TensorSpec(n, tuple(b.shape), "buffer") for n, b in model.named_buffers()
                  if b.is_floating_point()]
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
    """

    spec: ModelSpec
    client: int
    round: int
    seed: int = 0
    rng: torch.Generator | None = None


class Parametrization:
    """How a codec reparametrizes local training. The engine calls, in order:

    ``init()`` → trainable latent tensors; for every step ``deltas(latent, progress)`` →
    the update added to the frozen global weight in the forward pass (``progress`` runs from 0 to 1);
    at the end ``finish(latent)`` → the update handed to :meth:`Codec.encode`.
    """

    names: tuple[str, ...] = ()

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

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization | None:
        return None

    def encode(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        return wire.pack(self.codec_id, ctx.spec.fingerprint, self.encode_body(update, ctx))

    def decode(self, payload: bytes, ctx: CodecContext) -> Update:
        try:
            body = wire.unpack(payload, self.codec_id, ctx.spec.fingerprint)
            reader = wire.BodyReader(body)
            update = self.decode_body(reader, ctx)
            reader.finish()
            for name, t in update.items():
                if not torch.isfinite(t).all():
                    raise PayloadError("nonfinite", f"tensor {name!r} holds NaN or Inf values")
        except PayloadError as err:
            raise err.for_client(ctx.client) from None
        return update

    def encode_body(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        raise NotImplementedError

    def decode_body(self, reader: wire.BodyReader, ctx: CodecContext) -> Update:
        raise NotImplementedError


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


def build_codec(name: str, **options) -> Codec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    info = _REGISTRY[name]
    unknown = set(options) - set(info.options)
    if unknown:
        raise ConfigError(f"codec {name!r} has no option(s) {sorted(unknown)}; "
                          f"its options are {sorted(info.options) or 'none'}")
    return info.factory(**{**info.options, **options})
