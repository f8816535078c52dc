"""Tasks: the loss local training minimises under every algorithm, and the round's evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedcodec.codecs import ModelSpec, build_codec, build_uplink
from fedcodec.codecs.fedmrn import noise_tensors
from fedcodec.errors import ConfigError
from fedcodec.fl.client import Classification as ReExported
from fedcodec.fl.client import ClientRuntime, LocalTraining, local_train
from fedcodec.fl.downlink import Downlink
from fedcodec.fl.task import Classification, TaskLoss
from helpers import Tiny, ctx


class Regression:
    """Mean squared error of the model's output against real-valued targets (training only)."""

    def loss(self, model, x, y, gen):
        return F.mse_loss(model(x), y)


def _runtime(model: nn.Module, codec, task) -> tuple[ClientRuntime, dict]:
    spec = ModelSpec.from_model(model)
    glob = {n: p.detach().clone() for n, p in model.named_parameters()} | \
        {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
    return ClientRuntime(model, spec, codec, Downlink(build_codec("fp32"), False, spec, 0, glob), run_seed=0,
                         task=task), glob


def test_classification_is_importable_from_the_client_module():
    assert ReExported is Classification


def test_task_loss_under_a_parametrization_is_the_plain_cross_entropy_bit_for_bit():
    """Classification runs under FedMRN/FedPM/FedBAT must not change: the same float operations."""
    torch.manual_seed(0)
    model = Tiny().train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
    deltas = {n: (torch.randn(p.shape, generator=g) * 0.1).requires_grad_() for n, p in model.named_parameters()
              if n.endswith("weight")}
    plain = F.cross_entropy(functional_call(model, {n: p.detach() + deltas[n] for n, p in model.named_parameters()
                                                    if n in deltas}, (x,)), y)
    grads = torch.autograd.grad(plain, list(deltas.values()))
    wrapped = functional_call(TaskLoss(Classification(), model),
                              {f"model.{n}": p.detach() + deltas[n] for n, p in model.named_parameters()
                               if n in deltas}, (x, y, g))
    assert torch.equal(plain, wrapped)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(wrapped, list(deltas.values()))))


def test_fedmrn_trains_a_regression_task_through_local_train():
    """The task's loss, not cross-entropy, drives FedMRN's masks: a teacher that is exactly the
    global model plus noise * (a hidden mask) is recovered from the decoded payload."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    uplink = build_uplink("fedmrn", alpha=0.5)
    rt, glob = _runtime(model, uplink, Regression())
    c = ctx(rt.spec, rng_seed=5, reference=glob)
    noise = noise_tensors(uplink.codec.options, c.seed, rt.spec.select(("weight",)))["weight"]
    g = torch.Generator().manual_seed(1)
    hidden = (torch.rand(noise.shape, generator=g) < 0.5).float()
    x = torch.randn(256, 8, generator=g)
    y = x @ (glob["weight"] + noise * hidden).T + glob["bias"]
    update, last = local_train(rt, glob, x, y, LocalTraining(epochs=30, batch_size=64, lr=0.3),
                               uplink.algorithm.parametrization(c, glob), torch.Generator().manual_seed(0))
    dec = uplink.decode(uplink.encode(update, c), ctx(rt.spec, reference=glob))

    def mse(w: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.mse_loss(x @ w.T + b, y))

    before = mse(glob["weight"], glob["bias"])
    after = mse(glob["weight"] + dec["weight"], glob["bias"] + dec["bias"])
    assert before > 0.2 and after < 1e-5 * before, (before, after)
    assert last < 1e-4  # the loss local training reports is the task's (the regression error)
    sent = dec["weight"] != 0
    clear = noise.abs() > 0.05  # where the noise is tiny, either bit fits the teacher
    assert torch.equal(sent[clear], hidden.bool()[clear])


def test_classification_evaluates_accuracy_and_loss_on_its_test_set():
    torch.manual_seed(0)
    model = Tiny()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2500, 1, 6, 6, generator=g), torch.randint(0, 5, (2500,), generator=g)
    task = Classification(x, y)
    rt, glob = _runtime(model, build_codec("fp32"), task)
    with torch.no_grad():
        model.eval()
        out = model(x)
        expect_acc = int((out.argmax(1) == y).sum()) / len(y)
        expect_loss = float(F.cross_entropy(out, y))
    got = task.evaluate(rt, glob, {})
    assert list(got) == ["accuracy", "test_loss"]
    assert got["accuracy"] == expect_acc
    assert got["test_loss"] == pytest.approx(expect_loss, rel=1e-5)
    with pytest.raises(ConfigError, match="no test set"):
        Classification().evaluate(rt, glob, {})
    with pytest.raises(ConfigError, match="same length"):
        Classification(x, y[:10])
