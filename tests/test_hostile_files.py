"""Hostile input FILES: every parser of outside files is bounded and raises the project's typed error.

Parsers: ``.fcn`` learned-compression files (CodecFileError), ``codec.safetensors`` saved codecs
(CodecModelError, a ConfigError), run checkpoints (CheckpointError, a ConfigError), IDX files and
CIFAR-10 pickles (DatasetError), TOML config files and ``--set`` values (ConfigError). For each:
crafted files (truncated, wrong magic, absurd declared sizes, bombs, wrong types) raise exactly the
typed error with a message saying what is wrong; the bombs run in a subprocess under an address-space
limit (they would need many GiB if anything trusted them); and a hypothesis property over random
mutations of a valid file: the parser returns a valid object or raises the typed error, nothing else.
``benchmarks/fuzz.py --target files`` runs the longer campaign.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import pickle
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcodec.cli import main
from fedcodec.config import Config, build_config, coerce, read_toml
from fedcodec.data import cifar10, fashion_mnist, safe_pickle
from fedcodec.data.idx import read_idx, write_idx
from fedcodec.errors import (CheckpointError, CodecFileError, CodecModelError, ConfigError, DatasetError,
                             FedcodecError, PayloadError)
from fedcodec.fl import checkpoint
from fedcodec.fl.ledger import Entry, Ledger
from fedcodec.fl.simulation import RunState
from fedcodec.neural import codec as fcn
from fedcodec.neural.codec import Coder
from fedcodec.neural.federated import Trained
from fedcodec.neural.models import NTCConfig, build_ntc, ntc_shapes
from test_data import write_cifar_batch

ROOT = Path(__file__).parents[1]
VEC = NTCConfig("vector", 4, latent=2, hidden=8)
IMG = NTCConfig("image", 3, latent=8, hidden=8, downs=2)


def short_ids(cases: list[tuple]) -> list[str]:
    """Test ids that stay short (and never str() a 5000-digit integer)."""
    def one(v) -> str:
        if isinstance(v, (str, bytes)):
            return repr(v[:16])[:20]
        if isinstance(v, int) and v.bit_length() > 64:
            return f"int{v.bit_length()}b"
        return str(v)[:20] if not callable(v) else "edit"
    return [f"{i}-{one(c[0])}" for i, c in enumerate(cases)]


def props(n: int = 50) -> settings:
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def raw_safetensors(entries: dict, data: bytes = b"", metadata: dict | None = None, length: int | None = None) -> bytes:
    """A safetensors file written by hand: any header, any declared length."""
    doc = dict(entries)
    if metadata is not None:
        doc["__metadata__"] = metadata
    head = json.dumps(doc).encode()
    return struct.pack("<Q", len(head) if length is None else length) + head + data


def mutate(data: bytes, draw_ops: list[tuple[str, int, int]]) -> bytes:
    """Apply (op, position, value) edits: truncate, flip a bit, overwrite 4/8 bytes with a size-like
    value, insert or delete bytes."""
    buf = bytearray(data)
    for op, pos, value in draw_ops:
        n = len(buf)
        p = pos % (n + 1)
        if op == "truncate":
            del buf[p:]
        elif op == "flip" and n:
            buf[p % n] ^= 1 << (value % 8)
        elif op == "u32":
            buf[p:p + 4] = struct.pack("<I", value % 2**32)
        elif op == "u64":
            buf[p:p + 8] = struct.pack("<Q", value % 2**64)
        elif op == "insert":
            buf[p:p] = bytes([value % 256]) * (1 + value % 7)
        elif op == "delete":
            del buf[p:p + 1 + value % 16]
    return bytes(buf)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["truncate", "flip", "flip", "u32", "u64", "insert", "delete"]),
                               st.integers(0, 2**20), st.one_of(st.integers(0, 2**64 - 1),
                                                                st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63]))),
                     min_size=1, max_size=4)


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vec_coder() -> Coder:
    return Coder.of(build_ntc(VEC, 0))


@pytest.fixture(scope="module")
def img_coder() -> Coder:
    return Coder.of(build_ntc(IMG, 0))


def reseal(body: bytes) -> bytes:
    """``body`` (a .fcn without its checksum) with a correct checksum: a forged, not a corrupted, file."""
    return body + hashlib.blake2b(body, digest_size=8).digest()


def fcn_header(coder: Coder, shape: tuple[int, ...], lat: tuple[int, ...], stream: bytes = b"", kind: int = 1) -> bytes:
    head = fcn.MAGIC + bytes([fcn.VERSION, kind]) + coder.model.transform_fingerprint() + coder.tables.fingerprint
    head += bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)
    head += bytes([len(lat)]) + struct.pack(f"<{len(lat)}I", *lat)
    return reseal(head + struct.pack("<I", len(stream)) + stream)


def tiny_trained(clients: int = 2) -> Trained:
    model = build_ntc(VEC, 0)
    params = dict(model.named_parameters())
    shared = {k: v.detach().clone() for k, v in params.items() if not k.startswith("prior.")}
    local = [{k: v.detach().clone() + c for k, v in params.items() if k.startswith("prior.")} for c in range(clients)]
    return Trained(VEC, "federated", 30.0, shared, local, [], 123, 4)


@pytest.fixture(scope="module")
def codec_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("codec") / "codec.safetensors"
    tiny_trained().save(path)
    return path


def ckpt_state() -> RunState:
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    return RunState(2, params, Ledger([Entry(1, 0, "down", "fp32", 60), Entry(1, 0, "up", "fp32", 60)]),
                    [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.6}],
                    {0: {"ef/w": torch.zeros(4, 3)}}, {1: {"down/b": torch.ones(3)}}, {"m/w": torch.zeros(4, 3)})


CKPT_CONFIG = Config(num_clients=4, clients_per_round=2, rounds=5).to_dict()


@pytest.fixture(scope="module")
def ckpt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors"
    checkpoint.save(path, CKPT_CONFIG, ckpt_state())
    return path


def ckpt_raw(path: Path) -> tuple[dict, bytes]:
    """(header as a dict, data section) of a checkpoint file, to forge variants of it."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def load_ckpt(path: Path):
    expected = {k: v for k, v in ckpt_state().global_params.items()}
    return checkpoint.load(path, CKPT_CONFIG, expected=expected)


# ------------------------------------------------------------------------------------- the hierarchy


def test_typed_errors_keep_their_callers_working():
    assert issubclass(CodecFileError, PayloadError) and issubclass(CodecFileError, ValueError)
    assert issubclass(CodecModelError, ConfigError) and issubclass(CheckpointError, ConfigError)
    assert all(issubclass(e, FedcodecError) for e in (CodecFileError, CodecModelError, CheckpointError, DatasetError))
    assert fcn.CodecFileError is CodecFileError  # the old import path still works


# ------------------------------------------------------------------------------------- .fcn files


def test_fcn_valid_round_trip(vec_coder, img_coder):
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    out, kind = vec_coder.decompress(vec_coder.compress(x))
    assert kind == "array" and out.shape == (5, 4)
    img = np.random.default_rng(1).random((3, 9, 7), dtype=np.float32)
    out, kind = img_coder.decompress(img_coder.compress(img, "image"))
    assert kind == "image" and out.shape == (3, 9, 7)


def test_fcn_large_batches_decode_in_chunks(vec_coder, img_coder, monkeypatch):
    vectors = np.random.default_rng(2).random((10, 4), dtype=np.float32)
    images = np.random.default_rng(3).random((5, 3, 8, 8), dtype=np.float32)
    whole = [c.decompress(c.compress(x))[0] for c, x in ((vec_coder, vectors), (img_coder, images))]
    # a budget of 3 rows / 2 images per chunk: the same values, decoded in 4 and 3 chunks
    monkeypatch.setattr(fcn, "MAX_DECODE_BYTES", 3 * vec_coder.decode_bytes((10, 2)))
    np.testing.assert_allclose(vec_coder.decompress(vec_coder.compress(vectors))[0], whole[0], rtol=0, atol=1e-6)
    monkeypatch.setattr(fcn, "MAX_DECODE_BYTES", 2 * img_coder.decode_bytes((5, 8, 2, 2)))
    np.testing.assert_allclose(img_coder.decompress(img_coder.compress(images))[0], whole[1], rtol=0, atol=1e-6)


FCN_SIZES = [
    ((2**31, 4), (2**31, 2), "size", "more than the 67,108,864 one .fcn file may hold"),
    ((2**20, 64, 4), (2**26, 2), "size", "more than the 67,108,864"),
    ((0, 4), (0, 2), "shape", "every dimension must be >= 1"),
    ((5, 4), (6, 2), "shape", "does not fit data shape"),
]


@pytest.mark.parametrize("shape, lat, reason, fragment", FCN_SIZES, ids=short_ids(FCN_SIZES))
def test_fcn_declared_sizes_are_checked_before_decoding(vec_coder, shape, lat, reason, fragment):
    with pytest.raises(CodecFileError, match=fragment) as err:
        vec_coder.decompress(fcn_header(vec_coder, shape, lat, b"\x00" * 8))
    assert err.value.reason == reason


def test_fcn_image_activation_memory_is_bounded(img_coder):
    # 48 M values (under the element limit) whose synthesis would need ~2 GiB of activations
    blob = fcn_header(img_coder, (3, 4000, 4000), (1, 8, 1000, 1000), b"\x00" * 8, kind=0)
    with pytest.raises(CodecFileError, match="MiB of activations, more than the 1,024 MiB allowed"):
        img_coder.decompress(blob)
    with pytest.raises(CodecFileError, match="an image is \\(C, H, W\\)"):
        img_coder.decompress(fcn_header(img_coder, (1, 3, 8, 8), (1, 8, 2, 2), b"\x00" * 8, kind=0))


def test_fcn_stream_length_is_bounded_by_the_latents(vec_coder):
    blob = fcn_header(vec_coder, (1, 4), (1, 2), b"\x00" * 4096)
    with pytest.raises(CodecFileError, match="stream is longer than 2 latent values can need"):
        vec_coder.decompress(blob)
    # 8 bytes cannot hold 2 M values under this entropy model: refused before decoding them
    blob = fcn_header(vec_coder, (2**20, 4), (2**20, 2), b"\x00" * 8)
    t0 = time.perf_counter()
    with pytest.raises(CodecFileError, match="8-byte stream is too short for 2,097,152 latent values"):
        vec_coder.decompress(blob)
    assert time.perf_counter() - t0 < 1


FCN_GARBAGE = [
    (b"", "not a fedcodec neural-compression file"),
    (b"FCNX" + bytes(60), "not a fedcodec neural-compression file"),
    (b"FCNC" + bytes(60), "checksum mismatch"),
]


@pytest.mark.parametrize("blob, fragment", FCN_GARBAGE, ids=short_ids(FCN_GARBAGE))
def test_fcn_garbage(vec_coder, blob, fragment):
    with pytest.raises(CodecFileError, match=fragment):
        vec_coder.decompress(blob)


def test_fcn_header_shape_fields_are_bounded(vec_coder):
    good = vec_coder.compress(np.zeros((3, 4), np.float32))
    body = bytearray(good[:-8])
    body[22] = 200  # ndim of the data shape
    with pytest.raises(CodecFileError, match="malformed shape in header"):
        vec_coder.decompress(reseal(bytes(body)))
    with pytest.raises(CodecFileError, match="header ends early|malformed shape"):
        vec_coder.decompress(reseal(bytes(body[:30])))


def test_fcn_file_size_is_checked_before_reading(tmp_path):
    big = tmp_path / "big.fcn"
    with big.open("wb") as f:  # sparse: no disk space used
        f.truncate(fcn.MAX_FILE_BYTES + 1)
    with pytest.raises(CodecFileError, match="larger than any .fcn file"):
        fcn.read_file(big)
    with pytest.raises(ConfigError, match="does not exist"):
        fcn.read_file(tmp_path / "missing.fcn")


def test_fcn_cli_decompress_reports_the_typed_error(tmp_path, codec_file, capsys):
    coder = Coder.of(Trained.load(codec_file).model(0))
    (tmp_path / "bomb.fcn").write_bytes(fcn_header(coder, (2**31, 4), (2**31, 2), b"\x00" * 8))
    assert main(["neural", "decompress", str(tmp_path / "bomb.fcn"), "-o", str(tmp_path / "x.npy"),
                 "--codec", str(codec_file)]) == 2
    assert "rejected payload (size)" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_neural_compress_npy_input_is_checked_before_numpy_allocates(tmp_path, codec_file, capsys):
    from numpy.lib import format as npy

    head = io.BytesIO()
    npy.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    (tmp_path / "huge.npy").write_bytes(head.getvalue() + bytes(64))  # 3.6 TiB declared, 64 bytes held
    assert main(["neural", "compress", str(tmp_path / "huge.npy"), "-o", str(tmp_path / "x.fcn"),
                 "--codec", str(codec_file)]) == 2
    assert "its header declares float32 of shape (1000000, 1000000)" in capsys.readouterr().err


@props(50)
@given(ops=MUTATIONS, recompute=st.booleans())
def test_fcn_property_mutations(vec_coder, ops, recompute):
    x = np.linspace(0, 1, 3 * 4, dtype=np.float32).reshape(3, 4)
    blob = vec_coder.compress(x)
    bad = mutate(blob, ops)
    if recompute and len(bad) > 8:
        bad = reseal(bad[:-8])
    try:
        out, kind = vec_coder.decompress(bad)
    except CodecFileError:
        return
    assert kind in ("array", "image") and isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.size <= fcn.MAX_ELEMENTS


# ------------------------------------------------------------------------------------- codec.safetensors


@pytest.mark.parametrize("cfg", [VEC, NTCConfig("vector", 16, latent=4, hidden=64), IMG,
                                 NTCConfig("image", 1, latent=16, hidden=32, downs=1),
                                 NTCConfig("image", 3, latent=48, hidden=12, downs=3)], ids=str)
def test_declared_architecture_shapes_match_the_model(cfg):
    # Trained.load checks a file against ntc_shapes (computed, nothing allocated): it must be NTC's
    assert ntc_shapes(cfg) == {n: tuple(p.shape) for n, p in build_ntc(cfg, 0).named_parameters()}


def test_codec_safetensors_valid_round_trip(codec_file):
    back = Trained.load(codec_file)
    assert (back.mode, back.lmbda, len(back.local), back.uplink_bytes) == ("federated", 30.0, 2, 123)
    ref = tiny_trained()
    assert all(torch.equal(back.shared[k], ref.shared[k]) for k in ref.shared)
    assert all(torch.equal(back.local[1][k], ref.local[1][k]) for k in ref.local[1])
    back.model(1)


def _codec_variant(codec_file: Path, tmp_path: Path, edit) -> Path:
    doc, data = ckpt_raw(codec_file)
    meta = doc.pop("__metadata__")
    info = json.loads(meta["info"])
    doc, info, data = edit(doc, info, data)
    meta["info"] = json.dumps(info) if not isinstance(info, str) else info
    path = tmp_path / "v.safetensors"
    path.write_bytes(raw_safetensors(doc, data, meta))
    return path


def _with(doc, name, **fields):
    """``doc`` with header entry ``name``'s ``fields`` (dtype, shape, ...) replaced."""
    doc[name] = dict(doc[name]) | fields
    return doc


def _retype(doc, name, dtype):
    return _with(doc, name, dtype=dtype)


CODEC_DAMAGE = [
    (lambda d, i, b: (d, {**i, "clients": 10**12}, b), "declares 1000000000000 clients"),
    (lambda d, i, b: (d, {**i, "lmbda": "x"}, b), "its info 'lmbda' is a JSON str"),
    (lambda d, i, b: (d, {**i, "lmbda": float("nan")}, b), "not a finite positive number"),
    (lambda d, i, b: (d, {**i, "mode": "evil"}, b), "unknown training mode"),
    (lambda d, i, b: (d, {**i, "model": {**i["model"], "hidden": 10**9}}, b), "hidden must be an integer in 1..4096"),
    (lambda d, i, b: (d, {**i, "model": {"kind": "image", "dim": 4096, "latent": 1024, "hidden": 4096, "downs": 8}},
                      b), "more than the 67,108,864 allowed"),
    (lambda d, i, b: (d, {**i, "model": {**i["model"], "hidden": 9}}, b), "has shape"),
    (lambda d, i, b: (d, {**i, "clients": 3}, b), "missing: client/2/"),
    (lambda d, i, b: (d, "[" * 100000, b), "nests JSON too deeply|not JSON"),
    (lambda d, i, b: (_retype(d, "g_a.0.bias", "F64"), i, b), "dtype 'F64'"),
    (lambda d, i, b: (d, i, b[:-4]), "truncated"),
    (lambda d, i, b: (d, i, b + b"\x00" * 4), "trailing bytes"),
]


@pytest.mark.parametrize("edit, fragment", CODEC_DAMAGE, ids=short_ids(CODEC_DAMAGE))
def test_codec_safetensors_damage_is_named(codec_file, tmp_path, edit, fragment):
    path = _codec_variant(codec_file, tmp_path, edit)
    with pytest.raises(CodecModelError, match=fragment):
        Trained.load(path)


def test_codec_safetensors_header_length_is_checked_first(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CodecModelError, match="declares 4,611,686,018,427,387,904 bytes of JSON, more than the "
                                              "8,388,608 allowed"):
        Trained.load(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CodecModelError, match="truncated"):
        Trained.load(path)
    path.write_bytes(b"\x01")
    with pytest.raises(CodecModelError, match="too short"):
        Trained.load(path)
    with pytest.raises(CodecModelError, match="does not exist"):
        Trained.load(tmp_path / "nope.safetensors")


@props(40)
@given(ops=MUTATIONS)
def test_codec_safetensors_property_mutations(codec_file, tmp_path_factory, ops):
    path = tmp_path_factory.getbasetemp() / "codec-mut.safetensors"
    path.write_bytes(mutate(codec_file.read_bytes(), ops))
    try:
        trained = Trained.load(path)
    except CodecModelError:
        return
    trained.model(0)  # accepted: a usable codec


# ------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_valid_round_trip(ckpt_file):
    back = load_ckpt(ckpt_file)
    ref = ckpt_state()
    assert back.round == 2 and back.records == ref.records and back.ledger.entries == ref.ledger.entries
    assert torch.equal(back.global_params["w"], ref.global_params["w"])
    assert set(back.client_states) == {0} and set(back.server_states) == {1} and set(back.optimizer_state) == {"m/w"}
    assert checkpoint.load(ckpt_file, CKPT_CONFIG).round == 2  # without a template: the generic checks


def _ckpt_variant(ckpt_file: Path, tmp_path: Path, edit) -> Path:
    doc, data = ckpt_raw(ckpt_file)
    meta = doc.pop("__metadata__")
    doc, meta, data = edit(doc, meta, data)
    path = tmp_path / "v.safetensors"
    path.write_bytes(raw_safetensors(doc, data, meta))
    return path


def _rename(doc, old, new):
    doc[new] = doc.pop(old)
    return doc


def _reshape(doc, name, shape):
    return _with(doc, name, shape=shape)


CKPT_DAMAGE = [
    (lambda d, m, b: (d, {**m, "round": "-1"}, b), "its round is not a decimal integer >= 0"),
    (lambda d, m, b: (d, {**m, "round": "9" * 5000}, b), "its round is not a decimal integer >= 0"),
    (lambda d, m, b: (d, {**m, "records": '{"a": 1}'}, b), "'records' metadata is a JSON dict, expected a list"),
    (lambda d, m, b: (d, {**m, "records": "[1, 2]"}, b), "records are not all JSON objects"),
    (lambda d, m, b: (d, {**m, "ledger": '[[1, 0, "sideways", "fp32", 5]]'}, b), "its ledger has a row"),
    (lambda d, m, b: (d, {**m, "ledger": '[[1, 0, "up", "fp32", -5]]'}, b), "its ledger has a row"),
    (lambda d, m, b: (d, {**m, "ledger": '[[true, 0, "up", "fp32", 5]]'}, b), "its ledger has a row"),
    (lambda d, m, b: (d, {**m, "ledger": "[" * 100000}, b), "'ledger' metadata nests JSON too deeply"),
    (lambda d, m, b: (d, {**m, "config": "not json"}, b), "'config' metadata is not valid JSON"),
    (lambda d, m, b: (d, {**m, "config": '{"seed": [[1]]}'}, b), "neither scalars nor tables"),
    (lambda d, m, b: (d, {k: v for k, v in m.items() if k != "ledger"}, b), "no 'ledger' entry"),
    (lambda d, m, b: (_rename(d, "client/0/ef/w", "client/x/ef/w"), m, b), "is neither a model tensor"),
    (lambda d, m, b: (_rename(d, "client/0/ef/w", "client/99/ef/w"), m, b), "belongs to client 99, but the run has 4"),
    (lambda d, m, b: (_rename(d, "client/0/ef/w", "weird/0/ef/w"), m, b), "is neither a model tensor"),
    (lambda d, m, b: (_rename(d, "w", "v"), m, b), "missing: w; unexpected: v"),
    (lambda d, m, b: (_reshape(_retype(d, "w", "F16"), "w", [4, 6]), m, b),
     "model tensor 'w' is F16 of shape \\(4, 6\\), this run's model has F32 of shape \\(4, 3\\)"),
    (lambda d, m, b: (_reshape(d, "w", [3, 4]), m, b), "model tensor 'w' is F32 of shape \\(3, 4\\)"),
    (lambda d, m, b: (_retype(d, "b", "I32"), m, b), "model tensor 'b' is I32"),
    (lambda d, m, b: (_retype(d, "b", "U16"), m, b), "has dtype 'U16'"),
    (lambda d, m, b: (_reshape(d, "b", [1, 1, 1, 1, 1, 1, 1, 1, 3]), m, b), "malformed shape"),
    (lambda d, m, b: (_reshape(d, "b", [2**40, 2**40]), m, b), "needs"),
    (lambda d, m, b: (d, m, b[:-1]), "truncated"),
]


@pytest.mark.parametrize("edit, fragment", CKPT_DAMAGE, ids=short_ids(CKPT_DAMAGE))
def test_checkpoint_damage_is_named(ckpt_file, tmp_path, edit, fragment):
    path = _ckpt_variant(ckpt_file, tmp_path, edit)
    with pytest.raises(CheckpointError, match=fragment):
        load_ckpt(path)


def test_checkpoint_stores_are_bounded_relative_to_the_model(tmp_path):
    state = ckpt_state()
    state.client_states[2] = {"huge": torch.zeros((1 << 20) + 1)}  # the model has 15 values; floor 2**20
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, CKPT_CONFIG, state)
    with pytest.raises(CheckpointError, match="has 1,048,577 elements, more than the model's 15"):
        load_ckpt(path)
    state.client_states[2] = {f"t{i}": torch.zeros(1 << 20) for i in range(9)}
    checkpoint.save(path, CKPT_CONFIG, state)
    with pytest.raises(CheckpointError, match="the client store of client 2 holds 9,437,184 elements, more than 8"):
        load_ckpt(path)


def test_checkpoint_header_is_bounded_before_parsing(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match="bytes of JSON, more than the"):
        load_ckpt(path)
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError, match="not a fedcodec checkpoint|not a usable"):  # the old callers' class
        load_ckpt(path)
    assert checkpoint.header_limit(CKPT_CONFIG) < checkpoint.header_limit({**CKPT_CONFIG, "rounds": 10**6})
    assert checkpoint.header_limit({"rounds": 10**9}) <= 96 << 20


@props(40)
@given(ops=MUTATIONS)
def test_checkpoint_property_mutations(ckpt_file, tmp_path_factory, ops):
    path = tmp_path_factory.getbasetemp() / "ckpt-mut.safetensors"
    path.write_bytes(mutate(ckpt_file.read_bytes(), ops))
    try:
        state = load_ckpt(path)
    except ConfigError:  # CheckpointError, or check_config's "made with a different config"
        return
    assert {k: tuple(v.shape) for k, v in state.global_params.items()} == {"w": (4, 3), "b": (3,)}
    assert isinstance(state.round, int) and all(isinstance(e, Entry) for e in state.ledger.entries)


# ------------------------------------------------------------------------------------- IDX


def gz_member_of_zeros(n: int = 1 << 20) -> bytes:
    return gzip.compress(bytes(n), compresslevel=9)


def idx_bomb(path: Path, dims: tuple[int, ...], gib: int) -> Path:
    """A gzip IDX whose payload expands to ``gib`` GiB of zeros (concatenated gzip members: ~1 KB per MiB)."""
    head = gzip.compress(struct.pack(f">HBB{len(dims)}I", 0, 0x08, len(dims), *dims))
    path.write_bytes(head + gz_member_of_zeros() * (gib << 10))
    return path


def test_idx_declared_shape_is_checked_before_reading(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, np.zeros((3, 28, 27), np.uint8))
    with pytest.raises(DatasetError, match=r"expected uint8 data of shape \(N, 28, 28\), the IDX header declares "
                                           r"uint8 of shape \(3, 28, 27\)"):
        read_idx(path, dtype=np.uint8, shape=(None, 28, 28))
    path.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 0x08, 3, 70000, 28, 28)))
    with pytest.raises(DatasetError, match="declares 70,000 items, at most 60,000 expected"):
        read_idx(path, dtype=np.uint8, shape=(None, 28, 28), max_items=60000)


def test_idx_gzip_bomb_generic_read_is_capped(tmp_path):
    path = idx_bomb(tmp_path / "bomb.gz", (1 << 30,), 0)  # declares 1 GiB, holds nothing
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path)
    path.write_bytes(gzip.compress(struct.pack(">HBB1I", 0, 0x08, 1, 1 << 30)) + gz_member_of_zeros() * 300)
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match="more than the 268,435,456 bytes an IDX file may hold"):
        read_idx(path)
    assert time.perf_counter() - t0 < 10


def test_fashion_mnist_gzip_bomb(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    for name, dims in zip(fashion_mnist.FILES, [(50, 28, 28), (50,), (20, 28, 28), (20,)]):
        write_idx(root / name, np.zeros(dims, np.uint8))
    idx_bomb(root / fashion_mnist.FILES[0], (60000, 28, 28), 1)  # 47 MB declared, 1 GiB inside
    with pytest.raises(DatasetError, match="more data follows"):
        fashion_mnist.load_fashion_mnist(root, allow_subset=True)


@props(50)
@given(ops=MUTATIONS, gz=st.booleans())
def test_idx_property_mutations(tmp_path_factory, ops, gz):
    path = tmp_path_factory.getbasetemp() / ("idx-mut" + (".gz" if gz else ""))
    write_idx(path, np.arange(6 * 28 * 28, dtype=np.uint8).reshape(6, 28, 28))
    path.write_bytes(mutate(path.read_bytes(), ops))
    for kwargs in ({}, {"dtype": np.uint8, "shape": (None, 28, 28), "max_items": 60000}):
        try:
            out = read_idx(path, **kwargs)
        except DatasetError:
            continue
        assert isinstance(out, np.ndarray) and out.nbytes <= 256 << 20


# ------------------------------------------------------------------------------------- CIFAR-10 pickles


def billion_laughs() -> bytes:
    """A ~7 KB pickle whose labels are 1000 references to a list of 1000 references to a list of
    1000 ints: 10**9 labels (8 GB as an int64 array) if anything expanded them."""
    inner = list(range(1000))
    mid = [inner] * 1000
    return pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [mid] * 1000}, protocol=2)


def reduce_pickle(module: str, name: str, args: bytes) -> bytes:
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + args + b"R."


PICKLES = [
    (billion_laughs(), "'labels' holds something other than integers"),
    (reduce_pickle("builtins", "bytes", b"J\x00\x00\x00\x40\x85"), r"bytes\(...\) is only accepted without arguments"),
    (reduce_pickle("numpy", "ndarray", b"J\x00\x00\x00\x40\x85"), "numpy.ndarray cannot be called"),
    (reduce_pickle("builtins", "eval", b"X\x04\x00\x00\x001+1 \x85"), "refusing to load global builtins.eval"),
    (reduce_pickle("posix", "system", b"X\x02\x00\x00\x00ls\x85"), "refusing to load global posix.system"),
    (b"\x80\x02c\x01os\nsystem\n.", "refusing to load global '\\\\x01os'.system"),  # named, escaped
    (b"\x80\x02}q\x01(U\x04dataq\x02", "the pickle ends early"),
    (b"\x80\x02\x8b\x00\x00\x00\x40" + b"\x00" * 100 + b".", "an integer of 1,073,741,824 bytes"),
    (b"\x80\x02}(" + b"\x85" * 3 + b"u.", "needs a value the stack does not hold"),
    (b"\x80\x02}(K\x01\x85K\x02u.", "a dict key is a tuple"),
    (b"\x80\x02]h\x07.", "memo entry 7 is used before it is defined"),
    (b"\x80\x02S'x'\n.", "is not accepted in a data file"),
    (b"\x80\x02K\x01.", "expected a dict, got int"),
]


@pytest.mark.parametrize("blob, fragment", PICKLES, ids=short_ids(PICKLES))
def test_cifar_hostile_pickles(tmp_path, blob, fragment):
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    with pytest.raises(DatasetError, match=fragment):
        cifar10._read_batch(path, None)


def _array_pickle(shape: tuple[int, ...], raw: bytes, dtype: str = "u1") -> bytes:
    """numpy's own protocol-2 array pattern (_reconstruct + BUILD) with any shape and data."""
    def tup(items: list[bytes]) -> bytes:
        return b"(" + b"".join(items) + b"t"
    dims = tup([b"J" + struct.pack("<i", d) if d < 2**31 else b"\x8a\x08" + struct.pack("<q", d) for d in shape])
    dt = b"cnumpy\ndtype\nX" + struct.pack("<I", len(dtype)) + dtype.encode() + b"K\x00K\x01\x87R" + \
         tup([b"K\x03", b"X\x01\x00\x00\x00|", b"N", b"N", b"N", b"J" + b"\xff" * 4, b"J" + b"\xff" * 4,
              b"K\x00"]) + b"b"
    arr = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R" + \
        tup([b"K\x01", dims, dt, b"\x89", b"B" + struct.pack("<I", len(raw)) + raw]) + b"b"
    return b"\x80\x02}(X\x04\x00\x00\x00data" + arr + b"X\x06\x00\x00\x00labels]K\x00au."


def test_cifar_array_declarations_are_checked_against_their_bytes(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(_array_pickle((1, 3072), bytes(3072)))
    data, labels = cifar10._read_batch(path, None)  # the pattern itself is what numpy writes: accepted
    assert data.shape == (1, 3072) and data.flags.writeable and labels.tolist() == [0]
    path.write_bytes(_array_pickle((10**6, 10**6), bytes(16)))
    with pytest.raises(DatasetError, match="has 1,000,000,000,000 elements, more than"):
        cifar10._read_batch(path, None)
    path.write_bytes(_array_pickle((4, 8), bytes(16)))
    with pytest.raises(DatasetError, match="needs 32 bytes, the file gives 16"):
        cifar10._read_batch(path, None)
    path.write_bytes(_array_pickle((2,), bytes(16), "O"))
    with pytest.raises(DatasetError, match="array dtype 'O'"):
        cifar10._read_batch(path, None)


def test_cifar_file_size_and_opcode_count_are_bounded(tmp_path):
    path = tmp_path / "data_batch_1"
    with path.open("wb") as f:
        f.truncate(cifar10.MAX_BATCH_BYTES + 1)
    with pytest.raises(DatasetError, match="larger than a CIFAR batch can be"):
        cifar10._read_batch(path, None)
    with pytest.raises(safe_pickle.PickleRejected, match="more than 1,000 opcodes"):
        safe_pickle.loads(b"\x80\x02" + b"N0" * 1000 + b"N.", max_ops=1000)


def test_cifar_valid_pickles_of_every_protocol_load(tmp_path):
    batch = {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251, b"labels": [3, 9]}
    for proto in (2, 3, 4, 5):
        path = tmp_path / f"p{proto}"
        path.write_bytes(pickle.dumps(batch, protocol=proto))
        data, labels = cifar10._read_batch(path, 2)
        assert np.array_equal(data, batch[b"data"]) and labels.tolist() == [3, 9]


@props(50)
@given(ops=MUTATIONS)
def test_cifar_property_mutations(tmp_path_factory, ops):
    base = tmp_path_factory.getbasetemp()
    valid = base / "cifar-valid"
    if not valid.exists():
        write_cifar_batch(valid, 3, 0, py2=True)
    path = base / "cifar-mut"
    path.write_bytes(mutate(valid.read_bytes(), ops))
    try:
        data, labels = cifar10._read_batch(path, None)
    except DatasetError:
        return
    assert data.dtype == np.uint8 and data.shape[1:] == (3072,) and labels.shape == (len(data),)


# ------------------------------------------------------------------------------------- TOML and --set


TOML_CASES = [
    ("rounds = " + "9" * 5000, "holds a number too long to read"),
    ("rounds = " + str(2**64), "rounds expects an integer >= 1, got 18446744073709551616 \\(outside the 64-bit"),
    ("a = " + "[" * 5000 + "]" * 5000, "nests arrays or tables too deeply"),
    ("a = " + "{b = " * 3000 + "1" + "}" * 3000, "nests arrays or tables too deeply"),
    ("rounds = \"3\"", "rounds expects an integer >= 1, got '3' \\(a string; in TOML write numbers"),
    ("lr = true", "lr expects a number > 0 or none, got true"),
    ("lr = nan", "lr expects a number > 0 or none, got nan"),
    ("lr = inf", "lr expects a number > 0 or none, got inf"),
    ("lr = " + str(10**400), "lr expects a number > 0 or none, got an integer of 1329 bits"),
    ("codec_options = {alpha = nan}", "codec_options.alpha expects a finite number, got nan"),
    ("codec_options = {alpha = " + str(2**70) + "}", "codec_options.alpha expects a 64-bit integer"),
    ("codec_options = {alpha = [1]}", "codec_options.alpha expects a string, number or boolean, got an array"),
    ("out_dir = \"" + "a" * 5000 + "\"", "at most 4096 characters, no NUL"),
    ("seed = 1979-05-27", "seed expects an integer, got a date"),
    ("[" + ".".join(["codec_options"] + ["a"] * 20000) + "]", "codec_options.a expects a string, number or boolean"),
    ("rounds = 3\nrounds = 4", "is not valid TOML"),
    # the TOML parser is quadratic in a dotted key's parts: refused before parsing (50,000 parts: ~100 s)
    ("codec_options." + ".".join(["a"] * 50000) + " = 1", "dotted key codec_options.a.a.a.a.a.a.a.a.a.a.a.a.a... has "
                                                          "50,001 parts \\(too many to parse"),
]


@pytest.mark.parametrize("text, fragment", TOML_CASES, ids=short_ids(TOML_CASES))
def test_toml_hostile_values(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        build_config(file=path)


@pytest.mark.parametrize("text", ["rounds = " + "9" * 200_000, "a." * 400_000 + "b = 1", '"' * 900_000,
                                  "x = [" + "1.5," * 200_000 + "]"], ids=["digits", "dots", "quotes", "floats"])
def test_toml_pre_scan_is_linear(tmp_path, text):
    # the dotted-key scan runs before parsing: it must not backtrack (a 200,000-digit number once took minutes)
    path = tmp_path / "c.toml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError):
        build_config(file=path)
    assert time.perf_counter() - t0 < 8


def test_toml_file_bounds(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(ConfigError, match="is larger than 1048576 bytes"):
        read_toml(path)
    path.write_bytes(b"seed = \"\xff\"")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_toml(path)
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        read_toml(tmp_path)


SET_CASES = [
    ("rounds", "9" * 5000, "rounds expects an integer >= 1"),
    ("seed", 10**5000, "got an integer of 16610 bits \\(outside the 64-bit integer range\\)"),
    ("lr", "1e999", "lr expects a number > 0 or none, got inf"),
    ("lr", 10**400, "got an integer of 1329 bits"),
    ("out_dir", "a\0b", "no NUL"),
    ("codec_options", "alpha=nan", "codec_options.alpha expects a finite number"),
    ("codec_options", "alpha=" + "9" * 4400, "codec_options.alpha expects a string of at most 4096"),
    ("codec_options", {"alpha": {"x": 1}}, "codec_options.alpha expects a string, number or boolean, got a table"),
    ("x" * 100000, "1", "unknown config key 'xxxx"),
]


@pytest.mark.parametrize("key, value, fragment", SET_CASES, ids=short_ids(SET_CASES))
def test_set_values(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        coerce(key, value)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2**62, max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                           max_size=3), max_leaves=8)


@props(60)
@given(key=st.one_of(st.sampled_from(sorted(Config.__dataclass_fields__)), st.text(max_size=20)),
       value=VALUES, text=st.booleans())
def test_coerce_property(key, value, text):
    try:
        name, parsed = coerce(key, value, text=text)
    except ConfigError:
        return
    assert name in Config.__dataclass_fields__
    if isinstance(parsed, float):
        assert math.isfinite(parsed)
    if isinstance(parsed, int):
        assert abs(parsed) < 2**63


VALID_TOML = 'rounds = 7\nlr = 0.5\nmethod = "fedmrn-binary"\n[codec_options]\nnoise = "gaussian"\n'


@props(50)
@given(ops=MUTATIONS)
def test_toml_property_mutations(tmp_path_factory, ops):
    path = tmp_path_factory.getbasetemp() / "mut.toml"
    path.write_bytes(mutate(VALID_TOML.encode(), ops))
    try:
        cfg = build_config(file=path)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


# ------------------------------------------------------------------------------------- memory cap

#: address space for the subprocess: ``import torch, fedcodec`` maps ~0.65 GiB here; every bomb below
#: would need at least 4 GiB if its declared sizes were trusted
ADDRESS_SPACE = 2 << 30

BOMBS = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    sys.path[:0] = [{root!r}]
    import json
    import numpy as np, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from fedcodec.data import cifar10, fashion_mnist
    from fedcodec.data.idx import read_idx
    from fedcodec.fl import checkpoint
    from fedcodec.neural.codec import Coder, read_file
    from fedcodec.neural.federated import Trained
    d = Path({tmp!r})
    cases = {{
        "idx-gzip": lambda: read_idx(d / "bomb.gz", dtype=np.uint8, shape=(None, 28, 28), max_items=60000),
        "idx-gzip-generic": lambda: read_idx(d / "bomb2.gz"),
        "pickle-laughs": lambda: cifar10._read_batch(d / "laughs", None),
        "fcn-shape": lambda: Coder.of(Trained.load(d / "codec.safetensors").model(0)).decompress(
            read_file(d / "bomb.fcn")),
        "codec-header": lambda: Trained.load(d / "huge.safetensors"),
        "checkpoint": lambda: checkpoint.load(d / "ckpt.safetensors", json.loads({config!r})),
    }}
    for name, run in cases.items():
        t0 = time.perf_counter()
        try:
            run()
            outcome = "ACCEPTED"
        except MemoryError:
            outcome = "MemoryError"
        except Exception as err:
            outcome = type(err).__name__
        print(name, outcome, round(time.perf_counter() - t0, 2), flush=True)
""")


def test_bombs_under_an_address_space_limit(tmp_path, codec_file):
    idx_bomb(tmp_path / "bomb.gz", (60000, 28, 28), 2)
    (tmp_path / "bomb2.gz").write_bytes(gzip.compress(struct.pack(">HBB2I", 0, 0x08, 2, 1 << 16, 1 << 16))
                                        + gz_member_of_zeros() * 4096)
    (tmp_path / "laughs").write_bytes(billion_laughs())
    (tmp_path / "codec.safetensors").write_bytes(codec_file.read_bytes())
    coder = Coder.of(Trained.load(codec_file).model(0))
    (tmp_path / "bomb.fcn").write_bytes(fcn_header(coder, (2**31, 4), (2**31, 2), b"\x00" * 64))
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 100)
    # a checkpoint whose one tensor declares 2**40 float32 values: its offsets claim 4 TiB the file lacks
    meta = {"format": checkpoint.FORMAT, "config": json.dumps(CKPT_CONFIG), "round": "1", "records": "[]",
            "ledger": "[]"}
    (tmp_path / "ckpt.safetensors").write_bytes(raw_safetensors(
        {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}, b"\x00" * 64, meta))
    script = BOMBS.format(limit=ADDRESS_SPACE, root=str(ROOT), tmp=str(tmp_path), config=json.dumps(CKPT_CONFIG))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    took = time.perf_counter() - t0
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert proc.returncode == 0, proc.stderr[-3000:]
    expect = {"idx-gzip": "DatasetError", "idx-gzip-generic": "DatasetError", "pickle-laughs": "DatasetError",
              "fcn-shape": "CodecFileError", "codec-header": "CodecModelError", "checkpoint": "CheckpointError"}
    for name, cls in expect.items():
        outcome, seconds = lines[name].split()
        assert outcome == cls, (name, lines[name])
        assert float(seconds) < 10, (name, seconds)
    assert took < 100
