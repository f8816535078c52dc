"""Results on disk: per-method JSON/CSV and ledger, a combined Markdown table and a PNG plot."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .codecs import CodecContext, ModelSpec, build_codec

MB = 1e6


def fp32_reference_bytes(spec: ModelSpec) -> int:
    """``len()`` of a real float32 payload of the whole update: FedAvg's uplink for this model."""
    import torch

    zero = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    return len(build_codec("fp32").encode(zero, CodecContext(spec, client=0, round=0)))


def summarize(method: str, records: list[dict], spec: ModelSpec) -> dict[str, Any]:
    accs = [r["accuracy"] for r in records if "accuracy" in r]
    client_rounds = sum(r["clients"] for r in records)
    uploads = sum(r["clients"] - r.get("dropped", 0) for r in records)
    up = sum(r["uplink_bytes"] for r in records)
    down = sum(r["downlink_bytes"] for r in records)
    per_client = up / max(uploads, 1)
    setup = sum(r.get("setup_bytes", 0) for r in records)
    standard = {"round", "clients", "accepted", "rejected", "clipped", "dropped", "timed_out", "uplink_bytes",
                "downlink_bytes", "train_loss", "accuracy", "test_loss", "setup_bytes"}
    codec_keys = sorted({k for r in records for k in r if k not in standard and not k.endswith("seconds")})
    return {
        "method": method,
        "rounds": len(records),
        "final_accuracy": accs[-1] if accs else math.nan,
        "best_accuracy": max(accs) if accs else math.nan,
        "uplink_bytes_per_client_round": per_client,
        "downlink_bytes_per_client_round": down / client_rounds,
        "uplink_total_bytes": up,
        # codec setup messages (AE decoders) are part of uplink_total_bytes; without them, the
        # bytes of one update, i.e. the per-round ratio once every decoder has been paid
        "setup_total_bytes": setup,
        "uplink_bytes_per_update": (up - setup) / max(uploads, 1),
        # clients' metrics are recorded as "client/<name>" (plain names in runs made before)
        "codec_metrics": {k.removeprefix("client/"): float(np.nanmean([r[k] for r in records if k in r]))
                          for k in codec_keys},
        "downlink_total_bytes": down,
        "bits_per_parameter": 8 * per_client / spec.numel(),
        "ratio_vs_fp32": fp32_reference_bytes(spec) / per_client if per_client else math.nan,
        "seconds_per_round": sum(r["seconds"] for r in records) / len(records),
        "time_split": time_split(records),
        "rejected_payloads": sum(r["rejected"] for r in records),
        "clipped_updates": sum(r.get("clipped", 0) for r in records),
        "dropped_clients": sum(r.get("dropped", 0) for r in records),
        "timed_out_clients": sum(r.get("timed_out", 0) for r in records),
    }


#: the parts of a round's wall time: (name in the summary and the table, record key); see
#: :func:`fedcodec.fl.loop.time_split`
TIME_PARTS = (("train", "train_seconds"), ("exchange", "exchange_seconds"), ("code", "code_seconds"),
              ("aggregate", "aggregate_seconds"), ("evaluate", "eval_seconds"))


def time_split(records: list[dict]) -> dict[str, float]:
    """Mean seconds per round of each part of :data:`TIME_PARTS` the records hold (``evaluate``
    averages over all rounds, evaluated or not), the ``total`` (round plus evaluation), the number of
    ``evaluations`` and their mean ``seconds_per_evaluation``. Records written before the split was
    kept have no parts; their total and evaluations are still given."""
    n = max(len(records), 1)
    out = {part: sum(r[key] for r in records if key in r) / n for part, key in TIME_PARTS
           if any(key in r for r in records)}
    evals = [r["eval_seconds"] for r in records if "eval_seconds" in r]
    out["total"] = sum(r["seconds"] + r.get("eval_seconds", 0.0) for r in records) / n
    out["evaluations"] = len(evals)
    out["seconds_per_evaluation"] = sum(evals) / len(evals) if evals else math.nan
    return out


def time_table(summaries: list[dict]) -> str:
    """Where each method's rounds spent their time: mean seconds per round of training, coding
    (encode + decode, both ways), aggregation and evaluation, the rest (ledger, checks, bookkeeping)
    and the total; then how many evaluations ran and what one cost. An ``exchange`` column appears for
    runs whose clients were remote (their training and coding are not split)."""
    splits = [s.get("time_split") or {} for s in summaries]
    parts = [p for p, _ in TIME_PARTS if p != "exchange" or any("exchange" in t for t in splits)]
    head = ("| method | " + " | ".join(f"{p} s" for p in parts) + " | rest s | total s/round | evaluations "
            "| s/evaluation |\n|---|" + "---:|" * (len(parts) + 4))
    rows = []
    for s, t in zip(summaries, splits):
        if "total" not in t:  # a summary written before the split was kept
            rows.append(f"| {s['method']} | " + " | ".join("-" for _ in parts) + " | - | "
                        f"{s['seconds_per_round']:.2f} | - | - |")
            continue
        rest = t["total"] - sum(t.get(p, 0.0) for p in parts)
        cells = [f"{t[p]:.2f}" if p in t else "-" for p in parts]
        rows.append(f"| {s['method']} | " + " | ".join(cells) + f" | {rest:.2f} | {t['total']:.2f} "
                    f"| {t['evaluations']} | {t['seconds_per_evaluation']:.2f} |")
    return "\n".join([head, *rows])


def results_text(title: str, summaries: list[dict]) -> str:
    """The body of ``results.md``: the results table, then the time split per method."""
    return (f"# {title}\n\n{markdown_table(summaries)}\n\n"
            f"Seconds per round, by part (`fedcodec.fl.loop.time_split`):\n\n{time_table(summaries)}\n")


def atomic_write_text(path: Path, text: str) -> None:
    from .fl.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def write_method(out: Path, config: dict, records: list[dict], summary: dict, ledger) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps({"config": config, "summary": summary, "rounds": records},
                                                   indent=1))
    keys = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(records)
    atomic_write_text(out / "metrics.csv", buf.getvalue())
    atomic_write_text(out / "ledger.csv", ledger.to_csv())


def markdown_table(summaries: list[dict]) -> str:
    """One row per method; the ratio is to the FedAvg row when present, else to a float32 payload."""
    base = next((s for s in summaries if s["method"] == "fedavg"), None)
    head = ("| method | final acc | best acc | uplink MB | downlink MB | uplink B/client/round | bits/param "
            "| ratio vs FedAvg | downlink B/client/round | s/round |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    setups = any(s.get("setup_total_bytes") for s in summaries)
    if setups:  # a codec that ships setup messages (AE decoders): show them and the per-update ratio
        head = head.replace("| s/round |\n", "| setup MB | B/update | ratio per update | s/round |\n")
        head += "---:|---:|---:|"
    rows = []
    for s in summaries:
        ratio = (base["uplink_bytes_per_client_round"] / s["uplink_bytes_per_client_round"]
                 if base and s["uplink_bytes_per_client_round"] else s["ratio_vs_fp32"])
        extra = ""
        if setups:
            per_update = s.get("uplink_bytes_per_update", s["uplink_bytes_per_client_round"])
            ref = base["uplink_bytes_per_client_round"] if base else s["uplink_bytes_per_client_round"] * s["ratio_vs_fp32"]
            extra = (f"| {s.get('setup_total_bytes', 0) / MB:,.2f} | {per_update:,.0f} "
                     f"| {ref / per_update if per_update else math.nan:.1f}x ")
        rows.append(f"| {s['method']} | {100 * s['final_accuracy']:.2f} | {100 * s['best_accuracy']:.2f} "
                    f"| {s['uplink_total_bytes'] / MB:,.2f} | {s['downlink_total_bytes'] / MB:,.1f} "
                    f"| {s['uplink_bytes_per_client_round']:,.0f} | {s['bits_per_parameter']:.3f} "
                    f"| {ratio:.1f}x | {s['downlink_bytes_per_client_round']:,.0f} "
                    f"{extra}| {s['seconds_per_round']:.1f} |")
    return "\n".join([head, *rows])


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Accuracy vs round and vs cumulative uplink MB (log x), one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8) if len(runs) > 6 else (11, 4.2))
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10").colors
    styles = ["-", "--", "-.", ":"]
    for i, (method, records) in enumerate(runs.items()):
        look = {"color": colors[i % len(colors)], "linestyle": styles[(i // len(colors)) % len(styles)]}
        cum, xs_r, xs_mb, ys = 0.0, [], [], []
        for r in records:
            cum += r["uplink_bytes"] / MB
            if "accuracy" in r:
                xs_r.append(r["round"])
                xs_mb.append(cum)
                ys.append(100 * r["accuracy"])
        a.plot(xs_r, ys, marker="o", ms=2.5, label=method, **look)
        b.plot(xs_mb, ys, marker="o", ms=2.5, label=method, **look)
    a.set_xlabel("round")
    b.set_xlabel("cumulative uplink (MB, all clients)")
    b.set_xscale("log")
    for ax in (a, b):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if len(runs) > 6:  # many curves: one legend beside the plots
        b.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    else:
        a.legend()
        b.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to the PNG ``path`` atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)  # then renamed
    plt.close(fig)
    os.replace(tmp, path)


def run_title(config: dict) -> str:
    return (f"{config['dataset']}, {config['partition']}, {config['num_clients']} clients "
            f"({config['clients_per_round']}/round)")


def _unfinished(ckpt: Path) -> dict | None:
    """Metrics of a run that has a checkpoint but no metrics.json yet (still running, or stopped)."""
    from safetensors import safe_open

    from .codecs import TensorSpec

    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata() or {}
        if "records" not in meta:
            return None
        spec = ModelSpec(tuple(TensorSpec(k, tuple(f.get_slice(k).get_shape()), "param") for k in f.keys()
                               if "/" not in k))
    config, records = json.loads(meta["config"]), json.loads(meta["records"])
    if not records:
        return None
    summary = summarize(config["method"], records, spec)
    summary["method"] += f" (unfinished: {len(records)}/{config['rounds']} rounds)"
    return {"config": config, "summary": summary, "rounds": records}


def rebuild(root: Path) -> str:
    """Combine every ``root/<method>/metrics.json`` into ``root/results.md`` and ``root/plot.png``.

    Lets methods of one setting run in separate processes (or machines) and be reported together;
    FedAvg comes first so the ratio column is relative to it. A method with a checkpoint but no
    metrics yet is included, marked unfinished with its round count. Returns the results table and
    the time-split table (:func:`time_table`).
    """
    loaded = []
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (p.name != "fedavg", p.name)):
        if (d / "metrics.json").exists():
            loaded.append(json.loads((d / "metrics.json").read_text()))
        elif (d / "checkpoint.safetensors").exists():
            partial = _unfinished(d / "checkpoint.safetensors")
            if partial is not None:
                loaded.append(partial)
    if not loaded:
        from .errors import ConfigError

        raise ConfigError(f"no <method>/metrics.json under {root}; point at a run folder such as runs/<name>")
    title = run_title(loaded[0]["config"])
    summaries = [m["summary"] for m in loaded]
    atomic_write_text(root / "results.md", results_text(title, summaries))
    plot({m["summary"]["method"]: m["rounds"] for m in loaded}, root / "plot.png", title)
    return f"{title}\n{markdown_table(summaries)}\n\n{time_table(summaries)}"
