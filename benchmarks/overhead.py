"""Engine overhead: a FedAvg round through fedcodec vs a bare PyTorch loop over the same batches.

The bare loop does only what any FedAvg must: per client, SGD over the very same shuffled batches
(same sampler, same generators). The engine round adds everything fedcodec does around it: encoding
the broadcast and each update to bytes, decoding, validating, the ledger, aggregation. Evaluation is
excluded from both. The two are measured alternately, ``--repeats`` times each, and the medians compared.

    python benchmarks/overhead.py --repeats 3        # also times FedMRN rounds (--also)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fedcodec.config import build_config
from fedcodec.data import load_dataset
from fedcodec.fl import rng as rngs
from fedcodec.fl.client import batches
from fedcodec.fl.simulation import run_round, setup


def bare_round(sim, round_num: int) -> float:
    cfg, model = sim.cfg, sim.runtime.model
    clients = rngs.sample_clients(cfg.seed, round_num, cfg.num_clients, cfg.clients_per_round)
    t0 = time.perf_counter()
    model.train()
    for c in clients:
        x, y = sim.client_data(c)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.client_lr)
        shuffle = rngs.torch_generator(rngs.derive_seed(cfg.seed, round_num, rngs.CLIENT_TRAIN, c))
        for _ in range(cfg.local_epochs):
            for idx in batches(len(x), cfg.batch_size, shuffle):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--also", nargs="*", default=["fedmrn-binary", "fedmrn-signed"],
                    help="other methods whose engine round time is reported (training + coding, no evaluation)")
    args = ap.parse_args()
    cfg = build_config(args.preset, overrides={"method": "fedavg", "eval_every": 10**6, "rounds": 10**6})
    source = load_dataset(cfg.dataset, cfg.data_dir)
    sim, state = setup(cfg, source)
    engine, bare = [], []
    for i in range(args.repeats):
        start = state.round + 1
        t0 = time.perf_counter()
        state = run_round(sim, state)
        engine.append(time.perf_counter() - t0)
        bare.append(bare_round(sim, start))  # the same clients and batches as the engine round
        print(f"repeat {i + 1}: engine {engine[-1]:.2f}s  bare {bare[-1]:.2f}s  ratio {engine[-1] / bare[-1]:.3f}")
    e, b = statistics.median(engine), statistics.median(bare)
    print(f"median engine round {e:.2f}s, bare PyTorch loop {b:.2f}s, ratio {e / b:.3f} "
          f"({cfg.clients_per_round} clients x {cfg.local_epochs} epochs, batch {cfg.batch_size}, "
          f"{torch.get_num_threads()} threads)")
    for method in args.also:
        mcfg = build_config(args.preset, overrides={"method": method, "eval_every": 10**6, "rounds": 10**6})
        msim, mstate = setup(mcfg, source)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            mstate = run_round(msim, mstate)
            times.append(time.perf_counter() - t0)
        m = statistics.median(times)
        print(f"median {method} round {m:.2f}s ({m / e:.3f}x the FedAvg round)")


if __name__ == "__main__":
    main()
