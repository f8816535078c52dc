"""Codec throughput: encode + decode of one update, in M parameters per second, single-threaded.

    python benchmarks/throughput.py [--sizes 1000000,10000000] [--repeats 5] [--codecs ...]

The model spec is one conv kernel of the given size (every value goes through the codec's compressed
path) plus nothing else; the update is N(0, 0.01). Reported: the best of ``--repeats`` timings of
encode and of decode, and the payload's bits per parameter from ``len()`` of the bytes. Timings are
wall-clock with ``torch.set_num_threads(1)``; on a shared machine take the best, not the mean.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedcodec.codecs import CodecContext, ModelSpec, TensorSpec, build_uplink
from fedcodec.fl.rng import torch_generator

CODECS = {
    "fp32": ("fp32", {}), "fp16": ("fp16", {}),
    "fedmrn-binary": ("fedmrn", {"mask": "binary"}), "fedmrn-signed": ("fedmrn", {"mask": "signed"}),
    "fedmrn-binary+ec": ("fedmrn", {"mask": "binary", "entropy": True}),
    "signsgd": ("signsgd", {}), "qsgd-1": ("qsgd", {"levels": 1}), "qsgd-4": ("qsgd", {"levels": 4}),
    "topk-1%": ("topk", {"fraction": 0.01}), "fedpm": ("fedpm", {}), "fedbat": ("fedbat", {}),
}


def measure(name: str, n: int, repeats: int) -> dict:
    codec_name, opts = CODECS[name]
    uplink = build_uplink(codec_name, **opts)
    codec = uplink.codec
    spec = ModelSpec((TensorSpec("w", (n, 1, 1, 1), "weight"),))
    g = torch.Generator().manual_seed(0)
    update = {"w": torch.randn(spec.tensors[0].shape, generator=g) * 0.01}
    reference = {"w": uplink.algorithm.init_global({"w": torch.zeros(spec.tensors[0].shape)}, spec)["w"]}
    if name == "fedmrn-binary" or name == "fedmrn-binary+ec":  # a realistic mask density: U inside [0, N]
        from fedcodec.codecs.fedmrn import make_noise

        noise = torch.from_numpy(make_noise(1, n, "uniform", 0.01)).reshape(spec.tensors[0].shape)
        update = {"w": noise * torch.rand(noise.shape, generator=g) * (torch.rand(noise.shape, generator=g) < 0.5)}
    enc, dec = [], []
    for r in range(repeats):
        ctx = CodecContext(spec, client=0, round=1, seed=1 + r, rng=torch_generator(r), reference=reference)
        t0 = time.perf_counter()
        payload = codec.encode(update, ctx)
        t1 = time.perf_counter()
        codec.decode(payload, ctx)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    e, d = min(enc), min(dec)
    return {"codec": name, "params": n, "encode_ms": 1e3 * e, "decode_ms": 1e3 * d,
            "mparams_per_s": n / (e + d) / 1e6, "bits_per_param": 8 * len(payload) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure(c, int(n), args.repeats) for n in args.sizes.split(",") for c in args.codecs.split(",")]
    print("| codec | params | encode ms | decode ms | encode+decode M params/s | bits/param |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['codec']} | {r['params']:,} | {r['encode_ms']:.1f} | {r['decode_ms']:.1f} "
              f"| {r['mparams_per_s']:.1f} | {r['bits_per_param']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
