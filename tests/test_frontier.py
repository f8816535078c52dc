"""``fedcodec frontier`` and parametric method names: accuracy against uplink bytes, over seeds."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fedcodec import frontier
from fedcodec.cli import main
from fedcodec.config import METHODS, build_config, resolve_method
from fedcodec.errors import ConfigError, ResultsFileError

ROOT = Path(__file__).resolve().parents[1]

# the tiniest real setting: 16 clients of the synthetic set (125 examples each), one client, one round;
# wider initial weights than the paper's, so that one round moves the accuracy off 10% (and seeds differ)
ARGS = ["--dataset", "synthetic", "--rounds", "1", "--clients", "16", "--per-round", "1", "--local-epochs", "1",
        "--batch-size", "32", "--threads", "1", "--no-progress", "--set", "init_std=0.05"]


# --- parametric method names ---

@pytest.mark.parametrize("name, codec, options, lr", [
    ("qsgd-8", "qsgd", {"levels": 8}, 0.03),
    ("qsgd-255", "qsgd", {"levels": 255}, 0.03),
    ("topk-ef-0.003", "topk", {"fraction": 0.003, "ef": True}, 0.03),
    ("topk-0.05", "topk", {"fraction": 0.05}, 0.03),
    ("factor-64-ec", "factor", {"rank": 64, "levels": 15, "dense_levels": 15, "entropy": True}, 0.05),
    ("factor-4", "factor", {"rank": 4, "levels": 15, "dense_levels": 15}, 0.05),
    ("ae-32", "ae", {"latent": 32, "bits": 6}, 0.03),
    ("ae2-8-ec", "factor", {"rank": 8, "learned": 4, "levels": 15, "dense_levels": 15, "entropy": True}, 0.05),
    ("ae-1023-ef", "ae", {"latent": 1023, "bits": 6, "ef": True}, 0.03),
    # registered entries win, and are what the patterns would give
    ("topk-ef", "topk", {"fraction": 0.01, "ef": True}, 0.03),
    ("factor-16-ec", "factor", {"rank": 16, "levels": 15, "dense_levels": 15, "entropy": True}, 0.05),
    ("fedmrn-binary", "fedmrn", {"mask": "binary", "alpha": 0.01}, 0.1),
])
def test_resolve_method_gives_the_family_recipe_at_the_named_knob(name, codec, options, lr):
    m = resolve_method(name)
    assert (m.codec, m.options, m.lr) == (codec, options, lr)


def test_registered_entries_win_over_patterns():
    assert resolve_method("qsgd-4") is METHODS["qsgd-4"]
    assert resolve_method("qsgd-4").summary == "stochastic uniform quantization, 5 levels (s=4)"


def test_a_pattern_method_builds_a_valid_config():
    cfg = build_config(None, None, {"method": "topk-ef-0.003", "dataset": "synthetic"})
    assert (cfg.uplink_options, cfg.client_lr) == ({"fraction": 0.003, "ef": True}, 0.03)
    cfg = build_config(None, None, {"method": "qsgd-16", "lr": "0.05", "codec_options": "entropy=true"})
    assert (cfg.uplink_options, cfg.client_lr) == ({"levels": 16, "entropy": True}, 0.05)


@pytest.mark.parametrize("name, message", [
    ("qsgd-0", "levels must be an integer in 1..255"),
    ("qsgd-256", "levels must be an integer in 1..255"),
    ("qsgd-x", "levels must be an integer in 1..255"),
    ("qsgd-08", "without leading zeros"),
    ("qsgd--4", "levels must be an integer"),
    ("topk-ef-1.5", "fraction must be a decimal in (0, 1)"),
    ("topk-ef-nan", "fraction must be a decimal in (0, 1)"),
    ("topk-ef-inf", "fraction must be a decimal in (0, 1)"),
    ("topk-ef-1e-3", "fraction must be a decimal in (0, 1)"),
    ("topk-0", "fraction must be a decimal in (0, 1)"),
    ("topk-ef-0.010", "without trailing zeros"),
    ("factor-0-ec", "rank must be an integer in 1..65535"),
    ("factor-65536", "rank must be an integer in 1..65535"),
    ("ae2-1-ec", "rank must be an integer in 2..65535"),
    ("ae-1024", "latent must be an integer in 1..1023"),
    ("ae-16-ec", "latent must be an integer in 1..1023"),
    ("q" * 65, "longer than 64 characters"),
    ("QSGD-4", "only lowercase letters, digits"),
    ("..", "only lowercase letters, digits"),
    ("a/b", "only lowercase letters, digits"),
    ("nope", "unknown method 'nope'"),
    ("fedav", "did you mean 'fedavg'?"),
])
def test_resolve_method_rejects_malformed_names(name, message):
    with pytest.raises(ConfigError) as err:
        resolve_method(name)
    assert message in str(err.value)


def test_unknown_method_lists_methods_and_patterns():
    with pytest.raises(ConfigError) as err:
        resolve_method("zip-9")
    text = str(err.value)
    assert "fedmrn-binary-ec" in text and "qsgd-<levels> (1..255)" in text and "topk-ef-<fraction>" in text
    assert "factor-<rank>-ec (1..65535)" in text and "ae-<latent>-ef (1..1023)" in text


def test_cli_lists_the_patterns(capsys):
    assert main(["codecs"]) == 0
    assert "topk-ef-<fraction>" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["frontier", "--help"])
    help_text = capsys.readouterr().out
    assert "factor-<rank>-ec" in help_text and "--seeds" in help_text and "--from" in help_text


# --- the front and the aggregation, on literal numbers ---

def test_pareto_front_keeps_non_dominated_points_and_ties():
    pts = [(100, 0.5), (200, 0.7), (150, 0.4), (200, 0.7), (300, 0.7), (50, math.nan), (400, 0.9), (100, 0.5),
           (200, 0.6)]
    assert frontier.pareto_front(pts) == [True, True, False, True, False, False, True, True, False]
    assert frontier.pareto_front([]) == []
    assert frontier.pareto_front([(10, math.nan)]) == [False]
    # a mean's rounding decides nothing: 0.8500000000000001 is 0.85, at more bytes
    assert frontier.pareto_front([(100, 0.85), (200, (0.8 + 0.9) / 2)]) == [True, False]
    assert frontier.pareto_front([(100, 0.85), (100 * (1 + 1e-12), 0.85)]) == [True, True]


def test_mean_and_sample_std():
    assert frontier.mean_std([0.5]) == (0.5, None)
    mean, std = frontier.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(1.2909944487358056, rel=1e-12)  # sqrt(5/3): n - 1
    mean, std = frontier.mean_std([0.80, 0.90])
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.07071067811865474, rel=1e-12)


SUMMARY_KEYS = ("final_accuracy", "best_accuracy", "uplink_bytes_per_client_round", "bits_per_parameter",
                "ratio_vs_fp32")


def write_run(folder, method, seed, numbers, **config):
    """A hand-made metrics.json: the config keys a frontier reads, a summary of ``numbers``."""
    folder.mkdir(parents=True)
    cfg = {"method": method, "seed": seed, "dataset": "synthetic", "partition": "iid", "rounds": 2,
           "num_clients": 4, "clients_per_round": 2, **config}
    doc = {"config": cfg, "summary": dict(zip(SUMMARY_KEYS, numbers)), "rounds": []}
    (folder / "metrics.json").write_text(json.dumps(doc))


def literal_runs(root):
    write_run(root / "s0" / "qsgd-4", "qsgd-4", 0, (0.80, 0.82, 1000, 0.5, 44.0))
    write_run(root / "s1" / "qsgd-4", "qsgd-4", 1, (0.90, 0.91, 1200, 0.6, 44000 / 1200))
    write_run(root / "s0" / "fedavg", "fedavg", 0, (0.86, 0.87, 44000, 32.0, 1.0))
    write_run(root / "s0" / "topk-ef", "topk-ef", 0, (0.70, 0.70, 5000, 1.0, 8.8))
    write_run(root / "s1" / "topk-ef", "topk-ef", 1, (0.72, 0.74, 5000, 1.0, 8.8))
    write_run(root / "lr" / "factor-32-ec", "factor-32-ec", 0, (0.85, 0.85, 200, 0.1, 220.0), lr=0.05)


def test_from_folders_builds_the_table_from_literal_runs(tmp_path, capsys):
    literal_runs(tmp_path / "runs")
    assert main(["frontier", "--from", str(tmp_path / "runs"), "--plot-out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "frontier.md").read_text()
    assert md.startswith("# Frontier: synthetic, iid, 4 clients (2/round), 2 rounds, seeds 0, 1\n")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [  # by bytes; the front: nothing else has as much accuracy for as few bytes
        "| factor-32-ec lr=0.05 | 0 | 85.00 | — | 85.00 | 200 | 0.100 | 220.0x | yes |",
        "| qsgd-4 | 0, 1 | 85.00 | 7.07 | 86.50 | 1,100 | 0.550 | 40.0x | no |",
        "| topk-ef | 0, 1 | 71.00 | 1.41 | 72.00 | 5,000 | 1.000 | 8.8x | no |",
        "| fedavg | 0 | 86.00 | — | 87.00 | 44,000 | 32.000 | 1.0x | yes |",
    ]
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert rows[0] in out and f"frontier: {tmp_path / 'out' / 'frontier.md'}" in out


def test_a_point_whose_runs_recorded_no_best_accuracy_shows_a_dash(tmp_path):
    write_run(tmp_path / "s0" / "qsgd-4", "qsgd-4", 0, (0.80, math.nan, 1000, 0.5, 44.0))
    write_run(tmp_path / "s1" / "qsgd-4", "qsgd-4", 1, (0.90, 0.91, 1000, 0.5, 44.0))
    [row] = frontier.markdown(frontier.points([frontier.read_run(f) for f in frontier.find_runs([tmp_path])]))\
        .splitlines()[2:]
    assert row == "| qsgd-4 | 0, 1 | 85.00 | 7.07 | — | 1,000 | 0.500 | 44.0x | yes |"


def test_from_refuses_runs_of_two_settings(tmp_path, capsys):
    write_run(tmp_path / "a" / "fedavg", "fedavg", 0, (0.86, 0.87, 44000, 32.0, 1.0))
    write_run(tmp_path / "b" / "qsgd-4", "qsgd-4", 0, (0.80, 0.82, 1000, 0.5, 44.0), partition="dirichlet")
    with pytest.raises(ConfigError) as err:
        frontier.build([tmp_path / "a", tmp_path / "b"], tmp_path)
    assert 'partition: "iid" in ' in str(err.value) and '"dirichlet" in ' in str(err.value)
    assert "Pass folders of one setting" in str(err.value)
    assert main(["frontier", "--from", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "partition" in capsys.readouterr().err
    assert not (tmp_path / "a" / "frontier.md").exists()


def test_from_refuses_the_same_method_and_seed_twice(tmp_path):
    write_run(tmp_path / "a" / "fedavg", "fedavg", 0, (0.86, 0.87, 44000, 32.0, 1.0))
    write_run(tmp_path / "b" / "fedavg", "fedavg", 0, (0.85, 0.87, 44000, 32.0, 1.0))
    with pytest.raises(ConfigError, match="fedavg, seed 0 is in two folders") as err:
        frontier.build([tmp_path], tmp_path)
    assert str(tmp_path / "a" / "fedavg") in str(err.value) and str(tmp_path / "b" / "fedavg") in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("\xff\xfe", "is not valid JSON"),
    ("[1, 2]", "is not a metrics.json of fedcodec"),
    ('{"config": {"method": "fedavg"}, "summary": []}', "is not a metrics.json of fedcodec"),
    ('{"config": {"method": "fedavg"}, "summary": {"final_accuracy": 0.5}}', "summary field best_accuracy"),
    ('{"config": {"method": 7}, "summary": {}}', "config method expects a method name"),
    ('{"config": {"method": "x", "seed": true}, "summary": {}}', "config seed expects an integer"),
    ('{"config": {"method": "fedavg"}, "summary": {"final_accuracy": 0.5, "best_accuracy": 0.5, '
     '"uplink_bytes_per_client_round": "1000", "bits_per_parameter": 1, "ratio_vs_fp32": 1}}',
     "uplink_bytes_per_client_round expects a number"),
    ('{"config": {"method": "fedavg"}, "summary": {"final_accuracy": 0.5, "best_accuracy": 0.5, '
     '"uplink_bytes_per_client_round": Infinity, "bits_per_parameter": 1, "ratio_vs_fp32": 1}}',
     "uplink_bytes_per_client_round expects a number"),
    ("[" * 100_000, "is not valid JSON"),
], ids=["syntax", "utf", "list", "summary-list", "missing-field", "method", "seed", "string", "infinity", "deep"])
def test_malformed_metrics_file_is_a_typed_error_naming_it(tmp_path, text, message):
    (tmp_path / "fedavg").mkdir()
    path = tmp_path / "fedavg" / "metrics.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ResultsFileError) as err:
        frontier.build([tmp_path], tmp_path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_oversized_metrics_file_is_refused_before_parsing(tmp_path, monkeypatch):
    write_run(tmp_path / "fedavg", "fedavg", 0, (0.86, 0.87, 44000, 32.0, 1.0))
    monkeypatch.setattr(frontier, "MAX_METRICS_BYTES", 64)
    with pytest.raises(ResultsFileError, match="is larger than 64 bytes"):
        frontier.build([tmp_path], tmp_path)


def test_from_searches_four_levels_down_and_no_further(tmp_path):
    write_run(tmp_path / "a" / "b" / "c" / "fedavg", "fedavg", 0, (0.86, 0.87, 44000, 32.0, 1.0))
    write_run(tmp_path / "a" / "b" / "c" / "d" / "e" / "qsgd-4", "qsgd-4", 0, (0.80, 0.82, 1000, 0.5, 44.0))
    assert frontier.find_runs([tmp_path]) == [(tmp_path / "a" / "b" / "c" / "fedavg").resolve()]
    with pytest.raises(ConfigError, match="no finished runs"):
        frontier.find_runs([tmp_path / "a" / "b" / "c" / "d"], max_depth=1)
    with pytest.raises(ConfigError, match="is not a folder"):
        frontier.find_runs([tmp_path / "missing"])


# --- end to end: train, resume, rebuild ---

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 methods x 2 seeds of one real tiny setting, trained once for the tests below."""
    out = tmp_path_factory.mktemp("frontier")
    assert main(["frontier", "--method", "fedavg,qsgd-8", "--seeds", "0,1", *ARGS, "--out", str(out),
                 "--name", "fr"]) == 0
    return out / "fr"


def table_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_frontier_runs_every_seed_and_method_into_its_folder(trained):
    for seed in (0, 1):
        for method in ("fedavg", "qsgd-8"):
            doc = json.loads((trained / f"s{seed}" / method / "metrics.json").read_text())
            assert (doc["config"]["seed"], doc["config"]["method"]) == (seed, method)
    md = (trained / "frontier.md").read_text()
    assert md.startswith("# Frontier: synthetic, iid, 16 clients (1/round), 1 rounds, seeds 0, 1\n")
    rows = table_rows(md)
    assert [r.split(" | ")[:2] for r in rows] == [["| qsgd-8", "0, 1"], ["| fedavg", "0, 1"]]
    # FedAvg's update is CNN4 in float32, every byte counted: the same payload for each seed
    assert " | 1,567,386 | 32.001 | 1.0x | " in rows[1]
    finals = [json.loads((trained / f"s{s}" / "fedavg" / "metrics.json").read_text())["summary"]["final_accuracy"]
              for s in (0, 1)]
    cells = rows[1].split(" | ")
    assert cells[2] == f"{50 * (finals[0] + finals[1]):.2f}"
    assert cells[3] == f"{100 * abs(finals[0] - finals[1]) / math.sqrt(2):.2f}"  # sample std of two values
    assert (trained / "frontier.png").stat().st_size > 10_000


def test_frontier_rerun_does_not_retrain_and_from_gives_the_same_table(trained, tmp_path, capsys):
    metrics = sorted(trained.glob("s*/*/metrics.json"))
    assert len(metrics) == 4
    before = [p.stat().st_mtime_ns for p in metrics]
    table = table_rows((trained / "frontier.md").read_text())
    assert main(["frontier", "--method", "fedavg,qsgd-8", "--seeds", "0,1", *ARGS, "--out", str(trained.parent),
                 "--name", "fr"]) == 0
    assert [p.stat().st_mtime_ns for p in metrics] == before
    assert table_rows((trained / "frontier.md").read_text()) == table
    assert main(["frontier", "--from", str(trained), "--plot-out", str(tmp_path)]) == 0
    assert table_rows((tmp_path / "frontier.md").read_text()) == table
    # a copy of one run is a duplicate, named with both folders
    shutil.copytree(trained / "s0" / "fedavg", tmp_path / "copy" / "fedavg")
    capsys.readouterr()
    assert main(["frontier", "--from", str(trained), str(tmp_path / "copy"), "--plot-out", str(tmp_path)]) == 2
    assert "fedavg, seed 0 is in two folders" in capsys.readouterr().err


def test_archived_runs_give_the_same_table_as_their_folders(trained, tmp_path, capsys):
    """benchmarks/archive_run.py keeps a run's config and summary as <name>.run.json; frontier --from
    reads those files (in a folder, or named one by one) like the run folders they came from."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("archive_run", ROOT / "benchmarks" / "archive_run.py")
    archive_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archive_run)
    table = table_rows((trained / "frontier.md").read_text())
    dest = tmp_path / "results" / "tiny"
    for metrics in sorted(trained.glob("s*/*/metrics.json")):
        name = f"{metrics.parent.name}-{metrics.parent.parent.name}"
        assert archive_run.main([str(metrics), str(dest / f"{name}.run.json"), "--command", "fedcodec run x",
                                 "--commit", "abc1234"]) == 0
    kept = json.loads((dest / "fedavg-s0.run.json").read_text())
    assert kept["archived"] == {"command": "fedcodec run x", "commit": "abc1234"}
    assert [sorted(r) for r in kept["rounds"]] == [["accepted", "accuracy", "clients", "clipped", "downlink_bytes",
                                                    "rejected", "round", "train_loss", "uplink_bytes"]]
    assert main(["frontier", "--from", str(tmp_path / "results"), "--plot-out", str(tmp_path / "a")]) == 0
    assert table_rows((tmp_path / "a" / "frontier.md").read_text()) == table
    files = sorted(map(str, dest.glob("*.run.json")))
    assert len(files) == 4
    assert main(["frontier", "--from", *files]) == 0  # files named one by one; the table goes beside them
    assert table_rows((dest / "frontier.md").read_text()) == table
    # an archived run and the folder it came from are the same run twice
    capsys.readouterr()
    assert main(["frontier", "--from", str(dest), str(trained / "s0"), "--plot-out", str(tmp_path / "b")]) == 2
    assert "seed 0 is in two folders" in capsys.readouterr().err


def test_a_malformed_archived_run_is_a_typed_error_naming_it(tmp_path):
    path = tmp_path / "x.run.json"
    path.write_text('{"config": {"method": "fedavg"}, "summary": {"final_accuracy": 0.5}}')
    with pytest.raises(ResultsFileError) as err:
        frontier.build([tmp_path], tmp_path)
    assert str(path) in str(err.value) and "summary field best_accuracy" in str(err.value)
    (tmp_path / "notes.json").write_text("{}")  # other JSON files are not runs
    path.unlink()
    with pytest.raises(ConfigError, match=r"no finished runs \(<method>/metrics.json or \*.run.json\)"):
        frontier.find_runs([tmp_path])
    with pytest.raises(ConfigError, match="is not a folder or a .run.json file"):
        frontier.find_runs([tmp_path / "notes.json"])


def test_frontier_rejects_bad_seeds_and_methods_before_training(tmp_path, capsys):
    for seeds, message in (("0,0", "lists a seed twice"), ("0,x", "seed expects an integer"), (",", "--seeds")):
        assert main(["frontier", "--method", "fedavg", "--seeds", seeds, *ARGS, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    assert main(["frontier", "--method", "fedavg,qsgd-300", *ARGS, "--out", str(tmp_path)]) == 2
    assert "levels must be an integer in 1..255" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
