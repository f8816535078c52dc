"""Hostile clients for robustness experiments: a transport in which one client lies.

:class:`HostileTransport` wraps any transport. Every round, the attacker trains honestly like
everyone else; then its reply is replaced by a crafted one that is *valid* wherever it can be (a
correct envelope and CRC, a body its codec decodes), so only the server's defences
(:mod:`fedcodec.fl.robust`, the codecs' bound fields) stand between it and the global model:

``boost``
    its update times ``factor`` (default 100) on every trained tensor, re-encoded;
``sign-flip``
    its update times ``-factor`` (default 4): a step against everyone else's;
``bn-variance``
    its BatchNorm running variances set to -1 (a model with them outputs NaN);
``alpha``
    FedMRN only: the alpha field of its payload times ``factor`` (default 1000), the CRC fixed, so
    its noise (and update) is that much larger;
``replay``
    the payload another client had accepted in an earlier round (its own update is dropped);
``decoder``
    AE only: a decoder with weights times ``factor`` (default 1e6) uploaded with its update;
``foreign-decoder``
    AE only: its decoder and update filed as another client's (the next sampled one), as a node
    claiming someone else's partition would.

``benchmarks/hostile.py`` runs the attack × defence matrix of docs/RESULTS.md §3;
tests/test_hostile_clients.py checks that the defaults hold against each attack.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

from ..codecs import CodecContext, wire
from ..codecs.autoencoder import SETUP_ID
from ..errors import ConfigError
from . import rng as rngs
from .loop import DROPPED, OK, Reply

ATTACKS = ("boost", "sign-flip", "bn-variance", "alpha", "replay", "decoder", "foreign-decoder")
DEFAULT_FACTOR = {"boost": 100.0, "sign-flip": 4.0, "alpha": 1000.0, "decoder": 1e6}


class HostileTransport:
    """``inner`` with client ``attacker`` replaced by an ``attack`` (see the module docstring)."""

    def __init__(self, inner, sim, attacker: int, attack: str, factor: float | None = None):
        if attack not in ATTACKS:
            raise ConfigError(f"unknown attack {attack!r}; choose one of {ATTACKS}")
        codec = sim.runtime.uplink.codec_id
        if attack == "alpha" and not codec.startswith("fedmrn"):
            raise ConfigError(f"the alpha attack rewrites FedMRN's alpha field; method uses codec {codec!r}")
        if attack in ("decoder", "foreign-decoder") and sim.runtime.uplink.setup is None:
            raise ConfigError(f"the {attack} attack needs a codec with setup messages (ae); method uses {codec!r}")
        self.inner, self.sim, self.attacker, self.attack = inner, sim, attacker, attack
        self.factor = DEFAULT_FACTOR.get(attack, 1.0) if factor is None else float(factor)
        self.previous: dict[int, bytes] = {}  # the other clients' payloads of the last round they sent one
        self.rounds_attacked = 0

    def reachable(self, clients: list[int]) -> set[int]:
        return self.inner.reachable(clients)

    def exchange(self, plan, state) -> dict[int, Reply]:
        replies = self.inner.exchange(plan, state)
        honest = replies.get(self.attacker)
        if honest is not None and honest.status == OK and honest.payload is not None:
            crafted = self.craft(plan, state, honest, replies)
            if crafted is not None:
                replies.update(crafted)
                self.rounds_attacked += 1
        for c, r in replies.items():
            if c != self.attacker and r.payload is not None:
                self.previous[c] = r.payload
        return replies

    # -----------------------------------------------------------------------------------------

    def _ctx(self, plan, state) -> CodecContext:
        rt, c = self.sim.runtime, self.attacker
        return CodecContext(rt.spec, client=c, round=plan.round, seed=rngs.codec_seed(rt.run_seed, plan.round, c),
                            rng=rngs.torch_generator(rngs.derive_seed(rt.run_seed, plan.round, rngs.CLIENT_CODEC, c)),
                            reference=plan.views[c], state=state.client_states.get(c))

    def _reencode(self, plan, state, payload: bytes, change) -> bytes:
        """Decode the attacker's own payload, ``change`` the update, encode it again (no error
        feedback memory is touched: the plain codec is used)."""
        codec = self.sim.runtime.uplink.codec
        ctx = self._ctx(plan, state)
        update = codec.decode(payload, ctx)
        return codec.encode(change(update), dataclasses.replace(ctx, metrics={}))

    def craft(self, plan, state, honest: Reply, replies: dict[int, Reply]) -> dict[int, Reply] | None:
        spec, f, c = self.sim.spec, self.factor, self.attacker
        trained = {t.name for t in spec.tensors if t.role != "buffer"}
        if self.attack in ("boost", "sign-flip"):
            k = f if self.attack == "boost" else -f
            payload = self._reencode(plan, state, honest.payload,
                                     lambda u: {n: v * k if n in trained else v for n, v in u.items()})
        elif self.attack == "bn-variance":
            ref = plan.views[c]
            payload = self._reencode(plan, state, honest.payload,
                                     lambda u: {n: (-1.0 - ref[n]) if n.endswith("running_var") else v
                                                for n, v in u.items()})
        elif self.attack == "alpha":
            payload = scale_fedmrn_alpha(honest.payload, f, self.sim.runtime.uplink.codec_id, spec.fingerprint)
        elif self.attack == "replay":
            if not self.previous:
                return None
            source = min(self.previous)  # the lowest-numbered other client's last payload
            payload = self.previous[source]
        elif self.attack == "decoder":
            if honest.setup is None:
                return None
            return {c: dataclasses.replace(honest, setup=scale_ae_decoder(honest.setup, f, spec.fingerprint))}
        else:  # foreign-decoder: file its own decoder and update under the next sampled client
            victims = [v for v in plan.clients if v > c] or [v for v in plan.clients if v != c]
            if honest.setup is None or not victims:
                return None
            victim = victims[0]
            return {victim: dataclasses.replace(honest, client=c),
                    c: Reply(c, DROPPED, reason="(attacker: its reply went out under another client's id)")}
        return {c: dataclasses.replace(honest, payload=payload)}


def scale_fedmrn_alpha(payload: bytes, factor: float, codec_id: str, fingerprint: bytes) -> bytes:
    """A FedMRN payload (wire id ``codec_id``, model ``fingerprint``) with its alpha field (body bytes
    10..13, after the seed and the two kind bytes) times ``factor``, in a correct envelope."""
    body = bytearray(wire.unpack(payload, codec_id, fingerprint))
    (alpha,) = struct.unpack_from("<f", body, 10)
    struct.pack_into("<f", body, 10, alpha * factor)
    return wire.pack(codec_id, fingerprint, bytes(body))


def scale_ae_decoder(message: bytes, factor: float, fingerprint: bytes) -> bytes:
    """An AE decoder message (``ae-decoder``) with every weight times ``factor`` (clipped to its dtype's range)."""
    body = bytearray(wire.unpack(message, SETUP_ID, fingerprint))
    dtype = "<f2" if body[12] else "<f4"  # after chunk, latent, hidden (u32 each): dtype code 0 f32, 1 f16
    w = np.frombuffer(bytes(body[13:]), dtype).astype(np.float64) * factor
    body[13:] = np.clip(w, -np.finfo(dtype).max, np.finfo(dtype).max).astype(dtype).tobytes()
    return wire.pack(SETUP_ID, fingerprint, bytes(body))
