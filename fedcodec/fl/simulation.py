"""The in-process simulator: explicit state in, explicit state out, one round at a time.

``init`` builds the run state from a config; ``run_round`` advances it by one round. Every random
choice comes from :mod:`fedcodec.fl.rng`, a function of (seed, round, client), so the state is the
global model, the ledger, the records and the per-client stores (error-feedback memory, the
downlink's model copies), nothing hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Protocol, Sequence

import numpy as np
import torch

from ..codecs import ModelSpec, Update, build_codec, build_uplink
from ..config import Config
from ..data import FederatedSource, partition
from ..models import build_model
from . import loop
from . import rng as rngs
from .client import ClientRuntime, LocalTraining
from .device import resolve_device
from .downlink import Downlink
from .ledger import Ledger
from .robust import Defense
from .server_opt import ServerOptimizer, ServerOptimizerConfig
from .task import Classification


@dataclass
class RunState:
    round: int
    global_params: Update
    ledger: Ledger = field(default_factory=Ledger)
    records: list[dict] = field(default_factory=list)
    #: each client's private store (what the client keeps between rounds: error-feedback memory,
    #: its copy of the model under a delta downlink)
    client_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: what the server keeps per client (its replica of the client's model under a delta downlink)
    server_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: the server optimizer's state (momentum, Adam moments; empty for FedAvg)
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingData(Protocol):
    """Where the clients' training examples are: client ``c`` trains on rows ``sim.parts[c]`` of
    ``train_x`` (inputs) and ``train_y`` (targets). A :class:`~fedcodec.data.FederatedSource` is one."""

    train_x: torch.Tensor
    train_y: torch.Tensor


@dataclass(frozen=True)
class TrainingSet:
    """Training inputs and targets, one row per example (see :func:`pooled`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor


def pooled(clients: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[TrainingSet, list[torch.Tensor]]:
    """Data that comes already split by client ((inputs, targets) per client) as one training set
    and each client's rows in it, the ``source`` and ``parts`` of a :class:`Simulation`."""
    sizes = [len(x) for x, _ in clients]
    starts = np.cumsum([0] + sizes)
    data = TrainingSet(torch.cat([x for x, _ in clients]), torch.cat([y for _, y in clients]))
    return data, [torch.arange(int(starts[c]), int(starts[c + 1])) for c in range(len(clients))]


@dataclass
class Simulation:
    """A run's fixed parts: its config, the clients' training data, the client runtime (model,
    codecs, task) and the local training settings. The task (``runtime.task``) evaluates."""

    cfg: Config
    source: TrainingData
    runtime: ClientRuntime
    parts: list[torch.Tensor]
    training: LocalTraining
    #: False where the clients' stores live elsewhere (Flower's SuperNodes): a model with client-local
    #: tensors (a personalized entropy model) then cannot be evaluated here (:meth:`evaluate_round`)
    client_stores_here: bool = True

    @property
    def spec(self) -> ModelSpec:
        return self.runtime.spec

    @cached_property
    def server_optimizer(self) -> ServerOptimizer:
        """How a round's aggregate moves the global model (config ``server_optimizer``)."""
        return ServerOptimizer(self.spec, ServerOptimizerConfig.from_config(self.cfg))

    @cached_property
    def defense(self) -> Defense:
        """The server's defences against hostile updates (config ``aggregator``, ``clip_factor``, ...).
        A model with no shared tensor (every tensor client-local: learned compression's local-only
        mode) gets identical payloads from honest clients, which change nothing: replays are not checked."""
        defense = Defense.from_config(self.cfg)
        return defense if self.spec.tensors else replace(defense, replay_window=0)

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``client``'s training inputs and targets."""
        idx = self.parts[client]
        return self.source.train_x[idx], self.source.train_y[idx]

    def client_size(self, client: int) -> int:
        """How many training examples client ``client`` holds: its aggregation weight, known to the
        server from the seeded partition (never taken from the client's word)."""
        return len(self.parts[client])

    def evaluate_round(self, params: Update, state: "RunState") -> dict[str, float]:
        """One evaluation of the global model ``params``: the uplink's algorithm says which weights
        to evaluate (FedPM samples a mask), the task evaluates them (with each client's store at
        hand, for tasks whose clients evaluate with their own local tensors). Returns the record
        entries: none for a model with client-local tensors when the clients' stores are not here
        (``client_stores_here``; on Flower the nodes evaluate such a model themselves)."""
        runtime = self.runtime
        if runtime.local and not self.client_stores_here:
            return {}
        weights = runtime.uplink.algorithm.eval_params(params, self.spec, rngs.derive_seed(self.cfg.seed, rngs.EVAL))
        return runtime.task.evaluate(runtime, weights, state.client_states)


def setup(cfg: Config, source: FederatedSource) -> tuple[Simulation, RunState]:
    """Build the simulation (model, codecs, client partition) and the initial state.

    The model, the training inputs and targets and the test set are moved to ``cfg.device`` here,
    once (on the CPU nothing is copied); the global model, the ledger and every client's store stay
    on the CPU (:mod:`fedcodec.fl.device`)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, source.input_shape, source.num_classes, seed=cfg.seed, init_std=cfg.init_std)
    spec = ModelSpec.from_model(model)
    uplink = build_uplink(cfg.method_spec().codec, **cfg.uplink_options)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    initial = uplink.algorithm.init_global({t.name: tensors[t.name].detach().clone() for t in spec.tensors}, spec)
    uplink.bind_initial(initial)
    downlink = Downlink(build_codec(cfg.downlink, **cfg.downlink_options), cfg.downlink_delta, spec, cfg.seed,
                        initial)
    task = Classification(source.test_x.to(device), source.test_y.to(device))
    runtime = ClientRuntime(model, spec, uplink, downlink, cfg.seed, task=task, device=device)
    labels = source.train_y.numpy()
    kw = {"dirichlet": {"beta": cfg.beta, "min_size": cfg.min_client_size},
          "k-classes": {"k": cfg.classes_per_client}}.get(cfg.partition, {})
    parts = partition(labels, cfg.partition, cfg.num_clients, cfg.seed, **kw)
    training = local_training(cfg)
    data = TrainingSet(source.train_x.to(device), source.train_y.to(device))
    sim = Simulation(cfg, data, runtime, [torch.from_numpy(p).to(device) for p in parts], training)
    return sim, RunState(0, dict(initial))


def local_training(cfg: Config) -> LocalTraining:
    return LocalTraining(cfg.local_epochs, cfg.batch_size, cfg.client_lr, cfg.momentum, cfg.weight_decay,
                         cfg.optimizer, cfg.keep_optimizer_state)


def run_round(sim: Simulation, state: RunState) -> RunState:
    """Advance ``state`` by one round with every client in this process (:mod:`fedcodec.fl.loop`)."""
    return loop.run_round(sim, state, loop.InProcessTransport(sim))
