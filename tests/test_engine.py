import json
import math

import numpy as np
import pytest
import torch

from fedcodec.cli import main
from fedcodec.codecs import wire
from fedcodec.config import Config, build_config
from fedcodec.data import make_synthetic_images
from fedcodec.data.fashion_mnist import FILES
from fedcodec.data.idx import write_idx
from fedcodec.errors import ConfigError
from fedcodec.fl import loop
from fedcodec.fl import rng
from fedcodec.fl.server import aggregate, server_round
from fedcodec.fl.robust import Defense
from fedcodec.fl.simulation import run_round, setup

SOURCE = make_synthetic_images(400, 200, seed=0)


def small_config(method="fedavg", **kw) -> Config:
    base = dict(method=method, num_clients=8, clients_per_round=4, rounds=2, local_epochs=1, batch_size=16,
                seed=5)
    return Config(**{**base, **kw}).validate()


def run(cfg: Config):
    sim, state = setup(cfg, SOURCE)
    for _ in range(cfg.rounds):
        state = run_round(sim, state)
    return sim, state


@pytest.fixture
def recorded(monkeypatch):
    """Wrap the client function and record every payload it returns."""
    sent = []
    real = loop.client_fit

    def spy(rt, broadcast, x, y, cfg, rnd, client, **kw):
        payload, info = real(rt, broadcast, x, y, cfg, rnd, client, **kw)
        sent.append((rnd, client, len(broadcast), payload))
        return payload, info

    monkeypatch.setattr(loop, "client_fit", spy)
    return sent


@pytest.mark.parametrize("method", ["fedavg", "fedmrn-binary"])
def test_ledger_equals_sum_of_payload_lengths(method, recorded):
    sim, state = run(small_config(method))
    up = [e for e in state.ledger.entries if e.direction == "up"]
    down = [e for e in state.ledger.entries if e.direction == "down"]
    assert [(e.round, e.client, e.nbytes) for e in up] == [(r, c, len(p)) for r, c, _, p in recorded]
    assert [(e.round, e.client, e.nbytes) for e in down] == [(r, c, n) for r, c, n, _ in recorded]
    for rec in state.records:
        assert rec["uplink_bytes"] == sum(len(p) for r, _, _, p in recorded if r == rec["round"])
    if method == "fedmrn-binary":
        spec = sim.spec
        expected = (wire.envelope_overhead("fedmrn") + 14 + math.ceil(spec.numel(("weight",)) / 8)
                    + 4 * spec.numel(("param", "buffer")))
        assert {e.nbytes for e in up} == {expected}


@pytest.mark.parametrize("method", ["fedavg", "fedmrn-signed"])
def test_same_seed_gives_identical_runs(method):
    _, a = run(small_config(method))
    _, b = run(small_config(method))
    strip = lambda recs: [{k: v for k, v in r.items() if "seconds" not in k} for r in recs]  # noqa: E731
    assert strip(a.records) == strip(b.records)
    assert all(torch.equal(a.global_params[k], b.global_params[k]) for k in a.global_params)
    _, c = run(small_config(method, seed=6))
    assert not all(torch.equal(a.global_params[k], c.global_params[k]) for k in a.global_params)


def test_malformed_payload_is_rejected_and_round_goes_on(monkeypatch, caplog):
    real = loop.client_fit
    victims = []

    def corrupting(rt, broadcast, x, y, cfg, rnd, client, **kw):
        payload, info = real(rt, broadcast, x, y, cfg, rnd, client, **kw)
        if not victims:  # the first client of the round sends a truncated payload
            victims.append(client)
            payload = payload[:-100]
        return payload, info

    cfg = small_config("fedmrn-binary", rounds=1)
    sim, state = setup(cfg, SOURCE)
    before = {k: v.clone() for k, v in state.global_params.items()}
    monkeypatch.setattr(loop, "client_fit", corrupting)
    captured = {}
    real_server = loop.server_round

    def capture(uplink, spec, global_params, rnd, payloads, *args, **kwargs):
        captured.update(payloads)
        return real_server(uplink, spec, global_params, rnd, payloads, *args, **kwargs)

    monkeypatch.setattr(loop, "server_round", capture)
    state = run_round(sim, state)
    rec = state.records[0]
    assert rec["rejected"] == 1 and rec["accepted"] == cfg.clients_per_round - 1
    assert f"client {victims[0]}: rejected payload" in caplog.text
    # the new model is exactly the aggregate of the good clients alone
    good = {c: p for c, p in captured.items() if c != victims[0]}
    expected, _ = real_server(sim.runtime.uplink, sim.spec, before, 1, good,
                              seed_of=lambda c: rng.codec_seed(sim.runtime.run_seed, 1, c))
    assert all(torch.equal(state.global_params[k], expected[k]) for k in expected)
    assert all(torch.isfinite(v).all() for v in state.global_params.values())


def test_min_clients_keeps_model_when_too_few_decode():
    cfg = small_config(rounds=1)
    sim, state = setup(cfg, SOURCE)
    params, outcome = server_round(sim.runtime.uplink, sim.spec, state.global_params, 1,
                                   {0: (b"junk", 1.0), 1: (b"", 1.0)}, min_clients=1)
    assert params is state.global_params and set(outcome.rejected) == {0, 1}


def test_aggregate_is_example_weighted():
    cfg = small_config(rounds=1)
    sim, state = setup(cfg, SOURCE)
    g = state.global_params
    ones = {k: torch.ones_like(v) for k, v in g.items()}
    threes = {k: 3 * torch.ones_like(v) for k, v in g.items()}
    new = aggregate(sim.spec, g, [(1, 3.0, ones), (0, 1.0, threes)])
    for k in g:
        assert torch.allclose(new[k], g[k] + 1.5)


@pytest.mark.parametrize("method", ["fedavg", "fedmrn-binary"])
def test_training_learns_on_fixture_data(method):
    cfg = small_config(method, rounds=4, local_epochs=2, batch_size=10, num_clients=4, clients_per_round=4)
    _, state = run(cfg)
    assert state.records[-1]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert state.records[-1]["train_loss"] < state.records[0]["train_loss"]


def _write_fixture(root):
    """A learnable Fashion-MNIST-shaped IDX fixture: class-dependent bright square plus noise."""
    rng = np.random.default_rng(0)
    for images, labels, n in ((FILES[0], FILES[1], 300), (FILES[2], FILES[3], 100)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 2 * c:2 * c + 8, 2 * c:2 * c + 8] = 250
        write_idx(root / images, x)
        write_idx(root / labels, y.astype(np.uint8))


def test_cli_end_to_end_on_idx_fixture(tmp_path, capsys):
    data = tmp_path / "fmnist"
    data.mkdir()
    _write_fixture(data)
    code = main(["run", "--data-dir", str(data), "--set", "allow_subset=true", "--rounds", "2",
                 "--clients", "6", "--per-round", "3", "--local-epochs", "1", "--method", "fedavg,fedmrn-binary",
                 "--out", str(tmp_path / "out"), "--name", "t", "--no-progress"])
    assert code == 0
    root = tmp_path / "out" / "t"
    for f in ("results.md", "plot.png", "fedavg/metrics.json", "fedavg/metrics.csv", "fedmrn-binary/ledger.csv"):
        assert (root / f).exists(), f
    fedavg = json.loads((root / "fedavg" / "metrics.json").read_text())
    mrn = json.loads((root / "fedmrn-binary" / "metrics.json").read_text())
    assert len(fedavg["rounds"]) == 2
    ratio = fedavg["summary"]["uplink_bytes_per_client_round"] / mrn["summary"]["uplink_bytes_per_client_round"]
    assert 25 < ratio < 32  # CNN4: 1 bit per kernel weight + fp32 BatchNorm vs 32 bits everywhere
    out = capsys.readouterr().out
    assert "| fedmrn-binary |" in out and "ratio vs FedAvg" in out
    # `fedcodec report` rebuilds the combined table and plot from the method folders alone
    table = (root / "results.md").read_text()
    (root / "results.md").unlink()
    (root / "plot.png").unlink()
    assert main(["report", str(root)]) == 0
    assert (root / "results.md").read_text() == table and (root / "plot.png").stat().st_size > 10_000
    assert main(["report", str(tmp_path)]) == 2  # not a run folder: a clear error


def test_cli_reports_config_errors(capsys, tmp_path):
    assert main(["run", "--method", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["run", "--set", "colour=blue", "--out", str(tmp_path)]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_config_layers_and_validation(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 7\nmethod = "fedmrn-signed"\n[codec_options]\nnoise = "gaussian"\n')
    cfg = build_config("bench", f, {"seed": "3"})
    assert (cfg.rounds, cfg.local_epochs, cfg.seed, cfg.client_lr) == (7, 2, 3, 0.1)
    assert cfg.uplink_options == {"mask": "signed", "alpha": 0.005, "noise": "gaussian"}
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_config("quick", overrides={"clients_per_round": 1000})
    with pytest.raises(ConfigError, match="preset"):
        build_config("huge")
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("rounds = = 3")
        build_config(None, tmp_path / "bad.toml")


def test_finite_but_huge_updates_cannot_overflow_the_model():
    """Each value decodes as finite, yet applying it twice would overflow float32 (found by fuzzing)."""
    from fedcodec.codecs import CodecContext, build_uplink
    from helpers import tiny_spec

    spec, codec = tiny_spec(), build_uplink("fp32")
    top = torch.finfo(torch.float32).max
    big = codec.encode({t.name: torch.full(t.shape, top) for t in spec.tensors}, CodecContext(spec, 0, 0))
    ok = codec.encode({t.name: torch.ones(t.shape) for t in spec.tensors}, CodecContext(spec, 0, 0))
    g = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    g, first = server_round(codec, spec, g, 1, {0: (big, 1.0), 1: (ok, 1.0)})
    assert first.accepted == [0, 1]  # in range once: only a norm bound can stop it
    g, second = server_round(codec, spec, g, 2, {0: (big, 1.0), 1: (ok, 1.0)})
    assert "overflow" in second.rejected[0] and second.accepted == [1]
    assert all(torch.isfinite(v).all() for v in g.values())
    _, bounded = server_round(codec, spec, {t.name: torch.zeros(t.shape) for t in spec.tensors}, 1,
                              {0: (big, 1.0)}, defense=Defense(max_update_norm=10.0))
    assert "(norm)" in bounded.rejected[0]


def test_kept_optimizer_state_stays_on_the_client_and_survives_a_checkpoint(tmp_path, recorded):
    from fedcodec.fl import checkpoint

    cfg = small_config(optimizer="adam", lr=1e-3, keep_optimizer_state=True, clients_per_round=8, rounds=3)
    sim, state = run(cfg)
    steps = math.ceil(len(sim.parts[0]) / cfg.batch_size)  # one epoch a round
    store = state.client_states[0]
    kept = {k for k in store if k.startswith("optim/")}
    assert kept == {f"optim/{t.name}/{key}" for t in sim.spec.tensors if t.role != "buffer"
                    for key in ("step", "exp_avg", "exp_avg_sq")}
    assert int(store[f"optim/{sim.spec.tensors[0].name}/step"]) == 3 * steps  # one Adam run across rounds
    # never sent: the uplink payloads are exactly as long as those of a run that starts afresh each round
    kept_sizes = [len(p) for *_, p in recorded]
    recorded.clear()
    _, fresh = run(small_config(optimizer="adam", lr=1e-3, clients_per_round=8, rounds=3))
    assert [len(p) for *_, p in recorded] == kept_sizes
    assert not any(k.startswith("optim/") for s in fresh.client_states.values() for k in s)
    assert not all(torch.equal(state.global_params[k], fresh.global_params[k]) for k in fresh.global_params)
    # resume after round 2 from a checkpoint: bit-identical to the uninterrupted run
    sim2, part = setup(cfg, SOURCE)
    for _ in range(2):
        part = run_round(sim2, part)
    checkpoint.save(tmp_path / "c.safetensors", cfg.to_dict(), part)
    back = checkpoint.load(tmp_path / "c.safetensors", cfg.to_dict())
    back = run_round(sim2, back)
    assert all(torch.equal(back.global_params[k], state.global_params[k]) for k in state.global_params)


def test_kept_optimizer_state_refuses_a_changed_model():
    from fedcodec.fl.client import OPTIM, restore_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p])
    with pytest.raises(ConfigError, match="model changed"):
        restore_optimizer(opt, {"w": p}, {f"{OPTIM}w/exp_avg": torch.zeros(4)})


def test_kept_optimizer_state_under_a_parametrization_is_that_of_the_directly_trained_tensors():
    """FedMRN trains latents for the kernels (reset every round: their state is not kept) and the
    other tensors directly: those keep one Adam run across rounds, in the client's store."""
    cfg = small_config("fedmrn-binary", optimizer="adam", lr=1e-3, keep_optimizer_state=True, num_clients=4,
                       clients_per_round=4, rounds=2)
    sim, state = run(cfg)
    steps = math.ceil(len(sim.parts[0]) / cfg.batch_size)
    store = state.client_states[0]
    direct = [t.name for t in sim.spec.tensors if t.role == "param"]
    assert direct and any(t.role == "weight" for t in sim.spec.tensors)
    assert {k for k in store if k.startswith("optim/")} == {f"optim/{n}/{key}" for n in direct
                                                            for key in ("step", "exp_avg", "exp_avg_sq")}
    assert int(store[f"optim/{direct[0]}/step"]) == 2 * steps  # restored in round 2, not started afresh
