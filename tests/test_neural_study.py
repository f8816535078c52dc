"""The study layer of learned compression: BD-rates per client, confidence intervals over seeds, J
per λ, the crossover n*, and the CLI's parsing of seeds and lists (no training: hand-made sweeps)."""

from __future__ import annotations

import math

import pytest

from fedcodec.errors import ConfigError
from fedcodec.neural.cli import _floats, _seeds
from fedcodec.neural.study import ci95, crossover, per_client_bd, plot_bd_vs_n, plot_rd, psnr_overlap, \
    study_markdown, summarize

LAMS = (10.0, 30.0, 100.0, 300.0)
PSNRS = (12.0, 15.0, 18.0, 21.0)


def point(rate: float, psnr: float) -> dict:
    return {"rate": rate, "psnr": psnr, "mse": 10 ** (-psnr / 10), "rate_est": rate, "bytes": 1}


def sweep(factors: dict[str, list[float]]) -> dict:
    """A sweep result: mode → per-client rate factors; client c's anchor rates are (1+c)·(1, 2, 4, 8)
    at PSNRs 12..21 dB, and each mode's rates are the anchor's times its client's factor."""
    curves = {}
    for i, lam in enumerate(LAMS):
        entry = {}
        for mode, fs in factors.items():
            clients = [point((1 + c) * 2 ** i * f, PSNRS[i]) for c, f in enumerate(fs)]
            mean = point(sum(p["rate"] for p in clients) / len(clients), PSNRS[i])
            entry[mode] = {**mean, "clients": clients}
        curves[f"{lam:g}"] = entry
    return {"unit": "bits/sample", "curves": curves}


def test_ci95_is_students_t_over_the_seeds():
    m, h = ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(2.4841, abs=1e-4)  # t(0.975, 2) = 4.3027; s = 1; /sqrt(3)
    assert ci95([5.0])[0] == 5.0 and math.isnan(ci95([5.0])[1])
    assert ci95([2.0, None, float("nan"), 4.0])[0] == 3.0


def test_per_client_bd_rate_is_each_clients_own_curves():
    r = sweep({"local": [1, 1, 1], "federated": [0.5, 1.0, 2.0]})
    bd = per_client_bd(r, "local", "federated")
    assert bd == pytest.approx([-50.0, 0.0, 100.0])


def test_summary_means_over_clients_then_seeds_and_reports_j():
    seeds = [sweep({"local": [1, 1], "federated": [0.5, 0.5]}), sweep({"local": [1, 1], "federated": [1.0, 1.0]})]
    s = summarize({"30": seeds}, source="toy", seeds=[0, 1])
    c = s["by_samples"]["30"]["comparisons"]["local -> federated"]
    assert c["per_seed"] == pytest.approx([-50.0, 0.0])
    assert c["per_client_mean"] == pytest.approx(-25.0)
    assert c["ci95"] == pytest.approx(12.706 * 25.0 * math.sqrt(2) / math.sqrt(2), rel=1e-3)  # t(.975,1)·s/√2
    j = s["by_samples"]["30"]["J"]["local"][0]  # λ = 10: mean rate of clients 1 and 2 is 1.5, MSE 10^-1.2
    assert j["lmbda"] == 10.0 and j["J"] == pytest.approx(1.5 + 10 * 10 ** -1.2)
    assert s["by_samples"]["30"]["overlap"] == [(12.0, 21.0), (12.0, 21.0)]
    text = study_markdown(s)
    assert "| local → federated | -25.0% ± " in text


def test_crossover_interpolates_in_log_samples():
    study = {"by_samples": {"10": {"comparisons": {"local -> federated": {"per_client_mean": -20.0}}},
                            "100": {"comparisons": {"local -> federated": {"per_client_mean": 10.0}}},
                            "1000": {"comparisons": {"local -> federated": {"per_client_mean": 30.0}}}}}
    assert crossover(study)["n_star"] == pytest.approx(10 ** (5 / 3))  # 2/3 of the way from 10 to 100 in log n
    study["by_samples"]["100"]["comparisons"]["local -> federated"]["per_client_mean"] = -5.0
    study["by_samples"]["1000"]["comparisons"]["local -> federated"]["per_client_mean"] = -1.0
    x = crossover(study)
    assert x["n_star"] is None and x["note"] == "the test mode wins at every size tried"


def test_psnr_overlap_of_modes():
    r = sweep({"local": [1], "federated": [1]})
    assert psnr_overlap(r, ["local", "federated"]) == (12.0, 21.0)
    for entry, q in zip(r["curves"].values(), (30.0, 31.0, 32.0, 33.0)):
        entry["federated"]["psnr"] = q
    assert psnr_overlap(r, ["local", "federated"]) is None


def test_plots_are_written(tmp_path):
    by_n = {"10": [sweep({"local": [1, 1], "federated": [0.5, 0.7]})] * 2,
            "100": [sweep({"local": [1, 1], "federated": [1.2, 1.1]})] * 2}
    s = summarize(by_n, source="toy", seeds=[0, 1])
    plot_rd(s, tmp_path / "rd.png")
    plot_bd_vs_n(s, tmp_path / "bd.png")
    assert (tmp_path / "rd.png").stat().st_size > 5000 and (tmp_path / "bd.png").stat().st_size > 5000
    assert s["crossover"]["n_star"] is not None and 10 < s["crossover"]["n_star"] < 100


def test_cli_lists_and_seeds_are_checked():
    assert _seeds("0-4") == [0, 1, 2, 3, 4] and _seeds("3,1") == [3, 1]
    assert _floats("10,30,100", "--lambdas") == [10.0, 30.0, 100.0] and _floats(None, "--x") == []
    for bad in ("a-b", "1,1", "0-500", "-3"):
        with pytest.raises(ConfigError, match="--seeds"):
            _seeds(bad)
    for bad in ("10,x", "0,1", "nan", "inf"):
        with pytest.raises(ConfigError, match="--lambdas"):
            _floats(bad, "--lambdas")


def test_combine_makes_one_study_from_folders_of_units(tmp_path):
    """`fedcodec neural study`: units of two commands (one per sample size) as one study, curves cut to
    the λ asked for; bad folders and files are refused with a reason."""
    import json

    from fedcodec.neural.study import combine

    def write(folder, n, seed, result):
        path = tmp_path / folder / f"n{n}" / f"seed{seed}" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"source": "toy", **result}))

    for seed in (0, 1):
        write("a", 10, seed, sweep({"local": [1, 1], "federated": [0.5, 0.5]}))
        big = sweep({"local": [1, 1], "federated": [2.0, 2.0]})
        big["curves"]["1000"] = {"federated": {**point(99.0, 30.0), "clients": [point(99.0, 30.0)] * 2}}
        write("b", 100, seed, big)
    study = combine([tmp_path / "a", tmp_path / "b"], tmp_path / "out", lambdas=list(LAMS))
    assert list(study["by_samples"]) == ["10", "100"] and study["units"] == {"10": [0, 1], "100": [0, 1]}
    by = study["by_samples"]
    assert by["10"]["comparisons"]["local -> federated"]["per_client_mean"] == pytest.approx(-50.0)
    assert by["100"]["comparisons"]["local -> federated"]["per_client_mean"] == pytest.approx(100.0)
    assert [r["lmbda"] for r in by["100"]["J"]["federated"]] == list(LAMS)  # λ 1000 cut
    # BD −50% at 10, +100% at 100: the crossover is a third of the way in log n (0 = −50 + 150·f)
    assert study["crossover"]["n_star"] == pytest.approx(10 ** (1 + 1 / 3))
    assert (tmp_path / "out" / "bd-vs-n.png").stat().st_size > 0 and "n* ≈ 22" in (tmp_path / "out" /
                                                                                       "study.md").read_text()
    with pytest.raises(ConfigError, match="in two of the folders"):
        combine([tmp_path / "a", tmp_path / "a"], tmp_path / "out")
    with pytest.raises(ConfigError, match="holds no study units"):
        combine([tmp_path / "out"], tmp_path / "out")
    with pytest.raises(ConfigError, match="none of the λ values"):
        combine([tmp_path / "a"], tmp_path / "out", lambdas=[7.0])
    (tmp_path / "a" / "n10" / "seed1" / "results.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a sweep's results.json"):
        combine([tmp_path / "a"], tmp_path / "out")


def test_archived_study_gives_the_same_summary_as_its_folder(tmp_path):
    """benchmarks/archive_neural.py copies a study's results (not its codecs) so that `neural study`
    rebuilds the same summary from the copy; a folder without units and a corrupt unit are refused."""
    import importlib.util
    import json
    from pathlib import Path

    from fedcodec.neural.study import combine

    spec = importlib.util.spec_from_file_location(
        "archive_neural", Path(__file__).resolve().parents[1] / "benchmarks" / "archive_neural.py")
    archive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archive)
    for seed, f in ((0, 0.5), (1, 0.8)):
        unit = tmp_path / "run" / "n10" / f"seed{seed}"
        (unit / "federated-l10").mkdir(parents=True)
        (unit / "results.json").write_text(json.dumps({"source": "toy", **sweep({"local": [1, 1],
                                                                                 "federated": [f, f]})}))
        (unit / "federated-l10" / "codec.safetensors").write_bytes(b"weights")
    assert archive.main([str(tmp_path / "run"), str(tmp_path / "kept"), "--command", "fedcodec neural train x",
                         "--commit", "abc1234"]) == 0
    kept = sorted(p.relative_to(tmp_path / "kept").as_posix() for p in (tmp_path / "kept").rglob("*") if p.is_file())
    assert kept == ["ARCHIVED.md", "n10/seed0/results.json", "n10/seed1/results.json"]
    assert "fedcodec neural train x" in (tmp_path / "kept" / "ARCHIVED.md").read_text()
    a = combine([tmp_path / "run"], tmp_path / "a")["by_samples"]["10"]["comparisons"]["local -> federated"]
    b = combine([tmp_path / "kept"], tmp_path / "b")["by_samples"]["10"]["comparisons"]["local -> federated"]
    assert a == b and a["per_client_mean"] == pytest.approx(-35.0)
    with pytest.raises(SystemExit):
        archive.main([str(tmp_path / "a"), str(tmp_path / "x"), "--command", "c", "--commit", "d"])
    (tmp_path / "run" / "n10" / "seed1" / "results.json").write_text("[]")
    with pytest.raises(ConfigError, match="not a sweep's results.json"):
        archive.main([str(tmp_path / "run"), str(tmp_path / "y"), "--command", "c", "--commit", "d"])
