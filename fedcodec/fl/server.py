"""The server function: broadcast, decode each client's bytes, aggregate the ones that decode.

Shared by the in-process simulator and the Flower strategy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..codecs import Algorithm, CodecContext, ModelSpec, Update, Uplink
from ..codecs.algorithms import weighted_mean
from ..errors import PayloadError
from . import robust
from .robust import Defense

log = logging.getLogger("fedcodec.server")


@dataclass
class RoundOutcome:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: set[int] = field(default_factory=set)  # accepted, but scaled down (fedcodec.fl.robust.clip)
    #: wall time spent decoding (setup messages and payloads, with their checks) and aggregating
    decode_seconds: float = 0.0
    aggregate_seconds: float = 0.0


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def overflows(global_params: Update, update: Update) -> str | None:
    """The name of a tensor where ``global + update`` leaves the float32 range, else None.

    If no accepted update overflows on its own, their weighted mean cannot either (it is a convex
    combination), so finite-but-huge values cannot push the global model to Inf over rounds.
    """
    for name, upd in update.items():
        if upd.numel() and float((global_params[name].double() + upd.double()).abs().max()) > FLOAT32_MAX:
            return name
    return None


def update_norm(update: Update) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in update.values())))


#: applies a round's float64 step to the global model (a server optimizer): (global, step) -> new global
ApplyStep = Callable[[Update, dict[str, torch.Tensor]], Update]


def aggregate(spec: ModelSpec, global_params: Update, updates: list[tuple[int, float, Update]],
              algorithm: Algorithm | None = None, apply: ApplyStep | None = None,
              defense: Defense | None = None, round_num: int = 0, clipped: set[int] | None = None) -> Update:
    """Global + the algorithm's aggregate of the updates (default: the example-weighted mean),
    summed in client-id order in float64; ``apply`` (a server optimizer's step) decides how the
    aggregate moves the model, else it is added.

    ``defense`` (None: no defence) clips the updates and may replace the mean by a robust rule
    (:mod:`fedcodec.fl.robust`); the clients it clipped are added to ``clipped``."""
    if not updates:
        return global_params
    updates = sorted(updates, key=lambda u: u[0])
    names = robust.robust_names(algorithm, spec)
    if defense is not None:
        tensors = spec.names if algorithm is None or algorithm.additive_step else names
        updates = robust.clip(updates, robust.groups(spec, tensors), defense.clip_factor, round_num, clipped)
    step = algorithm.aggregate(spec, global_params, updates) if algorithm is not None else weighted_mean(spec, updates)
    if defense is not None and defense.aggregator != "mean" and len(updates) >= robust.MIN_ROBUST:
        step = step | robust.robust_mean(updates, names, defense)
    if apply is not None:
        return apply(global_params, step)
    return {t.name: (global_params[t.name].to(torch.float64) + step[t.name]).to(torch.float32)
            for t in spec.tensors}


def server_round(uplink: Uplink, spec: ModelSpec, global_params: Update, round_num: int,
                 payloads: dict[int, tuple[bytes, float]], min_clients: int = 1,
                 defense: Defense | None = None,
                 references: dict[int, Update] | None = None,
                 setups: dict[int, bytes] | None = None,
                 stores: dict[int, dict[str, torch.Tensor]] | None = None,
                 apply: ApplyStep | None = None,
                 seed_of: Callable[[int], int] | None = None) -> tuple[Update, RoundOutcome]:
    """Decode ``payloads`` ({client: (bytes, weight)}), reject bad ones, aggregate the rest.

    A rejected payload is logged with the client and the reason and leaves no trace in the model. If
    fewer than ``min_clients`` payloads decode, the global model is kept unchanged for this round.
    ``defense`` (default: :class:`~fedcodec.fl.robust.Defense()`, the defaults of every run) rejects
    replays, invalid BatchNorm statistics and, with ``max_update_norm``, updates of a larger L2 norm,
    then clips and aggregates robustly (:mod:`fedcodec.fl.robust`). ``references`` holds the model
    each client trained from, when it is not ``global_params`` (lossy downlink). ``seed_of(client)``
    is the seed derived for the client's round (:func:`fedcodec.fl.rng.codec_seed`); a codec that
    sends its seed (FedMRN) must send exactly that one.

    ``setups`` holds codec setup messages (an AE client's decoder), accepted into ``stores`` (the
    server's per-client stores) before any payload is decoded; a setup message may arrive without a
    payload (a straggler's). A rejected setup message rejects that client's payload too.

    ``apply`` is the server optimizer's step (see :func:`aggregate`). A round that keeps the global
    model unchanged returns ``global_params`` itself, so a caller can tell whether the step was taken.
    """
    defense = defense if defense is not None else Defense()
    outcome = RoundOutcome()
    t0 = time.perf_counter()
    decoded = []
    failed_setup: dict[int, str] = {}
    replays = robust.ReplayGuard(stores, defense.replay_window)
    twins = robust.same_round_copies(payloads) if defense.replay_window else {}
    for client in sorted(setups or {}):
        try:
            if uplink.setup is None:
                raise PayloadError("setup", f"codec {uplink.codec_id!r} takes no setup messages", client)
            store = stores.setdefault(client, {}) if stores is not None else None
            uplink.setup.accept_setup(setups[client], CodecContext(spec, client=client, round=round_num, state=store))
        except PayloadError as err:
            err = err if err.client is not None else err.for_client(client)
            log.warning("round %d: %s", round_num, err)
            failed_setup[client] = str(err)
    for client in sorted(payloads):
        data, weight = payloads[client]
        try:
            if client in failed_setup:
                raise PayloadError("setup", f"its setup message was rejected ({failed_setup[client]})", client)
            why = twins.get(client) or replays.replayed(data)
            if why is not None:
                raise PayloadError("replay", why, client)
            ref = references.get(client, global_params) if references else global_params
            store = stores.get(client) if stores is not None else None
            seed = seed_of(client) if seed_of is not None else 0
            upd = uplink.decode(data, CodecContext(spec, client=client, round=round_num, seed=seed, reference=ref,
                                                   state=store))
            name = overflows(global_params, upd)
            if name is not None:
                raise PayloadError("overflow", f"tensor {name!r} would leave the float32 range once applied", client)
            why = robust.invalid_statistics(ref, upd) if defense.statistics else None
            if why is not None:
                raise PayloadError("statistics", why, client)
            if defense.max_update_norm is not None:
                norm = update_norm(upd)
                if not norm <= defense.max_update_norm:
                    raise PayloadError("norm", f"update L2 norm {norm:.4g} exceeds the bound "
                                               f"{defense.max_update_norm:.4g}", client)
        except PayloadError as err:
            log.warning("round %d: %s", round_num, err)
            outcome.rejected[client] = str(err)
            continue
        decoded.append((client, weight, upd))
        outcome.accepted.append(client)
    for client in outcome.accepted:
        replays.remember(client, payloads[client][0])
    t1 = time.perf_counter()
    outcome.decode_seconds = t1 - t0
    if len(decoded) < min_clients:
        log.warning("round %d: only %d of %d payloads usable (< %d); global model unchanged",
                    round_num, len(decoded), len(payloads), min_clients)
        return global_params, outcome
    new = aggregate(spec, global_params, decoded, uplink.algorithm, apply, defense, round_num, outcome.clipped)
    if defense.statistics:
        new = robust.check_statistics(global_params, new, round_num)
    outcome.aggregate_seconds = time.perf_counter() - t1
    if not all(torch.isfinite(t).all() for t in new.values()):  # defence in depth; overflows() prevents it
        log.error("round %d: aggregate is not finite; global model unchanged", round_num)
        return global_params, outcome
    return new, outcome
