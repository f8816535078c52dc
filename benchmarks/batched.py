"""Rounds per second of client training, one client at a time against ``batch_clients`` = K.

The bench setting of issue 19: CNN4, Fashion-MNIST-shaped data (synthetic 28x28 images: the timing
does not depend on the pixels), 10 clients of 600 examples, all 10 in every round, batch 64, 1 local
epoch, FedAvg (``--method`` for another). What is timed is one round's exchange,
:meth:`fedcodec.fl.loop.InProcessTransport.exchange`: every client decodes its broadcast, trains and
encodes its update; no aggregation, no evaluation. Every repeat times every mode once, in rotation
(sequential, K=2, K=5, K=10, ...), after one untimed warm-up round each, so the ratios come from the
same minutes of the same machine. The table gives each mode's best and median seconds per round,
rounds per second, and the speed-up over sequential from the best times and from the per-repeat
ratios' median. The mean training loss of each mode is printed as a check: batched training must
agree with sequential training to float tolerance (``tests/test_batched.py``).

    python benchmarks/batched.py                       # CPU, 1 torch thread, 5 repeats
    python benchmarks/batched.py --device cuda --repeats 10
    python benchmarks/batched.py --batch-clients 2,5,10 --method fedmrn-binary
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from fedcodec.config import Config
from fedcodec.data import make_synthetic_images
from fedcodec.fl import loop
from fedcodec.fl.simulation import setup


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (fedcodec's device key)")
    p.add_argument("--batch-clients", default="2,5,10", help="the K to time against sequential (comma-separated)")
    p.add_argument("--method", default="fedavg")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--examples", type=int, default=600, help="training examples per client")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(k) for k in args.batch_clients.split(",")]
    cfg = Config(method=args.method, num_clients=args.clients, clients_per_round=args.clients, rounds=1,
                 local_epochs=args.epochs, batch_size=args.batch_size, seed=0, device=args.device).validate()
    source = make_synthetic_images(args.clients * args.examples, 10, seed=0)
    sim, state = setup(cfg, source)
    assert all(len(part) == args.examples for part in sim.parts), "the iid partition gives equal clients"
    plan = loop.plan_round(sim, state, lambda clients: set(clients))
    modes = [1] + sizes

    def round_seconds(k: int) -> tuple[float, float]:
        transport = loop.InProcessTransport(sim, batch_clients=k)
        t0 = time.perf_counter()
        replies = transport.exchange(plan, state)
        if sim.runtime.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return seconds, float(np.mean([r.train_loss for r in replies.values()]))

    losses = {k: round_seconds(k)[1] for k in modes}  # warm-up: vmap's first trace, allocator, caches
    times: dict[int, list[float]] = {k: [] for k in modes}
    for _ in range(args.repeats):
        for k in modes:
            times[k].append(round_seconds(k)[0])
    device = sim.runtime.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, {args.threads} torch thread(s); {args.clients} "
          f"clients x {args.examples} examples, batch {args.batch_size}, {args.epochs} epoch(s), {cfg.method}; "
          f"{args.repeats} repeats")
    print()
    print("| clients at once | best s/round | median s/round | rounds/s (best) | speed-up (best) "
          "| speed-up (median of ratios) | mean train loss |")
    print("|---|---|---|---|---|---|---|")
    base = times[1]
    for k in modes:
        ratios = [b / t for b, t in zip(base, times[k])]
        label = "1 (sequential)" if k == 1 else f"{k}"
        print(f"| {label} | {min(times[k]):.3f} | {statistics.median(times[k]):.3f} | {1 / min(times[k]):.3f} | "
              f"{min(base) / min(times[k]):.2f}x | {statistics.median(ratios):.2f}x | {losses[k]:.6f} |")


if __name__ == "__main__":
    main()
