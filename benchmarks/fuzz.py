"""Fuzz campaign: hostile payloads against every registered codec's decoder, on the CNN4 spec.

Each codec is built with its defaults and fed ``--inputs`` inputs made from a few valid payloads:
random bytes (behind correct header prefixes of random length), truncations, extensions, bit flips and
byte overwrites (CRC left stale), correct envelopes (CRC recomputed) around mutated, spliced,
truncated, extended or random bodies and bodies with NaN/Inf/huge floats written in, envelopes declaring
absurd sizes, and a few real bodies of 8-32 MiB. Every decode must return the spec's tensors (names,
shapes, float32, all finite) or raise ``PayloadError``; anything else is a crash and is printed.

    python benchmarks/fuzz.py --inputs 10000 --seed 0

``--target files`` fuzzes the parsers of outside files instead (``.fcn``, ``codec.safetensors``,
checkpoints, IDX, CIFAR-10 pickles, TOML configs, ``--set`` values; see ``benchmarks/fuzz_files.py``),
``--target all`` does both:

    python benchmarks/fuzz.py --target files --inputs 2000 --seed 0

Input ``i`` of a codec is a pure function of (seed, codec name, i): ``make_input`` regenerates it. The
exit status is 1 if any codec crashed or let a malformed or non-finite update through.
"""

from __future__ import annotations

import argparse
import collections
import struct
import sys
import time
import tracemalloc
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedcodec.codecs import Codec, CodecContext, ModelSpec, available_codecs, build_uplink, wire
from fedcodec.errors import PayloadError
from fedcodec.fl.rng import torch_generator
from fedcodec.models import build_model

F32_SPECIALS = [np.float32(x).tobytes() for x in
                (np.nan, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-45, -0.0, 1e30)] + [b"\x01\x00\x80\x7f"]
WORD_SPECIALS = F32_SPECIALS + [b"\xff" * 8, b"\x00" * 8, struct.pack("<Q", 2**63), struct.pack("<I", 2**31),
                                b"\x07", b"\xff", b"\x80"]
CODEC_SEED = 1000
SIZE_SPECIALS = [2**32 - 1, 2**31, 2**31 - 1, 2**24, 0, 1]

# strategy: relative weight
STRATEGIES = {
    "random_bytes": 6, "truncate": 6, "extend": 5, "bit_flips": 8, "overwrite": 6,
    "body_edit": 20, "body_floats": 8, "body_truncate": 6, "body_extend": 5, "body_splice": 4,
    "body_random": 5, "body_random_same_length": 5, "absurd_size": 10, "huge_body": 0.3,
}


@dataclass
class Case:
    name: str
    codec: Codec
    spec: ModelSpec
    valid: list[bytes]
    bodies: list[bytes]
    #: the server's store for the client, for a codec that fits itself on the client (AE)
    store: dict | None = None

    @property
    def zero(self) -> dict:
        return {t.name: torch.zeros(t.shape) for t in self.spec.tensors}

    def wrap(self, body) -> bytes:
        return wire.pack(self.codec.codec_id, self.spec.fingerprint, bytes(body))


def make_case(name: str, spec: ModelSpec, n_valid: int = 4) -> Case:
    base, _, stage = name.partition("+")  # "fedmrn+ec": the codec with its entropy stage
    uplink = build_uplink(base, entropy=stage == "ec")
    codec, setup = uplink.codec, uplink.setup
    zero = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    client_store, server_store = {}, None
    first = CodecContext(spec, client=0, round=1, seed=1, rng=torch_generator(99), reference=zero, state=client_store)
    if setup is not None and setup.prepass(first) is not None:  # fit on update-like snapshots; the server accepts the setup message
        snaps = [{t.name: torch.randn(t.shape, generator=torch.Generator().manual_seed(50 + j)) * 0.01
                  for t in spec.tensors} for j in range(4)]
        server_store = {}
        setup.accept_setup(setup.fit(snaps, first), CodecContext(spec, client=0, round=1, state=server_store))
    valid = []
    for i in range(n_valid):
        g = torch.Generator().manual_seed(i)
        scale = [0.0, 0.001, 0.01, 1.0][i % 4]
        update = {t.name: torch.randn(t.shape, generator=g) * scale for t in spec.tensors}
        # one codec seed: FedMRN binds a payload to its client-round's seed, which the decoder is told
        c = CodecContext(spec, client=0, round=1, seed=CODEC_SEED, rng=torch_generator(i), reference=zero,
                         state=client_store)
        valid.append(codec.encode(update, c))
    bodies = [bytes(wire.unpack(p, codec.codec_id, spec.fingerprint)) for p in valid]
    return Case(name, codec, spec, valid, bodies, server_store)


def body_len_offset(payload: bytes) -> int:
    return 4 + 1 + 1 + payload[5] + 8


def recrc(buf: bytearray) -> bytes:
    buf[-4:] = struct.pack("<I", zlib.crc32(memoryview(buf)[:-4]))
    return bytes(buf)


def chunk(rng: np.random.Generator) -> bytes:
    if rng.random() < 0.5:
        return WORD_SPECIALS[rng.integers(len(WORD_SPECIALS))]
    return rng.bytes(int(rng.integers(1, 17)))


def edit(rng: np.random.Generator, buf: bytearray) -> None:
    """One random edit of ``buf`` in place."""
    n = len(buf)
    op = rng.choice(["flip", "set", "set_end", "insert", "delete", "truncate", "extend"])
    if op == "flip" and n:
        buf[rng.integers(n)] ^= 1 << int(rng.integers(8))
    elif op == "set" and n:
        p, c = int(rng.integers(n)), chunk(rng)
        buf[p:p + len(c)] = c[:n - p]
    elif op == "set_end":
        p, c = n - 4 * int(rng.integers(1, 65)), chunk(rng)
        if p >= 0:
            buf[p:p + len(c)] = c[:n - p]
    elif op == "insert":
        p = int(rng.integers(n + 1))
        buf[p:p] = chunk(rng)
    elif op == "delete" and n:
        p = int(rng.integers(n))
        del buf[p:p + int(rng.integers(1, 65))]
    elif op == "truncate":
        del buf[int(rng.integers(n + 1)):]
    elif op == "extend":
        buf += rng.bytes(int(rng.integers(1, 65)))


def make_input(case: Case, seed: int, i: int) -> tuple[str, bytes]:
    """Input ``i`` of the campaign for ``case``: (strategy, payload)."""
    rng = np.random.default_rng([seed, zlib.crc32(case.name.encode()), i])
    names = list(STRATEGIES)
    weights = np.array([STRATEGIES[s] for s in names])
    strategy = names[rng.choice(len(names), p=weights / weights.sum())]
    k = int(rng.integers(len(case.valid)))
    valid, body = case.valid[k], case.bodies[k]
    n = len(valid)
    if strategy == "random_bytes":
        cut = int(rng.choice([0, 4, 5, 6, 6 + valid[5], body_len_offset(valid), body_len_offset(valid) + 4]))
        return strategy, valid[:cut] + rng.bytes(int(rng.integers(0, 4096)))
    if strategy == "truncate":
        return strategy, valid[:int(rng.integers(n))]
    if strategy == "extend":
        return strategy, valid + rng.bytes(int(rng.integers(1, 257)))
    if strategy == "bit_flips":
        buf = bytearray(valid)
        for p in rng.integers(n, size=int(rng.integers(1, 9))):
            buf[p] ^= 1 << int(rng.integers(8))
        return strategy, bytes(buf)
    if strategy == "overwrite":
        buf = bytearray(valid)
        for _ in range(int(rng.integers(1, 5))):
            p, c = int(rng.integers(n)), chunk(rng)
            buf[p:p + len(c)] = c[:n - p]
        return strategy, bytes(buf)
    if strategy == "body_edit":
        buf = bytearray(body)
        for _ in range(int(rng.integers(1, 7))):
            edit(rng, buf)
        return strategy, case.wrap(buf)
    if strategy == "body_floats":  # NaN/Inf/extreme float32 words at 4-byte positions, from either end
        buf = bytearray(body)
        m = len(buf)
        for _ in range(int(rng.integers(1, 9))):
            w = F32_SPECIALS[rng.integers(len(F32_SPECIALS))]
            p = 4 * int(rng.integers(m // 4)) if rng.random() < 0.5 else m - 4 * int(rng.integers(1, m // 4 + 1))
            if 0 <= p <= m - 4:
                buf[p:p + 4] = w
        return strategy, case.wrap(buf)
    if strategy == "body_truncate":
        return strategy, case.wrap(body[:int(rng.integers(len(body) + 1))])
    if strategy == "body_extend":
        return strategy, case.wrap(body + rng.bytes(int(rng.integers(1, 257))))
    if strategy == "body_splice":
        other = case.bodies[int(rng.integers(len(case.bodies)))]
        cut = int(rng.integers(len(body) + 1))
        return strategy, case.wrap(body[:cut] + other[cut:])
    if strategy == "body_random":
        return strategy, case.wrap(rng.bytes(int(rng.integers(0, 4096))))
    if strategy == "body_random_same_length":
        return strategy, case.wrap(rng.bytes(len(body)))
    if strategy == "absurd_size":
        buf = bytearray(valid)
        if rng.random() < 0.75:
            m = n - body_len_offset(valid) - 8
            value = int(rng.choice(SIZE_SPECIALS + [max(m - 1, 0), m + 1, 4 * m])) if rng.random() < 0.5 \
                else int(rng.integers(2**32))
            struct.pack_into("<I", buf, body_len_offset(valid), value)
        else:
            buf[5] = int(rng.choice([0, 1, 255, (buf[5] + 1) % 256, (buf[5] - 1) % 256]))
        return strategy, (recrc(buf) if rng.random() < 0.5 else bytes(buf))
    # huge_body: a correct envelope around a real body of 8-32 MiB
    size = int(rng.integers(8, 33)) << 20
    return strategy, case.wrap(bytes(size) if rng.random() < 0.5 else rng.bytes(size))


@dataclass
class Tally:
    tried: int = 0
    accepted: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    crashes: list = field(default_factory=list)
    nonfinite: int = 0
    malformed: list = field(default_factory=list)
    max_time: tuple[float, str] = (0.0, "")
    max_alloc: tuple[int, str] = (0, "")
    by_strategy: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))


def check_output(case: Case, out) -> str | None:
    """None if ``out`` is a well-formed update for the spec, else what is wrong ("nonfinite" for NaN/Inf)."""
    if not isinstance(out, dict) or sorted(out) != sorted(case.spec.names):
        return f"wrong tensor names: {sorted(out) if isinstance(out, dict) else type(out).__name__}"
    for t in case.spec.tensors:
        v = out[t.name]
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or tuple(v.shape) != t.shape:
            return f"{t.name}: {type(v).__name__} {getattr(v, 'dtype', '')} {tuple(getattr(v, 'shape', ()))}"
        if not bool(torch.isfinite(v).all()):
            return "nonfinite"
    return None


def fuzz_codec(case: Case, inputs: int, seed: int, progress: bool) -> Tally:
    tally = Tally()
    for i in range(inputs):
        strategy, payload = make_input(case, seed, i)
        client = i
        tally.tried += 1
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        try:
            out = case.codec.decode(payload, CodecContext(case.spec, client=client, round=1, seed=CODEC_SEED,
                                                          reference=case.zero, state=case.store))
            outcome = "accepted"
        except PayloadError as err:
            out = None
            outcome = err.reason
            if err.client != client:
                tally.malformed.append((i, strategy, f"PayloadError names client {err.client}, not {client}"))
        except Exception as err:  # noqa: BLE001 - the point is to catch everything else
            out = None
            outcome = "CRASH"
            tally.crashes.append((i, strategy, len(payload), traceback.format_exc(limit=6), repr(err)))
        dt = time.perf_counter() - t0
        alloc = tracemalloc.get_traced_memory()[1] - base
        if dt > tally.max_time[0]:
            tally.max_time = (dt, f"input {i}, {strategy}, {len(payload):,} bytes")
        if alloc > tally.max_alloc[0]:
            tally.max_alloc = (alloc, f"input {i}, {strategy}, {len(payload):,} bytes")
        if outcome == "accepted":
            problem = check_output(case, out)
            if problem == "nonfinite":
                tally.nonfinite += 1
                outcome = "NONFINITE"
            elif problem:
                tally.malformed.append((i, strategy, problem))
                outcome = "MALFORMED"
            else:
                tally.accepted += 1
        elif outcome != "CRASH":
            tally.rejected[outcome] += 1
        tally.by_strategy[strategy][outcome] += 1
        if progress and (i + 1) % 1000 == 0:
            print(f"  ... {case.name}: {i + 1}/{inputs}", file=sys.stderr, flush=True)
    return tally


def report(case: Case, t: Tally, elapsed: float) -> None:
    rejected = sum(t.rejected.values())
    print(f"codec {case.name}: valid payload {len(case.valid[-1]):,} bytes "
          f"(CNN4, {case.spec.numel():,} values); {elapsed:.1f} s")
    print(f"  inputs tried          {t.tried:>7,}")
    print(f"  accepted (valid)      {t.accepted:>7,}")
    print(f"  rejected PayloadError {rejected:>7,}")
    for reason, count in sorted(t.rejected.items(), key=lambda kv: -kv[1]):
        print(f"    {reason:<19} {count:>7,}")
    print(f"  crashes               {len(t.crashes):>7,}")
    print(f"  non-finite outputs    {t.nonfinite:>7,}")
    print(f"  malformed outputs     {len(t.malformed):>7,}")
    print(f"  max decode time       {t.max_time[0] * 1e3:>9.1f} ms   ({t.max_time[1]})")
    print(f"  max decode allocation {t.max_alloc[0] / 2**20:>9.2f} MiB  ({t.max_alloc[1]}; "
          "Python + NumPy, tracemalloc)")
    print(f"  {'strategy':<25}{'tried':>7}{'accepted':>10}{'rejected':>10}  top reasons")
    for s in STRATEGIES:
        c = t.by_strategy.get(s, collections.Counter())
        tried = sum(c.values())
        acc = c["accepted"]
        bad = {k: v for k, v in c.items() if k in ("CRASH", "NONFINITE", "MALFORMED")}
        rej = tried - acc - sum(bad.values())
        top = ", ".join(f"{k} {v}" for k, v in c.most_common() if k != "accepted")
        print(f"  {s:<25}{tried:>7}{acc:>10}{rej:>10}  {top[:60]}")
    for i, strategy, size, tb, err in t.crashes[:10]:
        print(f"  CRASH input {i} ({strategy}, {size:,} bytes): {err}\n" + "    " + tb.replace("\n", "\n    "))
    for i, strategy, problem in t.malformed[:10]:
        print(f"  MALFORMED input {i} ({strategy}): {problem}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=10_000, help="inputs per codec (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    every = sorted(available_codecs()) + sorted(f"{n}+ec" for n, i in available_codecs().items() if i.codec.symbolic)
    ap.add_argument("--codecs", default=",".join(every),
                    help="comma-separated codec names, NAME+ec for the entropy stage (default: every registered "
                         "codec, and each symbol-writing one with +ec)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: a decode is small, and timings stay steady on a busy machine)")
    ap.add_argument("--progress", action="store_true", help="progress lines on stderr")
    ap.add_argument("--target", choices=("codecs", "files", "all"), default="codecs",
                    help="codecs: the payload decoders (default); files: the parsers of outside files "
                         "(benchmarks/fuzz_files.py); all: both")
    files = ap.add_argument_group("file parsers (--target files/all)")
    files.add_argument("--parsers", default="fcn,codec,checkpoint,idx,cifar,toml,set",
                       help="comma-separated file parsers to fuzz")
    files.add_argument("--workers", type=int, default=1, help="worker processes, each under the memory cap")
    files.add_argument("--mem-mib", type=int, default=3072, help="RLIMIT_AS of each worker (MiB)")
    files.add_argument("--case-timeout", type=float, default=30.0,
                       help="seconds one input may take; a worker past it is killed (a crash)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    status = 0
    if args.target in ("files", "all"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import fuzz_files

        status = fuzz_files.main(args)
        if args.target == "files":
            return status

    spec = ModelSpec.from_model(build_model("cnn4", (1, 28, 28), 10, seed=0))
    names = [n for n in args.codecs.split(",") if n]
    print(f"fuzz campaign: {args.inputs:,} inputs per codec, seed {args.seed}, codecs {', '.join(names)}; "
          f"torch {torch.__version__} ({args.threads} thread(s)), numpy {np.__version__}")
    bad = 0
    start = time.perf_counter()
    tracemalloc.start()
    try:
        for name in names:
            case = make_case(name, spec)
            t0 = time.perf_counter()
            tally = fuzz_codec(case, args.inputs, args.seed, args.progress)
            report(case, tally, time.perf_counter() - t0)
            bad += len(tally.crashes) + tally.nonfinite + len(tally.malformed)
    finally:
        tracemalloc.stop()
    print(f"total {time.perf_counter() - start:.1f} s; "
          + ("FAIL: crashes or bad outputs above" if bad else "no crashes, no non-finite or malformed outputs"))
    return 1 if bad or status else 0


if __name__ == "__main__":
    sys.exit(main())
