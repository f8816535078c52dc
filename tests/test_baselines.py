"""The baseline codecs: signsgd, qsgd and topk (formats, error bounds, unbiasedness, validation, vote, EF)."""

import math
import struct

import numpy as np
import pytest
import torch

from fedcodec.codecs import ModelSpec, TensorSpec, build_codec, build_uplink, wire
from fedcodec.codecs.algorithms import weighted_mean
from fedcodec.codecs.base import split_specs
from fedcodec.codecs.qsgd import grid
from fedcodec.codecs.stages import RESIDUAL
from fedcodec.codecs.topk import decode_positions, encode_positions, keep_count, top_indices
from fedcodec.errors import ConfigError, PayloadError
from fedcodec.fl.server import aggregate
from helpers import ctx, random_update, tiny_spec


def synthetic_spec() -> ModelSpec:
    """Three kernels (1414 weights in all: not a multiple of 8) and two dense tensors."""
    return ModelSpec((TensorSpec("a", (37, 11), "weight"), TensorSpec("a_bias", (37,), "param"),
                      TensorSpec("b", (1001,), "weight"), TensorSpec("c", (2, 3), "weight"),
                      TensorSpec("bn_mean", (5,), "buffer")))


def one_tensor(n: int, dense: int = 0) -> ModelSpec:
    specs = [TensorSpec("w", (n,), "weight")] + ([TensorSpec("d", (dense,), "param")] if dense else [])
    return ModelSpec(tuple(specs))


def flat(spec, update, which="compressed"):
    compressed, dense = split_specs(spec)
    return spec.flatten(update, compressed if which == "compressed" else dense)


def roundtrip(codec, spec, update, rng_seed=11):
    c = ctx(spec, rng_seed=rng_seed)
    payload = codec.encode(update, c)
    return payload, codec.decode(payload, ctx(spec, rng_seed=999))  # the decoder needs no randomness


def body_of(codec, payload, spec):
    return bytes(wire.unpack(payload, codec.codec_id, spec.fingerprint))


def assert_dense_exact(spec, update, decoded):
    for t in split_specs(spec)[1]:
        assert torch.equal(decoded[t.name], update[t.name]), t.name


def fixed_bits(values, width):
    """Reference fixed-width symbol packing (LSB first), written independently of symbols.py."""
    acc, nbits = 0, 0
    for v in values:
        acc |= int(v) << nbits
        nbits += width
    return acc.to_bytes((nbits + 7) // 8, "little")


# ---------------------------------------------------------------------------------------------------------
# signsgd


@pytest.mark.parametrize("spec_fn", [tiny_spec, synthetic_spec])
def test_signsgd_decodes_to_scale_times_sign(spec_fn):
    spec = spec_fn()
    update = random_update(spec, seed=4)
    update[spec.select(("weight",))[0].name].view(-1)[:3] = torch.tensor([0.0, -0.0, 0.0])  # zeros send +
    codec = build_codec("signsgd")
    _, dec = roundtrip(codec, spec, update)
    for t in spec.select(("weight",)):
        x = update[t.name].numpy()
        scale = np.float32(np.abs(x.astype(np.float64)).mean())
        want = np.where(x >= 0, scale, -scale).astype(np.float32)
        assert np.array_equal(dec[t.name].numpy(), want), t.name
    assert_dense_exact(spec, update, dec)


def test_signsgd_zero_tensor_decodes_to_zero():
    spec = tiny_spec()
    update = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    _, dec = roundtrip(build_codec("signsgd"), spec, update)
    assert all(not torch.count_nonzero(v) for v in dec.values())


# ---------------------------------------------------------------------------------------------------------
# qsgd


@pytest.mark.parametrize("levels", [1, 2, 4, 7, 255])
@pytest.mark.parametrize("spec_fn", [tiny_spec, synthetic_spec])
def test_qsgd_error_bound_grid_and_exact_endpoints(levels, spec_fn):
    spec = spec_fn()
    update = random_update(spec, seed=levels)
    codec = build_codec("qsgd", levels=levels)
    _, dec = roundtrip(codec, spec, update)
    points = grid(levels)
    for t in spec.select(("weight",)):
        x, d = update[t.name].numpy().ravel(), dec[t.name].numpy().ravel()
        m = np.abs(x).max()
        # every value is one of the grid points M * g[q], and one of the two neighbours of x
        assert np.isin(d, m * points).all(), t.name
        step = 2 * float(m) / levels
        assert np.all(np.abs(d.astype(np.float64) - x) <= step * (1 + 1e-6)), t.name
        lo = np.floor((x.astype(np.float64) / m + 1) * levels / 2 + 1e-9)
        below = m * (2 * lo - levels) / levels
        assert np.all((d >= below - 1e-6 * m) & (d <= below + step + 1e-6 * m)), t.name
        top = np.argmax(np.abs(x))
        assert d[top] == x[top], t.name  # the element that sets M is an endpoint, so it is exact
    assert_dense_exact(spec, update, dec)


def test_qsgd_endpoints_and_zero_tensor_are_exact():
    m = np.float32(3.0e38)  # 2M would overflow float32; the endpoints must still decode exactly
    spec = ModelSpec((TensorSpec("w", (4,), "weight"), TensorSpec("z", (3,), "weight")))
    update = {"w": torch.tensor([m, -m, 0.0, m]), "z": torch.zeros(3)}
    _, dec = roundtrip(build_codec("qsgd", levels=4), spec, update)
    assert torch.equal(dec["w"], update["w"])  # ±M and 0 (q = s/2) are grid points
    assert not torch.count_nonzero(dec["z"])
    assert grid(4).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert grid(1).tolist() == [-1.0, 1.0]


def test_qsgd_levels_1_is_stochastic_binarization():
    spec = synthetic_spec()
    update = random_update(spec, seed=3)
    _, dec = roundtrip(build_codec("qsgd", levels=1), spec, update)
    for t in spec.select(("weight",)):
        m = update[t.name].abs().max()
        assert set(dec[t.name].abs().unique().tolist()) == {float(m)}


@pytest.mark.parametrize("levels", [1, 4])
def test_qsgd_is_unbiased(levels):
    """Mean over many seeds → Δ. The per-element variance of one decode is δ²p(1-p) (δ = 2M/s, p the
    chance of rounding up); the bounds below follow from it, not from a tuned tolerance."""
    n, trials = 2000, 400
    spec = one_tensor(n)
    g = np.random.default_rng(0)
    m = float(np.float32(0.02))  # the float32 scale the codec sends
    delta = 2 * m / levels
    # every element sits in the lower half of its cell (frac < 0.45): nearest rounding would be biased
    cell = g.integers(0, levels, n)
    frac = g.uniform(0.05, 0.45, n)
    x = (-m + (cell + frac) * delta).astype(np.float32)
    x[0] = m  # sets M
    codec = build_codec("qsgd", levels=levels)
    target = torch.from_numpy(x)
    acc = np.zeros(n)
    for i in range(trials):
        c = ctx(spec, rng_seed=1000 + i)
        acc += codec.decode(codec.encode({"w": target}, c), c)["w"].numpy()
    mean = acc / trials
    xd = x.astype(np.float64)
    p = (xd + m) / delta - np.floor((xd + m) / delta + 1e-12)
    var = delta ** 2 * p * (1 - p)  # of one decode
    err = mean - xd
    # aggregate: the sum of the n independent errors is ~ N(0, Σ var / trials)
    z = err.sum() / math.sqrt(var.sum() / trials)
    assert abs(z) < 5, z
    # the errors have the variance the model predicts (a deterministic rounding would have none):
    # each squared z-score has mean 1 and variance about 2 (a mean of 400 Bernoullis is close to normal;
    # 3 leaves room for its excess kurtosis), so their average lies within 6 standard errors of 1
    random = var > 0  # x[0] = M is a grid point: always exact
    assert err[0] == 0 and random.sum() == n - 1
    ratio = float(np.mean(err[random] ** 2 / (var[random] / trials)))
    assert abs(ratio - 1) < 6 * math.sqrt(3 / n), ratio
    # every element: Bernstein's inequality with the element's own variance, union bound at 1e-6
    t = math.log(2 * n / 1e-6)
    bound = np.sqrt(2 * var * t / trials) + 2 * delta * t / (3 * trials)
    assert np.all(np.abs(err) <= bound + 1e-7 * m)


def test_qsgd_rounding_depends_on_the_rng_only():
    spec = synthetic_spec()
    update = random_update(spec, seed=5)
    codec = build_codec("qsgd")
    a = codec.encode(update, ctx(spec, rng_seed=1))
    assert a == codec.encode(update, ctx(spec, rng_seed=1))
    assert a != codec.encode(update, ctx(spec, rng_seed=2))


# ---------------------------------------------------------------------------------------------------------
# topk


def reference_topk(v: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-np.abs(v), kind="stable")[:k])


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("spec_fn", [tiny_spec, synthetic_spec])
def test_topk_keeps_exactly_the_top_k(fraction, spec_fn):
    spec = spec_fn()
    update = random_update(spec, seed=8)
    _, dec = roundtrip(build_codec("topk", fraction=fraction), spec, update)
    v, d = flat(spec, update), flat(spec, dec)
    k = keep_count(fraction, v.size)
    assert k == max(1, math.ceil(fraction * v.size - 1e-9))
    kept = reference_topk(v, k)
    assert np.array_equal(np.flatnonzero(d), kept)  # random normals: no kept value is 0
    assert np.array_equal(d[kept], v[kept])
    assert_dense_exact(spec, update, dec)


def test_topk_is_global_across_tensors_and_breaks_ties_by_index():
    spec = synthetic_spec()
    update = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    update["b"] = torch.linspace(-1, 1, 1001)  # the largest magnitudes all live in tensor "b"
    update["a"][:] = 0.5  # 407 equal magnitudes; +-: |-x| ties with |x|
    update["a"][::2] = -0.5
    v = flat(spec, update)
    n = v.size
    for k in [1, 10, 400, 700, 1000, n - 1, n]:
        assert np.array_equal(top_indices(v, k), reference_topk(v, k)), k
    codec = build_codec("topk", fraction=0.01)  # k = 15: the ends of "b" only
    _, dec = roundtrip(codec, spec, update)
    assert not torch.count_nonzero(dec["a"]) and not torch.count_nonzero(dec["c"])
    assert torch.count_nonzero(dec["b"]) == keep_count(0.01, n) == 15


def test_topk_selection_matches_stable_argsort_on_many_ties():
    g = np.random.default_rng(1)
    for trial in range(50):
        n = int(g.integers(1, 300))
        v = (g.integers(-4, 5, n) * 0.25).astype(np.float32)  # few distinct magnitudes: ties everywhere
        k = int(g.integers(0, n + 1))
        assert np.array_equal(top_indices(v, k), reference_topk(v, k)), (n, k)


def test_keep_count_uses_the_decimal_fraction():
    assert keep_count(0.07, 100) == 7  # 0.07 * 100 == 7.000000000000001 in binary floating point
    assert keep_count(0.01, 42) == 1
    assert keep_count(0.5, 3) == 2
    assert keep_count(1.0, 42) == 42
    assert keep_count(1e-9, 10) == 1
    assert keep_count(0.3, 0) == 0


def reference_positions(idx):
    """Classes and mantissa bytes of the documented gap code, in plain Python integers."""
    classes, acc, nbits, prev = [], 0, 0, -1
    for i in idx:
        g1 = int(i) - prev
        prev = int(i)
        c = g1.bit_length()
        classes.append(c)
        acc |= (g1 - (1 << (c - 1))) << nbits
        nbits += c - 1
    return classes, acc.to_bytes((nbits + 7) // 8, "little"), nbits


@pytest.mark.parametrize("case", ["first", "last", "dense", "random", "huge_gap"])
def test_position_code_matches_the_documented_format(case):
    g = np.random.default_rng(2)
    n = {"huge_gap": 2**31 + 5}.get(case, 100_000)
    idx = {"first": [0], "last": [n - 1], "dense": list(range(50)),
           "random": sorted(g.choice(n, 500, replace=False).tolist()),
           "huge_gap": [3, 2**31 + 4]}[case]
    idx = np.asarray(idx, np.int64)
    classes, raw = encode_positions(idx)
    want_classes, want_raw, _ = reference_positions(idx)
    assert classes.tolist() == want_classes and raw == want_raw
    assert np.array_equal(decode_positions(classes, np.frombuffer(raw, np.uint8), n), idx)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 1001, 20_000])
def test_topk_decodes_positions_far_apart(n):
    spec = one_tensor(n)
    x = torch.zeros(n)
    x[n - 1] = 1.0  # the only nonzero: the largest gap possible
    x[0] = -0.5 if n > 1 else 1.0
    _, dec = roundtrip(build_codec("topk", fraction=2 / n if n > 1 else 1.0), spec, {"w": x})
    assert torch.equal(dec["w"], x)


# ---------------------------------------------------------------------------------------------------------
# payload lengths (fixed-width mode)


def dense_bytes(spec):
    return 4 * spec.numel(("param", "buffer"))


def signsgd_length(spec):
    n, tensors = spec.numel(("weight",)), len(spec.select(("weight",)))
    return wire.envelope_overhead("signsgd") + 4 * tensors + math.ceil(n / 8) + dense_bytes(spec)


def qsgd_length(spec, levels):
    n, tensors = spec.numel(("weight",)), len(spec.select(("weight",)))
    w = math.ceil(math.log2(levels + 1))
    return wire.envelope_overhead("qsgd") + 1 + 4 * tensors + math.ceil(n * w / 8) + dense_bytes(spec)


def topk_length(spec, kept):
    k = len(kept)
    _, _, nbits = reference_positions(kept)
    return wire.envelope_overhead("topk") + 4 + math.ceil(6 * k / 8) + math.ceil(nbits / 8) + 4 * k + dense_bytes(spec)


SPECS = {"tiny": tiny_spec, "synthetic": synthetic_spec, "n1": lambda: one_tensor(1, 3),
         "n7": lambda: one_tensor(7), "n9": lambda: one_tensor(9, 2), "n1001": lambda: one_tensor(1001)}


@pytest.mark.parametrize("which", sorted(SPECS))
def test_payload_length_formulas(which):
    spec = SPECS[which]()
    update = random_update(spec, seed=6)
    assert len(build_codec("signsgd").encode(update, ctx(spec))) == signsgd_length(spec)
    for levels in [1, 2, 3, 4, 7, 8, 255]:
        assert len(build_codec("qsgd", levels=levels).encode(update, ctx(spec))) == qsgd_length(spec, levels), levels
    for fraction in [0.01, 0.1, 0.5, 1.0]:
        payload = build_codec("topk", fraction=fraction).encode(update, ctx(spec))
        kept = reference_topk(flat(spec, update), keep_count(fraction, spec.numel(("weight",))))
        assert len(payload) == topk_length(spec, kept), fraction


def test_tiny_spec_exercises_padding():
    assert tiny_spec().numel(("weight",)) == 42  # 42 sign bits, 126 qsgd bits, 252 class bits: padded bytes


# ---------------------------------------------------------------------------------------------------------
# entropy coding


@pytest.mark.parametrize("name,options", [("signsgd", {}), ("qsgd", {"levels": 4}), ("qsgd", {"levels": 255}),
                                          ("topk", {"fraction": 0.05})])
@pytest.mark.parametrize("spec_fn", [tiny_spec, synthetic_spec])
def test_entropy_mode_decodes_to_the_same_update(name, options, spec_fn):
    spec = spec_fn()
    update = random_update(spec, seed=12)
    fixed, coded = build_codec(name, **options), build_codec(name, entropy=True, **options)
    assert coded.codec_id == f"{name}+ec"
    _, a = roundtrip(fixed, spec, update, rng_seed=5)
    _, b = roundtrip(coded, spec, update, rng_seed=5)
    for t in spec.tensors:
        assert torch.equal(a[t.name], b[t.name]), t.name


def skewed(name, n):
    g = torch.Generator().manual_seed(0)
    if name == "signsgd":  # 95 % positive
        return (torch.rand(n, generator=g) - 0.05).sign() * torch.rand(n, generator=g)
    x = torch.randn(n, generator=g) * 1e-4  # qsgd: nearly all mass at the middle level
    x[0] = 1.0
    return x


def sent_symbols(name, x, d):
    """(symbols, alphabet) of the one symbol section of a payload, recovered from input and decode."""
    if name == "signsgd":
        return (x >= 0).astype(np.int64), 2
    if name == "qsgd":
        return np.rint((d / np.abs(x).max() + 1) * 2).astype(np.int64), 5
    classes, _, _ = reference_positions(np.flatnonzero(d))
    return np.asarray(classes), 33


@pytest.mark.parametrize("name,options", [("signsgd", {}), ("qsgd", {"levels": 4}), ("topk", {"fraction": 0.01})])
def test_entropy_mode_is_shorter_for_skewed_symbols(name, options):
    n = 200_000
    spec = one_tensor(n)
    update = {"w": skewed(name, n)}
    fixed = build_codec(name, **options).encode(update, ctx(spec))
    coded_codec = build_codec(name, entropy=True, **options)
    coded = coded_codec.encode(update, ctx(spec))
    symbols, alphabet = sent_symbols(name, update["w"].numpy(), coded_codec.decode(coded, ctx(spec))["w"].numpy())
    freq = np.bincount(symbols, minlength=alphabet) / symbols.size
    entropy_bits = -float(np.sum(freq[freq > 0] * np.log2(freq[freq > 0])))
    fixed_section = math.ceil(symbols.size * math.ceil(math.log2(alphabet)) / 8)
    # the range coder gets within 1 % of the empirical entropy, plus its count table and word count
    coded_section = 1.01 * symbols.size * entropy_bits / 8 + 4 * alphabet + 4 + 4
    assert entropy_bits < 0.8 * math.ceil(math.log2(alphabet))  # the input is skewed indeed
    rest = len(fixed) - wire.envelope_overhead(name) - fixed_section  # the body besides the section
    assert len(coded) - wire.envelope_overhead(coded_codec.codec_id) - rest <= coded_section
    assert len(coded) < len(fixed)


# ---------------------------------------------------------------------------------------------------------
# malformed payloads (hand-built bodies in valid envelopes)


def expect(codec, spec, body, reason, match=""):
    payload = wire.pack(codec.codec_id, spec.fingerprint, bytes(body))
    with pytest.raises(PayloadError) as info:
        codec.decode(payload, ctx(spec, client=4))
    assert info.value.reason == reason, info.value
    assert match in info.value.detail, info.value
    assert info.value.client == 4


def tiny_dense(spec):
    return np.arange(spec.numel(("param", "buffer")), dtype="<f4").tobytes()


def test_signsgd_rejects_malformed_bodies():
    spec = tiny_spec()  # kernels: conv (27) and fc (15); 42 sign bits in 6 bytes
    codec = build_codec("signsgd")

    def body(scales=(0.5, 0.25), bits=b"\x55" * 5 + b"\x01", dense=None):
        return np.asarray(scales, "<f4").tobytes() + bits + (tiny_dense(spec) if dense is None else dense)

    good = codec.decode(wire.pack("signsgd", spec.fingerprint, body()), ctx(spec))
    assert good["conv.weight"].view(-1)[:3].tolist() == [0.5, -0.5, 0.5]
    assert good["fc.weight"].view(-1)[-1].item() == -0.25  # bit 41 of 0x01 in the last byte is 0
    expect(codec, spec, body()[:-1], "size")
    expect(codec, spec, body() + b"\0", "size")
    expect(codec, spec, body(scales=(float("nan"), 1.0)), "field")
    expect(codec, spec, body(scales=(1.0, float("inf"))), "field")
    expect(codec, spec, body(scales=(-0.5, 1.0)), "field")
    expect(codec, spec, body(bits=b"\x55" * 5 + b"\x05"), "field")  # bit 42 is padding
    expect(codec, spec, body()[:9], "size")
    expect(codec, spec, body()[:7], "truncated")  # not even the scales
    dense = bytearray(tiny_dense(spec))
    dense[:4] = np.float32(np.nan).tobytes()
    expect(codec, spec, body(dense=bytes(dense)), "nonfinite")


def test_qsgd_rejects_malformed_bodies():
    spec = tiny_spec()  # 42 indices of 3 bits (levels 4): 16 bytes
    codec = build_codec("qsgd")

    def body(levels=4, maxima=(1.0, 2.0), q=None, width=3):
        q = [4, 0, 2] + [2] * 39 if q is None else q
        return bytes([levels]) + np.asarray(maxima, "<f4").tobytes() + fixed_bits(q, width) + tiny_dense(spec)

    good = codec.decode(wire.pack("qsgd", spec.fingerprint, body()), ctx(spec))
    assert good["conv.weight"].view(-1)[:3].tolist() == [1.0, -1.0, 0.0]
    # the body declares its levels, which must be the run's: a codec built for 8 levels reads 4-bit indices
    eight = build_codec("qsgd", levels=8)
    other = eight.decode(wire.pack("qsgd", spec.fingerprint, body(levels=8, q=[8, 6] + [4] * 40, width=4)), ctx(spec))
    assert other["conv.weight"].view(-1)[:2].tolist() == [1.0, 0.5]
    expect(codec, spec, body(levels=8, q=[8, 6] + [4] * 40, width=4), "binding")
    expect(eight, spec, body(), "binding")
    expect(codec, spec, body(levels=0), "binding")
    expect(codec, spec, body(maxima=(float("nan"), 1.0)), "field")
    expect(codec, spec, body(maxima=(1.0, -2.0)), "field")
    expect(codec, spec, body(maxima=(float("-inf"), 1.0)), "field")
    expect(codec, spec, body(q=[5] + [2] * 41), "field")  # index 5 outside the alphabet of 5
    expect(codec, spec, body(q=[2] * 42 + [1], width=3), "size")  # one symbol too many: 16 bytes + padding
    padded = bytearray(body())
    padded[1 + 8 + 15] |= 0x80  # bits 126..127 of the 16th byte are padding
    expect(codec, spec, padded, "field")
    expect(codec, spec, body()[:-1], "size")
    expect(codec, spec, body()[:3], "truncated")


def topk_body(spec, idx, values=None, classes=None, mantissas=None, k=None):
    ref_classes, ref_raw, _ = reference_positions(idx)
    classes = ref_classes if classes is None else classes
    mantissas = ref_raw if mantissas is None else mantissas
    values = [1.0] * len(idx) if values is None else values
    k = len(idx) if k is None else k
    return (struct.pack("<I", k) + fixed_bits(classes, 6) + mantissas + np.asarray(values, "<f4").tobytes()
            + tiny_dense(spec))


def test_topk_rejects_malformed_bodies():
    spec = tiny_spec()  # n = 42
    codec = build_codec("topk", fraction=1.0)  # any k <= 42 is within what the run keeps
    expect(build_codec("topk"), spec, topk_body(spec, [3, 41]), "binding", "this run keeps 1")  # ceil(0.01 * 42)
    good = codec.decode(wire.pack("topk", spec.fingerprint, topk_body(spec, [3, 41], [2.0, -3.0])), ctx(spec))
    assert good["conv.weight"].view(-1)[3].item() == 2.0 and good["fc.weight"].view(-1)[-1].item() == -3.0
    assert int(sum(torch.count_nonzero(good[t.name]) for t in spec.select(("weight",)))) == 2
    # gaps 3 and 37: g+1 = 4 (class 3, mantissa 0b00), 38 (class 6, mantissa 6 = 0b00110): 7 bits in 1 byte
    assert reference_positions([3, 41])[:2] == ([3, 6], bytes([0b0011000]))

    expect(codec, spec, topk_body(spec, [3, 41], k=43), "field", "k = 43")  # k > n: before any allocation
    expect(codec, spec, struct.pack("<I", 2**32 - 1) + b"\0" * 8, "field", "k = 4294967295")
    expect(codec, spec, topk_body(spec, [3, 41], classes=[0, 6]), "field")
    expect(codec, spec, topk_body(spec, [3, 41], classes=[3, 33]), "field")  # 6 bits can say 33
    expect(codec, spec, topk_body(spec, [3, 41], mantissas=bytes([0b10011000])), "field")  # padding bit 7
    expect(codec, spec, topk_body(spec, [3, 42]), "field")  # last position == n
    # classes of 32 declare 31-bit mantissas: 62 bits need 8 bytes, 7 are there
    expect(codec, spec, struct.pack("<I", 2) + fixed_bits([32, 32], 6) + b"\0" * 7, "truncated")
    # gaps 3 and 2^31 - 1: the second position is far beyond n
    expect(codec, spec, topk_body(spec, [3, 41], classes=[3, 32], mantissas=b"\0" * 5), "field")
    expect(codec, spec, topk_body(spec, [3, 41])[:-1], "size")
    expect(codec, spec, topk_body(spec, [3, 41]) + b"\0", "size")
    expect(codec, spec, topk_body(spec, [3, 41], values=[1.0, float("nan")]), "nonfinite")
    expect(codec, spec, b"\x01\x00", "truncated")


def test_topk_entropy_mode_rejects_class_zero():
    spec = tiny_spec()
    codec = build_codec("topk", entropy=True)
    w = wire.BodyWriter(entropy=True)
    body = struct.pack("<I", 1) + w.symbols(np.array([0]), 33).getvalue() + np.float32(1).tobytes() + tiny_dense(spec)
    expect(codec, spec, body, "field")
    w = wire.BodyWriter(entropy=True)
    body = struct.pack("<I", 1) + w.symbols(np.array([1]), 33).getvalue() + np.float32(1).tobytes() + tiny_dense(spec)
    dec = codec.decode(wire.pack(codec.codec_id, spec.fingerprint, body), ctx(spec))
    assert dec["conv.weight"].view(-1)[0].item() == 1.0


# ---------------------------------------------------------------------------------------------------------
# signsgd majority vote


def test_signsgd_vote_aggregate_by_hand():
    spec = ModelSpec((TensorSpec("w", (4,), "weight"), TensorSpec("v", (2,), "weight"), TensorSpec("b", (2,), "param")))
    clients = [  # (client, weight, update); every kernel is ±scale already, so the codec sends it exactly
        (0, 1.0, {"w": [1, 1, -1, -1], "v": [0.5, 0.5], "b": [1, 2]}),
        (1, 2.0, {"w": [2, -2, -2, 2], "v": [-1, 1], "b": [3, 4]}),
        (2, 1.0, {"w": [3, -3, 3, 3], "v": [0, 0], "b": [5, 6]}),  # v all zero: abstains
    ]
    uplink = build_uplink("signsgd", vote=True)
    codec = uplink.codec
    decoded = []
    for client, weight, upd in clients:
        upd = {k: torch.tensor(v, dtype=torch.float32) for k, v in upd.items()}
        c = ctx(spec, client=client)
        decoded.append((client, weight, codec.decode(codec.encode(upd, c), c)))
        assert all(torch.equal(decoded[-1][2][k], upd[k]) for k in upd)
    step = uplink.algorithm.aggregate(spec, {}, decoded)
    # w: votes (3, -1, -1, 1) → signs (1, -1, -1, 1); scale (1·1 + 2·2 + 1·3) / 4 = 2
    assert step["w"].dtype == torch.float64 and step["w"].tolist() == [2.0, -2.0, -2.0, 2.0]
    # v: votes (1 - 1 + 0, 1 + 1 + 0) = (0, 2) → (0, 1); scale (1·0.5 + 2·1 + 1·0) / 4 = 0.625
    assert step["v"].tolist() == [0.0, 0.625]
    # b (dense): weighted mean ([1, 2] + 2·[3, 4] + [5, 6]) / 4
    assert step["b"].tolist() == [3.0, 4.0]
    # without vote: the plain weighted mean, which differs
    plain = build_uplink("signsgd").algorithm.aggregate(spec, {}, decoded)
    assert plain["w"].tolist() == [2.0, -1.5, -0.5, 1.5]
    assert all(torch.equal(plain[k], weighted_mean(spec, decoded)[k]) for k in plain)
    # through the server's aggregate, with error feedback on
    zero = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    new = aggregate(spec, zero, decoded, build_uplink("signsgd", vote=True, ef=True).algorithm)
    assert new["w"].tolist() == [2.0, -2.0, -2.0, 2.0] and new["v"].tolist() == [0.0, 0.625]


# ---------------------------------------------------------------------------------------------------------
# error feedback around topk


def test_error_feedback_with_topk_keeps_the_residual():
    spec = synthetic_spec()
    codec = build_uplink("topk", ef=True, fraction=0.05)
    state: dict = {}
    u1, u2 = random_update(spec, seed=21), random_update(spec, seed=22)
    decoded = []
    for i, u in enumerate([u1, u2]):
        c = ctx(spec, rng_seed=i)
        c.state = state
        decoded.append(codec.decode(codec.encode(u, c), ctx(spec)))
        if i == 0:  # after one round the residual is exactly what was not sent
            for t in spec.select(("weight",)):
                assert torch.equal(state[RESIDUAL + t.name] + decoded[0][t.name], u1[t.name])
    assert not any(RESIDUAL + t.name in state for t in split_specs(spec)[1])  # dense values are exact
    for t in spec.tensors:
        residual = state.get(RESIDUAL + t.name, torch.zeros(t.shape))
        lhs = decoded[0][t.name] + decoded[1][t.name] + residual
        rhs = u1[t.name] + u2[t.name]
        scale = float(rhs.abs().max())
        assert torch.allclose(lhs, rhs, rtol=0, atol=4 * scale * torch.finfo(torch.float32).eps), t.name
    assert torch.count_nonzero(state[RESIDUAL + "b"])


# ---------------------------------------------------------------------------------------------------------
# options


def test_bad_options_are_config_errors():
    for name, options in [("qsgd", {"levels": 0}), ("qsgd", {"levels": 256}), ("qsgd", {"levels": 2.5}),
                          ("qsgd", {"levels": True}), ("topk", {"fraction": 0}), ("topk", {"fraction": 1.5}),
                          ("topk", {"fraction": float("nan")}), ("topk", {"fraction": "0.1"}),
                          ("signsgd", {"vote": "maybe"}), ("signsgd", {"levels": 4})]:
        with pytest.raises(ConfigError):
            build_codec(name, **options)
    assert build_codec("signsgd", vote="true").options.vote is True
    assert build_codec("qsgd", levels=255).options.levels == 255


def test_qsgd_needs_the_client_generator():
    spec = tiny_spec()
    c = ctx(spec)
    c.rng = None
    with pytest.raises(ConfigError):
        build_codec("qsgd").encode(random_update(spec), c)
