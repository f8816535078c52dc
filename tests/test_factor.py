"""The seeded-factor codec (issue 17, item 1): ΔW = B·A, A regenerated from the seed, B trained and sent."""

import dataclasses
import hashlib
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedcodec.codecs import ModelSpec, TensorSpec, build_codec, build_uplink, wire
from fedcodec.codecs.factor import (FactorOptions, integer_bases, reconstruct, shape2d, training_basis)
from fedcodec.errors import ConfigError, PayloadError
from helpers import ctx, random_update, tiny_spec

ENVELOPE = wire.envelope_overhead("factor")  # 28 bytes
FIELDS = 8 + 1 + 1 + 1  # seed, generator|basis, levels, dense levels


def cnn4_spec() -> ModelSpec:
    from fedcodec.models import build_model

    return ModelSpec.from_model(build_model("cnn4", (1, 28, 28), 10, seed=0))


def ones_reference(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A reference model whose running variances are 1 (BatchNorm's initial value), the rest 0."""
    return {t.name: (torch.ones if t.name.endswith("running_var") else torch.zeros)(t.shape) for t in spec.tensors}


def trained_update(uplink, c, scale=0.05, seed=0):
    """What the algorithm hands the codec after "training": B set at random, ``finish`` applied."""
    param = uplink.algorithm.parametrization(c, {})
    latent = param.init()
    g = torch.Generator().manual_seed(seed)
    for v in latent.values():
        v.data.copy_(torch.randn(v.shape, generator=g) * scale)
    return random_update(c.spec, seed=seed + 1, scale=0.01) | param.finish(latent), param, latent


# ---------------------------------------------------------------------------------------------------------
# payload lengths


def test_payload_length_formula_tiny_spec():
    spec = tiny_spec()  # conv 3 x 9 (rank 2: B 3x2), fc 5 x 3 (rank 2: B 5x2); 5 dense tensors, 17 values
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    payload = build_codec("factor", rank=2).encode(random_update(spec), c)
    assert ENVELOPE == 28
    header = FIELDS + 2 * 2 + 4 * 2  # ranks u16, scales f32
    b_bytes = math.ceil((3 * 2 + 5 * 2) * 4 / 8)  # 16 indices of 4 bits (levels 15: alphabet 16)
    dense = 4 * 5 + math.ceil(17 * 4 / 8)
    assert len(payload) == ENVELOPE + header + b_bytes + dense == 88
    # dense_levels = 0: the dense values as float32, as in every other codec
    payload = build_codec("factor", rank=2, dense_levels=0).encode(random_update(spec), c)
    assert len(payload) == ENVELOPE + header + b_bytes + 4 * 17 == 127


@pytest.mark.parametrize("rank, expected", [(8, 3053), (16, 4901), (32, 8565)])
def test_payload_length_on_cnn4_is_pinned(rank, expected):
    """Every byte of a CNN4 update (fixed width, 4-bit B, 4-bit dense deltas) against FedAvg's 1,567,386 B."""
    spec = cnn4_spec()
    kernels = [t for t in spec.tensors if t.role == "weight"]
    assert [shape2d(t) for t in kernels] == [(32, 9), (64, 288), (128, 576), (256, 1152), (10, 256)]
    b_count = sum(rows * min(rank, cols) for rows, cols in map(shape2d, kernels))  # conv1: 9 columns at most
    dense = 4 * 16 + 1920 // 2  # 16 BatchNorm tensors, 1,920 values of 4 bits
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    payload = build_codec("factor", rank=rank).encode(random_update(spec), c)
    assert len(payload) == ENVELOPE + FIELDS + 2 * 5 + 4 * 5 + b_count // 2 + dense == expected
    assert round(1_567_386 / expected) == {8: 513, 16: 320, 32: 183}[rank]


# ---------------------------------------------------------------------------------------------------------
# the bases


def test_bases_are_pinned():
    """The basis stream is FedMRN's generator 2; a change would silently break payloads."""
    kernels = [TensorSpec("a", (4, 3, 3, 3), "weight"), TensorSpec("b", (10, 4), "weight")]
    g = integer_bases(2024, kernels, [2, 3], "gaussian")
    assert [x.shape for x in g] == [(2, 27), (3, 4)]
    assert g[0][0, :6].tolist() == [-4824, 5830, 3249, -1619, 1718, 1285]
    assert g[1][0, :4].tolist() == [-4388, 2440, -494, -4314]  # the stream goes on where kernel a stopped
    # SFC64(2024)'s first raw word is 0x...bf6e: bits 0, 1, 1, 1, 0, 1 (least significant first)
    assert integer_bases(2024, kernels, [2, 3], "rademacher")[0][0, :6].tolist() == [-1, 1, 1, 1, -1, 1]
    big = [TensorSpec("c", (64, 32, 3, 3), "weight")]
    digests = {b: hashlib.sha256(integer_bases(2024, big, [32], b)[0].tobytes()).hexdigest()[:16]
               for b in ("gaussian", "rademacher")}
    assert digests == {"gaussian": "47272fc9af0b535f", "rademacher": "1c78687b4d76aa06"}  # numpy 2.4


def test_identity_where_the_rank_reaches_the_columns():
    kernels = [TensorSpec("a", (4, 2), "weight"), TensorSpec("b", (3, 5), "weight")]
    bases = integer_bases(1, kernels, FactorOptions(rank=3).ranks(kernels, 1), "gaussian")
    assert bases[0] is None and bases[1].shape == (3, 5)


def test_ranks_schedule_and_layers():
    spec = cnn4_spec()
    kernels = [t for t in spec.tensors if t.role == "weight"]
    o = FactorOptions(rank=32, schedule="5:16,11:8", layers="classifier.weight:4,0:2")
    assert o.ranks(kernels, 1) == [2, 32, 32, 32, 4]
    assert o.ranks(kernels, 5) == [2, 16, 16, 16, 4]
    assert o.ranks(kernels, 30) == [2, 8, 8, 8, 4]
    assert FactorOptions(rank=512).ranks(kernels, 1) == [9, 288, 512, 512, 256]  # capped at the columns
    for bad in ({"schedule": "5:16,3:8"}, {"schedule": "0:4"}, {"schedule": "x"}, {"layers": "a:0"},
                {"rank": 0}, {"levels": 0}, {"dense_levels": 256}, {"basis": "uniform"}):
        with pytest.raises(ConfigError):
            FactorOptions(**bad)
    with pytest.raises(ConfigError, match="no kernel"):
        FactorOptions(layers="nope.weight:3").ranks(kernels, 1)


# ---------------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("basis", ["gaussian", "rademacher"])
def test_server_reconstructs_exactly_the_trained_factor(basis):
    """B on the quantization grid (levels 8, scale 1: the rounding is exact): the server's kernel update is
    B·A in exact arithmetic rounded once to float32, and the training forward's float32 B @ A agrees."""
    spec = tiny_spec()
    uplink = build_uplink("factor", rank=2, levels=8, basis=basis)
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    param = uplink.algorithm.parametrization(c, {})
    latent = param.init()
    g = torch.Generator().manual_seed(3)
    for v in latent.values():
        q = torch.randint(0, 9, v.shape, generator=g).float()
        q.view(-1)[0] = 8  # the scale max |B| is exactly 1
        v.data.copy_((q - 4) / 4)
    update = random_update(spec) | param.finish(latent)
    decoded = uplink.codec.decode(uplink.codec.encode(update, c), c)
    kernels = [t for t in spec.tensors if t.role == "weight"]
    bases = integer_bases(c.seed, kernels, [2, 2], basis)
    for t, a in zip(kernels, bases):
        b = latent[t.name].detach().double().numpy()
        factor = 1 / math.sqrt(2) / (4096 if basis == "gaussian" else 1)
        exact = ((b @ a) * factor).astype(np.float32).reshape(t.shape)
        assert np.array_equal(decoded[t.name].numpy(), exact), t.name
        torch.testing.assert_close(decoded[t.name], update[t.name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("entropy", [False, True])
def test_round_trip_is_close_and_dense_deltas_are_small(entropy):
    spec = cnn4_spec()
    uplink = build_uplink("factor", rank=8, levels=255, dense_levels=255, entropy=entropy)
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    update, param, latent = trained_update(uplink, c)
    decoded = uplink.codec.decode(uplink.codec.encode(update, c), c)
    for t in spec.tensors:
        err = float((decoded[t.name] - update[t.name]).abs().max())
        if t.role == "weight":
            b = latent[t.name].detach()
            # each element of B moves by at most one grid step 2 max|B| / 255, times the row sums of |A|
            a = param.bases.get(t.name)
            bound = 2 * float(b.abs().max()) / 255 * (float(a.abs().sum(0).max()) if a is not None else 1.0)
            assert err <= bound * 1.001, (t.name, err, bound)
        else:
            assert err <= 2 * 0.05 / 255 * 1.001 or t.name.endswith("running_var"), (t.name, err)


def test_decoding_is_bit_identical_in_another_process():
    """The server regenerates A in another process (or machine): the decoded update has the same bits."""
    spec = ModelSpec((TensorSpec("conv", (16, 8, 3, 3), "weight"), TensorSpec("bn.weight", (16,), "param"),
                      TensorSpec("bn.running_var", (16,), "buffer"), TensorSpec("fc", (10, 40), "weight")))
    digests = []
    for basis in ("gaussian", "rademacher"):
        uplink = build_uplink("factor", rank=5, basis=basis)
        c = dataclasses.replace(ctx(spec, seed=2**63 + 5), reference=ones_reference(spec))
        update = trained_update(uplink, c)[0]
        payload = uplink.codec.encode(update, c)
        decoded = uplink.codec.decode(payload, c)
        here = hashlib.sha256(b"".join(decoded[n].numpy().tobytes() for n in spec.names)).hexdigest()
        digests.append((basis, payload.hex(), here))
    code = """
import dataclasses, hashlib, sys, torch
sys.path.insert(0, {tests!r})
from fedcodec.codecs import ModelSpec, TensorSpec, build_codec
from helpers import ctx
torch.set_num_threads(1)
spec = ModelSpec((TensorSpec("conv", (16, 8, 3, 3), "weight"), TensorSpec("bn.weight", (16,), "param"),
                  TensorSpec("bn.running_var", (16,), "buffer"), TensorSpec("fc", (10, 40), "weight")))
ref = {{t.name: (torch.ones if t.name.endswith("running_var") else torch.zeros)(t.shape) for t in spec.tensors}}
for basis, payload in {pairs!r}:
    c = dataclasses.replace(ctx(spec, seed=2**63 + 5), reference=ref, rng=None)
    out = build_codec("factor", rank=5, basis=basis).decode(bytes.fromhex(payload), c)
    print(hashlib.sha256(b"".join(out[n].numpy().tobytes() for n in spec.names)).hexdigest())
""".format(tests=str(__import__("pathlib").Path(__file__).parent), pairs=[(b, p) for b, p, _ in digests])
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert there == [h for _, _, h in digests]


def test_stochastic_rounding_of_b_is_unbiased():
    spec = ModelSpec((TensorSpec("w", (6, 20), "weight"),))
    uplink = build_uplink("factor", rank=4, levels=3, dense_levels=0)
    c = ctx(spec, seed=9)
    update, param, latent = trained_update(uplink, c, scale=1.0)
    acc = torch.zeros(6, 20, dtype=torch.float64)
    trials = 300
    for i in range(trials):
        ci = dataclasses.replace(c, rng=torch.Generator().manual_seed(100 + i))
        acc += uplink.codec.decode(uplink.codec.encode(update, ci), ci)["w"].double()
    err = (acc / trials - update["w"].double()).abs().max()
    step = 2 * float(latent["w"].detach().abs().max()) / 3 * float(param.bases["w"].abs().sum(0).max())
    assert float(err) < step * 3 / math.sqrt(trials)


def test_any_update_is_projected_onto_the_factor_space():
    """Without the side value (the codec alone, or error feedback's memory added) B is the least-squares
    factor: an update that is B0·A comes back as B0·A, an update outside the row space as its projection."""
    spec = ModelSpec((TensorSpec("w", (6, 20), "weight"),))
    uplink = build_uplink("factor", rank=4, levels=255, dense_levels=0)
    c = ctx(spec, seed=9)
    update, param, latent = trained_update(uplink, c)
    a = param.bases["w"].double()
    alone = uplink.codec.decode(uplink.codec.encode({"w": update["w"]}, c), c)["w"]
    torch.testing.assert_close(alone, update["w"], rtol=0, atol=2 * float(latent["w"].detach().abs().max()) / 255 * 6)
    extra = torch.randn(6, 20, generator=torch.Generator().manual_seed(5))  # plus a residual, side value kept
    projected = (extra.double() @ a.T @ torch.linalg.inv(a @ a.T) @ a).float()
    got = uplink.codec.decode(uplink.codec.encode(update | {"w": update["w"] + extra}, c), c)["w"]
    torch.testing.assert_close(got, update["w"] + projected, rtol=0, atol=0.05)


def test_error_feedback_and_training_gradients():
    spec = tiny_spec()
    uplink = build_uplink("factor", rank=2, ef=True)
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec), state={})
    update, param, latent = trained_update(uplink, c)
    uplink.encode(update, c)
    assert any(k.startswith("ef/") for k in c.state)
    # B starts at zero and gets the gradient G A^T (straight through the product)
    latent = param.init()
    assert all(float(v.detach().abs().sum()) == 0 for v in latent.values())
    out = param.deltas(latent, 0.5)["fc.weight"]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * g).sum().backward()
    torch.testing.assert_close(latent["fc.weight"].grad, g @ param.bases["fc.weight"].T)


def test_running_variances_are_coded_in_log_space():
    spec = ModelSpec((TensorSpec("bn.running_var", (1000,), "buffer"), TensorSpec("w", (4, 4), "weight")))
    ref = {"bn.running_var": torch.linspace(1e-4, 10.0, 1000), "w": torch.zeros(4, 4)}
    d = -ref["bn.running_var"] * torch.linspace(0.0, 0.99, 1000)  # down to 1% of the reference
    codec = build_codec("factor", dense_levels=3)  # 2 bits
    c = dataclasses.replace(ctx(spec), reference=ref)
    out = codec.decode(codec.encode({"bn.running_var": d, "w": torch.zeros(4, 4)}, c), c)["bn.running_var"]
    assert bool(((ref["bn.running_var"] + out) > 0).all())  # never a negative variance
    ratio = (ref["bn.running_var"] + out) / (ref["bn.running_var"] + d)
    assert float(ratio.log().abs().max()) <= math.log(100) * 2 / 3 * 1.001  # one grid step in log space


# ---------------------------------------------------------------------------------------------------------
# malformed payloads


def _body(codec, spec, c):
    return bytearray(wire.unpack(codec.encode(random_update(spec), c), codec.codec_id, spec.fingerprint))


@pytest.mark.parametrize("mutation", ["truncate", "extend", "flip", "zero"])
def test_malformed_payloads_raise_typed_error(mutation):
    spec = tiny_spec()
    codec = build_codec("factor", rank=2)
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    payload = bytearray(codec.encode(random_update(spec), c))
    if mutation == "truncate":
        payload = payload[:-9]
    elif mutation == "extend":
        payload += b"\x00" * 4
    elif mutation == "flip":
        payload[40] ^= 0x10
    else:
        payload = bytearray(len(payload))
    with pytest.raises(PayloadError) as info:
        codec.decode(bytes(payload), dataclasses.replace(c, client=9))
    assert info.value.client == 9 and "client 9" in str(info.value)


@pytest.mark.parametrize("entropy", [False, True])
def test_semantic_checks_behind_a_valid_checksum(entropy):
    spec = tiny_spec()
    codec = build_codec("factor", rank=2, entropy=entropy)
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    body = _body(codec, spec, c)
    cases = []
    b = bytearray(body); b[0] ^= 1; cases.append(("binding", b))               # another client-round's seed
    b = bytearray(body); b[8] = 0x10; cases.append(("version", b))             # noise generator 1
    b = bytearray(body); b[8] = 0x27; cases.append(("field", b))               # unknown basis
    b = bytearray(body); b[8] = 0x21; cases.append(("binding", b))             # rademacher, not this run's
    b = bytearray(body); b[9] = 7; cases.append(("binding", b))                # other levels
    b = bytearray(body); b[10] = 0; cases.append(("binding", b))               # float32 dense values
    b = bytearray(body); b[11:13] = struct.pack("<H", 1); cases.append(("binding", b))  # rank 1
    b = bytearray(body); b[15:19] = np.float32(-1).tobytes(); cases.append(("field", b))   # negative scale
    b = bytearray(body); b[15:19] = np.float32(np.nan).tobytes(); cases.append(("field", b))
    b = bytearray(body); b[19:23] = np.float32(np.inf).tobytes(); cases.append(("field", b))
    b = bytearray(body); del b[-1]; cases.append((None, b))
    b = bytearray(body) + b"\0"; cases.append(("size", b))
    for reason, bad in cases:
        with pytest.raises(PayloadError) as info:
            codec.decode(wire.pack(codec.codec_id, spec.fingerprint, bytes(bad)), c)
        assert reason is None or info.value.reason == reason, (reason, info.value)


def test_payload_from_another_round_of_the_schedule_is_refused():
    spec = tiny_spec()
    codec = build_codec("factor", rank=2, schedule="2:1")
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    payload = codec.encode(random_update(spec), c)
    with pytest.raises(PayloadError) as info:
        codec.decode(payload, dataclasses.replace(c, round=2))
    assert info.value.reason == "binding" and "ranks [2, 2]" in str(info.value)


def test_dense_part_padding_and_absurd_dense_scales():
    spec = tiny_spec()
    codec = build_codec("factor", rank=2)
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    body = _body(codec, spec, c)
    b = bytearray(body); b[-1] |= 0xF0  # 17 dense values of 4 bits: the last half byte is padding
    with pytest.raises(PayloadError) as info:
        codec.decode(wire.pack("factor", spec.fingerprint, bytes(b)), c)
    assert info.value.reason == "field"
    # the running variance's scale set absurdly high: exp overflows, and the decoder refuses Inf
    dense_scales = len(body) - 9 - 4 * 5
    b = bytearray(body); b[dense_scales + 16:dense_scales + 20] = np.float32(3e38).tobytes()
    with pytest.raises(PayloadError) as info:
        codec.decode(wire.pack("factor", spec.fingerprint, bytes(b)), c)
    assert info.value.reason == "nonfinite"


def test_training_basis_is_float32_of_the_exact_basis():
    a = integer_bases(5, [TensorSpec("w", (3, 10), "weight")], [4], "gaussian")[0]
    t = training_basis(a, 4, "gaussian")
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy((a / 2 / 4096).astype(np.float32)))
    q = np.array([[0, 15, 7, 8]] * 3)
    assert reconstruct(q, 1.0, 15, a, 4, "gaussian").dtype == np.float32


# ---------------------------------------------------------------------------------------------------------
# dense_levels as a stage option of every kernel codec


def test_dense_levels_stage_option_for_other_kernel_codecs():
    spec = cnn4_spec()
    c = dataclasses.replace(ctx(spec), reference=ones_reference(spec))
    update = random_update(spec)
    plain = build_codec("qsgd")
    coded = build_codec("qsgd", dense_levels=15)
    assert (plain.codec_id, coded.codec_id) == ("qsgd", "qsgd+dq15")
    assert len(plain.encode(update, c)) == 153_947  # unchanged: float32 dense values (7,680 B)
    payload = coded.encode(update, c)
    assert len(payload) == 153_947 - 7_680 + 1_024 + len("+dq15") == 147_296
    out = coded.decode(payload, c)
    for t in spec.tensors:
        if t.role != "weight" and not t.name.endswith("running_var"):
            assert float((out[t.name] - update[t.name]).abs().max()) <= 2 * float(update[t.name].abs().max()) / 15
    with pytest.raises(PayloadError) as info:  # the two ends must be built alike
        plain.decode(payload, c)
    assert info.value.reason == "codec"
    for name in ("fedmrn", "signsgd", "topk"):
        uplink = build_uplink(name, dense_levels=3, entropy=name != "topk")
        c2 = dataclasses.replace(c, state={})
        upd = update | (trained_update(uplink, c2)[0] if name == "fedmrn" else {})
        assert set(uplink.codec.decode(uplink.encode(upd, c2), c2)) == set(spec.names)
    with pytest.raises(ConfigError, match="does not apply"):
        build_codec("fp16", dense_levels=15)
    with pytest.raises(ConfigError, match="dense_levels"):
        build_codec("qsgd", dense_levels=256)
    # the factor codec's own option stays its own (its header carries it; no id suffix)
    assert build_codec("factor", dense_levels=3).codec_id == "factor"


# ---------------------------------------------------------------------------------------------------------
# learned rows (the "AE v2" decoder: derived from the run's history by both ends)


def _history(spec, scale=0.05, seed=4):
    """(initial, reference): a reference that moved from the initial model in every tensor."""
    g = torch.Generator().manual_seed(seed)
    initial = {t.name: torch.randn(t.shape, generator=g) * 0.3 for t in spec.tensors}
    initial |= {t.name: torch.ones(t.shape) for t in spec.tensors if t.name.endswith("running_var")}
    reference = {n: v + torch.randn(v.shape, generator=g) * scale for n, v in initial.items()}
    return initial, reference


def test_learned_rows_are_pinned_on_a_literal_history():
    from fedcodec.codecs.factor import learned_rows

    t = TensorSpec("w", (2, 4), "weight")
    initial = {"w": torch.zeros(2, 4)}
    reference = {"w": torch.tensor([[3.0, 0, 0, 0], [0, 0, -2.0, 0]])}
    rows, digest = learned_rows(reference, initial, [t], [3], 2)
    # right singular vectors e1 (3) and e3 (2; sign made positive), times sqrt(rank), times 2^12: rint(4096 sqrt 3)
    assert rows[0].tolist() == [[7094, 0, 0, 0], [0, 0, 7094, 0]]
    expected = hashlib.blake2b(struct.pack("<H", 2) + struct.pack("<8i", 7094, 0, 0, 0, 0, 0, 7094, 0),
                               digest_size=8).digest()
    assert digest == expected
    # at most `learned`, and never more rows than the history has rank
    assert learned_rows(reference, initial, [t], [3], 1)[0][0].tolist() == [[7094, 0, 0, 0]]
    single = {"w": torch.tensor([[1.0, 1.0, 0, 0], [2.0, 2.0, 0, 0]])}
    assert learned_rows(single, initial, [t], [3], 2)[0][0].tolist() == [[5017, 5017, 0, 0]]  # rint(4096 sqrt(3/2))
    # no history (round 1): no learned rows; the bases are the seeded ones
    none, _ = learned_rows(initial, initial, [t], [3], 2)
    assert none[0].shape == (0, 4)
    assert np.array_equal(integer_bases(9, [t], [3], "gaussian", none)[0], integer_bases(9, [t], [3], "gaussian")[0])
    # learned rows lead, the seeded stream fills the rest (its first rows)
    both = integer_bases(9, [t], [3], "gaussian", rows)[0]
    assert both.shape == (3, 4) and np.array_equal(both[:2], rows[0])
    assert np.array_equal(both[2], integer_bases(9, [t], [1], "gaussian")[0][0])


def test_learned_rows_payload_length_and_exact_reconstruction():
    from fedcodec.codecs.factor import learned_rows

    spec = tiny_spec()  # conv 3 x 9, fc 5 x 3 (rank 2 < 3 columns)
    initial, reference = _history(spec)
    uplink = build_uplink("factor", rank=2, levels=8, learned=1)
    uplink.bind_initial(initial)
    c = dataclasses.replace(ctx(spec), reference=reference)
    param = uplink.algorithm.parametrization(c, reference)
    latent = param.init()
    g = torch.Generator().manual_seed(3)
    for v in latent.values():
        q = torch.randint(0, 9, v.shape, generator=g).float()
        q.view(-1)[0] = 8
        v.data.copy_((q - 4) / 4)
    update = random_update(spec) | param.finish(latent)
    payload = uplink.codec.encode(update, c)
    # the 88 bytes of the seeded payload (test above) + kept counts (u16 per kernel) + 8-byte digest
    assert len(payload) == 88 + 2 * 2 + 8 == 100
    decoded = uplink.codec.decode(payload, c)
    kernels = [t for t in spec.tensors if t.role == "weight"]
    lead, _ = learned_rows(reference, initial, kernels, [2, 2], 1)
    assert [len(a) for a in lead] == [1, 1]
    for t, a in zip(kernels, integer_bases(c.seed, kernels, [2, 2], "gaussian", lead)):
        exact = ((latent[t.name].detach().double().numpy() @ a) / math.sqrt(2) / 4096).astype(np.float32)
        assert np.array_equal(decoded[t.name].numpy(), exact.reshape(t.shape)), t.name
        torch.testing.assert_close(decoded[t.name], update[t.name], rtol=1e-5, atol=1e-7)


def test_learned_rows_mismatches_are_refused():
    spec = tiny_spec()
    initial, reference = _history(spec)
    uplink = build_uplink("factor", rank=2, learned=1)
    c = dataclasses.replace(ctx(spec), reference=reference)
    with pytest.raises(ConfigError, match="initial model"):  # never bound: a stock Flower app
        uplink.codec.encode(random_update(spec), c)
    uplink.bind_initial(initial)
    payload = uplink.codec.encode(random_update(spec), c)
    other = {n: v.clone() for n, v in reference.items()}
    other["conv.weight"].view(-1)[0] += 0.5  # the server holds another model: other rows
    with pytest.raises(PayloadError) as err:
        uplink.codec.decode(payload, dataclasses.replace(c, reference=other))
    assert err.value.reason == "basis"
    with pytest.raises(PayloadError) as err:
        uplink.codec.decode(payload, dataclasses.replace(c, reference=None))
    assert err.value.reason == "reference"
    plain = build_uplink("factor", rank=2)  # a server without learned rows, and the reverse
    for enc, dec in ((uplink, plain), (plain, uplink)):
        with pytest.raises(PayloadError) as err:
            dec.codec.decode(enc.codec.encode(random_update(spec), c), c)
        assert err.value.reason == "binding"
    for bad in ({"learned": -1}, {"learned": 2**16}, {"learned": 4, "basis": "rademacher"}):
        with pytest.raises(ConfigError):
            build_codec("factor", **bad)


def test_learned_rows_digest_is_the_same_in_another_process():
    from fedcodec.codecs.factor import learned_rows

    spec = cnn4_spec()
    initial, reference = _history(spec, scale=0.01, seed=8)
    kernels = [t for t in spec.tensors if t.role == "weight"]
    rows, digest = learned_rows(reference, initial, kernels, [32] * len(kernels), 16)
    assert [len(a) for a in rows] == [0, 16, 16, 16, 10]  # first conv: rank 32 >= its 9 columns (identity)
    code = f"""
import sys, torch
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
torch.set_num_threads(1)
from test_factor import _history, cnn4_spec
from fedcodec.codecs.factor import learned_rows
spec = cnn4_spec()
initial, reference = _history(spec, scale=0.01, seed=8)
kernels = [t for t in spec.tensors if t.role == "weight"]
print(learned_rows(reference, initial, kernels, [32] * len(kernels), 16)[1].hex())
"""
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert there == [digest.hex()]


def test_engine_rounds_with_learned_rows():
    """Through the engine: in round 2 the bases lead with learned rows, every payload decodes
    (client and server derive the same rows) and the run is bit-identical when repeated."""
    from fedcodec.config import Config
    from fedcodec.data import make_synthetic_images
    from fedcodec.fl.simulation import run_round, setup

    def run():
        cfg = Config(method="factor-8-ec", codec_options={"learned": 4}, num_clients=4, clients_per_round=3,
                     rounds=2, local_epochs=1, batch_size=16, seed=1, init_std=0.05).validate()
        sim, state = setup(cfg, make_synthetic_images(120, 40, seed=0))
        for _ in range(cfg.rounds):
            state = run_round(sim, state)
        return sim, state

    sim, state = run()
    assert [r["accepted"] for r in state.records] == [3, 3]
    kernels = [t for t in sim.spec.tensors if t.role == "weight"]
    ranks = sim.runtime.uplink.codec.options.ranks(kernels, 2)
    lead, _ = sim.runtime.uplink.codec.learned(state.global_params, kernels, ranks)
    assert sum(len(a) for a in lead) > 0
    # the decoder never travels: per client-round one broadcast down and one factor payload up, no
    # setup message either way
    assert {(e.direction, e.codec) for e in state.ledger.entries} == {("down", "fp32"), ("up", "factor+ec")}
    assert len(state.ledger.entries) == 2 * 3 * 2
    again = run()[1]
    assert all(torch.equal(state.global_params[n], again.global_params[n]) for n in state.global_params)
