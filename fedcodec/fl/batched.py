"""Several sampled clients trained at once on one device: the ``batch_clients`` config key.

A round's clients are independent, so K of them can take each local step together: their
parameters, BatchNorm running statistics and ``num_batches_tracked`` counters are stacked along a
new leading dimension, the forward pass is :func:`torch.func.vmap` over
:func:`torch.func.functional_call` of the task's loss (so convolutions run as one grouped
convolution, BatchNorm keeps statistics per client), and ordinary autograd takes the gradient of
the sum of the K losses, which gives every client's slice its own gradient. SGD (momentum, weight
decay) and Adam are elementwise, so one optimizer over the stacked tensors takes exactly each
client's step; the task's lr scale groups and a parametrization's latent group are kept
(:func:`~fedcodec.fl.client.local_optimizer`).

What each client sees is what it sees in :func:`~fedcodec.fl.client.client_fit`: its own decoded
broadcast, its own shuffling generator drawn in the same order (one permutation per epoch), and
its own parametrization (FedMRN's noise and masks, FedPM's and FedBAT's draws): the deltas are
computed outside the vmap, client by client, with each client's own objects and generator, in the
order its sequential training draws them, then stacked. Its update is encoded by the same code
(:func:`~fedcodec.fl.client.close_round`), so stores (error feedback), metrics and payload formats
are the same. Only the floating-point arithmetic differs: the grouped kernels sum in another
order, so updates and losses agree with sequential training to float tolerance, not bit for bit
(the bit-exact CPU promise holds for ``batch_clients = 1``, the default).

Clients share steps only when they take the same steps: a group holds clients with the same
number of examples (the same batch sizes at every step), at most K of them, in the round's client
order. Everything else trains one client at a time with :func:`~fedcodec.fl.client.client_fit`
(:func:`batching_blocked` says why):

- a codec that fits itself on the client (a pre-pass and setup message: the AE codec);
- ``keep_optimizer_state`` (the kept state is per client, per tensor);
- a model with client-local tensors;
- a task whose loss draws from the training generator (learned compression's noise); a task
  declares that it does not with ``loss_uses_generator = False`` (:class:`~fedcodec.fl.task.Classification`);
- integer buffers other than BatchNorm's ``num_batches_tracked``, and BatchNorm with
  ``momentum=None`` (its cumulative average reads the counter as a Python number);
- a group of one (a client whose size no other client of the round shares), and a client whose
  broadcast was refused, which leaves its group.

A model that draws random numbers in its forward pass (dropout) is refused by ``vmap`` itself.

Wall time: a group's training time is shared equally by its clients (``info["seconds"]["train"]``),
so a round's ``train_seconds`` is still the time spent training.

On the CPU this is slower than one client at a time (0.5x to 1x on CNN4 at batch 64: a
convolution already keeps a core busy, and vmap's batch rules add layout copies; measure with
``benchmarks/batched.py``); it is meant for a GPU, where one small client leaves most of the device idle.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from ..codecs import Parametrization, Update
from .client import (ClientRuntime, LocalTraining, OpenRound, batches, close_round, client_fit, local_optimizer,
                     open_round, steps_per_epoch, train_and_encode, training_draws)
from .downlink import DownlinkError
from .task import TaskLoss

#: client_fit's signature; what :func:`fit_clients` calls for a client it trains alone
ClientFit = Callable[..., tuple[bytes, dict]]


@dataclass(frozen=True)
class ClientJob:
    """One client's part of a round: its broadcast, training data (on the runtime's device) and store."""

    client: int
    broadcast: bytes
    x: torch.Tensor
    y: torch.Tensor
    state: dict[str, torch.Tensor] | None


def batching_blocked(runtime: ClientRuntime, cfg: LocalTraining) -> str | None:
    """Why this run's clients cannot train in batches (None: they can); see the module docstring."""
    if runtime.uplink.setup is not None:
        return f"codec {runtime.uplink.codec_id!r} fits itself on the client (a pre-pass)"
    if cfg.keep_state:
        return "clients keep their optimizer state between rounds"
    if cfg.max_steps is not None:
        return "local training stops after max_steps steps"
    if runtime.local:
        return "the model has client-local tensors"
    if getattr(runtime.task, "loss_uses_generator", True):
        return f"the task's loss ({type(runtime.task).__name__}) may draw from the training generator"
    modules = dict(runtime.model.named_modules())
    for name, buf in runtime.model.named_buffers():
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        if buf.is_floating_point():
            continue
        if not (isinstance(module, _BatchNorm) and attr == "num_batches_tracked"):
            return f"the model has an integer buffer {name!r} that is not a BatchNorm counter"
        if module.momentum is None:
            return f"BatchNorm {owner!r} has momentum=None (a cumulative average)"
    return None


def client_groups(jobs: list[ClientJob], size: int) -> list[list[ClientJob]]:
    """The jobs in groups of at most ``size`` clients with the same number of examples, in the order
    of each size's first client, each size's clients in their order."""
    by_size: dict[int, list[ClientJob]] = {}
    for job in jobs:
        by_size.setdefault(len(job.x), []).append(job)
    return [same[i:i + size] for same in by_size.values() for i in range(0, len(same), size)]


def fit_clients(runtime: ClientRuntime, jobs: list[ClientJob], cfg: LocalTraining, round_num: int,
                batch_clients: int, fit: ClientFit = client_fit) -> dict[int, tuple[bytes, dict] | DownlinkError]:
    """Every job's round: ``{client: (payload, info)}`` as :func:`~fedcodec.fl.client.client_fit`
    returns them, or the :class:`~fedcodec.fl.downlink.DownlinkError` of a client that refused its
    broadcast (its store is as it was). With ``batch_clients`` > 1 and a run that allows it
    (:func:`batching_blocked`), groups of up to ``batch_clients`` clients (:func:`client_groups`)
    train together (:func:`train_group`); every other client is ``fit(...)``, one at a time."""
    results: dict[int, tuple[bytes, dict] | DownlinkError] = {}
    batched = batch_clients > 1 and batching_blocked(runtime, cfg) is None
    for group in client_groups(jobs, batch_clients) if batched else [[job] for job in jobs]:
        if len(group) == 1:
            job = group[0]
            try:
                results[job.client] = fit(runtime, job.broadcast, job.x, job.y, cfg, round_num, job.client,
                                          state=job.state)
            except DownlinkError as err:
                results[job.client] = err
            continue
        opened: list[tuple[OpenRound, ClientJob]] = []
        for job in group:
            try:
                opened.append((open_round(runtime, job.broadcast, len(job.x), round_num, job.client, job.state),
                               job))
            except DownlinkError as err:
                results[job.client] = err
        if len(opened) == 1:
            (one, job), = opened
            results[job.client] = train_and_encode(runtime, one, job.x, job.y, cfg)
        elif opened:
            results.update(fit_group(runtime, opened, cfg))
    return results


def fit_group(runtime: ClientRuntime, opened: list[tuple[OpenRound, ClientJob]],
              cfg: LocalTraining) -> dict[int, tuple[bytes, dict]]:
    """Train a group of opened client-rounds together and encode each one's update."""
    draws = [training_draws(runtime, one, cfg) for one, _ in opened]
    t0 = time.perf_counter()
    updates, losses = train_group(runtime, [one.on_device for one, _ in opened], [job.x for _, job in opened],
                                  [job.y for _, job in opened], cfg, [p for p, _ in draws], [g for _, g in draws])
    share = (time.perf_counter() - t0) / len(opened)
    return {one.client: close_round(runtime, one, update, loss, share)
            for (one, _), update, loss in zip(opened, updates, losses)}


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.detach() for v in values])


def train_group(runtime: ClientRuntime, global_params: list[Update], xs: list[torch.Tensor], ys: list[torch.Tensor],
                cfg: LocalTraining, params: list[Parametrization | None],
                shuffles: list[torch.Generator]) -> tuple[list[Update], list[float]]:
    """:func:`~fedcodec.fl.client.local_train` of K clients at once: client k trains from
    ``global_params[k]`` on ``(xs[k], ys[k])`` with parametrization ``params[k]`` and shuffling
    generator ``shuffles[k]``. The clients hold the same number of examples, and the run passes
    :func:`batching_blocked`. Returns each client's update (on the runtime's device) and the mean loss
    of its last epoch.

    ``runtime.model`` is only the template of the forward pass: its tensors are not trained (the
    clients' tensors are stacked copies), but its ``num_batches_tracked`` counters advance as
    sequential training leaves them, client after client."""
    model, spec, k = runtime.model, runtime.spec, len(global_params)
    num = len(xs[0])
    if any(len(x) != num for x in xs):
        raise ValueError(f"a group trains clients of one size, got sizes {[len(x) for x in xs]}")
    total = cfg.epochs * steps_per_epoch(num, cfg.batch_size)
    if len({p is None for p in params}) > 1:
        raise ValueError("a group trains clients that all have a parametrization, or none")
    latents = [p.init() if p is not None else {} for p in params]  # each client's draws, in its order
    frozen = set(latents[0])
    base = {t.name: _stack([g[t.name] for g in global_params]) for t in spec.tensors}
    # the clients' trained tensors start from the broadcast in the model's dtypes (runtime.load copies)
    trainable = {n: base[n].to(p.dtype, copy=True).requires_grad_() for n, p in model.named_parameters()
                 if n not in frozen}
    latent = {n: _stack([lat[n] for lat in latents]).requires_grad_() for n in latents[0]}
    buffers = {}
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            buffers[name] = base[name].to(buf.dtype, copy=True)
        else:  # BatchNorm's counter: client i starts where client i - 1 of a sequential round stops
            steps = torch.arange(k, device=buf.device, dtype=buf.dtype) * total
            buffers[name] = (buf.detach() + steps.view(-1, *[1] * buf.dim())).contiguous()
    opt = local_optimizer(runtime.task, cfg, trainable, latent, params[0])
    loss_fn = TaskLoss(runtime.task, model)

    def client_loss(weights: dict[str, torch.Tensor], bufs: dict[str, torch.Tensor], xb: torch.Tensor,
                    yb: torch.Tensor) -> torch.Tensor:
        return functional_call(loss_fn, ({f"model.{n}": w for n, w in weights.items()},
                                         {f"model.{n}": b for n, b in bufs.items()}), (xb, yb, None))

    losses_of = vmap(client_loss)
    x_all, y_all = torch.stack(xs), torch.stack(ys)
    rows = torch.arange(k, device=x_all.device).unsqueeze(1)
    was_training = model.training
    model.train()
    step, last = 0, torch.full((k,), math.nan, dtype=torch.float64)
    try:
        for _ in range(cfg.epochs):
            loss_sum = torch.zeros(k, dtype=torch.float64, device=x_all.device)
            count = 0
            for idx in zip(*(batches(num, cfg.batch_size, gen, x_all.device) for gen in shuffles)):
                idx = torch.stack(idx)
                weights = dict(trainable)
                if latent:
                    progress = (step + 1) / total
                    deltas = [p.deltas({n: latent[n][i] for n in latent}, progress) for i, p in enumerate(params)]
                    for n in deltas[0]:
                        weights[n] = base[n] + torch.stack([d[n] for d in deltas])
                losses = losses_of(weights, buffers, x_all[rows, idx], y_all[rows, idx])
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()
                opt.step()
                loss_sum += losses.detach().to(torch.float64) * idx.shape[1]
                count += idx.shape[1]
                step += 1
            last = loss_sum / max(count, 1)
    finally:
        model.train(was_training)
    updates: list[Update] = [p.finish({n: latent[n][i] for n in latent}) if p is not None else {}
                             for i, p in enumerate(params)]
    with torch.no_grad():
        for i, update in enumerate(updates):
            for t in spec.tensors:
                if t.name not in frozen:
                    trained = trainable[t.name] if t.name in trainable else buffers[t.name]
                    update[t.name] = trained[i] - global_params[i][t.name]
        for name, buf in model.named_buffers():
            if not buf.is_floating_point():
                buf.copy_(buffers[name][-1])
    return updates, last.tolist()
