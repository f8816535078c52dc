"""The autoencoder codec's table for docs/RESULTS.md, from a `fedcodec compare` folder.

    python benchmarks/ae_table.py runs/compare/fmnist-iid

Per method: accuracy, bytes of one update (latents + float16 running statistics + header), the
per-round ratio to FedAvg's update, the decoders shipped (setup messages: count and MB), the
amortised ratio (FedAvg's total uplink over the method's total uplink, decoders included), the mean
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
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "ledger.csv") as f:
        ledger = list(csv.DictReader(f))
    return metrics["summary"], metrics["rounds"], ledger


def main(root: Path) -> None:
    _, _, base_ledger = load(root / "fedavg")
    base_up = [int(e["bytes"]) for e in base_ledger if e["direction"] == "up"]
    base_update, base_total = sum(base_up) / len(base_up), sum(base_up)
    print("| method | final acc | best acc | B/update | ratio per round | decoders sent | decoder MB "
          "| total uplink MB | amortised ratio | AE error (mean) | AE fit error | s/round |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in sorted(p for p in root.iterdir() if p.name.startswith("ae-") and (p / "metrics.json").exists()):
        s, rounds, ledger = load(run)
        up = [e for e in ledger if e["direction"] == "up"]
        setup = [int(e["bytes"]) for e in up if e["codec"].endswith("/setup")]
        updates = [int(e["bytes"]) for e in up if not e["codec"].endswith("/setup")]
        total = sum(setup) + sum(updates)
        per = sum(updates) / len(updates)
        err = [r["ae_error"] for r in rounds if "ae_error" in r]
        fit = [r["ae_fit_error"] for r in rounds if "ae_fit_error" in r]
        print(f"| {run.name} | {100 * s['final_accuracy']:.2f} | {100 * s['best_accuracy']:.2f} | {per:,.0f} "
              f"| {base_update / per:,.0f}x | {len(setup)} | {sum(setup) / MB:.2f} | {total / MB:.2f} "
              f"| {base_total / total:,.1f}x | {sum(err) / len(err):.3f} | {sum(fit) / len(fit):.3f} "
              f"| {s['seconds_per_round']:.0f} |")
    print(f"\nFedAvg: {base_update:,.0f} B per update, {base_total / MB:.2f} MB uplink in total")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
