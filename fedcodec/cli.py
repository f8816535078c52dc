"""The ``fedcodec`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import METHODS, PRESETS, build_config, parse_assignments
from .errors import FedcodecError

_FLAG_KEYS = {"rounds": "rounds", "seed": "seed", "partition": "partition", "beta": "beta",
              "clients": "num_clients", "per_round": "clients_per_round", "local_epochs": "local_epochs",
              "lr": "lr", "batch_size": "batch_size", "data_dir": "data_dir", "out": "out_dir",
              "threads": "threads", "dataset": "dataset", "model": "model"}


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a federated experiment (one or more methods)",
                       description="Run a federated experiment in-process. Writes metrics.json/csv and "
                                   "ledger.csv per method, a combined results.md table and plot.png.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="starting point: quick (~1 min per method here), bench, paper (GPU)")
    p.add_argument("--config", metavar="FILE", help="TOML file with config keys (overrides the preset)")
    p.add_argument("--method", default="fedavg,fedmrn-binary",
                   help=f"comma-separated methods: {', '.join(METHODS)}")
    p.add_argument("--partition", choices=["iid", "dirichlet", "k-classes"])
    p.add_argument("--beta", type=float, help="Dirichlet concentration (partition=dirichlet)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--clients", type=int, help="number of clients")
    p.add_argument("--per-round", type=int, help="clients sampled per round")
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="client learning rate (default: the method's own)")
    p.add_argument("--dataset", choices=["fashion-mnist", "cifar10", "synthetic"])
    p.add_argument("--model", choices=["cnn4", "cnn8"])
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument("--out", help="output root directory (default: runs)")
    p.add_argument("--name", help="run name (a folder under --out); default from dataset/partition/preset")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set min_client_size=20; codec options as codec.NAME=VALUE, "
                        "e.g. --set codec.noise=gaussian --set codec.pm=false")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoints (same --out/--name and settings); "
                        "methods that already finished are not rerun")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_run(args) -> int:
    import torch

    from .data import load_dataset
    from .fl.runner import run_method
    from .report import atomic_write_text, markdown_table, plot

    overrides, codec_opts = parse_assignments(args.set)
    for flag, key in _FLAG_KEYS.items():
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    configs = [build_config(args.preset, args.config, {**overrides, "method": m, "codec_options": codec_opts})
               for m in methods]  # validates every method before any training
    first = configs[0]
    if first.threads:
        torch.set_num_threads(first.threads)
    name = args.name or f"{first.dataset}-{first.partition}-{args.preset}-s{first.seed}"
    root = Path(first.out_dir) / name
    source = load_dataset(first.dataset, first.data_dir, allow_subset=first.allow_subset)
    runs, summaries = {}, []
    for cfg in configs:
        runs[cfg.method], summary = run_method(cfg, source, root / cfg.method, resume=args.resume,
                                               progress=not args.no_progress)
        summaries.append(summary)
    table = markdown_table(summaries)
    title = f"{first.dataset}, {first.partition}, {first.num_clients} clients ({first.clients_per_round}/round)"
    atomic_write_text(root / "results.md", f"# {title}\n\n{table}\n")
    plot(runs, root / "plot.png", title)
    print(f"\n{title}\n{table}\n\nresults: {root}/results.md  plot: {root}/plot.png")
    return 0


def _cmd_data(args) -> int:
    from .data.fashion_mnist import download_fashion_mnist, find_fashion_mnist

    if args.action == "download":
        print(download_fashion_mnist(args.dest))
    else:
        print(find_fashion_mnist(args.data_dir))
    return 0


def _cmd_codecs(args) -> int:
    from .codecs import available_codecs

    print("codecs:")
    for name, info in sorted(available_codecs().items()):
        opts = ", ".join(f"{k}={v}" for k, v in info.options.items())
        print(f"  {name:12s} {info.summary}" + (f"  [{opts}]" if opts else ""))
    print("methods (for --method):")
    for name, m in METHODS.items():
        print(f"  {name:14s} {m.summary}; codec {m.codec}, lr {m.lr}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcodec", description="Communication-efficient federated "
                                     "learning with real bitstreams and honest byte accounting.")
    parser.add_argument("--version", action="version", version=f"fedcodec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    d = sub.add_parser("data", help="find or download datasets")
    d.add_argument("action", choices=["where", "download"], help="where: print the Fashion-MNIST directory "
                   "that would be used; download: fetch it into the cache (needs internet)")
    d.add_argument("dataset", choices=["fashion-mnist"])
    d.add_argument("--dest", help="download destination (default: the cache)")
    d.add_argument("--data-dir", help="directory to search first")
    sub.add_parser("codecs", help="list codecs and methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": _cmd_run, "data": _cmd_data, "codecs": _cmd_codecs}[args.command]
    try:
        return handler(args)
    except FedcodecError as err:
        print(f"fedcodec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
