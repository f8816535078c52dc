"""Digest of finished runs, to prove a refactor changed no result: for each method folder under a
``fedcodec run`` output directory, the SHA-256 of the final global model (every tensor of the
checkpoint, in name order, raw float32 bytes), of the ledger (every payload length) and of the
records without timings, plus the payload lengths and final accuracy in clear.

    fedcodec run --preset bench --rounds 3 --method ALL --threads 1 --out runs/parity --name before
    python benchmarks/parity.py runs/parity/before > before.json
    ... same at the new commit into runs/parity/after ...
    python benchmarks/parity.py runs/parity/after --compare before.json   # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def digest(method_dir: Path) -> dict:
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(method_dir / "checkpoint.safetensors"), framework="pt") as f:
        for k in sorted(k for k in f.keys() if "/" not in k):  # the global model; client stores are not results
            h.update(k.encode())
            h.update(f.get_tensor(k).contiguous().numpy().tobytes())
    metrics = json.loads((method_dir / "metrics.json").read_text())
    records = [{k: v for k, v in r.items() if "seconds" not in k} for r in metrics["rounds"]]
    ledger = (method_dir / "ledger.csv").read_text()
    ups = sorted({int(line.split(",")[4]) for line in ledger.splitlines()[1:] if ",up," in line})
    return {"model_sha256": h.hexdigest(),
            "ledger_sha256": hashlib.sha256(ledger.encode()).hexdigest(),
            "records_sha256": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(),
            "uplink_payload_bytes": ups,
            "final_accuracy": metrics["rounds"][-1].get("accuracy"),
            "seconds_per_round": sum(r["seconds"] + r.get("eval_seconds", 0.0) for r in metrics["rounds"])
            / len(metrics["rounds"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--compare", type=Path, help="a digest JSON written before; exit 1 if anything differs")
    args = ap.parse_args(argv)
    out = {d.name: digest(d) for d in sorted(args.run_dir.iterdir()) if (d / "metrics.json").exists()}
    if args.compare is None:
        print(json.dumps(out, indent=1))
        return 0
    before = json.loads(args.compare.read_text())
    keys = ("model_sha256", "ledger_sha256", "records_sha256")
    bad = 0
    for method in sorted(set(before) | set(out)):
        if method not in out or method not in before:
            print(f"{method:18s} missing on one side")
            bad += 1
            continue
        same = all(before[method][k] == out[method][k] for k in keys)
        bad += not same
        print(f"{method:18s} {'identical' if same else 'DIFFERS'}  payload bytes {out[method]['uplink_payload_bytes']}"
              f"  accuracy {out[method]['final_accuracy']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
