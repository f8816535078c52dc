"""The client function: decode the broadcast, train locally, encode the update.

This is the one piece of client code in fedcodec; the in-process simulator and the Flower ClientApp
both call :func:`client_fit`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call

from ..codecs import CodecContext, ModelSpec, Parametrization, Prepass, Update, Uplink
from ..errors import ConfigError
from .device import to_cpu, to_device
from .downlink import Downlink
from . import rng as rngs
from .task import Classification, Task, TaskLoss


@dataclass(frozen=True)
class LocalTraining:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # "sgd" or "adam"
    #: keep the optimizer's state (Adam's moments, SGD's momentum buffer) in the client's store from
    #: one round to the next instead of starting it afresh (never sent). Under a codec's
    #: parametrization only the tensors trained directly keep theirs; the codec's latents start afresh
    keep_state: bool = False
    #: stop local training after this many steps (batches), within the first epoch that reaches it
    #: (None: every batch of ``epochs`` epochs). FedSGD-style rounds: ``max_steps=1``
    max_steps: int | None = None

    def total_steps(self, num: int) -> int:
        """The steps of one round of local training on ``num`` examples."""
        total = self.epochs * steps_per_epoch(num, self.batch_size)
        return total if self.max_steps is None else min(total, self.max_steps)


LOCAL = "local/"  # client-store key prefix of a client's personalized tensors
OPTIM = "optim/"  # client-store key prefix of its kept optimizer state


def _kept_optimizers(opt) -> tuple[torch.optim.Optimizer, ...]:
    """The optimizers whose state a client keeps: ``opt`` itself, or an :class:`OptimizerPair`'s
    :attr:`~OptimizerPair.kept` ones."""
    return opt.kept if isinstance(opt, OptimizerPair) else (opt,)


def _owner(opt, p: torch.Tensor) -> torch.optim.Optimizer:
    """The kept optimizer that steps ``p`` (a plain optimizer: itself; a pair: the main one unless
    another kept optimizer holds ``p``)."""
    kept = _kept_optimizers(opt)
    if len(kept) > 1:
        for o in kept[1:]:
            if any(q is p for g in o.param_groups for q in g["params"]):
                return o
    return kept[0]


def restore_optimizer(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                      state: dict[str, torch.Tensor]) -> None:
    """Give ``opt`` (an optimizer or an :class:`OptimizerPair`: each kept optimizer its own
    parameters') the per-parameter state kept in a client's store (nothing on a first round)."""
    for name, p in params.items():
        prefix = f"{OPTIM}{name}/"
        # per-element state joins its parameter's device; scalars (Adam's step count) stay on the CPU
        kept = {k[len(prefix):]: v.to(p.device, copy=True) if v.dim() else v.clone() for k, v in state.items()
                if k.startswith(prefix)}
        for key, value in kept.items():
            if value.dim() and value.shape != p.shape:
                raise ConfigError(f"the kept optimizer state {prefix}{key} has shape {tuple(value.shape)}, the "
                                  f"parameter {tuple(p.shape)}: the model changed; start a new run")
        if kept:
            _owner(opt, p).state[p] = kept


def keep_optimizer(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                   state: dict[str, torch.Tensor]) -> None:
    """Put the kept optimizers' per-parameter state (see :func:`restore_optimizer`) in a client's store."""
    for o in _kept_optimizers(opt):
        for name, p in params.items():
            for key, value in o.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    state[f"{OPTIM}{name}/{key}"] = value.detach().to("cpu", copy=True)


@dataclass
class ClientRuntime:
    """What a client process holds across rounds: its model object, the spec and the codecs.
    (Per-client state, such as error-feedback memory, is kept by the caller: see :func:`client_fit`.)

    The model is moved to ``device`` once, here. What goes in and out stays on the CPU: :meth:`load`
    takes tensors on any device, :meth:`snapshot` and the client's store hold CPU tensors, and
    :func:`client_fit` hands its codec CPU tensors (:mod:`fedcodec.fl.device`)."""

    model: nn.Module
    spec: ModelSpec
    uplink: Uplink
    downlink: Downlink
    run_seed: int
    task: Task = field(default_factory=Classification)
    #: personalized tensors: trained by each client, kept in its store, never sent (the model's
    #: other tensors make up ``spec``). A client starts from the model's initial values.
    local: frozenset[str] = frozenset()
    #: where the model trains and evaluates
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.model.to(self.device)  # in place: a CPU model stays the very same tensors
        self.tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        overlap = self.local & set(self.spec.names)
        if overlap:
            raise ConfigError(f"tensors {sorted(overlap)} are both local and shared; build the spec with "
                              "ModelSpec.from_model(model, local=...)")
        self.local_init = {n: self.tensors[n].detach().to("cpu", copy=True) for n in sorted(self.local)}

    def load(self, params: Update) -> None:
        with torch.no_grad():
            for name, value in params.items():
                self.tensors[name].copy_(value)

    def snapshot(self) -> Update:
        """The shared tensors' current values, as CPU copies."""
        return {t.name: self.tensors[t.name].detach().to("cpu", copy=True) for t in self.spec.tensors}

    def local_tensors(self, state: dict[str, torch.Tensor]) -> Update:
        """A client's personalized tensors as its store holds them (initial values if it has none yet)."""
        return {n: state.get(LOCAL + n, v) for n, v in self.local_init.items()}

    def load_local(self, state: dict[str, torch.Tensor] | None) -> None:
        """Load a client's personalized tensors from its store into the model."""
        if not self.local:
            return
        if state is None:
            raise ConfigError("a model with client-local tensors needs the client's store (state=...)")
        self.load(self.local_tensors(state))

    def save_local(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.local and state is not None:
            state.update({LOCAL + n: self.tensors[n].detach().to("cpu", copy=True) for n in self.local_init})


def batches(num: int, batch_size: int, gen: torch.Generator,
            device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Positions of one shuffled epoch in batches, on ``device`` (None: the CPU); a trailing batch of
    one sample is dropped (BatchNorm cannot train on a single sample). The permutation is drawn from
    ``gen`` on the CPU, so it is the same on every device."""
    perm = torch.randperm(num, generator=gen)
    if device is not None:
        perm = perm.to(device)
    for start in range(0, num, batch_size):
        chunk = perm[start:start + batch_size]
        if len(chunk) > 1:
            yield chunk


def steps_per_epoch(num: int, batch_size: int) -> int:
    full, rest = divmod(num, batch_size)
    return full + (1 if rest > 1 else 0)


def param_groups(params: dict[str, nn.Parameter], lr_scales: dict[str, float], lr: float) -> list[dict]:
    """Optimizer groups: parameters whose name starts with a prefix in ``lr_scales`` train at
    ``lr`` times its scale (a task's choice, e.g. a faster entropy model), the rest at ``lr``."""
    by_scale: dict[float, list[nn.Parameter]] = {}
    for name, p in params.items():
        scale = next((v for k, v in lr_scales.items() if name.startswith(k)), 1.0)
        by_scale.setdefault(scale, []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in by_scale.items()]


class OptimizerPair:
    """Several optimizers stepped as one: the model's tensors under the client's optimizer
    (``main``), tensors a task trains with an optimizer of their own (``extra``, see
    :func:`local_optimizer`), and a parametrization's latents under theirs
    (:attr:`Parametrization.optimizer`; None: none). A client keeps the state of :attr:`kept`
    (``main`` and ``extra``) between rounds; the latents start afresh. :attr:`state` is ``main``'s."""

    def __init__(self, main: torch.optim.Optimizer, latent: torch.optim.Optimizer | None = None,
                 extra: tuple[torch.optim.Optimizer, ...] = ()):
        self.main, self.latent, self.extra = main, latent, tuple(extra)

    @property
    def state(self):
        return self.main.state

    @property
    def kept(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.main, *self.extra)

    def _all(self) -> tuple[torch.optim.Optimizer, ...]:
        return (*self.kept, *((self.latent,) if self.latent is not None else ()))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._all():
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self._all():
            o.step()


def _optimizer(kind: str, groups: list[dict], cfg: LocalTraining, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_optimizer(task: Task, cfg: LocalTraining, trainable: dict[str, torch.Tensor], latent: Update,
                    param: Parametrization | None) -> torch.optim.Optimizer | OptimizerPair:
    """The optimizer of local training: ``trainable`` in the task's lr scale groups (:func:`param_groups`),
    then a parametrization's ``latent`` tensors in a group of their own, or in an optimizer of their
    own where the parametrization names one (:class:`OptimizerPair`). Both optimizers are elementwise,
    so it serves :mod:`fedcodec.fl.batched`'s tensors stacked over clients as well.

    A task may declare ``local_optimizers`` ({parameter-name prefix: "sgd" or "adam"}): the
    trainable tensors whose name starts with such a prefix train under an optimizer of that kind of
    their own (at ``cfg.lr`` times the task's lr scale for them, as in :func:`param_groups`), the
    rest under ``cfg.optimizer``; with ``cfg.keep_state`` both keep their state (learned compression:
    plain SGD on the shared transforms, a client-local entropy model under its own Adam)."""
    scales = getattr(task, "lr_scales", None) or {}
    own_kinds: dict[str, str] = getattr(task, "local_optimizers", None) or {}
    extra: list[torch.optim.Optimizer] = []
    if own_kinds:
        rest = dict(trainable)
        by_kind: dict[str, dict[str, torch.Tensor]] = {}
        for name in list(rest):
            prefix = next((k for k in own_kinds if name.startswith(k)), None)
            if prefix is not None:
                by_kind.setdefault(own_kinds[prefix], {})[name] = rest.pop(name)
        for kind, ps in by_kind.items():
            if kind not in ("sgd", "adam"):
                raise ConfigError(f"the task's local optimizer for {sorted(ps)[0]!r}... is {kind!r}; "
                                  "choose sgd or adam")
            extra.append(_optimizer(kind, param_groups(ps, scales, cfg.lr), cfg, cfg.lr))
        trainable = rest
    groups = param_groups(trainable, scales, cfg.lr)
    # a parametrization's latents get no weight decay (it would pull FedBAT's log step sizes and
    # FedPM's scores toward arbitrary values)
    if latent and param.optimizer is not None:
        lr = param.lr if param.lr is not None else cfg.lr * param.lr_scale
        own = _optimizer(param.optimizer, [{"params": list(latent.values()), "lr": lr, "weight_decay": 0.0}],
                         cfg, lr)
        if extra:
            main = _optimizer(cfg.optimizer, groups, cfg, cfg.lr) if groups else extra.pop(0)
            return OptimizerPair(main, own, tuple(extra))
        return OptimizerPair(_optimizer(cfg.optimizer, groups, cfg, cfg.lr), own) if groups else own
    if latent:
        groups.append({"params": list(latent.values()), "lr": cfg.lr * param.lr_scale, "weight_decay": 0.0})
    if extra:
        main = _optimizer(cfg.optimizer, groups, cfg, cfg.lr) if groups else extra.pop(0)
        return OptimizerPair(main, None, tuple(extra)) if extra else main
    return _optimizer(cfg.optimizer, groups, cfg, cfg.lr)


def local_train(runtime: ClientRuntime, global_params: Update, x: torch.Tensor, y: torch.Tensor,
                cfg: LocalTraining, param: Parametrization | None, shuffle: torch.Generator,
                snapshots: list[Update] | None = None, snapshot_steps: frozenset[int] = frozenset(),
                store: dict[str, torch.Tensor] | None = None) -> tuple[Update, float]:
    """Train from ``global_params`` on (x, y); return the update and the mean loss of the last epoch.
    ``global_params``, ``x``, ``y`` and ``param`` are on the model's device, and so is the update.
    After each step whose number (1-based) is in ``snapshot_steps``, the update so far is appended
    to ``snapshots`` (a codec's pre-pass; plain training only). With ``cfg.keep_state`` the optimizer
    starts from the state kept in ``store`` and leaves its new state there."""
    runtime.load(global_params)
    model = runtime.model
    model.train()
    latent = param.init() if param is not None else {}
    frozen = set(latent)
    trainable = {n: p for n, p in model.named_parameters() if n not in frozen}
    opt = local_optimizer(runtime.task, cfg, trainable, latent, param)
    keep = cfg.keep_state and store is not None
    if keep:
        restore_optimizer(opt, trainable, store)
    total = cfg.total_steps(len(x))
    step, last_loss = 0, math.nan
    for _ in range(cfg.epochs):
        if step >= total:
            break
        loss_sum, count = 0.0, 0
        for idx in batches(len(x), cfg.batch_size, shuffle, x.device):
            if step >= total:
                break
            xb, yb = x[idx], y[idx]
            if param is None:
                loss = runtime.task.loss(model, xb, yb, shuffle)
            else:
                deltas = param.deltas(latent, (step + 1) / total)
                loss = functional_call(TaskLoss(runtime.task, model),
                                       {f"model.{n}": global_params[n] + d for n, d in deltas.items()},
                                       (xb, yb, shuffle))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().item() * len(idx)
            count += len(idx)
            step += 1
            if step in snapshot_steps and snapshots is not None:
                with torch.no_grad():
                    snapshots.append({t.name: runtime.tensors[t.name].detach() - global_params[t.name]
                                      for t in runtime.spec.tensors})
        last_loss = loss_sum / max(count, 1)
    if keep:
        keep_optimizer(opt, trainable, store)
    update: Update = param.finish(latent) if param is not None else {}
    with torch.no_grad():
        for t in runtime.spec.tensors:
            if t.name not in frozen:
                update[t.name] = runtime.tensors[t.name].detach() - global_params[t.name]
    return update, last_loss


def prepass(runtime: ClientRuntime, global_params: Update, x: torch.Tensor, y: torch.Tensor, cfg: LocalTraining,
            plan: Prepass, shuffle: torch.Generator) -> list[Update]:
    """A codec's pre-pass: plain local training from ``global_params`` for ``plan.epochs`` epochs
    (None: ``cfg.epochs``), recording the update ``plan.snapshots`` times at evenly spaced steps
    (the last one at the final step), returned as CPU tensors for the codec. The trained model is
    discarded."""
    epochs = plan.epochs or cfg.epochs
    total = replace(cfg, epochs=epochs).total_steps(len(x))
    count = min(plan.snapshots, total)
    at = frozenset(round(total * (i + 1) / count) for i in range(count)) if count else frozenset()
    snaps: list[Update] = []
    local_train(runtime, global_params, x, y, replace(cfg, epochs=epochs), None, shuffle, snaps, at)
    return [to_cpu(snap) for snap in snaps]


def client_receive(runtime: ClientRuntime, broadcast: bytes, round_num: int, client: int,
                   state: dict[str, torch.Tensor] | None = None) -> Update:
    """A client takes in the round's broadcast and nothing more (it fails before training): under a
    delta downlink its copy of the model advances as the server's replica of it did.

    Raises :class:`~fedcodec.fl.downlink.DownlinkError` (a ``PayloadError``) for a broadcast the
    client cannot take in (out of sync with its copy, non-finite, malformed); ``state`` is then
    unchanged, and the caller answers "downlink out of sync" (``refusal_reason``) instead of training."""
    return runtime.downlink.receive(broadcast, round_num, client, state)


def client_fit(runtime: ClientRuntime, broadcast: bytes, x: torch.Tensor, y: torch.Tensor, cfg: LocalTraining,
               round_num: int, client: int, state: dict[str, torch.Tensor] | None = None) -> tuple[bytes, dict]:
    """One client's round: bytes in (the global model), bytes out (the encoded update).

    ``state`` is this client's private store, kept across rounds by whoever runs the client (the
    simulator's run state, a Flower node's context); stateful codecs (error feedback) update it in
    place. A stateful codec without a store is a configuration error.

    If the codec asks for a pre-pass (the AE codec, on a client's first selection), the client runs
    it first and ``info["setup"]`` holds the codec's setup message (bytes the server must receive
    before the payload: the AE's decoder). ``info["codec"]`` holds the codec's metrics, and
    ``info["seconds"]`` the client's wall time split into ``train`` (local training, pre-pass included)
    and ``code`` (decoding the broadcast, fitting the codec, encoding the update).

    ``x`` and ``y`` are on ``runtime.device``; the broadcast is decoded on the CPU and moved there once,
    the update is moved back to the CPU once, before the codec encodes it.

    A model with client-local tensors (``runtime.local``) trains them from the client's store and puts
    them back there; only the shared tensors (``runtime.spec``) are in the update.

    A broadcast the client cannot take in raises :class:`~fedcodec.fl.downlink.DownlinkError` before
    anything is trained or stored (see :func:`client_receive`)."""
    opened = open_round(runtime, broadcast, len(x), round_num, client, state)
    return train_and_encode(runtime, opened, x, y, cfg)


@dataclass
class OpenRound:
    """A client-round between taking in the broadcast and encoding the update: the pieces of
    :func:`client_fit`, which :mod:`fedcodec.fl.batched` shares to train several clients at once."""

    client: int
    round: int
    #: the decoded broadcast (CPU tensors), the model the update is relative to
    global_params: Update
    #: the same on ``runtime.device`` (the very same tensors on the CPU)
    on_device: Update
    ctx: CodecContext
    state: dict[str, torch.Tensor] | None
    #: what :func:`client_fit` returns as ``info``, filled in as the round goes
    info: dict
    seconds: dict[str, float]


def open_round(runtime: ClientRuntime, broadcast: bytes, num_examples: int, round_num: int, client: int,
               state: dict[str, torch.Tensor] | None) -> OpenRound:
    """Take in the broadcast (:class:`~fedcodec.fl.downlink.DownlinkError` if the client cannot) and
    build the client-round's codec context, with its seed and generator (:mod:`fedcodec.fl.rng`)."""
    t0 = time.perf_counter()
    global_params = runtime.downlink.receive(broadcast, round_num, client, state)
    seconds = {"train": 0.0, "code": time.perf_counter() - t0}
    seed = rngs.codec_seed(runtime.run_seed, round_num, client)  # the seed the server checks
    metrics: dict[str, float] = {}
    ctx = CodecContext(runtime.spec, client=client, round=round_num, seed=seed,
                       rng=rngs.torch_generator(rngs.derive_seed(runtime.run_seed, round_num, rngs.CLIENT_CODEC,
                                                                 client)),
                       reference=global_params, state=state, metrics=metrics)
    on_device = to_device(global_params, runtime.device)  # the one move of the broadcast (none on the CPU)
    return OpenRound(client, round_num, global_params, on_device, ctx, state, {"num_examples": num_examples},
                     seconds)


def run_prepass(runtime: ClientRuntime, opened: OpenRound, x: torch.Tensor, y: torch.Tensor,
                cfg: LocalTraining) -> None:
    """The codec's pre-pass and fit, if it asks for one this round (``info["setup"]``)."""
    plan = runtime.uplink.setup.prepass(opened.ctx) if runtime.uplink.setup is not None else None
    if plan is None:
        return
    state, client, round_num = opened.state, opened.client, opened.round
    if state is None:
        raise ConfigError(f"codec {runtime.uplink.codec_id!r} fits itself on the client and needs the client's "
                          "store (client_fit(..., state=...))")
    gen = rngs.torch_generator(rngs.derive_seed(runtime.run_seed, round_num, rngs.PREPASS, client))
    runtime.load_local(state)  # the pre-pass trains them too; its result is discarded
    t0 = time.perf_counter()
    snapshots = prepass(runtime, opened.on_device, x, y, cfg, plan, gen)
    t1 = time.perf_counter()
    opened.info["setup"] = runtime.uplink.setup.fit(snapshots, opened.ctx)
    opened.seconds["train"] += t1 - t0
    opened.seconds["code"] += time.perf_counter() - t1


def training_draws(runtime: ClientRuntime, opened: OpenRound,
                   cfg: LocalTraining) -> tuple[Parametrization | None, torch.Generator]:
    """The client-round's parametrization (None: plain training), on ``runtime.device``, and its
    shuffling generator."""
    param = runtime.uplink.algorithm.parametrization(opened.ctx, opened.global_params)
    if param is not None:
        param.to(runtime.device)
    shuffle = rngs.torch_generator(rngs.derive_seed(runtime.run_seed, opened.round, rngs.CLIENT_TRAIN,
                                                    opened.client))
    if cfg.keep_state and opened.state is None:
        raise ConfigError("keeping the optimizer state between rounds needs the client's store "
                          "(client_fit(..., state=...))")
    return param, shuffle


def train_and_encode(runtime: ClientRuntime, opened: OpenRound, x: torch.Tensor, y: torch.Tensor,
                     cfg: LocalTraining) -> tuple[bytes, dict]:
    """The rest of :func:`client_fit` once the broadcast is in: pre-pass, local training, encoding."""
    run_prepass(runtime, opened, x, y, cfg)
    param, shuffle = training_draws(runtime, opened, cfg)
    t0 = time.perf_counter()
    runtime.load_local(opened.state)
    update, loss = local_train(runtime, opened.on_device, x, y, cfg, param, shuffle, store=opened.state)
    runtime.save_local(opened.state)
    return close_round(runtime, opened, update, loss, time.perf_counter() - t0)


def close_round(runtime: ClientRuntime, opened: OpenRound, update: Update, loss: float,
                train_seconds: float) -> tuple[bytes, dict]:
    """Encode the trained ``update`` (on ``runtime.device``) and return :func:`client_fit`'s answer;
    ``train_seconds`` is the client's share of the training time."""
    t0 = time.perf_counter()
    update = to_cpu(update)  # the one move of the update (none on the CPU): codecs code CPU tensors
    t1 = time.perf_counter()
    payload = runtime.uplink.encode(update, opened.ctx)
    opened.seconds["train"] += train_seconds + (t1 - t0)
    opened.seconds["code"] += time.perf_counter() - t1
    opened.info["train_loss"] = loss
    opened.info["codec"] = opened.ctx.metrics
    opened.info["seconds"] = opened.seconds
    return payload, opened.info
