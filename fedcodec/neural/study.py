"""Seeds, samples per client and the statistics behind ``fedcodec neural train --seeds ...``.

A *study* repeats the λ sweep of :func:`~fedcodec.neural.experiment.run_sweep` for several seeds
(the source's data, the clients' mixtures, the models' initialisation and the training noise all
change with the seed) and, optionally, several numbers of training samples per client. Each
(samples, seed) pair is one *unit*, trained in its own folder ``<out>/n<samples>/seed<seed>`` (so
units resume, and run as parallel single-thread processes with ``jobs``), and then summarised:

- **BD-rate per client**: for every client, the Bjøntegaard rate difference between its own
  rate-distortion curves (its test data coded with its own codec under each mode), averaged over
  the clients of a seed; the study reports the mean over seeds and a 95% confidence interval
  (Student's t over the seeds). The BD-rate of the clients' mean curves is reported beside it.
- **J = rate + λ·MSE** at each λ, per mode (the quantity every mode is trained to minimise): a
  view that needs no curve fitting, so it holds even where the curves barely overlap.
- **PSNR overlap**: the PSNR range all modes share on each seed; a BD-rate over a thin overlap is
  fragile, and the report says how wide it is.
- **The crossover n\\***: with several samples-per-client values, the number of samples per client
  where local-only training starts to beat the federated codec (BD-rate local → federated crossing
  zero, interpolated in log n); plotted as BD-rate vs samples per client with its confidence band.

Files: ``study.json`` (everything), ``study.md`` (tables), ``rd-ci.png`` (rate-distortion curves,
means over seeds with 95% bands in both directions), ``bd-vs-n.png`` (with several sample sizes).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .bdrate import bd_rate

#: (anchor, test) pairs summarised per client; negative = the test mode needs fewer bits
STUDY_COMPARISONS = [("local", "federated"), ("local", "federated+fit"), ("global", "federated"),
                     ("local", "global+ft"), ("federated", "oracle"), ("local", "oracle"),
                     ("federated (no offsets)", "federated"), ("local", "federated-bias"),
                     ("federated", "federated-bias")]


def unit_dir(out: Path, samples: int | None, seed: int) -> Path:
    return out / (f"n{samples}" if samples is not None else "n-default") / f"seed{seed}"


def _unit(job: dict) -> dict:
    """One (samples, seed) sweep in this process, single-threaded (a worker of :func:`run_study`)."""
    import torch

    from .experiment import run_sweep

    torch.set_num_threads(job.pop("threads"))
    return run_sweep(**job)


def run_study(source: str, lambdas: list[float] | None, modes: list[str], out: Path, seeds: list[int],
              samples: list[int | None], data_dir: str | None = None, jobs: int = 1, threads: int = 1,
              progress: bool = True, alpha: float | None = None, **overrides) -> dict:
    """Run every (samples, seed) unit (resuming finished ones), then write the study's summary."""
    if not seeds:
        raise ConfigError("a study needs at least one seed")
    if len(set(seeds)) != len(seeds) or len(set(samples)) != len(samples):
        raise ConfigError("seeds and samples-per-client values must not repeat")
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    units = []
    for n in samples:
        for seed in seeds:
            units.append(dict(source=source, lambdas=lambdas, modes=modes, out=unit_dir(out, n, seed),
                              data_dir=data_dir, progress=progress and jobs == 1, samples_per_client=n,
                              alpha=alpha, threads=threads, **{**overrides, "seed": seed}))
    if jobs == 1:
        results = [_unit(dict(u)) for u in units]
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_unit, [dict(u) for u in units]))
    by_n: dict[str, list[dict]] = {}
    for u, r in zip(units, results):
        by_n.setdefault(str(u["samples_per_client"]), []).append(r)
    return write_study(summarize(by_n, source=source, seeds=seeds), results[0], out)


def write_study(study: dict, first: dict, out: Path) -> dict:
    """Write ``study`` (with the note and settings of the unit result ``first``) to ``out``:
    study.json, study.md, rd-ci.png and, with several sample sizes, bd-vs-n.png."""
    study["note"] = first.get("note", "")
    study["settings"] = first.get("settings", {})
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "study.md").write_text(study_markdown(study))
    plot_rd(study, out / "rd-ci.png")
    if len(study["by_samples"]) > 1:
        plot_bd_vs_n(study, out / "bd-vs-n.png")
    return study


#: a unit's results.json read by :func:`combine` is at most this large
MAX_RESULTS_BYTES = 64 << 20


def load_unit(path: Path, lambdas: set[float] | None) -> dict:
    """One unit's ``results.json``, checked for the shape :func:`summarize` reads, its curves cut to
    ``lambdas`` (all: None)."""
    def fail(why: str) -> ConfigError:
        return ConfigError(f"{path} is not a sweep's results.json ({why}); rerun its 'fedcodec neural train'")

    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise fail(f"larger than {MAX_RESULTS_BYTES >> 20} MiB")
    try:
        result = json.loads(path.read_text())
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise fail(f"not JSON: {str(err)[:60]}") from None
    if not (isinstance(result, dict) and isinstance(result.get("curves"), dict) and result["curves"]
            and isinstance(result.get("source"), str)):
        raise fail("no source or curves")
    curves = {}
    for lam, entry in result["curves"].items():
        try:
            value = float(lam)
        except ValueError:
            raise fail(f"λ key {lam[:20]!r}") from None
        if not isinstance(entry, dict):
            raise fail(f"the entry of λ {lam} is not an object")
        if lambdas is None or value in lambdas:
            curves[lam] = entry
    if not curves:
        raise fail(f"none of the λ values {sorted(lambdas or [])} is in it")
    return {**result, "curves": curves}


def combine(folders: list[Path], out: Path, lambdas: list[float] | None = None) -> dict:
    """The study of units trained before, possibly by several commands (e.g. one per sample size):
    every ``n<N>/seed<S>/results.json`` under ``folders``, curves cut to ``lambdas``, summarised and
    written to ``out`` as :func:`run_study` writes its own (``fedcodec neural study``). The units
    must share one source; a (samples, seed) unit found twice is an error."""
    wanted = None if lambdas is None else {float(v) for v in lambdas}
    units: dict[str, dict[int, dict]] = {}
    source = None
    for folder in folders:
        paths = sorted(Path(folder).glob("n*/seed*/results.json"))
        if not paths:
            raise ConfigError(f"{folder} holds no study units (n<N>/seed<S>/results.json)")
        for path in paths:
            n, seed = path.parent.parent.name[1:], path.parent.name[len("seed"):]
            if not (n.isdigit() or n == "-default") or not seed.isdigit():
                continue
            result = load_unit(path, wanted)
            if source is not None and result["source"] != source:
                raise ConfigError(f"{path} is a study of {result['source']!r}, the others of {source!r}")
            source = result["source"]
            if int(seed) in units.setdefault(n, {}):
                raise ConfigError(f"unit n{n}/seed{seed} is in two of the folders given")
            units[n][int(seed)] = result
    by_n = {n: [u[s] for s in sorted(u)] for n, u in sorted(units.items(), key=lambda kv: (not kv[0].isdigit(),
                                                                                          int(kv[0]) if kv[0].isdigit()
                                                                                          else 0))}
    seeds = sorted({s for u in units.values() for s in u})
    study = summarize(by_n, source=source or "", seeds=seeds)
    study["units"] = {n: sorted(u) for n, u in units.items()}
    return write_study(study, next(iter(by_n.values()))[0], out)


# ---- statistics ------------------------------------------------------------------------------

def ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval of the mean; Student's t, n − 1 degrees of
    freedom). One value: (value, nan)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), math.nan
    from scipy.stats import t

    return float(v.mean()), float(t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def _curve(result: dict, mode: str, client: int | None = None) -> tuple[list[float], list[float], list[float]]:
    """(λ, rate, PSNR) of ``mode`` in one sweep's result: the clients' mean point, or one client's."""
    lams, rates, psnrs = [], [], []
    for lam, entry in sorted(result["curves"].items(), key=lambda kv: float(kv[0])):
        p = entry.get(mode)
        if p is None:
            continue
        if client is not None:
            p = p["clients"][client]
        lams.append(float(lam))
        rates.append(p["rate"])
        psnrs.append(p["psnr"])
    return lams, rates, psnrs


def _bd(a: tuple, b: tuple) -> float | None:
    try:
        return bd_rate(a[1], a[2], b[1], b[2])
    except ConfigError:
        return None


def per_client_bd(result: dict, anchor: str, test: str) -> list[float | None]:
    """BD-rate of ``test`` against ``anchor`` for every client (None where its curves share no PSNR)."""
    first = next(iter(result["curves"].values()))
    if anchor not in first or test not in first or "clients" not in first[anchor]:
        return []
    k = len(first[anchor]["clients"])
    return [_bd(_curve(result, anchor, c), _curve(result, test, c)) for c in range(k)]


def psnr_overlap(result: dict, modes: list[str]) -> tuple[float, float] | None:
    """The PSNR interval every mode's mean curve covers (None: they share none)."""
    spans = []
    for m in modes:
        _, _, q = _curve(result, m)
        if len(q) >= 2:
            spans.append((min(q), max(q)))
    if not spans:
        return None
    lo, hi = max(s[0] for s in spans), min(s[1] for s in spans)
    return (lo, hi) if hi > lo else None


def summarize(by_n: dict[str, list[dict]], source: str = "", seeds: list[int] | None = None) -> dict:
    """The study's numbers from each samples-per-client value's per-seed sweep results."""
    study: dict = {"source": source, "seeds": list(seeds or []), "by_samples": {}}
    for n, results in by_n.items():
        modes = [m for m in results[0]["curves"][next(iter(results[0]["curves"]))] if not m.startswith("_")]
        train_modes = [m for m in ("federated", "federated-bias", "global", "local", "oracle") if m in modes]
        entry: dict = {"unit": results[0].get("unit", ""), "comparisons": {}, "J": {}, "overlap": [], "curves": {}}
        for anchor, test in STUDY_COMPARISONS:
            if anchor not in modes or test not in modes:
                continue
            per_seed = [per_client_bd(r, anchor, test) for r in results]
            client_means = [float(np.mean([v for v in s if v is not None])) if any(v is not None for v in s)
                            else None for s in per_seed]
            mean_curve = [_bd(_curve(r, anchor), _curve(r, test)) for r in results]
            m, h = ci95(client_means)
            mc, hc = ci95(mean_curve)
            entry["comparisons"][f"{anchor} -> {test}"] = {
                "per_client_mean": m, "ci95": h, "per_seed": client_means,
                "clients_without_overlap": int(sum(v is None for s in per_seed for v in s)),
                "mean_curve": mc, "mean_curve_ci95": hc, "mean_curve_per_seed": mean_curve}
        lams = sorted({float(lam) for r in results for lam in r["curves"]})
        for mode in modes:
            rows = []
            for lam in lams:
                js, rates, psnrs = [], [], []
                for r in results:
                    p = r["curves"].get(f"{lam:g}", {}).get(mode)
                    if p is not None:
                        js.append(p["rate"] + lam * p["mse"])
                        rates.append(p["rate"])
                        psnrs.append(p["psnr"])
                if js:
                    jm, jh = ci95(js)
                    rm, rh = ci95(rates)
                    qm, qh = ci95(psnrs)
                    rows.append({"lmbda": lam, "J": jm, "J_ci95": jh, "rate": rm, "rate_ci95": rh,
                                 "psnr": qm, "psnr_ci95": qh, "seeds": len(js)})
            entry["J"][mode] = rows
        entry["overlap"] = [psnr_overlap(r, train_modes) for r in results]
        study["by_samples"][n] = entry
    study["crossover"] = crossover(study)
    return study


def crossover(study: dict, anchor: str = "local", test: str = "federated") -> dict:
    """n*: the samples per client where BD-rate(anchor → test) crosses zero upwards (the test mode
    stops winning), linearly interpolated in log n between the bracketing sample sizes."""
    key = f"{anchor} -> {test}"
    pts = sorted((int(n), e["comparisons"][key]["per_client_mean"]) for n, e in study["by_samples"].items()
                 if n.isdigit() and key in e["comparisons"] and math.isfinite(e["comparisons"][key]["per_client_mean"]))
    out: dict = {"comparison": key, "points": pts, "n_star": None}
    for (n0, b0), (n1, b1) in zip(pts, pts[1:]):
        if b0 < 0 <= b1:
            f = -b0 / (b1 - b0)
            out["n_star"] = float(math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0))))
            break
    if out["n_star"] is None and pts:
        out["note"] = ("the test mode wins at every size tried" if all(b < 0 for _, b in pts) else
                       "the anchor wins at every size tried" if all(b >= 0 for _, b in pts) else
                       "no upward zero crossing")
    return out


# ---- report ----------------------------------------------------------------------------------

def _pm(m: float, h: float, unit: str = "%", signed: bool = True, digits: int = 1) -> str:
    if not math.isfinite(m):
        return "—"
    text = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return f"{text}{unit} ± {h:.{digits}f}" if math.isfinite(h) else f"{text}{unit}"


def study_markdown(study: dict) -> str:
    seeds = study["seeds"]
    lines = [f"# Federated neural compression study: {study['source']}", "",
             *([f"Source: {study['note']}.", ""] if study.get("note") else []),
             f"Seeds {', '.join(map(str, seeds))} ({len(seeds)}); means ± 95% confidence half-widths (Student's t "
             "over seeds). BD-rate per client: each client's own curves, averaged over the clients of a seed. "
             "Negative: the second mode needs fewer bits at equal PSNR.", ""]
    for n, e in study["by_samples"].items():
        lines += [f"## {n} training samples per client" if n.isdigit() else "## the source's default samples", "",
                  "| anchor → mode | BD-rate per client | BD-rate of mean curves | clients without overlap |",
                  "|---|---:|---:|---:|"]
        for key, c in e["comparisons"].items():
            lines.append(f"| {key.replace(' -> ', ' → ')} | {_pm(c['per_client_mean'], c['ci95'])} | "
                         f"{_pm(c['mean_curve'], c['mean_curve_ci95'])} | {c['clients_without_overlap']} |")
        spans = [f"{o[0]:.2f}–{o[1]:.2f}" if o else "none" for o in e["overlap"]]
        lines += ["", f"PSNR range shared by every trained mode, per seed (dB): {', '.join(spans)}", "",
                  f"| mode | λ | J = rate + λ·MSE | rate ({e['unit']}) | PSNR (dB) |", "|---|---:|---:|---:|---:|"]
        for mode, rows in e["J"].items():
            for r in rows:
                lines.append(f"| {mode} | {r['lmbda']:g} | {_pm(r['J'], r['J_ci95'], '', False, 3)} | "
                             f"{_pm(r['rate'], r['rate_ci95'], '', False, 3)} | "
                             f"{_pm(r['psnr'], r['psnr_ci95'], '', False, 2)} |")
        lines.append("")
    x = study["crossover"]
    if len(x["points"]) > 1:
        where = f"n* ≈ {x['n_star']:.0f} samples per client" if x["n_star"] else x.get("note", "")
        lines += [f"Crossover ({x['comparison']}): {where}.", ""]
    return "\n".join(lines)


def plot_rd(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(study["by_samples"].items())
    fig, axes = plt.subplots(1, len(entries), figsize=(5.5 * len(entries), 4.2), squeeze=False)
    for ax, (n, e) in zip(axes[0], entries):
        for mode, rows in e["J"].items():
            if not rows or ":" in mode:
                continue
            r = np.array([row["rate"] for row in rows])
            q = np.array([row["psnr"] for row in rows])
            qh = np.nan_to_num(np.array([row["psnr_ci95"] for row in rows]))
            rh = np.nan_to_num(np.array([row["rate_ci95"] for row in rows]))
            line, = ax.plot(r, q, marker="o", ms=3, label=mode)
            ax.fill_between(r, q - qh, q + qh, color=line.get_color(), alpha=0.15, lw=0)
            ax.errorbar(r, q, xerr=rh, fmt="none", ecolor=line.get_color(), alpha=0.5, lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"rate ({e['unit']}, from bytes)")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"{study['source']}, {n} samples/client" if n.isdigit() else study["source"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bd_vs_n(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for key in ("local -> federated", "local -> oracle", "local -> global+ft"):
        pts = sorted((int(n), e["comparisons"][key]) for n, e in study["by_samples"].items()
                     if n.isdigit() and key in e["comparisons"])
        if not pts:
            continue
        n = np.array([p[0] for p in pts])
        m = np.array([p[1]["per_client_mean"] for p in pts])
        h = np.nan_to_num(np.array([p[1]["ci95"] for p in pts]))
        line, = ax.plot(n, m, marker="o", label=key.replace(" -> ", " → "))
        ax.fill_between(n, m - h, m + h, color=line.get_color(), alpha=0.2, lw=0)
    x = study["crossover"]
    if x.get("n_star"):
        ax.axvline(x["n_star"], color="k", ls=":", lw=1)
        ax.annotate(f"n* ≈ {x['n_star']:.0f}", (x["n_star"], 0), textcoords="offset points", xytext=(4, 6))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    sizes = sorted(int(n) for n in study["by_samples"] if n.isdigit())
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training samples per client")
    ax.set_ylabel("BD-rate vs local-only (%), per client")
    ax.set_title(study["source"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
