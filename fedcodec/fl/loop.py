"""The round loop: one implementation, whatever carries the bytes.

A round is five steps, always in this order::

    plan      sample clients, decide simulated failures, encode the downlink payloads
    exchange  a Transport delivers each broadcast and brings back what each client answered
    ingest    the single place that writes ledger rows, aggregation weights, setup messages, metrics
    step      decode / reject / aggregate (fl/server.py), the server optimizer (fl/server_opt.py),
              then evaluation
    callbacks the round's record is appended; checkpoints, files, logs

Only ``exchange`` differs between deployments. :class:`InProcessTransport` calls
:func:`fedcodec.fl.client.client_fit` in this process; :class:`fedcodec.flower.transport.FlowerTransport`
sends the same bytes as Flower Messages to SuperNodes, whose ClientApp calls the same function.
Everything else, including the aggregation weights (the partition sizes the server knows, never
what a client claims), the simulated ``dropout``/``stragglers`` and the accounting of timeouts, is
shared, so the two give bit-identical models, records and ledgers.

Reply statuses:

- ``ok``: the client's bytes arrived in time; its payload goes to the decoder.
- ``dropped``: the client failed after the broadcast was sent (simulated ``dropout``, a node that
  answered with an error, a partition no node holds). Nothing comes back.
- ``timed_out``: the client's answer was not usable before the round's deadline: a simulated
  straggler (it trained and sent, so its bytes are counted, but the update is not aggregated), or a
  Flower node that had not answered when the round closed (nothing arrived, nothing is counted).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from ..codecs import Update
from . import rng as rngs
from .batched import ClientJob, fit_clients
from .client import client_fit, client_receive
from .downlink import DownlinkError, refusal_reason
from .server import RoundOutcome, server_round

log = logging.getLogger("fedcodec.loop")

OK, DROPPED, TIMED_OUT = "ok", "dropped", "timed_out"


@dataclass(frozen=True)
class RoundPlan:
    """What the server decided before any byte moved."""

    round: int
    clients: list[int]  # sampled, ascending
    dropout: frozenset[int]  # simulated: fail after receiving the broadcast
    late: frozenset[int]  # simulated: answer after the deadline
    broadcasts: dict[int, bytes]  # the downlink payload of every reachable sampled client
    views: dict[int, Update]  # the model each of them holds once it decodes its broadcast

    @property
    def unreachable(self) -> frozenset[int]:
        """Sampled clients no broadcast could be sent to (no SuperNode holds their partition)."""
        return frozenset(self.clients) - frozenset(self.broadcasts)


@dataclass
class Reply:
    """What came back from one sampled client."""

    client: int
    status: str  # OK, DROPPED or TIMED_OUT
    payload: bytes | None = None  # None: no payload arrived
    setup: bytes | None = None  # a codec setup message (an AE client's decoder)
    num_examples: int | None = None  # what the client says it trained on (checked, never trusted)
    train_loss: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)  # the codec's metrics of this message
    reason: str = ""  # why it was dropped or timed out
    #: the client refused its broadcast and kept its copy of the model as it was (a delta downlink's
    #: replica of it is now unknown: the next broadcast to it is the whole model). Status DROPPED.
    resync: bool = False
    #: the client's wall time, ``{"train": s, "code": s}`` (``client_fit``'s ``info["seconds"]``), where
    #: the transport knows it (in-process); empty otherwise
    seconds: dict[str, float] = field(default_factory=dict)


class Transport(Protocol):
    """Carries one round's broadcasts to the clients and their answers back."""

    def reachable(self, clients: list[int]) -> set[int]:
        """The sampled clients a broadcast can be sent to."""
        ...

    def exchange(self, plan: RoundPlan, state) -> dict[int, Reply]:
        """Deliver ``plan.broadcasts``; return a :class:`Reply` for every reachable client."""
        ...


@dataclass
class RoundReport:
    """Everything a callback may want to know about the round that just ended."""

    plan: RoundPlan
    replies: dict[int, Reply]
    inbox: "Inbox"
    outcome: RoundOutcome
    record: dict


#: ``callback(state, report)``, called after a round's record is in (``state``: the run state)
Callback = Callable[[object, RoundReport], None]


def plan_round(sim, state, reachable: Callable[[list[int]], set[int]]) -> RoundPlan:
    """Sample the round's clients and failures (pure functions of the seed) and encode the downlink
    payloads of the reachable ones (a delta downlink updates the server's replicas of exactly those)."""
    cfg, round_num = sim.cfg, state.round + 1
    clients = rngs.sample_clients(cfg.seed, round_num, cfg.num_clients, cfg.clients_per_round)
    dropout, late = rngs.round_failures(cfg.seed, round_num, clients, cfg.dropout, cfg.stragglers)
    targets = [c for c in clients if c in reachable(clients)]
    down, views = sim.runtime.downlink.send(state.global_params, round_num, targets, state.server_states)
    return RoundPlan(round_num, clients, frozenset(dropout), frozenset(late), down, views)


def refused(client: int, err: DownlinkError) -> Reply:
    """The reply of a client that refused its broadcast: its store is as it was; it answers instead
    of training."""
    return Reply(client, DROPPED, reason=refusal_reason(err.reason, err.detail), resync=True)


class InProcessTransport:
    """Runs every client in this process: :func:`client_fit` with the client's store from the run
    state. A simulated dropout receives its broadcast (its copy of the model stays in step with the
    server's replica under a delta downlink) and then fails.

    ``batch_clients`` (default: the config's) > 1 trains the round's clients in groups of up to that
    many at once where the run allows it (:mod:`fedcodec.fl.batched`): the same clients, batches and
    random draws, the same payload formats, models equal to float tolerance."""

    def __init__(self, sim, batch_clients: int | None = None):
        self.sim = sim
        self.batch_clients = sim.cfg.batch_clients if batch_clients is None else batch_clients

    def reachable(self, clients: list[int]) -> set[int]:
        return set(clients)

    def exchange(self, plan: RoundPlan, state) -> dict[int, Reply]:
        sim, replies, jobs = self.sim, {}, []
        for c in plan.clients:
            store = state.client_states.setdefault(c, {})
            if c not in plan.dropout:
                jobs.append(ClientJob(c, plan.broadcasts[c], *sim.client_data(c), store))
                continue
            try:
                client_receive(sim.runtime, plan.broadcasts[c], plan.round, c, store)
                replies[c] = Reply(c, DROPPED, reason="simulated dropout")
            except DownlinkError as err:
                replies[c] = refused(c, err)
        fitted = fit_clients(sim.runtime, jobs, sim.training, plan.round, self.batch_clients, fit=client_fit)
        for c, answer in fitted.items():
            if isinstance(answer, DownlinkError):
                replies[c] = refused(c, answer)
                continue
            payload, info = answer
            replies[c] = Reply(c, TIMED_OUT if c in plan.late else OK, payload=payload, setup=info.get("setup"),
                               num_examples=info["num_examples"], train_loss=info["train_loss"],
                               metrics=info.get("codec", {}), seconds=info.get("seconds", {}),
                               reason="simulated straggler" if c in plan.late else "")
        return {c: replies[c] for c in plan.clients if c in replies}


@dataclass
class Inbox:
    """The server's view of a round's replies, after ingestion."""

    payloads: dict[int, tuple[bytes, float]] = field(default_factory=dict)  # {client: (bytes, weight)}
    setups: dict[int, bytes] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    timed_out: dict[int, str] = field(default_factory=dict)


def ingest(sim, state, plan: RoundPlan, replies: dict[int, Reply]) -> Inbox:
    """Write the round's ledger rows (per client: downlink, setup message, payload, in client order)
    and sort the replies into what the server will decode. A client's weight is the size of its
    partition, which the server knows from the seeded partition; a different claim is logged."""
    runtime, round_num, inbox = sim.runtime, plan.round, Inbox()
    for c in plan.clients:
        reply = replies.get(c) or Reply(c, DROPPED, reason="no SuperNode holds this partition")
        if c in plan.broadcasts:  # sent, whatever became of it: its bytes crossed the wire
            state.ledger.record(round_num, c, "down", runtime.downlink.codec_label(plan.broadcasts[c]),
                                plan.broadcasts[c])
        if reply.client != c:  # a transport must file a reply under the client that sent it
            reply = Reply(c, DROPPED, reason=f"its reply names client {reply.client!r}")
        if reply.setup is not None:  # sent before the payload, so a straggler's decoder still arrives
            state.ledger.record(round_num, c, "up", f"{runtime.uplink.codec_id}/setup", reply.setup)
            inbox.setups[c] = reply.setup
        if reply.payload is not None:
            state.ledger.record(round_num, c, "up", runtime.uplink.codec_id, reply.payload)
            inbox.losses.append(reply.train_loss)
            inbox.metrics.append(reply.metrics)
        if reply.status == DROPPED:
            inbox.dropped[c] = reply.reason
            if reply.resync:  # its copy of the model is not the server's replica any more
                runtime.downlink.forget(state.server_states, c)
        elif reply.status == TIMED_OUT:
            inbox.timed_out[c] = reply.reason
        elif reply.payload is not None:
            weight = sim.client_size(c)
            if reply.num_examples != weight:
                log.warning("round %d: client %d reports %s examples, its partition has %d; using %d", round_num, c,
                            reply.num_examples, weight, weight)
            inbox.payloads[c] = (reply.payload, float(weight))
    return inbox


#: the record namespace of the metrics clients report (the server's own fields can't be overwritten)
CLIENT_METRICS = "client/"


def client_metrics(reported: list[dict]) -> dict[str, float]:
    """The mean of each metric the round's clients reported, as ``client/<name>``. Only finite
    real numbers under short string names count; anything else is logged and left out."""
    values: dict[str, list[float]] = {}
    for metrics in reported:
        for key, value in metrics.items():
            if (isinstance(key, str) and 0 < len(key) <= 64 and isinstance(value, (int, float, np.number))
                    and not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value))):
                values.setdefault(key, []).append(float(value))
            else:
                log.warning("client metric %.80r = %.80r ignored: a metric is a finite number under a name of "
                            "1..64 characters", key, value)
    return {CLIENT_METRICS + k: float(np.mean(v)) for k, v in sorted(values.items())}


def time_split(replies: dict[int, Reply], outcome: RoundOutcome, plan_seconds: float,
               exchange_seconds: float) -> dict[str, float]:
    """Where a round's wall time went (the record's ``*_seconds`` entries; ``seconds`` is the total,
    ``eval_seconds`` is added by evaluation):

    - ``train_seconds``: the clients' local training, summed over clients (pre-passes included);
    - ``code_seconds``: encoding and decoding, both ways: the broadcasts, the clients' decoding of
      them, their codec fits and encodes, the server's decoding and checks of every payload;
    - ``aggregate_seconds``: clipping, aggregation, the server optimizer's step.

    In-process clients report their own time (:attr:`Reply.seconds`). Remote clients (Flower) do not,
    so their training and coding are not split: the round records ``exchange_seconds`` (from the
    broadcast to the last reply) instead of ``train_seconds``, and ``code_seconds`` is the server's
    share only."""
    timed = [r.seconds for r in replies.values() if r.seconds]
    split = {"code_seconds": plan_seconds + sum(s.get("code", 0.0) for s in timed) + outcome.decode_seconds,
             "aggregate_seconds": outcome.aggregate_seconds}
    if timed or not replies:
        split["train_seconds"] = sum(s.get("train", 0.0) for s in timed)
    else:
        split["exchange_seconds"] = exchange_seconds
    return split


def run_round(sim, state, transport: Transport, callbacks: tuple[Callback, ...] = ()):
    """Advance ``state`` by one round through ``transport``; append the round's record and return
    ``state``. ``callbacks(state, report)`` run after the record is in (checkpoints, files)."""
    cfg = sim.cfg
    t0 = time.perf_counter()
    plan = plan_round(sim, state, transport.reachable)
    t_plan = time.perf_counter()
    replies = transport.exchange(plan, state)
    t_exchange = time.perf_counter()
    inbox = ingest(sim, state, plan, replies)
    for c, why in sorted(inbox.dropped.items()):
        log.info("round %d: client %d dropped (%s)", plan.round, c, why)
    for c, why in sorted(inbox.timed_out.items()):
        log.info("round %d: client %d timed out (%s)", plan.round, c, why)
    taken: dict = {}

    def optimizer_step(global_params: Update, step: dict) -> Update:
        new, taken["state"] = sim.server_optimizer.step(global_params, step, state.optimizer_state,
                                                         plan.round)
        return new

    new_params, outcome = server_round(sim.runtime.uplink, sim.spec, state.global_params, plan.round,
                                       inbox.payloads, cfg.min_clients, sim.defense, plan.views,
                                       inbox.setups, state.server_states, apply=optimizer_step,
                                       seed_of=lambda c: rngs.codec_seed(sim.runtime.run_seed, plan.round, c))
    if new_params is not state.global_params and "state" in taken:  # the step was taken and kept
        state.optimizer_state = taken["state"]
    record = {"round": plan.round, "clients": len(plan.clients), "accepted": len(outcome.accepted),
              "rejected": len(outcome.rejected), "clipped": len(outcome.clipped), "dropped": len(inbox.dropped),
              "timed_out": len(inbox.timed_out),
              "uplink_bytes": state.ledger.total("up", plan.round),
              "downlink_bytes": state.ledger.total("down", plan.round),
              "train_loss": float(np.mean(inbox.losses)) if inbox.losses else math.nan,
              "seconds": time.perf_counter() - t0}
    record.update(time_split(replies, outcome, t_plan - t0, t_exchange - t_plan))
    if inbox.setups:
        record["setup_bytes"] = sum(len(b) for b in inbox.setups.values())
    record.update(client_metrics(inbox.metrics))
    if plan.round % cfg.eval_every == 0 or plan.round == cfg.rounds:
        t1 = time.perf_counter()
        record.update(sim.evaluate_round(new_params, state))
        record["eval_seconds"] = time.perf_counter() - t1
    state.records.append(record)
    state.global_params = new_params
    state.round = plan.round
    report = RoundReport(plan, replies, inbox, outcome, record)
    for callback in callbacks:
        callback(state, report)
    return state
