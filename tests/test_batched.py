"""Clients trained several at once (``batch_clients``, :mod:`fedcodec.fl.batched`): the same clients,
batches, draws, BatchNorm statistics, stores and payload formats as one client at a time, and a
fallback to :func:`client_fit` for what cannot be batched.

How close is "the same": the grouped kernels sum in another order than one client's, so the two
agree to rounding, not bit for bit. In float64 that is all there is: batched training matches
sequential training to 1e-13 of the update (4e-11 with Adam; tolerance 1e-8), which checks the whole
mechanism, for plain SGD and Adam and for FedMRN's, FedPM's and FedBAT's parametrizations. In
float32, CNN4 with BatchNorm at the small initialisation fedcodec uses amplifies a rounding
difference a thousandfold or more per local step (it does the same to one client trained with 1
torch thread against 2: two rounds of ``fedavg`` with ``init_std=0.1``, 4 clients, 10 steps each
differ by 61% of the update in the worst tensor). So the float32 runs here stay where rounding
differences do not grow: one local step per round. There the runs agree to 6e-5 of the model's
change (measured), and the test allows 1e-3; a wrong batch or statistics mixed between clients moves
them by O(1).

The tests run with one torch thread: they pin no multi-thread numbers, and one thread is fast on a
busy machine.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedcodec.cli import _configs, build_parser, main
from fedcodec.codecs import CodecContext, ModelSpec, build_codec, build_uplink
from fedcodec.codecs.base import split_specs
from fedcodec.codecs.algorithms import Parametrization
from fedcodec.codecs.fedbat import StochasticBinaryTraining
from fedcodec.codecs.fedmrn import MaskedNoiseTraining
from fedcodec.codecs.fedpm import BernoulliMaskTraining
from fedcodec.config import Config, build_config
from fedcodec.data import make_synthetic_images
from fedcodec.errors import ConfigError
from fedcodec.fl import batched, loop
from fedcodec.fl import rng as rngs
from fedcodec.fl.batched import ClientJob, batching_blocked, fit_clients, train_group
from fedcodec.fl.client import ClientRuntime, LocalTraining, local_train, open_round, training_draws
from fedcodec.fl.downlink import Downlink, DownlinkError
from fedcodec.fl.simulation import TrainingSet, run_round, setup
from fedcodec.fl.task import Classification
from fedcodec.models import build_model

SOURCE = make_synthetic_images(400, 200, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def groups(monkeypatch):
    """The clients of every group :func:`batched.fit_group` trains together, in order."""
    seen = []
    real = batched.fit_group

    def spy(runtime, opened, cfg):
        seen.append([one.client for one, _ in opened])
        return real(runtime, opened, cfg)

    monkeypatch.setattr(batched, "fit_group", spy)
    return seen


def small(method: str = "fedavg", **kw) -> Config:
    base = dict(method=method, num_clients=8, clients_per_round=4, rounds=2, local_epochs=1, batch_size=16, seed=5)
    return Config(**{**base, **kw}).validate()


def run(cfg: Config, sizes: list[int] | None = None):
    """``cfg``'s run; ``sizes``: client c holds the first ``sizes[c]`` examples of its iid share."""
    sim, state = setup(cfg, SOURCE)
    if sizes is not None:
        sim.parts = [part[:n] for part, n in zip(sim.parts, sizes)]
    initial = {k: v.clone() for k, v in state.global_params.items()}
    for _ in range(cfg.rounds):
        state = run_round(sim, state)
    return sim, state, initial


def strip(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def relative_gap(a: dict, b: dict, start: dict) -> float:
    """``||a - b|| / ||a - start||`` over all tensors (float64)."""
    gap = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    moved = sum(float((a[k].double() - start[k].double()).square().sum()) for k in a)
    return (gap / moved) ** 0.5


# --------------------------------------------------------------------------- the mechanism, in float64


def float64_runtime() -> ClientRuntime:
    model = build_model("cnn4", (1, 16, 16), 10, seed=1, init_std=0.05).double()
    spec = ModelSpec.from_model(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    initial = {t.name: tensors[t.name].detach().clone() for t in spec.tensors}
    return ClientRuntime(model, spec, build_uplink("fp32"), Downlink(build_codec("fp32"), False, spec, 0, initial),
                         run_seed=0, task=Classification())


def parametrization(kind: str | None, runtime: ClientRuntime, k: int) -> Parametrization | None:
    """Client ``k``'s parametrization of ``kind`` with float64 frozen tensors: FedMRN's masked noise
    (binary masks, stochastic and progressive), FedPM's Bernoulli masks (latent lr scale 10), FedBAT's
    stochastic binarization; each draws from its own generator."""
    if kind is None:
        return None
    weights = split_specs(runtime.spec)[0]
    gen = torch.Generator().manual_seed(100 + k)
    draws = rngs.torch_generator(200 + k)
    if kind == "fedmrn":
        noise = {t.name: (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.01 for t in weights}
        return MaskedNoiseTraining(weights, noise, "binary", True, True, draws)
    if kind == "fedpm":
        w0 = {t.name: torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.05 for t in weights}
        base = {n: w * (0.2 + 0.6 * torch.rand(w.shape, generator=gen, dtype=torch.float64)) for n, w in w0.items()}
        return BernoulliMaskTraining(weights, w0, base, draws, lr_scale=10.0)
    return StochasticBinaryTraining(weights, 0.005, draws)


CASES = {  # LocalTraining, parametrization, the task's lr scales
    "sgd-momentum-weight-decay": (LocalTraining(2, 16, 0.005, momentum=0.9, weight_decay=1e-3), None,
                                  {"classifier": 3.0}),
    "adam": (LocalTraining(2, 16, 0.005, weight_decay=1e-3, optimizer="adam"), None, {"features.0": 0.5}),
    "fedmrn-masks": (LocalTraining(2, 16, 0.1, momentum=0.5, weight_decay=1e-3), "fedmrn", {}),
    "fedpm-masks": (LocalTraining(2, 16, 0.1, momentum=0.5), "fedpm", {}),
    "fedbat-binarization": (LocalTraining(2, 16, 0.1, weight_decay=1e-3), "fedbat", {}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_group_trains_each_client_as_local_train_does(case):
    """Three clients, each from its own broadcast (different models) on its own 34 examples, 2 epochs
    of 3 steps (the last a batch of 2): their updates (BatchNorm running statistics included), losses,
    parametrization draws and the model's BatchNorm counters are local_train's, to 1e-8 of the update
    (measured: at most 4e-11 with Adam, 1.1e-13 otherwise)."""
    cfg, kind, scales = CASES[case]
    runtime = float64_runtime()
    runtime.task.lr_scales = scales
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(34, 1, 16, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randint(0, 10, (34,), generator=gen) for _ in range(3)]
    starts = [{t.name: runtime.tensors[t.name].detach() + (0.0 if t.role == "buffer" else 0.01)
               * torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in runtime.spec.tensors}
              for _ in range(3)]
    params = [parametrization(kind, runtime, k) for k in range(3)]
    shuffles = [rngs.torch_generator(k) for k in range(3)]
    alone = [local_train(runtime, starts[k], xs[k], ys[k], cfg, params[k], shuffles[k]) for k in range(3)]
    counters_alone = [int(b) for n, b in runtime.model.named_buffers() if n.endswith("num_batches_tracked")]
    for name, buf in runtime.model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    params_group = [parametrization(kind, runtime, k) for k in range(3)]
    shuffles_group = [rngs.torch_generator(k) for k in range(3)]
    updates, losses = train_group(runtime, starts, xs, ys, cfg, params_group, shuffles_group)

    assert counters_alone == [18, 18, 18, 18]  # 3 clients x 6 steps, on each of CNN4's 4 BatchNorms
    assert [int(b) for n, b in runtime.model.named_buffers() if n.endswith("num_batches_tracked")] == counters_alone
    for (update, loss), got, got_loss in zip(alone, updates, losses):
        assert list(got) == list(update)
        assert "features.1.running_mean" in got and float(got["features.1.running_var"].abs().max()) > 1e-3
        for name in update:
            scale = float(update[name].abs().max())
            assert scale > 0, name
            assert float((got[name] - update[name]).abs().max()) <= 1e-8 * scale, name
        assert abs(got_loss - loss) <= 1e-8 * loss
    assert len({round(loss, 6) for _, loss in alone}) == 3  # three different clients
    if kind:  # every client drew as many masks as alone
        for a, b in zip(params, params_group):
            assert torch.equal(a.gen.get_state(), b.gen.get_state())
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(shuffles, shuffles_group))


#: float32 tolerances of the methods' own parametrizations, relative to each tensor's update. Each
#: step draws a mask or binarization per weight from a probability computed in float32; a probability
#: that rounds differently flips a draw now and then, which changes that client's next steps. Measured
#: at most 4.7e-5 (FedMRN), 1.3e-4 (FedPM), 1.2e-2 (FedBAT, client 5; 9e-5 for the other three)
METHOD_TOLERANCE = {"fedmrn-binary": 1e-3, "fedpm": 1e-3, "fedbat": 5e-2}


@pytest.mark.parametrize("method", METHOD_TOLERANCE)
def test_the_methods_parametrizations_train_in_groups(method):
    """Each reparametrizing method's own parametrization, built from each client's codec context, in
    float32: 4 clients, 4 steps each. The group's updates are local_train's to the method's tolerance,
    its losses to 1e-4, and every client's codec generator drew as often as alone (the draws, and
    the encoder's after them, stay in step)."""
    sim, state = setup(small(method), SOURCE)
    runtime, clients = sim.runtime, [0, 1, 5, 6]
    down, _ = runtime.downlink.send(state.global_params, 1, clients, state.server_states)
    data = [sim.client_data(c) for c in clients]
    opened = {how: [open_round(runtime, down[c], 50, 1, c, {}) for c in clients] for how in ("alone", "group")}
    draws = {how: [training_draws(runtime, one, sim.training) for one in opened[how]] for how in opened}
    alone = [local_train(runtime, one.on_device, x, y, sim.training, param, gen)
             for one, (x, y), (param, gen) in zip(opened["alone"], data, draws["alone"])]
    updates, losses = train_group(runtime, [one.on_device for one in opened["group"]], [x for x, _ in data],
                                  [y for _, y in data], sim.training, [p for p, _ in draws["group"]],
                                  [g for _, g in draws["group"]])
    for (update, loss), got, got_loss in zip(alone, updates, losses):
        assert list(got) == list(update)
        for name in update:
            scale = float(update[name].abs().max())
            assert float((got[name] - update[name]).abs().max()) <= METHOD_TOLERANCE[method] * scale, name
        assert abs(got_loss - loss) <= 1e-4 * loss
    for a, b in zip(opened["alone"], opened["group"]):
        assert torch.equal(a.ctx.rng.get_state(), b.ctx.rng.get_state())


@pytest.mark.parametrize("method", ["fedavg", "ef-signsgd"])
def test_fit_clients_answers_as_client_fit(method):
    """Through the codecs, in float64: each client's payload decodes to client_fit's update (to float32
    rounding), its loss, metrics and info are client_fit's, and error feedback leaves the same residual
    in its store, which the second round reads."""
    cfg = small(method, init_std=0.05)
    sim, state = setup(cfg, SOURCE)
    runtime = dataclasses.replace(sim.runtime, model=sim.runtime.model.double())
    data = TrainingSet(sim.source.train_x.double(), sim.source.train_y)
    clients = [0, 1, 5]
    stores = {"alone": {c: {} for c in clients}, "group": {c: {} for c in clients}}
    for round_num in (1, 2) if method == "ef-signsgd" else (1,):
        down, views = runtime.downlink.send(state.global_params, round_num, clients, state.server_states)
        answers = {}
        for how, size in (("alone", 1), ("group", 4)):
            jobs = [ClientJob(c, down[c], data.train_x[sim.parts[c]], data.train_y[sim.parts[c]], stores[how][c])
                    for c in clients]
            answers[how] = fit_clients(runtime, jobs, sim.training, round_num, size)
        for c in clients:
            (p1, i1), (p2, i2) = answers["alone"][c], answers["group"][c]
            assert len(p1) == len(p2)
            assert set(i1) == set(i2) == {"num_examples", "train_loss", "codec", "seconds"}
            assert i1["num_examples"] == i2["num_examples"] == 50 and i1["codec"] == i2["codec"]
            assert abs(i1["train_loss"] - i2["train_loss"]) <= 1e-8 * i1["train_loss"]
            assert set(i2["seconds"]) == {"train", "code"} and i2["seconds"]["train"] > 0
            ctx = CodecContext(sim.spec, client=c, round=round_num, seed=rngs.codec_seed(cfg.seed, round_num, c),
                               reference=views[c])
            u1, u2 = runtime.uplink.decode(p1, ctx), runtime.uplink.decode(p2, ctx)
            for name in u1:
                assert torch.allclose(u2[name], u1[name], rtol=1e-6, atol=1e-6 * float(u1[name].abs().max())), name
            s1, s2 = stores["alone"][c], stores["group"][c]
            assert set(s1) == set(s2)
            assert bool(s1) == (method == "ef-signsgd")  # error feedback keeps a residual, FedAvg nothing
            top = max(float(u.abs().max()) for u in u1.values())
            for name in s1:  # a residual is as large as the update (signed kernels) or float32 rounding (the rest)
                assert torch.allclose(s2[name], s1[name], rtol=1e-6, atol=1e-9 * top), name


# --------------------------------------------------------------------------- whole runs, float32


RUNS = {  # config, the accuracies of the sequential run (1 torch thread), the uplink bytes per round
    "fedavg": (dict(init_std=0.05, batch_size=64), [0.14, 0.225]),
    "fedmrn-binary": (dict(batch_size=64), [0.1, 0.1]),
}


@pytest.mark.parametrize("method", RUNS)
def test_two_rounds_with_batch_clients_4_are_the_sequential_run(method, groups):
    """``batch_clients = 4`` against 1, two rounds of 4 clients with 50 examples each, one local step
    per round (see the module docstring): the batched run trains every round's clients as one group,
    and reaches the sequential run's accuracies and bytes, and its global model to 1e-3 of the
    model's change. Measured: 6e-5 (FedAvg); FedMRN 4e-8 and identical masked weights (noise times
    mask bits) with its first noise generator, 2.5e-4 and 2 of 389,920 masked weights different with
    its second (a mask bit drawn from a probability within rounding of the uniform draw); the test
    allows 1 in 10,000."""
    overrides, accuracies = RUNS[method]
    _, seq, initial = run(small(method, **overrides))
    assert groups == []
    _, bat, _ = run(small(method, batch_clients=4, **overrides))
    assert groups == [[0, 1, 5, 6], [0, 2, 3, 7]]
    assert [r["accuracy"] for r in seq.records] == accuracies
    assert [r["accuracy"] for r in bat.records] == accuracies
    assert [r["uplink_bytes"] for r in bat.records] == [r["uplink_bytes"] for r in seq.records]
    assert [(e.round, e.client, e.direction, e.nbytes) for e in bat.ledger.entries] == \
        [(e.round, e.client, e.direction, e.nbytes) for e in seq.ledger.entries]
    for a, b in zip(seq.records, bat.records):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * a["train_loss"]
    assert relative_gap(seq.global_params, bat.global_params, initial) <= 1e-3
    if method == "fedmrn-binary":
        weights = [name for name in seq.global_params if name.endswith("weight") and seq.global_params[name].dim() > 1]
        differ = sum(int((seq.global_params[n] != bat.global_params[n]).sum()) for n in weights)
        assert len(weights) == 5 and differ <= 1e-4 * sum(seq.global_params[n].numel() for n in weights)


# --------------------------------------------------------------------------- what falls back


def test_clients_of_different_sizes_train_alone_bit_for_bit(groups):
    """No two clients hold the same number of examples: no group forms, every client is client_fit's,
    and the run is the sequential run bit for bit."""
    sizes = [50, 49, 48, 47, 46, 45, 44, 43]
    _, seq, _ = run(small(rounds=1), sizes)
    _, bat, _ = run(small(rounds=1, batch_clients=4), sizes)
    assert groups == []
    assert strip(bat.records) == strip(seq.records)
    assert all(torch.equal(seq.global_params[k], bat.global_params[k]) for k in seq.global_params)


def test_clients_group_by_size_and_the_odd_one_trains_alone(groups, monkeypatch):
    """Round 1 samples clients 0, 1, 5, 6; client 5 holds 40 examples, the others 50: 0, 1 and 6 train
    as a group, client 5 alone with client_fit, which gives the sequential run's payload, byte for byte."""
    sent = {}
    real = loop.client_fit

    def spy(rt, broadcast, x, y, cfg, rnd, client, **kw):
        payload, info = real(rt, broadcast, x, y, cfg, rnd, client, **kw)
        sent.setdefault(client, []).append(payload)
        return payload, info

    monkeypatch.setattr(loop, "client_fit", spy)
    sizes = [50, 50, 50, 50, 50, 40, 50, 50]
    run(small(rounds=1), sizes)
    assert sorted(sent) == [0, 1, 5, 6]
    sent_alone = {c: p for c, (p,) in sent.items()}
    sent.clear()
    run(small(rounds=1, batch_clients=4), sizes)
    assert groups == [[0, 1, 6]]
    assert sent == {5: [sent_alone[5]]}


def test_a_client_that_refuses_its_broadcast_leaves_its_group(groups):
    sim, state = setup(small(rounds=1), SOURCE)
    clients = [0, 1, 5, 6]
    down, _ = sim.runtime.downlink.send(state.global_params, 1, clients, state.server_states)
    jobs = [ClientJob(c, down[c][:-7] if c == 1 else down[c], *sim.client_data(c), {}) for c in clients]
    answers = fit_clients(sim.runtime, jobs, sim.training, 1, 4)
    assert isinstance(answers[1], DownlinkError)
    assert all(isinstance(answers[c], tuple) for c in (0, 5, 6))
    assert groups == [[0, 5, 6]]


def test_simulated_dropouts_and_stragglers_keep_their_meaning(groups):
    """Round 1 samples 0, 1, 5, 6; one drops out (receives, then fails), one is late (trains and sends
    with the others, is not aggregated): the other three train as one group."""
    _, state, _ = run(small(rounds=1, dropout=0.25, stragglers=0.25, batch_clients=4))
    record = state.records[0]
    assert (record["dropped"], record["timed_out"], record["accepted"]) == (1, 1, 2)
    assert len(groups) == 1 and len(groups[0]) == 3
    assert len([e for e in state.ledger.entries if e.direction == "up"]) == 3


def test_runs_that_cannot_be_batched_say_why_and_train_one_client_at_a_time(groups):
    """A kept optimizer state falls back (and is the sequential run bit for bit); so do a codec with a
    pre-pass, a task that may draw in its loss, BatchNorm with a cumulative average, client-local tensors."""
    cfg = small(rounds=1, keep_optimizer_state=True, optimizer="adam")
    _, seq, _ = run(cfg)
    _, bat, _ = run(dataclasses.replace(cfg, batch_clients=4))
    assert groups == []
    assert strip(bat.records) == strip(seq.records)
    assert all(torch.equal(seq.global_params[k], bat.global_params[k]) for k in seq.global_params)

    sim, _ = setup(small(), SOURCE)
    runtime, training = sim.runtime, sim.training
    assert batching_blocked(runtime, training) is None
    assert batching_blocked(runtime, dataclasses.replace(training, keep_state=True)) == \
        "clients keep their optimizer state between rounds"
    ae, _ = setup(small("ae-4"), SOURCE)
    assert batching_blocked(ae.runtime, ae.training) == "codec 'ae' fits itself on the client (a pre-pass)"

    class NoisyTask(Classification):
        loss_uses_generator = True

    assert batching_blocked(dataclasses.replace(runtime, task=NoisyTask()), training) == \
        "the task's loss (NoisyTask) may draw from the training generator"
    local = dataclasses.replace(runtime, spec=ModelSpec.from_model(runtime.model, local={"classifier.weight"}),
                                local=frozenset({"classifier.weight"}))
    assert batching_blocked(local, training) == "the model has client-local tensors"
    runtime.model.features[5].momentum = None
    assert batching_blocked(runtime, training) == "BatchNorm 'features.5' has momentum=None (a cumulative average)"


# --------------------------------------------------------------------------- the option


def test_batch_clients_is_a_config_key_and_a_flag(capsys):
    assert Config().batch_clients == 1
    args = build_parser().parse_args(["run", "--method", "fedavg", "--batch-clients", "5"])
    (cfg,), _ = _configs(args)
    assert cfg.batch_clients == 5
    assert build_config("quick", overrides={"batch_clients": 10}).batch_clients == 10
    with pytest.raises(ConfigError, match="batch_clients expects an integer >= 1, got 0"):
        build_config("quick", overrides={"batch_clients": 0})
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--batch-clients BATCH_CLIENTS" in capsys.readouterr().out
    sim, _ = setup(small(batch_clients=3), SOURCE)
    assert loop.InProcessTransport(sim).batch_clients == 3
    assert loop.InProcessTransport(sim, batch_clients=1).batch_clients == 1
