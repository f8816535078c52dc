"""Learned compression on Flower: the Flower app's ``neural`` run-config key, and what the SuperNodes
and the ServerApp do with it.

``neural = "source=clusters lambda=300 samples_per_client=30 rounds=300"`` turns the Flower app
(:mod:`fedcodec.flower`) from classification into the training of a learned compressor: the same
simulation :func:`fedcodec.neural.federated.build_simulation` gives in-process (model, source, the
trainer's optimizers, every client in every round), run by the same round loop through the Flower
transport. The options are :class:`NeuralRun`'s fields as space-separated ``NAME=VALUE`` items, like
``codec-options``; the rest comes from the general run config: ``seed`` (the source's and the
training's), ``data-dir`` (Fashion-MNIST, photos or an ``npy`` folder, on every SuperNode and the
ServerApp), ``allow-subset``, ``threads`` and ``out-dir``; the general ``method`` and
``codec-options`` keys are the classification run's and are not read (the shared transforms' update
codec is the option ``method``, its options ``codec.NAME=VALUE`` items). The source decides the number
of clients: start one SuperNode per client (``partition-id`` 0..K-1) with ``num-partitions`` = K or none.

What travels, and what does not:

- uplink: each client's update of the *shared* tensors (``g_a``/``g_s``) in the method's bytes;
  the entropy model (``prior.*``) and its quantization offsets are client-local: they train on the
  SuperNode, stay in its context state, and never appear in a message (``federated`` mode);
- evaluation: after the last round the ServerApp sends each client the final shared tensors in an
  ``evaluate`` message (through the run's downlink codec, so its bytes are those of a broadcast).
  The node codes its own test data to real bytes with its own entropy model and answers with
  numbers only (:func:`evaluate_client`): rate from ``len()`` of its bitstreams, the rate estimate,
  the MSE. The server, which holds no client's entropy model, cannot evaluate a personalized
  codec itself; its round records get the clients' mean (:func:`summarize_points`).

Differences from ``fedcodec neural train``: Flower runs train one (mode, λ) per run; ``oracle``
(pooled data) and ``local`` (nothing shared, nothing to federate) are in-process only; the model is
the last round's (the validation split is still held out, so a run trains on the same data as
in-process; ``val_fraction=0`` trains on all of it); a restarted run cannot resume (the clients'
entropy models and optimizer moments live in the SuperNodes' per-run state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from ..config import Config, coerce, describe, parse_options, setting
from ..errors import ConfigError
from .federated import TRAINERS, Settings, build_simulation, rd_point
from .sources import SOURCES, load_source

#: the training modes a Flower run can take (``oracle`` needs the data pooled, ``local`` shares nothing)
FLOWER_MODES = ("federated", "federated-bias", "global")
#: the numbers a node's evaluation reply holds (``MetricRecord``), with their kinds
POINT_KEYS = {"rate": float, "rate-est": float, "mse": float, "bytes": int, "examples": int}


@dataclass(frozen=True)
class NeuralRun:
    """The options of the ``neural`` run-config key (``lambda`` may stand for ``lmbda``). Unset
    training options take the source's defaults, as ``fedcodec neural train`` does."""

    source: str = setting("clusters", "the data source", choices=SOURCES)
    lmbda: float = setting(100.0, "λ of loss = rate + λ·MSE", above=0)
    mode: str = setting("federated", "federated: shared transforms, personal entropy models; federated-bias: "
                        "the synthesis's output bias personal too; global: one codec for all", choices=FLOWER_MODES)
    samples_per_client: int | None = setting(None, "training samples per client (synthetic, clusters, "
                                             "fashion-mnist)", at_least=2)
    alpha: float | None = setting(None, "clusters: Dirichlet concentration of each client's mixture", above=0)
    method: str = setting("fedavg", "how the shared transforms' updates travel (any fedcodec method)")
    codec_options: dict = setting({}, "the method's codec options, written codec.NAME=VALUE (codec.ef=true)")
    trainer: str | None = setting(None, "fedadam (default), fedsgd-adam or local-adam", choices=TRAINERS)
    rounds: int | None = setting(None, "rounds (default: the source's)", at_least=1)
    local_epochs: int | None = setting(None, "local epochs per round", at_least=1)
    batch_size: int | None = setting(None, "batch size", at_least=1)
    lr: float | None = setting(None, "Adam's learning rate (entropy model, local-adam)", above=0)
    prior_lr_scale: float | None = setting(None, "the entropy model's lr as a multiple of lr", above=0)
    client_lr: float | None = setting(None, "fedadam: the clients' SGD lr on loss/λ", above=0)
    server_lr: float | None = setting(None, "fedadam, fedsgd-adam: the server Adam's lr", above=0)
    server_warmup: int | None = setting(None, "fedadam, fedsgd-adam: rounds of the server lr's linear ramp",
                                        at_least=0)
    val_fraction: float | None = setting(None, "share of each client's training data held out", at_least=0,
                                         below=1)
    offsets: bool = setting(True, "quantize around each channel's median of the client's entropy model")
    keep_optimizer_state: bool = setting(True, "clients keep their optimizer moments between rounds")

    @classmethod
    def parse(cls, text: str) -> "NeuralRun":
        """``"source=clusters lambda=300 ..."`` → a checked :class:`NeuralRun`; every failure is a
        :class:`~fedcodec.errors.ConfigError` naming the option."""
        keys = {name: key for name, key in describe(cls).items()} | {"lambda": describe(cls)["lmbda"]}
        values: dict[str, Any] = {}
        for name, value in parse_options(text, "neural").items():
            if name.startswith("codec.") and len(name) > len("codec."):
                values.setdefault("codec_options", {})[name[len("codec."):]] = value
                continue
            if name == "codec_options":
                raise ConfigError("write the method's codec options as codec.NAME=VALUE items of 'neural'")
            field_name, parsed = coerce(name, value, keys=keys, what="neural option")
            if field_name in values:
                raise ConfigError(f"neural option {field_name!r} is given twice")
            values[field_name] = parsed
        return cls(**values)

    def settings(self, cfg: Config, src) -> Settings:
        """The trainer's settings: the source's defaults, these options and the run config's seed."""
        given = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name in Settings.__dataclass_fields__ and getattr(self, f.name) is not None}
        return Settings.for_source(src, **given, seed=cfg.seed).check()

    def simulation(self, cfg: Config):
        """The run's :class:`~fedcodec.fl.simulation.Simulation` and initial state, built alike on
        the ServerApp and every SuperNode from the run config ``cfg`` (its seed, data, codec options)."""
        src = load_source(self.source, cfg.data_dir, seed=cfg.seed, allow_subset=cfg.allow_subset,
                          samples_per_client=self.samples_per_client, alpha=self.alpha)
        return build_simulation(src, self.mode, self.lmbda, self.settings(cfg, src))

    def num_clients(self, data_dir: str | None = None, seed: int = 0) -> int:
        """How many clients (SuperNodes) the source has."""
        return load_source(self.source, data_dir, seed=seed, samples_per_client=self.samples_per_client,
                           alpha=self.alpha).num_clients

    def describe(self) -> dict[str, Any]:
        """The options as they were set (for metrics.json): unset ones left out."""
        return {("lambda" if f.name == "lmbda" else f.name): getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) not in (None, {})}


def evaluate_client(sim, broadcast: bytes, round_num: int, client: int, store: dict) -> dict[str, float | int]:
    """A SuperNode's evaluation of its client's codec: take in ``broadcast`` (the final shared
    tensors, as a round's broadcast: under a delta downlink the client's copy advances), load its own
    entropy model from ``store``, and code its test data to real bytes. Returns the numbers of the
    reply (:data:`POINT_KEYS`): ``rate`` (bits per sample or pixel, from ``len()`` of the
    bitstream), ``rate-est`` and ``mse`` (exactly what the in-process round evaluation computes for
    this client, :meth:`~fedcodec.neural.models.NTCTask.client_losses`), ``bytes``, ``examples``.
    Raises :class:`~fedcodec.fl.downlink.DownlinkError` for a broadcast the client cannot take in."""
    from ..fl.client import client_receive

    runtime, task = sim.runtime, sim.runtime.task
    params = client_receive(runtime, broadcast, round_num, client, state=store)
    test = task.test[client]
    point = task.client_losses(runtime, params, {0: store}, [test])[0]
    coded = rd_point(runtime.model.eval(), test)  # the model holds params and this client's tensors
    return {"rate": float(coded["rate"]), "rate-est": float(point["rate_est"]), "mse": float(point["mse"]),
            "bytes": int(coded["bytes"]), "examples": len(test)}


def check_point(metrics: Mapping[str, Any], examples: int) -> tuple[dict | None, str | None]:
    """A node's evaluation numbers, never trusted: (the point, None) or (None, why it is unusable).
    Every key of :data:`POINT_KEYS` must be there with its kind, finite and non-negative, and
    ``examples`` must be the client's test-set size, which the server knows."""
    point = {}
    for key, kind in POINT_KEYS.items():
        value = metrics.get(key)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and (kind is float or isinstance(value, int)))
        try:
            ok = ok and math.isfinite(float(value)) and value >= 0
        except OverflowError:
            ok = False
        if not ok:
            shown = repr(value)[:40]
            return None, f"{key}={shown}: not a finite non-negative {'integer' if kind is int else 'number'}"
        point[key] = kind(value)
    if point["examples"] != examples:
        return None, f"reports {point['examples']} test examples; its test set has {examples}"
    return point, None


def summarize_points(points: Mapping[int, Mapping[str, float]], lmbda: float) -> dict[str, float]:
    """The round-record entries of the clients' evaluations, each client weighted equally (as
    in-process): ``rate`` (from bytes), ``rate_est``, ``mse``, ``test_loss`` = rate_est + λ·mse
    (these three as :meth:`~fedcodec.neural.models.NTCTask.evaluate` computes them), ``psnr`` of the
    mean MSE, ``eval_clients``."""
    if not points:
        return {"eval_clients": 0}
    order = sorted(points)
    rate_est = float(np.mean([points[c]["rate-est"] for c in order]))
    mse = float(np.mean([points[c]["mse"] for c in order]))
    return {"rate": float(np.mean([points[c]["rate"] for c in order])), "rate_est": rate_est, "mse": mse,
            "test_loss": rate_est + lmbda * mse, "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else math.inf,
            "eval_clients": len(order)}
