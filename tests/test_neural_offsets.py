"""Personal quantization offsets: latents rounded around each channel's median of the entropy model
(CompressAI's medians), derived from the client-local prior, covered by the entropy fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedcodec.errors import ConfigError
from fedcodec.neural.codec import Coder, CodecFileError
from fedcodec.neural.entropy import OFFSET_GRID, SUPPORT, FactorizedPrior
from fedcodec.neural.federated import Trained
from fedcodec.neural.models import NTCConfig, build_ntc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


VEC = NTCConfig("vector", 4, latent=2, hidden=8)
VEC_OFFSETS = dataclasses.replace(VEC, offsets=True)


def _data(rows: int = 500) -> np.ndarray:
    return (np.random.default_rng(3).standard_normal((rows, 4)) * 4).astype(np.float32)


def _fit(prior: FactorizedPrior, mean: float, std: float, steps: int, seed: int = 0) -> FactorizedPrior:
    """``prior`` trained as in NTC training (uniform noise) on samples of N(mean, std²) per channel,
    Adam at 2e-2 then, for the last third, 2e-3 (which settles the median)."""
    opt = torch.optim.Adam(prior.parameters(), 2e-2)
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        if i == steps * 2 // 3:
            for group in opt.param_groups:
                group["lr"] = 2e-3
        y = mean + std * torch.randn(512, prior.channels, generator=gen)
        y = y + torch.rand(y.shape, generator=gen) - 0.5
        loss = -torch.log2(prior.likelihood(y)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prior


def _on_grid(m: np.ndarray) -> bool:
    return bool(np.all(np.round(m / OFFSET_GRID) * OFFSET_GRID == m))


# ------------------------------------------------------------------------------------------ medians
def test_medians_of_a_trained_density_are_its_median_on_the_grid():
    torch.manual_seed(0)
    prior = _fit(FactorizedPrior(2), 0.37, 1.0, steps=300)
    m = prior.medians()
    assert m.dtype == np.float64 and m.shape == (2,)
    assert np.all(np.abs(m - 0.37) < 0.04), m  # measured: 0.374, 0.397 (seeds 1-3: within 0.025)
    assert _on_grid(m)
    assert np.array_equal(m, prior.medians())  # deterministic


def test_medians_follow_an_exact_shift_of_the_density():
    torch.manual_seed(1)
    prior = FactorizedPrior(3)
    before = prior.medians()
    shift = torch.tensor([0.25, -1.5, 3.0])
    with torch.no_grad():  # c(v) → c(v − s): the first layer's bias absorbs the shift exactly
        prior.biases[0].sub_(F.softplus(prior.matrices[0]) * shift.reshape(3, 1, 1))
    after = prior.medians()
    assert np.all(np.abs(after - before - shift.numpy()) <= OFFSET_GRID), (before, after)
    assert _on_grid(after)
    # the CDF logit at the median is ~0 (on either side within one grid step)
    with torch.no_grad():
        lo = prior._logits(torch.from_numpy(after - OFFSET_GRID).reshape(3, 1, 1)).reshape(-1)
        hi = prior._logits(torch.from_numpy(after + OFFSET_GRID).reshape(3, 1, 1)).reshape(-1)
    assert bool(torch.all(lo < 0)) and bool(torch.all(hi > 0))
    with torch.no_grad():  # a median far outside the support: found, then clamped to it
        prior.biases[0].sub_(F.softplus(prior.matrices[0]) * 1000.0)
    assert np.array_equal(prior.medians(), np.full(3, float(SUPPORT)))


# ------------------------------------------------------------------------------------- round trips
def test_offsets_round_trip_to_the_offset_reconstruction_and_cost_what_they_estimate():
    model = build_ntc(VEC_OFFSETS, 0).eval()
    coder = Coder.of(model)
    med = model.prior.medians()
    assert coder.tables.offsets is not None and np.array_equal(coder.tables.offsets, med)
    assert np.all(np.abs(med) > 0.01)  # a real offset (the untrained prior: -0.997, 6.884)
    x = _data(2000)
    blob = coder.compress(x)
    back, kind = coder.decompress(blob)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        y = model.g_a(xt)
        sym = torch.round(y - torch.from_numpy(med.astype(np.float32)))
        expect = model.g_s(sym + torch.from_numpy(med.astype(np.float32)))
    assert kind == "array" and np.array_equal(back, expect.numpy())
    assert np.array_equal(coder.quantize(xt), sym.to(torch.int64).numpy())
    est = coder.estimate_bits(sym.to(torch.int64).numpy())
    assert est > 1000
    header_bits = 8 * (4 + 2 + 16 + 1 + 4 * 2 + 1 + 4 * 2 + 4 + 8)
    assert abs(8 * len(blob) - est) <= 0.01 * est + header_bits + 64, (8 * len(blob), est)


def test_offsets_off_is_todays_integer_grid_byte_for_byte():
    model = build_ntc(VEC, 0).eval()
    coder = Coder.of(model)
    assert coder.tables.offsets is None and coder.offsets is None
    x = _data()
    blob = coder.compress(x)
    # the file fedcodec wrote before offsets existed (HEAD bfc44fa, this machine's torch)
    assert len(blob) == 732 and hashlib.blake2b(blob, digest_size=8).hexdigest() == "add11daf60555ef3"
    assert coder.tables.fingerprint.hex() == "cf4bf056a2db4754"
    assert model.transform_fingerprint().hex() == "487a5220671ed8f9"
    xt = torch.from_numpy(x)
    with torch.no_grad():
        assert np.array_equal(coder.quantize(xt), torch.round(model.g_a(xt)).to(torch.int64).numpy())
    # the transforms do not depend on the switch; only the entropy model's fingerprint does
    on = build_ntc(VEC_OFFSETS, 0).eval()
    assert on.transform_fingerprint() == model.transform_fingerprint()
    assert Coder.of(on).tables.fingerprint != coder.tables.fingerprint


def test_a_file_does_not_decode_on_the_other_grid():
    on, off = build_ntc(VEC_OFFSETS, 0).eval(), build_ntc(VEC, 0).eval()
    x = _data(50)
    with pytest.raises(CodecFileError) as err:
        Coder.of(off).decompress(Coder.of(on).compress(x))
    assert err.value.reason == "entropy-mismatch"
    with pytest.raises(CodecFileError) as err:
        Coder.of(on).decompress(Coder.of(off).compress(x))
    assert err.value.reason == "entropy-mismatch"
    # other offsets (a shifted prior): refused too
    other = build_ntc(VEC_OFFSETS, 0).eval()
    with torch.no_grad():
        other.prior.biases[0].sub_(F.softplus(other.prior.matrices[0]) * 0.25)
    assert not np.array_equal(other.prior.medians(), on.prior.medians())
    with pytest.raises(CodecFileError) as err:
        Coder.of(other).decompress(Coder.of(on).compress(x))
    assert err.value.reason == "entropy-mismatch"


def test_estimates_without_tables_use_the_models_offsets():
    """NTCTask.evaluate codes nothing (``Coder(model, None)``): the offsets still apply."""
    model = build_ntc(VEC_OFFSETS, 0).eval()
    full, bare = Coder.of(model), Coder(model, None)
    assert np.array_equal(bare.offsets, full.offsets)
    xt = torch.from_numpy(_data())
    sym = bare.quantize(xt)
    assert np.array_equal(sym, full.quantize(xt))
    assert bare.estimate_bits(sym) == full.estimate_bits(sym)
    assert torch.equal(bare.reconstruct(sym), full.reconstruct(sym))
    assert Coder(build_ntc(VEC, 0), None).offsets is None


# ------------------------------------------------------------------------------------ saved codecs
def test_the_switch_survives_parse_and_saving(tmp_path):
    assert NTCConfig.parse(dict(VEC_OFFSETS.__dict__)) == VEC_OFFSETS
    assert NTCConfig.parse({"kind": "vector", "dim": 4, "latent": 2, "hidden": 8}) == VEC  # codecs saved before
    assert NTCConfig.parse({**VEC.__dict__, "offsets": False}).offsets is False
    for bad in (1, 0, "yes", None, 1.0):
        with pytest.raises(ConfigError, match="offsets"):
            NTCConfig.parse({**VEC.__dict__, "offsets": bad})
    with pytest.raises(ConfigError, match="offsets"):
        dataclasses.replace(VEC, offsets=1).validate()
    model = build_ntc(VEC_OFFSETS, 0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    local = {k: v for k, v in state.items() if k.startswith("prior.")}
    shared = {k: v for k, v in state.items() if k not in local}
    Trained(VEC_OFFSETS, "federated", 1.0, shared, [local], [], 0, 0).save(tmp_path / "codec.safetensors")
    loaded = Trained.load(tmp_path / "codec.safetensors")
    assert loaded.model_cfg == VEC_OFFSETS
    x = _data(50)
    blob = Coder.of(model.eval()).compress(x)
    back, _ = Coder.of(loaded.model(0)).decompress(blob)
    assert np.array_equal(back, Coder.of(model).decompress(blob)[0])


# ------------------------------------------------------------------------------------------- rate
def test_offsets_save_rate_on_latents_with_a_half_integer_median():
    torch.manual_seed(0)
    prior = _fit(FactorizedPrior(3), 0.5, 0.3, steps=150)
    on, off = prior.tables(offsets=True), prior.tables(offsets=False)
    assert np.all(np.abs(on.offsets - 0.5) < 0.05), on.offsets
    y = (0.5 + 0.3 * torch.randn(4000, 3, generator=torch.Generator().manual_seed(1))).numpy()
    s_on = np.round(y - on.offsets).astype(np.int64)
    s_off = np.round(y).astype(np.int64)
    n_on, n_off = len(on.encode(s_on)), len(off.encode(s_off))
    assert np.array_equal(on.decode(on.encode(s_on), s_on.shape), s_on)
    # measured: 848 bytes with offsets, 1536 without (the integer grid splits the mass at 0.5 in two)
    assert n_on < 0.7 * n_off, (n_on, n_off)
