"""The Flower quickstart example (examples/flower-quickstart*) as is and with fedcodec codecs:
accuracy and bytes per round, in one process through fedcodec.flower.local.InProcessGrid (the app's
own ServerApp ``main`` and ClientApp; every message through a protobuf round trip).

    python benchmarks/flower_example.py --out runs/flower-example [--rounds 5 --nodes 10] [--only NAME]

Each method's result is written to OUT/NAME.json as soon as it finishes; methods already there are
skipped (resume). ``--table`` prints the markdown table from what is there.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from fedcodec.flower.local import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
PLAIN, FEDCODEC = ROOT / "examples" / "flower-quickstart", ROOT / "examples" / "flower-quickstart-fedcodec"
METHODS = {  # name: (app, codec, options)
    "unmodified": (PLAIN, "", ""),
    "fp16": (FEDCODEC, "fp16", ""),
    "qsgd-16-ef": (FEDCODEC, "qsgd", "levels=16 ef=true"),
    "ef-signsgd": (FEDCODEC, "signsgd", "ef=true"),
    "topk-1%-ef": (FEDCODEC, "topk", "fraction=0.01 ef=true"),
    "fedmrn": (FEDCODEC, "fedmrn", ""),
    "fedmrn-ec": (FEDCODEC, "fedmrn", "entropy=true"),
}


def load_app(app_dir: Path):
    for name in [m for m in sys.modules if m == "quickstart" or m.startswith("quickstart.")]:
        del sys.modules[name]
    sys.path.insert(0, str(app_dir))
    try:
        return importlib.import_module("quickstart.client_app"), importlib.import_module("quickstart.server_app")
    finally:
        sys.path.remove(str(app_dir))


def run(name: str, args, workdir: Path) -> dict:
    app_dir, codec, options = METHODS[name]
    client, server = load_app(app_dir)
    cfg = {"num-server-rounds": args.rounds, "fraction-train": args.fraction, "local-epochs": args.epochs,
           "lr": args.lr, "batch-size": 32, "examples-per-node": args.examples, "data-dir": args.data_dir,
           "codec": codec, "codec-options": options}
    grid = InProcessGrid(client.app, args.nodes, cfg)
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)
    random.seed(args.seed)  # Flower's node sampling: the same nodes every round for every method
    t = time.time()
    server.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    seconds = time.time() - t
    accuracy = []
    for kind, replies in grid.phases:
        if kind.startswith("evaluate"):
            metrics = [r.content["metrics"] for r in replies if not r.has_error()]
            n = sum(m["num-examples"] for m in metrics)
            accuracy.append(sum(m["eval_acc"] * m["num-examples"] for m in metrics) / n)
    wire = [s for node, d, kind, s in grid.sizes if d == "up" and kind.startswith("train")]
    rows = list(csv.DictReader(open("bandwidth.csv"))) if codec else []
    ok = [r for r in rows if r["direction"] == "up" and r["status"] == "ok"]
    return {"method": name, "codec": codec, "options": options, "config": cfg, "seconds": round(seconds, 1),
            "accuracy": accuracy, "payload_bytes": [int(r["bytes"]) for r in ok],
            "arrays_bytes": [int(r["uncompressed"]) for r in ok], "wire_up_bytes": wire,
            "refused": sum(r["status"] != "ok" for r in rows)}


def _mean(values):
    return sum(values) / len(values)


def table(out: Path) -> str:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    base = results.get("unmodified")
    lines = ["| method | accuracy after each round (%) | final | uplink payload B/update | ratio | "
             "uplink message on the wire B | s |", "|---|---|---|---|---|---|---|"]
    for name in [*[m for m in METHODS if m in results], *sorted(set(results) - set(METHODS))]:
        r = results[name]
        acc = " ".join(f"{100 * a:.1f}" for a in r["accuracy"])
        payload = _mean(r["payload_bytes"]) if r["payload_bytes"] else None
        plain = _mean(base["wire_up_bytes"]) if base else None
        wire = _mean(r["wire_up_bytes"])
        ratio = f"{_mean(r['arrays_bytes']) / payload:.1f}x" if payload else "1x"
        lines.append(f"| {name} | {acc} | {100 * r['accuracy'][-1]:.1f} | "
                     f"{f'{payload:,.0f}' if payload else '(Flower arrays)'} | {ratio} | "
                     f"{wire:,.0f}{'' if plain is None or name == 'unmodified' else f' ({plain / wire:.1f}x)'} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "flower-example")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--examples", type=int, default=0, help="training (and test) examples per node; 0: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--only", action="append", help="run only this method (repeatable)")
    p.add_argument("--add", nargs=3, action="append", default=[], metavar=("NAME", "CODEC", "OPTIONS"),
                   help='another method of the fedcodec app, e.g. --add fedmrn-a0.05 fedmrn "alpha=0.05"')
    p.add_argument("--table", action="store_true", help="print the table of the results in --out and exit")
    args = p.parse_args()
    args.out = args.out.resolve()
    for name, codec, options in args.add:
        METHODS[name] = (FEDCODEC, codec, options)
    if args.table:
        print(table(args.out))
        return 0
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    unknown = set(args.only or []) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; known: {sorted(METHODS)} (or --add one)")
    for name in args.only or METHODS:
        target = args.out / f"{name}.json"
        if target.exists():
            print(f"{name}: done already ({target})")
            continue
        result = run(name, args, args.out / "work")
        target.write_text(json.dumps(result, indent=1))
        print(f"{name}: final accuracy {100 * result['accuracy'][-1]:.1f}%, "
              f"payload {_mean(result['payload_bytes']) if result['payload_bytes'] else '-'} B, "
              f"{result['seconds']:.0f} s", flush=True)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
