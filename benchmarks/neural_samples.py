"""Federated vs local-only learned compression on the synthetic source as the training samples per
client shrink (one λ): does sharing the transforms pay when each client has little data?

    python benchmarks/neural_samples.py --samples 25,50,100 --lmbda 300

Each (samples, mode) trains with the source's default settings (rounds, epochs, Adam with kept
state) and codes every client's test set to real bytes; the table gives the clients' mean rate (from
the bytes) and PSNR.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedcodec.neural.federated import Settings, mean_point, rd_point, train
from fedcodec.neural.sources import synthetic_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="25,50,100", help="training vectors per client (comma-separated)")
    ap.add_argument("--lmbda", type=float, default=300.0)
    ap.add_argument("--modes", default="federated,local")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| samples/client | mode | rate (bits/vector) | PSNR (dB) | seconds |")
    print("|---:|---|---:|---:|---:|")
    for n in (int(v) for v in args.samples.split(",")):
        src = synthetic_source(n_train=n)
        s = Settings.for_source(src)
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            trained = train(src, mode, args.lmbda, s, progress=False)
            p = mean_point([rd_point(trained.model(c), src.test[c]) for c in range(src.num_clients)])
            print(f"| {n} | {mode} | {p['rate']:.3f} | {p['psnr']:.2f} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
