import hashlib
import math
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from fedcodec.codecs import build_codec, build_uplink, wire
from fedcodec.codecs.fedmrn import MaskedNoiseTraining, make_noise, noise_chunks
from fedcodec.errors import ConfigError, PayloadError
from helpers import ctx, random_update, tiny_spec

HEADER_FIELDS = 8 + 1 + 1 + 4  # seed, mask kind, noise kind, alpha


@pytest.mark.parametrize("mask", ["binary", "signed"])
def test_payload_length_formula_and_header(mask):
    spec = tiny_spec()
    codec = build_codec("fedmrn", mask=mask)
    payload = codec.encode(random_update(spec), ctx(spec))
    n_masked = spec.numel(("weight",))
    n_dense = spec.numel(("param", "buffer"))
    assert n_masked == 42  # not a multiple of 8: the padding path is exercised
    header = wire.envelope_overhead("fedmrn") + HEADER_FIELDS
    assert header <= 64
    assert len(payload) == header + math.ceil(n_masked / 8) + 4 * n_dense


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 1001])
def test_packed_mask_length_is_ceil_n_over_8(n):
    from fedcodec.codecs import ModelSpec, TensorSpec

    spec = ModelSpec((TensorSpec("w", (n,), "weight"),))
    payload = build_codec("fedmrn").encode({"w": torch.zeros(n)}, ctx(spec))
    assert len(payload) == wire.envelope_overhead("fedmrn") + HEADER_FIELDS + math.ceil(n / 8)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "rademacher"])
def test_noise_is_reproducible_and_well_formed(kind):
    a = make_noise(123, 10_000, kind, 0.01)
    assert a.dtype == np.float32
    assert np.array_equal(a, make_noise(123, 10_000, kind, 0.01))
    assert not np.array_equal(a, make_noise(124, 10_000, kind, 0.01))
    assert np.all(np.abs(a) >= 1e-8)
    if kind == "uniform":
        assert a.min() >= -0.01 and a.max() < 0.01 and abs(a.mean()) < 5e-4
    if kind == "rademacher":
        assert set(np.unique(a)) == {np.float32(-0.01), np.float32(0.01)}


def test_noise_is_identical_in_another_process():
    """The server regenerates the noise in a different process (or machine): same bytes, for every
    kind and for a count that is not a multiple of the chunk size."""
    code = ("import hashlib; from fedcodec.codecs.fedmrn import make_noise; "
            "print(' '.join(hashlib.sha256(make_noise(2**63 + 5, 100_003, k, 0.005).tobytes()).hexdigest() "
            "for k in ('uniform', 'gaussian', 'rademacher')))")
    here = " ".join(hashlib.sha256(make_noise(2**63 + 5, 100_003, k, 0.005).tobytes()).hexdigest()
                    for k in ("uniform", "gaussian", "rademacher"))
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there


def test_noise_stream_is_pinned():
    """Guards the stream itself (generator 2): a change of generator or formula would silently break
    payloads, so it must come with a new generator number."""
    # SFC64(2024)'s first raw word is 0xaab370cbd524bf6e: 16-bit draws 0xbf6e, 0xd524, 0x70cb, 0xaab3
    # (least significant first) = 49006, 54564, 28875, 43699, i.e. 0.01 * (k - 32767.5) / 32768:
    expected = np.array([0.0049555968, 0.006651764, -0.0011878967, 0.003336029], np.float32)
    assert np.array_equal(make_noise(2024, 4, "uniform", 0.01), expected)
    digests = {k: hashlib.sha256(make_noise(2024, 100_003, k, 0.01).tobytes()).hexdigest()[:16]
               for k in ("uniform", "rademacher", "gaussian")}
    assert digests == {"uniform": "5b6bafeb8a54499b", "rademacher": "fed99b037889a954",
                       "gaussian": "da681d9d5a5d19c6"}  # recorded with numpy 2.4 (SFC64's stream is stable)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "rademacher"])
def test_noise_does_not_depend_on_the_chunk_size(kind):
    whole = make_noise(77, 1000, kind, 0.02)
    for chunk in (64, 128, 960, 1024):
        parts = [v for _, _, v in noise_chunks(77, 1000, kind, 0.02, chunk=chunk)]
        assert all(len(v) <= chunk for v in parts)
        assert np.array_equal(np.concatenate(parts), whole)


def test_payload_from_another_noise_generator_is_refused():
    spec = tiny_spec()
    codec = build_codec("fedmrn")
    c = ctx(spec)
    payload = bytearray(codec.encode({t.name: torch.zeros(t.shape) for t in spec.tensors}, c))
    body_start = wire.envelope_overhead("fedmrn") - 4  # the CRC-32 sits at the end
    noise_byte = body_start + 8 + 1
    assert payload[noise_byte] == 0x20  # generator 2, uniform noise
    payload[noise_byte] = 0x00  # generator 1 (retired): the same size, other noise
    payload[-4:] = zlib.crc32(bytes(payload[:-4])).to_bytes(4, "little")
    with pytest.raises(PayloadError) as err:
        codec.decode(bytes(payload), c)
    assert err.value.reason == "version" and "generator 1" in str(err.value)


@pytest.mark.parametrize("mask", ["binary", "signed"])
def test_encoder_and_decoder_use_identical_noise(mask):
    """The training-time noise (client) and the regenerated noise (server) are bit-identical:
    a masked update survives the wire exactly."""
    spec = tiny_spec()
    uplink = build_uplink("fedmrn", mask=mask)
    codec = uplink.codec
    c = ctx(spec)
    param = uplink.algorithm.parametrization(c, {})
    g = torch.Generator().manual_seed(1)
    values = {}
    for name in param.names:
        noise = param.noise[name]
        bits = torch.randint(0, 2, noise.shape, generator=g).float()
        values[name] = noise * (bits if mask == "binary" else 2 * bits - 1)
    update = random_update(spec) | values
    decoded = codec.decode(codec.encode(update, c), c)
    for t in spec.tensors:
        assert torch.equal(decoded[t.name], update[t.name]), t.name


@pytest.mark.parametrize("mask", ["binary", "signed"])
def test_stochastic_masking_is_unbiased(mask):
    from fedcodec.codecs import ModelSpec, TensorSpec

    n = 4000
    spec = ModelSpec((TensorSpec("w", (n,), "weight"),))
    codec = build_codec("fedmrn", mask=mask, alpha=0.01)
    noise = torch.from_numpy(make_noise(7, n, "uniform", 0.01))
    lo = 0.0 if mask == "binary" else -1.0
    target = noise * torch.linspace(lo, 1.0, n)  # anywhere inside the representable range
    trials = 400
    acc = torch.zeros(n, dtype=torch.float64)
    for i in range(trials):
        c = ctx(spec, seed=7, rng_seed=100 + i)
        acc += codec.decode(codec.encode({"w": target}, c), c)["w"].double()
    mean = acc / trials
    # per-element std of the estimate is at most |N|/(2 sqrt(trials)); test the aggregate error
    z = ((mean - target.double()) / (noise.double().abs() / (2 * math.sqrt(trials)))).mean() * math.sqrt(n)
    assert abs(float(z)) < 5
    assert float((mean - target.double()).abs().max()) < 0.01 * 4 / math.sqrt(trials) * 2


@pytest.mark.parametrize("mask", ["binary", "signed"])
def test_sure_bits_are_sure(mask):
    """Where p is 0 or 1 (U at or beyond the ends of its range) every draw gives the same bit."""
    from fedcodec.codecs import ModelSpec, TensorSpec

    n = 5000
    spec = ModelSpec((TensorSpec("w", (n,), "weight"),))
    codec = build_codec("fedmrn", mask=mask)
    noise = torch.from_numpy(make_noise(7, n, "uniform", 0.01))
    low = 0.0 if mask == "binary" else -1.0
    for scale, expected in ((1.0, noise), (3.5, noise), (low, noise * low), (low - 2.0, noise * low)):
        for rng_seed in (1, 2):
            c = ctx(spec, seed=7, rng_seed=rng_seed)
            assert torch.equal(codec.decode(codec.encode({"w": noise * scale}, c), c)["w"], expected), scale


def test_sm_off_rounds_deterministically():
    from fedcodec.codecs import ModelSpec, TensorSpec

    spec = ModelSpec((TensorSpec("w", (1000,), "weight"),))
    codec = build_codec("fedmrn", sm=False)
    noise = torch.from_numpy(make_noise(7, 1000, "uniform", 0.01))
    target = noise * torch.rand(1000, generator=torch.Generator().manual_seed(0))
    a = codec.decode(codec.encode({"w": target}, ctx(spec, rng_seed=1)), ctx(spec))["w"]
    b = codec.decode(codec.encode({"w": target}, ctx(spec, rng_seed=2)), ctx(spec))["w"]
    assert torch.equal(a, b)
    assert torch.equal(a, noise * (target / noise > 0.5).float())


def _training(mask="binary", sm=True, pm=True, n=20_000):
    from fedcodec.codecs import TensorSpec

    spec = [TensorSpec("w", (n,), "weight")]
    noise = {"w": torch.from_numpy(make_noise(3, n, "uniform", 0.01))}
    return MaskedNoiseTraining(spec, noise, mask, sm, pm, torch.Generator().manual_seed(0)), noise["w"]


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 1.0])
def test_progressive_masking_schedule(progress):
    """At progress p an element uses its sampled mask with probability p, else the continuous value."""
    param, noise = _training()
    latent = {"w": (0.5 * noise).requires_grad_()}  # continuous value 0.5 N; a mask gives 0 or N
    out = param.deltas(latent, progress)["w"].detach()
    continuous = torch.isclose(out, 0.5 * noise, rtol=0, atol=0)
    assert abs(1 - float(continuous.float().mean()) - progress) < 0.02
    masked = out[~continuous]
    assert torch.all((masked == 0) | (masked == noise[~continuous]))


def test_progressive_probability_matches_engine_schedule():
    from fedcodec.codecs.fedmrn import progressive_probability

    assert [progressive_probability(t, 4) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_pm_off_is_fully_stochastic_and_gradients_pass_straight_through():
    param, noise = _training(pm=False)
    latent = {"w": (0.3 * noise).clone().requires_grad_()}
    out = param.deltas(latent, 0.0)["w"]
    assert torch.all((out.detach() == 0) | (out.detach() == noise))
    weights = torch.linspace(-1, 1, out.numel())
    (out * weights).sum().backward()
    assert torch.equal(latent["w"].grad, weights)


def test_signed_mask_values_and_finish_clips():
    param, noise = _training(mask="signed", pm=False)
    latent = {"w": (3 * noise).clone().requires_grad_()}  # far outside the range: clipped to +N
    assert torch.equal(param.deltas(latent, 1.0)["w"].detach(), noise)
    assert torch.equal(param.finish(latent)["w"], noise)


@pytest.mark.parametrize("mutation", ["truncate", "extend", "flip", "zero"])
def test_malformed_payloads_raise_typed_error(mutation):
    spec = tiny_spec()
    codec = build_codec("fedmrn")
    payload = bytearray(codec.encode(random_update(spec), ctx(spec)))
    if mutation == "truncate":
        payload = payload[:-9]
    elif mutation == "extend":
        payload += b"\x00" * 4
    elif mutation == "flip":
        payload[30] ^= 0x10
    else:
        payload = bytearray(len(payload))
    with pytest.raises(PayloadError) as info:
        codec.decode(bytes(payload), ctx(spec, client=9))
    assert info.value.client == 9 and "client 9" in str(info.value)


def _rewrap(codec_id, spec, body):
    return wire.pack(codec_id, spec.fingerprint, body)


def test_semantic_checks_behind_a_valid_checksum():
    """A payload with a correct CRC can still lie: bad fields, NaN values, wrong sizes, dirty padding."""
    spec = tiny_spec()
    codec = build_codec("fedmrn")
    c = ctx(spec)
    body = bytearray(wire.unpack(codec.encode(random_update(spec), c), "fedmrn", spec.fingerprint))
    cases = {}
    b = bytearray(body); b[8] = 7; cases["field"] = b  # unknown mask kind
    b = bytearray(body); b[-4:] = np.float32(np.nan).tobytes(); cases["nonfinite"] = b
    b = bytearray(body); del b[-4:]; cases["size"] = b
    b = bytearray(body); b[14 + 5] |= 0x80; cases["padding"] = b  # bit 47 of 42 mask bits
    for reason, bad in cases.items():
        with pytest.raises(PayloadError) as info:
            codec.decode(_rewrap("fedmrn", spec, bytes(bad)), c)
        assert info.value.reason == ("field" if reason == "padding" else reason), reason


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError):
        build_codec("fedmrn", mask="ternary")
    with pytest.raises(ConfigError):
        build_codec("fedmrn", noise="pink")
    with pytest.raises(ConfigError):
        build_codec("fedmrn", alpha=0)
    with pytest.raises(ConfigError, match="no option"):
        build_codec("fedmrn", beta=1)
    with pytest.raises(ConfigError, match="unknown codec"):
        build_codec("nope")


def test_cnn4_fashion_mnist_payload_is_56462_bytes():
    """The headline size: a CNN4 FedMRN (binary mask, no entropy coding) update for 1x28x28 inputs and
    10 classes, 389,920 masked weights and 1,920 float32 values: 28 + 14 + 48,740 + 7,680 bytes."""
    from fedcodec.codecs import ModelSpec
    from fedcodec.models import build_model

    spec = ModelSpec.from_model(build_model("cnn4", (1, 28, 28), 10, seed=0))
    zero = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    assert len(build_codec("fedmrn", mask="binary").encode(zero, ctx(spec))) == 56_462
