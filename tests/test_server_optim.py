"""Server optimizers (fedcodec.fl.server_opt): FedAvg, FedAvgM, FedAdam, FedYogi.

The references here are written from the papers' formulas in numpy (or plain Python for the pinned
values), independently of the code under test; Flower's own strategies are a second reference.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcodec.codecs.algorithms import weighted_mean
from fedcodec.codecs.base import ModelSpec, TensorSpec
from fedcodec.config import Config, build_config, parse_assignments
from fedcodec.errors import ConfigError
from fedcodec.fl.server import aggregate
from fedcodec.fl.server_opt import KINDS, ServerOptimizer, ServerOptimizerConfig

SPEC = ModelSpec((
    TensorSpec("conv.weight", (3, 2, 2, 2), "weight"),
    TensorSpec("bn.weight", (3,), "param"),
    TensorSpec("bn.bias", (3,), "param"),
    TensorSpec("fc.weight", (4, 3), "weight"),
    TensorSpec("bn.running_mean", (3,), "buffer"),
    TensorSpec("bn.running_var", (3,), "buffer"),
))
TRAINABLE = [t for t in SPEC.tensors if t.role != "buffer"]

# one option set per kind, away from the defaults so that every option is exercised
OPTIONS = {
    "sgd": ServerOptimizerConfig("sgd", lr=0.7),
    "momentum": ServerOptimizerConfig("momentum", lr=0.3, momentum=0.8),
    "adam": ServerOptimizerConfig("adam", lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2),
    "yogi": ServerOptimizerConfig("yogi", lr=0.02, beta1=0.85, beta2=0.9, tau=3e-3, initial_v=1e-4),
}


def model(spec: ModelSpec = SPEC, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(t.shape, generator=g) for t in spec.tensors}


def deltas(spec: ModelSpec = SPEC, rounds: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Aggregates of varied scale (1e-4 .. 1), some exact zeros, float64 like the engine's."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(rounds):
        d = {}
        for t in spec.tensors:
            scale = 10.0 ** -torch.randint(0, 5, t.shape, generator=g).double()
            v = torch.randn(t.shape, generator=g, dtype=torch.float64) * scale
            v[torch.rand(t.shape, generator=g) < 0.1] = 0.0
            d[t.name] = v
        out.append(d)
    return out


def run(opt: ServerOptimizer, params, steps, state=None):
    state = {} if state is None else state
    for d in steps:
        params, state = opt.step(params, d, state)
    return params, state


# --- an independent reference, straight from the papers ------------------------------------------

def reference(o: ServerOptimizerConfig, x0: np.ndarray, steps: list[np.ndarray]):
    """FedAvg / FedAvgM (Hsu et al. 2019) / FedAdam, FedYogi (Reddi et al. 2021, Algorithm 2) on one
    trainable array: float64 arithmetic, the model rounded to float32 after each round.
    Returns the model after each round and the final (m, v)."""
    eta = o.lr
    x = x0.astype(np.float32)
    m = np.zeros(x.shape)
    v = np.full(x.shape, o.tau ** 2 if o.initial_v is None else o.initial_v)
    xs = []
    for delta in steps:
        if o.kind == "sgd":
            new = x.astype(np.float64) + eta * delta
        elif o.kind == "momentum":
            m = o.momentum * m + delta
            new = x.astype(np.float64) + eta * m
        else:
            m = o.beta1 * m + (1.0 - o.beta1) * delta
            if o.kind == "adam":
                v = o.beta2 * v + (1.0 - o.beta2) * np.square(delta)
            else:
                v = v - (1.0 - o.beta2) * np.square(delta) * np.sign(v - np.square(delta))
            new = x.astype(np.float64) + eta * m / (np.sqrt(v) + o.tau)
        x = new.astype(np.float32)
        xs.append(x)
    return xs, m, v


@pytest.mark.parametrize("kind", KINDS)
def test_each_optimizer_matches_the_papers_formulas(kind):
    o = OPTIONS[kind]
    opt = ServerOptimizer(SPEC, o)
    params, state = model(), {}
    steps = deltas()
    refs = {t.name: reference(o, params[t.name].numpy(), [d[t.name].numpy() for d in steps]) for t in TRAINABLE}
    for r, d in enumerate(steps):
        params, state = opt.step(params, d, state)
        for t in TRAINABLE:
            assert params[t.name].dtype == torch.float32
            np.testing.assert_allclose(params[t.name].numpy(), refs[t.name][0][r], rtol=3e-7, atol=0)
    for t in TRAINABLE:
        _, m, v = refs[t.name]
        if kind in ("momentum", "adam", "yogi"):
            np.testing.assert_allclose(state[f"m/{t.name}"].numpy(), m, rtol=1e-12, atol=0)
        if kind in ("adam", "yogi"):
            np.testing.assert_allclose(state[f"v/{t.name}"].numpy(), v, rtol=1e-12, atol=0)


# --- pinned values --------------------------------------------------------------------------------

PIN_SPEC = ModelSpec((TensorSpec("w", (4,), "weight"),))
PIN_X0 = [1.0, -2.0, 0.5, 0.0]
PIN_DELTAS = [[0.5, 0.25, -0.125, 1.0], [-0.25, 0.5, 0.0, 0.0625], [0.125, -0.0625, 0.25, 0.03125]]
# after three rounds. sgd and momentum by hand (exact in binary):
#   sgd lr 0.5: x0 + 0.5 * (sum of the deltas)
#   momentum lr 0.5, beta 0.5: m = [0.5, .25, -.125, 1] -> [0, .625, -.0625, .5625] -> [.125, .25, .21875, .3125]
# adam (lr 0.1) and yogi (lr 0.01) at the defaults (beta1 0.9, beta2 0.99, tau 1e-3, v_-1 = tau^2),
# computed once with plain Python floats, each round's model rounded to float32
PINNED = {
    "sgd": (ServerOptimizerConfig("sgd", lr=0.5), [1.1875, -1.65625, 0.5625, 0.546875]),
    "momentum": (ServerOptimizerConfig("momentum", lr=0.5, momentum=0.5), [1.3125, -1.4375, 0.515625, 0.9375]),
    "adam": (ServerOptimizerConfig("adam"),
             [1.1860703229904175, -1.6727555990219116, 0.37564849853515625, 0.2841131091117859]),
    "yogi": (ServerOptimizerConfig("yogi"),
             [1.018548607826233, -1.967348575592041, 0.4875941276550293, 0.028355466201901436]),
}


@pytest.mark.parametrize("kind", KINDS)
def test_pinned_values(kind):
    o, want = PINNED[kind]
    steps = [{"w": torch.tensor(d, dtype=torch.float64)} for d in PIN_DELTAS]
    params, state = run(ServerOptimizer(PIN_SPEC, o), {"w": torch.tensor(PIN_X0)}, steps)
    torch.testing.assert_close(params["w"], torch.tensor(want, dtype=torch.float32), rtol=3e-7, atol=0)
    if kind == "momentum":
        assert state["m/w"].tolist() == [0.125, 0.25, 0.21875, 0.3125]
    if kind == "adam":  # round 1 by hand: m = 0.1 * 0.5, v = 0.99 * 1e-6 + 0.01 * 0.25
        first, _ = ServerOptimizer(PIN_SPEC, o).step({"w": torch.tensor(PIN_X0)}, steps[0], {})
        assert first["w"][0].item() == pytest.approx(1.0 + 0.1 * 0.05 / (0.00250099 ** 0.5 + 1e-3), rel=1e-7)
    if kind == "yogi":  # the last entry by hand: v grows by 0.01 * 1, then shrinks (v > delta^2) twice
        assert state["v/w"][3].item() == pytest.approx(1e-6 + 0.01 - 0.01 * 0.0625 ** 2 - 0.01 * 0.03125 ** 2,
                                                       rel=1e-13)
        assert state["v/w"][3].item() == pytest.approx(0.009952171875, rel=1e-13)


# --- FedAvg compatibility, the buffer rule, state -------------------------------------------------

def test_sgd_at_rate_one_is_todays_fedavg_bit_for_bit():
    spec = SPEC
    g = {k: v * 1e3 for k, v in model(spec, seed=5).items()}  # large magnitudes: rounding matters
    # decoded client updates (float32), listed out of client order as the engine may
    ups = [(c, w, {k: v.float() for k, v in d.items()})
           for c, w, d in zip((4, 1, 9), (3.0, 1.0, 7.5), deltas(spec, rounds=3, seed=6))]
    step = weighted_mean(spec, sorted(ups, key=lambda u: u[0]))
    today = aggregate(spec, g, ups)
    for opt in (ServerOptimizer(spec), ServerOptimizer(spec, ServerOptimizerConfig("sgd", lr=1.0))):
        new, state = opt.step(g, step, {})
        assert state == {}
        for name in spec.names:
            assert torch.equal(new[name], today[name])
            assert torch.equal(new[name], (g[name].double() + step[name]).float())


@pytest.mark.parametrize("kind", KINDS)
def test_buffers_take_the_plain_average_and_keep_no_state(kind):
    opt = ServerOptimizer(SPEC, OPTIONS[kind])
    params, state = model(), {}
    for d in deltas(rounds=4):
        new, state = opt.step(params, d, state)
        for name in ("bn.running_mean", "bn.running_var"):
            assert torch.equal(new[name], (params[name].double() + d[name]).float())
        params = new
    prefixes = {"sgd": [], "momentum": ["m"], "adam": ["m", "v"], "yogi": ["m", "v"]}[kind]
    assert sorted(state) == sorted(f"{p}/{t.name}" for p in prefixes for t in TRAINABLE)
    assert all(v.dtype == torch.float64 and tuple(v.shape) == SPEC.tensors[SPEC.names.index(k.split("/", 1)[1])].shape
               for k, v in state.items())


@pytest.mark.parametrize("kind", KINDS)
def test_state_survives_a_safetensors_round_trip_bit_identically(kind):
    opt = ServerOptimizer(SPEC, OPTIONS[kind])
    steps = deltas(rounds=7, seed=3)
    whole, whole_state = run(opt, model(), steps)
    half, half_state = run(opt, model(), steps[:3])
    blob = st_save({**half, **{f"opt/{k}": v for k, v in half_state.items()}})
    loaded = st_load(blob)
    params = {k: v for k, v in loaded.items() if not k.startswith("opt/")}
    state = {k[len("opt/"):]: v for k, v in loaded.items() if k.startswith("opt/")}
    opt.check_state(state)
    resumed, resumed_state = run(ServerOptimizer(SPEC, OPTIONS[kind]), params, steps[3:], state)
    assert resumed.keys() == whole.keys() and resumed_state.keys() == whole_state.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert all(torch.equal(resumed_state[k], whole_state[k]) for k in whole_state)


def test_step_leaves_its_inputs_alone():
    opt = ServerOptimizer(SPEC, OPTIONS["adam"])
    params, state = run(opt, model(), deltas(rounds=2))
    before = ({k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in state.items()})
    opt.step(params, deltas(rounds=1, seed=9)[0], state)
    assert all(torch.equal(params[k], before[0][k]) for k in params)
    assert all(torch.equal(state[k], before[1][k]) for k in state)


def test_a_state_that_does_not_fit_is_refused():
    adam = ServerOptimizer(SPEC, OPTIONS["adam"])
    _, state = run(adam, model(), deltas(rounds=1))
    adam.check_state(state)
    adam.check_state({})
    with pytest.raises(ConfigError, match="unexpected v/"):  # adam's state under momentum
        ServerOptimizer(SPEC, OPTIONS["momentum"]).check_state(state)
    with pytest.raises(ConfigError, match="unexpected m/"):
        ServerOptimizer(SPEC).check_state(state)
    with pytest.raises(ConfigError, match="missing v/fc.weight"):
        adam.check_state({k: v for k, v in state.items() if k != "v/fc.weight"})
    with pytest.raises(ConfigError, match="wrong shape.*m/fc.weight"):
        adam.check_state({**state, "m/fc.weight": torch.zeros(3, 4, dtype=torch.float64)})
    with pytest.raises(ConfigError, match="want float64"):
        adam.check_state({**state, "m/fc.weight": state["m/fc.weight"].float()})
    other = ModelSpec(SPEC.tensors[:3] + (TensorSpec("head.weight", (4, 3), "weight"),) + SPEC.tensors[4:])
    with pytest.raises(ConfigError, match="Resume with the settings and model"):
        ServerOptimizer(other, OPTIONS["adam"]).check_state(state)
    with pytest.raises(ConfigError, match="missing"):  # step checks too
        adam.step(model(), deltas(rounds=1)[0], {"m/fc.weight": state["m/fc.weight"]})


# --- options and config keys ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "nadam"}, "server_optimizer 'nadam'; choose one of sgd, momentum, adam, yogi"),
    ({"lr": 0.0}, "server_lr must be a positive number"),
    ({"lr": -1.0}, "server_lr"),
    ({"lr": float("nan")}, "server_lr"),
    ({"lr": "0.1"}, "server_lr"),
    ({"momentum": 1.0}, r"server_momentum must be in \[0, 1\)"),
    ({"momentum": -0.1}, "server_momentum"),
    ({"beta1": 1.0}, "server_beta1"),
    ({"beta2": 1.5}, "server_beta2"),
    ({"beta2": True}, "server_beta2"),
    ({"tau": 0.0}, "server_tau must be a positive number"),
    ({"tau": float("inf")}, "server_tau"),
    ({"initial_v": -1e-6}, "server_initial_v"),
    ({"warmup": -1}, "server_warmup must be an integer >= 0"),
    ({"warmup": 2.5}, "server_warmup"),
    ({"warmup": True}, "server_warmup"),
])
def test_options_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ServerOptimizerConfig(**kwargs)


def test_option_defaults():
    assert [ServerOptimizerConfig(k).step_size for k in KINDS] == [1.0, 1.0, 0.1, 0.01]
    o = ServerOptimizerConfig("adam")
    assert (o.momentum, o.beta1, o.beta2, o.tau, o.v0) == (0.9, 0.9, 0.99, 1e-3, 1e-6)
    assert ServerOptimizerConfig("yogi", initial_v=0, lr=1).v0 == 0.0
    assert isinstance(ServerOptimizerConfig("sgd", lr=2).lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.lr = 1.0


def test_config_keys():
    cfg = Config()
    assert ServerOptimizerConfig.from_config(cfg) == ServerOptimizerConfig()  # FedAvg, as before
    overrides, _ = parse_assignments(["server_optimizer=yogi", "server_lr=0.03", "server_beta2=0.999",
                                      "server_tau=1e-4", "server_initial_v=0", "server_momentum=0.5"])
    o = ServerOptimizerConfig.from_config(build_config("quick", overrides=overrides))
    assert o == ServerOptimizerConfig("yogi", lr=0.03, momentum=0.5, beta1=0.9, beta2=0.999, tau=1e-4, initial_v=0.0)
    overrides, _ = parse_assignments(["server_lr=none"])
    assert build_config("quick", overrides=overrides).server_lr is None
    with pytest.raises(ConfigError, match="choose one of sgd, momentum, adam, yogi"):
        build_config("quick", overrides={"server_optimizer": "adagrad"})
    with pytest.raises(ConfigError, match="server_tau"):
        build_config("quick", overrides={"server_optimizer": "adam", "server_tau": -1.0})
    overrides, _ = parse_assignments(["server_optimizer=adam", "server_warmup=20"])
    assert ServerOptimizerConfig.from_config(build_config("quick", overrides=overrides)).warmup == 20
    assert Config().server_warmup == 0
    with pytest.raises(ConfigError, match="server_warmup"):
        build_config("quick", overrides={"server_warmup": -3})
    with pytest.raises(ConfigError, match="^server_lr expects a number or none, got 'fast'$"):
        parse_assignments(["server_lr=fast"])


def test_warmup_ramps_the_rate_linearly_then_holds_it():
    """Round t steps at lr * min(1, t / W); W = 0 or no round number is the plain rule."""
    spec = ModelSpec((TensorSpec("w", (1,), "weight"),))
    x0, d = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5], dtype=torch.float64)}
    opt = ServerOptimizer(spec, ServerOptimizerConfig("sgd", lr=1.0, warmup=4))
    x, state, seen = x0, {}, []
    for t in range(1, 6):
        x, state = opt.step(x, d, state, round_num=t)
        seen.append(x["w"].item())
    assert seen == [1.125, 1.375, 1.75, 2.25, 2.75]  # steps 0.125, 0.25, 0.375, 0.5, 0.5
    assert opt.step(x0, d, {})[0]["w"].item() == 1.5  # no round number: the full rate
    # adam, round 1 of a 10-round ramp: a tenth of the hand-computed first step (test_pinned_values)
    adam = ServerOptimizer(spec, ServerOptimizerConfig("adam", lr=0.1, warmup=10))
    assert adam.step(x0, d, {}, round_num=1)[0]["w"].item() == pytest.approx(1.009802019, abs=2e-7)
    plain = ServerOptimizer(SPEC, OPTIONS["adam"])
    ramped0 = ServerOptimizer(SPEC, dataclasses.replace(OPTIONS["adam"], warmup=0))
    a, _ = run(plain, model(), deltas(rounds=1))
    b, _ = ramped0.step(model(), deltas(rounds=1)[0], {}, round_num=1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # W = 0: bit for bit the plain rule


# --- convergence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    ServerOptimizerConfig("sgd"),
    ServerOptimizerConfig("momentum", lr=0.1),  # effective rate lr / (1 - beta) = 1
    ServerOptimizerConfig("adam", lr=0.05),
    ServerOptimizerConfig("yogi", lr=0.05),
], ids=lambda o: o.kind)
def test_noisy_federated_quadratic_reaches_its_optimum(options):
    """min_x sum_k 1/2 (x - c_k)^T A (x - c_k) over 10 clients, 5 sampled a round, each taking 5
    noisy gradient steps; the optimum is the mean of the c_k, 10 away from the start."""
    spec = ModelSpec((TensorSpec("w", (4, 5), "weight"), TensorSpec("b", (5,), "param")))
    rng = np.random.default_rng(0)
    curvature = rng.uniform(0.5, 2.0, 25)
    centers = rng.normal(0.0, 0.2, (10, 25)) + 2.0
    optimum = centers.mean(0)
    opt = ServerOptimizer(spec, options)
    params, state = {"w": torch.zeros(4, 5), "b": torch.zeros(5)}, {}
    flat = lambda p: np.concatenate([p["w"].double().numpy().ravel(), p["b"].double().numpy()])
    start = np.linalg.norm(flat(params) - optimum)
    for _ in range(200):
        x = flat(params)
        updates = []
        for k in rng.choice(10, 5, replace=False):
            y = x.copy()
            for _ in range(5):
                y -= 0.1 * (curvature * (y - centers[k]) + rng.normal(0.0, 0.1, 25))
            updates.append(y - x)
        d = np.mean(updates, axis=0)
        params, state = opt.step(params, {"w": torch.from_numpy(d[:20].reshape(4, 5)), "b": torch.from_numpy(d[20:])},
                                 state)
    assert start > 9.9
    assert np.linalg.norm(flat(params) - optimum) < 0.05 * start  # the noise floor is about 0.03 * start


# --- Flower's own strategies as a second reference ------------------------------------------------

FLOWER_SPEC = ModelSpec((TensorSpec("conv.weight", (2, 3), "weight"), TensorSpec("bias", (4,), "param")))


def flower_problem(rounds: int = 5):
    """A start in [1, 2) and small dyadic deltas, so that Flower's ``(x + delta) - x`` is exactly delta
    and both sides see the same numbers."""
    g = torch.Generator().manual_seed(11)
    x0 = {t.name: 1.0 + torch.rand(t.shape, generator=g) for t in FLOWER_SPEC.tensors}
    steps = [{t.name: torch.randint(-64, 65, t.shape, generator=g).double() / 1024 for t in FLOWER_SPEC.tensors}
             for _ in range(rounds)]
    return x0, steps


def flower_round(strategy, rnd: int, params, delta, fedavgm: bool = False):
    """One Flower ``aggregate_train`` from ``params`` with the client average ``params + delta``
    (FedAvg's weighted average is patched in; a federation is not needed)."""
    from flwr.app import Array, ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    current = {k: v.double().numpy() for k, v in params.items()}
    if fedavgm:
        strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    else:
        strategy.current_arrays = current
    averaged = ArrayRecord({k: Array(current[k] + delta[k].numpy()) for k in current})
    with mock.patch.object(FedAvg, "aggregate_train", return_value=(averaged, MetricRecord({}))):
        out, _ = strategy.aggregate_train(rnd, [])
    return {k: torch.from_numpy(out[k].numpy()).float() for k in current}


@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi"])
def test_flower_strategies_give_the_same_numbers(kind):
    import flwr.serverapp.strategy as strategy_mod  # the suite needs flwr: fail loudly, never skip
    x0, steps = flower_problem()
    if kind == "momentum":
        strategy = strategy_mod.FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
        ours = ServerOptimizerConfig("momentum", lr=0.5, momentum=0.9)
    elif kind == "yogi":  # Flower's FedYogi starts v at 0
        strategy = strategy_mod.FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
        ours = ServerOptimizerConfig("yogi", lr=0.01, initial_v=0.0)
    else:
        strategy = strategy_mod.FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
        ours = ServerOptimizerConfig("adam", lr=0.1, initial_v=0.0)
    params, flower_params, state = dict(x0), dict(x0), {}
    for rnd, d in enumerate(steps, start=1):
        o = ours
        if kind == "adam":  # Flower bias-corrects the rate: eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))
            o = dataclasses.replace(ours, lr=0.1 * (1 - 0.99 ** (rnd + 1)) ** 0.5 / (1 - 0.9 ** (rnd + 1)))
        flower_params = flower_round(strategy, rnd, params, d, fedavgm=kind == "momentum")
        params, state = ServerOptimizer(FLOWER_SPEC, o).step(params, d, state)
        for name in FLOWER_SPEC.names:
            torch.testing.assert_close(params[name], flower_params[name], rtol=0, atol=0)
    if kind in ("adam", "yogi"):
        for name in FLOWER_SPEC.names:
            np.testing.assert_allclose(state[f"m/{name}"].numpy(), strategy.m_t[name], rtol=1e-15, atol=0)
            np.testing.assert_allclose(state[f"v/{name}"].numpy(), strategy.v_t[name], rtol=1e-15, atol=0)
    else:
        np.testing.assert_allclose(state["m/conv.weight"].numpy(), -strategy.momentum_vector[0], rtol=1e-15, atol=0)


def test_flower_fedadam_step_size_differs_from_the_papers():
    """Flower's FedAdam bias-corrects the rate; at round 1 with the defaults it is 0.742 eta."""
    import flwr.serverapp.strategy as strategy_mod  # the suite needs flwr: fail loudly, never skip
    x0, steps = flower_problem(rounds=1)
    flower = flower_round(strategy_mod.FedAdam(), 1, x0, steps[0])
    ours, _ = ServerOptimizer(FLOWER_SPEC, ServerOptimizerConfig("adam", initial_v=0.0)).step(x0, steps[0], {})
    moved = [(flower[n].double() - x0[n].double()) / (ours[n].double() - x0[n].double())
             for n in FLOWER_SPEC.names]
    ratio = torch.cat([r.flatten() for r in moved])
    ratio = ratio[ratio.isfinite()]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.7424597884), rtol=1e-5, atol=0)
