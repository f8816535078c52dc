"""Why FedMRN's mask bits compress as they do: density, entropy and coded size of real client masks.

    python benchmarks/mask_entropy.py [--checkpoint RUN/fedmrn-binary-ec/checkpoint.safetensors]
                                      [--preset bench] [--clients 5] [--round 1]

Trains ``--clients`` sampled clients of round ``--round`` from the given global model (the run's
initial model when no checkpoint is given) exactly as the engine does, with FedMRN-binary, then from
their real payloads reports: the fraction of mask bits that are 1 (the density d), the order-0 entropy
H(d) in bits, the entropy conditioned on the noise-magnitude bucket that the entropy stage uses as
context, and the bits per masked weight actually sent with ``entropy=true`` (from ``len()`` of the
payload, minus the envelope, the 14 bytes of fields and the float32 BatchNorm values; the stage's
count tables are included).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fedcodec.codecs import build_codec, wire
from fedcodec.codecs.fedmrn import make_noise, noise_contexts
from fedcodec.config import build_config
from fedcodec.data import load_dataset
from fedcodec.fl import rng as rngs
from fedcodec.fl.client import client_fit
from fedcodec.fl.simulation import setup


def entropy(p: np.ndarray) -> float:
    p = p[(p > 0) & (p < 1)]
    return float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)).sum()) if p.size else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a run's checkpoint.safetensors (its global model is used)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--partition", default="iid")
    ap.add_argument("--method", default="fedmrn-binary")
    ap.add_argument("--round", type=int, default=1, help="which round's clients and seeds to use")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(args.preset, None, {"method": args.method, "partition": args.partition})
    source = load_dataset(cfg.dataset, cfg.data_dir)
    sim, state = setup(cfg, source)
    params = state.global_params
    if args.checkpoint:
        from safetensors.torch import load_file

        params = {k: v for k, v in load_file(args.checkpoint).items() if "/" not in k}
    plain = sim.runtime.uplink.codec
    ec = build_codec("fedmrn", **{**cfg.uplink_options, "entropy": True})
    masked, dense = sim.spec.select(("weight",)), sim.spec.select(("param", "buffer"))
    n, n_dense = sum(t.numel for t in masked), sum(t.numel for t in dense)
    fixed = 8 + 1 + 1 + 4
    clients = rngs.sample_clients(cfg.seed, args.round, cfg.num_clients, cfg.clients_per_round)[:args.clients]
    down, _ = sim.runtime.downlink.send(params, args.round, clients, {})
    print("| client | density d | H(d) bits | H(bit given noise bucket) bits | sent with entropy=true, bits/masked weight |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for c in clients:
        x, y = sim.client_data(c)
        payload, _ = client_fit(sim.runtime, down[c], x, y, sim.training, args.round, c, state={})
        body = bytes(wire.unpack(payload, plain.codec_id, sim.spec.fingerprint))
        bits = np.unpackbits(np.frombuffer(body[fixed:fixed + (n + 7) // 8], np.uint8), count=n, bitorder="little")
        seed = int.from_bytes(body[:8], "little")
        noise = make_noise(seed, n, plain.options.noise, plain.options.alpha)
        ctxs, k = noise_contexts(noise, plain.options.noise, plain.options.alpha)
        d = bits.mean()
        h_cond = sum((ctxs == j).sum() * entropy(np.array([bits[ctxs == j].mean()])) for j in range(k)) / n
        # re-encode the same mask bits with the entropy stage: its body is the fields, the coded
        # section and the dense values
        w = ec.writer().u64(seed).u8(0).u8(0).f32(plain.options.alpha).symbols(bits, 2, ctxs, k)
        coded = len(w.getvalue()) - fixed
        rows.append((d, entropy(np.array([d])), h_cond, 8 * coded / n))
        print(f"| {c} | {d:.4f} | {rows[-1][1]:.4f} | {h_cond:.4f} | {rows[-1][3]:.4f} |")
    m = np.mean(rows, axis=0)
    print(f"| mean | {m[0]:.4f} | {m[1]:.4f} | {m[2]:.4f} | {m[3]:.4f} |")
    print(f"\n{n:,} masked weights, {n_dense:,} float32 values; round {args.round}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'initial model'}")


if __name__ == "__main__":
    main()
