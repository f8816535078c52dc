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
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..codecs import ModelSpec, Update, build_codec, build_uplink
from ..config import Config
from ..data import FederatedSource, partition
from ..models import build_model
from . import rng as rngs
from .client import ClientRuntime, LocalTraining, client_fit
from .downlink import Downlink
from .ledger import Ledger
from .server import RoundOutcome, server_round


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


@dataclass
class Simulation:
    cfg: Config
    source: FederatedSource
    runtime: ClientRuntime
    parts: list[np.ndarray]
    training: LocalTraining
    #: the per-round evaluation (params, state) -> record entries; None: test accuracy and loss
    evaluator: Callable[["Simulation", Update, RunState], dict[str, float]] | None = None

    @property
    def spec(self) -> ModelSpec:
        return self.runtime.spec


def setup(cfg: Config, source: FederatedSource) -> tuple[Simulation, RunState]:
    """Build the simulation (model, codecs, client partition) and the initial state."""
    cfg.validate()
    model = build_model(cfg.model, source.input_shape, source.num_classes, seed=cfg.seed, init_std=cfg.init_std)
    spec = ModelSpec.from_model(model)
    uplink = build_uplink(cfg.method_spec().codec, **cfg.uplink_options)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    initial = uplink.algorithm.init_global({t.name: tensors[t.name].detach().clone() for t in spec.tensors}, spec)
    downlink = Downlink(build_codec(cfg.downlink, **cfg.downlink_options), cfg.downlink_delta, spec, cfg.seed,
                        initial)
    rt = ClientRuntime(model, spec, uplink, downlink, cfg.seed)
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
def evaluate(sim: Simulation, params: Update, batch_size: int = 1000) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy of ``params`` (as the uplink's algorithm says to evaluate them)."""
    rt = sim.runtime
    rt.load(rt.uplink.algorithm.eval_params(params, sim.spec, rngs.derive_seed(sim.cfg.seed, rngs.EVAL)))
    rt.model.eval()
    x, y = sim.source.test_x, sim.source.test_y
    correct, loss = 0, 0.0
    for start in range(0, len(x), batch_size):
        out = rt.model(x[start:start + batch_size])
        yb = y[start:start + batch_size]
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return correct / len(x), loss / len(x)


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
        idx = sim.parts[c]
        payload, info = client_fit(rt, down[c], sim.source.train_x[idx], sim.source.train_y[idx], sim.training, rnd,
                                   c, state=state.client_states.setdefault(c, {}))
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
        if sim.evaluator is not None:
            record.update(sim.evaluator(sim, new_params, state))
        else:
            record["accuracy"], record["test_loss"] = evaluate(sim, new_params)
        record["eval_seconds"] = time.perf_counter() - t1
    state.records.append(record)
    state.global_params = new_params
    state.round = rnd
    return state, outcome
