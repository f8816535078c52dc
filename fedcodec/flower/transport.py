"""The Flower transport of fedcodec's round loop (:mod:`fedcodec.fl.loop`): broadcasts go out as
Flower Messages (Message API, flwr 1.41) to the SuperNodes holding the sampled partitions, and
their ClientApps answer with the codec's bytes.

Messages:

- ``query`` (empty) → ``ConfigRecord {"partition-id", "num-partitions"?}``: :func:`discover` binds
  each partition to the node that first claimed it.
- ``train`` with ``ConfigRecord {"broadcast": bytes, "round": int, "client": int, "simulate": str}``
  → ``ConfigRecord {"payload": bytes, "client": int, "setup"?: bytes}`` and
  ``MetricRecord {"num-examples": int, "train-loss"?: float, "codec-<name>"?: float...}``.
  ``simulate`` is ``""``, ``"dropout"`` (the node takes in the broadcast, then answers
  ``{"dropped": true, "client": int}`` without training) or ``"straggler"`` (it trains and answers; the
  server treats the answer as late), so the simulated failures of a config happen on Flower exactly as
  in-process. A node that cannot take in its broadcast (:class:`~fedcodec.fl.downlink.DownlinkError`)
  answers ``{"client": int, "refused-broadcast": str, "detail": str}``: the client is dropped and the
  server sends it the whole model next time.

Nodes and replies are untrusted. Every failure below makes that client *dropped* for the round, with
a reason that says what was wrong (logged and written to ``flower.json``), and never stops the
ServerApp:

- an error reply; a reply that is not a Flower Message;
- a reply from a node other than the one the partition is bound to, or naming another client;
- two replies to one message; a message the SuperLink did not accept;
- a missing or mistyped field: no ``ConfigRecord "fedcodec"`` or ``MetricRecord "metrics"``, a payload
  or setup message that is not ``bytes``, ``num-examples`` that is not a non-negative int, a
  ``train-loss`` or ``codec-*`` metric that is not a finite number, a codec metric name outside
  ``[A-Za-z0-9_.-]{1,64}``;
- a ``dropped`` answer to a message that asked for none (or the other way round).

A node that has not answered when the round closes (``round-timeout`` after the broadcast, or
``straggler-timeout`` after ``min-clients`` good answers) is *timed out*. Replies to messages this
round did not send are ignored (logged). Codec metrics keep their own names; the round record's
namespace is :func:`fedcodec.fl.loop.run_round`'s business, and nothing here writes a client-provided
name into the ServerApp's files.
"""

from __future__ import annotations

import logging
import math
import re
import time

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from ..fl.downlink import refusal_reason
from ..fl.loop import DROPPED, OK, TIMED_OUT, Reply, RoundPlan
from .common import (EVALUATE, METRICS, QUERY, RECORD, SIMULATE_DROPOUT, SIMULATE_NONE, SIMULATE_STRAGGLER, TRAIN,
                     FlowerSettings)

log = logging.getLogger("fedcodec.flower.server")


#: codec metric names a reply may carry (``codec-<name>``)
METRIC_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_SHORT = 80


def _short(value) -> str:
    """``repr(value)``, cut short: what a hostile node sent, fit for a log line."""
    text = repr(value)
    return text if len(text) <= _SHORT else text[:_SHORT] + "..."


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    """A finite int or float (never a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond the float range
        return False


def discover(grid: Grid, num_clients: int, wait: float, ignored: dict[int, str] | None = None) -> dict[int, int]:
    """Ask every connected SuperNode for its ``partition-id``; return ``{partition: node_id}``.

    Waits up to ``wait`` seconds for ``num_clients`` distinct partitions. Each partition is bound to
    the node that first claimed it (among nodes asked together, the lower node id); from then on only
    that node's replies count for that client (:class:`FlowerTransport`). A node is ignored, with the
    reason logged and put in ``ignored`` (``{node_id: reason}``), when it does not answer, answers
    with an error or garbage, reports a ``partition-id`` that is missing, not an integer or outside
    ``0..num_clients-1``, a ``num-partitions`` other than ``num_clients``, or a partition already bound.
    """
    ignored = {} if ignored is None else ignored
    deadline = time.monotonic() + wait
    asked: set[int] = set()
    holders: dict[int, int] = {}
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=QUERY) for n in new]
            problems: dict[int, str] = {}
            replies = collect(grid, msgs, len(msgs), max(deadline - time.monotonic(), 10.0), None, problems=problems)
            for i, (node, reply) in enumerate(zip(new, replies)):
                pid, why = (None, problems[i]) if i in problems else _partition_of(node, reply, num_clients)
                if why is None and pid in holders:
                    why = f"claims partition {pid}, which is bound to node {holders[pid]}"
                if why is not None:
                    log.warning("node %d ignored: %s", node, why)
                    ignored[node] = why
                    continue
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


def _partition_of(node: int, reply, num_clients: int) -> tuple[int | None, str | None]:
    """(partition id, None) from a node's answer to ``query``, or (None, why it is unusable)."""
    if reply is None:
        return None, "did not report its partition in time"
    if not isinstance(reply, Message):
        return None, f"answered with a {type(reply).__name__}, not a Message"
    if reply.has_error():
        return None, f"did not report its partition: {_error_text(reply)}"
    if reply.metadata.src_node_id != node:
        return None, f"the answer came from node {_short(reply.metadata.src_node_id)}"
    rec = reply.content.config_records.get(RECORD) if reply.has_content() else None
    if not isinstance(rec, ConfigRecord):
        return None, f"its answer holds no ConfigRecord {RECORD!r}"
    if "partition-id" not in rec:
        return None, "reported no partition-id"
    pid, num = rec["partition-id"], rec.get("num-partitions")
    if not _int(pid):
        return None, f"reported partition-id {_short(pid)}, not an integer"
    if not 0 <= pid < num_clients:
        return None, f"reported partition-id {_short(pid)}, outside 0..{num_clients - 1}"
    if num is not None and (not _int(num) or num != num_clients):
        return None, f"reported num-partitions={_short(num)}, the run has num-clients={num_clients}"
    return pid, None


def _error_text(reply: Message) -> str:
    err = reply.error
    return f"error {_short(err.code)}: {_short(err.reason)}"


def collect(grid: Grid, msgs: list[Message], quorum: int, timeout: float | None,
            straggler_timeout: float | None, poll: float = 0.25,
            problems: dict[int, str] | None = None) -> list[Message | None]:
    """Push ``msgs`` and pull their replies until all are in, ``timeout`` seconds have passed, or
    ``straggler_timeout`` seconds have passed since ``quorum`` good replies arrived. Returns the
    reply to each message, in order (``None``: none arrived). Replies are matched by the id of the
    message they answer: an error reply made by the SuperLink for a node it considers offline does
    not come from that node.

    ``problems`` (``{position: reason}``) gets the messages whose reply cannot be used whatever it
    says: the SuperLink did not accept the message, or it received more than one reply. Replies to
    messages this call did not send, and anything that is not a Message, are ignored (logged)."""
    problems = {} if problems is None else problems
    ids = list(grid.push_messages(msgs))
    if len(ids) == len(msgs):  # in order, None where a push failed (flwr's Grid contract)
        position = {mid: i for i, mid in enumerate(ids) if mid}
    else:  # the SuperLink refused the batch or part of it: the ids the grid wrote into the messages
        pushed = {mid for mid in ids if mid}
        position = {m.metadata.message_id: i for i, m in enumerate(msgs) if m.metadata.message_id in pushed}
    for i in sorted(set(range(len(msgs))) - set(position.values())):
        problems[i] = "the SuperLink did not accept the message"
    pending, got = set(position), {}
    start, quorum_at = time.monotonic(), None
    while pending:
        for reply in grid.pull_messages(list(pending)):
            if not isinstance(reply, Message):
                log.warning("ignored a pulled %s (not a Message)", type(reply).__name__)
                continue
            mid = reply.metadata.reply_to_message_id
            if mid not in position:
                log.warning("ignored a reply to message %s, which was not sent here (from node %s)", _short(mid),
                            _short(reply.metadata.src_node_id))
            elif mid in got:
                problems[position[mid]] = "more than one reply to the same message"
            else:
                got[mid] = reply
        pending -= set(got)
        now = time.monotonic()
        if quorum_at is None and sum(not r.has_error() for r in got.values()) >= quorum:
            quorum_at = now
        if not pending or (timeout is not None and now - start >= timeout) or (
                straggler_timeout is not None and quorum_at is not None and now - quorum_at >= straggler_timeout):
            break
        time.sleep(poll)
    out: list[Message | None] = [None] * len(msgs)
    for mid, i in position.items():
        out[i] = got.get(mid)
    return out


class FlowerTransport:
    """Exchanges a round's bytes with the SuperNodes in ``holders`` (``{partition: node id}``, see
    :func:`discover`): client ``c``'s broadcast goes to node ``holders[c]``, and only that node's reply,
    naming client ``c``, is taken as ``c``'s."""

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
        problems: dict[int, str] = {}
        answers = collect(self.grid, msgs, quorum, self.settings.round_timeout, self.settings.straggler_timeout,
                          problems=problems)
        replies = {}
        for i, (c, answer) in enumerate(zip(sent, answers)):
            if i in problems:
                reply = Reply(c, DROPPED, reason=problems[i])
            else:
                try:
                    reply = read_reply(c, answer, node=self.holders[c], late=c in plan.late,
                                       dropout=c in plan.dropout)
                except Exception as err:  # a reply nobody foresaw must not end the run
                    reply = Reply(c, DROPPED, reason=f"unreadable reply ({type(err).__name__}: {_short(str(err))})")
            if reply.status == DROPPED and reply.reason != "simulated dropout":
                log.warning("round %d: client %d (node %d) dropped: %s", plan.round, c, self.holders[c], reply.reason)
            replies[c] = reply
        return replies


def _record_of(client: int, answer, node: int | None) -> tuple[ConfigRecord | None, str | None]:
    """(the ``fedcodec`` ConfigRecord of ``answer``, None) or (None, why the answer is unusable): not a
    Message, an error, from another node than ``node`` (None: not checked), no content or record, or
    a record naming another client. ``answer`` is not None."""
    if not isinstance(answer, Message):
        return None, f"the reply is a {type(answer).__name__}, not a Message"
    if answer.has_error():
        return None, _error_text(answer)
    src = answer.metadata.src_node_id
    if node is not None and src != node:
        return None, f"the reply came from node {_short(src)}; partition {client} is bound to node {node}"
    if not answer.has_content():
        return None, "the reply has neither content nor an error"
    rec = answer.content.config_records.get(RECORD)
    if not isinstance(rec, ConfigRecord):
        return None, f"the reply holds no ConfigRecord {RECORD!r}"
    if rec.get("client") != client or not _int(rec.get("client")):
        return None, f"the reply names client {_short(rec.get('client'))}"
    return rec, None


def _refusal(rec: ConfigRecord) -> tuple[str | None, str | None]:
    """(the recorded reason, None) of a ``refused-broadcast`` answer, or (None, why it is malformed)."""
    tag, detail = rec["refused-broadcast"], rec.get("detail", "")
    if not (isinstance(tag, str) and isinstance(detail, str)):
        return None, f"refused-broadcast {_short(tag)} / detail {_short(detail)}: not strings"
    return refusal_reason(tag[:40], detail), None


def read_reply(client: int, answer: Message | None, node: int | None = None, late: bool = False,
               dropout: bool = False) -> Reply:
    """A ClientApp's answer to client ``client``'s train message as a :class:`Reply`, never trusting
    its types. ``node``: the node the partition is bound to (None: not checked); ``late``: the
    message asked for a simulated straggler, ``dropout``: for a simulated dropout. Anything malformed
    gives status DROPPED with a reason (see the module docstring)."""

    def bad(why: str) -> Reply:
        return Reply(client, DROPPED, reason=why)

    if answer is None:
        return Reply(client, TIMED_OUT, reason="no reply before the round's deadline")
    rec, why = _record_of(client, answer, node)
    if why is not None:
        return bad(why)
    content = answer.content
    if "refused-broadcast" in rec:  # the client could not take in its broadcast; its copy is as it was
        reason, why = _refusal(rec)
        return bad(why) if why is not None else Reply(client, DROPPED, reason=reason, resync=True)
    if "dropped" in rec:
        if rec["dropped"] is not True:
            return bad(f"dropped={_short(rec['dropped'])}")
        return Reply(client, DROPPED, reason="simulated dropout") if dropout else bad(
            "answered 'dropped' to a message that asked for no simulated dropout")
    if dropout:
        return bad("answered a simulated dropout's message as if it had trained")
    payload, setup = rec.get("payload"), rec.get("setup")
    if not isinstance(payload, bytes):
        return bad("no payload" if payload is None else f"the payload is a {type(payload).__name__}, not bytes")
    if setup is not None and not isinstance(setup, bytes):
        return bad(f"the setup message is a {type(setup).__name__}, not bytes")
    metrics = content.metric_records.get(METRICS)
    if not isinstance(metrics, MetricRecord):
        return bad(f"the reply holds no MetricRecord {METRICS!r}")
    examples = metrics.get("num-examples")
    if not _int(examples) or examples < 0:
        return bad(f"num-examples={_short(examples)}, not a non-negative integer")
    loss = metrics.get("train-loss", math.nan)  # absent: the honest client's loss was not finite
    if "train-loss" in metrics and not _number(loss):
        return bad(f"train-loss={_short(loss)}, not a finite number")
    codec: dict[str, float] = {}
    for key, value in metrics.items():
        if not key.startswith("codec-"):
            continue
        name = key[len("codec-"):]
        if not METRIC_NAME.fullmatch(name):
            return bad(f"codec metric name {_short(name)} is not 1..64 of [A-Za-z0-9_.-]")
        if not _number(value):
            return bad(f"codec metric {name}={_short(value)}, not a finite number")
        codec[name] = float(value)
    return Reply(client, TIMED_OUT if late else OK, payload=payload, setup=setup, num_examples=examples,
                 train_loss=float(loss), metrics=codec, reason="simulated straggler" if late else "")


def evaluate_on_nodes(grid: Grid, sim, state, holders: dict[int, int],
                      settings: FlowerSettings) -> tuple[dict[int, dict], dict[int, str], int]:
    """The final evaluation of a learned-compression run (run config ``neural``): every client a
    node holds gets the final shared tensors as an ``evaluate`` message (encoded by the run's
    downlink, as round ``state.round + 1``'s broadcast) and answers with the numbers of
    :func:`fedcodec.neural.deploy.evaluate_client`. Returns ``({client: point}, {client: why it
    failed}, downlink bytes sent)``. Replies are untrusted like train replies: an error, a missing or
    mistyped field, a reply from another node or naming another client, a number that is not finite
    and non-negative, or a test-set size other than the client's fails that client (logged), never the run."""
    from ..neural.deploy import check_point

    targets = sorted(c for c in range(sim.cfg.num_clients) if c in holders)
    round_num = state.round + 1
    down, _ = sim.runtime.downlink.send(state.global_params, round_num, targets, state.server_states)
    msgs = [Message(RecordDict({RECORD: ConfigRecord({"broadcast": down[c], "round": round_num, "client": c})}),
                    dst_node_id=holders[c], message_type=EVALUATE, group_id="evaluate") for c in targets]
    problems: dict[int, str] = {}
    answers = collect(grid, msgs, len(msgs), settings.round_timeout, None, problems=problems)
    points: dict[int, dict] = {}
    failed: dict[int, str] = {c: "no SuperNode holds this partition" for c in range(sim.cfg.num_clients)
                              if c not in holders}
    for i, (c, answer) in enumerate(zip(targets, answers)):
        why = problems.get(i)
        if why is None:
            try:
                point, why = _evaluation_of(c, answer, holders[c], len(sim.runtime.task.test[c]), check_point)
            except Exception as err:  # a reply nobody foresaw must not end the run
                point, why = None, f"unreadable reply ({type(err).__name__}: {_short(str(err))})"
        if why is None:
            points[c] = point
        else:
            log.warning("evaluation: client %d (node %d) left out: %s", c, holders[c], why)
            failed[c] = why
    return points, dict(sorted(failed.items())), sum(len(b) for b in down.values())


def _evaluation_of(client: int, answer, node: int, examples: int, check_point) -> tuple[dict | None, str | None]:
    if answer is None:
        return None, "no reply before the deadline"
    rec, why = _record_of(client, answer, node)
    if why is not None:
        return None, why
    if "refused-broadcast" in rec:
        reason, why = _refusal(rec)
        return None, why or reason
    metrics = answer.content.metric_records.get(METRICS)
    if not isinstance(metrics, MetricRecord):
        return None, f"the reply holds no MetricRecord {METRICS!r}"
    return check_point(metrics, examples)
