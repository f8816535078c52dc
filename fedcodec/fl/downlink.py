"""The server → client broadcast, through any codec, with both ends holding the same model.

Two modes (config ``downlink``, ``downlink_options``, ``downlink_delta``):

* **model** (default): the global model itself is encoded (``fp32``: exact; ``fp16``: half the
  bytes). Every client receives the same payload and trains from its decoded value.
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
"""

from __future__ import annotations

import torch

from ..codecs import Codec, CodecContext, ModelSpec, Update
from . import rng as rngs

PREFIX = "down/"


def _read(store: dict[str, torch.Tensor], spec: ModelSpec, fallback: Update) -> Update:
    return {t.name: store.get(PREFIX + t.name, fallback[t.name]) for t in spec.tensors}


def _write(store: dict[str, torch.Tensor], model: Update) -> None:
    for name, value in model.items():
        store[PREFIX + name] = value


class Downlink:
    def __init__(self, codec: Codec, delta: bool, spec: ModelSpec, run_seed: int, initial: Update):
        self.codec, self.delta, self.spec, self.run_seed = codec, delta, spec, run_seed
        self.initial = initial  # the model every client can build from the run's seed

    def _ctx(self, round_num: int, client: int) -> CodecContext:
        seed = rngs.derive_seed(self.run_seed, round_num, rngs.DOWNLINK, client + 1)  # -1: everyone
        return CodecContext(self.spec, client=client, round=round_num, seed=seed, rng=rngs.torch_generator(seed))

    def send(self, global_params: Update, round_num: int, clients: list[int],
             server_state: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[int, bytes], dict[int, Update]]:
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
            replica = _read(store, self.spec, self.initial)
            diff = {n: global_params[n] - replica[n] for n in replica}
            payload = self.codec.encode(diff, self._ctx(round_num, c))
            step = self.codec.decode(payload, self._ctx(round_num, c))
            view = {n: replica[n] + step[n] for n in replica}
            _write(store, view)
            payloads[c], views[c] = payload, view
        return payloads, views

    def receive(self, payload: bytes, round_num: int, client: int,
                client_state: dict[str, torch.Tensor] | None) -> Update:
        """The client's side: the model it trains from (updating its own copy in delta mode)."""
        if not self.delta:
            return self.codec.decode(payload, self._ctx(round_num, -1))
        if client_state is None:
            raise ValueError("a delta downlink needs the client's state store to keep its model copy")
        replica = _read(client_state, self.spec, self.initial)
        step = self.codec.decode(payload, self._ctx(round_num, client))
        view = {n: replica[n] + step[n] for n in replica}
        _write(client_state, view)
        return view
