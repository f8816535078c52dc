"""The ``fedcodec`` command line."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from . import __version__
from .config import (CONFIG_KEYS, METHOD_PATTERNS, METHODS, PRESETS, Key, build_config, coerce, parse_assignments,
                     parse_scalar, split_assignment)
from .errors import ConfigError, FedcodecError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults; keeps a pre-formatted epilog (the config key table) as it is."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _keys_epilog() -> str:
    """Every config key with what it takes, its default and its help text (from Config's fields)."""
    lines = ["config keys: --set KEY=VALUE, or KEY = VALUE in a --config TOML file (the flags above set",
             "some of them; KEY = default: what it takes):"]
    for key in CONFIG_KEYS.values():
        lines.append(f"  {key.name} = {key.show_default()}: {key.expected()}")
        lines += textwrap.wrap(key.help, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def _flag_type(key: Key):
    def parse(text: str):
        try:
            return key.parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _config_flags(p, names=None, **helps) -> None:
    """The flags of Config keys that have one (``--per-round`` → clients_per_round), generated from
    the key description; unset flags are absent from the parsed arguments."""
    for key in CONFIG_KEYS.values():
        if key.flag and (names is None or key.name in names):
            bare = key.flag[2:].replace("-", "_")
            metavar = "{" + ",".join(key.choices) + "}" if key.choices else bare.upper()
            p.add_argument(key.flag, dest=key.name, type=_flag_type(key), default=argparse.SUPPRESS,
                           metavar=metavar, help=helps.get(key.name, key.help) + ("" if bare == key.name
                                                                                  else f" [{key.name}]"))


#: the methods of ``fedcodec run`` (README command 1): FedAvg against FedMRN with range-coded masks
DEFAULT_METHODS = "fedavg,fedmrn-binary-ec"
#: the sweep of ``fedcodec frontier``: FedAvg, then each family at a few knob values, from 1 bit per
#: value (qsgd-1) to rank-8 factors and 16-value autoencoder latents
FRONTIER_METHODS = ("fedavg,qsgd-1,qsgd-4,qsgd-16,topk-ef-0.001,topk-ef-0.01,topk-ef-0.05,fedmrn-binary,"
                    "fedmrn-binary-ec,factor-8-ec,factor-16-ec,factor-32-ec,ae-16,ae-64")
#: ``--method``'s help: the registered methods and the parametric names
METHODS_HELP = f"comma-separated methods: {', '.join(METHODS)}; or patterns: {METHOD_PATTERNS}"


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a federated experiment (one or more methods)",
                       description="Run a federated experiment in-process. Writes metrics.json/csv and "
                                   "ledger.csv per method, a combined results.md table and plot.png.",
                       formatter_class=_HelpFormatter, epilog=_keys_epilog())
    p.add_argument("--method", default=DEFAULT_METHODS,
                   help=METHODS_HELP)
    _experiment_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoints (same --out/--name and settings); "
                        "methods that already finished are not rerun")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="run several methods on one setting and compare them (resumable)",
                       description="Run a list of methods on one setting (same data partition, same client "
                                   "sampling and seeds), then write <out>/<name>/results.md (final/best accuracy, "
                                   "uplink and downlink MB, ratio to FedAvg, bits per parameter, s/round) and "
                                   "plot.png (accuracy vs round and vs cumulative uplink MB, log x). Always "
                                   "resumable: a finished method is not rerun, an interrupted one continues from "
                                   "its checkpoint; rerun the same command to pick up where it stopped.",
                       formatter_class=_HelpFormatter, epilog=_keys_epilog())
    p.add_argument("--method", default="fedavg,fp16,signsgd,ef-signsgd,qsgd-1,qsgd-4,topk-ef,fedpm,fedbat,"
                                       "fedmrn-binary,fedmrn-signed,fedmrn-binary-ec",
                   help=METHODS_HELP)
    _jobs_arg(p)
    _experiment_args(p)


def _jobs_arg(p) -> None:
    p.add_argument("--jobs", type=int, default=1,
                   help="methods run at once, each in its own process with --threads/jobs torch threads "
                        "(a method's result depends only on its config, seed and thread count)")


def _add_frontier(sub) -> None:
    p = sub.add_parser("frontier", help="accuracy vs uplink bytes over methods and seeds: the Pareto front "
                                        "(resumable)",
                       description="Run every (seed, method) pair of one setting into <out>/<name>/s<SEED>/<METHOD>/ "
                                   "(resumable like compare: a finished run is not rerun, an interrupted one "
                                   "continues from its checkpoint), then write frontier.md (per method: seeds, final "
                                   "accuracy mean and sample std over seeds, best accuracy, uplink bytes per update "
                                   "with every byte counted, bits per parameter, ratio to float32, and whether it is "
                                   "on the non-dominated front) and frontier.png (final accuracy vs uplink bytes, "
                                   "log x, the front as a step line). With --from, nothing is trained: the frontier "
                                   "is built from existing run folders of one setting (fedcodec.frontier).",
                       formatter_class=_HelpFormatter, epilog=_keys_epilog())
    p.add_argument("--method", default=FRONTIER_METHODS,
                   help=f"the sweep: {METHODS_HELP} (e.g. qsgd-8, topk-ef-0.003, factor-64-ec, ae-32-ef)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2: every method runs with each "
                                                "(they set the seed key, over --config and --set)")
    _jobs_arg(p)
    p.add_argument("--from", dest="from_dirs", nargs="+", metavar="DIR",
                   help="no training: build the frontier from the finished runs (<method>/metrics.json, or "
                        "archived *.run.json files as benchmarks/results/ holds them) in or below these folders "
                        "(up to 4 levels down), e.g. runs/<name> of compare or frontier; the experiment flags "
                        "are then ignored")
    p.add_argument("--plot-out", metavar="DIR",
                   help="where frontier.md and frontier.png go (default: the run folder <out>/<name>; with --from, "
                        "the first DIR)")
    _experiment_args(p, skip=("seed",))


def _experiment_args(p, skip: tuple[str, ...] = ()) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="starting point: quick (README command 1: under 3 min for two methods on 2 CPU "
                        "cores), bench (~10 min per method), paper (GPU)")
    p.add_argument("--config", metavar="FILE", help="TOML file with config keys (overrides the preset)")
    p.add_argument("--name", help="run name (a folder under --out); default from dataset/partition/preset")
    _config_flags(p, [name for name in CONFIG_KEYS if name not in skip])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set min_client_size=20; uplink codec options as codec.NAME=VALUE "
                        "(e.g. --set codec.noise=gaussian --set codec.entropy=true --set codec.ef=true); the "
                        "broadcast as --set downlink=fp16, or --set downlink=qsgd --set downlink.levels=255 "
                        "--set downlink_delta=true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _configs(args, tag: str | None = None, **fixed):
    """One validated Config per ``--method`` (``fixed`` config values over the flags and ``--set``),
    and the run folder ``<out>/<name>`` (default name: dataset-partition-preset-``tag``, by default
    s<seed>)."""
    overrides, codec_opts = parse_assignments(args.set)
    overrides.update({key.name: getattr(args, key.name) for key in CONFIG_KEYS.values()
                      if key.flag and hasattr(args, key.name)})
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--method lists a method twice: {args.method}")
    configs = [build_config(args.preset, args.config, {**overrides, **fixed, "method": m, "codec_options": codec_opts})
               for m in methods]  # validates every method before any training
    first = configs[0]
    name = args.name or f"{first.dataset}-{first.partition}-{args.preset}-{tag or f's{first.seed}'}"
    return configs, Path(first.out_dir) / name


def _cmd_run(args) -> int:
    import torch

    from .data import load_dataset
    from .fl.runner import run_method
    from .report import atomic_write_text, markdown_table, plot, results_text, run_title, time_table

    configs, root = _configs(args)
    first = configs[0]
    if first.threads:
        torch.set_num_threads(first.threads)
    source = load_dataset(first.dataset, first.data_dir, allow_subset=first.allow_subset)
    runs, summaries = {}, []
    for cfg in configs:
        runs[cfg.method], summary = run_method(cfg, source, root / cfg.method, resume=args.resume,
                                               progress=not args.no_progress)
        summaries.append(summary)
    title = run_title(first.to_dict())
    atomic_write_text(root / "results.md", results_text(title, summaries))
    plot(runs, root / "plot.png", title)
    print(f"\n{title}\n{markdown_table(summaries)}\n\nseconds per round, by part:\n{time_table(summaries)}\n\n"
          f"results: {root}/results.md  plot: {root}/plot.png")
    return 0


def _run_one(cfg, out: str, threads: int) -> tuple[str, dict]:
    """One method of ``fedcodec compare --jobs N``, in a worker process."""
    import dataclasses

    import torch

    from .data import load_dataset
    from .fl.runner import run_method

    torch.set_num_threads(threads)
    cfg = dataclasses.replace(cfg, threads=threads)
    source = load_dataset(cfg.dataset, cfg.data_dir, allow_subset=cfg.allow_subset)
    return cfg.method, run_method(cfg, source, Path(out), resume=True, progress=False)[1]


def _run_all(jobs: list, workers: int, progress: bool, label=lambda cfg: cfg.method) -> None:
    """Run each (config, folder) of ``jobs`` with ``resume=True`` (a finished run is not rerun, an
    interrupted one continues), ``workers`` at a time in their own processes, and print each final
    accuracy under ``label(config)``. The configs share one dataset."""
    import dataclasses

    if workers < 1:
        raise ConfigError("--jobs must be >= 1")
    first = jobs[0][0]
    if workers == 1:
        import torch

        from .data import load_dataset
        from .fl.runner import run_method

        if first.threads:
            torch.set_num_threads(first.threads)
        source = load_dataset(first.dataset, first.data_dir, allow_subset=first.allow_subset)
        for cfg, out in jobs:
            _, summary = run_method(cfg, source, out, resume=True, progress=progress)
            print(f"{label(cfg)}: final accuracy {100 * summary['final_accuracy']:.2f}", flush=True)
        return
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (first.threads or os.cpu_count() or 1) // workers)
    print(f"running {len(jobs)} runs, {workers} at a time with {threads} thread(s) each", flush=True)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, dataclasses.replace(cfg), str(out), threads): cfg for cfg, out in jobs}
        for fut in as_completed(futures):
            _, summary = fut.result()
            print(f"{label(futures[fut])}: final accuracy {100 * summary['final_accuracy']:.2f}", flush=True)


def _cmd_compare(args) -> int:
    from .report import rebuild

    configs, root = _configs(args)
    print(f"results in {root}", flush=True)
    _run_all([(cfg, root / cfg.method) for cfg in configs], args.jobs, not args.no_progress)
    print(rebuild(root))
    print(f"\nresults: {root}/results.md  plot: {root}/plot.png")
    return 0


def _parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → [0, 1, 2] (each checked as the seed key; no repeats, at most 1000)."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or len(words) > 1000:
        raise ConfigError(f"--seeds expects 1 to 1000 comma-separated integers, e.g. 0,1,2; got {text[:80]!r}")
    seeds = [coerce("seed", w)[1] for w in words]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds lists a seed twice: {text[:80]}")
    return seeds


def _cmd_frontier(args) -> int:
    from .frontier import build

    if args.from_dirs:
        first = Path(args.from_dirs[0])
        dest = Path(args.plot_out) if args.plot_out else first.parent if first.is_file() else first
        table, md, png = build(args.from_dirs, dest)
    else:
        runs = []
        for seed in _parse_seeds(args.seeds):  # every config is validated before any training
            configs, root = _configs(args, tag="frontier", seed=seed)
            runs += [(cfg, root / f"s{seed}" / cfg.method) for cfg in configs]
        print(f"{len(runs)} runs in {root}", flush=True)
        _run_all(runs, args.jobs, not args.no_progress, label=lambda cfg: f"s{cfg.seed}/{cfg.method}")
        table, md, png = build([out for _, out in runs], Path(args.plot_out or root))
    print(f"\n{table}\n\nfrontier: {md}  plot: {png}")
    return 0


def _cmd_report(args) -> int:
    from .report import rebuild

    root = Path(args.run_dir)
    print(rebuild(root))
    print(f"\nresults: {root}/results.md  plot: {root}/plot.png")
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
        opts = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        print(f"  {name:12s} {info.summary}" + (f"  [{opts}]" if opts else ""))
    symbolic = sorted(n for n, i in available_codecs().items() if i.codec.symbolic)
    print("stages (any codec): ef=true (error feedback, lossy codecs); entropy=true (range coding; "
          f"codecs that write symbols: {', '.join(symbolic)})")
    print("methods (for --method):")
    for name, m in METHODS.items():
        print(f"  {name:17s} {m.summary}; codec {m.codec}, lr {m.lr}")
    print(f"method patterns (any knob value, the lr and options of the family's entries above): {METHOD_PATTERNS}")
    return 0


def _add_flower(sub) -> None:
    p = sub.add_parser("flower", help="run fedcodec on Flower (needs the 'flower' extra)",
                       description="Run the fedcodec Flower app (flower_app/) on this machine: 'deploy-local' "
                                   "starts a SuperLink and --nodes SuperNodes on 127.0.0.1 (TLS with a throwaway "
                                   "CA and registered SuperNode keys, unless --insecure), 'simulate' runs it on "
                                   "Flower's simulation engine (Ray). Both stop every process they started when "
                                   "the run ends. Across machines, start the processes yourself and use 'flwr run' "
                                   "(see the README).")
    p.add_argument("mode", choices=["deploy-local", "simulate"])
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes (= clients, one partition each); default 3")
    p.add_argument("--method", help="any method of `fedcodec codecs` (default: the app's, fedmrn-binary)")
    _config_flags(p, ("rounds", "clients_per_round", "dataset"),
                  rounds="federated rounds (default: the app's)", dataset="dataset (default: the app's)",
                  clients_per_round="clients per round (default: all nodes)")
    p.add_argument("--out", default="runs/flower",
                   help="directory for metrics.json, ledger.csv, model.pt; default runs/flower")
    p.add_argument("--app", help="Flower app directory (default: the repository's flower_app/)")
    p.add_argument("--workdir", help="keep Flower's state, certificates and process logs here "
                                     "(default: a temp dir, removed)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP and no SuperNode authentication")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any key of the app's [tool.flwr.app.config], e.g. --set local-epochs=2")


def _cmd_flower(args) -> int:
    try:
        from .flower.common import RUN_CONFIG_KEYS, run_config_items
        from .flower.launch import APP_DIR, LocalFederation
    except ImportError as err:
        print(f"fedcodec: error: Flower is not installed ({err}); pip install 'fedcodec[flower]'", file=sys.stderr)
        return 2
    values = {"num_clients": args.nodes, "clients_per_round": getattr(args, "clients_per_round", None) or args.nodes,
              "out_dir": str(Path(args.out).resolve())}
    for key in ("method", "rounds", "dataset"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    items = run_config_items(values)
    given = {}
    for item in args.set:
        key, value = split_assignment(item)
        key, value = key.replace("_", "-"), parse_scalar(value)
        if not key.startswith("codec."):  # checked here as the apps will, before anything starts
            given[key] = coerce(key, value, keys=RUN_CONFIG_KEYS, what="run-config key")[1]
        items += run_config_items({key: value})
    if given.get("neural"):  # a learned-compression run: its source decides the clients, one node each
        from .neural.deploy import NeuralRun

        clients = NeuralRun.parse(given["neural"]).num_clients(given.get("data-dir"), given.get("seed") or 0)
        if clients != args.nodes:
            raise ConfigError(f"this learned-compression source has {clients} clients: start one SuperNode "
                              f"each with --nodes {clients}")
    fed = LocalFederation(args.nodes, workdir=args.workdir, simulation=args.mode == "simulate",
                          insecure=args.insecure)
    try:
        with fed:
            print(f"fedcodec: {'simulation ' if fed.simulation else ''}SuperLink on 127.0.0.1:{fed.port} "
                  f"({'insecure' if fed.insecure else 'TLS'})"
                  + ("" if fed.simulation else f", {args.nodes} SuperNodes") + f"; logs in {fed.logs}", flush=True)
            result = fed.run(items, app_dir=args.app or APP_DIR, stream_to=sys.stdout)
    finally:
        if args.workdir is None:
            fed.cleanup()
    print(f"fedcodec: run {result.run_id}: {result.status or 'did not start'}; results in {values['out_dir']}")
    return 0 if result.ok else 1


def _cmd_neural(args) -> int:
    from .neural.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcodec", description="Communication-efficient federated "
                                     "learning with real bitstreams and honest byte accounting.")
    parser.add_argument("--version", action="version", version=f"fedcodec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_compare(sub)
    _add_frontier(sub)
    d = sub.add_parser("data", help="find or download datasets")
    d.add_argument("action", choices=["where", "download"], help="where: print the Fashion-MNIST directory "
                   "that would be used; download: fetch it into the cache (needs internet)")
    d.add_argument("dataset", choices=["fashion-mnist"])
    d.add_argument("--dest", help="download destination (default: the cache)")
    d.add_argument("--data-dir", help="directory to search first")
    sub.add_parser("codecs", help="list codecs and methods")
    r = sub.add_parser("report", help="combine the methods of a run folder into results.md and plot.png",
                       description="Rebuild <run-dir>/results.md and plot.png from every <run-dir>/<method>/"
                                   "metrics.json, e.g. after running methods in separate processes.")
    r.add_argument("run_dir", help="a run folder, e.g. runs/fashion-mnist-iid-quick-s0")
    _add_flower(sub)
    from .neural.cli import add_parser as add_neural

    add_neural(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": _cmd_run, "compare": _cmd_compare, "data": _cmd_data, "codecs": _cmd_codecs,
               "flower": _cmd_flower, "report": _cmd_report, "neural": _cmd_neural, "frontier": _cmd_frontier}[args.command]
    try:
        return handler(args)
    except FedcodecError as err:
        print(f"fedcodec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
