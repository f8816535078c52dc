"""Learned compression on Flower (issue 16, item 5): fedcodec's own ServerApp and ClientApp, run in one
process through :class:`fedcodec.flower.local.InProcessGrid` (every message crosses a protobuf round
trip as on the wire; one Context per node, kept across rounds, as a SuperNode keeps it), against
the in-process engine on the same options. What the server receives is read from the grid."""

from __future__ import annotations

import json

import flwr  # noqa: F401  (the suite needs the 'flower' extra: fail loudly, never skip)
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedcodec.errors import ConfigError
from fedcodec.fl.client import LOCAL
from fedcodec.fl.simulation import run_round
from fedcodec.flower import client_app, server_app
from fedcodec.flower.common import METRICS, RECORD, parse_run_config
from fedcodec.flower.local import InProcessGrid
from fedcodec.neural.deploy import NeuralRun, check_point
from fedcodec.neural.federated import rd_point

OPTIONS = "source=clusters lambda=100 samples_per_client=20 rounds=3"
CLIENTS = 10  # the clusters source's
#: the shared tensors of the clusters source's model (16-dim vectors, 4 latents, two hidden layers of 64):
#: g_a 16·64+64 + 64·64+64 + 64·4+4 = 5,508 and g_s 4·64+64 + 64·64+64 + 64·16+16 = 5,520
SHARED_NUMEL = 11028


@pytest.fixture(autouse=True)
def _keep_log_capture(monkeypatch):
    """The ClientApp's ensure_logging() stops the 'fedcodec' logger's propagation (right in a Flower
    process, wrong in pytest's): without this, later tests' caplog would see nothing."""
    monkeypatch.setattr(client_app, "ensure_logging", lambda: None)


def run_config(out, **extra) -> dict:
    return {"neural": OPTIONS, "seed": 1, "threads": 1, "out-dir": str(out), "node-wait": 5.0} | extra


def in_process(cfg, options: str = OPTIONS, rounds: int = 3):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim, state = NeuralRun.parse(options).simulation(cfg)
        for _ in range(rounds):
            state = run_round(sim, state)
    finally:
        torch.set_num_threads(threads)
    return sim, state


def test_neural_options_are_parsed_and_checked():
    run = NeuralRun.parse("source=clusters lambda=300 samples_per_client=30 alpha=0.5 trainer=fedsgd-adam "
                          "offsets=false val_fraction=0 method=qsgd-8 codec.ef=true")
    assert (run.source, run.lmbda, run.samples_per_client, run.alpha, run.trainer, run.offsets,
            run.val_fraction) == ("clusters", 300.0, 30, 0.5, "fedsgd-adam", False, 0.0)
    assert run.describe() == {"source": "clusters", "lambda": 300.0, "mode": "federated", "samples_per_client": 30,
                              "alpha": 0.5, "method": "qsgd-8", "codec_options": {"ef": True},
                              "trainer": "fedsgd-adam", "val_fraction": 0.0, "offsets": False,
                              "keep_optimizer_state": True}
    cfg, _ = parse_run_config({"seed": 4})
    s = run.settings(cfg, __import__("fedcodec.neural.sources", fromlist=["x"]).load_source(
        "clusters", samples_per_client=30, alpha=0.5, seed=4))
    assert (s.seed, s.rounds, s.method, s.codec_options, s.offsets, s.val_fraction) == (
        4, 300, "qsgd-8", {"ef": True}, False, 0.0)
    for text, message in [("source=clusters lamda=3", "did you mean 'lambda'"),
                          ("lambda=0", "lambda expects a number > 0"),
                          ("mode=oracle", "mode expects one of federated, federated-bias, global"),
                          ("mode=local", "mode expects one of federated, federated-bias, global"),
                          ("source=nope", "source expects one of"),
                          ("val_fraction=1", "val_fraction expects"),
                          ("lambda=3 lmbda=4", "given twice"),
                          ("rounds=2.5", "rounds expects an integer"),
                          ("source", "NAME=VALUE"),
                          ("codec_options=3", "codec.NAME=VALUE")]:
        with pytest.raises(ConfigError, match=message):
            NeuralRun.parse(text)


def test_flower_command_checks_the_node_count_of_a_learned_compression_run(capsys):
    from fedcodec.cli import main

    assert main(["flower", "deploy-local", "--nodes", "3", "--set", "neural=source=clusters lambda=100"]) == 2
    assert "has 10 clients: start one SuperNode each with --nodes 10" in capsys.readouterr().err
    assert NeuralRun.parse("source=synthetic").num_clients() == 10


def test_node_evaluation_replies_are_checked():
    good = {"rate": 3.5, "rate-est": 3.4, "mse": 0.01, "bytes": 120, "examples": 50}
    assert check_point(good, 50) == (good, None)
    for bad, why in [({"mse": float("nan")}, "mse=nan"), ({"rate": -1.0}, "rate=-1.0"), ({"bytes": 1.5}, "bytes=1.5"),
                     ({"examples": 49}, "reports 49 test examples; its test set has 50"), ({"rate-est": True}, "True"),
                     ({"rate": "3"}, "rate='3'")]:
        point, reason = check_point(good | bad, 50)
        assert point is None and why in reason
    assert check_point({k: v for k, v in good.items() if k != "mse"}, 50)[1].startswith("mse=None")


def test_learned_compression_on_flower_matches_in_process_and_priors_stay_on_the_nodes(tmp_path):
    """Three rounds of personalized-federated training of the clusters codec through the Flower
    ServerApp and ClientApp: the model, records and ledger are the in-process engine's, bit for bit.
    The server receives the shared tensors' fp32 update and nothing else: no tensor in any reply,
    no entropy model in model.pt; each node's entropy model is in its own context state. The final
    evaluation is made by the nodes, each with its own entropy model, on real bytes; three hostile
    evaluation replies are left out and the others averaged."""
    out = tmp_path / "out"
    rc = run_config(out)
    cfg, settings = parse_run_config(rc)

    def tamper(node: int, reply: Message) -> Message:
        if reply.metadata.message_type != "evaluate" or node not in (101, 102, 103):
            return reply
        metrics, pid = dict(reply.content[METRICS]), node - 101
        if node == 101:  # a non-finite MSE
            metrics["mse"] = float("nan")
        elif node == 102:  # a test set of another size
            metrics["examples"] += 1
        client = 7 if node == 103 else pid  # 103 answers for client 7
        reply.content = RecordDict({RECORD: ConfigRecord({"client": client}), METRICS: MetricRecord(metrics)})
        return reply

    grid = InProcessGrid(client_app.app, CLIENTS, rc, tamper=tamper)
    server_app.run_rounds(grid, cfg, settings, out)

    sim, state = in_process(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    events = json.loads((out / "flower.json").read_text())
    model = torch.load(out / "model.pt", weights_only=True)
    # the same shared tensors, bit for bit; no entropy model among them
    assert set(model) == set(sim.spec.names) and not any(n.startswith("prior.") for n in model)
    assert all(torch.equal(model[n], state.global_params[n]) for n in model)
    assert sim.spec.numel() == SHARED_NUMEL
    ledger = [tuple(line.split(",")) for line in (out / "ledger.csv").read_text().splitlines()[1:]]
    assert ledger == [(str(e.round), str(e.client), e.direction, e.codec, str(e.nbytes)) for e in state.ledger.entries]
    flower_records = [{k: v for k, v in r.items() if "seconds" not in k} for r in metrics["rounds"]]
    reference = [{k: v for k, v in r.items() if "seconds" not in k} for r in state.records]
    assert [r["round"] for r in flower_records] == [1, 2, 3]
    for mine, ref in zip(flower_records[:2], reference[:2]):
        assert mine == ref
    # what the server received: train replies carry a payload and a client id, evaluate replies numbers
    kinds = [kind for kind, _ in grid.received]
    assert kinds.count("query") == CLIENTS and kinds.count("train") == 3 * CLIENTS
    assert kinds.count("evaluate") == CLIENTS
    for kind, reply in grid.received:
        assert not reply.content.array_records  # no tensor ever travels up
        rec = reply.content.config_records[RECORD]
        if kind == "train":
            assert set(rec) == {"payload", "client"}
            # the fp32 payload of the 11,028 shared values: 4 bytes each plus 26 bytes of envelope
            assert len(rec["payload"]) == 4 * SHARED_NUMEL + 26 == 44138
        elif kind == "evaluate":
            assert set(reply.content.metric_records[METRICS]) == {"rate", "rate-est", "mse", "bytes", "examples"}
    # every node keeps its own entropy model (trained: they differ), and the server never held one
    priors = [grid.contexts[101 + c].state[client_app.STATE].to_torch_state_dict() for c in range(CLIENTS)]
    assert all(any(k.startswith(LOCAL + "prior.") for k in p) for p in priors)
    assert not torch.equal(priors[0][LOCAL + "prior.biases.0"], priors[1][LOCAL + "prior.biases.0"])
    assert all(torch.equal(priors[c][LOCAL + "prior.biases.0"], state.client_states[c][LOCAL + "prior.biases.0"])
               for c in range(CLIENTS))
    # the nodes' evaluation: clients 3..9 count; 0 (NaN), 1 (size) and 2 (names client 7) are left out
    ev = events["evaluation"]
    assert sorted(ev["failed"]) == ["0", "1", "2"] and sorted(map(int, ev["clients"])) == list(range(3, CLIENTS))
    assert "mse=nan" in ev["failed"]["0"] and "reports 501 test examples" in ev["failed"]["1"]
    assert "names client 7" in ev["failed"]["2"]
    broadcast = {e.nbytes for e in state.ledger.entries if e.direction == "down"}
    assert len(broadcast) == 1 and ev["downlink_bytes"] == CLIENTS * broadcast.pop()  # one fp32 broadcast each
    task = sim.runtime.task
    own = task.client_losses(sim.runtime, state.global_params, state.client_states, task.test)
    coded = []
    for c in range(CLIENTS):
        sim.runtime.load(state.global_params)
        sim.runtime.load_local(state.client_states[c])
        coded.append(rd_point(sim.runtime.model.eval(), task.test[c]))
        if c >= 3:
            point = ev["clients"][str(c)]
            assert point["rate-est"] == own[c]["rate_est"] and point["mse"] == own[c]["mse"]
            assert point["rate"] == coded[c]["rate"] and point["bytes"] == coded[c]["bytes"]
            assert point["examples"] == len(task.test[c])
            # real bytes against the estimate: within 1% + the stream header
            assert abs(point["bytes"] * 8 - point["rate-est"] * len(task.test[c])) <= 0.01 * point["bytes"] * 8 + 64
    last = flower_records[-1]
    assert last["eval_clients"] == 7 and last["eval_downlink_bytes"] == ev["downlink_bytes"]
    assert last["rate_est"] == float(np.mean([own[c]["rate_est"] for c in range(3, CLIENTS)]))
    assert last["mse"] == float(np.mean([own[c]["mse"] for c in range(3, CLIENTS)]))
    assert last["rate"] == float(np.mean([coded[c]["rate"] for c in range(3, CLIENTS)]))
    # every other entry of the last record is the in-process one's
    assert {k: v for k, v in last.items() if k not in ("rate", "rate_est", "mse", "test_loss", "psnr", "eval_clients",
                                                       "eval_downlink_bytes")} == \
        {k: v for k, v in reference[-1].items() if k not in ("rate_est", "mse", "test_loss")}
    assert metrics["config"]["neural"]["lambda"] == 100.0


def test_federated_bias_on_flower_keeps_the_output_bias_on_the_nodes(tmp_path):
    """mode=federated-bias through the Flower apps: the same run as in-process, bit for bit; the
    synthesis's output bias (16 values) never travels: not in model.pt, not in any reply (the train
    payloads are 64 bytes shorter than federated mode's), and each node holds its own."""
    options = OPTIONS.replace("rounds=3", "rounds=2") + " mode=federated-bias"
    out = tmp_path / "out"
    rc = run_config(out) | {"neural": options}
    cfg, settings = parse_run_config(rc)
    grid = InProcessGrid(client_app.app, CLIENTS, rc)
    server_app.run_rounds(grid, cfg, settings, out)
    sim, state = in_process(cfg, options, rounds=2)
    model = torch.load(out / "model.pt", weights_only=True)
    assert "g_s.4.bias" not in model and "g_s.4.weight" in model
    assert set(model) == set(sim.spec.names) and all(torch.equal(model[n], state.global_params[n]) for n in model)
    for kind, reply in grid.received:
        assert not reply.content.array_records
        if kind == "train":
            assert len(reply.content.config_records[RECORD]["payload"]) == 4 * (SHARED_NUMEL - 16) + 26 == 44074
    biases = [grid.contexts[101 + c].state[client_app.STATE].to_torch_state_dict()[LOCAL + "g_s.4.bias"]
              for c in range(CLIENTS)]
    assert not torch.equal(biases[0], biases[1])
    assert all(torch.equal(biases[c], state.client_states[c][LOCAL + "g_s.4.bias"]) for c in range(CLIENTS))


def test_a_learned_compression_run_cannot_resume(tmp_path):
    cfg, settings = parse_run_config(run_config(tmp_path))
    sim, _ = NeuralRun.parse(OPTIONS).simulation(cfg)
    with pytest.raises(ConfigError, match="cannot resume a learned-compression run"):
        server_app.resume_state(sim, cfg, tmp_path, neural=True)
