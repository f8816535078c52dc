"""Federated neural compression: real bitstreams, file format, personalized entropy models."""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np
import pytest
import torch

from fedcodec.cli import main
from fedcodec.codecs import ModelSpec, wire
from fedcodec.errors import ConfigError, PayloadError
from fedcodec.fl import rng as rngs
from fedcodec.fl import server as server_mod
from fedcodec.fl.simulation import RunState
from fedcodec.neural.codec import Coder, CodecFileError
from fedcodec.codecs.fedmrn import noise_tensors
from fedcodec.neural.entropy import FactorizedPrior
from fedcodec.neural.federated import (Settings, Trained, build_simulation, fit_prior, rd_point, train)
from fedcodec.neural.models import NTCConfig, build_ntc
from fedcodec.neural.sources import NeuralSource, synthetic_source

VEC = NTCConfig("vector", 16, latent=4, hidden=32)
IMG = NTCConfig("image", 3, latent=8, hidden=8, downs=2)


def _trained_vector(steps: int = 150, seed: int = 0):
    torch.manual_seed(seed)
    m = build_ntc(VEC, seed)
    src = synthetic_source(clients=1, newcomers=0, n_train=512, n_test=2000)
    x = src.train[0]
    opt = torch.optim.Adam(m.parameters(), 5e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = m.rd(x[idx], 100.0, gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), src.test[0]


@pytest.fixture(scope="module")
def vector_model():
    return _trained_vector()


def test_range_coding_is_bit_exact_including_escapes():
    prior = FactorizedPrior(3)
    tables = prior.tables()
    rng = np.random.default_rng(0)
    sym = rng.integers(-4, 5, size=(50, 3, 4, 4))
    sym[0, 0, 0, 0], sym[1, 2, 3, 3], sym[2, 1, 0, 1] = 30000, -32768, 700  # far outside the support
    data = tables.encode(sym)
    assert np.array_equal(tables.decode(data, sym.shape), sym)


def test_rate_from_bytes_matches_the_model_estimate(vector_model):
    model, x = vector_model
    data, x_hat, est = Coder.of(model).code_batch(x)
    bits = 8 * len(data)
    assert est > 1000  # a real amount of information, so 1% is meaningful
    assert abs(bits - est) <= 0.01 * est + 64, (bits, est)
    assert float(((x_hat - x) ** 2).mean()) < float(x.var())  # it reconstructs something


def test_tables_fingerprint_tracks_the_entropy_model(vector_model):
    model, _ = vector_model
    a = Coder.of(model).tables
    assert a.fingerprint == model.prior.tables().fingerprint  # deterministic
    with torch.no_grad():
        model_b = build_ntc(VEC, 0)
        model_b.load_state_dict(model.state_dict())
        model_b.prior.biases[0][0, 0, 0] += 0.5
    assert Coder.of(model_b).tables.fingerprint != a.fingerprint


def test_file_round_trip_and_rejections(vector_model):
    model, x = vector_model
    coder = Coder.of(model)
    arr = x[:100].numpy()
    blob = coder.compress(arr)
    back, kind = coder.decompress(blob)
    _, expect, _ = coder.code_batch(x[:100])
    assert kind == "array" and back.shape == arr.shape
    assert np.array_equal(back, expect.numpy())
    # another client's entropy model: same transforms, different prior
    other = build_ntc(VEC, 0)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.prior.biases[-1].add_(0.3)
    with pytest.raises(CodecFileError, match="another entropy model") as err:
        Coder.of(other).decompress(blob)
    assert err.value.reason == "entropy-mismatch"
    with pytest.raises(CodecFileError) as err:
        Coder.of(build_ntc(VEC, 1)).decompress(blob)
    assert err.value.reason == "model-mismatch"
    for pos in (5, 30, len(blob) // 2, len(blob) - 3):  # any flipped byte is caught
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(CodecFileError):
            coder.decompress(bytes(bad))
    with pytest.raises(CodecFileError):
        coder.decompress(blob[:-20])
    with pytest.raises(CodecFileError, match="magic"):
        coder.decompress(b"PK\x03\x04" + blob[4:])


def test_huge_declared_shape_is_refused_before_allocating(vector_model):
    import hashlib

    model, x = vector_model
    coder = Coder.of(model)
    blob = coder.compress(x[:10].numpy())
    body = bytearray(blob[:-8])
    struct.pack_into("<2I", body, 23, 2_000_000_000, 16)  # data shape (N, 16), N absurd
    forged = bytes(body) + hashlib.blake2b(bytes(body), digest_size=8).digest()
    with pytest.raises(CodecFileError) as err:
        coder.decompress(forged)
    assert err.value.reason in ("size", "shape")


def test_image_file_of_any_size_round_trips():
    model = build_ntc(IMG, 0).eval()
    coder = Coder.of(model)
    img = np.random.default_rng(0).random((3, 21, 30), dtype=np.float32)  # not multiples of 4
    back, kind = coder.decompress(coder.compress(img, "image"))
    assert kind == "image" and back.shape == img.shape


def _tiny_source() -> NeuralSource:
    src = synthetic_source(clients=3, newcomers=1, n_train=40, n_test=50)
    src.model = NTCConfig("vector", 16, latent=3, hidden=16)
    return src


def test_personalized_prior_never_reaches_the_server(monkeypatch):
    src = _tiny_source()
    s = Settings(rounds=2, local_epochs=1, batch_size=16, lr=1e-2)
    seen: list[dict] = []
    real = server_mod.server_round

    def spy(uplink, spec, global_params, rnd, payloads, *a, **kw):
        for client, (data, _) in payloads.items():
            seen.append({"client": client, "bytes": data,
                         "decoded": uplink.decode(data, server_mod.CodecContext(spec, client=client, round=rnd,
                                                                              reference=global_params))})
        return real(uplink, spec, global_params, rnd, payloads, *a, **kw)

    monkeypatch.setattr("fedcodec.fl.loop.server_round", spy)
    sim, state = build_simulation(src, "federated", 100.0, s)
    from fedcodec.fl.simulation import run_round

    for _ in range(2):
        state = run_round(sim, state)
    prior_names = {n for n in build_ntc(src.model, 0).prior_names()}
    assert prior_names and not prior_names & set(sim.spec.names)
    assert not prior_names & set(state.global_params)
    shared_numel = sim.spec.numel()
    assert len(seen) == 6
    for item in seen:
        assert set(item["decoded"]) == set(sim.spec.names)
        assert len(item["bytes"]) < 4 * shared_numel + 64  # fp32 of the shared tensors + header, nothing more
        assert len(item["bytes"]) >= 4 * shared_numel
    # each client's entropy model lives in its own store and they differ
    priors = [state.client_states[c]["local/prior.biases.0"] for c in range(3)]
    assert not torch.equal(priors[0], priors[1])


def test_round_evaluation_is_each_clients_own_codec_on_its_test_data():
    """NTCTask.evaluate: the clients' mean rate estimate and MSE, each with its own entropy model."""
    src = _tiny_source()
    sim, state = build_simulation(src, "federated", 100.0, Settings(rounds=1, local_epochs=1, batch_size=16,
                                                                    lr=1e-2))
    from fedcodec.fl.simulation import run_round

    state = run_round(sim, state)
    assert sim.runtime.model.cfg.offsets  # the trainer's default: each client rounds around its own medians
    rates, mses = [], []
    for c in range(src.num_clients):
        m = build_ntc(dataclasses.replace(src.model, offsets=True), 0).eval()
        m.load_state_dict({**state.global_params, **sim.runtime.local_tensors(state.client_states[c])})
        coder, x = Coder(m, None), src.test[c]
        sym = coder.quantize(x)
        rates.append(coder.estimate_bits(sym) / len(x))
        mses.append(float(torch.mean((coder.reconstruct(sym) - x) ** 2)))
    rec = state.records[-1]
    assert rec["rate_est"] == pytest.approx(float(np.mean(rates)), rel=1e-12)
    assert rec["mse"] == pytest.approx(float(np.mean(mses)), rel=1e-12)
    assert rec["test_loss"] == pytest.approx(rec["rate_est"] + 100.0 * rec["mse"], rel=1e-12)
    assert sim.evaluate_round(state.global_params, state) == {k: rec[k] for k in ("rate_est", "mse", "test_loss")}
    # with every client on the initial entropy model instead, the rate is another
    assert sim.evaluate_round(state.global_params, RunState(1, {}))["rate_est"] != rec["rate_est"]


def _fedmrn_payload_bytes(spec) -> int:
    """FedMRN's uplink: envelope, seed/mask/noise/alpha fields, packed mask bits, float32 dense values."""
    masked, dense = spec.numel(("weight",)), spec.numel(("param", "buffer"))
    return wire.envelope_overhead("fedmrn") + 8 + 1 + 1 + 4 + math.ceil(masked / 8) + 4 * dense


def test_fedmrn_trains_the_shared_transforms_and_the_prior_stays_local(monkeypatch):
    src = _tiny_source()
    s = Settings(rounds=3, local_epochs=1, batch_size=16, lr=1e-2, method="fedmrn-binary", prior_lr_scale=1.0)
    seen: list[tuple[int, int, dict]] = []
    real = server_mod.server_round

    def spy(uplink, spec, global_params, rnd, payloads, *a, **kw):
        for client, (data, _) in payloads.items():
            ctx = server_mod.CodecContext(spec, client=client, round=rnd, seed=kw["seed_of"](client),
                                          reference=global_params)
            seen.append((rnd, client, uplink.decode(data, ctx)))
        return real(uplink, spec, global_params, rnd, payloads, *a, **kw)

    monkeypatch.setattr("fedcodec.fl.loop.server_round", spy)
    from fedcodec.fl.simulation import run_round

    sim, state = build_simulation(src, "federated", 100.0, s)
    initial = sim.evaluate_round(state.global_params, state)["test_loss"]
    while state.round < s.rounds:
        state = run_round(sim, state)
    spec, uplink = sim.spec, sim.runtime.uplink
    # the masks cover the transforms' kernels; biases travel as float32; the prior not at all
    assert (spec.numel(("weight",)), spec.numel(("param", "buffer"))) == (1120, 83)
    prior = set(build_ntc(src.model, 0).prior_names())
    assert prior and not prior & set(spec.names) and not prior & set(state.global_params)
    ups = [e for e in state.ledger.entries if e.direction == "up"]
    assert len(ups) == 9 and {e.codec for e in ups} == {"fedmrn"}
    assert {e.nbytes for e in ups} == {_fedmrn_payload_bytes(spec)} == {514}
    assert len(seen) == 9
    for rnd, client, dec in seen:  # each decoded kernel is the client's seeded noise times a 0/1 mask
        assert set(dec) == set(spec.names)
        masked = spec.select(("weight",))
        noise = noise_tensors(uplink.codec.options, rngs.derive_seed(s.seed, rnd, rngs.CLIENT_NOISE, client), masked)
        bits = torch.cat([(dec[t.name] != 0).reshape(-1) for t in masked])
        assert all(torch.equal(dec[t.name], noise[t.name] * (dec[t.name] != 0)) for t in masked)
        assert 0.05 < float(bits.float().mean()) < 0.95
    # each client's entropy model trained in its own store (with its Adam state), and they differ
    init = sim.runtime.local_init
    priors = [sim.runtime.local_tensors(state.client_states[c]) for c in range(3)]
    assert all(any(not torch.equal(p[n], init[n]) for n in init) for p in priors)
    assert not torch.equal(priors[0]["prior.biases.0"], priors[1]["prior.biases.0"])
    assert any(k.startswith("optim/prior.") for k in state.client_states[0])
    assert not any(k.startswith(f"optim/{t.name}/") for t in spec.select(("weight",)) for k in state.client_states[0])
    # rate + λ·MSE on the clients' test data falls, and not only through the entropy models:
    assert state.records[-1]["test_loss"] < 0.85 * initial
    frozen = train(src, "federated", 100.0, Settings(**{**s.__dict__, "prior_lr_scale": 0.0}), progress=False)
    assert all(torch.equal(loc[n], init[n]) for loc in frozen.local for n in init)
    assert frozen.records[-1]["test_loss"] < 0.85 * initial


def test_cli_trains_with_fedmrn(tmp_path, capsys):
    import json

    out = tmp_path / "mrn"
    assert main(["neural", "train", "--source", "synthetic", "--method", "fedmrn-binary", "--modes", "federated",
                 "--lambdas", "100", "--rounds", "1", "--local-epochs", "1", "--batch-size", "50", "--threads", "1",
                 "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["method"] == "fedmrn-binary"
    point = result["curves"]["100"]["federated"]
    model = build_ntc(synthetic_source().model, 0)
    spec = ModelSpec.from_model(model, local=set(model.prior_names()))
    assert (spec.numel(("weight",)), spec.numel(("param", "buffer"))) == (10752, 276)
    assert point["uplink_payloads"] == 10 and point["uplink_bytes"] == 10 * _fedmrn_payload_bytes(spec) == 24900
    assert point["bytes"] > 0 and "| federated | 100 |" in capsys.readouterr().out


def test_modes_and_determinism():
    src = _tiny_source()
    s = Settings(rounds=2, local_epochs=1, batch_size=16, lr=1e-2)
    a = train(src, "federated", 100.0, s, progress=False)
    b = train(src, "federated", 100.0, s, progress=False)
    for k in a.shared:
        assert torch.equal(a.shared[k], b.shared[k])
    for la, lb in zip(a.local, b.local):
        assert all(torch.equal(la[k], lb[k]) for k in la)
    g = train(src, "global", 100.0, s, progress=False)
    assert any(k.startswith("prior.") for k in g.shared) and not g.local[0]
    loc = train(src, "local", 100.0, s, progress=False)
    assert not loc.shared and loc.uplink_bytes < 100 * loc.uplink_payloads  # headers only: nothing shared
    assert a.uplink_bytes > 10 * loc.uplink_bytes
    with pytest.raises(ConfigError):
        train(src, "everything", 100.0, s, progress=False)


def test_prior_learning_rate_scale_applies_to_the_entropy_model_only():
    src = _tiny_source()
    s = Settings(rounds=1, local_epochs=1, batch_size=16, lr=1e-2, prior_lr_scale=0.0)
    sim, state = build_simulation(src, "federated", 100.0, s)
    from fedcodec.fl.simulation import run_round

    init = sim.runtime.local_init
    first = dict(state.global_params)
    state = run_round(sim, state)
    for c in range(src.num_clients):  # frozen at scale 0: the prior is exactly its initial value
        assert all(torch.equal(v, init[n]) for n, v in sim.runtime.local_tensors(state.client_states[c]).items())
    assert any(not torch.equal(first[k], state.global_params[k]) for k in first)  # the transforms trained
    moving = train(src, "federated", 100.0, Settings(rounds=1, local_epochs=1, batch_size=16, lr=1e-2,
                                                     prior_lr_scale=3.0), progress=False)
    assert any(not torch.equal(moving.local[0][n], init[n]) for n in init)


def test_fit_prior_changes_only_the_entropy_model_and_lowers_the_rate(vector_model):
    model, x = vector_model
    shifted = x * 0.5 + 0.2  # a newcomer with a different latent law
    fitted = fit_prior(model, shifted[:512], epochs=20, batch_size=64, lr=1e-2, seed=0)
    before, after = dict(model.named_parameters()), dict(fitted.named_parameters())
    for n in model.shared_names():
        assert torch.equal(before[n], after[n])
    assert any(not torch.equal(before[n], after[n]) for n in model.prior_names())
    r0, r1 = rd_point(model, shifted[512:]), rd_point(fitted, shifted[512:])
    assert r1["mse"] == r0["mse"] and r1["rate"] < r0["rate"]


def test_cli_compress_decompress(tmp_path, vector_model, capsys):
    model, x = vector_model
    other = build_ntc(VEC, 0)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.prior.biases[-1].add_(0.3)
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("prior.")}
    priors = [{k: v for k, v in m.state_dict().items() if k.startswith("prior.")} for m in (model, other)]
    Trained(VEC, "federated", 100.0, shared, priors, [], 0, 0).save(tmp_path / "codec.safetensors")
    np.save(tmp_path / "x.npy", x[:64].numpy())
    codec = str(tmp_path / "codec.safetensors")
    assert main(["neural", "compress", str(tmp_path / "x.npy"), "-o", str(tmp_path / "x.fcn"),
                 "--codec", codec, "--client", "0"]) == 0
    assert main(["neural", "decompress", str(tmp_path / "x.fcn"), "-o", str(tmp_path / "y.npy"),
                 "--codec", codec, "--client", "0"]) == 0
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (64, 16) and float(np.mean((y - x[:64].numpy()) ** 2)) < float(x.var())
    capsys.readouterr()
    assert main(["neural", "decompress", str(tmp_path / "x.fcn"), "-o", str(tmp_path / "z.npy"),
                 "--codec", codec, "--client", "1"]) == 2
    assert "another entropy model" in capsys.readouterr().err
    assert not (tmp_path / "z.npy").exists()
    assert main(["neural", "compress", str(tmp_path / "x.npy"), "-o", str(tmp_path / "w.fcn"),
                 "--codec", codec, "--client", "7"]) == 2


def test_payload_error_is_the_base():
    assert issubclass(CodecFileError, PayloadError)


def test_sweep_writes_results_bd_rates_and_plot_and_resumes(tmp_path):
    from fedcodec.neural.experiment import run_sweep

    out = tmp_path / "syn"
    kw = dict(rounds=1, local_epochs=1, batch_size=50, finetune_epochs=1)
    result = run_sweep("synthetic", [30.0, 1000.0], ["federated", "global", "local"], out, progress=False, **kw)
    assert set(result["curves"]) == {"30", "1000"}
    for entry in result["curves"].values():
        for name in ("federated", "federated+fit", "global", "global+ft", "local", "newcomer: own prior"):
            p = entry[name]
            clients = 2 if name.startswith("newcomer") else 10  # 1000 test vectors each
            assert p["bytes"] > 0 and p["rate"] == pytest.approx(8 * p["bytes"] / clients / 1000)
    text = (out / "results.md").read_text()
    assert "| local | federated |" in text and (out / "rd.png").stat().st_size > 1000
    stamp = (out / "federated-l30" / "codec.safetensors").stat().st_mtime_ns
    again = run_sweep("synthetic", [30.0, 1000.0], ["federated", "global", "local"], out, progress=False, **kw)
    assert (out / "federated-l30" / "codec.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert again["curves"]["30"]["federated"] == result["curves"]["30"]["federated"]
    with pytest.raises(ConfigError, match="other settings"):
        run_sweep("synthetic", [30.0], ["federated"], out, progress=False, rounds=2, local_epochs=1)


def test_damaged_codec_file_is_refused_before_allocating(tmp_path):
    import json

    from safetensors.torch import save_file

    good = {"model": VEC.__dict__, "mode": "federated", "lmbda": 1.0, "clients": 1, "uplink_bytes": 0,
            "uplink_payloads": 0}
    cases = [{**good, "clients": 10**12}, {k: v for k, v in good.items() if k != "mode"},
             {**good, "model": {"kind": "vector"}}, {**good, "clients": 0}]
    for i, info in enumerate(cases):
        path = tmp_path / f"c{i}.safetensors"
        save_file({"client/0/prior.x": torch.zeros(1)}, str(path),
                  metadata={"format": "fedcodec-neural-1", "info": json.dumps(info)})
        with pytest.raises(ConfigError, match="damaged"):
            Trained.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError):
        Trained.load(tmp_path / "junk.safetensors")
