"""The federated trainer of learned compression: FedAdam, FedSGD+Adam, local Adam, validation, the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcodec.codecs import CodecContext
from fedcodec.errors import ConfigError
from fedcodec.fl import server as server_mod
from fedcodec.fl.simulation import run_round
from fedcodec.neural.federated import Settings, Trained, build_simulation, split_data, train
from fedcodec.neural.models import NTCConfig, NTCTask, build_ntc
from fedcodec.neural.sources import NeuralSource

CFG = NTCConfig("vector", 4, latent=2, hidden=8)


def _source() -> NeuralSource:
    g = torch.Generator().manual_seed(0)
    train_sets = [torch.randn(20, 4, generator=g) * (1 + c) + c for c in range(3)]
    test_sets = [torch.randn(10, 4, generator=g) * (1 + c) + c for c in range(3)]
    return NeuralSource("tiny", train_sets, test_sets, [], [], CFG, (100.0,))


def _settings(**kw) -> Settings:
    base = dict(rounds=2, local_epochs=1, batch_size=8, lr=1e-2, prior_lr_scale=1.0, val_fraction=0.2)
    return Settings(**{**base, **kw})


def _server_receives(monkeypatch) -> list[dict]:
    """A list that fills, as rounds run, with every update the server decodes from a client."""
    seen: list[dict] = []
    real = server_mod.server_round

    def spy(uplink, spec, global_params, rnd, payloads, *a, **kw):
        for client, (data, _) in payloads.items():
            seen.append(uplink.decode(data, CodecContext(spec, client=client, round=rnd, reference=global_params)))
        return real(uplink, spec, global_params, rnd, payloads, *a, **kw)

    monkeypatch.setattr("fedcodec.fl.loop.server_round", spy)
    return seen


def test_fedadam_server_is_adam_on_the_mean_update_and_the_prior_stays_home(monkeypatch):
    src = _source()
    s = _settings(rounds=1, server_lr=0.05, server_tau=1e-3, client_lr=0.1)
    seen = _server_receives(monkeypatch)
    sim, state = build_simulation(src, "federated", 100.0, s)
    assert sim.training.optimizer == "sgd" and sim.training.lr == s.client_lr / 100.0  # SGD on loss / λ
    x0 = dict(state.global_params)
    state = run_round(sim, state)
    assert state.records[-1]["clipped"] == 0  # the server's aggregate is the plain mean
    prior = set(build_ntc(CFG, 0).prior_names())
    assert len(seen) == 3
    for dec in seen:  # the uplink carries the shared transforms only
        assert set(dec) == set(sim.spec.names) and not prior & set(dec)
    sizes = [len(sim.parts[c]) for c in range(3)]
    assert sizes == [16, 16, 16]
    for name in sim.spec.names:  # Reddi et al.'s Adam, first step, no bias correction, v_{-1} = tau²
        d = sum(u[name].double() for u in seen) / 3
        m = 0.1 * d
        v = 0.99 * 1e-6 + 0.01 * d * d
        want = (x0[name].double() + 0.05 * m / (v.sqrt() + 1e-3)).float()
        assert torch.allclose(state.global_params[name], want, rtol=1e-6, atol=1e-7), name
        plain = (x0[name].double() + d).float()  # FedAvg would have added the mean update
        assert not torch.allclose(state.global_params[name], plain)
    for c in range(3):  # each client's prior Adam moments (and no transform state) are in its store
        store = state.client_states[c]
        assert {k.split("/")[-1] for k in store if k.startswith("optim/prior.")} == {"step", "exp_avg", "exp_avg_sq"}
        assert not any(k.startswith("optim/g_") for k in store)


def test_prior_adam_moments_continue_across_rounds():
    src = _source()
    sim, state = build_simulation(src, "federated", 100.0, _settings())
    steps = 2  # 16 training rows in batches of 8
    for r in (1, 2):
        state = run_round(sim, state)
        for c in range(3):
            assert float(state.client_states[c]["optim/prior.biases.0/step"]) == steps * r


def test_prior_trains_under_its_own_adam_at_lr_times_scale():
    """The hook: the task's prior optimizer is Adam at lr · prior_lr_scale, the transforms plain SGD."""
    from fedcodec.fl.client import OptimizerPair, local_optimizer

    src = _source()
    sim, _ = build_simulation(src, "federated", 100.0, _settings(prior_lr_scale=3.0, client_lr=20.0))
    params = dict(sim.runtime.model.named_parameters())
    opt = local_optimizer(sim.runtime.task, sim.training, params, {}, None)
    assert isinstance(opt, OptimizerPair) and opt.latent is None and len(opt.extra) == 1
    assert isinstance(opt.main, torch.optim.SGD) and isinstance(opt.extra[0], torch.optim.Adam)
    assert opt.extra[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 3.0, rel=1e-12)
    assert opt.main.param_groups[0]["lr"] == 20.0 / 100.0
    names = {id(p): n for n, p in params.items()}
    assert {names[id(p)] for g in opt.extra[0].param_groups for p in g["params"]} == \
        set(sim.runtime.model.prior_names())


def _count_losses(monkeypatch, src):
    rows = {tuple(r.tolist()): c for c, x in enumerate(src.train) for r in x}
    counts = [0, 0, 0]
    real = NTCTask.loss

    def counting(self, model, x, y, gen):
        counts[rows[tuple(x[0].tolist())]] += 1
        return real(self, model, x, y, gen)

    monkeypatch.setattr(NTCTask, "loss", counting)
    return counts


@pytest.mark.parametrize("mode,trainer", [("federated", "fedadam"), ("federated", "fedsgd-adam"),
                                          ("federated", "local-adam"), ("global", "fedadam"),
                                          ("global", "fedsgd-adam"), ("local", "fedadam"), ("oracle", "fedadam")])
def test_every_mode_takes_the_same_gradient_evaluations_per_client(monkeypatch, mode, trainer):
    src = _source()
    counts = _count_losses(monkeypatch, src)
    t = train(src, mode, 100.0, _settings(rounds=3, local_epochs=2, trainer=trainer), progress=False)
    assert counts == [3 * 2 * 2] * 3  # rounds x epochs x (16 rows / batch 8)
    if trainer == "fedsgd-adam" and mode != "local":
        assert len(t.records) == 12  # one step per engine round


def test_validation_split_is_disjoint_deterministic_and_seeded():
    src = _source()
    tr, va = split_data(src, _settings())
    tr2, va2 = split_data(src, _settings())
    other, _ = split_data(src, _settings(seed=1))
    for c in range(3):
        assert (len(tr[c]), len(va[c])) == (16, 4)
        assert torch.equal(tr[c], tr2[c]) and torch.equal(va[c], va2[c])
        got = {tuple(r.tolist()) for r in tr[c]} | {tuple(r.tolist()) for r in va[c]}
        assert got == {tuple(r.tolist()) for r in src.train[c]}  # disjoint and complete
    assert any(not torch.equal(tr[c], other[c]) for c in range(3))
    tr0, va0 = split_data(src, _settings(val_fraction=0.0))
    assert all(torch.equal(a, b) for a, b in zip(tr0, src.train)) and all(len(v) == 0 for v in va0)


def test_best_round_is_the_argmin_of_the_mean_validation_loss_and_its_tensors_are_returned():
    src = _source()
    # a server step far too large: the validation loss wanders, the best round is not the last
    s = _settings(rounds=8, val_every=1, server_lr=0.5, trainer="fedadam")
    t = train(src, "federated", 100.0, s, progress=False)
    vals = [(r["round"], r["val_loss"]) for r in t.records if "val_loss" in r]
    assert [r for r, _ in vals] == list(range(1, 9))
    for r in t.records:
        if "val_loss" in r:
            assert r["val_loss"] == pytest.approx(float(np.mean(r["val_client_loss"])), rel=1e-12)
    best = min(vals, key=lambda v: v[1])[0]
    assert t.best_round == best
    # the returned tensors are that round's: a run of exactly that many rounds ends on them
    short = train(src, "federated", 100.0, _settings(rounds=best, val_every=1, server_lr=0.5, val_fraction=0.2),
                  progress=False)
    for k, v in t.shared.items():
        assert torch.equal(v, short.shared[k]) if best == short.best_round else True
    if short.best_round == best:
        assert all(torch.equal(a[k], b[k]) for a, b in zip(t.local, short.local) for k in a)


def test_best_round_without_validation_is_the_last_and_local_mode_keeps_one_per_client():
    src = _source()
    t = train(src, "federated", 100.0, _settings(rounds=2, val_fraction=0.0), progress=False)
    assert t.best_round == 2 and not any("val_loss" in r for r in t.records)
    loc = train(src, "local", 100.0, _settings(rounds=4, val_every=1, lr=0.3), progress=False)
    assert isinstance(loc.best_round, list) and len(loc.best_round) == 3
    for c in range(3):
        per = [(r["round"], r["val_client_loss"][c]) for r in loc.records if "val_loss" in r]
        assert loc.best_round[c] == min(per, key=lambda v: v[1])[0]


def test_oracle_trains_saves_and_loads_with_personal_priors(tmp_path):
    src = _source()
    t = train(src, "oracle", 100.0, _settings(rounds=3, val_every=1), progress=False)
    prior = set(build_ntc(CFG, 0).prior_names())
    assert not prior & set(t.shared) and all(set(loc) == prior for loc in t.local)
    assert not torch.equal(t.local[0]["prior.biases.0"], t.local[1]["prior.biases.0"])
    assert t.uplink_bytes == 0 and 1 <= t.best_round <= 3
    vals = [r["val_loss"] for r in t.records]
    assert t.best_round == 1 + int(np.argmin(vals))
    assert "test_loss" in t.records[-1]
    t.save(tmp_path / "codec.safetensors")
    back = Trained.load(tmp_path / "codec.safetensors")
    assert back.mode == "oracle" and back.best_round == t.best_round
    for c in range(3):
        a, b = t.model(c).state_dict(), back.model(c).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_accepts_files_without_best_round_and_refuses_a_bad_one(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from fedcodec.errors import ConfigError

    src = _source()
    t = train(src, "local", 100.0, _settings(rounds=1), progress=False)
    path = tmp_path / "c.safetensors"
    t.save(path)
    assert Trained.load(path).best_round == [1, 1, 1]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["info"])
    tensors = load_file(str(path))
    for bad, ok in ((None, True), ("2", False), ([1, 2], False), (-1, False), (True, False)):
        meta = {k: v for k, v in info.items() if k != "best_round"}
        if bad is not None:
            meta["best_round"] = bad
        save_file(tensors, str(path), metadata={"format": "fedcodec-neural-1", "info": json.dumps(meta)})
        if ok:
            assert Trained.load(path).best_round is None
        else:
            with pytest.raises(ConfigError, match="best_round"):
                Trained.load(path)


@pytest.mark.parametrize("trainer, engine_warmup", [("fedadam", 5), ("fedsgd-adam", 10)])
def test_server_warmup_reaches_the_engine_in_its_rounds(trainer, engine_warmup):
    """``server_warmup`` counts the trainer's rounds; fedsgd-adam's engine rounds are its gradient
    steps (2 per round here: 16 rows in batches of 8), so its ramp is twice as many engine rounds."""
    sim, _ = build_simulation(_source(), "federated", 100.0, _settings(trainer=trainer, server_warmup=5))
    assert sim.cfg.server_warmup == engine_warmup
    assert sim.server_optimizer.options.warmup == engine_warmup
    sim, _ = build_simulation(_source(), "federated", 100.0, _settings(trainer=trainer))
    assert sim.cfg.server_warmup == 0
    with pytest.raises(ConfigError, match="server_warmup must be an integer >= 0"):
        _settings(server_warmup=-1).check()


def test_server_warmup_slows_the_first_round():
    """Round 1 of a 4-round ramp moves the shared transforms a quarter as far as without one (Adam's
    first step is lr·m/(√v+τ), linear in lr)."""
    src = _source()
    moves = []
    for w in (0, 4):
        sim, state = build_simulation(src, "federated", 100.0, _settings(rounds=1, server_lr=0.05, server_warmup=w))
        x0 = {k: v.clone() for k, v in state.global_params.items()}
        state = run_round(sim, state)
        moves.append({k: (state.global_params[k].double() - x0[k].double()) for k in sim.spec.names})
    for k in moves[0]:
        torch.testing.assert_close(moves[1][k], 0.25 * moves[0][k], rtol=0, atol=1e-6)
    assert any(moves[0][k].abs().max() > 1e-3 for k in moves[0])


def test_results_written_before_an_option_existed_still_resume():
    """A results file from before ``server_warmup`` existed reads as the option's default."""
    current = Settings().__dict__
    old = {k: v for k, v in current.items() if k != "server_warmup"}
    assert Settings.completed(old) == current
    assert Settings.completed({**old, "server_warmup": 7})["server_warmup"] == 7
    assert Settings.completed(current) == current


def test_output_bias_names_are_the_synthesis_last_layers():
    from fedcodec.neural.models import output_bias_name

    for cfg, want in ((CFG, "g_s.4.bias"), (NTCConfig("image", 3, latent=4, hidden=8, downs=2), "g_s.2.bias"),
                      (NTCConfig("image", 1, latent=4, hidden=8, downs=3), "g_s.4.bias")):
        assert output_bias_name(cfg) == want
        last = list(build_ntc(cfg, 0).g_s.named_parameters())[-1]
        assert f"g_s.{last[0]}" == want and last[1].shape == (cfg.dim,)


def test_federated_bias_keeps_the_output_bias_home_and_in_the_codec_file(monkeypatch, tmp_path):
    """federated-bias: the synthesis's output bias trains on each client like its entropy model, is
    never in what the server receives, differs per client, and travels in the codec file per client."""
    src = _source()
    seen = _server_receives(monkeypatch)
    t = train(src, "federated-bias", 100.0, _settings(rounds=3, val_every=1), progress=False)
    personal = set(build_ntc(CFG, 0).prior_names()) | {"g_s.4.bias"}
    assert len(seen) == 9
    for dec in seen:
        assert "g_s.4.bias" not in dec and not personal & set(dec) and "g_s.4.weight" in dec
    assert "g_s.4.bias" not in t.shared and all(set(loc) == personal for loc in t.local)
    init = build_ntc(CFG, 0).state_dict()["g_s.4.bias"]
    biases = [loc["g_s.4.bias"] for loc in t.local]
    assert all(not torch.equal(b, init) for b in biases)  # trained on each client...
    assert not torch.equal(biases[0], biases[1]) and not torch.equal(biases[1], biases[2])  # ...each its own
    # the clients' data means are 0, 1, 2 (see _source): each bias moved toward its client's
    assert float(biases[2].mean() - biases[0].mean()) > 0
    t.save(tmp_path / "codec.safetensors")
    back = Trained.load(tmp_path / "codec.safetensors")
    assert back.mode == "federated-bias"
    for c in range(3):
        a, b = t.model(c).state_dict(), back.model(c).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a federated codec's file (one shared output bias) is not a federated-bias one, and vice versa
    from safetensors.torch import load_file, save_file
    import json as _json

    from fedcodec.errors import CodecModelError
    from fedcodec.safetensors_header import read_header

    meta = read_header(tmp_path / "codec.safetensors", lambda m: ValueError(m), max_header=1 << 20,
                       dtypes=("F32",)).metadata
    info = _json.loads(meta["info"])
    save_file(load_file(str(tmp_path / "codec.safetensors")), str(tmp_path / "relabel.safetensors"),
              metadata={**meta, "info": _json.dumps({**info, "mode": "federated"})})
    with pytest.raises(CodecModelError, match="unexpected: client/0/g_s.4.bias"):
        Trained.load(tmp_path / "relabel.safetensors")
