"""The Flower transport of fedcodec's round loop (:mod:`fedcodec.fl.loop`): broadcasts go out as
Flower Messages (Message API, flwr 1.41) to the SuperNodes holding the sampled partitions, and
their ClientApps answer with the codec's bytes.

Messages:

- ``query`` (empty) → ``ConfigRecord {"partition-id", "num-partitions"?}``: :func:`discover` maps
  partitions to node ids.
- ``train`` with ``ConfigRecord {"broadcast": bytes, "round": int, "client": int, "simulate": str}``
  → ``ConfigRecord {"payload": bytes, "client": int, "setup"?: bytes}`` and
  ``MetricRecord {"num-examples", "train-loss", "codec-<name>"...}``. ``simulate`` is ``""``,
  ``"dropout"`` (the node takes in the broadcast, then answers ``{"dropped": true}`` without
  training) or ``"straggler"`` (it trains and answers; the server treats the answer as late), so
  the simulated failures of a config happen on Flower exactly as in-process.

A node that answers with an error is *dropped*; one that has not answered when the round closes
(``round-timeout`` after the broadcast, or ``straggler-timeout`` after ``min-clients`` good answers)
is *timed out*. Replies are read defensively: a payload that is not ``bytes`` arrives as empty bytes
(the decoder rejects it), metrics that are not numbers are ignored, and a reply naming another
client is dropped.
"""

from __future__ import annotations

import logging
import math
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..fl.loop import DROPPED, OK, TIMED_OUT, Reply, RoundPlan
from .common import (METRICS, QUERY, RECORD, SIMULATE_DROPOUT, SIMULATE_NONE, SIMULATE_STRAGGLER, TRAIN,
                     FlowerSettings)

log = logging.getLogger("fedcodec.flower.server")


def discover(grid: Grid, num_clients: int, wait: float) -> dict[int, int]:
    """Ask every connected SuperNode for its ``partition-id``; return ``{partition: node_id}``.

    Waits up to ``wait`` seconds for ``num_clients`` distinct partitions. A partition claimed by
    two nodes keeps the lower node id; ids outside ``0..num_clients-1`` or not integers are ignored.
    """
    deadline = time.monotonic() + wait
    asked: set[int] = set()
    holders: dict[int, int] = {}
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=QUERY) for n in new]
            replies = collect(grid, msgs, len(msgs), max(deadline - time.monotonic(), 10.0), None)
            for node, reply in zip(new, replies):
                pid = _partition_of(node, reply)
                if pid is None:
                    continue
                if not 0 <= pid < num_clients:
                    log.warning("node %d holds partition %d, outside 0..%d: ignored", node, pid, num_clients - 1)
                elif pid in holders:
                    log.warning("partition %d is claimed by nodes %d and %d: using %d", pid, holders[pid], node,
                                min(holders[pid], node))
                    holders[pid] = min(holders[pid], node)
                else:
                    holders[pid] = node
            asked |= set(new)
        if len(holders) >= num_clients or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    missing = sorted(set(range(num_clients)) - set(holders))
    if missing:
        log.warning("no SuperNode holds partition(s) %s after %.0f s; those clients drop out when sampled",
                    missing, wait)
    log.info("partition → node: %s", dict(sorted(holders.items())))
    return holders


def _partition_of(node: int, reply: Message | None) -> int | None:
    if reply is None:
        log.warning("node %d did not report its partition in time", node)
        return None
    if reply.has_error():
        log.warning("node %d did not report its partition: %s", node, reply.error.reason)
        return None
    pid = reply.content.config_records.get(RECORD, {}).get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        log.warning("node %d reported partition %r, not an integer: ignored", node, pid)
        return None
    return pid


def collect(grid: Grid, msgs: list[Message], quorum: int, timeout: float | None,
            straggler_timeout: float | None, poll: float = 0.25) -> list[Message | None]:
    """Push ``msgs`` and pull their replies until all are in, ``timeout`` seconds have passed, or
    ``straggler_timeout`` seconds have passed since ``quorum`` good replies arrived. Returns the
    reply to each message, in order (``None``: none arrived). Replies are matched by the id of the
    message they answer: an error reply made by the SuperLink for a node it considers offline does
    not come from that node."""
    ids = list(grid.push_messages(msgs))
    pending, got = set(ids), {}
    start, quorum_at = time.monotonic(), None
    while pending:
        for reply in grid.pull_messages(pending):
            got[reply.metadata.reply_to_message_id] = reply
        pending -= set(got)
        now = time.monotonic()
        if quorum_at is None and sum(not r.has_error() for r in got.values()) >= quorum:
            quorum_at = now
        if not pending or (timeout is not None and now - start >= timeout) or (
                straggler_timeout is not None and quorum_at is not None and now - quorum_at >= straggler_timeout):
            break
        time.sleep(poll)
    return [got.get(i) for i in ids]


class FlowerTransport:
    """Exchanges a round's bytes with the SuperNodes in ``holders`` (``{partition: node id}``)."""

    def __init__(self, grid: Grid, holders: dict[int, int], settings: FlowerSettings, min_clients: int):
        self.grid, self.holders, self.settings, self.min_clients = grid, holders, settings, min_clients

    def reachable(self, clients: list[int]) -> set[int]:
        return {c for c in clients if c in self.holders}

    def exchange(self, plan: RoundPlan, state) -> dict[int, Reply]:
        sent = sorted(plan.broadcasts)
        msgs = []
        for c in sent:
            simulate = (SIMULATE_DROPOUT if c in plan.dropout else SIMULATE_STRAGGLER if c in plan.late
                        else SIMULATE_NONE)
            content = RecordDict({RECORD: ConfigRecord({"broadcast": plan.broadcasts[c], "round": plan.round,
                                                        "client": c, "simulate": simulate})})
            msgs.append(Message(content, dst_node_id=self.holders[c], message_type=TRAIN, group_id=str(plan.round)))
        # simulated dropouts never answer with a payload: the quorum counts the others only
        quorum = min(self.min_clients, max(len(sent) - len(plan.dropout & set(sent)), 0))
        answers = collect(self.grid, msgs, quorum, self.settings.round_timeout, self.settings.straggler_timeout)
        return {c: read_reply(c, answer, late=c in plan.late) for c, answer in zip(sent, answers)}


def read_reply(client: int, answer: Message | None, late: bool = False) -> Reply:
    """A ClientApp's answer as a :class:`Reply`, never trusting its types."""
    if answer is None:
        return Reply(client, TIMED_OUT, reason="no reply before the round's deadline")
    if answer.has_error():
        return Reply(client, DROPPED, reason=f"error {answer.error.code}: {answer.error.reason}")
    rec = answer.content.config_records.get(RECORD, {})
    if rec.get("dropped") is True:
        return Reply(client, DROPPED, reason="simulated dropout")
    if rec.get("client") != client:
        return Reply(client, DROPPED, reason=f"the reply names client {rec.get('client')!r}")
    payload = rec.get("payload")
    setup = rec.get("setup")
    metrics = answer.content.metric_records.get(METRICS, {})
    numbers = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    examples = metrics.get("num-examples")
    return Reply(client, TIMED_OUT if late else OK,
                 # the ledger counts what arrived; anything but bytes is rejected by the decoder
                 payload=payload if isinstance(payload, bytes) else b"",
                 setup=(setup if isinstance(setup, bytes) else b"") if setup is not None else None,
                 num_examples=examples if isinstance(examples, int) and not isinstance(examples, bool) else None,
                 train_loss=numbers.get("train-loss", math.nan),
                 metrics={k[len("codec-"):]: v for k, v in numbers.items() if k.startswith("codec-")},
                 reason="simulated straggler" if late else "")
