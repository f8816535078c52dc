"""The ``device`` option: resolution, refusal of devices this machine lacks, what stays on the CPU,
and that a run on ``cpu`` is the run fedcodec always made (the bit-exact CPU promise)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from fedcodec.cli import main
from fedcodec.codecs.fedbat import FedBATOptions, StochasticBinaryTraining
from fedcodec.codecs.fedmrn import MaskedNoiseTraining
from fedcodec.codecs.fedpm import BernoulliMaskTraining
from fedcodec.config import Config, build_config
from fedcodec.data import make_synthetic_images
from fedcodec.errors import ConfigError
from fedcodec.fl import loop
from fedcodec.fl.device import resolve_device, to_cpu, to_device
from fedcodec.fl.simulation import run_round, setup
from helpers import tiny_spec

SOURCE = make_synthetic_images(400, 200, seed=0)
NO_CUDA = not torch.cuda.is_available()
NO_MPS = not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())

# the pinned numbers below were made with 2 torch threads (conftest.two_torch_threads)
pytestmark = pytest.mark.usefixtures("two_torch_threads")


def small(method: str = "fedmrn-binary", **kw) -> Config:
    base = dict(method=method, num_clients=8, clients_per_round=3, rounds=2, local_epochs=1, batch_size=16,
                seed=5)
    return Config(**{**base, **kw}).validate()


def digest(state) -> str:
    h = hashlib.sha256()
    for name in sorted(state.global_params):
        h.update(state.global_params[name].numpy().tobytes())
    return h.hexdigest()[:16]


def run(cfg: Config):
    sim, state = setup(cfg, SOURCE)
    for _ in range(cfg.rounds):
        state = run_round(sim, state)
    return sim, state


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if not NO_CUDA else ("mps" if not NO_MPS else "cpu")
    assert resolve_device("auto").type == expected
    assert Config().device == "cpu"  # the default keeps every run on the CPU, bit-exact


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_cuda_on_a_machine_without_one_is_a_config_error_that_says_how_to_fix_it(capsys):
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    text = str(err.value)
    assert text.startswith("device 'cuda' is not available: ")
    assert "--device cpu" in text and "--device auto" in text and "CUDA build of PyTorch" in text
    with pytest.raises(ConfigError, match="device 'cuda:1' is not available"):
        build_config("quick", overrides={"device": "cuda:1"})  # fails in validate(), before any data loads
    assert main(["run", "--device", "cuda", "--rounds", "1", "--no-progress"]) == 2
    assert "fedcodec: error: device 'cuda' is not available" in capsys.readouterr().err


@pytest.mark.skipif(not NO_MPS, reason="this machine has MPS")
def test_mps_without_apple_silicon_is_a_config_error():
    with pytest.raises(ConfigError, match=r"device 'mps' is not available: MPS needs Apple silicon.*--device cpu"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["gpu", "tpu:0", "", "cuda:x"])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(ConfigError, match="device expects one of cpu, cuda, mps, auto"):
        resolve_device(name)


def test_moves_to_the_cpu_copy_nothing():
    t = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    assert all(to_device(t, torch.device("cpu"))[k] is t[k] for k in t)
    assert all(to_cpu(t)[k] is t[k] for k in t)


def test_a_cpu_run_is_the_default_run_bit_for_bit_and_copies_no_data(monkeypatch):
    """``device = "cpu"`` (and ``auto`` on a machine without a GPU) is exactly the run fedcodec made
    before the option existed: same model bits, same records. Pinned: the digest of the final model
    (the code before the option, commit 90818cf, gave 42b47e8271edcd86 with FedMRN's noise generator 1;
    this value is generator 2's, with the CPU path unchanged)."""
    encoded = []
    real = loop.client_fit

    def spy(rt, broadcast, x, y, cfg, rnd, client, **kw):
        payload, info = real(rt, broadcast, x, y, cfg, rnd, client, **kw)
        encoded.append((x.device.type, rt.device.type))
        return payload, info

    monkeypatch.setattr(loop, "client_fit", spy)
    sim, default = run(small())
    assert sim.source.train_x is SOURCE.train_x and sim.runtime.task.test_x is SOURCE.test_x  # no copy
    assert set(encoded) == {("cpu", "cpu")}
    _, cpu = run(small(device="cpu"))
    strip = lambda recs: [{k: v for k, v in r.items() if "seconds" not in k} for r in recs]  # noqa: E731
    assert strip(cpu.records) == strip(default.records)
    assert digest(cpu) == digest(default) == "264fbaff76b9370b"
    if NO_CUDA and NO_MPS:
        _, auto = run(small(device="auto"))
        assert digest(auto) == digest(default)


def parametrizations():
    spec = tiny_spec()
    weights = [t for t in spec.tensors if t.role == "weight"]
    noise = {t.name: torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) * 0.02 - 0.01
             for t in weights}
    base = {t.name: torch.full(t.shape, 0.005) for t in weights}
    w0 = {t.name: torch.full(t.shape, 0.01) for t in weights}
    return {
        "fedmrn": lambda gen: MaskedNoiseTraining(weights, noise, "binary", True, True, gen),
        "fedpm": lambda gen: BernoulliMaskTraining(weights, w0, base, gen),
        "fedbat": lambda gen: StochasticBinaryTraining(weights, FedBATOptions().step, gen),
    }


@pytest.mark.parametrize("method", ["fedmrn", "fedpm", "fedbat"])
def test_a_parametrization_moves_its_tensors_and_draws_the_same_stream_on_any_device(method):
    """``to(device)`` moves every frozen tensor; draws come from the CPU generator and follow. The
    ``meta`` device stands in for a GPU here: nothing may be left on the CPU, and the generator must
    advance exactly as it does on the CPU."""
    build = parametrizations()[method]
    gen_cpu, gen_meta = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    on_cpu, on_meta = build(gen_cpu), build(gen_meta).to(torch.device("meta"))
    assert on_meta.device.type == "meta" and on_cpu.device.type == "cpu"
    for p in (on_cpu, on_meta):
        latent = p.init()
        deltas = p.deltas(latent, 0.5)
        final = p.finish(latent)
        assert {t.device.type for t in [*latent.values(), *deltas.values(), *final.values()]} == {p.device.type}
    assert torch.equal(gen_cpu.get_state(), gen_meta.get_state())  # the same number of draws
    assert on_cpu.to(torch.device("cpu")) is on_cpu

