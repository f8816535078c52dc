"""The autoencoder codec's table for docs/RESULTS.md, from a `fedcodec compare` folder.

    python benchmarks/ae_table.py runs/compare/fmnist-iid [--plot docs/img/ae-iid.png]

Per method: accuracy, bytes of one update (latents + float16 running statistics + header), the
per-round ratio to FedAvg's update, the decoders shipped (setup messages: count and MB), the
amortised ratio (FedAvg's uplink over the method's, decoders included, over the same rounds), the mean
relative reconstruction error of the AE-coded tensors, the AE's fit error on its pre-pass snapshots,
and seconds per round. Every byte figure comes from the run's ledger (ledger.csv).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

MB = 1e6


def load(run: Path) -> tuple[dict, list[dict], list[dict]]:
    """(summary, round records, ledger rows) of a finished run, or of an unfinished one from its
    checkpoint (then the summary is computed here and its row is marked with the rounds done)."""
    if (run / "metrics.json").exists():
        metrics = json.loads((run / "metrics.json").read_text())
        with open(run / "ledger.csv") as f:
            ledger = list(csv.DictReader(f))
        return metrics["summary"], metrics["rounds"], ledger
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        meta = f.metadata()
    rounds = json.loads(meta["records"])
    ledger = [dict(zip(("round", "client", "direction", "codec", "bytes"), row)) for row in json.loads(meta["ledger"])]
    accs = [r["accuracy"] for r in rounds if "accuracy" in r]
    summary = {"final_accuracy": accs[-1], "best_accuracy": max(accs), "unfinished": len(rounds),
               "seconds_per_round": sum(r["seconds"] for r in rounds) / len(rounds)}
    return summary, rounds, ledger


def main(root: Path, plot_path: Path | None = None) -> None:
    _, _, base_ledger = load(root / "fedavg")
    base_up = [(int(e["round"]), int(e["bytes"])) for e in base_ledger if e["direction"] == "up"]
    base_update, base_total = sum(n for _, n in base_up) / len(base_up), sum(n for _, n in base_up)
    print("| method | final acc | best acc | B/update | ratio per round | decoders sent | decoder MB "
          "| total uplink MB | amortised ratio | AE error (mean) | AE fit error | s/round |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = [p for p in root.iterdir() if p.name.startswith("ae-")
            and ((p / "metrics.json").exists() or (p / "checkpoint.safetensors").exists())]
    for run in sorted(runs, key=lambda p: (int(p.name.split("-")[1]), p.name)):
        s, rounds, ledger = load(run)
        up = [e for e in ledger if e["direction"] == "up"]
        setup = [int(e["bytes"]) for e in up if e["codec"].endswith("/setup")]
        updates = [int(e["bytes"]) for e in up if not e["codec"].endswith("/setup")]
        total = sum(setup) + sum(updates)
        done = max(int(e["round"]) for e in up)  # FedAvg over the same rounds (an unfinished run)
        base_run = sum(n for r, n in base_up if r <= done)
        per = sum(updates) / len(updates)
        # client metrics are "client/<name>" since the robust-aggregation change (plain names before)
        err = [r.get("client/ae_error", r.get("ae_error")) for r in rounds if "client/ae_error" in r or "ae_error" in r]
        fit = [r.get("client/ae_fit_error", r.get("ae_fit_error")) for r in rounds
               if "client/ae_fit_error" in r or "ae_fit_error" in r]
        name = run.name + (f" ({s['unfinished']} of 30 rounds)" if "unfinished" in s else "")
        print(f"| {name} | {100 * s['final_accuracy']:.2f} | {100 * s['best_accuracy']:.2f} | {per:,.0f} "
              f"| {base_update / per:,.0f}x | {len(setup)} | {sum(setup) / MB:.2f} | {total / MB:.2f} "
              f"| {base_run / total:,.1f}x | {sum(err) / len(err):.3f} | {sum(fit) / len(fit):.3f} "
              f"| {s['seconds_per_round']:.0f} |")
    print(f"\nFedAvg: {base_update:,.0f} B per update, {base_total / MB:.2f} MB uplink in total")
    if plot_path is not None:  # accuracy vs round and vs cumulative uplink (decoders included)
        from fedcodec.report import plot

        curves = {"fedavg": load(root / "fedavg")[1]}
        for ref in ("fedmrn-binary-ec", "topk-ef"):  # the best 1-bit method and the sparsest baseline
            if (root / ref / "metrics.json").exists():
                curves[ref] = load(root / ref)[1]
        for run in sorted(runs, key=lambda p: (int(p.name.split("-")[1]), p.name)):
            curves[run.name] = load(run)[1]
        plot(curves, plot_path, f"autoencoder codec vs FedAvg ({root.name}, decoders counted)")
        print(f"plot: {plot_path}")


if __name__ == "__main__":
    args = sys.argv[1:]
    out = Path(args[args.index("--plot") + 1]) if "--plot" in args else None
    main(Path(args[0]), out)
