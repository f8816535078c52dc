"""The codec protocol and the model spec both ends agree on.

A codec turns a client's update (one float32 tensor per entry of the model spec) into ``bytes``
and back, and does nothing else. What changes *how* clients train or how the server aggregates
(FedMRN's masked-noise training, FedPM's Beta posterior) is an :class:`~fedcodec.codecs.algorithms.Algorithm`;
what a codec must learn before it can code (the AE's decoder) is a :class:`~fedcodec.codecs.setup.Setup`;
error feedback is a memory the uplink applies around any lossy codec
(:class:`~fedcodec.codecs.stages.ErrorFeedback`). :func:`~fedcodec.codecs.registry.build_uplink`
puts them together.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import ClassVar, Mapping

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
        # numpy's concatenate: at 10M values about 3x faster than torch.cat followed by .numpy()
        return np.concatenate([update[t.name].detach().reshape(-1).float().cpu().numpy() for t in specs])

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


def flag(name: str, value) -> bool:
    """A boolean option: ``True``/``False``, or the strings ``"true"``/``"false"`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"codec option {name} expects true or false, got {value!r}")


def _typed(name: str, kind: str, value):
    """``value`` as option ``name`` of declared type ``kind`` (bool, int, float or str)."""
    if kind == "bool":
        return flag(name, value)
    if isinstance(value, (bool, np.bool_)):
        pass
    elif kind == "int" and isinstance(value, (int, np.integer)):
        return int(value)
    elif kind == "float" and isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    elif kind == "str" and isinstance(value, str):
        return value
    if kind not in ("int", "float", "str"):
        return value
    expects = {"int": "an integer", "float": "a number", "str": "a string"}[kind]
    raise ConfigError(f"codec option {name} expects {expects}, got {value!r}")


@dataclass(frozen=True)
class Options:
    """A codec's options, checked once when they are built: subclasses are frozen dataclasses whose
    fields (with their defaults) are the options. Every field is coerced to its declared type
    (``bool``, ``int``, ``float``, ``str``; a wrong type is a :class:`ConfigError` naming the option),
    then :meth:`check` validates ranges and combinations. The same object configures the codec and
    its algorithm."""

    def __post_init__(self) -> None:
        for f in fields(self):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            object.__setattr__(self, f.name, _typed(f.name, kind, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` (saying how to fix it) for a value out of range."""


class Codec:
    """Turns an update into ``bytes`` and back; nothing else.

    Subclasses set ``codec_id`` (and ``options_type`` if they take options) and implement
    :meth:`encode_body` / :meth:`decode_body`. The envelope (magic, version, codec id, spec
    fingerprint, length, CRC) is handled here, as is the rejection of non-finite decoded values.

    ``entropy=True`` builds the codec with its entropy stage: every symbol section it writes
    (:meth:`writer`, ``BodyReader.symbols``) is range coded instead of bit-packed, and its wire id
    becomes ``"<codec_id>+ec"``. A codec that writes no symbol sections refuses it.
    """

    codec_id: str
    options_type: ClassVar[type[Options]] = Options
    lossless: ClassVar[bool] = False
    #: encodes every value on its own (fp32, fp16), so it can carry a whole model, not only an update
    carries_models: ClassVar[bool] = False
    #: writes its data as symbol sections (BodyWriter.symbols), so the entropy stage applies
    symbolic: bool = False

    def __init__(self, options: Options | None = None, entropy: bool = False):
        self.options = options if options is not None else self.options_type()
        self.entropy = bool(entropy)
        if self.entropy:
            if not self.symbolic:
                raise ConfigError(f"codec {self.codec_id!r} writes no symbols (it sends plain floats), so "
                                  "entropy=true has nothing to code; use it with a codec that writes symbol "
                                  "sections (`fedcodec codecs` lists them)")
            self.codec_id = f"{self.codec_id}+ec"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r}, entropy={self.entropy})"

    def writer(self) -> wire.BodyWriter:
        """A body writer that stores symbol sections the way this codec was built to."""
        return wire.BodyWriter(entropy=self.entropy)

    def encode(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        return wire.pack(self.codec_id, ctx.spec.fingerprint, self.encode_body(update, ctx))

    def decode(self, payload: bytes, ctx: CodecContext) -> Update:
        """The update in ``payload``; raises :class:`PayloadError` (naming ``ctx.client``) for a
        payload that is malformed, made for another codec or model, or holds NaN or Inf."""
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


class KernelCodec(Codec):
    """The template of the codecs that compress the conv/linear kernels and send the rest as float32.

    Body: ``kernel part | dense part``, where the kernel part is the subclass's
    (:meth:`encode_kernels` / :meth:`decode_kernels`, over the kernels of :func:`split_specs`
    concatenated in spec order) and the dense part holds every other tensor (biases, BatchNorm
    parameters and running statistics) in spec order: float32 little-endian values when
    :attr:`dense_levels` is 0 (the default), else low-bit quantized deltas
    (:mod:`fedcodec.codecs.densequant`).
    """

    #: 0: the dense values travel as float32; 1..255: as stochastically quantized deltas on a grid of
    #: ``dense_levels + 1`` points per tensor, running variances in log space (a codec sets it)
    dense_levels: int = 0

    def encode_kernels(self, flat: np.ndarray, update: Mapping[str, torch.Tensor], ctx: CodecContext,
                       w: wire.BodyWriter) -> None:
        """Write the kernel part for ``flat``, the kernels' values concatenated (a fresh float32
        array the codec may change in place); ``update`` holds everything, side values included."""
        raise NotImplementedError

    def decode_kernels(self, reader: wire.BodyReader, kernels: list[TensorSpec], ctx: CodecContext) -> np.ndarray:
        """Read the kernel part: the kernels' float32 values concatenated in spec order."""
        raise NotImplementedError

    def encode_body(self, update: Mapping[str, torch.Tensor], ctx: CodecContext) -> bytes:
        kernels, dense = split_specs(ctx.spec)
        w = self.writer()
        self.encode_kernels(ctx.spec.flatten(update, kernels), update, ctx, w)
        if self.dense_levels:
            from .densequant import encode_dense

            encode_dense(w, update, ctx, self.dense_levels)
            return w.getvalue()
        return w.raw(ctx.spec.flatten(update, dense).astype("<f4", copy=False)).getvalue()

    def decode_body(self, reader: wire.BodyReader, ctx: CodecContext) -> Update:
        kernels, dense = split_specs(ctx.spec)
        out = ctx.spec.unflatten(self.decode_kernels(reader, kernels, ctx), kernels)
        if self.dense_levels:
            from .densequant import decode_dense

            out.update(decode_dense(reader, ctx, self.dense_levels))
        else:
            out.update(ctx.spec.unflatten(reader.array("<f4", dense_count(ctx.spec), "dense values"), dense))
        return out

    def dense_bytes(self, spec: ModelSpec) -> int:
        """Bytes of the dense part in fixed-width mode (float32 values, or :mod:`densequant`'s format)."""
        if self.dense_levels:
            from .densequant import dense_size

            return dense_size(spec, self.dense_levels)
        return 4 * dense_count(spec)

    def check_size(self, reader: wire.BodyReader, ctx: CodecContext, kernel_bytes: int, where: str = "") -> None:
        """Reject a body whose remaining bytes are not ``kernel_bytes`` plus the fixed-width dense part
        (``where`` says what was read before, e.g. " after the scales")."""
        expected = kernel_bytes + self.dense_bytes(ctx.spec)
        if reader.remaining != expected:
            raise PayloadError("size", f"body carries {reader.remaining} bytes{where}; the model needs {expected}")


def dense_count(spec: ModelSpec) -> int:
    """Number of values :class:`KernelCodec` sends as float32 (everything but the kernels)."""
    return spec.numel(("param", "buffer"))

def split_specs(spec: ModelSpec) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(compressed, dense): the conv/linear kernels every lossy codec compresses, and the rest
    (biases, BatchNorm parameters and running statistics) that travel as float32. The same split
    for every codec keeps their side information equal."""
    return spec.select(("weight",)), spec.select(("param", "buffer"))


