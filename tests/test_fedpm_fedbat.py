"""FedPM (Bernoulli masks over frozen random weights) and FedBAT (learned-step binarization)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedcodec.codecs import CodecContext, ModelSpec, TensorSpec, build_codec, build_uplink, wire
from fedcodec.codecs.fedbat import LOG_STEP, STEP, StochasticBinaryTraining
from fedcodec.codecs.fedpm import EPS, BernoulliMaskTraining
from fedcodec.errors import ConfigError, PayloadError
from fedcodec.fl.client import ClientRuntime, LocalTraining, local_train
from fedcodec.fl.downlink import Downlink
from fedcodec.fl.server import aggregate, server_round
from helpers import Tiny, ctx, random_update, tiny_spec

N_MASKED = 42  # Tiny: 3*1*3*3 conv + 5*3 linear, not a multiple of 8


def n_dense(spec):
    return spec.numel(("param", "buffer"))


def fedpm_global(codec, spec, seed=0):
    """A FedPM global model: w0 * theta with theta in (0, 1) on the masked tensors, random dense."""
    g = torch.Generator().manual_seed(seed)
    out = random_update(spec, seed=seed, scale=0.1)
    for name, w0 in codec.frozen(spec).items():
        out[name] = w0 * torch.rand(w0.shape, generator=g)
    return out


def body(codec, spec, payload):
    return bytearray(wire.unpack(payload, codec.codec_id, spec.fingerprint))


def rewrap(codec, spec, b):
    return wire.pack(codec.codec_id, spec.fingerprint, bytes(b))


# ---------------------------------------------------------------------------------------------------------
# payload length


@pytest.mark.parametrize("spec", [tiny_spec(), ModelSpec((TensorSpec("w", (9, 1), "weight"),)),
                                  ModelSpec((TensorSpec("w", (4, 2), "weight"), TensorSpec("v", (3, 5), "weight"),
                                             TensorSpec("b", (7,), "param")))],
                         ids=["tiny", "9-weights-only", "two-tensors"])
def test_payload_length_formula(spec):
    n = spec.numel(("weight",))
    k = len(spec.select(("weight",)))
    pm = build_codec("fedpm")
    bat = build_codec("fedbat")
    c = ctx(spec, reference=fedpm_global(pm, spec))
    assert len(pm.encode(random_update(spec), c)) == \
        wire.envelope_overhead("fedpm") + math.ceil(n / 8) + 4 * n_dense(spec)
    assert len(bat.encode(random_update(spec), ctx(spec))) == \
        wire.envelope_overhead("fedbat") + 4 * k + math.ceil(n / 8) + 4 * n_dense(spec)
    if spec == tiny_spec():
        assert n == N_MASKED and k == 2


# ---------------------------------------------------------------------------------------------------------
# FedPM


def test_fedpm_frozen_weights_are_signed_kaiming_and_seeded():
    spec = tiny_spec()
    a, b, other = build_codec("fedpm"), build_codec("fedpm"), build_codec("fedpm", weight_seed=1)
    wa, wb, wo = a.frozen(spec), b.frozen(spec), other.frozen(spec)
    # PCG64(weight_seed 0) integers in {0, 1} -> -1 / +1 (FedPM's stream; FedMRN's noise is another)
    bits = np.random.Generator(np.random.PCG64(0)).integers(0, 2, N_MASKED, dtype=np.int8)
    signs = torch.from_numpy(bits.astype(np.float32) * 2 - 1)
    assert signs[:8].tolist() == [-1, 1, 1, 1, 1, 1, -1, 1]
    flat = torch.cat([wa[t.name].reshape(-1) for t in spec.select(("weight",))])
    fans = [9] * 27 + [3] * 15
    expect = signs * torch.tensor([math.sqrt(2 / f) for f in fans], dtype=torch.float32)
    assert torch.equal(flat, expect)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert not all(torch.equal(wa[n], wo[n]) for n in wa)


def test_fedpm_init_global_and_eval_params_are_deterministic():
    spec = tiny_spec()
    codec = build_uplink("fedpm").algorithm
    assert codec.additive_step is False  # the Beta posterior sets theta; it is no update to add
    params = random_update(spec, seed=3, scale=0.2)
    g = codec.init_global(params, spec)
    w0 = codec.frozen(spec)
    for t in spec.tensors:
        if t.role == "weight":
            assert torch.equal(g[t.name], w0[t.name] * 0.5)
        else:
            assert torch.equal(g[t.name], params[t.name])
    assert all(torch.equal(g[n], codec.init_global(params, spec)[n]) for n in g)

    theta = {n: torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) for n, w in w0.items()}
    theta["conv.weight"].view(-1)[:3] = torch.tensor([0.0, 1.0, 1.0])
    model = g | {n: w0[n] * theta[n] for n in w0}
    e1, e2, e3 = (codec.eval_params(model, spec, 5), codec.eval_params(model, spec, 5),
                  codec.eval_params(model, spec, 6))
    assert all(torch.equal(e1[n], e2[n]) for n in e1)
    assert not all(torch.equal(e1[n], e3[n]) for n in w0)
    for n, w in w0.items():
        assert torch.all((e1[n] == 0) | (e1[n] == w)), n
    assert e1["conv.weight"].view(-1)[0] == 0 and torch.equal(e1["conv.weight"].view(-1)[1:3],
                                                              w0["conv.weight"].view(-1)[1:3])
    assert all(torch.equal(e1[t.name], model[t.name]) for t in spec.tensors if t.role != "weight")
    # a fresh codec (another process) evaluates the same network
    fresh = build_uplink("fedpm").algorithm
    assert all(torch.equal(e1[n], fresh.eval_params(model, spec, 5)[n]) for n in e1)
    # the sample follows theta: over many seeds, the mean of the evaluated mask approaches theta
    masks = torch.stack([codec.eval_params(model, spec, s)["fc.weight"] / w0["fc.weight"] for s in range(400)])
    assert float((masks.mean(0) - theta["fc.weight"]).abs().max()) < 4 * 0.5 / math.sqrt(400)


def test_fedpm_round_trip_gives_sampled_network():
    spec = tiny_spec()
    codec = build_codec("fedpm")
    ref = fedpm_global(codec, spec)
    w0 = codec.frozen(spec)
    update = random_update(spec, seed=1, scale=0.2)
    c = ctx(spec, reference=ref)
    dec = codec.decode(codec.encode(update, c), ctx(spec, reference=ref))
    for t in spec.tensors:
        if t.role != "weight":
            assert torch.equal(dec[t.name], update[t.name]), t.name
            continue
        w = ref[t.name] + dec[t.name]
        m = torch.round(w / w0[t.name])
        assert torch.all((m == 0) | (m == 1))
        # reference + update is w0 * m up to the one float32 rounding of w0 * m - reference
        assert torch.all(w[m == 0] == 0)
        assert float((w - w0[t.name] * m).abs().max()) <= 2 ** -23 * float(w0[t.name].abs().max())


def test_fedpm_mask_probability_is_reference_plus_update_over_w0():
    spec = ModelSpec((TensorSpec("w", (2000, 2), "weight"),))
    codec = build_codec("fedpm")
    w0 = codec.frozen(spec)["w"]
    ref = {"w": w0 * 0.5}
    target = torch.linspace(-0.2, 1.2, 4000).reshape(2000, 2)  # outside [0, 1] clamps
    update = {"w": w0 * target - ref["w"]}
    trials, acc = 200, torch.zeros(2000, 2)
    for i in range(trials):
        d = codec.decode(codec.encode(update, ctx(spec, rng_seed=i, reference=ref)), ctx(spec, reference=ref))
        acc += torch.round((d["w"] + ref["w"]) / w0)
    err = acc / trials - target.clamp(0, 1)
    assert float(err.abs().max()) < 5 * 0.5 / math.sqrt(trials)
    assert abs(float(err.mean())) < 5 * 0.5 / math.sqrt(trials * 4000)
    assert torch.all(acc[target <= 0] == 0) and torch.all(acc[target >= 1] == trials)


def test_fedpm_aggregate_is_the_beta_posterior_mean():
    spec = ModelSpec((TensorSpec("w", (3, 2), "weight"), TensorSpec("b", (3,), "param")))
    uplink = build_uplink("fedpm")
    codec = uplink.codec
    w0 = codec.frozen(spec)["w"]
    assert torch.equal(w0.abs(), torch.ones(3, 2))  # fan_in 2: sqrt(2/2)
    theta = torch.tensor([[0.1, 0.5], [0.9, 0.3], [0.7, 0.2]])
    glob = {"w": w0 * theta, "b": torch.tensor([1.0, 2.0, 3.0])}
    masks = [torch.tensor([[1., 0.], [1., 1.], [0., 0.]]),
             torch.tensor([[1., 0.], [0., 1.], [1., 0.]]),
             torch.tensor([[1., 1.], [1., 1.], [0., 0.]])]
    dense = [torch.tensor([0.3, 0.0, -1.0]), torch.tensor([0.6, 1.0, 1.0]), torch.tensor([0.0, 2.0, 0.5])]
    weights = [10.0, 30.0, 60.0]  # the masks count once each; dense values are example-weighted
    payloads = {}
    for k, (m, d, wt) in enumerate(zip(masks, dense, weights)):
        update = {"w": w0 * m - glob["w"], "b": d}  # theta' = m exactly: the encoder's mask is m
        payloads[k] = (codec.encode(update, ctx(spec, rng_seed=k, reference=glob)), wt)
    new, outcome = server_round(uplink, spec, glob, 1, payloads)
    assert outcome.accepted == [0, 1, 2]
    expected = (1 + sum(masks)) / (2 + 3) * w0
    assert torch.allclose(new["w"], expected, rtol=0, atol=1e-7)
    assert torch.allclose(new["w"] / w0, torch.tensor([[0.8, 0.4], [0.6, 0.8], [0.4, 0.2]]), rtol=0, atol=1e-6)
    assert torch.allclose(new["b"], glob["b"] + sum(w * d for w, d in zip(weights, dense)) / 100, atol=1e-6)
    # a lossy downlink: each client's reference is off the global model by a little; same masks
    decoded = []
    for k, m in enumerate(masks):
        ref = {"w": glob["w"] + 1e-3 * (k + 1), "b": glob["b"]}
        upd = codec.decode(codec.encode({"w": w0 * m - ref["w"], "b": dense[k]}, ctx(spec, reference=ref)),
                           ctx(spec, reference=ref))
        decoded.append((k, weights[k], upd))
    assert torch.allclose(aggregate(spec, glob, decoded, uplink.algorithm)["w"], expected, rtol=0, atol=1e-7)
    # with a prior of strength 4 centred on the current theta: (1 + 4 theta + sum m) / (2 + 4 + 3)
    carried = build_uplink("fedpm", prior_strength=4.0)
    new, _ = server_round(carried, spec, glob, 1, payloads)
    assert torch.allclose(new["w"] / w0, (1 + 4 * theta + sum(masks)) / 9, rtol=0, atol=1e-6)
    # the posterior's mode (the paper's code): the fraction of masks set, kept in [clip, 1 - clip]
    mode = build_uplink("fedpm", estimate="mode", clip=0.05)
    new, _ = server_round(mode, spec, glob, 1, payloads)
    assert torch.allclose(new["w"] / w0, torch.tensor([[0.95, 1 / 3], [2 / 3, 0.95], [1 / 3, 0.05]]),
                          rtol=0, atol=1e-6)
    assert torch.allclose(new["b"], glob["b"] + sum(w * d for w, d in zip(weights, dense)) / 100, atol=1e-6)
    # mode with a prior of strength 3: (3 theta + sum m) / (3 + 3)
    new, _ = server_round(build_uplink("fedpm", estimate="mode", prior_strength=3.0), spec, glob, 1, payloads)
    assert torch.allclose(new["w"] / w0, (3 * theta + sum(masks)) / 6, rtol=0, atol=1e-6)


def test_fedpm_parametrization_samples_masks_and_passes_gradients_through_sigmoid():
    spec = ModelSpec((TensorSpec("w", (400, 50), "weight"),))
    codec = build_uplink("fedpm").algorithm
    w0 = codec.frozen(spec)["w"]
    theta = torch.rand(400, 50, generator=torch.Generator().manual_seed(0))
    theta.view(-1)[:2] = torch.tensor([0.0, 1.0])
    glob = {"w": w0 * theta}
    param = codec.parametrization(ctx(spec, reference=glob), glob)
    assert isinstance(param, BernoulliMaskTraining) and param.names == ("w",)
    latent = param.init()
    assert set(latent) == {"w"} and latent["w"].requires_grad
    assert torch.allclose(torch.sigmoid(latent["w"]), theta.clamp(EPS, 1 - EPS), atol=1e-5)
    out = param.deltas(latent, 0.5)["w"]
    w = (glob["w"] + out).detach()
    m = torch.round(w / w0)
    assert torch.all((m == 0) | (m == 1)) and torch.allclose(w, w0 * m, atol=1e-6)
    assert abs(float(m.mean() - theta.mean())) < 0.01
    upstream = torch.randn(400, 50, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    p = torch.sigmoid(latent["w"].detach())
    assert torch.allclose(latent["w"].grad, upstream * w0 * p * (1 - p), rtol=1e-5, atol=1e-9)
    fin = param.finish(latent)
    assert set(fin) == {"w"} and torch.allclose(fin["w"] + glob["w"], w0 * p, atol=1e-6)


def test_fedpm_decode_needs_the_reference_and_encode_too():
    spec = tiny_spec()
    codec = build_codec("fedpm")
    payload = codec.encode(random_update(spec), ctx(spec))
    with pytest.raises(PayloadError) as info:
        codec.decode(payload, CodecContext(spec, client=4, round=1))
    assert info.value.reason == "reference" and "client 4" in str(info.value) and "reference" in str(info.value)
    with pytest.raises(ConfigError, match="reference"):
        codec.encode(random_update(spec), CodecContext(spec, client=4, round=1, rng=torch.Generator()))


# ---------------------------------------------------------------------------------------------------------
# FedBAT


def test_fedbat_round_trip_sends_plus_minus_the_step():
    spec = tiny_spec()
    codec = build_codec("fedbat")
    update = random_update(spec, seed=2)
    steps = {"conv.weight": torch.tensor(0.0123), "fc.weight": torch.tensor([0.5])}
    update |= {n + STEP: s for n, s in steps.items()}
    payload = codec.encode(update, ctx(spec))
    b = body(codec, spec, payload)
    sent = np.frombuffer(bytes(b[:8]), "<f4")
    assert np.array_equal(sent, np.float32([0.0123, 0.5]))
    dec = codec.decode(payload, ctx(spec))
    assert sorted(dec) == sorted(spec.names)
    for t in spec.tensors:
        if t.name in steps:
            alpha = torch.tensor(float(np.float32(float(steps[t.name].reshape(-1)[0]))))
            assert torch.all((dec[t.name] == alpha) | (dec[t.name] == -alpha)), t.name
        else:
            assert torch.equal(dec[t.name], update[t.name]), t.name
    # |u| far below the step: both signs occur; u = +-step exactly: deterministic sign
    assert (dec["conv.weight"] > 0).any() and (dec["conv.weight"] < 0).any()
    sure = dict(update) | {"fc.weight": torch.full((5, 3), 0.5) * torch.tensor([1., -1., 1.])}
    d2 = codec.decode(codec.encode(sure, ctx(spec, rng_seed=3)), ctx(spec))
    assert torch.equal(d2["fc.weight"], sure["fc.weight"])


def test_fedbat_step_defaults_to_max_abs_of_the_update():
    spec = tiny_spec()
    codec = build_codec("fedbat")
    update = random_update(spec, seed=4)
    update["fc.weight"] = torch.zeros(5, 3)
    dec = codec.decode(codec.encode(update, ctx(spec)), ctx(spec))
    alpha = float(update["conv.weight"].abs().max())
    assert torch.all(dec["conv.weight"].abs() == alpha)
    # u at +-max|u| maps to itself
    at_max = update["conv.weight"].abs() == alpha
    assert torch.equal(dec["conv.weight"][at_max], update["conv.weight"][at_max])
    assert torch.all(dec["fc.weight"].abs() == np.finfo(np.float32).tiny)  # an all-zero tensor stays ~0


def test_fedbat_binarization_is_unbiased_inside_the_step():
    n = 4000
    spec = ModelSpec((TensorSpec("w", (n,), "weight"),))
    codec = build_codec("fedbat")
    alpha = 0.01
    target = alpha * torch.linspace(-1.5, 1.5, n)  # beyond +-alpha the estimate is of clip(u)
    update = {"w": target, "w" + STEP: torch.tensor(alpha)}
    trials = 400
    acc = torch.zeros(n, dtype=torch.float64)
    for i in range(trials):
        acc += codec.decode(codec.encode(update, ctx(spec, rng_seed=1000 + i)), ctx(spec))["w"].double()
    mean = acc / trials
    a32 = float(np.float32(alpha))  # the step travels as float32
    want = target.double().clamp(-a32, a32)
    std = torch.sqrt((a32 ** 2 - want ** 2).clamp(min=0) / trials)  # per-element std of the mean
    inside = std > 0
    z = (mean - want)[inside].sum() / torch.sqrt((std[inside] ** 2).sum())
    assert abs(float(z)) < 5
    # per element: 5 std, plus one flip of slack where p is so close to 0 or 1 that std is tiny
    assert float(((mean - want).abs() - 5 * std).max()) <= 2 * a32 / trials
    assert torch.equal(mean[~inside], want[~inside])  # |u| >= alpha: the sign is certain
    # a biased coder (e.g. P(+1) = 1/2 + u/alpha) would fail the aggregate test by a wide margin
    assert float((mean - want)[inside].abs().mean()) < 3 * float(std[inside].mean())


def test_fedbat_parametrization_values_gradients_and_finish():
    n = 10_000
    spec = ModelSpec((TensorSpec("w", (n,), "weight"), TensorSpec("b", (3,), "param")))
    param = build_uplink("fedbat", step=0.02).algorithm.parametrization(ctx(spec), {})
    assert isinstance(param, StochasticBinaryTraining) and param.names == ("w",)
    latent = param.init()
    assert set(latent) == {"w", "w" + LOG_STEP}
    assert torch.equal(latent["w"], torch.zeros(n))
    assert math.isclose(float(torch.exp(latent["w" + LOG_STEP].detach())), 0.02, rel_tol=1e-6)
    with torch.no_grad():
        latent["w"].copy_(0.02 * torch.linspace(-2, 2, n))
    out = param.deltas(latent, 0.3)["w"]
    alpha = torch.exp(latent["w" + LOG_STEP]).detach()
    b = torch.sign(out.detach())
    assert torch.allclose(out.detach().abs(), alpha.expand(n))
    u = latent["w"].detach()
    assert torch.all(b[u >= alpha] == 1) and torch.all(b[u <= -alpha] == -1)
    mid = u.abs() < 0.2 * alpha
    assert abs(float((b[mid] == 1).float().mean()) - 0.5) < 0.06
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(0))
    (out * upstream).sum().backward()
    assert torch.equal(latent["w"].grad, upstream)  # straight through: d/dΔ = 1
    expect = float(alpha) * float((b * upstream).sum())  # d/dα = b, times dα/dlogα = α
    assert math.isclose(float(latent["w" + LOG_STEP].grad), expect, rel_tol=1e-4, abs_tol=1e-7)
    fin = param.finish(latent)
    assert set(fin) == {"w", "w" + STEP}
    assert torch.equal(fin["w"], u.clamp(-float(alpha), float(alpha)))
    assert fin["w" + STEP].dtype == torch.float32 and torch.equal(fin["w" + STEP], alpha)


# ---------------------------------------------------------------------------------------------------------
# local training through the engine's client loop


def _runtime(uplink, model):
    spec = ModelSpec.from_model(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    initial = uplink.algorithm.init_global({t.name: tensors[t.name].detach().clone() for t in spec.tensors}, spec)
    downlink = Downlink(build_codec("fp32"), False, spec, 0, initial)
    return ClientRuntime(model, spec, uplink, downlink, run_seed=0), initial


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, 6, generator=g)
    teacher = torch.randn(5, 36, generator=g)
    return x, (x.reshape(64, -1) @ teacher.T).argmax(1)


def _loss(rt, params, x, y):
    rt.model.train()  # batch statistics, as in training; running stats are not what is compared
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(rt.model, params, (x,)), y))


def _model(kind):
    torch.manual_seed(0)
    if kind == "tiny":
        return Tiny()
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 5, bias=False))  # every weight is masked


# (method, codec options, lr, model, required drop of the loss with the update, ... with its masked part alone)
TRAINING = [("fedpm", {}, 5.0, "tiny", 0.1, 0.02), ("fedbat", {"step": 0.05}, 1.0, "tiny", 0.1, 0.02),
            ("fedpm", {}, 5.0, "linear", 0.3, 0.3), ("fedbat", {}, 1.0, "linear", 0.1, 0.1)]


@pytest.mark.parametrize("name, options, lr, model, drop, masked_drop", TRAINING,
                         ids=[f"{t[0]}-{t[3]}" for t in TRAINING])
def test_local_training_decreases_the_loss(name, options, lr, model, drop, masked_drop):
    """A few local steps through the engine's client loop (stochastic forward passes) lower the loss of
    the model the update describes, and the masked/binarized tensors take part in that."""
    uplink = build_uplink(name, **options)
    rt, glob = _runtime(uplink, _model(model))
    x, y = _batch()
    spec = rt.spec
    c = ctx(spec, rng_seed=5, reference=glob)
    param = uplink.algorithm.parametrization(c, glob)
    update, _ = local_train(rt, glob, x, y, LocalTraining(epochs=40, batch_size=64, lr=lr), param,
                            torch.Generator().manual_seed(0))
    masked = {t.name for t in spec.select(("weight",))}
    assert masked and set(spec.names) <= set(update)
    before = _loss(rt, glob, x, y)
    after = _loss(rt, {n: glob[n] + update[n] for n in spec.names}, x, y)
    only_masked = _loss(rt, {n: glob[n] + (update[n] if n in masked else 0) for n in spec.names}, x, y)
    assert after < before - drop, (before, after)
    assert only_masked < before - masked_drop, (before, only_masked)
    # what is sent decodes to a model about as good as the trained one
    dec = uplink.decode(uplink.encode(update, c), ctx(spec, reference=glob))
    sent = _loss(rt, {n: glob[n] + dec[n] for n in spec.names}, x, y)
    assert sent < before - drop / 2, (before, sent)
    if name == "fedbat":
        assert all(update[n + STEP].numel() == 1 for n in masked)
        assert all(float(update[n + STEP]) != np.float32(uplink.codec.options.step) for n in masked)  # the step was trained


@pytest.mark.parametrize("method", ["fedpm", "fedpm-sgd", "fedbat"])
def test_engine_rounds_with_each_method(method):
    from fedcodec.config import Config
    from fedcodec.data import make_synthetic_images
    from fedcodec.fl.simulation import run_round, setup

    cfg = Config(method=method, num_clients=4, clients_per_round=3, rounds=2, local_epochs=1, batch_size=16,
                 seed=1).validate()
    sim, state = setup(cfg, make_synthetic_images(120, 40, seed=0))
    for _ in range(cfg.rounds):
        state = run_round(sim, state)
    assert [r["accepted"] for r in state.records] == [3, 3]
    assert all(math.isfinite(r["accuracy"]) for r in state.records if "accuracy" in r)
    if method.startswith("fedpm"):  # j masks of K = 3 set: the posterior's mode clamp(j / K, 0.01, 0.99)
        # (the fedpm method), or its mean (1 + j) / (2 + K) (fedpm-sgd)
        levels = [0.01, 1 / 3, 2 / 3, 0.99] if method == "fedpm" else [1 / 5, 2 / 5, 3 / 5, 4 / 5]
        levels = torch.tensor(levels, dtype=torch.float64)
        for name, w0 in sim.runtime.uplink.algorithm.frozen(sim.spec).items():
            theta = state.global_params[name].double() / w0.double()
            assert float((theta.reshape(-1, 1) - levels).abs().min(1).values.max()) < 1e-6, name
            assert set(range(4)) == set((theta.reshape(-1, 1) - levels).abs().argmin(1).tolist()), name


# ---------------------------------------------------------------------------------------------------------
# malformed payloads and the entropy stage


@pytest.mark.parametrize("name", ["fedpm", "fedbat"])
def test_malformed_payloads_raise_payload_error(name):
    spec = tiny_spec()
    codec = build_codec(name)
    c = ctx(spec)
    payload = codec.encode(random_update(spec), c)
    b = body(codec, spec, payload)
    cases = {"truncated-envelope": payload[:-5], "extended-envelope": payload + b"\0"}
    cases["size"] = rewrap(codec, spec, b[:-1])
    cases["size-longer"] = rewrap(codec, spec, b + b"\0\0\0\0")
    head = 8 if name == "fedbat" else 0  # two float32 steps come first in a FedBAT body
    pad = bytearray(b)
    pad[head + 5] |= 0x80  # bit 47 of 42 mask bits
    cases["padding"] = rewrap(codec, spec, pad)
    nan = bytearray(b)
    nan[-4:] = np.float32(np.nan).tobytes()
    cases["nonfinite-dense"] = rewrap(codec, spec, nan)
    if name == "fedbat":
        for label, value in [("zero", 0.0), ("negative", -0.01), ("nan", np.nan), ("inf", np.inf), ("-0", -0.0)]:
            bad = bytearray(b)
            bad[4:8] = np.float32(value).tobytes()
            cases[f"step-{label}"] = rewrap(codec, spec, bad)
    reasons = {}
    for label, bad in cases.items():
        with pytest.raises(PayloadError) as info:
            codec.decode(bytes(bad), ctx(spec, client=9))
        assert info.value.client == 9 and "client 9" in str(info.value), label
        reasons[label] = info.value.reason
    assert reasons["size"] == reasons["size-longer"] == "size"
    assert reasons["padding"] == "field" and reasons["nonfinite-dense"] == "nonfinite"
    if name == "fedbat":
        assert {reasons[k] for k in reasons if k.startswith("step-")} == {"field"}
    for n in range(len(b)):  # every truncation of the body inside a correct envelope is rejected
        with pytest.raises(PayloadError):
            codec.decode(rewrap(codec, spec, b[:n]), c)


@pytest.mark.parametrize("name", ["fedpm", "fedbat"])
def test_entropy_coding_decodes_identically(name):
    spec = tiny_spec()
    fixed, coded = build_codec(name), build_codec(name, entropy=True)
    assert coded.codec_id == f"{name}+ec"
    ref = fedpm_global(fixed, spec, seed=3) if name == "fedpm" else None
    for i in range(5):
        update = random_update(spec, seed=i, scale=0.05)
        a = fixed.decode(fixed.encode(update, ctx(spec, rng_seed=i, reference=ref)), ctx(spec, reference=ref))
        b = coded.decode(coded.encode(update, ctx(spec, rng_seed=i, reference=ref)), ctx(spec, reference=ref))
        assert all(torch.equal(a[n], b[n]) for n in spec.names)


def test_fedpm_entropy_contexts_follow_the_reference():
    """Masks drawn near a polarised global theta cost far less than a bit each once range coded."""
    spec = ModelSpec((TensorSpec("w", (4000, 2), "weight"),))
    fixed, coded = build_codec("fedpm"), build_codec("fedpm", entropy=True)
    w0 = fixed.frozen(spec)["w"]
    theta = torch.where(torch.arange(8000).reshape(4000, 2) % 2 == 0, 0.03, 0.97)
    ref = {"w": w0 * theta}
    update = {"w": torch.zeros(4000, 2)}
    a = fixed.encode(update, ctx(spec, reference=ref))
    b = coded.encode(update, ctx(spec, reference=ref))
    assert coded.decode(b, ctx(spec, reference=ref))["w"].shape == (4000, 2)
    # h(0.03) = 0.19 bits: with one context for both halves the mixture would cost a full bit
    assert len(b) < 0.35 * len(a), (len(a), len(b))


def test_fedpm_entropy_body_longer_than_any_valid_one_is_rejected_up_front():
    spec = tiny_spec()
    codec = build_codec("fedpm", entropy=True)
    c = ctx(spec)
    b = body(codec, spec, codec.encode(random_update(spec), c))
    with pytest.raises(PayloadError) as info:
        codec.decode(rewrap(codec, spec, bytes(b) + bytes(4 * (N_MASKED + 16))), c)
    assert info.value.reason == "size" and "at most" in str(info.value)


def test_bad_options_are_config_errors():
    for bad in (-1, 2**64, 1.5, "x", True):
        with pytest.raises(ConfigError):
            build_codec("fedpm", weight_seed=bad)
    for bad in (0, -0.1, float("nan"), float("inf"), 1e-50, "big"):
        with pytest.raises(ConfigError):
            build_codec("fedbat", step=bad)
    assert build_codec("fedpm", weight_seed=2**64 - 1).options.weight_seed == 2**64 - 1


def test_fedpm_eval_mask_threshold_and_expected():
    spec = tiny_spec()
    params = random_update(spec, seed=3, scale=0.2)
    for mode in ("threshold", "expected"):
        alg = build_uplink("fedpm", eval_mask=mode).algorithm
        g = alg.init_global(params, spec)
        w0 = alg.frozen(spec)
        theta = torch.tensor([0.0, 0.2, 0.5, 0.51, 0.9, 1.0])
        name = "fc.weight"
        t = torch.full(w0[name].shape, 0.3)
        t.view(-1)[:6] = theta
        model = g | {name: w0[name] * t}
        out = alg.eval_params(model, spec, 5)
        if mode == "expected":
            assert all(torch.equal(out[n], model[n]) for n in model)
        else:  # keep exactly the weights with theta > 1/2, whatever the seed
            keep = out[name].view(-1)[:6] / w0[name].view(-1)[:6]
            assert keep.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
            assert torch.equal(out[name], alg.eval_params(model, spec, 99)[name])


def test_fedpm_adam_scores_train_in_an_optimizer_of_their_own():
    from fedcodec.fl.client import OptimizerPair, local_optimizer

    uplink = build_uplink("fedpm", optimizer="adam", score_lr=0.2)
    rt, glob = _runtime(uplink, _model("tiny"))
    c = ctx(rt.spec, rng_seed=5, reference=glob)
    param = uplink.algorithm.parametrization(c, glob)
    latent = param.init()
    trainable = {n: p for n, p in rt.model.named_parameters() if n not in latent}
    opt = local_optimizer(rt.task, LocalTraining(epochs=1, batch_size=8, lr=0.05), trainable, latent, param)
    assert isinstance(opt, OptimizerPair)
    assert isinstance(opt.main, torch.optim.SGD) and isinstance(opt.latent, torch.optim.Adam)
    assert [g["lr"] for g in opt.latent.param_groups] == [0.2]
    assert {id(p) for g in opt.main.param_groups for p in g["params"]} == {id(p) for p in trainable.values()}
    # one Adam step moves every score with a nonzero gradient by about lr, whatever the gradient's size
    for v in latent.values():
        v.grad = torch.full_like(v, 1e-2)
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    before = {n: v.detach().clone() for n, v in latent.items()}
    opt.step()
    for n, v in latent.items():
        assert torch.allclose(before[n] - v.detach(), torch.full_like(v, 0.2), atol=1e-5), n
    # the default (sgd) keeps one optimizer with the scores in a group at lr * score_lr_scale
    sgd = build_uplink("fedpm", score_lr_scale=3.0).algorithm.parametrization(c, glob)
    one = local_optimizer(rt.task, LocalTraining(epochs=1, batch_size=8, lr=0.05), trainable, sgd.init(), sgd)
    assert isinstance(one, torch.optim.SGD) and one.param_groups[-1]["lr"] == pytest.approx(0.15)


def test_fedpm_bad_training_options_are_config_errors():
    for bad in ({"optimizer": "rmsprop"}, {"score_lr": 0}, {"score_lr": float("nan")}, {"eval_mask": "mean"}):
        with pytest.raises(ConfigError):
            build_codec("fedpm", **bad)


def test_fedpm_coded_mask_length_is_its_conditional_entropy():
    """The range-coded mask costs its empirical entropy given the contexts (the buckets of the
    reference theta both ends hold), plus the count tables and a few bytes of flush: the paper's
    "< 1 bit per parameter" measured as len() of the payload."""
    from fedcodec.codecs.fedpm import CONTEXTS, theta_contexts

    n = 40000
    spec = ModelSpec((TensorSpec("w", (n // 8, 8), "weight"),))
    coded, fixed = build_codec("fedpm", entropy=True), build_codec("fedpm")
    w0 = coded.frozen(spec)["w"]
    g = torch.Generator().manual_seed(2)
    theta = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])[torch.randint(0, 7, (n,), generator=g)]
    ref = {"w": w0 * theta.reshape(n // 8, 8)}
    update = {"w": w0 * (theta + 0.05 * torch.randn(n, generator=g)).clamp(0, 1).reshape(n // 8, 8) - ref["w"]}
    c = ctx(spec, rng_seed=4, reference=ref)
    payload = coded.encode(update, c)
    bits = ((coded.decode(payload, ctx(spec, reference=ref))["w"] + ref["w"]) / w0).reshape(-1).round().numpy()
    buckets = theta_contexts(ref["w"].reshape(-1).numpy(), w0.reshape(-1).numpy())
    entropy = 0.0
    for k in range(CONTEXTS):
        sel = bits[buckets == k]
        if sel.size:
            p = sel.mean()
            entropy += sel.size * (0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p)))
    overhead = len(fixed.encode(update, c)) - math.ceil(n / 8)  # envelope and fields, no mask bits
    mask_bytes = len(payload) - overhead
    assert entropy / 8 < mask_bytes <= entropy / 8 * 1.01 + 8 * CONTEXTS + 4 + 16, (mask_bytes, entropy / 8)
    assert mask_bytes < 0.75 * n / 8  # well under a bit per weight
