"""The λ sweep behind ``fedcodec neural train``: train every mode at every λ, code the clients' test
data to real bytes, and write ``results.json``, ``results.md`` (with BD-rates) and ``rd.png``.

Curves (each point: clients' mean rate from real bytes, and mean MSE):

- ``federated``: shared transforms + each client's personalized entropy model, as trained;
- ``federated+fit``: the same, after each client refits its entropy model to the final transforms
  (local computation only, nothing sent);
- ``global``: one codec, everything averaged; ``global+ft``: each client refits the entropy model;
- ``local``: each client's own codec, trained alone with the same local steps;
- newcomers (clients that took no part): the federated transforms with the clients' mean entropy
  model vs with their own fitted one; the global codec as is and with its own fitted entropy model;
- photos only: held-out photographs, and JPEG / WebP on the same images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from .bdrate import bd_rate
from .federated import (MODES, Settings, Trained, average_prior, fit_prior, mean_point, rd_point, train)
from .models import NTC
from .sources import NeuralSource, load_source

# BD-rate comparisons reported: (anchor, test); negative = test needs fewer bits at equal MSE
COMPARISONS = [("local", "federated"), ("local", "federated+fit"), ("global", "federated"),
               ("global+ft", "federated+fit"), ("local", "global+ft"),
               ("newcomer: shared prior", "newcomer: own prior"), ("newcomer: global", "newcomer: global+fit"),
               ("holdout: jpeg", "holdout: federated"), ("holdout: jpeg", "holdout: global"),
               ("holdout: jpeg", "holdout: local"), ("holdout: jpeg", "holdout: webp"),
               ("federated", "oracle"), ("local", "oracle"), ("federated (no offsets)", "federated"),
               ("local", "federated-bias"), ("federated", "federated-bias")]


def _fitted(models: list[NTC], data: list[torch.Tensor], s: Settings, salt: int) -> list[NTC]:
    return [fit_prior(m, x, s.finetune_epochs, s.batch_size, s.lr * s.prior_lr_scale,
                      seed=s.seed * 1000 + salt * 100 + c)
            for c, (m, x) in enumerate(zip(models, data))]


def _with_prior(model: NTC, prior: dict[str, torch.Tensor]) -> NTC:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(prior, strict=False)
    return m.eval()


def _curve_point(models: list[NTC], data: list[torch.Tensor]) -> dict:
    """The clients' mean point, with each client's own point under ``clients``."""
    points = [rd_point(m, x) for m, x in zip(models, data)]
    return {**mean_point(points), "clients": points}


def _without_offsets(model: NTC) -> NTC:
    """The same codec quantizing on the plain integer grid (no personal offsets): training does not
    depend on the offsets (uniform noise is shift-invariant), so this isolates their effect."""
    import copy
    import dataclasses

    m = copy.deepcopy(model)
    m.cfg = dataclasses.replace(m.cfg, offsets=False)
    return m.eval()


def evaluate(src: NeuralSource, trained: Trained, s: Settings) -> dict[str, dict]:
    """All the curves' points that trained run ``trained`` gives (each with its clients' points)."""
    k = src.num_clients
    models = [trained.model(c) for c in range(k)]
    pts = {trained.mode: _curve_point(models, src.test)}
    if getattr(models[0].cfg, "offsets", False) and trained.mode in ("federated", "federated-bias", "local", "oracle"):
        pts[f"{trained.mode} (no offsets)"] = _curve_point([_without_offsets(m) for m in models], src.test)
    if trained.mode == "federated":
        fitted = _fitted(models, src.train, s, 1)
        pts["federated+fit"] = _curve_point(fitted, src.test)
        shared = _with_prior(models[0], average_prior(fitted))
        if src.newcomers_train:
            pts["newcomer: shared prior"] = _curve_point([shared] * len(src.newcomers_test), src.newcomers_test)
            own = _fitted([shared] * len(src.newcomers_train), src.newcomers_train, s, 2)
            pts["newcomer: own prior"] = _curve_point(own, src.newcomers_test)
        if src.holdout:
            pts["holdout: federated"] = rd_point(shared, [x for _, x in src.holdout])
    elif trained.mode == "global":
        fitted = _fitted(models, src.train, s, 1)
        pts["global+ft"] = _curve_point(fitted, src.test)
        if src.newcomers_train:
            pts["newcomer: global"] = _curve_point([models[0]] * len(src.newcomers_test), src.newcomers_test)
            own = _fitted([models[0]] * len(src.newcomers_train), src.newcomers_train, s, 2)
            pts["newcomer: global+fit"] = _curve_point(own, src.newcomers_test)
        if src.holdout:
            pts["holdout: global"] = rd_point(models[0], [x for _, x in src.holdout])
    elif trained.mode == "local" and src.holdout:  # each client's codec on the held-out photos, averaged
        pts["holdout: local"] = mean_point([rd_point(m, [x for _, x in src.holdout]) for m in models])
    for p in pts.values():
        p["uplink_bytes"] = trained.uplink_bytes
        p["uplink_payloads"] = trained.uplink_payloads
    return pts


def standard_curves(src: NeuralSource) -> dict[str, list[dict]]:
    """JPEG and WebP on the held-out photos (real files, Pillow), over a quality sweep."""
    from .standard import codec_curve

    images = [x[0].permute(1, 2, 0).numpy() for _, x in src.holdout]
    out = {}
    for fmt in ("jpeg", "webp"):
        out[f"holdout: {fmt}"] = codec_curve(images, fmt, [1, 3, 5, 10, 20, 30, 50, 70, 90])
    return out


def run_sweep(source: str, lambdas: list[float] | None, modes: list[str], out: Path, data_dir: str | None = None,
              progress: bool = True, samples_per_client: int | None = None, alpha: float | None = None,
              **overrides) -> dict:
    """Train and evaluate every (mode, λ); reuse codecs already saved under ``out`` (resume).
    ``samples_per_client`` and ``alpha`` go to the source (:func:`~fedcodec.neural.sources.load_source`)."""
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    src = load_source(source, data_dir, seed=overrides.get("seed") or 0, samples_per_client=samples_per_client,
                      alpha=alpha)
    s = Settings.for_source(src, **overrides)
    source_args = {"samples_per_client": samples_per_client, "alpha": alpha}
    lambdas = list(lambdas or src.lambdas)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done = json.loads(results_path.read_text()) if results_path.exists() else {}
    saved = Settings.completed(done.get("settings") or {})
    if done and (saved != s.__dict__ or done.get("source_args", source_args) != source_args):
        raise ConfigError(f"{out} holds results made with other settings ({done.get('settings')}); "
                          "use another --out or delete it")
    curves: dict[str, dict[str, dict]] = done.get("curves", {})
    for lam in lambdas:
        for mode in modes:
            key = f"{lam:g}"
            path = out / f"{mode}-l{key}" / "codec.safetensors"
            if path.exists() and mode in curves.get(key, {}).get("_trained", []):
                continue
            t0 = time.perf_counter()
            trained = Trained.load(path) if path.exists() else train(src, mode, lam, s, progress)
            if not path.exists():
                trained.save(path, {"source": source, "settings": s.__dict__, "source_args": source_args})
            entry = curves.setdefault(key, {})
            entry.update(evaluate(src, trained, s))
            entry.setdefault("_trained", []).append(mode)
            entry.setdefault("_seconds", {})[mode] = time.perf_counter() - t0
            _write(results_path, {"source": source, "unit": src.rate_unit, "settings": s.__dict__,
                                  "source_args": source_args, "curves": curves, "standard": done.get("standard")})
    result = {"source": source, "note": src.note, "unit": src.rate_unit, "settings": s.__dict__,
              "source_args": source_args,
              "curves": curves, "standard": standard_curves(src) if src.holdout else None}
    _write(results_path, result)
    report(result, out)
    return result


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def series(result: dict) -> dict[str, list[dict]]:
    """Curve name → its points sorted by rate."""
    by: dict[str, list[dict]] = {}
    for lam, entry in result["curves"].items():
        for name, p in entry.items():
            if not name.startswith("_"):
                by.setdefault(name, []).append({**p, "lmbda": float(lam)})
    for name, pts in (result.get("standard") or {}).items():
        by[name] = list(pts)
    return {k: sorted(v, key=lambda p: p["bpp" if "bpp" in p else "rate"]) for k, v in by.items()}


def _rate(p: dict) -> float:
    return p["bpp"] if "bpp" in p else p["rate"]


def bd_table(result: dict) -> list[tuple[str, str, float | None, str]]:
    curves = series(result)
    rows = []
    for anchor, test in COMPARISONS:
        if anchor in curves and test in curves:
            a, b = curves[anchor], curves[test]
            try:
                rows.append((anchor, test, bd_rate([_rate(p) for p in a], [p["psnr"] for p in a],
                                                   [_rate(p) for p in b], [p["psnr"] for p in b]), ""))
            except ConfigError as err:
                rows.append((anchor, test, None, str(err)))
    return rows


def report(result: dict, out: Path) -> None:
    """results.md (points and BD-rates) and rd.png (rate vs PSNR, one line per curve)."""
    unit = result["unit"]
    lines = [f"# Federated neural compression: {result['source']}", "",
             *([f"Source: {result['note']}.", ""] if result.get("note") else []),
             f"Rate in {unit} from the real range-coded bytes (estimate −log2 p beside it); distortion MSE, "
             "PSNR = 10·log10(1/MSE). Means over clients.", "",
             f"| curve | λ | rate ({unit}) | estimate | MSE | PSNR (dB) |", "|---|---:|---:|---:|---:|---:|"]
    for name, pts in series(result).items():
        for p in pts:
            lam = f"{p['lmbda']:g}" if "lmbda" in p else f"q{p.get('quality')}"
            est = f"{p['rate_est']:.4f}" if "rate_est" in p else "—"
            lines.append(f"| {name} | {lam} | {_rate(p):.4f} | {est} | {p['mse']:.5f} | {p['psnr']:.2f} |")
    lines += ["", "BD-rate (negative: the second curve needs fewer bits than the anchor at equal PSNR):", "",
              "| anchor | curve | BD-rate |", "|---|---|---:|"]
    for anchor, test, value, why in bd_table(result):
        lines.append(f"| {anchor} | {test} | {f'{value:+.1f}%' if value is not None else why} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(result, out / "rd.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = series(result)
    groups = [("clients' test data", [n for n in curves if ":" not in n]),
              ("newcomers", [n for n in curves if n.startswith("newcomer")]),
              ("held-out photos", [n for n in curves if n.startswith("holdout")])]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (title, names) in zip(axes[0], groups):
        for n in names:
            pts = curves[n]
            style = "--" if n.endswith(("jpeg", "webp")) else "-"
            ax.plot([_rate(p) for p in pts], [p["psnr"] for p in pts], style, marker="o", ms=3, label=n)
        ax.set_xlabel(f"rate ({result['unit']}, from bytes)")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"{result['source']}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
