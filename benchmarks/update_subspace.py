"""Where real client updates lie: the share of each update inside a rank-r basis per kernel.

    python benchmarks/update_subspace.py [--rounds 6] [--local-epochs 2] [--ranks 4,8,32] [--seed 0]

Runs FedAvg (Fashion-MNIST IID, CNN4, 100 clients, 10 per round, lr 0.03, one torch thread) in
process and, every round, projects each client's decoded update, kernel by kernel viewed as an
``out × in·k·k`` matrix ``U``, on the row space of a rank-r basis ``V`` (orthonormal rows) and reports
the share of its energy ``||U Vᵀ||² / ||U||²``, summed over kernels and averaged over the round's
clients, for these bases:

- ``own``: ``U``'s own top-r right singular vectors (the most any rank-r basis can hold);
- ``hist``: the top-r right singular vectors of ``W_t - W_0``, the kernel's change from the initial
  model to the model the clients trained from (both ends of a run know it: the factor codec's
  learned rows, ``learned > 0``);
- ``prev``: those of the previous round's aggregated update (the server knows it; a client does not);
- ``cur``: those of ``W_t`` itself (no initial model needed);
- ``rand``: a Gaussian basis (about ``r / cols``).

The numbers are for the issue-17 design of the "AE v2" decoder (RESULTS §6).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import fedcodec.fl.loop as loop
from fedcodec.codecs import CodecContext
from fedcodec.config import Config
from fedcodec.data import load_dataset
from fedcodec.fl.simulation import setup

KINDS = ("own", "hist", "prev", "cur", "rand")


def _matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def _top(m: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(m, full_matrices=False)[2][:r]


def _share(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u @ v.T).pow(2).sum() / u.pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--ranks", default="4,8,32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ranks = [int(r) for r in args.ranks.split(",")]
    cfg = Config(method="fedavg", rounds=args.rounds, num_clients=100, clients_per_round=10,
                 local_epochs=args.local_epochs, seed=args.seed, threads=1).validate()
    sim, state = setup(cfg, load_dataset(cfg.dataset, cfg.data_dir))
    kernels = [t.name for t in sim.spec.tensors if t.role == "weight"]
    initial = {n: state.global_params[n].clone() for n in kernels}
    payloads: list[bytes] = []
    fit = loop.client_fit

    def capture(*a, **k):
        out = fit(*a, **k)
        payloads.append(out[0])
        return out

    loop.client_fit = capture  # the in-process transport looks the function up each round
    gen = torch.Generator().manual_seed(args.seed)
    previous = None
    print("| round | accuracy | " + " | ".join(f"r{r} {k}" for r in ranks for k in KINDS) + " |")
    print("|---:|---:|" + "---:|" * (len(ranks) * len(KINDS)))
    for _ in range(cfg.rounds):
        before = {n: state.global_params[n].clone() for n in kernels}
        payloads.clear()
        state = loop.run_round(sim, state, loop.InProcessTransport(sim, 1))
        updates = [sim.runtime.uplink.decode(p, CodecContext(sim.spec, 0, state.round)) for p in payloads]
        cells = []
        for r in ranks:
            shares = {k: [] for k in KINDS}
            for upd in updates:
                total = {k: 0.0 for k in KINDS}
                norm = 0.0
                for n in kernels:
                    u = _matrix(upd[n])
                    rr = min(r, *u.shape)
                    e = float(u.pow(2).sum())
                    norm += e
                    hist = _matrix(before[n] - initial[n])
                    total["own"] += e * _share(u, _top(u, rr))
                    total["hist"] += e * _share(u, _top(hist, rr)) if hist.abs().sum() > 0 else 0.0
                    total["prev"] += e * _share(u, _top(_matrix(previous[n]), rr)) if previous else 0.0
                    total["cur"] += e * _share(u, _top(_matrix(before[n]), rr))
                    q = torch.linalg.qr(torch.randn(u.shape[1], rr, generator=gen, dtype=torch.float64))[0]
                    total["rand"] += e * _share(u, q.T)
                for k in KINDS:
                    shares[k].append(total[k] / norm)
            cells += [f"{np.mean(shares[k]):.2f}" for k in KINDS]
        previous = {n: state.global_params[n] - before[n] for n in kernels}
        acc = 100 * state.records[-1].get("accuracy", float("nan"))
        print(f"| {state.round} | {acc:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
