"""The server → client broadcast, through any codec, with both ends holding the same model.

Two modes (config ``downlink``, ``downlink_options``, ``downlink_delta``):

* **model** (default): the global model itself is encoded (``fp32``: exact; ``fp16``: half the
  bytes). Every client receives the same payload and trains from its decoded value. The payload is
  the codec's own (:mod:`fedcodec.codecs.wire`), nothing added.
* **delta**: the server keeps, per client, a replica of the model that client holds (initially the
  run's initial model, which both ends build from the seed). Each time the client is sampled it is
  sent ``encode(global - replica)`` with the downlink codec (e.g. ``qsgd`` with 255 levels, 8 bits per
  value), and both ends set ``replica += decode(payload)`` with the same float32 operations, so the
  client's model is bit-identical to the server's copy. The quantization error is not lost: it stays
  in ``global - replica`` and is sent next time (error feedback on the downlink). A client that was
  not sampled for many rounds simply receives a larger delta. The server's memory grows with the
  number of clients it has talked to (one model copy each).

In both modes the server decodes a client's update relative to the model that client trained
from (:meth:`Downlink.view`).

Delta envelope
--------------

Under a delta downlink both ends must hold the same replica forever; one lost or altered step would
leave them apart for good (the client trains from one model, the server decodes its update against
another). So each delta payload carries, in front of the codec's payload, a fixed header
(:data:`HEADER_SIZE` = 17 bytes)::

    kind     u8        1 = STEP: body is the downlink codec's payload of (global - replica);
                           the client sets replica += decode(body)
                       2 = FULL: body is an ``fp32`` payload of the whole global model (exact);
                           the client sets replica = decode(body)
    base     8 bytes   model_hash(the replica the server expects the client to hold before applying);
                       all zero for FULL (the client's copy is replaced, whatever it was)
    result   8 bytes   model_hash(the client's model after applying)
    body     rest      a codec payload in its own envelope (magic, codec id, spec fingerprint, CRC-32)

``model_hash`` is BLAKE2b with an 8-byte digest over the model's values as little-endian float32,
tensor after tensor in model-spec order (no separators: the spec, which both ends share and the
body's fingerprint pins, fixes every size). It covers the bits, so ``-0.0`` and ``0.0`` differ.

The client refuses a broadcast — raises :class:`DownlinkError`, leaves its stored copy untouched and
answers "downlink out of sync" instead of training — when the body does not decode, a decoded value
or the resulting model is not finite, ``base`` is not the hash of its own copy, or ``result`` is not
the hash of the model it computed. The server then marks that client's replica unknown
(:meth:`Downlink.forget`), and its next broadcast to that client is a FULL one, which puts both ends
back on the same bits. A FULL broadcast is also sent whenever the server's own next replica would not
be finite. Honest runs never send FULL: their models and records are those of the format without a
header; only each delta payload is 17 bytes longer.

What this protects against: desynchronisation — a lost or replayed step, a node whose stored state
was corrupted or reset, a bug on either side, a payload altered by a non-adversarial fault. The hashes
are unkeyed, so they are *consistency* checks, not authentication: whoever can rewrite the payload can
recompute them. Against a malicious network, TLS between SuperNodes and SuperLink is what protects the
broadcast (``fedcodec flower`` and the Flower tests run it); against a compromised server nothing on the
client side can, but a server that sends a step the client cannot reconcile with its copy, or one that
produces Inf/NaN, is refused rather than stored.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

from ..codecs import Codec, CodecContext, ModelSpec, Update, build_codec
from ..errors import PayloadError
from . import rng as rngs

PREFIX = "down/"
#: server-store key of a client whose copy of the model is unknown: its next broadcast is FULL
RESYNC = "downlink-resync"
STEP, FULL = 1, 2
_HEADER = struct.Struct("<B8s8s")
HEADER_SIZE = _HEADER.size  # 17
OUT_OF_SYNC = "downlink out of sync"
_NO_BASE = bytes(8)
_MAX_DETAIL = 300


class DownlinkError(PayloadError):
    """A client refused its broadcast and kept its stored copy of the model as it was.

    ``reason``: ``"out-of-sync"`` (a hash does not match), ``"nonfinite"`` (a decoded value or the
    resulting model is NaN/Inf), ``"downlink"`` (a malformed delta header) or the downlink codec's own
    tag (``"checksum"``, ``"truncated"``, ...). Under a delta downlink the server's replica of this
    client has moved on without it: the server must send the whole model next time."""

    def _message(self) -> str:
        who = f"client {self.client}: " if self.client is not None else ""
        return f"{who}refused broadcast ({self.reason}): {self.detail}"


def refusal_reason(reason: str, detail: str) -> str:
    """What the server records for a client that refused its broadcast (the same text in-process and
    on Flower, where ``reason``/``detail`` arrive from the ClientApp)."""
    detail = detail if len(detail) <= _MAX_DETAIL else detail[:_MAX_DETAIL] + "..."
    return f"{OUT_OF_SYNC} ({reason}): {detail}"


def model_hash(model: Update, spec: ModelSpec) -> bytes:
    """BLAKE2b-8 of ``model``'s values as little-endian float32, tensor after tensor in spec order."""
    h = hashlib.blake2b(digest_size=8)
    for t in spec.tensors:
        arr = model[t.name].detach().to(torch.float32).contiguous().numpy()
        h.update(memoryview(arr.astype("<f4", copy=False)).cast("B"))
    return h.digest()


def _finite(model: Update) -> str | None:
    """The name of a tensor holding NaN or Inf, else None."""
    for name, t in model.items():
        if not np.isfinite(t.detach().numpy()).all():
            return name
    return None


def _read(store: dict[str, torch.Tensor], spec: ModelSpec, fallback: Update) -> Update:
    return {t.name: store.get(PREFIX + t.name, fallback[t.name]) for t in spec.tensors}


def _write(store: dict[str, torch.Tensor], model: Update) -> None:
    for name, value in model.items():
        store[PREFIX + name] = value


class Downlink:
    def __init__(self, codec: Codec, delta: bool, spec: ModelSpec, run_seed: int, initial: Update):
        self.codec, self.delta, self.spec, self.run_seed = codec, delta, spec, run_seed
        self.initial = initial  # the model every client can build from the run's seed
        self.full = build_codec("fp32")  # FULL broadcasts of a delta downlink

    def _ctx(self, round_num: int, client: int) -> CodecContext:
        seed = rngs.derive_seed(self.run_seed, round_num, rngs.DOWNLINK, client + 1)  # -1: everyone
        return CodecContext(self.spec, client=client, round=round_num, seed=seed, rng=rngs.torch_generator(seed))

    def codec_label(self, payload: bytes) -> str:
        """The codec id a broadcast's ledger row names: the downlink codec's, or ``fp32`` for a
        delta downlink's FULL resend."""
        if self.delta and len(payload) >= HEADER_SIZE and payload[0] == FULL:
            return self.full.codec_id
        return self.codec.codec_id

    def forget(self, server_state: dict[int, dict[str, torch.Tensor]], client: int) -> None:
        """The server no longer knows which model ``client`` holds (it refused a broadcast): its next
        broadcast is the whole model. Nothing to do for a model-mode downlink."""
        if self.delta:
            server_state.setdefault(client, {})[RESYNC] = torch.ones(())

    def send(self, global_params: Update, round_num: int, clients: list[int],
             server_state: dict[int, dict[str, torch.Tensor]]) -> tuple[dict[int, bytes], dict[int, Update]]:
        """The payload for each client and the model each will hold once it decodes it.

        ``server_state`` maps a client to the server's store for it (delta mode keeps the replica
        there); it is updated in place."""
        if not self.delta:
            payload = self.codec.encode(global_params, self._ctx(round_num, -1))
            view = global_params if self.codec.lossless else self.codec.decode(payload, self._ctx(round_num, -1))
            return {c: payload for c in clients}, {c: view for c in clients}
        payloads, views = {}, {}
        for c in clients:
            store = server_state.setdefault(c, {})
            view = None
            if RESYNC not in store:
                replica = _read(store, self.spec, self.initial)
                diff = {n: global_params[n] - replica[n] for n in replica}
                body = self.codec.encode(diff, self._ctx(round_num, c))
                step = self.codec.decode(body, self._ctx(round_num, c))
                view = {n: replica[n] + step[n] for n in replica}
                if _finite(view) is None:
                    head = _HEADER.pack(STEP, model_hash(replica, self.spec), model_hash(view, self.spec))
                else:  # the client would refuse it: send the model itself instead
                    view = None
            if view is None:
                view = {t.name: global_params[t.name].detach().to(torch.float32).clone() for t in self.spec.tensors}
                body = self.full.encode(view, self._ctx(round_num, c))
                head = _HEADER.pack(FULL, _NO_BASE, model_hash(view, self.spec))
                store.pop(RESYNC, None)
            _write(store, view)
            payloads[c], views[c] = head + body, view
        return payloads, views

    def receive(self, payload: bytes, round_num: int, client: int,
                client_state: dict[str, torch.Tensor] | None) -> Update:
        """The client's side: the model it trains from (updating its own copy in delta mode).

        Raises :class:`DownlinkError` (a :class:`PayloadError`) for a broadcast it cannot take in,
        and then leaves ``client_state`` exactly as it was."""
        if not self.delta:
            try:
                model = self.codec.decode(payload, self._ctx(round_num, -1))
            except PayloadError as err:
                raise DownlinkError(err.reason, err.detail, client) from None
            return model
        if client_state is None:
            raise ValueError("a delta downlink needs the client's state store to keep its model copy")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise DownlinkError("type", f"expected bytes, got {type(payload).__name__}", client)
        if len(payload) < HEADER_SIZE:
            raise DownlinkError("truncated", f"{len(payload)} bytes is shorter than the {HEADER_SIZE}-byte delta "
                                             "header", client)
        kind, base, result = _HEADER.unpack_from(payload, 0)
        body = bytes(memoryview(payload)[HEADER_SIZE:])
        replica = _read(client_state, self.spec, self.initial)
        try:
            if kind == STEP:
                held = model_hash(replica, self.spec)
                if base != held:
                    raise DownlinkError("out-of-sync", f"the step was made for a copy of the model with hash "
                                                       f"{base.hex()}, this client holds {held.hex()}")
                step = self.codec.decode(body, self._ctx(round_num, client))
                view = {n: replica[n] + step[n] for n in replica}
            elif kind == FULL:
                view = self.full.decode(body, self._ctx(round_num, client))
            else:
                raise DownlinkError("downlink", f"unknown delta-broadcast kind {kind} (1: step, 2: full model)")
            bad = _finite(view)
            if bad is not None:
                raise DownlinkError("nonfinite", f"tensor {bad!r} of the resulting model holds NaN or Inf values")
            got = model_hash(view, self.spec)
            if got != result:
                raise DownlinkError("out-of-sync", f"the resulting model has hash {got.hex()}, the server's copy "
                                                   f"{result.hex()}")
        except PayloadError as err:  # the codec's (checksum, nonfinite, ...) and ours
            raise DownlinkError(err.reason, err.detail, client) from None
        _write(client_state, view)
        return view
