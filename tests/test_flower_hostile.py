"""The Flower ServerApp against broken or hostile SuperNodes (fedcodec.flower.transport).

Most tests use a fake Grid (:class:`FakeGrid`: the Grid methods the transport calls, with messages
handed to Python callables) and, for the end-to-end ones, the real ClientApp functions with an
in-memory Context per node, so no process is started. One loopback test runs a real federation in
which one SuperNode answers garbage every round.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.config import parse_config_args
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcodec.config import Config
from fedcodec.fl.downlink import FULL, PREFIX, RESYNC, STEP
from fedcodec.fl.loop import DROPPED, OK, TIMED_OUT, InProcessTransport, Reply, run_round
from fedcodec.fl.simulation import setup
from fedcodec.flower import client_app
from fedcodec.flower.common import METRICS, QUERY, RECORD, TRAIN, FlowerSettings, run_config_items
from fedcodec.flower.transport import FlowerTransport, collect, discover, read_reply
from test_engine import SOURCE


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are made outside a Flower task here: give the process the identity Flower would."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_ids = itertools.count()


def sent(node: int, client: int = 0, round_num: int = 1, message_type: str = TRAIN) -> Message:
    """A message as the SuperLink holds it once pushed (it has an id)."""
    msg = Message(RecordDict({RECORD: ConfigRecord({"client": client, "round": round_num})}), dst_node_id=node,
                  message_type=message_type)
    msg.metadata.__dict__["_message_id"] = f"m{next(_ids)}"
    return msg


def answer(msg: Message, rec: dict | None = None, metrics: dict | None = None, src: int | None = None,
           content: RecordDict | None = None) -> Message:
    if content is None:
        content = RecordDict({} if rec is None else {RECORD: ConfigRecord(rec)})
        if metrics is not None:
            content[METRICS] = MetricRecord(metrics)
    reply = Message(content, reply_to=msg)
    if src is not None:  # a forged or misrouted sender
        reply.metadata.__dict__["_src_node_id"] = src
    return reply


class FakeGrid:
    """The Grid methods FlowerTransport and discover use. ``nodes``: ``{node_id: handler}``; a handler
    takes the pushed Message and returns its reply, a list of replies (duplicates), or None (silence).
    ``junk`` is returned with the next pull (replies to messages nobody sent, non-Messages)."""

    def __init__(self, nodes: dict, later: dict | None = None):
        self.nodes, self.later, self.outbox, self.junk, self.calls = dict(nodes), dict(later or {}), {}, [], 0

    def get_node_ids(self):
        self.calls += 1
        if self.calls > 1:  # nodes that connect after the first look
            self.nodes.update(self.later)
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"m{next(_ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            out = self.nodes[msg.metadata.dst_node_id](msg)
            self.outbox[mid] = [] if out is None else out if isinstance(out, list) else [out]
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        got = [r for mid in message_ids for r in self.outbox.pop(mid, [])]
        got, self.junk = got + self.junk, []
        return got


HONEST = dict(rec={"payload": b"\x01\x02", "client": 0}, metrics={"num-examples": 5, "train-loss": 0.5})


def honest(msg, **kw):
    return answer(msg, **{**HONEST, **kw})


# -- read_reply --------------------------------------------------------------------------------


def test_an_honest_reply_is_read_whole():
    msg = sent(7)
    reply = read_reply(0, answer(msg, {"payload": b"ab", "client": 0, "setup": b"s"},
                                 {"num-examples": 5, "train-loss": 0.25, "codec-ae_error": 0.5}), node=7)
    assert (reply.status, reply.payload, reply.setup, reply.num_examples, reply.train_loss, reply.metrics) == (
        OK, b"ab", b"s", 5, 0.25, {"ae_error": 0.5})
    assert read_reply(0, honest(msg), node=7, late=True).status == TIMED_OUT
    assert math.isnan(read_reply(0, answer(msg, HONEST["rec"], {"num-examples": 5}), node=7).train_loss)
    assert read_reply(0, None, node=7).status == TIMED_OUT
    dropout = read_reply(0, answer(msg, {"dropped": True, "client": 0}), node=7, dropout=True)
    assert (dropout.status, dropout.reason) == (DROPPED, "simulated dropout")


BAD_REPLIES = {
    "error reply": (lambda m: Message(Error(code=5, reason="x" * 5000), reply_to=m), "error 5: 'xxx"),
    "not a Message": (lambda m: {"payload": b"x"}, "not a Message"),
    "another node": (lambda m: honest(m, src=99), "came from node 99; partition 0 is bound to node 7"),
    "no record": (lambda m: answer(m, metrics=HONEST["metrics"]), "no ConfigRecord 'fedcodec'"),
    "record of the wrong type": (lambda m: answer(m, content=RecordDict({RECORD: MetricRecord({"client": 0})})),
                                 "no ConfigRecord 'fedcodec'"),
    "another client": (lambda m: honest(m, rec={"payload": b"x", "client": 1}), "names client 1"),
    "client as a string": (lambda m: honest(m, rec={"payload": b"x", "client": "0"}), "names client '0'"),
    "client as a bool": (lambda m: honest(m, rec={"payload": b"x", "client": False}), "names client False"),
    "payload not bytes": (lambda m: honest(m, rec={"payload": "text", "client": 0}), "payload is a str, not bytes"),
    "no payload": (lambda m: honest(m, rec={"client": 0}), "no payload"),
    "setup not bytes": (lambda m: honest(m, rec={"payload": b"x", "setup": 3, "client": 0}),
                        "setup message is a int"),
    "no metrics": (lambda m: answer(m, HONEST["rec"]), "no MetricRecord 'metrics'"),
    "examples missing": (lambda m: honest(m, metrics={"train-loss": 1.0}), "num-examples=None"),
    "examples float": (lambda m: honest(m, metrics={"num-examples": 5.0}), "num-examples=5.0"),
    "examples negative": (lambda m: honest(m, metrics={"num-examples": -1}), "num-examples=-1"),
    "examples list": (lambda m: honest(m, metrics={"num-examples": [1, 2]}), "num-examples=[1, 2]"),
    "loss inf": (lambda m: honest(m, metrics={"num-examples": 5, "train-loss": math.inf}), "train-loss=inf"),
    "loss nan": (lambda m: honest(m, metrics={"num-examples": 5, "train-loss": math.nan}), "train-loss=nan"),
    "loss list": (lambda m: honest(m, metrics={"num-examples": 5, "train-loss": [0.5]}), "train-loss=[0.5]"),
    "codec metric nan": (lambda m: honest(m, metrics={"num-examples": 5, "codec-x": math.nan}),
                         "codec metric x=nan"),
    "codec metric name": (lambda m: honest(m, metrics={"num-examples": 5, "codec-a b": 1.0}),
                          "codec metric name 'a b'"),
    "uninvited dropout": (lambda m: answer(m, {"dropped": True, "client": 0}), "asked for no simulated dropout"),
    "dropped not True": (lambda m: answer(m, {"dropped": 1, "client": 0}), "dropped=1"),
    "refusal not strings": (lambda m: answer(m, {"refused-broadcast": 3, "client": 0}), "not strings"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_bad_reply_drops_that_client_with_a_reason(case):
    make, why = BAD_REPLIES[case]
    reply = read_reply(0, make(sent(7)), node=7)
    assert reply.status == DROPPED and why in reply.reason, reply.reason
    assert reply.payload is None and not reply.resync
    assert len(reply.reason) < 400


def test_a_simulated_dropout_that_trains_anyway_is_dropped_and_its_bytes_ignored():
    reply = read_reply(0, honest(sent(7)), node=7, dropout=True)
    assert reply.status == DROPPED and "as if it had trained" in reply.reason and reply.payload is None


def test_a_refused_broadcast_asks_for_a_full_resend():
    reply = read_reply(0, answer(sent(7), {"refused-broadcast": "out-of-sync", "detail": "d" * 2000, "client": 0}),
                       node=7, late=True)
    assert reply.status == DROPPED and reply.resync
    assert reply.reason.startswith("downlink out of sync (out-of-sync): ddd") and len(reply.reason) < 400


scalars = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(), st.text(max_size=8),
                    st.binary(max_size=8))
config_values = st.one_of(scalars, st.lists(st.integers(-5, 5), max_size=3), st.lists(st.text(max_size=3), max_size=3))
metric_values = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.lists(st.floats(), max_size=3))
keys = st.sampled_from(["payload", "client", "setup", "dropped", "refused-broadcast", "detail", "x"])
metric_keys = st.sampled_from(["num-examples", "train-loss", "codec-a", "codec-", "codec-b c", "y"])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rec=st.one_of(st.none(), st.dictionaries(keys, config_values, max_size=6)),
       metrics=st.one_of(st.none(), st.dictionaries(metric_keys, metric_values, max_size=6)),
       late=st.booleans(), dropout=st.booleans(), src=st.sampled_from([7, 8]))
def test_read_reply_never_raises_and_only_accepts_well_formed_replies(rec, metrics, late, dropout, src):
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    reply = read_reply(0, answer(sent(7), rec, metrics, src=src), node=7, late=late, dropout=dropout)
    assert reply.status in (OK, DROPPED, TIMED_OUT) and isinstance(reply.reason, str)
    if reply.status != DROPPED:
        assert src == 7 and not dropout and rec["client"] == 0 and type(rec["client"]) is int
        assert isinstance(reply.payload, bytes) and (reply.setup is None or isinstance(reply.setup, bytes))
        assert type(reply.num_examples) is int and reply.num_examples >= 0
        assert all(math.isfinite(v) for v in reply.metrics.values())
        assert math.isnan(reply.train_loss) or math.isfinite(reply.train_loss)


# -- discover and collect ----------------------------------------------------------------------


def query_node(pid=None, num=None, *, missing=False, src=None):
    def handler(msg):
        rec = {} if missing else {"partition-id": pid}
        if num is not None:
            rec["num-partitions"] = num
        return answer(msg, rec, src=src)
    return handler


def test_discover_binds_each_partition_to_its_first_claimant_and_ignores_bad_nodes(caplog):
    nodes = {10: query_node(0), 23: query_node(1), 5: query_node(2, 4),
             11: query_node("3"), 12: query_node(3.5), 13: query_node(True), 14: query_node(2**62),
             15: query_node(-1), 16: query_node(missing=True), 17: query_node(0), 18: query_node(3, 5),
             19: query_node(3, src=23), 20: lambda m: Message(Error(code=1, reason="boom"), reply_to=m),
             21: lambda m: answer(m, content=RecordDict({RECORD: MetricRecord({"partition-id": 3})}))}
    grid = FakeGrid(nodes, later={2: query_node(0), 30: query_node(1, 4)})  # early ids, but late
    ignored: dict[int, str] = {}
    with caplog.at_level(logging.WARNING, logger="fedcodec.flower.server"):
        holders = discover(grid, 4, wait=1.0, ignored=ignored)
    assert holders == {0: 10, 1: 23, 2: 5}
    expect = {11: "partition-id '3', not an integer", 12: "partition-id 3.5, not an integer",
              13: "partition-id True, not an integer", 14: "outside 0..3", 15: "outside 0..3",
              16: "reported no partition-id", 17: "partition 0, which is bound to node 10",
              18: "num-partitions=5, the run has num-clients=4", 19: "came from node 23",
              20: "error 1: 'boom'", 21: "no ConfigRecord", 2: "bound to node 10", 30: "bound to node 23"}
    assert set(ignored) == set(expect)
    for node, why in expect.items():
        assert why in ignored[node], (node, ignored[node])
        assert f"node {node} ignored" in caplog.text


def test_collect_flags_duplicates_and_unpushed_messages_and_ignores_strangers(caplog):
    class Partial(FakeGrid):
        def push_messages(self, messages):
            ids = list(super().push_messages(messages))
            ids[1] = None  # the SuperLink refused this one
            return ids

    grid = Partial({1: lambda m: [honest(m), honest(m)], 2: honest, 3: honest})
    stranger = sent(3)
    grid.junk = [honest(stranger), "junk"]
    msgs = [sent(n) for n in (1, 2, 3)]
    problems: dict[int, str] = {}
    with caplog.at_level(logging.WARNING, logger="fedcodec.flower.server"):
        out = collect(grid, msgs, 1, 5.0, None, problems=problems)
    assert problems == {0: "more than one reply to the same message", 1: "the SuperLink did not accept the message"}
    assert out[1] is None and out[2] is not None
    assert "which was not sent here" in caplog.text and "(not a Message)" in caplog.text


# -- whole rounds over the fake grid with the real ClientApp -----------------------------------


class Node:
    """A SuperNode of the fake grid: the real ClientApp functions, its own Context (state kept
    between messages as on a SuperNode); an exception becomes an error reply, as Flower does."""

    def __init__(self, node_id: int, pid: int, cfg: Config, extra: dict | None = None):
        keys = ("method", "dataset", "num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size",
                "seed", "threads", "downlink", "downlink_delta")
        items = {k: getattr(cfg, k) for k in keys}
        items["downlink_options"] = " ".join(f"{k}={v}" for k, v in cfg.downlink_options.items())
        run_config = parse_config_args([" ".join(run_config_items(items))])
        self.context = Context(run_id=1, node_id=node_id, node_config={"partition-id": pid,
                                                                        "num-partitions": cfg.num_clients,
                                                                        **(extra or {})},
                               state=RecordDict(), run_config=run_config)

    def __call__(self, msg: Message) -> Message:
        fn = client_app.query if msg.metadata.message_type == QUERY else client_app.train
        try:
            return fn(msg, self.context)
        except Exception as err:  # noqa: BLE001 (Flower's ClientApp runner does the same)
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def replica(self) -> dict[str, torch.Tensor]:
        store = self.context.state[client_app.STATE].to_torch_state_dict()
        return {k: v for k, v in store.items() if k.startswith(PREFIX)}


def fake_federation(cfg: Config, monkeypatch, extra: dict[int, dict] | None = None):
    monkeypatch.setattr("fedcodec.data.load_dataset", lambda *a, **k: SOURCE)  # the ClientApp's data
    monkeypatch.setattr(client_app, "ensure_logging", lambda: None)  # keep pytest's log capture working
    client_app._CACHE.clear()
    nodes = {100 + p: Node(100 + p, p, cfg, (extra or {}).get(p)) for p in range(cfg.num_clients)}
    grid = FakeGrid(nodes)
    holders = discover(grid, cfg.num_clients, 5.0)
    assert holders == {p: 100 + p for p in range(cfg.num_clients)}
    return grid, nodes, FlowerTransport(grid, holders, FlowerSettings(), cfg.min_clients)


def hostile_config(**kw) -> Config:
    base = dict(method="fedavg", dataset="synthetic", num_clients=3, clients_per_round=3, rounds=3, local_epochs=1,
                batch_size=16, seed=5, threads=1)
    return Config(**{**base, **kw}).validate()


def strip(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def rows(state):
    return [(e.round, e.client, e.direction, e.codec, e.nbytes) for e in state.ledger.entries]


class DroppingClient(InProcessTransport):
    """The in-process run in which ``client`` fails every round with ``reasons[round]``."""

    def __init__(self, sim, client, reasons):
        super().__init__(sim)
        self.client, self.reasons = client, reasons

    def exchange(self, plan, state):
        replies = super().exchange(plan, state)
        replies[self.client] = Reply(self.client, DROPPED, reason=self.reasons[plan.round])
        return replies


def test_a_node_answering_garbage_is_dropped_every_round_and_the_run_matches_in_process(monkeypatch, one_thread):
    cfg = hostile_config()
    grid, nodes, transport = fake_federation(cfg, monkeypatch, extra={1: {client_app.TEST_GARBAGE: True}})
    sim, state = setup(cfg, SOURCE)
    reports = []
    for _ in range(cfg.rounds):
        state = run_round(sim, state, transport, callbacks=(lambda st, rep: reports.append(rep),))
    reasons = {rep.plan.round: rep.inbox.dropped[1] for rep in reports}
    assert all(set(rep.inbox.dropped) == {1} and len(rep.outcome.accepted) == 2 for rep in reports)
    assert "names client 2" in reasons[1] and "train-loss=inf" in reasons[2] and "no ConfigRecord" in reasons[3]
    ref_sim, ref = setup(cfg, SOURCE)
    for _ in range(cfg.rounds):
        ref = run_round(ref_sim, ref, DroppingClient(ref_sim, 1, reasons))
    assert strip(state.records) == strip(ref.records) and rows(state) == rows(ref)
    assert all(torch.equal(state.global_params[k], ref.global_params[k]) for k in ref.global_params)


def test_a_node_whose_replica_was_corrupted_recovers_through_a_full_resend(monkeypatch, one_thread):
    """Delta downlink on the fake grid with the real ClientApp: node 1's stored copy of the model is
    corrupted after round 1; it refuses round 2's step (state untouched), the server sends it the
    whole model in round 3, and from then on its copy is the server's replica bit for bit. Records,
    ledger and model equal the in-process run with the same corruption."""
    cfg = hostile_config(downlink="qsgd", downlink_options={"levels": 255}, downlink_delta=True)
    grid, nodes, transport = fake_federation(cfg, monkeypatch)
    sim, state = setup(cfg, SOURCE)
    ref_sim, ref = setup(cfg, SOURCE)
    name = sim.spec.tensors[0].name

    def corrupt(store):
        store = dict(store)
        store[PREFIX + name] = store[PREFIX + name].clone()
        store[PREFIX + name].view(-1)[0] += 1.0
        return store

    reports = []
    keep = (lambda st, rep: reports.append(rep),)
    state = run_round(sim, state, transport, keep)
    ref = run_round(ref_sim, ref, InProcessTransport(ref_sim))
    ctx = nodes[101].context
    ctx.state[client_app.STATE] = ArrayRecord(torch_state_dict=corrupt(ctx.state[client_app.STATE]
                                                                       .to_torch_state_dict()))
    ref.client_states[1] = corrupt(ref.client_states[1])
    held = nodes[101].replica()
    state = run_round(sim, state, transport, keep)
    assert reports[-1].replies[1].resync and reports[-1].inbox.dropped[1].startswith(
        "downlink out of sync (out-of-sync): the step was made for a copy")
    assert all(torch.equal(v, held[k]) for k, v in nodes[101].replica().items())  # refused: untouched
    assert RESYNC in state.server_states[1]
    state = run_round(sim, state, transport, keep)
    assert reports[-1].plan.broadcasts[1][0] == FULL and reports[-1].plan.broadcasts[0][0] == STEP
    assert len(reports[-1].outcome.accepted) == 3
    for p, node in nodes.items():
        server = {k: v for k, v in state.server_states[p - 100].items() if k.startswith(PREFIX)}
        mine = node.replica()
        assert mine.keys() == server.keys() and all(torch.equal(mine[k], server[k]) for k in mine), p
    for _ in range(2):
        ref = run_round(ref_sim, ref, InProcessTransport(ref_sim))
    assert strip(state.records) == strip(ref.records) and rows(state) == rows(ref)
    assert all(torch.equal(state.global_params[k], ref.global_params[k]) for k in ref.global_params)


# -- one real federation -----------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process control uses /proc")
def test_loopback_run_completes_with_a_supernode_answering_garbage(tmp_path, monkeypatch):
    """Three SuperNodes on loopback; the one holding partition 1 answers every train message with a
    malformed reply. The run completes, partition 1 is dropped every round with the defect named,
    and the model is the in-process one without client 1's updates."""
    from fedcodec.flower.launch import LocalFederation, processes_with_home
    from test_flower import RUN_TIMEOUT, _alive, assert_same_model, load_outputs, make_config, reference

    cfg = make_config(rounds=3)
    out = tmp_path / "out"
    keys = ("method", "dataset", "num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "seed",
            "threads")
    items = run_config_items({k: getattr(cfg, k) for k in keys} | {"out_dir": str(out), "node_wait": 60.0})
    fed = LocalFederation(cfg.num_clients, workdir=tmp_path / "flwr", insecure=True,
                          node_configs={1: f"{client_app.TEST_GARBAGE}=true"})
    seen: set[int] = set()
    try:
        fed.start()
        result = fed.run(items, timeout=RUN_TIMEOUT)
        seen = fed.pids()
    finally:
        fed.stop()
    time.sleep(0.2)
    assert not (processes_with_home(fed.home) | {p for p in seen if _alive(p)})
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(fed.logs.iterdir()))
    assert result.ok and result.status == "finished:completed", f"{result}\n{logs}"
    metrics, events, model, ledger = load_outputs(out)
    assert [(r["round"], r["accepted"], r["dropped"]) for r in metrics["rounds"]] == [(1, 2, 1), (2, 2, 1), (3, 2, 1)]
    reasons = [ev["dropped"] for ev in events["rounds"]]
    assert all(set(r) == {"1"} for r in reasons)
    assert "names client 2" in reasons[0]["1"] and "train-loss=inf" in reasons[1]["1"]
    assert "no ConfigRecord" in reasons[2]["1"]
    assert "client 1 (node" in result.output and "dropped: the reply names client 2" in result.output
    assert not any(c == 1 for _, c, d, _, _ in ledger if d == "up")
    _, state, _ = reference(cfg, monkeypatch, drop_from=(1, 1))
    assert_same_model(model, state.global_params)
