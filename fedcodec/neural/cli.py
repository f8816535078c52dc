"""``fedcodec neural``: train learned compressors federated (λ sweep), compress and decompress files."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .sources import SOURCES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def add_parser(sub) -> None:
    p = sub.add_parser("neural", help="federated learned data compression (train, compress, decompress)",
                       description="Nonlinear transform coding learned across heterogeneous clients: shared "
                                   "analysis/synthesis transforms, personalized entropy models (Lei et al. 2023).")
    nsub = p.add_subparsers(dest="neural_command", required=True)
    t = nsub.add_parser("train", help="train every mode over a λ sweep; write results.md, results.json, rd.png",
                        description="Train the personalized-federated codec and its baselines (global, local-only; "
                                    "global+fine-tune, refits and newcomers are derived) at each λ, code every "
                                    "client's test data to real bytes and write <out>/results.md (rate-distortion "
                                    "points, BD-rates), results.json, rd.png and one codec.safetensors per "
                                    "(mode, λ). Rerun the same command to resume.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--source", choices=SOURCES, default="synthetic")
    t.add_argument("--lambdas", help="comma-separated λ values (loss = rate + λ·MSE); default: the source's sweep")
    t.add_argument("--modes", default="federated,global,local",
                   help="which trainings to run: federated (shared transforms, personal entropy models), global "
                        "(everything shared), local (each client alone), federated-bias (federated with the "
                        "synthesis's output bias personal too), oracle (transforms trained on all "
                        "clients' data pooled, personal entropy models: a ceiling, not deployable)")
    t.add_argument("--rounds", type=int, help="federated rounds (default: the source's)")
    t.add_argument("--local-epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float, help="Adam learning rate (local and oracle modes, the local-adam trainer, and "
                                            "the entropy model's Adam times --prior-lr-scale)")
    t.add_argument("--optimizer-state", choices=("keep", "reset"), default="keep",
                   help="keep: each client's Adam moments carry over from round to round (in its own store, "
                        "never sent); reset: Adam starts afresh every round")
    t.add_argument("--prior-lr-scale", type=float,
                   help="the entropy model's learning rate as a multiple of --lr (default: the source's; 10 for "
                        "images, whose small CDF networks learn slowly at the transforms' rate, 1 for vectors)")
    t.add_argument("--seed", type=int, default=0, help="the seed of a single sweep (see --seeds)")
    t.add_argument("--seeds", help="a study over seeds, e.g. 0-4 or 0,1,2: one sweep per seed (and per "
                                   "--samples-per-client value) in <out>/n<N>/seed<S>, then study.md with BD-rates "
                                   "per client, their mean and 95%% confidence interval over seeds, J = rate + λ·MSE "
                                   "per λ, rd-ci.png (and bd-vs-n.png with several sample sizes)")
    t.add_argument("--samples-per-client", help="training samples per client (synthetic, clusters, fashion-mnist); "
                                                "several comma-separated values make a study with the crossover "
                                                "n* where local-only training starts to win")
    t.add_argument("--alpha", type=float, help="clusters source: Dirichlet concentration of each client's mixture "
                                               "over the shared clusters (small: clients differ more)")
    t.add_argument("--jobs", type=int, default=1, help="a study's units run as this many parallel processes "
                                                      "(one torch thread each unless --threads)")
    t.add_argument("--trainer", help="how the shared transforms train: fedadam (local SGD, Adam on the server; "
                                     "the default), fedsgd-adam (one gradient per round, Adam on the server) or "
                                     "local-adam (Adam on the clients, averaged: the earlier trainer)")
    t.add_argument("--client-lr", type=float, help="fedadam: the clients' SGD learning rate on loss/λ")
    t.add_argument("--server-lr", type=float, help="fedadam, fedsgd-adam: the server Adam's learning rate")
    t.add_argument("--server-warmup", type=int,
                   help="fedadam, fedsgd-adam: rounds over which the server's learning rate ramps linearly up "
                        "to --server-lr (default: the source's; 0: none)")
    t.add_argument("--val-fraction", type=float,
                   help="share of each client's training data held out to choose the final round (0: the last)")
    t.add_argument("--offsets", choices=("on", "off"),
                   help="quantize around each channel's median of the client's entropy model (on, the default) "
                        "or on the plain integer grid (off)")
    t.add_argument("--method", default="fedavg",
                   help="how the shared transforms' updates travel: any fedcodec method, e.g. fedmrn-binary "
                        "(masks over seeded noise trained on g_a/g_s; the entropy models train as usual and stay "
                        "local); training uses --lr, not the method's own learning rate")
    t.add_argument("--data-dir", help="Fashion-MNIST directory, a folder of images for --source photos, or for "
                                      "--source npy a folder with one subfolder per client holding train.npy "
                                      "and test.npy (float32, shape (n, d))")
    t.add_argument("--out", help="output folder (default runs/neural/<source>)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--no-progress", action="store_true")
    st = nsub.add_parser("study", help="one study from units trained before (several folders, e.g. one per "
                                       "sample size): study.md, study.json, rd-ci.png, bd-vs-n.png",
                         description="Summarise every <folder>/n<N>/seed<S>/results.json of studies made by "
                                     "'fedcodec neural train --seeds ...' as one study (BD-rates per client with "
                                     "95% confidence intervals over seeds, J per λ, the crossover n*), without "
                                     "training anything.")
    st.add_argument("folders", nargs="+", help="study output folders (each holding n<N>/seed<S>/)")
    st.add_argument("--out", required=True, help="where study.md, study.json and the plots go")
    st.add_argument("--lambdas", help="only these comma-separated λ values (default: every λ of the units)")
    for name, verb in (("compress", "file (.png/.jpg image or .npy array) → .fcn"),
                       ("decompress", ".fcn → .png image or .npy array")):
        c = nsub.add_parser(name, help=f"{verb} with one client's codec",
                            description=f"{name.capitalize()} a {verb} with the codec of --client from a trained "
                                        "codec.safetensors (shared transforms + that client's entropy model). "
                                        "A file can only be decompressed with the same codec and client.")
        c.add_argument("input")
        c.add_argument("-o", "--output", required=True)
        c.add_argument("--codec", required=True, help="a codec.safetensors written by 'fedcodec neural train'")
        c.add_argument("--client", type=int, default=0, help="whose entropy model to use")


def _floats(text: str | None, flag: str) -> list[float]:
    """A comma-separated list of positive numbers (empty for None)."""
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, e.g. 10,30,100; got {text!r}") from None
    if not values or not all(v > 0 and v == v and v != float("inf") for v in values) or len(values) > 64:
        raise ConfigError(f"{flag} takes 1..64 positive finite numbers; got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    """Seeds as ``0-4`` or ``0,1,2`` (at most 100, each 0..2**31-1)."""
    try:
        if "-" in text.strip().lstrip("-") and "," not in text:
            a, b = (int(v) for v in text.split("-"))
            seeds = list(range(a, b + 1))
        else:
            seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes a range like 0-4 or a list like 0,1,2; got {text!r}") from None
    if not 1 <= len(seeds) <= 100 or not all(0 <= v < 2**31 for v in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: 1..100 distinct seeds in 0..2**31-1; got {text!r}")
    return seeds


def _coder(args):
    from .codec import Coder
    from .federated import Trained

    return Coder.of(Trained.load(args.codec).model(args.client))


def _read_input(path: Path, coder) -> tuple[np.ndarray, str]:
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if path.suffix.lower() == ".npy":
        _check_npy(path)
        try:
            return np.load(path, allow_pickle=False), "array"
        except (ValueError, OSError, EOFError) as err:
            raise ConfigError(f"{path} is not a plain .npy array: {err}") from None
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from .photos import load_photo

        img = load_photo(path)
        if coder.model.cfg.dim == 1:
            img = img.mean(axis=2, keepdims=True)
        return np.ascontiguousarray(img.transpose(2, 0, 1)), "image"
    raise ConfigError(f"{path}: expected an image ({', '.join(IMAGE_SUFFIXES)}) or a .npy array")


def _check_npy(path: Path) -> None:
    """Refuse (:class:`ConfigError`) a ``.npy`` whose header declares more values than a ``.fcn`` file
    may hold, or more bytes than the file has, before numpy allocates the declared array."""
    import math

    from ..files import npy_header
    from .codec import MAX_ELEMENTS

    shape, dtype, data_bytes = npy_header(path)
    n = math.prod(shape)
    if dtype.hasobject or n > MAX_ELEMENTS or n * dtype.itemsize > data_bytes:
        raise ConfigError(f"{path}: its header declares {dtype} of shape {shape}; expected a numeric array of at "
                          f"most {MAX_ELEMENTS:,} values that the file holds ({data_bytes:,} data bytes)")


def run(args) -> int:
    if args.neural_command == "train":
        from .experiment import run_sweep

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        lambdas = _floats(args.lambdas, "--lambdas")
        out = Path(args.out or f"runs/neural/{args.source}")
        modes = [m.strip() for m in args.modes.split(",")]
        samples = [int(v) for v in _floats(args.samples_per_client, "--samples-per-client")] or [None]
        settings = dict(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr,
                        method=args.method, keep_optimizer_state=args.optimizer_state == "keep",
                        prior_lr_scale=args.prior_lr_scale, trainer=args.trainer, val_fraction=args.val_fraction,
                        client_lr=args.client_lr, server_lr=args.server_lr,
                        server_warmup=args.server_warmup,
                        offsets=None if args.offsets is None else args.offsets == "on")
        settings = {k: v for k, v in settings.items() if v is not None}
        if args.seeds or len(samples) > 1:
            from .study import run_study

            seeds = _seeds(args.seeds) if args.seeds else [args.seed]
            run_study(args.source, lambdas, modes, out, seeds, samples, args.data_dir, jobs=args.jobs,
                      threads=args.threads or 1, progress=not args.no_progress, alpha=args.alpha, **settings)
            print((out / "study.md").read_text())
            print(f"fedcodec: {len(seeds)} seeds x {len(samples)} sample sizes; summary in {out}/study.md, "
                  f"plots {out}/rd-ci.png" + (f", {out}/bd-vs-n.png" if len(samples) > 1 else ""))
            return 0
        result = run_sweep(args.source, lambdas, modes, out, args.data_dir, progress=not args.no_progress,
                           samples_per_client=samples[0], alpha=args.alpha, seed=args.seed, **settings)
        print((out / "results.md").read_text())
        print(f"fedcodec: {len(result['curves'])} λ values; results in {out}/results.md, plot {out}/rd.png")
        return 0
    if args.neural_command == "study":
        from .study import combine

        out = Path(args.out)
        study = combine([Path(f) for f in args.folders], out, _floats(args.lambdas, "--lambdas") or None)
        print((out / "study.md").read_text())
        print(f"fedcodec: {sum(len(u) for u in study['units'].values())} units; summary in {out}/study.md")
        return 0
    coder = _coder(args)
    src, dst = Path(args.input), Path(args.output)
    if args.neural_command == "compress":
        data, kind = _read_input(src, coder)
        blob = coder.compress(data, kind)
        dst.write_bytes(blob)
        n = data.shape[-1] * data.shape[-2] if kind == "image" else int(np.prod(data.shape[:-1]))
        unit = "bpp" if kind == "image" else "bits/vector"
        print(f"{src} → {dst}: {len(blob)} bytes ({8 * len(blob) / n:.4f} {unit}, header included)")
        return 0
    from .codec import read_file

    data, kind = coder.decompress(read_file(src))
    if kind == "image":
        pixels = np.clip(np.round(data.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        from PIL import Image

        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(dst)
    else:
        np.save(dst, data.astype(np.float32))
    print(f"{src} → {dst}: {kind} of shape {tuple(data.shape)}")
    return 0
