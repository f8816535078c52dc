"""The hostile-client matrix: attack × defence × final accuracy (docs/RESULTS.md §3).

One client of 10 (client 3, sampled every round) attacks; the others are honest. Each cell is the
final and lowest-after-round-4 test accuracy of a run on the synthetic image dataset (16x16, 1000
training images, 10 clients, all sampled, 2 local epochs), next to the honest run with the same seed.

    python benchmarks/hostile.py --rounds 8 --seeds 0 1 2 [--methods fedavg fedmrn-binary ae-4] > hostile.md

Defences compared: ``none`` (``Defense.off()``: no clipping, replay guard or BatchNorm check; the
codecs' own checks and bound fields stay), ``default`` (fedcodec's defaults: clipping at 2x the median per tensor group, replay guard),
``median``, ``trimmed-mean`` and ``krum`` (each with the default clipping).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from fedcodec.config import Config
from fedcodec.data import make_synthetic_images
from fedcodec.fl.attacks import HostileTransport
from fedcodec.fl.loop import InProcessTransport, run_round
from fedcodec.fl.robust import Defense
from fedcodec.fl.simulation import setup

DEFENCES = {
    "none": None,  # Defense.off(): no clipping, no replay guard, no BatchNorm check
    "default": {},
    "median": {"aggregator": "median"},
    "trimmed-mean": {"aggregator": "trimmed-mean"},
    "krum": {"aggregator": "krum"},
}
ATTACKS_OF = {
    "fedavg": ["boost", "sign-flip", "bn-variance", "replay"],
    "fedmrn-binary": ["boost", "sign-flip", "bn-variance", "alpha", "replay"],
    "ae-4": ["boost", "bn-variance", "decoder", "foreign-decoder"],
}
ATTACKER = 3


def source(seed: int = 0):
    return make_synthetic_images(1000, 300, shape=(1, 16, 16), seed=seed)


def config(method: str, seed: int, rounds: int, **defence) -> Config:
    return Config(method=method, num_clients=10, clients_per_round=10, rounds=rounds, local_epochs=2,
                  batch_size=16, seed=seed, **defence).validate()


def run(method: str, attack: str | None, seed: int, rounds: int, data, defence: dict | None) -> list[float]:
    """Test accuracy after each round (``defence``: config keys, or None for no defence at all)."""
    sim, state = setup(config(method, seed, rounds, **(defence or {})), data)
    if defence is None:
        sim.defense = Defense.off()
    transport = InProcessTransport(sim)
    if attack is not None:
        transport = HostileTransport(transport, sim, ATTACKER, attack)
    for _ in range(rounds):
        state = run_round(sim, state, transport)
    return [r["accuracy"] for r in state.records]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(ATTACKS_OF))
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    data = source()
    print(f"final test accuracy (%), mean ± std over seeds {args.seeds}; {args.rounds} rounds; attacker: client "
          f"{ATTACKER} of 10\n")
    print("| method | attack | " + " | ".join(args.defences) + " |")
    print("|---|---|" + "---:|" * len(args.defences))
    t0 = time.time()
    for method in args.methods:
        for attack in [None] + ATTACKS_OF[method]:
            cells = []
            for d in args.defences:
                finals = [100 * run(method, attack, s, args.rounds, data, DEFENCES[d])[-1] for s in args.seeds]
                cells.append(f"{np.mean(finals):.1f} ± {np.std(finals):.1f}")
            print(f"| {method} | {attack or '(honest)'} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
