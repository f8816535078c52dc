"""The in-process simulator: explicit state in, explicit state out, one round at a time.

``init`` builds the run state from a config; ``run_round`` advances it by one round. Every random
choice comes from :mod:`fedcodec.fl.rng`, a function of (seed, round, client), so the state is the
global model, the ledger, the records and the per-client stores (error-feedback memory, the
downlink's model copies), nothing hidden.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from ..codecs import ModelSpec, Update, build_codec
from ..config import Config
from ..data import FederatedSource, partition
from ..models import build_model
from . import rng as rngs
from .client import ClientRuntime, LocalTraining, client_fit
from .downlink import Downlink
from .ledger import Ledger
from .server import RoundOutcome, server_round
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

    @property
    def spec(self) -> ModelSpec:
        return self.runtime.spec

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``client``'s training inputs and targets."""
        idx = self.parts[client]
        return self.source.train_x[idx], self.source.train_y[idx]


def setup(cfg: Config, source: FederatedSource) -> tuple[Simulation, RunState]:
    """Build the simulation (model, codecs, client partition) and the initial state."""
    cfg.validate()
    model = build_model(cfg.model, source.input_shape, source.num_classes, seed=cfg.seed, init_std=cfg.init_std)
    spec = ModelSpec.from_model(model)
    uplink = build_codec(cfg.method_spec().codec, **cfg.uplink_options)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    initial = uplink.init_global({t.name: tensors[t.name].detach().clone() for t in spec.tensors}, spec)
    downlink = Downlink(build_codec(cfg.downlink, **cfg.downlink_options), cfg.downlink_delta, spec, cfg.seed,
                        initial)
    rt = ClientRuntime(model, spec, uplink, downlink, cfg.seed, task=Classification(source.test_x, source.test_y))
    labels = source.train_y.numpy()
    kw = {"dirichlet": {"beta": cfg.beta, "min_size": cfg.min_client_size},
          "k-classes": {"k": cfg.classes_per_client}}.get(cfg.partition, {})
    parts = partition(labels, cfg.partition, cfg.num_clients, cfg.seed, **kw)
    training = local_training(cfg)
    sim = Simulation(cfg, source, rt, [torch.from_numpy(p) for p in parts], training)
    return sim, RunState(0, dict(initial))


def local_training(cfg: Config) -> LocalTraining:
    return LocalTraining(cfg.local_epochs, cfg.batch_size, cfg.client_lr, cfg.momentum, cfg.weight_decay,
                         cfg.optimizer, cfg.keep_optimizer_state)


@torch.no_grad()
def evaluate_round(sim: Simulation, params: Update, state: RunState) -> dict[str, float]:
    """One evaluation of the global model ``params``: the uplink codec says which weights to
    evaluate (FedPM samples a mask), the task evaluates them (with each client's store at hand, for
    tasks whose clients evaluate with their own local tensors). Returns the record entries."""
    rt = sim.runtime
    weights = rt.uplink.eval_params(params, sim.spec, rngs.derive_seed(sim.cfg.seed, rngs.EVAL))
    return rt.task.evaluate(rt, weights, state.client_states)


def run_round(sim: Simulation, state: RunState) -> RunState:
    """Advance ``state`` by one round and append its record."""
    cfg, rt = sim.cfg, sim.runtime
    rnd = state.round + 1
    t0 = time.perf_counter()
    clients = rngs.sample_clients(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round)
    dropped, late = rngs.round_failures(cfg.seed, rnd, clients, cfg.dropout, cfg.stragglers)
    down, views = rt.downlink.send(state.global_params, rnd, clients, state.server_states)
    payloads, losses, setups, metrics = {}, [], {}, []
    for c in clients:
        state.ledger.record(rnd, c, "down", rt.downlink.codec.codec_id, down[c])
        if c in dropped:  # failed after receiving the model: nothing comes back
            continue
        x, y = sim.client_data(c)
        payload, info = client_fit(rt, down[c], x, y, sim.training, rnd, c,
                                   state=state.client_states.setdefault(c, {}))
        if "setup" in info:  # sent before the payload, so a straggler's decoder still arrives
            state.ledger.record(rnd, c, "up", f"{rt.uplink.codec_id}/setup", info["setup"])
            setups[c] = info["setup"]
        state.ledger.record(rnd, c, "up", rt.uplink.codec_id, payload)
        losses.append(info["train_loss"])
        metrics.append(info.get("codec", {}))
        if c not in late:  # a straggler's bytes were sent, but after the deadline: not aggregated
            payloads[c] = (payload, float(info["num_examples"]))
    return finish_round(sim, state, rnd, t0, len(clients), payloads, losses, len(dropped), len(late), views,
                        setups, metrics)[0]


def finish_round(sim: Simulation, state: RunState, rnd: int, t0: float, sampled: int,
                 payloads: dict[int, tuple[bytes, float]], losses: list[float], dropped: int = 0,
                 timed_out: int = 0, references: dict[int, Update] | None = None,
                 setups: dict[int, bytes] | None = None,
                 codec_metrics: list[dict[str, float]] | None = None) -> tuple[RunState, RoundOutcome]:
    """The server's half of round ``rnd`` once the payloads are in (the simulator and the Flower
    ServerApp share it): decode, reject, aggregate, evaluate, append the record, advance ``state``.
    ``t0`` is the round's ``time.perf_counter()`` start; the ledger already holds the round's bytes;
    ``references`` is the model each client trained from (what the downlink delivered); ``setups``
    the codec setup messages that arrived (see :func:`server_round`); ``codec_metrics`` the clients'
    codec metrics, averaged into the record."""
    cfg, rt = sim.cfg, sim.runtime
    new_params, outcome = server_round(rt.uplink, sim.spec, state.global_params, rnd, payloads, cfg.min_clients,
                                       cfg.max_update_norm, references, setups, state.server_states)
    seconds = time.perf_counter() - t0
    record = {"round": rnd, "clients": sampled, "accepted": len(outcome.accepted),
              "rejected": len(outcome.rejected), "dropped": dropped, "timed_out": timed_out,
              "uplink_bytes": state.ledger.total("up", rnd), "downlink_bytes": state.ledger.total("down", rnd),
              "train_loss": float(np.mean(losses)) if losses else math.nan, "seconds": seconds}
    if setups:
        record["setup_bytes"] = sum(len(b) for b in setups.values())
    for key in sorted({k for m in codec_metrics or [] for k in m}):
        record[key] = float(np.mean([m[key] for m in codec_metrics if key in m]))
    if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
        t1 = time.perf_counter()
        record.update(evaluate_round(sim, new_params, state))
        record["eval_seconds"] = time.perf_counter() - t1
    state.records.append(record)
    state.global_params = new_params
    state.round = rnd
    return state, outcome
