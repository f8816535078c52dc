"""Re-evaluate a finished FedPM run's global model under each ``eval_mask``.

    python benchmarks/fedpm_eval.py RUN/fedpm [--samples 3]

Loads the method folder's checkpoint and configuration, then reports the test accuracy of the network
that the global mask probabilities give under ``eval_mask = threshold`` (``theta > 1/2``), ``expected``
(the weights ``w0 * theta``) and ``sample`` (one mask ``m ~ Bernoulli(theta)``; ``--samples``
evaluation seeds), and the histogram of the global probabilities in ten bins of [0, 1].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from fedcodec.codecs import build_uplink
from fedcodec.config import Config
from fedcodec.data import load_dataset
from fedcodec.fl.runner import final_params
from fedcodec.fl.simulation import setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a FedPM method folder (metrics.json and checkpoint.safetensors)")
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    saved = json.loads((args.run / "metrics.json").read_text())["config"]
    cfg = Config(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Config)}})
    sim, _ = setup(cfg, load_dataset(cfg.dataset, cfg.data_dir))
    params = final_params(args.run)
    for mode, seeds in (("threshold", [0]), ("expected", [0]), ("sample", range(args.samples))):
        algorithm = build_uplink(cfg.method_spec().codec, **{**cfg.uplink_options, "eval_mask": mode}).algorithm
        accs = [sim.runtime.task.evaluate(sim.runtime, algorithm.eval_params(params, sim.spec, s), {})["accuracy"]
                for s in seeds]
        print(f"{mode}: " + " / ".join(f"{100 * a:.2f}" for a in accs))
    frozen = sim.runtime.uplink.algorithm.frozen(sim.spec)
    theta = torch.cat([(params[n] / w).flatten() for n, w in frozen.items()]).numpy()
    print("theta histogram (10 bins of [0, 1]):", np.histogram(theta, bins=10, range=(0, 1))[0].tolist())


if __name__ == "__main__":
    main()
