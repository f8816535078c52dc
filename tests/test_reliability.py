"""Dropouts, stragglers, the norm bound, checkpoints and crash-safe resume (SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fedcodec.cli import main
from fedcodec.errors import ConfigError
from fedcodec.fl import checkpoint
from fedcodec.fl.rng import round_failures
from fedcodec.fl.runner import final_params
from fedcodec.fl.simulation import run_round, setup
from test_engine import SOURCE, small_config


def test_round_failures_are_exact_disjoint_and_seeded():
    clients = list(range(10, 20))
    dropped, late = round_failures(1, 3, clients, 0.3, 0.2)
    assert len(dropped) == 3 and len(late) == 2 and not dropped & late and dropped | late <= set(clients)
    assert (dropped, late) == round_failures(1, 3, clients, 0.3, 0.2)
    assert round_failures(1, 3, clients, 0.0, 0.0) == (set(), set())


def test_dropout_30_percent_round_aggregates_the_rest():
    cfg = small_config("fedmrn-binary", num_clients=10, clients_per_round=10, dropout=0.3, stragglers=0.1,
                       rounds=2)
    sim, state = setup(cfg, SOURCE)
    for _ in range(cfg.rounds):
        state = run_round(sim, state)
    for rec in state.records:
        assert (rec["dropped"], rec["timed_out"], rec["accepted"], rec["rejected"]) == (3, 1, 6, 0)
        ups = [e for e in state.ledger.entries if e.round == rec["round"] and e.direction == "up"]
        downs = [e for e in state.ledger.entries if e.round == rec["round"] and e.direction == "down"]
        assert len(downs) == 10 and len(ups) == 7  # stragglers spent their bytes; dropouts sent none
        assert rec["uplink_bytes"] == sum(e.nbytes for e in ups)
    assert all(torch.isfinite(v).all() for v in state.global_params.values())


def test_min_clients_rule_keeps_model_when_too_many_drop():
    cfg = small_config(num_clients=10, clients_per_round=10, dropout=0.5, min_clients=6, rounds=1)
    sim, state = setup(cfg, SOURCE)
    before = {k: v.clone() for k, v in state.global_params.items()}
    state = run_round(sim, state)
    assert state.records[0]["accepted"] == 5
    assert all(torch.equal(before[k], state.global_params[k]) for k in before)


def test_norm_bound_rejects_large_updates(caplog):
    cfg = small_config(max_update_norm=1e-6, rounds=1)
    sim, state = setup(cfg, SOURCE)
    before = {k: v.clone() for k, v in state.global_params.items()}
    state = run_round(sim, state)
    assert state.records[0]["rejected"] == cfg.clients_per_round and "(norm)" in caplog.text
    assert all(torch.equal(before[k], state.global_params[k]) for k in before)


def test_checkpoint_round_trip_and_config_guard(tmp_path):
    cfg = small_config(rounds=1)
    sim, state = setup(cfg, SOURCE)
    state = run_round(sim, state)
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, cfg.to_dict(), state)
    back = checkpoint.load(path, {**cfg.to_dict(), "rounds": 9})  # more rounds: allowed
    assert back.round == 1 and back.records == json.loads(json.dumps(state.records))
    assert back.ledger.entries == state.ledger.entries
    assert all(torch.equal(back.global_params[k], state.global_params[k]) for k in state.global_params)
    with pytest.raises(ConfigError, match="different config.*lr"):
        checkpoint.load(path, {**cfg.to_dict(), "lr": 0.5})
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


RUN = ["--dataset", "synthetic", "--method", "fedmrn-binary", "--rounds", "8", "--clients", "10", "--per-round", "4",
       "--local-epochs", "1", "--batch-size", "32", "--name", "r", "--no-progress", "--threads", "1"]


def _cli(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "fedcodec.cli", "run", *RUN, "--out", str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _checkpoint_round(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["round"])
    except Exception:  # not there yet
        return 0


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    ref = _cli(tmp_path / "ref")
    victim = _cli(tmp_path / "killed")
    ckpt = tmp_path / "killed" / "r" / "fedmrn-binary" / "checkpoint.safetensors"
    deadline = time.time() + 240
    while _checkpoint_round(ckpt) < 3 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert victim.poll() is None, "run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = _checkpoint_round(ckpt)
    assert 3 <= killed_at < 8
    assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()
    resumed = _cli(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    a = json.loads((tmp_path / "ref" / "r" / "fedmrn-binary" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "r" / "fedmrn-binary" / "metrics.json").read_text())
    strip = lambda recs: [{k: v for k, v in r.items() if "seconds" not in k} for r in recs]  # noqa: E731
    assert len(b["rounds"]) == 8 and strip(a["rounds"]) == strip(b["rounds"])
    pa, pb = final_params(tmp_path / "ref" / "r" / "fedmrn-binary"), final_params(ckpt.parent)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert (tmp_path / "ref" / "r" / "fedmrn-binary" / "ledger.csv").read_text() == (ckpt.parent / "ledger.csv").read_text()


def test_resume_skips_finished_methods(tmp_path, capsys):
    args = ["run", *RUN[:2], "--method", "fedavg", "--rounds", "1", "--clients", "4", "--per-round", "2",
            "--name", "s", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    metrics = tmp_path / "s" / "fedavg" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    assert metrics.stat().st_mtime_ns == stamp  # not rerun


@pytest.mark.parametrize("args, message", [
    (["--set", "codec.colour=1"], "has no option"),
    (["--method", "fedmrn-binary", "--set", "codec.mask=ternary"], "unknown mask"),
    (["--partition", "k-classes", "--set", "classes_per_client=11"], "number of classes (10)"),
    (["--set", "dropout=1.5"], "dropout"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent", "--set", "allow_subset=false"], "apt-get"),
])
def test_bad_configuration_fails_fast_with_a_fix(args, message, tmp_path, capsys, monkeypatch):
    base = ["run", "--dataset", "synthetic", "--out", str(tmp_path), "--no-progress"]
    t0 = time.perf_counter()
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and "fedcodec: error:" in err
    assert time.perf_counter() - t0 < 10  # failed before any training
    assert not list(tmp_path.rglob("metrics.json"))


def test_report_survives_a_run_where_every_client_dropped():
    from fedcodec.report import markdown_table, summarize

    cfg = small_config(clients_per_round=1, dropout=0.6, rounds=1)  # round(0.6 * 1) = 1: nobody uploads
    sim, state = setup(cfg, SOURCE)
    state = run_round(sim, state)
    assert state.records[0]["dropped"] == 1 and state.records[0]["uplink_bytes"] == 0
    summary = summarize("fedavg", state.records, sim.spec)
    assert summary["uplink_bytes_per_client_round"] == 0 and summary["ratio_vs_fp32"] != summary["ratio_vs_fp32"]
    assert "| fedavg |" in markdown_table([summary])
