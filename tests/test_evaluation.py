"""Evaluation that costs little: the same numbers at any batch size, ``eval_every`` honoured with the
last round always evaluated, and the per-round time split in the records and in ``fedcodec report``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fedcodec.cli import main
from fedcodec.config import Config
from fedcodec.data import make_synthetic_images
from fedcodec.fl.simulation import run_round, setup
from fedcodec.fl.task import EVAL_BATCH, Classification, eval_batch_size
from fedcodec.report import summarize, time_table

SOURCE = make_synthetic_images(400, 300, seed=0)

# the pinned numbers below were made with 2 torch threads (conftest.two_torch_threads)
pytestmark = pytest.mark.usefixtures("two_torch_threads")

SPLIT = ("train_seconds", "code_seconds", "aggregate_seconds")


def small(**kw) -> Config:
    base = dict(method="fedavg", num_clients=8, clients_per_round=3, rounds=2, local_epochs=1, batch_size=16, seed=5)
    return Config(**{**base, **kw}).validate()


def test_accuracy_and_loss_do_not_depend_on_the_evaluation_batch():
    """Batches of 1 (no batching at all), 7 (a ragged last batch), the CPU default and the whole
    test set: the same accuracy, and losses equal to float rounding (the backend picks its kernels
    by shape). Pinned for the seed."""
    cfg = small(rounds=2, local_epochs=2, init_std=0.1)
    sim, state = setup(cfg, SOURCE)
    for _ in range(2):
        state = run_round(sim, state)
    rt = sim.runtime
    results = {b: Classification(SOURCE.test_x, SOURCE.test_y, b).evaluate(rt, state.global_params, {})
               for b in (1, 7, None, len(SOURCE.test_x))}
    assert {r["accuracy"] for r in results.values()} == {0.33}
    assert [r["test_loss"] for r in results.values()] == pytest.approx([1.7707486] * 4, rel=1e-6)
    with torch.no_grad():  # against a plain forward pass of the whole set
        rt.load(state.global_params)
        rt.model.eval()
        out = rt.model(SOURCE.test_x)
        assert results[None]["accuracy"] == int((out.argmax(1) == SOURCE.test_y).sum()) / len(SOURCE.test_y)
        assert results[None]["test_loss"] == pytest.approx(float(F.cross_entropy(out, SOURCE.test_y)), rel=1e-6)


def test_evaluation_batch_is_chosen_for_the_device():
    assert eval_batch_size("cpu") == EVAL_BATCH["cpu"] == 256
    assert eval_batch_size(torch.device("cuda")) == 1024
    assert eval_batch_size("meta") == 256  # a device without its own entry gets the CPU's
    with pytest.raises(Exception, match="evaluation batch size must be >= 1"):
        Classification(SOURCE.test_x, SOURCE.test_y, 0)


def test_evaluation_runs_in_inference_mode_and_leaves_the_model_trainable():
    seen = []
    cfg = small(rounds=1)
    sim, state = setup(cfg, SOURCE)
    hook = sim.runtime.model.register_forward_hook(lambda m, i, o: seen.append(torch.is_inference_mode_enabled()))
    sim.evaluate_round(state.global_params, state)
    hook.remove()
    assert seen and all(seen)
    state = run_round(sim, state)  # training after an evaluation still works (no inference tensors kept)
    assert math.isfinite(state.records[-1]["train_loss"])


@pytest.mark.parametrize("rounds, every, evaluated", [(5, 2, [2, 4, 5]), (4, 2, [2, 4]), (3, 10, [3]),
                                                      (3, 1, [1, 2, 3])])
def test_eval_every_is_honoured_and_the_last_round_is_always_evaluated(rounds, every, evaluated):
    cfg = small(rounds=rounds, eval_every=every)
    sim, state = setup(cfg, SOURCE)
    for _ in range(rounds):
        state = run_round(sim, state)
    assert [r["round"] for r in state.records if "accuracy" in r] == evaluated
    assert [r["round"] for r in state.records if "eval_seconds" in r] == evaluated
    assert summarize("fedavg", state.records, sim.spec)["time_split"]["evaluations"] == len(evaluated)


def test_every_round_records_its_time_split():
    cfg = small(method="fedmrn-binary", rounds=2)
    sim, state = setup(cfg, SOURCE)
    for _ in range(2):
        state = run_round(sim, state)
    for r in state.records:
        assert all(r[k] >= 0 for k in SPLIT) and "exchange_seconds" not in r
        assert r["train_seconds"] > 0 and r["code_seconds"] > 0
        # the parts are inside the round's wall time (evaluation is timed on its own)
        assert sum(r[k] for k in SPLIT) <= r["seconds"]
    s = summarize("fedmrn-binary", state.records, sim.spec)
    assert not any(k.endswith("seconds") for k in s["codec_metrics"])  # timings are not codec metrics
    t = s["time_split"]
    assert set(t) == {"train", "code", "aggregate", "evaluate", "total", "evaluations", "seconds_per_evaluation"}
    assert t["train"] == pytest.approx(sum(r["train_seconds"] for r in state.records) / 2)
    assert t["total"] == pytest.approx(sum(r["seconds"] + r["eval_seconds"] for r in state.records) / 2)


def test_time_table_rows():
    t = {"train": 2.0, "code": 0.5, "aggregate": 0.25, "evaluate": 1.0, "total": 4.0, "evaluations": 2,
         "seconds_per_evaluation": 1.0}
    old = {"method": "fedavg", "seconds_per_round": 3.0}  # a summary written before the split was kept
    table = time_table([{"method": "fedmrn-binary", "time_split": t}, old])
    assert table.splitlines() == [
        "| method | train s | code s | aggregate s | evaluate s | rest s | total s/round | evaluations | s/evaluation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| fedmrn-binary | 2.00 | 0.50 | 0.25 | 1.00 | 0.25 | 4.00 | 2 | 1.00 |",
        "| fedavg | - | - | - | - | - | 3.00 | - | - |"]
    remote = {"exchange": 3.0, "code": 0.1, "aggregate": 0.1, "evaluate": 0.5, "total": 4.0, "evaluations": 1,
              "seconds_per_evaluation": 0.5}
    assert time_table([{"method": "fedavg", "time_split": remote}]).splitlines()[2] == (
        "| fedavg | - | 3.00 | 0.10 | 0.10 | 0.50 | 0.30 | 4.00 | 1 | 0.50 |")


def test_report_shows_the_time_split(tmp_path, capsys):
    args = ["run", "--dataset", "synthetic", "--rounds", "2", "--clients", "6", "--per-round", "2",
            "--method", "fedavg", "--out", str(tmp_path), "--name", "r", "--no-progress", "--set", "eval_every=5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "seconds per round, by part:\n| method | train s | code s |" in printed
    metrics = json.loads((tmp_path / "r" / "fedavg" / "metrics.json").read_text())
    assert [("accuracy" in r) for r in metrics["rounds"]] == [False, True]
    assert main(["report", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "results.md").read_text()
    assert "Seconds per round, by part" in text
    row = [line for line in text.splitlines() if line.startswith("| fedavg |")][-1]
    assert row.endswith("| 1 | " + f"{metrics['summary']['time_split']['seconds_per_evaluation']:.2f} |")
