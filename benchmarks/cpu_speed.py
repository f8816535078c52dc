"""CPU speed of the two loops a run spends its time in: the CNN4 training step and the evaluation.

Training step (CNN4, Fashion-MNIST shapes, the bench batch of 64, plain SGD as FedAvg clients do): the
eager loop fedcodec runs against the options issue 19 asks about: channels-last memory format,
``torch.compile`` (inductor), and the torch thread count (1 vs 2). Every variant is timed in each
repeat, one after another in rotation, so the ratios to eager come from the same minutes of the same
machine; the table gives each variant's median ms/step and the median of its per-repeat ratios.

Evaluation (10,000 test images, a model after ``--warm-steps`` SGD steps so its BatchNorm statistics
are a trained model's): the code path before issue 19 (``torch.no_grad``, batches of 1000, a Python
float and int per batch), reproduced here as it was, against :class:`fedcodec.fl.task.Classification`
at its default batch for the CPU and at other batch sizes. The accuracies of all paths are printed:
they must be equal.

    python benchmarks/cpu_speed.py                          # 5 repeats, 40 steps per variant and repeat
    python benchmarks/cpu_speed.py --repeats 3 --no-compile # without torch.compile (no C++ compiler)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fedcodec.data import load_dataset
from fedcodec.fl.task import Classification, eval_batch_size
from fedcodec.models import build_model


def train_steps(model, x, y, steps: int, batch: int, channels_last: bool) -> float:
    """Seconds for ``steps`` SGD steps of ``model`` on consecutive batches of (x, y)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    model.train()
    n = len(x) // batch
    t0 = time.perf_counter()
    for i in range(steps):
        xb = x[(i % n) * batch:(i % n + 1) * batch]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[(i % n) * batch:(i % n + 1) * batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


class Runtime:
    """The little of :class:`fedcodec.fl.client.ClientRuntime` an evaluation uses."""

    def __init__(self, model):
        self.model = model

    def load(self, params) -> None:
        pass


@torch.no_grad()
def evaluate_before(model, x, y, size: int = 1000) -> dict[str, float]:
    """``Classification.evaluate`` as it was before issue 19."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(x), size):
        out = model(x[start:start + size])
        yb = y[start:start + size]
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return {"accuracy": correct / len(x), "test_loss": loss / len(x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per variant and repeat")
    ap.add_argument("--batch", type=int, default=64, help="training batch (the bench preset's)")
    ap.add_argument("--warm-steps", type=int, default=200, help="SGD steps before the evaluation is timed")
    ap.add_argument("--eval-batches", default="64,128,256,512,1000",
                    help="batch sizes the new evaluation is also timed at")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--only", choices=("train", "eval"), help="time only the training step or the evaluation")
    args = ap.parse_args()

    threads = torch.get_num_threads()
    src = load_dataset("fashion-mnist")
    x, y = src.train_x[:6400], src.train_y[:6400]
    print(f"torch {torch.__version__}, {threads} threads by default; CNN4, batch {args.batch}, "
          f"{args.steps} steps x {args.repeats} repeats", flush=True)

    def fresh(channels_last: bool = False):
        model = build_model("cnn4", src.input_shape, src.num_classes, seed=0)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    if args.only != "eval":
        train_table(args, fresh, x, y, threads)
    if args.only != "train":
        eval_table(args, fresh, src, threads)


def train_table(args, fresh, x, y, threads: int) -> None:
    """The training-step table: every variant in rotation, ``args.repeats`` times."""
    variants = {"eager": (fresh(), False, threads),
                "channels_last": (fresh(True), True, threads)}
    if threads > 1:
        variants["eager, 1 thread"] = (fresh(), False, 1)
    if not args.no_compile:
        compiled = torch.compile(fresh())
        t0 = time.perf_counter()
        train_steps(compiled, x, y, 3, args.batch, False)
        print(f"torch.compile: first steps (compilation) {time.perf_counter() - t0:.1f} s", flush=True)
        variants["torch.compile"] = (compiled, False, threads)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for model, cl, n in variants.values():  # warm-up: allocator, oneDNN primitive caches
        torch.set_num_threads(n)
        train_steps(model, x, y, 5, args.batch, cl)
    for rep in range(args.repeats):
        for name, (model, cl, n) in variants.items():
            torch.set_num_threads(n)
            times[name].append(1000 * train_steps(model, x, y, args.steps, args.batch, cl) / args.steps)
        torch.set_num_threads(threads)
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in times.items()), flush=True)
    print("\n| training step (CNN4, batch %d) | threads | median ms/step | ratio to eager (median of repeats) |"
          % args.batch)
    print("|---|---:|---:|---:|")
    for name, (_, _, n) in variants.items():
        ratios = [a / b for a, b in zip(times[name], times["eager"])]
        print(f"| {name} | {n} | {statistics.median(times[name]):.1f} | {statistics.median(ratios):.3f} |")


def eval_table(args, fresh, src, threads: int) -> None:
    """The evaluation table: the path before issue 19 and the new one at several batch sizes."""
    model = fresh()
    train_steps(model, src.train_x, src.train_y, args.warm_steps, args.batch, False)
    model.eval()
    rt, tx, ty = Runtime(model), src.test_x, src.test_y
    paths = {"before: no_grad, batch 1000, float() per batch": lambda: evaluate_before(model, tx, ty)}
    default = eval_batch_size("cpu")
    paths[f"after: Classification, batch {default} (CPU default)"] = lambda: Classification(tx, ty).evaluate(rt, {}, {})
    for b in (int(v) for v in args.eval_batches.split(",")):
        if b != default:
            paths[f"after, batch {b}"] = lambda b=b: Classification(tx, ty, b).evaluate(rt, {}, {})
    secs: dict[str, list[float]] = {k: [] for k in paths}
    results = {}
    for name, fn in paths.items():
        results[name] = fn()  # warm-up, and the result
    for rep in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            secs[name].append(time.perf_counter() - t0)
        print(f"repeat {rep + 1}: " + ", ".join(f"{v[-1]:.2f} s" for v in secs.values()), flush=True)
    scale = 10_000 / len(tx)
    base = next(iter(paths))
    print(f"\n| evaluation ({len(tx):,} images, {threads} threads) | median s per 10k images | ratio to before "
          "| accuracy | test loss |")
    print("|---|---:|---:|---:|---:|")
    for name in paths:
        ratios = [a / b for a, b in zip(secs[name], secs[base])]
        r = results[name]
        print(f"| {name} | {scale * statistics.median(secs[name]):.2f} | {statistics.median(ratios):.3f} "
              f"| {100 * r['accuracy']:.2f} | {r['test_loss']:.6f} |")
    accs = {r["accuracy"] for r in results.values()}
    print(f"\naccuracy identical across paths: {len(accs) == 1}")


if __name__ == "__main__":
    main()
