"""fedcodec inside an ordinary Flower app (examples/flower-quickstart*): codec_mod, CompressedStrategy,
compressed_training and the bandwidth ledger.

Most tests run the example's own ServerApp ``main`` and ClientApp in this process through
:class:`flower_grid.InProcessGrid` (every message crosses a protobuf round trip, as on the wire); two run
the example with ``flwr run``: on Flower's simulation engine and on a loopback SuperLink with SuperNodes.
"""

from __future__ import annotations

import csv
import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch

import flwr  # noqa: F401  (the suite needs the 'flower' extra: fail loudly, never skip)
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcodec.errors import ConfigError  # noqa: E402
from fedcodec.flower import CompressedStrategy, codec_mod  # noqa: E402
from fedcodec.flower.local import InProcessGrid  # noqa: E402
from fedcodec.flower.protocol import RECORD, Layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLAIN, FEDCODEC = ROOT / "examples" / "flower-quickstart", ROOT / "examples" / "flower-quickstart-fedcodec"
DATA = "/usr/share/datasets/fashion-mnist"
NODES = 3
BASE = {"num-server-rounds": 2, "fraction-train": 1.0, "local-epochs": 1, "lr": 0.05, "batch-size": 32,
        "examples-per-node": 64, "data-dir": DATA}


def load_app(app_dir: Path):
    """The example's (client_app, server_app, task) modules, imported afresh (both apps name their
    package ``quickstart``)."""
    for name in [m for m in sys.modules if m == "quickstart" or m.startswith("quickstart.")]:
        del sys.modules[name]
    sys.path.insert(0, str(app_dir))
    try:
        return tuple(importlib.import_module(f"quickstart.{m}") for m in ("client_app", "server_app", "task"))
    finally:
        sys.path.remove(str(app_dir))


def run_app(tmp_path, monkeypatch, app_dir: Path, client_dir: Path | None = None, tamper=None, **config):
    """Run the example's ServerApp with ``config`` over an in-process grid of NODES nodes (ClientApp from
    ``client_dir``, default the same app). Returns (final model, ledger rows, grid, sent payloads
    ``{(round, node): bytes}`` as the nodes sent them)."""
    cfg = {**BASE, **config}
    client_app = load_app(client_dir or app_dir)[0].app
    _, server, _ = load_app(app_dir)
    sent: dict[tuple[int, int], object] = {}
    rounds = {}

    def spy(node, reply):  # train replies only
        if not (reply.has_content() and RECORD in reply.content):
            return reply
        rounds[node] = rounds.get(node, 0) + 1
        sent[rounds[node], node] = reply.content[RECORD]["payload"]
        return tamper(node, reply) if tamper is not None else reply

    grid = InProcessGrid(client_app, NODES, cfg, tamper=spy)
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        server.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    finally:
        torch.set_num_threads(threads)
    model = torch.load(tmp_path / "final_model.pt", weights_only=True)
    ledger = list(csv.DictReader((tmp_path / "bandwidth.csv").open())) if (tmp_path / "bandwidth.csv").exists() else []
    return model, ledger, grid, sent


def accuracy(model_state) -> float:
    _, _, task = load_app(PLAIN)
    net = task.Net()
    net.load_state_dict(model_state)
    _, test = task.load_data(0, 1, 500, DATA, 2000)
    return task.test(net, test, "cpu")[1]


def up_rows(ledger, status="ok"):
    return [r for r in ledger if r["direction"] == "up" and r["status"] == status]


def test_lossless_codec_gives_the_unmodified_apps_model(tmp_path, monkeypatch):
    """The example with the mod, the wrapper and ``fp32`` ends with the model of the example as is,
    bit for bit, and its nodes send the codec's bytes, not Flower arrays: the pinned payload length,
    and the reply on the wire is that plus under 1 kB of message framing."""
    plain, _, plain_grid, _ = run_app(tmp_path / "plain", monkeypatch, PLAIN)
    coded, ledger, grid, sent = run_app(tmp_path / "coded", monkeypatch, FEDCODEC, codec="fp32", **{"codec-options": ""})
    assert list(coded) == list(plain)
    assert all(torch.equal(coded[k], plain[k]) for k in plain)
    rows = up_rows(ledger)
    assert len(rows) == NODES * BASE["num-server-rounds"]
    assert {int(r["bytes"]) for r in rows} == {177_730}  # 44,426 float32 values + 26-byte envelope
    assert {int(r["uncompressed"]) for r in rows} == {178_984}  # the ArrayRecord Flower sends for them
    assert sorted(len(p) for p in sent.values()) == [177_730] * len(rows)
    plain_up = [s for n, d, k, s in plain_grid.sizes if d == "up" and k == "train"]
    coded_up = [s for n, d, k, s in grid.sizes if d == "up" and k == "train"]
    assert all(0 < s - 177_730 < 1000 for s in coded_up) and min(plain_up) > 178_984
    rounds = list(csv.DictReader((tmp_path / "coded" / "bandwidth-rounds.csv").open()))
    assert [(r["round"], r["up_messages"], r["up_bytes"], r["refused"]) for r in rounds] == \
        [("1", "3", str(3 * 177_730), "0"), ("2", "3", str(3 * 177_730), "0")]
    assert float(rounds[0]["up_ratio"]) == pytest.approx(178_984 / 177_730)


def test_mod_alone_changes_nothing(tmp_path, monkeypatch):
    """A ClientApp with codec_mod answering an unwrapped strategy passes every message through."""
    plain, *_ = run_app(tmp_path / "plain", monkeypatch, PLAIN)
    mixed, *_ = run_app(tmp_path / "mixed", monkeypatch, PLAIN, client_dir=FEDCODEC,
                        codec="qsgd", **{"codec-options": ""})
    assert all(torch.equal(mixed[k], plain[k]) for k in plain)


def test_ef_signsgd_payloads_and_learning(tmp_path, monkeypatch):
    """EF-signSGD (memory in each node's context.state): 27x smaller replies of a pinned length, and the
    model still learns (well above the initial model's 10% accuracy)."""
    model, ledger, grid, sent = run_app(tmp_path, monkeypatch, FEDCODEC, codec="signsgd",
                                        **{"codec-options": "ef=true", "num-server-rounds": 3, "local-epochs": 3,
                                           "examples-per-node": 100})
    rows = up_rows(ledger)
    assert {int(r["bytes"]) for r in rows} == {6_517}  # 44,190 sign bits, 5 fp32 scales, 236 fp32 biases, envelope
    assert all("fedcodec.ef" in ctx.state for ctx in grid.contexts.values())
    start = accuracy(load_app(PLAIN)[2].Net().state_dict())
    assert start < 0.15
    assert accuracy(model) > 0.2


def test_fedmrn_in_the_apps_own_training_loop(tmp_path, monkeypatch):
    """compressed_training turns the app's own SGD loop into FedMRN: 1-bit masks + seed on the wire
    (pinned length), the model's parameters and state_dict order restored after the block, and a
    payload replayed in the next round is refused (its seed is bound to the round and node)."""
    replayed = {}

    def replay(node, reply):
        if node == 102:
            payload = reply.content[RECORD]["payload"]
            if "old" in replayed:
                reply.content[RECORD] = ConfigRecord({"payload": replayed["old"], "arrays-key": "arrays"})
            replayed["old"] = payload
        return reply

    model, ledger, grid, sent = run_app(tmp_path, monkeypatch, FEDCODEC, tamper=replay, codec="fedmrn",
                                        **{"codec-options": ""})
    ok = up_rows(ledger)
    assert {int(r["bytes"]) for r in ok} == {6_510}  # 44,190 mask bits, seed/kinds/alpha, 236 fp32 biases, envelope
    assert len(ok) == NODES * 2 - 1
    refused = up_rows(ledger, "rejected")
    assert [(r["round"], r["node"]) for r in refused] == [("2", "102")]
    assert "binding" in refused[0]["reason"]
    assert list(model) == list(load_app(PLAIN)[2].Net().state_dict())


def test_garbage_replies_are_refused_and_the_round_goes_on(tmp_path, monkeypatch):
    """A node whose replies are flipped bytes, then the wrong type, then missing, is refused each round
    with the reason in the ledger; the other nodes' updates are aggregated."""
    defects = iter(["flip", "type", "missing"])

    def garbage(node, reply):
        if node != 103:
            return reply
        kind = next(defects)
        record = reply.content[RECORD]
        if kind == "flip":
            data = bytearray(record["payload"])
            data[len(data) // 2] ^= 0xFF
            reply.content[RECORD] = ConfigRecord({"payload": bytes(data), "arrays-key": "arrays"})
        elif kind == "type":
            reply.content[RECORD] = ConfigRecord({"payload": "not bytes", "arrays-key": "arrays"})
        else:
            del reply.content[RECORD]
        return reply

    model, ledger, _, _ = run_app(tmp_path, monkeypatch, FEDCODEC, tamper=garbage, codec="qsgd",
                                  **{"codec-options": "levels=16", "num-server-rounds": 3})
    refused = up_rows(ledger, "rejected")
    assert [(r["round"], r["node"]) for r in refused] == [("1", "103"), ("2", "103"), ("3", "103")]
    assert "checksum" in refused[0]["reason"] and "not bytes" in refused[1]["reason"]
    assert "codec_mod" in refused[2]["reason"]
    assert len(up_rows(ledger)) == 6
    assert all(torch.isfinite(v).all() for v in model.values())


def test_delta_downlink_through_the_wrapper(tmp_path, monkeypatch):
    """A compressed downlink (8-bit QSGD of the change of each node's copy): the first broadcast to a
    node is the whole model in fp32, later ones under a third of the Flower arrays' bytes, and each node's
    copy lives in its context.state."""
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    client, _, task = load_app(FEDCODEC)
    grid = InProcessGrid(client.app, NODES, {**BASE, "codec": "qsgd", "codec-options": "levels=16"})
    strategy = CompressedStrategy(FedAvg(fraction_train=1.0), "qsgd", "levels=16", downlink="qsgd",
                                  downlink_options="levels=255", downlink_delta=True)
    torch.manual_seed(0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(task.Net().state_dict()),
                            train_config=ConfigRecord({"lr": 0.05}), num_rounds=2)
    down = [r for r in strategy.ledger.rows if r["direction"] == "down"]
    first = {r["node"]: r for r in reversed(down)}
    assert {r["codec"] for r in first.values()} == {"fp32"}
    later = [r for r in down if r["round"] == 2]
    assert later and all(r["codec"] == "qsgd" and r["bytes"] < r["uncompressed"] / 3 for r in later)
    assert all("fedcodec.downlink" in ctx.state for ctx in grid.contexts.values())
    assert all(torch.isfinite(torch.from_numpy(a.numpy())).all() for a in result.arrays.values())


@pytest.mark.parametrize("codec, options, why", [
    ("fedpm", {}, "Beta posterior"),
    ("ae", {}, "learns a decoder"),
    ("signsgd", {"vote": True}, "majority vote"),
    ("factor", {"learned": 8}, "initial model"),
    ("nope", {}, "unknown codec"),
])
def test_codecs_a_stock_strategy_cannot_aggregate_are_refused(codec, options, why):
    from flwr.serverapp.strategy import FedAvg
    with pytest.raises(ConfigError, match=why):
        CompressedStrategy(FedAvg(), codec, options)


def test_downlink_codec_for_updates_needs_delta():
    from flwr.serverapp.strategy import FedAvg
    with pytest.raises(ConfigError, match="downlink_delta"):
        CompressedStrategy(FedAvg(), "qsgd", downlink="qsgd")


def _message(record: dict) -> Message:
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    return Message(RecordDict({RECORD: ConfigRecord(record)}), dst_node_id=7, message_type="train")


GOOD = {"version": 1, "codec": "qsgd", "options": "{}", "round": 1, "seed": 5, "arrays-key": "arrays",
        "downlink": "", "downlink-opts": "{}", "downlink-delta": False}


@pytest.mark.parametrize("change, says", [
    ({"version": 2}, "format 2"),
    ({"options": "{not json"}, "not JSON"),
    ({"options": '{"levels": [1, 2]}'}, "booleans, numbers and strings"),
    ({"options": "{" + '"a": 1,' * 1000 + '"b": 2}'}, "at most 4096"),
    ({"seed": -1}, "out of range"),
    ({"codec": 3}, "'codec' is missing or not a str"),
    ({"downlink": "fp16", "model": b"\x00" * 10, "layout": "[]"}, "no ArrayRecord|checksum|truncated|magic"),
    ({}, "no ArrayRecord 'arrays'"),
])
def test_node_refuses_malformed_server_messages(change, says):
    """codec_mod answers a malformed fedcodec record with an error reply saying why, without calling the app."""
    called = []
    msg = _message({**GOOD, **change})
    reply = codec_mod(msg, Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}),
                      lambda m, c: called.append(m))
    assert reply.has_error() and not called
    assert reply.error.reason.startswith("fedcodec:")
    import re
    assert re.search(says, reply.error.reason), reply.error.reason


@pytest.mark.parametrize("layout, says", [
    ('[["w", "float32", [4294967296]]]', "at most|more than"),
    ('[["w", "float32", [2, 2]], ["w", "float32", [2]]]', "twice"),
    ('[["w", "complex512", [2]]]', "unknown dtype"),
    ('[["w", "float32", [1, 1, 1, 1, 1, 1, 1, 1, 1]]]', "malformed"),
    ('{"w": 1}', "at most 10000 arrays"),
    ("[" + '["w", "float32", [65536, 65536]],' * 0 + '["a", "float32", [65536, 65536]]]', "more than"),
])
def test_layout_bounds(layout, says):
    with pytest.raises(ConfigError, match=says):
        Layout.parse(layout)


def _flwr_run(tmp_path, simulation: bool, nodes: int, **config):
    from fedcodec.flower.launch import LocalFederation, processes_with_home

    items = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in {**BASE, **config}.items()]
    items = [i.replace("'", '"') for i in items]
    fed = LocalFederation(nodes, workdir=tmp_path / "flwr", insecure=True, simulation=simulation)
    try:
        fed.start()
        result = fed.run([" ".join(items)], app_dir=FEDCODEC, timeout=300)
    finally:
        fed.stop()
    assert not processes_with_home(fed.home)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(fed.logs.iterdir()))
    assert result.ok, f"{result}\n{logs}"
    return result.output


@pytest.mark.parametrize("simulation, nodes, rounds", [(True, 3, 2), (False, 2, 2)],
                         ids=["simulation-engine", "loopback-superlink"])
def test_example_runs_with_flwr_run(tmp_path, simulation, nodes, rounds):
    """``flwr run`` of the fedcodec example: on Flower's simulation engine, and on a loopback SuperLink
    with SuperNodes (each message in a fresh ClientApp process, the EF memory in the node's state):
    every round's replies arrive as codec payloads of the pinned length, none refused."""
    out = _flwr_run(tmp_path, simulation, nodes, codec="signsgd",
                    **{"codec-options": "ef=true", "num-server-rounds": rounds})
    for rnd in range(1, rounds + 1):
        assert f"fedcodec: round {rnd}: uplink {nodes} replies, {nodes * 6_517:,} B" in out, out[-3000:]
    assert "refused" not in out.replace("0 refused", "")


def test_the_two_examples_differ_only_by_fedcodec_lines():
    """The fedcodec example is the plain one plus the README's diff: same task.py, and in the apps' Python
    files 3 lines changed and 4 added (2 imports, the mod, the wrapper's second line, the with block)."""
    import difflib

    assert (PLAIN / "quickstart/task.py").read_text() == (FEDCODEC / "quickstart/task.py").read_text()
    added = removed = 0
    for name in ("client_app.py", "server_app.py", "__init__.py"):
        a = (PLAIN / "quickstart" / name).read_text().splitlines()
        b = (FEDCODEC / "quickstart" / name).read_text().splitlines()
        for line in difflib.unified_diff(a, b, lineterm="", n=0):
            if line.startswith(("+++", "---")):
                continue
            added += line.startswith("+")
            removed += line.startswith("-")
    assert (removed, added) == (3, 7)


def _extra_record(reply):
    from flwr.app import ArrayRecord
    reply.content["more"] = ArrayRecord({"x": torch.zeros(3)})
    return reply


def _without_mod(reply):  # what a node without codec_mod sends: the float arrays themselves
    from flwr.app import ArrayRecord
    del reply.content[RECORD]
    reply.content["arrays"] = ArrayRecord(load_app(PLAIN)[2].Net().state_dict())
    return reply


def _wrong_key(reply):
    record = reply.content[RECORD]
    reply.content[RECORD] = ConfigRecord({"payload": record["payload"], "arrays-key": 7})
    return reply


def _infinite(reply):  # a well-formed fp16 payload whose values overflow
    from fedcodec.codecs import CodecContext, build_codec
    from fedcodec.flower.protocol import spec_of
    from flwr.app import ArrayRecord
    spec = spec_of(ArrayRecord(load_app(PLAIN)[2].Net().state_dict()))
    update = {t.name: torch.full(t.shape, 6e4) for t in spec.tensors}
    update["fc3.bias"] = torch.full((10,), float("inf"))
    payload = build_codec("fp16").encode(update, CodecContext(spec, 0, 1))
    reply.content[RECORD] = ConfigRecord({"payload": payload, "arrays-key": "arrays"})
    return reply


@pytest.mark.parametrize("tamper, says", [
    (_extra_record, "unexpected ArrayRecord"),
    (_without_mod, "add fedcodec.flower.codec_mod"),
    (_wrong_key, "names ArrayRecord '7'"),
    (_infinite, "nonfinite|Inf|NaN"),
])
def test_hostile_replies_are_refused_with_their_reason(tmp_path, monkeypatch, tamper, says):
    import re

    def hostile(node, reply):
        return tamper(reply) if node == 102 else reply

    model, ledger, _, _ = run_app(tmp_path, monkeypatch, FEDCODEC, tamper=hostile, codec="fp16",
                                  **{"codec-options": "", "num-server-rounds": 1})
    refused = up_rows(ledger, "rejected")
    assert [r["node"] for r in refused] == ["102"]
    assert re.search(says, refused[0]["reason"]), refused[0]["reason"]
    assert len(up_rows(ledger)) == NODES - 1
    assert all(torch.isfinite(v).all() for v in model.values())


def test_fedbat_in_the_apps_own_training_loop(tmp_path, monkeypatch):
    """FedBAT (learned-step stochastic binarization) through compressed_training: its step sizes are
    extra latents of the model during the block; one bit per kernel weight on the wire."""
    model, ledger, _, _ = run_app(tmp_path, monkeypatch, FEDCODEC, codec="fedbat",
                                  **{"codec-options": "", "num-server-rounds": 1})
    assert {int(r["bytes"]) for r in up_rows(ledger)} == {6_516}
    assert list(model) == list(load_app(PLAIN)[2].Net().state_dict())
    assert all(torch.isfinite(v).all() for v in model.values())


def test_seeded_factors_in_the_apps_own_training_loop(tmp_path, monkeypatch):
    """The factor codec (ΔW = B·A, B trained through compressed_training) in the quickstart app: its
    B factors are latents of the model during the block, and the payload has its fixed-width size."""
    model, ledger, _, _ = run_app(tmp_path, monkeypatch, FEDCODEC, codec="factor",
                                  **{"codec-options": "rank=4", "num-server-rounds": 2})
    # envelope 28 + header 41 (seed 8, 3 option bytes, 5 ranks u16, 5 scales f32) + B at 4 bits:
    # 4 x (6 + 16 + 120 + 84 + 10) = 944 values = 472 B + biases at 4 bits: 5 scales 20 B + 236 values 118 B
    assert {int(r["bytes"]) for r in up_rows(ledger)} == {679}
    assert not up_rows(ledger, "rejected")
    assert list(model) == list(load_app(PLAIN)[2].Net().state_dict())
    assert all(torch.isfinite(v).all() for v in model.values())
