"""The Pareto picture: final accuracy against uplink bytes per update, over methods and seeds.

A user picks a codec by asking how much accuracy it costs for how many uplink bytes, every byte
counted. :func:`build` answers from finished run folders (``<method>/metrics.json``, as
:func:`fedcodec.report.write_method` leaves them, anywhere up to :data:`MAX_DEPTH` folders down) and
from archived runs (``*.run.json`` files of the same shape, ``benchmarks/archive_run.py``: a run's
config and summary kept in the repository after its folder is gone):

- runs are grouped into *points* by their recipe: the method and, where set, its ``lr`` and
  ``codec_options`` (``factor-32-ec lr=0.05`` is another point than ``factor-32-ec``); the seeds of a
  point are averaged (mean, and the sample standard deviation over seeds);
- every run must share one *setting*: the config less the seed, the recipe and the keys that do not
  change what a run computes (:data:`NOT_SETTING`: where it ran and wrote, threads, checkpoints). Runs
  of two settings (IID and Dirichlet, 2 and 30 rounds) are refused, naming the keys that differ;
- the x value is ``uplink_bytes_per_client_round`` of :func:`fedcodec.report.summarize`: every
  uplink byte a client sent, codec setup messages (the ae codec's decoders) included and spread over
  the run, per client per round, averaged over the seeds. A point is on the non-dominated front when
  no other point has at least its accuracy for at most its bytes, better in one of the two
  (:func:`pareto_front`).

It writes ``frontier.md`` (one row per point, by bytes) and ``frontier.png`` (accuracy vs bytes, log
x, error bars ± one standard deviation over seeds, the front as a step line). ``metrics.json`` files
are outside input: each is read only up to :data:`MAX_METRICS_BYTES`, and one that is too large, not
JSON or not shaped like fedcodec's is a :class:`~fedcodec.errors.ResultsFileError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import MAX_METHOD_NAME, Config, _finite, format_options
from .errors import ConfigError, ResultsFileError
from .files import read_bounded

#: a ``metrics.json`` larger than this is refused before it is parsed (30 rounds take about 100 kB)
MAX_METRICS_BYTES = 64 << 20
#: how many folders below each ``--from`` folder method folders are looked for (``root/s0/fedavg``: 2)
MAX_DEPTH = 4
#: how an archived run's file is named (``benchmarks/archive_run.py``)
ARCHIVE_SUFFIX = ".run.json"
#: at most this many runs in one frontier
MAX_RUNS = 10_000
#: config keys that are no part of a run's setting: the seed (averaged over), the recipe (one point
#: each), and where and how a run ran and wrote (same results, at most float rounding apart)
SEED, RECIPE = ("seed",), ("method", "lr", "codec_options")
NOT_SETTING = (*SEED, *RECIPE, "out_dir", "data_dir", "threads", "device", "batch_clients", "checkpoint_every",
               "plugins")
#: the summary fields a point is made of; accuracies may be NaN (a run never evaluated), the rest not
_ACCURACIES = ("final_accuracy", "best_accuracy")
_SIZES = ("uplink_bytes_per_client_round", "bits_per_parameter", "ratio_vs_fp32")


@dataclass(frozen=True)
class Run:
    """One finished run: its folder, recipe label, seed, setting and summary."""

    folder: Path
    label: str
    seed: int
    setting: dict[str, Any]
    summary: dict[str, float]


@dataclass(frozen=True)
class Point:
    """One recipe over its seeds: the means (and sample standard deviations, None for one seed) of
    its runs, and whether it is on the non-dominated front."""

    label: str
    seeds: tuple[int, ...]
    final: float
    final_std: float | None
    best: float
    bytes_per_update: float
    bits_per_parameter: float
    ratio_vs_fp32: float
    on_front: bool = False


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation) of ``values``; the deviation is None for one value."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


#: values this close (relative) are equal on the front: a mean over seeds (0.8 and 0.9 give
#: 0.8500000000000001) must not beat another 0.85 by its rounding
REL_TOL = 1e-9


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (bytes, accuracy): True when no other point dominates it, i.e. has at most its bytes
    and at least its accuracy, and fewer bytes or more accuracy. Values within :data:`REL_TOL` of each
    other are equal, and equal points do not dominate each other (both are on the front); a NaN
    accuracy is never on the front and dominates nothing."""
    def less(a: float, b: float) -> bool:
        return a < b and not math.isclose(a, b, rel_tol=REL_TOL)

    def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return not less(p[0], q[0]) and not less(q[1], p[1]) and (less(q[0], p[0]) or less(p[1], q[1]))

    valid = [p for p in points if not math.isnan(p[1])]
    return [not math.isnan(p[1]) and not any(dominates(q, p) for q in valid) for p in points]


# --- reading run folders ---

def find_runs(dirs: Iterable[str | Path], max_depth: int = MAX_DEPTH) -> list[Path]:
    """The method folders (holding a ``metrics.json`` file) and archived runs (``*.run.json`` files)
    in or below each of ``dirs``, at most ``max_depth`` folders down, in name order, each once; an
    entry of ``dirs`` may also name one ``*.run.json`` file. Symbolic links are not followed, and
    nothing below a method folder is searched."""
    found: dict[Path, None] = {}

    def add(path: Path) -> None:
        found[path.resolve()] = None
        if len(found) > MAX_RUNS:
            raise ConfigError(f"more than {MAX_RUNS} runs under {', '.join(map(str, dirs))}; "
                              "point at the folders of one setting")

    def walk(folder: Path, depth: int) -> None:
        if (folder / "metrics.json").is_file():
            add(folder)
            return
        try:
            entries = sorted((e.path, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                             for e in os.scandir(folder))
        except OSError as err:
            raise ConfigError(f"folder {folder} cannot be read ({err.strerror or err})") from None
        for path, is_dir, is_file in entries:
            if is_file and path.endswith(ARCHIVE_SUFFIX):
                add(Path(path))
            elif is_dir and depth < max_depth:
                walk(Path(path), depth + 1)

    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if d.is_file() and d.name.endswith(ARCHIVE_SUFFIX):
            add(d)
        elif not d.is_dir():
            raise ConfigError(f"{d} is not a folder or a {ARCHIVE_SUFFIX} file; --from takes run folders, e.g. "
                              "runs/<name>, or archived runs")
        else:
            walk(d, 0)
    if not found:
        raise ConfigError(f"no finished runs (<method>/metrics.json or *{ARCHIVE_SUFFIX}) in or below "
                          f"{', '.join(map(str, dirs))} (searched {max_depth} folders down)")
    return list(found)


def _number(value: Any, field: str, path: Path, nan: bool = False) -> float:
    """A summary field: a finite number >= 0 (or NaN, where ``nan``)."""
    if not ((_finite(value) and value >= 0) or (nan and isinstance(value, float) and math.isnan(value))):
        raise ResultsFileError(f"{path}: summary field {field} expects a number >= 0, got {_brief(value)}")
    return float(value)


def read_run(folder: str | Path) -> Run:
    """The :class:`Run` of a method folder's ``metrics.json``, or of an archived ``*.run.json`` file
    (see the module docstring for what is checked); a config key the file lacks (added to fedcodec
    after the run) takes its default."""
    path = Path(folder)
    if not (path.name.endswith(ARCHIVE_SUFFIX) and path.is_file()):
        path = path / "metrics.json"
    data = read_bounded(path, MAX_METRICS_BYTES, "run metrics")
    if len(data) > MAX_METRICS_BYTES:
        raise ResultsFileError(f"{path} is larger than {MAX_METRICS_BYTES} bytes; not a metrics.json of fedcodec")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8, over-long integers
        raise ResultsFileError(f"{path} is not valid JSON ({str(err)[:100]})") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("config"), dict) and isinstance(doc.get("summary"), dict)):
        raise ResultsFileError(f"{path} is not a metrics.json of fedcodec (a table with 'config' and 'summary')")
    config = Config().to_dict() | doc["config"]
    method, seed = config["method"], config["seed"]
    if not (isinstance(method, str) and 0 < len(method) <= MAX_METHOD_NAME and method.isprintable()
            and "|" not in method):
        raise ResultsFileError(f"{path}: config method expects a method name, got {_brief(method)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ResultsFileError(f"{path}: config seed expects an integer, got {_brief(seed)}")
    summary = {f: _number(doc["summary"].get(f), f, path, nan=f in _ACCURACIES) for f in _ACCURACIES + _SIZES}
    if not summary["uplink_bytes_per_client_round"] > 0 or not summary["ratio_vs_fp32"] > 0:
        raise ResultsFileError(f"{path}: a run that sent no uplink bytes has no place on the frontier")
    return Run(Path(folder), _label(config, path), seed, {k: v for k, v in config.items() if k not in NOT_SETTING},
               summary)


def _label(config: dict[str, Any], path: Path) -> str:
    """The recipe's name: the method, then its lr and codec options where the run set them."""
    lr, options = config["lr"], config["codec_options"]
    if not (lr is None or isinstance(lr, (int, float)) and not isinstance(lr, bool)) or not isinstance(options, dict):
        raise ResultsFileError(f"{path}: config lr or codec_options is not what fedcodec writes")
    extra = ([f"lr={lr:g}"] if lr is not None else []) + ([format_options(options)] if options else [])
    label = " ".join([config["method"], *extra])
    if len(label) > 200 or "|" in label or not label.isprintable():
        raise ResultsFileError(f"{path}: codec options too long or with '|' to name a point: {label[:80]!r}")
    return label


def _brief(value: Any) -> str:
    """A value for an error message: JSON, cut at 40 characters."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def check_one_setting(runs: Sequence[Run]) -> dict[str, Any]:
    """The setting ``runs`` share; runs of several settings are a :class:`ConfigError` naming each
    key that differs, with two folders that disagree on it."""
    first = runs[0].setting
    differ = {}
    for run in runs[1:]:
        for key in sorted(set(first) | set(run.setting)):
            if key not in differ and first.get(key) != run.setting.get(key):
                differ[key] = (f"{key}: {_brief(first.get(key))} in {runs[0].folder}, "
                               f"{_brief(run.setting.get(key))} in {run.folder}")
    if differ:
        raise ConfigError("these runs are not of one setting, so their accuracies are not comparable: "
                          + "; ".join(differ.values()) + ". Pass folders of one setting (a frontier compares "
                          "methods, and averages seeds, on one setting)")
    return first


def points(runs: Sequence[Run]) -> list[Point]:
    """The runs' recipes as :class:`Point` values, by bytes (then label), with the front marked. The
    same recipe and seed twice is a :class:`ConfigError` naming both folders."""
    groups: dict[str, dict[int, Run]] = {}
    for run in runs:
        seen = groups.setdefault(run.label, {})
        if run.seed in seen:
            raise ConfigError(f"{run.label}, seed {run.seed} is in two folders: {seen[run.seed].folder} and "
                              f"{run.folder}; pass one of them")
        seen[run.seed] = run
    out = []
    for label, by_seed in groups.items():
        members = [by_seed[s] for s in sorted(by_seed)]
        col = {f: [r.summary[f] for r in members] for f in _ACCURACIES + _SIZES}
        final, final_std = mean_std(col["final_accuracy"])
        per_update = statistics.fmean(col["uplink_bytes_per_client_round"])
        fp32 = statistics.fmean(b * r for b, r in zip(col["uplink_bytes_per_client_round"], col["ratio_vs_fp32"]))
        out.append(Point(label, tuple(sorted(by_seed)), final, final_std, statistics.fmean(col["best_accuracy"]),
                         per_update, statistics.fmean(col["bits_per_parameter"]), fp32 / per_update))
    out.sort(key=lambda p: (p.bytes_per_update, p.label))
    front = pareto_front([(p.bytes_per_update, p.final) for p in out])
    return [dataclasses.replace(p, on_front=f) for p, f in zip(out, front)]


# --- writing ---

def markdown(pts: Sequence[Point]) -> str:
    """One row per point: seeds, final accuracy (mean, sample std over seeds; — for one seed), best
    accuracy (mean; — where a run recorded none), uplink bytes per update, bits per parameter, ratio
    to float32, front or not."""
    rows = ["| method | seeds | final acc % | ± std | best acc % | uplink B/update | bits/param | ratio vs fp32 "
            "| front |", "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for p in pts:
        std = f"{100 * p.final_std:.2f}" if p.final_std is not None else "—"
        best = "—" if math.isnan(p.best) else f"{100 * p.best:.2f}"  # a run that recorded none (archives)
        rows.append(f"| {p.label} | {', '.join(map(str, p.seeds))} | {100 * p.final:.2f} | {std} | {best} "
                    f"| {p.bytes_per_update:,.0f} | {p.bits_per_parameter:.3f} | {p.ratio_vs_fp32:.1f}x "
                    f"| {'yes' if p.on_front else 'no'} |")
    return "\n".join(rows)


def plot(pts: Sequence[Point], path: Path, title: str) -> None:
    """Final accuracy (%) against uplink bytes per update (log x): a marker per point with ± one
    standard deviation over seeds, its name beside it, the non-dominated front as a step line and
    the compression ratio to float32 on the top axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .report import save_figure

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.get_cmap("tab20" if len(pts) > 10 else "tab10").colors
    for i, p in enumerate(pts):
        ax.errorbar(p.bytes_per_update, 100 * p.final, yerr=100 * (p.final_std or 0.0), fmt="o",
                    color=colors[i % len(colors)], capsize=3, ms=5, mec="black" if p.on_front else "none")
        ax.annotate(p.label, (p.bytes_per_update, 100 * p.final), xytext=(5, 4), textcoords="offset points",
                    fontsize=7.5)
    front = [p for p in pts if p.on_front]
    if front:
        ax.step([p.bytes_per_update for p in front], [100 * p.final for p in front], where="post", color="black",
                alpha=0.45, lw=1.2, label="non-dominated front")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("uplink bytes per update (per client per round, every byte; log scale)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    fp32 = statistics.fmean(p.bytes_per_update * p.ratio_vs_fp32 for p in pts)
    ratio = lambda b: fp32 / np.maximum(b, 1e-9)  # noqa: E731 (its own inverse)
    ax.secondary_xaxis("top", functions=(ratio, ratio)).set_xlabel("compression vs float32 (x)")
    ax.set_title(title)
    save_figure(fig, path)


def build(folders: Sequence[str | Path], dest: str | Path) -> tuple[str, Path, Path]:
    """Read the runs in ``folders`` (method folders, or folders above them: :func:`find_runs`), check
    they share one setting, and write ``dest/frontier.md`` and ``dest/frontier.png``. Returns (the
    title and table, the two paths)."""
    from .report import atomic_write_text, run_title

    runs = [read_run(f) for f in find_runs(folders)]
    setting = check_one_setting(runs)
    pts = points(runs)
    seeds = sorted({r.seed for r in runs})
    title = f"{run_title(setting)}, {setting['rounds']} rounds, seeds {', '.join(map(str, seeds))}"
    table = markdown(pts)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    md, png = dest / "frontier.md", dest / "frontier.png"
    atomic_write_text(md, f"# Frontier: {title}\n\n{table}\n\n"
                          "Final and best accuracy: mean over seeds (± the sample standard deviation). Uplink B/update: "
                          "bytes a client sent per round, every byte (headers, seeds, setup messages spread over "
                          "the run), mean over seeds. Front: no other method reaches at least its accuracy with at "
                          "most its bytes.\n")
    plot(pts, png, title)
    return f"{title}\n{table}", md, png


__all__ = ["Run", "Point", "mean_std", "pareto_front", "find_runs", "read_run", "check_one_setting", "points",
           "markdown", "plot", "build", "MAX_METRICS_BYTES", "MAX_DEPTH", "NOT_SETTING", "ARCHIVE_SUFFIX"]
