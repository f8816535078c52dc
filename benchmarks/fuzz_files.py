"""Fuzz campaign over fedcodec's parsers of outside FILES (``benchmarks/fuzz.py --target files``).

Parsers: ``fcn`` (``.fcn`` learned-compression files: read_file + Coder.decompress, vector and image
codecs), ``codec`` (``codec.safetensors``: Trained.load + model(0)), ``checkpoint`` (checkpoint.load
with the model's tensors as template), ``idx`` (read_idx, with Fashion-MNIST's expectations on even
inputs and none on odd ones), ``cifar`` (a CIFAR-10 batch pickle: cifar10._read_batch), ``toml``
(``--config`` files: build_config) and ``set`` (``--set KEY=VALUE`` items: parse_assignments).

Each input is made from a few valid files by one strategy: truncation, bit flips, overwrites with
size-like values, inserts/deletes, splices of two valid files, random bytes, structure-aware edits
(a safetensors header's JSON fields, a ``.fcn`` header re-sealed with a correct checksum, a
pickle opcode's argument, an IDX dimension) and bombs (gzip bombs, pickle shared-reference
"billion laughs", absurd declared shapes and header lengths, deep TOML nesting, huge integers).
Input ``i`` of a parser is a pure function of (seed, parser, i).

Inputs run in long-lived worker processes (``--workers``), each under ``RLIMIT_AS``
(``--mem-mib``) and a per-case wall-clock cap (``--case-timeout``); a worker that dies or runs past
the cap is replaced and the case counts as a crash. A case is: accepted (a valid object), rejected
with the parser's typed error (counted by reason), or a crash (any other exception, a killed
worker, a timeout). Per parser the table shows inputs, accepted, rejected, crashes, the largest
peak-RSS increase of one case (VmHWM, reset per case through /proc/self/clear_refs) and the slowest
case. Exit status 1 if any parser crashed.

    python benchmarks/fuzz.py --target files --inputs 2000 --seed 0
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pickle
import resource
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PARSERS = ("fcn", "codec", "checkpoint", "idx", "cifar", "toml", "set")
U32_SPECIALS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**24, 2**16, 255]
U64_SPECIALS = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**40, 2**32, 2**31]
#: (phrase in an error message, reason label), most specific first: how rejections are counted
REASONS = (
    ("checksum", "checksum"), ("cannot read", "io/gzip"), ("magic", "magic"), ("not a fedcodec", "not-ours"),
    ("format version", "version"), ("different config", "config-mismatch"), ("larger than", "file-size"),
    ("ends early", "truncated"), ("ends inside", "truncated"), ("truncated", "truncated"), ("too short", "truncated"),
    ("more data follows", "trailing"), ("trailing", "trailing"), ("follow the end", "trailing"),
    ("bytes of json", "header-length"), ("not valid json", "json"), ("not json", "json"), ("nests", "nesting"),
    ("not utf-8", "utf-8"), ("utf-8", "utf-8"), ("not valid toml", "toml-syntax"), ("too long to read", "huge-int"),
    ("64-bit", "int-range"), ("finite", "non-finite"), ("dotted key", "dotted-key"), ("at most 4096", "long-string"),
    ("unknown config key", "unknown-key"), ("expects key=value", "syntax"), ("expects", "type/range"),
    ("may hold", "too-large"), ("refusing to load global", "global"), ("calls a", "call"),
    ("cannot be called", "call"), ("is only accepted", "call"), ("build", "build"), ("opcode", "opcode"),
    ("memo", "memo"), ("stack", "stack"),
    ("dict key", "dict-key"), ("an integer of", "huge-int"), ("array", "array"), ("'labels'", "labels"),
    ("label", "labels"), ("'data'", "data"), ("expected a dict", "not-a-dict"),
    ("idx header declares", "declared-shape"), ("dimensions", "ndim"),
    ("dtype", "dtype"), ("malformed shape", "shape"), ("shape", "shape"), ("offsets", "offsets"),
    ("starts at byte", "offsets"), ("cover", "offsets"), ("tensor name", "name"),
    ("neither a model tensor", "key"), ("belongs to client", "client-id"), ("clients", "clients"),
    ("architecture", "architecture"), ("lambda", "metadata"), ("mode", "metadata"), ("info", "metadata"),
    ("round", "metadata"), ("records", "metadata"), ("ledger", "metadata"), ("config", "metadata"),
    ("metadata", "metadata"), ("model tensor", "model-mismatch"), ("store", "store-size"), ("elements", "size"),
    ("append", "structure"), ("setitem", "structure"), ("more than", "size"),
)

# --------------------------------------------------------------------------------------------- inputs


def pick(rng: np.random.Generator, items):
    """One of ``items``, exactly (numpy's choice would turn big integers into floats)."""
    return items[int(rng.integers(len(items)))]


def _edit(rng: np.random.Generator, buf: bytearray) -> None:
    n = len(buf)
    op = rng.choice(["flip", "u32", "u64", "insert", "delete", "byte"])
    p = int(rng.integers(n + 1))
    if op == "flip" and n:
        buf[p % n] ^= 1 << int(rng.integers(8))
    elif op == "u32":
        v = pick(rng, U32_SPECIALS) if rng.random() < 0.7 else int(rng.integers(2**32))
        buf[p:p + 4] = struct.pack("<I" if rng.random() < 0.5 else ">I", v)
    elif op == "u64":
        buf[p:p + 8] = struct.pack("<Q", pick(rng, U64_SPECIALS))
    elif op == "insert":
        buf[p:p] = rng.bytes(int(rng.integers(1, 33)))
    elif op == "delete":
        del buf[p:p + int(rng.integers(1, 65))]
    elif n:
        buf[p % n] = int(rng.integers(256))


def generic(rng: np.random.Generator, valid: list[bytes]) -> tuple[str, bytes]:
    base = valid[int(rng.integers(len(valid)))]
    kind = rng.choice(["truncate", "bit_flips", "edits", "splice", "random_bytes", "extend"],
                      p=[0.2, 0.2, 0.3, 0.1, 0.1, 0.1])
    if kind == "truncate":
        return kind, base[:int(rng.integers(len(base) + 1))]
    if kind == "bit_flips":
        buf = bytearray(base)
        for _ in range(int(rng.integers(1, 9))):
            if buf:
                buf[int(rng.integers(len(buf)))] ^= 1 << int(rng.integers(8))
        return kind, bytes(buf)
    if kind == "edits":
        buf = bytearray(base)
        for _ in range(int(rng.integers(1, 6))):
            _edit(rng, buf)
        return kind, bytes(buf)
    if kind == "splice":
        other = valid[int(rng.integers(len(valid)))]
        return kind, base[:int(rng.integers(len(base) + 1))] + other[int(rng.integers(len(other) + 1)):]
    if kind == "extend":
        return kind, base + rng.bytes(int(rng.integers(1, 257)))
    return kind, base[:int(rng.integers(0, 24))] + rng.bytes(int(rng.integers(0, 2048)))


def _safetensors_edit(rng: np.random.Generator, blob: bytes) -> bytes:
    """Parse a valid safetensors file's header and set one field to a hostile value."""
    (n,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    names = [k for k in doc if k != "__metadata__"]
    what = rng.choice(["dtype", "shape", "offsets", "meta", "rename", "drop", "length"])
    hostile = [-1, 0, 1, 2**31, 2**40, 2**63 - 1, 2**64, 1.5, "x", None, [], {}, True, [2**20, 2**20], [0] * 9]
    if what == "length":
        return struct.pack("<Q", pick(rng, U64_SPECIALS)) + blob[8:]
    if what == "meta" and "__metadata__" in doc:
        meta = doc["__metadata__"]
        key = list(meta)[int(rng.integers(len(meta)))]
        meta[key] = str(rng.choice(["", "[", "{}", "[]", "[[1,0,\"up\",\"x\",-1]]", "\"x\"", "1e999", "-1", "9" * 5000,
                                    "[" * 3000, json.dumps({"clients": 10**12}), json.dumps([[1, 2]] * 3),
                                    "{\"model\": {\"kind\": \"image\", \"dim\": 4096, \"latent\": 1024}}"]))
        if rng.random() < 0.5:  # or set one field inside the JSON value to a hostile value
            try:
                inner = json.loads(blob[8:8 + n].decode())["__metadata__"][key]
                inner = json.loads(inner)
            except (ValueError, RecursionError, KeyError):
                inner = None
            if isinstance(inner, dict) and inner:
                k = list(inner)[int(rng.integers(len(inner)))]
                inner[k] = hostile[int(rng.integers(len(hostile)))]
                meta[key] = json.dumps(inner)
    elif names:
        name = names[int(rng.integers(len(names)))]
        entry = doc[name]
        if what == "dtype":
            entry["dtype"] = str(rng.choice(["F64", "F16", "I64", "U8", "BOOL", "U64", "X", "F8_E4M3"]))
        elif what == "shape":
            entry["shape"] = hostile[int(rng.integers(len(hostile)))] if rng.random() < 0.5 else \
                [pick(rng, [0, 1, 2, 3, 2**20, 2**31]) for _ in range(int(rng.integers(0, 4)))]
        elif what == "offsets":
            entry["data_offsets"] = [int(rng.integers(0, 2**10)), pick(rng, [0, 4, 2**32, 2**62])]
        elif what == "rename":
            new = pick(rng, ["client/99/x", "client/x/y", "server/0/", "opt/", "a/b", "client/-1/x", "w" * 2000])
            doc[new] = doc.pop(name)
        elif what == "drop":
            doc.pop(name)
    head = json.dumps(doc).encode()
    return struct.pack("<Q", len(head)) + head + data


def gz_zeros(mib: int) -> bytes:
    member = gzip.compress(bytes(1 << 20), compresslevel=9)
    return member * mib


@dataclass
class Seeds:
    """Valid files per parser, and what each parser needs to run (built once per worker)."""

    valid: dict[str, list[bytes]] = field(default_factory=dict)
    env: dict = field(default_factory=dict)


def build_seeds(workdir: Path) -> Seeds:
    import torch

    from fedcodec.config import Config
    from fedcodec.data.idx import write_idx
    from fedcodec.fl import checkpoint
    from fedcodec.fl.ledger import Entry, Ledger
    from fedcodec.fl.simulation import RunState
    from fedcodec.neural.codec import Coder
    from fedcodec.neural.federated import Trained
    from fedcodec.neural.models import NTCConfig, build_ntc

    seeds = Seeds()
    vec, img = NTCConfig("vector", 4, latent=2, hidden=8), NTCConfig("image", 3, latent=8, hidden=8, downs=2)
    coders = {"vector": Coder.of(build_ntc(vec, 0)), "image": Coder.of(build_ntc(img, 0))}
    rng = np.random.default_rng(0)
    seeds.valid["fcn"] = [coders["vector"].compress(rng.random((n, 4), dtype=np.float32)) for n in (1, 7, 40)] + \
        [coders["image"].compress(rng.random((3, h, w), dtype=np.float32), "image") for h, w in ((8, 8), (13, 6))]
    seeds.env["coders"] = coders

    model = build_ntc(vec, 0)
    params = dict(model.named_parameters())
    shared = {k: v.detach().clone() for k, v in params.items() if not k.startswith("prior.")}
    codecs = []
    for mode, clients in (("federated", 2), ("global", 1), ("local", 1)):
        local_names = {"federated": [k for k in params if k.startswith("prior.")], "global": [],
                       "local": list(params)}[mode]
        sh = {k: v.detach().clone() for k, v in params.items() if k not in local_names}
        loc = [{k: params[k].detach().clone() + c for k in local_names} for c in range(clients)]
        path = workdir / f"codec-{mode}.safetensors"
        Trained(vec, mode, 30.0, sh if mode != "federated" else shared, loc, [], 10, 2).save(path)
        codecs.append(path.read_bytes())
    seeds.valid["codec"] = codecs

    g = torch.Generator().manual_seed(0)
    glob = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    config = Config(num_clients=4, clients_per_round=2, rounds=5).to_dict()
    state = RunState(2, glob, Ledger([Entry(1, 0, "down", "fp32", 60), Entry(1, 0, "up", "fp32", 60)]),
                     [{"round": 1, "accuracy": 0.5}, {"round": 2}], {0: {"ef/w": torch.zeros(4, 3)}},
                     {1: {"down/b": torch.ones(3)}}, {"m/w": torch.zeros(4, 3, dtype=torch.float64)})
    ckpts = []
    for variant in range(2):
        path = workdir / f"ckpt{variant}.safetensors"
        if variant:
            state.client_states, state.server_states, state.optimizer_state = {}, {}, {}
        checkpoint.save(path, config, state)
        ckpts.append(path.read_bytes())
    seeds.valid["checkpoint"] = ckpts
    seeds.env["checkpoint"] = (config, {k: v.clone() for k, v in glob.items()})

    idx = []
    for i, (arr, gz) in enumerate([(rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), True),
                                   (np.arange(7, dtype=np.uint8), False),
                                   (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), False)]):
        path = workdir / (f"idx{i}" + (".gz" if gz else ""))
        write_idx(path, arr)
        idx.append(path.read_bytes())
    seeds.valid["idx"] = idx

    batch = {b"batch_label": b"b", b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 9],
             b"filenames": [b"a.png", b"b.png", b"c.png"]}
    seeds.valid["cifar"] = [pickle.dumps(batch, protocol=p) for p in (2, 4, 5)]

    seeds.valid["toml"] = [t.encode() for t in (
        'rounds = 7\nlr = 0.5\nmethod = "fedmrn-binary"\n[codec_options]\nnoise = "gaussian"\n',
        'seed = 3\ndataset = "synthetic"\npartition = "dirichlet"\nbeta = 0.5\nmax_update_norm = 10.0\n',
        'downlink = "qsgd"\ndownlink_delta = true\n[downlink_options]\nlevels = 255\n')]
    seeds.valid["set"] = [t.encode() for t in ("rounds=5", "lr=0.1", "codec.alpha=0.01", "downlink.levels=15",
                                               "codec_options=noise=gaussian pm=false", "max_update_norm=none",
                                               "partition=k-classes", "seed=12")]
    return seeds


def make_input(parser: str, seeds: Seeds, seed: int, i: int) -> tuple[str, bytes]:
    """Input ``i`` of ``parser``: (strategy, bytes)."""
    rng = np.random.default_rng([seed, zlib.crc32(parser.encode()), i])
    valid = seeds.valid[parser]
    r = rng.random()
    if r < 0.04:
        return "bomb", bomb(parser, rng, seeds)
    if r < 0.35:
        special = structured(parser, rng, seeds)
        if special is not None:
            return special
    return generic(rng, valid)


def structured(parser: str, rng: np.random.Generator, seeds: Seeds) -> tuple[str, bytes] | None:
    valid = seeds.valid[parser]
    base = valid[int(rng.integers(len(valid)))]
    if parser in ("codec", "checkpoint"):
        return "header_field", _safetensors_edit(rng, base)
    if parser == "fcn":  # header fields edited, then a correct checksum: a forged, not a corrupted, file
        import hashlib
        body = bytearray(base[:-8])
        for _ in range(int(rng.integers(1, 4))):
            p = int(rng.integers(22, min(len(body), 60)))
            if rng.random() < 0.5:
                body[p:p + 4] = struct.pack("<I", pick(rng, U32_SPECIALS))
            else:
                body[p] = int(rng.choice([0, 1, 2, 3, 4, 8, 9, 255]))
        if rng.random() < 0.3:
            _edit(rng, body)
        return "resealed", bytes(body) + hashlib.blake2b(bytes(body), digest_size=8).digest()
    if parser == "idx":
        raw = gzip.decompress(base) if base[:2] == b"\x1f\x8b" else base
        buf = bytearray(raw)
        ndim = buf[3]
        p = 4 + 4 * int(rng.integers(max(ndim, 1)))
        buf[p:p + 4] = struct.pack(">I", pick(rng, U32_SPECIALS + [60000, 60001, 28, 27]))
        if rng.random() < 0.3:
            buf[2:4] = bytes([int(rng.choice([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07])), int(rng.integers(6))])
        return "idx_dims", gzip.compress(bytes(buf)) if rng.random() < 0.5 else bytes(buf)
    if parser == "cifar":  # overwrite one opcode's argument (lengths, memo indices, ints)
        import pickletools
        ops = [(pos, arg) for op, arg, pos in pickletools.genops(base) if op.arg is not None and pos + 1 < len(base)]
        buf = bytearray(base)
        for _ in range(int(rng.integers(1, 3))):
            pos, _ = ops[int(rng.integers(len(ops)))]
            width = int(rng.choice([1, 4, 8]))
            buf[pos + 1:pos + 1 + width] = pick(rng, U64_SPECIALS).to_bytes(8, "little")[:width]
        return "opcode_arg", bytes(buf)
    if parser in ("toml", "set"):
        text = base.decode()
        hostile = ["nan", "inf", "-inf", "1e999", str(2**64), "9" * 5000, '"x"', "true", "[1]", "{a = 1}",
                   "1979-05-27", '""', '"none"', "-1", "0", "0.0", '"' + "a" * 5000 + '"', '"\\u0000"']
        sep = "=" if parser == "set" else " = "
        lines = text.split("\n")
        j = int(rng.integers(len(lines)))
        if sep in lines[j]:
            key = lines[j].split(sep, 1)[0]
            value = str(rng.choice(hostile))
            lines[j] = key + sep + (value.strip('"') if parser == "set" else value)
        return "value", "\n".join(lines).encode()
    return None


def bomb(parser: str, rng: np.random.Generator, seeds: Seeds) -> bytes:
    if parser == "idx":
        dims = [(60000, 28, 28), (1 << 16, 1 << 16), (10000,), (2**32 - 1, 2**32 - 1, 1)][int(rng.integers(4))]
        head = gzip.compress(struct.pack(f">HBB{len(dims)}I", 0, 0x08, len(dims), *dims))
        return head + gz_zeros(int(rng.choice([1, 64, 320])))
    if parser == "cifar":
        k = int(rng.choice([10, 100, 1000]))
        inner = list(range(k))
        mid = [inner] * k
        choice = int(rng.integers(3))
        if choice == 0:
            return pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [mid] * k}, protocol=2)
        if choice == 1:
            return b"\x80\x02cbuiltins\nbytes\nJ\x00\x00\x00\x40\x85R."
        return pickle.dumps({b"data": [mid] * k, b"labels": [0]}, protocol=4)
    if parser == "fcn":
        import hashlib
        coder = seeds.env["coders"]["vector"]
        shape, lat = pick(rng, [((2**31, 4), (2**31, 2)), ((2**26, 4), (2**26, 2)), ((2**24, 4), (2**24, 2)),
                                ((2**20, 4), (2**20, 2)), ((2**22, 4), (2**22, 2))])  # the last two: within limits
        head = b"FCNC" + bytes([1, 1]) + coder.model.transform_fingerprint() + coder.tables.fingerprint
        head += bytes([2]) + struct.pack("<2I", *shape) + bytes([2]) + struct.pack("<2I", *lat)
        body = head + struct.pack("<I", 8) + bytes(8)
        return body + hashlib.blake2b(body, digest_size=8).digest()
    if parser in ("codec", "checkpoint"):
        if rng.random() < 0.5:
            return struct.pack("<Q", pick(rng, [2**40, 2**62, 100 << 20])) + b"{" + b" " * 64
        entries = {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}
        head = json.dumps(entries).encode()
        return struct.pack("<Q", len(head)) + head + bytes(64)
    if parser == "toml":
        k = int(rng.integers(4))
        return [b"a = " + b"[" * 50000 + b"]" * 50000, b"rounds = " + b"9" * 100000,
                b"# " + b"x" * (1 << 20) + b"\n", ("codec_options." + ".".join(["a"] * 50000) + " = 1").encode()][k]
    return ("rounds=" + "9" * 100000).encode() if rng.random() < 0.5 else ("codec." + "x" * 100000 + "=1").encode()


# --------------------------------------------------------------------------------------------- parsers


def run_parser(parser: str, data: bytes, path: Path, seeds: Seeds, i: int):
    """Parse ``data`` (written to ``path``); return what the parser returned. Checks that an
    accepted result is well-formed (an AssertionError is a crash)."""
    path.write_bytes(data)
    if parser == "fcn":
        from fedcodec.neural.codec import read_file

        coders = seeds.env["coders"]
        match = [c for c in coders.values() if data[6:14] == c.model.transform_fingerprint()]
        coder = match[0] if match else coders["image" if i % 2 else "vector"]
        out, kind = coder.decompress(read_file(path))
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and kind in ("array", "image")
        return out
    if parser == "codec":
        from fedcodec.neural.federated import Trained

        trained = Trained.load(path)
        return trained.model(0)
    if parser == "checkpoint":
        from fedcodec.fl import checkpoint

        config, expected = seeds.env["checkpoint"]
        state = checkpoint.load(path, config, expected=expected)
        assert {k: tuple(v.shape) for k, v in state.global_params.items()} == {"w": (4, 3), "b": (3,)}
        return state
    if parser == "idx":
        from fedcodec.data.idx import read_idx

        kw = {"dtype": np.uint8, "shape": (None, 28, 28), "max_items": 60000} if i % 2 == 0 else {}
        return read_idx(path, **kw)
    if parser == "cifar":
        from fedcodec.data import cifar10

        data_, labels = cifar10._read_batch(path, None)
        assert data_.dtype == np.uint8 and labels.shape == (len(data_),)
        return data_
    if parser == "toml":
        from fedcodec.config import build_config

        return build_config(file=path)
    from fedcodec.config import parse_assignments

    return parse_assignments([data.decode("utf-8", "replace")])


def typed_errors(parser: str) -> tuple[type, ...]:
    from fedcodec.errors import CheckpointError, CodecFileError, CodecModelError, ConfigError, DatasetError

    return {"fcn": (CodecFileError, ConfigError), "codec": (CodecModelError,),
            "checkpoint": (CheckpointError, ConfigError),  # ConfigError: check_config's "different config"
            "idx": (DatasetError,), "cifar": (DatasetError,), "toml": (ConfigError,), "set": (ConfigError,)}[parser]


def reason_of(err: BaseException) -> str:
    """``Class:reason`` of a typed rejection: a PayloadError's own reason, else a label for the first
    phrase of :data:`REASONS` its message contains."""
    cls = type(err).__name__
    if getattr(err, "reason", None):
        return f"{cls}:{err.reason}"
    msg = str(err).lower()
    for phrase, label in REASONS:
        if phrase in msg:
            return f"{cls}:{label}"
    return f"{cls}:other"


# --------------------------------------------------------------------------------------------- worker


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line[:5]] = int(line.split()[1]) * 1024
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(seed: int, mem_mib: int) -> None:
    """Read "parser i" lines on stdin, answer one JSON line each on stdout."""
    limit = mem_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(1)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing a parser prints may corrupt the protocol
    with tempfile.TemporaryDirectory(prefix="fuzz-files-") as tmp:
        seeds = build_seeds(Path(tmp))
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for line in sys.stdin:
            parser, i = line.split()
            i = int(i)
            try:
                strategy, data = make_input(parser, seeds, seed, i)
            except Exception as err:  # noqa: BLE001 - a bug of this script, reported as such
                out.write(json.dumps({"outcome": "crash", "reason": f"input generator: {err!r}"[:200],
                                      "strategy": "?", "seconds": 0}) + "\n")
                out.flush()
                continue
            path = Path(tmp) / f"case-{parser}"
            can_peak = _reset_peak()
            base = _rss()[0]
            t0 = time.perf_counter()
            res = {"strategy": strategy, "size": len(data)}
            try:
                run_parser(parser, data, path, seeds, i)
                res["outcome"] = "accepted"
            except typed_errors(parser) as err:
                res["outcome"], res["reason"] = "rejected", reason_of(err)
                res["message"] = str(err)[:160]
            except BaseException as err:  # noqa: BLE001 - everything else is a crash
                res["outcome"], res["reason"] = "crash", type(err).__name__
                res["detail"] = (str(err)[:300] + "\n" + traceback.format_exc(limit=-4)[-1500:])
            res["seconds"] = time.perf_counter() - t0
            res["peak"] = max(0, _rss()[1] - base) if can_peak else -1
            out.write(json.dumps(res) + "\n")
            out.flush()


# --------------------------------------------------------------------------------------------- driver


class Worker:
    def __init__(self, seed: int, mem_mib: int):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--seed", str(seed), "--mem-mib",
                                      str(mem_mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a fuzz worker died while starting (too little --mem-mib?)")
        self.job: tuple[str, int] | None = None
        self.started = 0.0

    def send(self, parser: str, i: int) -> None:
        self.job, self.started = (parser, i), time.perf_counter()
        self.proc.stdin.write(f"{parser} {i}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Tally:
    inputs: int = 0
    accepted: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    crashes: list = field(default_factory=list)
    peak: tuple[int, str] = (0, "")
    slowest: tuple[float, str] = (0.0, "")
    examples: dict = field(default_factory=dict)  # reason -> one message
    by_strategy: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))


def campaign(parsers: list[str], inputs: int, seed: int, workers: int, mem_mib: int, case_timeout: float,
             progress: bool) -> dict[str, Tally]:
    tallies = {p: Tally() for p in parsers}
    todo = collections.deque((p, i) for p in parsers for i in range(inputs))
    pool = [Worker(seed, mem_mib) for _ in range(workers)]
    done = 0

    def record(job: tuple[str, int], res: dict) -> None:
        nonlocal done
        parser, i = job
        t = tallies[parser]
        t.inputs += 1
        where = f"input {i}, {res.get('strategy', '?')}, {res.get('size', 0):,} bytes"
        if res["outcome"] == "accepted":
            t.accepted += 1
        elif res["outcome"] == "rejected":
            t.rejected[res["reason"]] += 1
            t.examples.setdefault(res["reason"], res.get("message", ""))
        else:
            t.crashes.append((i, res.get("strategy", "?"), res["reason"], res.get("detail", "")))
        t.by_strategy[res.get("strategy", "?")][res["outcome"]] += 1
        if res.get("peak", 0) > t.peak[0]:
            t.peak = (res["peak"], where)
        if res.get("seconds", 0) > t.slowest[0]:
            t.slowest = (res["seconds"], where)
        done += 1
        if progress and done % 500 == 0:
            print(f"  ... {done}/{len(parsers) * inputs}", file=sys.stderr, flush=True)

    busy: dict[int, Worker] = {}
    while todo or busy:
        for w in pool:
            if w.job is None and todo:
                w.send(*todo.popleft())
                busy[w.proc.stdout.fileno()] = w
        ready, _, _ = select.select(list(busy), [], [], 0.5)
        for fd in ready:
            w = busy.pop(fd)
            line = w.proc.stdout.readline()
            job = w.job
            w.job = None
            if line:
                record(job, json.loads(line))
                continue
            code = w.proc.wait()
            record(job, {"outcome": "crash", "reason": f"worker died (exit {code})", "seconds": 0})
            pool[pool.index(w)] = Worker(seed, mem_mib)
        now = time.perf_counter()
        for fd, w in list(busy.items()):
            if now - w.started > case_timeout:
                busy.pop(fd)
                job = w.job
                w.kill()
                record(job, {"outcome": "crash", "reason": f"timeout > {case_timeout:g} s", "seconds": now - w.started})
                pool[pool.index(w)] = Worker(seed, mem_mib)
    for w in pool:
        w.proc.stdin.close()
        w.proc.wait()
    return tallies


def table(tallies: dict[str, Tally]) -> str:
    rows = ["| parser | inputs | accepted | rejected (typed) | crashes | max peak RSS increase | slowest case | "
            "top rejection reasons |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, t in tallies.items():
        rej = sum(t.rejected.values())
        top = ", ".join(f"{k} {v}" for k, v in t.rejected.most_common(4))
        peak = f"{t.peak[0] / 2**20:.1f} MiB" if t.peak[0] >= 0 else "n/a"
        rows.append(f"| {name} | {t.inputs:,} | {t.accepted:,} | {rej:,} | {len(t.crashes)} | {peak} | "
                    f"{t.slowest[0] * 1e3:,.0f} ms | {top} |")
    return "\n".join(rows)


def details(tallies: dict[str, Tally]) -> str:
    out = []
    for name, t in tallies.items():
        out.append(f"{name}: peak at {t.peak[1] or '-'}; slowest {t.slowest[1] or '-'}")
        strat = ", ".join(f"{s} {sum(c.values())}" for s, c in sorted(t.by_strategy.items()))
        out.append(f"  strategies: {strat}")
        out.append("  rejections: " + ", ".join(f"{k} {v}" for k, v in t.rejected.most_common()))
        for reason, _ in t.rejected.most_common():
            out.append(f"    {reason}: {t.examples.get(reason, '')!r}")
        for i, strategy, reason, detail in t.crashes[:10]:
            out.append(f"  CRASH input {i} ({strategy}): {reason}\n    " + detail.replace("\n", "\n    "))
    return "\n".join(out)


def main(args) -> int:
    """Run the campaign for ``args`` (parsed by ``benchmarks/fuzz.py``); print the tables."""
    parsers = [p for p in args.parsers.split(",") if p]
    unknown = sorted(set(parsers) - set(PARSERS))
    if unknown:
        raise SystemExit(f"unknown parser(s) {', '.join(unknown)}; choose from {', '.join(PARSERS)}")
    print(f"file-parser fuzz campaign: {args.inputs:,} inputs per parser, seed {args.seed}, parsers "
          f"{', '.join(parsers)}; {args.workers} worker(s), RLIMIT_AS {args.mem_mib} MiB, per-case cap "
          f"{args.case_timeout:g} s", flush=True)
    t0 = time.perf_counter()
    tallies = campaign(parsers, args.inputs, args.seed, args.workers, args.mem_mib, args.case_timeout, args.progress)
    print()
    print(table(tallies))
    print()
    print(details(tallies))
    crashes = sum(len(t.crashes) for t in tallies.values())
    verdict = f"FAIL: {crashes} crash(es) above" if crashes else \
        "no crashes: every input accepted or rejected with the typed error"
    print(f"\ntotal {time.perf_counter() - t0:.1f} s; {verdict}")
    return 1 if crashes else 0


if __name__ == "__main__" and "--worker" in sys.argv:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-mib", type=int, default=3072)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    worker(a.seed, a.mem_mib)
