"""``fedcodec compare``: one setting, many methods, a table and a plot, resumable per method."""

from __future__ import annotations

import json


from fedcodec.cli import main

ARGS = ["--dataset", "synthetic", "--rounds", "2", "--clients", "4", "--per-round", "2", "--batch-size", "32",
        "--threads", "1", "--no-progress"]


def test_compare_writes_table_and_plot_and_does_not_rerun_finished_methods(tmp_path, capsys):
    out = ["--out", str(tmp_path), "--name", "cmp"]
    assert main(["compare", "--method", "fedavg,signsgd,qsgd-1", *ARGS, *out]) == 0
    root = tmp_path / "cmp"
    table = (root / "results.md").read_text()
    for method in ("fedavg", "signsgd", "qsgd-1"):
        assert f"| {method} |" in table
    assert "uplink MB" in table and "ratio vs FedAvg" in table
    assert (root / "plot.png").stat().st_size > 10_000
    # same sampling for every method: identical client lists and downlink bytes per round
    rounds = {m: json.loads((root / m / "metrics.json").read_text())["rounds"] for m in ("fedavg", "signsgd")}
    assert [r["clients"] for r in rounds["fedavg"]] == [r["clients"] for r in rounds["signsgd"]]
    assert rounds["signsgd"][0]["uplink_bytes"] < rounds["fedavg"][0]["uplink_bytes"] / 20
    before = {m: (root / m / "metrics.json").stat().st_mtime_ns for m in ("fedavg", "signsgd")}
    capsys.readouterr()
    assert main(["compare", "--method", "fedavg,signsgd", *ARGS, *out]) == 0  # finished: nothing reruns
    assert {m: (root / m / "metrics.json").stat().st_mtime_ns for m in before} == before


def test_compare_in_parallel_processes_equals_sequential(tmp_path):
    seq = ["--out", str(tmp_path), "--name", "seq"]
    par = ["--out", str(tmp_path), "--name", "par", "--jobs", "2"]
    assert main(["compare", "--method", "fedavg,ef-signsgd", *ARGS, *seq]) == 0
    assert main(["compare", "--method", "fedavg,ef-signsgd", *ARGS[:-3], "--threads", "2", "--no-progress",
                 *par]) == 0
    for m in ("fedavg", "ef-signsgd"):
        a = json.loads((tmp_path / "seq" / m / "metrics.json").read_text())["rounds"]
        b = json.loads((tmp_path / "par" / m / "metrics.json").read_text())["rounds"]
        strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
        assert strip(a) == strip(b)


def test_compare_rejects_unknown_or_repeated_methods(tmp_path, capsys):
    assert main(["compare", "--method", "fedavg,nope", *ARGS, "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["compare", "--method", "fedavg,fedavg", *ARGS, "--out", str(tmp_path)]) == 2
