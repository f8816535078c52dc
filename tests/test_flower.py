"""fedcodec on a real Flower deployment: a SuperLink and three SuperNodes on loopback.

Each test starts ``flower-superlink`` and three ``flower-supernode`` processes (127.0.0.1, free
ports, a private FLWR_HOME under pytest's tmp_path; ``--insecure`` except in the TLS test, which
also turns on SuperNode authentication), runs the fedcodec app with ``flwr run`` and compares what
the ServerApp wrote (ledger, metrics, final model) with the in-process simulator on the same config. The processes are stopped with their whole process trees in a
``finally`` and the test checks that none is left.

Bit-exact equality needs the same torch thread count on both sides (CPU kernels sum in an order
that depends on it), so the runs use ``threads=1`` and the reference runs with one thread too.
Data: ``dataset=synthetic`` (2000 train / 500 test images, about 667 per client, no files).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time

import pytest
import torch

import flwr  # noqa: F401,E402  (the suite needs the 'flower' extra: fail loudly, never skip)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process control uses /proc")

from fedcodec.codecs import wire  # noqa: E402
from fedcodec.config import Config  # noqa: E402
from fedcodec.data import load_dataset  # noqa: E402
from fedcodec.fl import loop, simulation  # noqa: E402
from fedcodec.flower.common import run_config_items  # noqa: E402
from fedcodec.flower.launch import LocalFederation, processes_with_home  # noqa: E402
from fedcodec.report import fp32_reference_bytes  # noqa: E402

BASE = dict(method="fedmrn-binary", dataset="synthetic", num_clients=3, clients_per_round=3, rounds=2,
            local_epochs=1, batch_size=64, seed=3, threads=1)
RUN_TIMEOUT = 240


def make_config(**kw) -> Config:
    return Config(**{**BASE, **kw}).validate()


def flower_run(tmp_path, cfg: Config, during=None, insecure=True, simulation=False, **flower):
    """Run ``cfg`` on a loopback federation (``insecure``: plain HTTP, no SuperNode auth; else TLS
    and registered SuperNode keys); ``during(fed, out)`` runs in a thread meanwhile.
    Returns (RunResult, output dir, federation)."""
    out = tmp_path / "out"
    keys = ("method", "dataset", "num_clients", "clients_per_round", "min_clients",
            "rounds", "local_epochs", "batch_size", "seed", "threads", "dropout", "stragglers", "plugins")
    items = run_config_items({k: getattr(cfg, k) for k in keys} | {"out_dir": str(out), "node_wait": 60.0}
                             | flower)
    fed = LocalFederation(cfg.num_clients, workdir=tmp_path / "flwr", insecure=insecure, simulation=simulation)
    seen: set[int] = set()
    try:
        fed.start()
        worker = None
        if during is not None:
            worker = threading.Thread(target=during, args=(fed, out), daemon=True)
            worker.start()
        result = fed.run(items, timeout=RUN_TIMEOUT)
        if worker is not None:
            worker.join(timeout=5)
        seen = fed.pids()
    finally:
        fed.stop()
    time.sleep(0.2)
    leftovers = processes_with_home(fed.home) | {p for p in seen if _alive(p)}
    assert not leftovers, f"processes left behind: {leftovers}"
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(fed.logs.iterdir()))
    assert result.ok, f"{result}\n{logs}"
    return result, out, fed


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def reference(cfg: Config, monkeypatch, corrupt: int | None = None, drop_from: tuple[int, int] | None = None):
    """The in-process simulator on ``cfg`` with one torch thread. ``corrupt``: that client's payload
    gets the ClientApp's byte flip; ``drop_from=(client, round)``: the client's payload never
    reaches the server from that round on. Returns (sim, state, {(round, client): payload length})."""
    sent = {}
    real_fit, real_server = loop.client_fit, loop.server_round

    def fit(rt, down, x, y, training, rnd, client, **kw):
        payload, info = real_fit(rt, down, x, y, training, rnd, client, **kw)
        if client == corrupt:
            flipped = bytearray(payload)
            flipped[len(flipped) // 2] ^= 0xFF
            payload = bytes(flipped)
        sent[(rnd, client)] = len(payload)
        return payload, info

    def server(uplink, spec, global_params, rnd, payloads, *args, **kw):
        if drop_from is not None and rnd >= drop_from[1]:
            payloads = {c: p for c, p in payloads.items() if c != drop_from[0]}
        return real_server(uplink, spec, global_params, rnd, payloads, *args, **kw)

    monkeypatch.setattr(loop, "client_fit", fit)
    monkeypatch.setattr(loop, "server_round", server)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        sim, state = simulation.setup(cfg, load_dataset(cfg.dataset, cfg.data_dir, allow_subset=cfg.allow_subset))
        for _ in range(cfg.rounds):
            state = simulation.run_round(sim, state)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    return sim, state, sent


def load_outputs(out):
    metrics = json.loads((out / "metrics.json").read_text())
    events = json.loads((out / "flower.json").read_text())
    model = torch.load(out / "model.pt", weights_only=True)
    ledger = [line.split(",") for line in (out / "ledger.csv").read_text().splitlines()[1:]]
    ledger = [(int(r), int(c), d, codec, int(n)) for r, c, d, codec, n in ledger]
    return metrics, events, model, ledger


def assert_same_model(model, params):
    assert set(model) == set(params)
    diffs = {k: float((model[k] - params[k]).abs().max()) for k in params if not torch.equal(model[k], params[k])}
    assert not diffs, f"Flower model differs from the simulator's: {diffs}"


def comparable(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def entries(state):
    return [(e.round, e.client, e.direction, e.codec, e.nbytes) for e in state.ledger.entries]


def test_app_project_and_run_config():
    """flower_app/ is a valid Flower app for flwr 1.41 and its run config maps onto Config."""
    import tomllib

    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    from fedcodec.flower.common import parse_run_config
    from fedcodec.flower.launch import APP_DIR

    project, _ = load_and_validate(APP_DIR / "pyproject.toml")  # imports both components
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedcodec.flower.server_app:app",
                                                             "clientapp": "fedcodec.flower.client_app:app"}
    defaults = flatten_dict(tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    cfg, settings = parse_run_config(defaults)
    assert (cfg.method, cfg.dataset, cfg.lr, cfg.data_dir, cfg.threads) == ("fedmrn-binary", "fashion-mnist", None,
                                                                          None, None)
    assert (settings.corrupt_partition, settings.round_timeout, settings.straggler_timeout, settings.resume) == (
        -1, None, None, False)
    assert (cfg.dropout, cfg.stragglers, cfg.max_update_norm, cfg.checkpoint_every) == (0.0, 0.0, None, 1)
    cfg, _ = parse_run_config({**defaults, "num-clients": 3, "clients-per-round": 2, "lr": 0.05,
                               "codec-options": "noise=gaussian pm=false"})
    assert (cfg.num_clients, cfg.clients_per_round, cfg.client_lr) == (3, 2, 0.05)
    assert cfg.uplink_options == {"mask": "binary", "alpha": 0.01, "noise": "gaussian", "pm": False}
    # every run-config key the tests and `fedcodec flower` send must be declared (flwr rejects others)
    sent = run_config_items({k: 1 for k in ("method", "dataset", "num_clients", "clients_per_round", "min_clients",
                                            "rounds", "local_epochs", "batch_size", "seed", "threads", "out_dir",
                                            "node_wait", "round_timeout", "straggler_timeout",
                                            "corrupt_partition", "dropout", "stragglers", "resume",
                                            "max_update_norm", "checkpoint_every")})
    assert {item.split("=")[0] for item in sent} <= set(defaults)


def test_malformed_payload_is_rejected_and_others_aggregated(tmp_path, monkeypatch):
    cfg = make_config(rounds=1)
    result, out, _ = flower_run(tmp_path, cfg, corrupt_partition=1)
    metrics, events, model, ledger = load_outputs(out)
    sim, state, sent = reference(cfg, monkeypatch, corrupt=1)

    rec = metrics["rounds"][0]
    assert (rec["accepted"], rec["rejected"]) == (2, 1)
    reason = events["rounds"][0]["rejected"]["1"]
    assert reason.startswith("client 1: rejected payload (checksum)"), reason
    assert "client 1: rejected payload" in result.output  # the ServerApp's log line, streamed by flwr run
    assert {(r, c): n for r, c, d, _, n in ledger if d == "up"} == sent  # bytes still counted
    # the model is the aggregate of clients 0 and 2 alone: the simulator with the same corruption
    assert_same_model(model, state.global_params)
    clean = simulation.setup(cfg, load_dataset(cfg.dataset))[1].global_params
    assert not all(torch.equal(model[k], clean[k]) for k in clean)  # and not the unchanged model
    assert all(torch.isfinite(v).all() for v in model.values())


def test_supernode_killed_mid_run_round_completes_without_it(tmp_path, monkeypatch):
    cfg = make_config(rounds=3, min_clients=2)

    def kill_after_round_one(fed, out):
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline and not (out / "flower.json").exists():
            time.sleep(0.05)
        fed.kill_node(2)  # round 2 has just been sent out

    # after min-clients (2) replies are in, a round waits at most 20 s for the third
    result, out, _ = flower_run(tmp_path, cfg, during=kill_after_round_one, straggler_timeout=20.0)
    metrics, events, model, ledger = load_outputs(out)
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert (rounds[0]["accepted"], rounds[0]["dropped"]) == (3, 0)
    for r, ev in zip(rounds[1:], events["rounds"][1:]):
        # node 2 is gone: the SuperLink answers for it with an error (dropped) or nothing comes back
        # before the straggler deadline (timed out); either way it is not aggregated
        assert (r["accepted"], r["dropped"] + r["timed_out"]) == (2, 1)
        assert set(ev["dropped"]) | set(ev["timed_out"]) == {"2"}
    assert not any(c == 2 and r >= 2 for r, c, d, _, _ in ledger if d == "up")
    _, state, _ = reference(cfg, monkeypatch, drop_from=(2, 2))
    assert_same_model(model, state.global_params)


def test_tls_deployment_with_supernode_authentication_matches_simulator(tmp_path, monkeypatch):
    """A deployment over TLS (a CA made by the test) with SuperNode authentication: the three
    registered nodes train, a node with an unregistered key is refused by the SuperLink, the bytes
    the ServerApp receives are the codec's payloads, and the model is the simulator's bit for bit.
    (Every other deployment test runs on plain HTTP, so both connection kinds are covered.)"""
    from fedcodec.flower.launch import make_certificates

    cfg = make_config()
    stranger = make_certificates(tmp_path / "stranger", 1)["node0"]
    intruder = []

    def start_intruder(fed, out):  # claims partition 0 with a key nobody registered
        intruder.append(fed.start_node(0, private_key=stranger, log_name="intruder.log"))

    result, out, fed = flower_run(tmp_path, cfg, during=start_intruder, insecure=False)
    metrics, events, model, ledger = load_outputs(out)
    sim, state, sent = reference(cfg, monkeypatch)

    # (a) TLS, only the registered nodes, the intruder refused
    assert "https://127.0.0.1" in (fed.logs / "superlink.log").read_text()
    assert events["nodes"] == {str(p): n for p, n in fed.node_ids.items()}
    assert events["nodes"].keys() == {"0", "1", "2"}
    assert intruder[0].returncode not in (None, 0)
    assert "Failed to activate SuperNode" in (fed.logs / "intruder.log").read_text()

    # (b) the run completed every round with every client
    assert result.status == "finished:completed"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(r["accepted"] == 3 and r["rejected"] == 0 and r["dropped"] == 0 for r in metrics["rounds"])

    # (c) bytes the ServerApp received per client = the codec's payload length
    spec = sim.spec
    expected = (wire.envelope_overhead("fedmrn") + 14 + math.ceil(spec.numel(("weight",)) / 8)
                + 4 * spec.numel(("param", "buffer")))
    up = {(r, c): n for r, c, d, _, n in ledger if d == "up"}
    assert up == sent == {(r, c): expected for r in (1, 2) for c in (0, 1, 2)}
    assert fp32_reference_bytes(spec) / expected > 25  # no float model behind the curtain
    down = {(r, c): n for r, c, d, _, n in ledger if d == "down"}
    assert down == {(r, c): fp32_reference_bytes(spec) for r in (1, 2) for c in (0, 1, 2)}
    assert [r["uplink_bytes"] for r in metrics["rounds"]] == [3 * expected] * 2

    # (d) the final global model is the simulator's, bit for bit; so are accuracy and losses
    assert_same_model(model, state.global_params)
    assert comparable(metrics["rounds"]) == comparable(state.records)


def test_flower_simulation_engine_matches_simulator(tmp_path, monkeypatch):
    """The same app on Flower's simulation engine (Ray, 3 virtual SuperNodes) gives the same model."""
    cfg = make_config(rounds=1)
    _, out, _ = flower_run(tmp_path, cfg, simulation=True)
    metrics, events, model, ledger = load_outputs(out)
    _, state, sent = reference(cfg, monkeypatch)
    assert {(r, c): n for r, c, d, _, n in ledger if d == "up"} == sent
    assert_same_model(model, state.global_params)
    assert comparable(metrics["rounds"]) == comparable(state.records)


def test_autoencoder_decoders_travel_as_setup_messages_on_supernodes(tmp_path, monkeypatch):
    """The AE codec on Flower: each SuperNode runs its pre-pass on first selection and replies with its
    decoder beside its latents; the server keeps one decoder per client (its per-client store), the
    ledger counts every decoder, and the model equals the simulator's bit for bit."""
    opts = {"chunk": 64, "ae_steps": 20, "snapshots": 3}
    cfg = make_config(method="ae-4-ef", rounds=3, clients_per_round=2, codec_options=opts)
    _, out, _ = flower_run(tmp_path, cfg, codec_options="chunk=64 ae_steps=20 snapshots=3")
    metrics, events, model, ledger = load_outputs(out)
    _, state, _ = reference(cfg, monkeypatch)
    assert ledger == entries(state)  # same rows in the same order: one ingest step writes both
    setups = [(r, c) for r, c, d, codec, n in ledger if codec == "ae/setup"]
    assert len(setups) == len({c for _, c in setups}) == len({c for r, c, d, *_ in ledger if d == "up"})
    assert_same_model(model, state.global_params)
    assert comparable(metrics["rounds"]) == comparable(state.records)


def test_transport_parity_with_simulated_failures_and_client_state(tmp_path, monkeypatch):
    """Simulated dropout and stragglers happen on Flower as in-process: the same clients fail, a
    dropout still takes in its broadcast (its delta-downlink copy stays in step with the server's),
    a straggler's bytes are counted but not aggregated. Error-feedback memory and the delta
    downlink's model copy live in each SuperNode's context state (every message runs in a fresh
    ClientApp process), so a client that dropped picks up its memory rounds later. Records
    (dropped / timed_out included), ledger rows and their order, and the model are identical to the
    in-process run."""
    cfg = make_config(method="ef-signsgd", rounds=3, dropout=0.34, stragglers=0.34, downlink="qsgd",
                      downlink_options={"levels": 255}, downlink_delta=True)
    _, out, _ = flower_run(tmp_path, cfg, downlink="qsgd", downlink_options="levels=255", downlink_delta=True)
    metrics, events, model, ledger = load_outputs(out)
    _, state, _ = reference(cfg, monkeypatch)
    assert [(r["accepted"], r["dropped"], r["timed_out"]) for r in metrics["rounds"]] == [(1, 1, 1)] * 3
    for ev in events["rounds"]:
        assert list(ev["dropped"].values()) == ["simulated dropout"]
        assert list(ev["timed_out"].values()) == ["simulated straggler"]
    assert comparable(metrics["rounds"]) == comparable(state.records)
    assert ledger == entries(state)
    down = [n for r, c, d, codec, n in ledger if d == "down"]
    assert {codec for r, c, d, codec, n in ledger if d == "down"} == {"qsgd"} and len(down) == 9
    assert all(n < fp32_reference_bytes(simulation.setup(cfg, load_dataset("synthetic"))[0].spec) / 3 for n in down)
    assert_same_model(model, state.global_params)


def test_resume_after_serverapp_restart_matches_uninterrupted_run(tmp_path, monkeypatch):
    """The ServerApp checkpoints every round; a new ServerApp (a new ``flwr run``) started with
    resume=true continues from the checkpoint, and the final model, records and ledger equal an
    uninterrupted run's."""
    cfg = make_config(rounds=3)
    out = tmp_path / "out"
    keys = ("method", "dataset", "num_clients", "clients_per_round", "local_epochs", "batch_size", "seed", "threads")
    items = {k: getattr(cfg, k) for k in keys} | {"out_dir": str(out), "node_wait": 60.0}
    fed = LocalFederation(cfg.num_clients, workdir=tmp_path / "flwr", insecure=True)
    try:
        fed.start()
        first = fed.run(run_config_items(items | {"rounds": 2}), timeout=RUN_TIMEOUT)
        assert first.ok, first.output[-3000:]
        assert [r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"]] == [1, 2]
        second = fed.run(run_config_items(items | {"rounds": 3, "resume": True}), timeout=RUN_TIMEOUT)
        assert second.ok, second.output[-3000:]
    finally:
        fed.stop()
    assert "resuming after round 2" in second.output
    metrics, events, model, ledger = load_outputs(out)
    _, state, _ = reference(cfg, monkeypatch)
    assert [r["round"] for r in events["rounds"]] == [1, 2, 3]
    assert comparable(metrics["rounds"]) == comparable(state.records)
    assert ledger == entries(state)
    assert_same_model(model, state.global_params)


@pytest.mark.parametrize("method, kept", [("ef-signsgd", "error-feedback memory"), ("ae-4", "a fitted codec")])
def test_resume_refuses_runs_whose_clients_keep_state(tmp_path, method, kept):
    """A restarted Flower run starts with empty SuperNode contexts, so a run whose clients keep
    state cannot continue bit-identically: resume refuses it and says why."""
    from fedcodec.errors import ConfigError
    from fedcodec.fl import checkpoint
    from fedcodec.flower.server_app import resume_state

    cfg = make_config(method=method, rounds=2)
    sim, state = simulation.setup(cfg, load_dataset("synthetic"))
    assert resume_state(sim, cfg, tmp_path) is None  # nothing to resume from: start afresh
    checkpoint.save(tmp_path / "checkpoint.safetensors", cfg.to_dict(), state)
    with pytest.raises(ConfigError, match=kept):
        resume_state(sim, cfg, tmp_path)
    stateless = make_config(rounds=2)
    sim, state = simulation.setup(stateless, load_dataset("synthetic"))
    checkpoint.save(tmp_path / "checkpoint.safetensors", stateless.to_dict(), state)
    assert resume_state(sim, stateless, tmp_path).round == 0


def test_a_new_codec_from_one_file_runs_on_both_transports(tmp_path, monkeypatch):
    """examples/ternary_codec.py is a codec written as encode/decode only, loaded as a plugin: with
    error feedback and the entropy stage it runs on SuperNodes and in-process with the same model
    and the same ledger, and no engine code knows it."""
    import os
    from pathlib import Path

    from fedcodec.codecs import registry

    examples = str(Path(__file__).resolve().parents[1] / "examples")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [examples, os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(examples)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    monkeypatch.setattr("fedcodec.config.METHODS", dict(__import__("fedcodec.config").config.METHODS))
    monkeypatch.delitem(sys.modules, "ternary_codec", raising=False)
    try:
        cfg = make_config(method="ternary-ef-ec", plugins="ternary_codec", rounds=2, clients_per_round=2)
        _, out, _ = flower_run(tmp_path, cfg, plugins="ternary_codec")
        metrics, events, model, ledger = load_outputs(out)
        _, state, _ = reference(cfg, monkeypatch)
    finally:
        sys.modules.pop("ternary_codec", None)
    assert {codec for _, _, d, codec, _ in ledger if d == "up"} == {"ternary+ec"}
    assert ledger == entries(state)
    assert comparable(metrics["rounds"]) == comparable(state.records)
    assert_same_model(model, state.global_params)
