"""Federated training of a learned compressor on fedcodec's engine, and its rate-distortion evaluation.

Four ways to train; the first three run through the same engine (:func:`fedcodec.fl.simulation.run_round`,
the same client and server functions as classification runs) and differ only in which tensors are
client-local:

- ``federated`` (the paper's method): ``g_a``/``g_s`` are averaged (their updates go through any
  update codec, fp32 by default; a codec that changes how clients train, such as FedMRN's masks
  over noise, applies to them alone), the entropy model ``prior.*`` is personalized, trains
  directly and never leaves its client;
- ``federated-bias``: ``federated`` with one more personal tensor, the synthesis transform's output
  bias (:func:`~fedcodec.neural.models.output_bias_name`: one value per output dimension or
  channel). It trains on the client like the entropy model (with the client's optimizer) and never
  leaves it, so each client's decoder can output its own data's mean at zero rate, which a decoder
  shared by all cannot, while everything else stays shared;
- ``global``: everything averaged, one codec for all;
- ``local``: everything client-local: each client trains its own codec alone (its uplink carries
  no tensor at all), always with Adam on everything, its moments kept between rounds;
- ``oracle``: joint training of the shared transforms on *all* clients' data pooled, each client's
  loss under its own entropy model (K priors, one model), Adam on everything. Not deployable (it
  needs every client's data in one place): a ceiling for ``federated``.

How the shared tensors are optimized is :attr:`Settings.trainer` (:data:`TRAINERS`):

- ``fedadam`` (the default): clients take plain SGD steps on the shared tensors (learning rate
  ``client_lr / λ``: SGD on the loss over λ, whose scale does not grow with λ),
  the server applies Adam (Reddi et al. 2021's FedAdam, :mod:`fedcodec.fl.server_opt`) to their
  averaged update; a client-local entropy model trains with its own Adam (``lr · prior_lr_scale``)
  whose moments the client keeps between rounds (never sent). Averaging clients' *adaptive* steps
  (the old default, ``local-adam``) has the wrong fixed point: the average of Adam steps is not a
  descent step of the federated objective, and it wandered ±4% from round to round.
- ``fedsgd-adam``: FedSGD with a server Adam: every round each client takes one SGD step of lr 1 on
  one batch (its update is minus its gradient) and the server's Adam does the optimizing.
- ``local-adam``: the old behaviour: Adam on everything locally, moments kept, the server averages.

**Gradient accounting.** Every mode and trainer gives each client the same number of gradient
evaluations (one per batch of ``batch_size`` of its training part): ``rounds · local_epochs ·
steps_per_epoch`` (:func:`gradient_steps`). ``fedadam``/``local-adam`` take ``local_epochs`` epochs
in each of ``rounds`` rounds; ``fedsgd-adam`` runs ``rounds · S`` engine rounds of one step each, S
the steps of a round of the others (with clients of unequal sizes, S is the largest client's; the
smaller ones then take more steps); ``local`` takes the same steps as a federated client under
``local-adam``; ``oracle`` takes, in each of ``rounds`` rounds, each client's batches of
``local_epochs`` epochs, one batch of every client per step, their losses averaged.

**Validation.** ``val_fraction`` of each client's training data (drawn from the seed) is held out;
every ``val_every`` rounds and at the last round the trainer measures each client's validation loss
rate_est + λ·MSE (−log2 p of the rounded latents, no bytes coded) with its personal tensors, and
returns the best round's tensors: the lowest mean over clients for shared transforms (federated,
global, oracle); each client its own best round for ``local``.

``global-ft`` (global codec + a local fit of the entropy model) and newcomers are derived after
training with :func:`fit_prior`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..codecs import ModelSpec, Update, build_codec, build_uplink
from ..config import Config
from ..errors import CodecModelError, ConfigError
from ..fl import rng as rngs
from ..fl.client import LOCAL, ClientRuntime, batches, param_groups, steps_per_epoch
from ..fl.downlink import Downlink
from ..fl.simulation import RunState, Simulation, local_training, pooled, run_round
from ..fl.task import TaskLoss
from ..safetensors_header import load_tensors, read_header
from .codec import Coder
from .models import NTC, PRIOR_PREFIX, NTCConfig, NTCTask, build_ntc, ntc_shapes, output_bias_name
from .sources import NeuralSource

MODES = ("federated", "federated-bias", "global", "local", "oracle")
TRAINERS = ("fedadam", "fedsgd-adam", "local-adam")
#: purpose of the validation split's seed path (kept apart from :mod:`fedcodec.fl.rng`'s purposes)
VALIDATION = 1001


@dataclass
class Settings:
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3  # Adam's learning rate: local-adam, local and oracle modes, the entropy model
    seed: int = 0
    method: str = "fedavg"  # update codec of the shared transforms (any fedcodec method; lr is the client's, not its own)
    codec_options: dict = field(default_factory=dict)
    finetune_epochs: int = 5  # entropy-model fits (global-ft, newcomers)
    keep_optimizer_state: bool = True  # each client's Adam moments carry over between rounds
    prior_lr_scale: float = 10.0  # the entropy model's learning rate, relative to lr (training and fits)
    trainer: str = "fedadam"  # how the shared tensors are optimized: one of TRAINERS (module docstring)
    client_lr: float = 0.3  # fedadam: the clients' plain SGD learning rate on the loss / λ (the engine's lr: client_lr / λ)
    server_lr: float = 0.03  # fedadam, fedsgd-adam: the server Adam's learning rate (probed: synthetic, λ=100, 15 rounds)
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    server_warmup: int = 0  # fedadam, fedsgd-adam: rounds of the server lr's linear ramp (0: none)
    val_fraction: float = 0.2  # of each client's training data held out for validation (0: none)
    val_every: int | None = None  # rounds between validations (None: rounds // 10, at least 1)
    offsets: bool = True  # the model's latent offsets (NTCConfig.offsets, where the architecture has it)

    @classmethod
    def for_source(cls, src: NeuralSource, **overrides) -> "Settings":
        return cls(**{**src.defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def check(self) -> "Settings":
        if self.trainer not in TRAINERS:
            raise ConfigError(f"unknown trainer {self.trainer!r}; choose one of {', '.join(TRAINERS)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.val_every is not None and self.val_every < 1:
            raise ConfigError(f"val_every must be >= 1, got {self.val_every!r}")
        if min(self.rounds, self.local_epochs, self.batch_size) < 1:
            raise ConfigError("rounds, local_epochs and batch_size must be >= 1")
        if isinstance(self.server_warmup, bool) or not isinstance(self.server_warmup, int) or self.server_warmup < 0:
            raise ConfigError(f"server_warmup must be an integer >= 0 (rounds), got {self.server_warmup!r}")
        return self

    @classmethod
    def completed(cls, saved: dict) -> dict:
        """``saved`` (a results file's settings) with the options added since it was written set
        to their defaults, which is what the code of that time did: older folders still resume."""
        return {**{f.name: f.default for f in fields(cls) if f.name not in saved and f.default is not MISSING},
                **saved}

    @property
    def validate_every(self) -> int:
        return self.val_every if self.val_every is not None else max(1, self.rounds // 10)


def model_config(src: NeuralSource, s: Settings) -> NTCConfig:
    """The source's architecture with the settings' ``offsets``."""
    return replace(src.model, offsets=s.offsets)


def split_data(src: NeuralSource, s: Settings) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each client's training data split into a training and a validation part: ``val_fraction`` of
    its rows (rounded, at least 1 and leaving at least 2 to train on; none at 0), drawn from the seed
    and the client alone; both parts keep the rows' order."""
    train_parts, val_parts = [], []
    for c, x in enumerate(src.train):
        n = len(x)
        n_val = 0 if s.val_fraction <= 0 else max(1, min(n - 2, round(s.val_fraction * n)))
        if n_val <= 0:
            train_parts.append(x)
            val_parts.append(x[:0])
            continue
        perm = torch.randperm(n, generator=rngs.torch_generator(rngs.derive_seed(s.seed, VALIDATION, c)))
        train_parts.append(x[perm[n_val:].sort().values])
        val_parts.append(x[perm[:n_val].sort().values])
    return train_parts, val_parts


def gradient_steps(n: int, s: Settings) -> int:
    """The gradient evaluations a client with ``n`` training examples takes in one round of
    ``fedadam``/``local-adam`` (one per batch); ``rounds`` times that in a run, under every trainer."""
    return s.local_epochs * steps_per_epoch(n, s.batch_size)


def local_names(model: NTC, mode: str) -> frozenset[str]:
    """The client-local (personal) parameters of ``mode``: they train on each client and never travel."""
    if mode not in MODES:
        raise ConfigError(f"unknown training mode {mode!r}; choose one of {', '.join(MODES)}")
    return local_names_of({n: tuple(p.shape) for n, p in model.named_parameters()}, mode, model.cfg)


@dataclass
class Trained:
    """A finished training run: the shared tensors and each client's local tensors."""

    model_cfg: NTCConfig
    mode: str
    lmbda: float
    shared: Update
    local: list[Update]
    records: list[dict]
    uplink_bytes: int
    uplink_payloads: int
    #: the round whose tensors these are (the best validation round; the last one without validation):
    #: one per client for ``local`` (each its own), else one
    best_round: int | list[int] | None = None

    def model(self, client: int) -> NTC:
        """Client ``client``'s full model (shared tensors + its personalized ones)."""
        if not 0 <= client < len(self.local):
            raise ConfigError(f"client {client} does not exist: this codec has clients 0..{len(self.local) - 1}")
        m = build_ntc(self.model_cfg, 0)
        m.load_state_dict({**self.shared, **self.local[client]}, strict=True)
        return m.eval()

    def save(self, path: Path, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        tensors = dict(self.shared)
        for c, loc in enumerate(self.local):
            tensors.update({f"client/{c}/{k}": v for k, v in loc.items()})
        info = {"model": self.model_cfg.__dict__, "mode": self.mode, "lmbda": self.lmbda, "clients": len(self.local),
                "uplink_bytes": self.uplink_bytes, "uplink_payloads": self.uplink_payloads,
                **({"best_round": self.best_round} if self.best_round is not None else {}), **(meta or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": "fedcodec-neural-1", "info": json.dumps(info)})

    @classmethod
    def load(cls, path: str | Path) -> "Trained":
        """Read a ``codec.safetensors`` written by :meth:`save`. Nothing in it is trusted: the header
        is bounded (:data:`MAX_CODEC_HEADER`) and checked before any tensor is read, the metadata must
        have its types (an architecture within :data:`~fedcodec.neural.models.NTCConfig` limits, a
        known mode, a finite λ, 1..:data:`MAX_CODEC_CLIENTS` clients), and the tensors must be exactly
        that architecture's (names, shapes, float32: the shared ones once, the mode's client-local ones
        once per client). Raises :class:`~fedcodec.errors.CodecModelError` (a ConfigError)."""
        path = Path(path)

        def fail(message: str) -> CodecModelError:
            return CodecModelError(f"{path} is a damaged fedcodec neural codec: {message}; train it again "
                                   "with 'fedcodec neural train'")

        header = read_header(path, fail, max_header=MAX_CODEC_HEADER, dtypes=("F32",))
        meta = header.metadata
        if meta.get("format") != "fedcodec-neural-1":
            fmt = meta.get("format")
            shown = repr(fmt if fmt is None or len(fmt) <= 60 else fmt[:60] + "...")
            raise CodecModelError(f"{path} is not a fedcodec neural codec (format {shown})")
        info = _codec_info(meta.get("info"), fail)
        cfg = info["model"]
        shapes = ntc_shapes(cfg)  # computed: nothing is allocated for the declared architecture
        numel = sum(math.prod(s) for s in shapes.values())
        if numel > MAX_CODEC_PARAMS:
            raise fail(f"its architecture {cfg} has {numel:,} parameters, more than the {MAX_CODEC_PARAMS:,} allowed")
        local = local_names_of(shapes, info["mode"], cfg)
        want = {n: s for n, s in shapes.items() if n not in local}
        want |= {f"client/{c}/{n}": shapes[n] for c in range(info["clients"]) for n in local}
        have = {k: e.shape for k, e in header.tensors.items()}
        if set(have) != set(want):
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            raise fail(f"its tensors are not those of a {info['mode']} codec with {info['clients']} clients "
                       f"(missing: {', '.join(missing[:4]) or '-'}; unexpected: "
                       f"{', '.join(x[:60] for x in extra[:4]) or '-'})")
        for k, shape in want.items():
            if have[k] != shape:
                raise fail(f"tensor {k!r} has shape {have[k]}, the architecture needs {shape}")
        tensors = load_tensors(path, fail)
        shared = {k: v for k, v in tensors.items() if not k.startswith("client/")}
        per_client: list[dict] = [{} for _ in range(info["clients"])]
        for k, v in tensors.items():
            if k.startswith("client/"):
                _, c, name = k.split("/", 2)
                per_client[int(c)][name] = v
        return cls(cfg, info["mode"], info["lmbda"], shared, per_client, [], info["uplink_bytes"],
                   info["uplink_payloads"], info.get("best_round"))


#: a codec.safetensors header (tensor entries and the info JSON) is at most this large
MAX_CODEC_HEADER = 8 << 20
#: clients a codec.safetensors may hold
MAX_CODEC_CLIENTS = 10_000
#: parameters of a codec's architecture (64 Mi float32: 256 MiB)
MAX_CODEC_PARAMS = 1 << 26
_CODEC_INFO = {"model": dict, "mode": str, "lmbda": (int, float), "clients": int, "uplink_bytes": int,
               "uplink_payloads": int}


def local_names_of(shapes: dict[str, tuple[int, ...]], mode: str, cfg: NTCConfig) -> frozenset[str]:
    """:func:`local_names` from parameter names alone (``shapes``: :func:`ntc_shapes` of ``cfg``, or a
    model's parameters): the entropy model (``prior.*``) in ``federated``/``oracle``, with the
    synthesis's output bias in ``federated-bias``; everything in ``local``; nothing in ``global``."""
    if mode in ("federated", "oracle", "federated-bias"):
        extra = {output_bias_name(cfg)} if mode == "federated-bias" else set()
        return frozenset(n for n in shapes if n.startswith(PRIOR_PREFIX)) | extra
    return frozenset(shapes) if mode == "local" else frozenset()


def _codec_info(text: object, fail) -> dict:
    """The ``info`` metadata of a codec.safetensors, every field checked (see :meth:`Trained.load`)."""
    if not isinstance(text, str):
        raise fail("its metadata has no 'info' entry")
    try:
        info = json.loads(text)
    except RecursionError:
        raise fail("its info metadata nests JSON too deeply") from None
    except ValueError as err:
        raise fail(f"its info metadata is not JSON ({str(err)[:80]})") from None
    if not isinstance(info, dict):
        raise fail("its info metadata is not a JSON object")
    for key, kind in _CODEC_INFO.items():
        if key not in info:
            raise fail(f"its info metadata has no {key!r}")
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise fail(f"its info {key!r} is a JSON {type(info[key]).__name__}")
    if info["mode"] not in MODES:
        raise fail(f"unknown training mode {info['mode'][:40]!r}")
    if not (math.isfinite(info["lmbda"]) and info["lmbda"] > 0):
        raise fail(f"its lambda {info['lmbda']!r} is not a finite positive number")
    if not 1 <= info["clients"] <= MAX_CODEC_CLIENTS:
        raise fail(f"it declares {info['clients']} clients (1..{MAX_CODEC_CLIENTS} allowed)")
    if not all(0 <= info[k] < 2**63 for k in ("uplink_bytes", "uplink_payloads")):
        raise fail("its uplink byte or payload count is out of range")
    if "best_round" in info:  # optional (files written before it have none)
        best = info["best_round"]
        items = best if isinstance(best, list) else [best]
        if (isinstance(best, list) and len(best) != info["clients"]) or not all(
                type(r) is int and 0 <= r < 2**63 for r in items):
            raise fail("its best_round is not a round number (or, for local, one per client)")
    try:
        info["model"] = NTCConfig.parse(info["model"])
    except ConfigError as err:
        raise fail(f"its architecture is invalid ({err})") from None
    info["lmbda"] = float(info["lmbda"])
    return info


def build_simulation(src: NeuralSource, mode: str, lmbda: float, s: Settings) -> tuple[Simulation, RunState]:
    """The engine's simulation of training ``mode`` at ``lmbda`` under ``s.trainer``: every client
    in every round, on its training part (:func:`split_data`), the shared tensors through
    ``s.method``'s uplink codec, a float32 broadcast, and the compression task (:class:`NTCTask`)
    evaluating on each client's test data with its own local tensors.

    ``local`` mode always trains as ``local-adam`` (Adam on everything, moments kept). For ``oracle``
    this is the runtime only (model, task, data: :func:`train` does not run its rounds)."""
    s.check()
    cfg_model = model_config(src, s)
    model = build_ntc(cfg_model, s.seed)
    local = local_names(model, mode)
    spec = ModelSpec.from_model(model, local=local)
    k = src.num_clients
    train_parts, _ = split_data(src, s)
    trainer = "local-adam" if mode in ("local", "oracle") else s.trainer
    steps = max(gradient_steps(len(x), s) for x in train_parts)
    rounds, max_steps = (s.rounds * steps, 1) if trainer == "fedsgd-adam" else (s.rounds, None)
    prior_opt, prior_scale = None, s.prior_lr_scale
    if trainer == "local-adam":
        client_lr, optimizer, server = s.lr, "adam", {}
    else:
        # plain SGD is not scale-free: its step is client_lr on the loss divided by λ (rate/λ + MSE),
        # so one client_lr suits every λ of a sweep (Adam's steps do not see the scale)
        client_lr = s.client_lr / lmbda if trainer == "fedadam" else 1.0
        optimizer = "sgd"
        # no norm clipping (the engine's default defence against hostile clients): clipping honest but
        # heterogeneous clients' updates to 2x the median norm biases the mean the server's Adam steps on
        server = {"server_optimizer": "adam", "server_lr": s.server_lr, "server_beta1": s.server_beta1,
                  "server_beta2": s.server_beta2, "server_tau": s.server_tau, "clip_factor": 0.0,
                  # the ramp counts the trainer's rounds; fedsgd-adam's engine rounds are its steps
                  "server_warmup": s.server_warmup * (steps if trainer == "fedsgd-adam" else 1)}
        if local:  # a client-local entropy model: its own Adam at lr · prior_lr_scale
            prior_opt, prior_scale = "adam", s.lr * s.prior_lr_scale / client_lr
    cfg = Config(seed=s.seed, rounds=rounds, num_clients=k, clients_per_round=k, local_epochs=s.local_epochs,
                 batch_size=s.batch_size, lr=client_lr, optimizer=optimizer,
                 keep_optimizer_state=s.keep_optimizer_state, method=s.method, codec_options=dict(s.codec_options),
                 eval_every=rounds, **server,
                 # local mode's clients all send the same empty payload: no replay to guard against
                 **({"replay_window": 0} if mode == "local" else {})).validate()
    uplink = build_uplink(cfg.method_spec().codec, **cfg.uplink_options)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    initial = uplink.algorithm.init_global({t.name: tensors[t.name].detach().clone() for t in spec.tensors}, spec)
    uplink.bind_initial(initial)
    downlink = Downlink(build_codec(cfg.downlink, **cfg.downlink_options), cfg.downlink_delta, spec, s.seed, initial)
    task = NTCTask(lmbda, prior_scale, test=src.test, prior_optimizer=prior_opt)
    runtime = ClientRuntime(model, spec, uplink, downlink, s.seed, task=task, local=local)
    data, parts = pooled([(x, x) for x in train_parts])  # a compressor's target is its input
    training = replace(local_training(cfg), max_steps=max_steps)
    return Simulation(cfg, data, runtime, parts, training), RunState(0, dict(initial))


def client_tensors(sim: Simulation, state: RunState, client: int) -> Update:
    return {n: v.clone() for n, v in sim.runtime.local_tensors(state.client_states.get(client, {})).items()}


class _Best:
    """The best validation round's tensors so far: one for shared transforms (lowest mean over
    clients), or one per client (``local``: each client's own lowest)."""

    def __init__(self, per_client: bool, clients: int):
        self.per_client = per_client
        self.loss = [math.inf] * (clients if per_client else 1)
        self.round: list[int] = [0] * len(self.loss)
        self.shared: Update | None = None
        self.local: list[Update | None] = [None] * clients

    def offer(self, rnd: int, losses: list[float], shared: Update, local: list[Update]) -> None:
        if self.per_client:
            for c, v in enumerate(losses):
                if v < self.loss[c]:  # NaN never wins
                    self.loss[c], self.round[c] = v, rnd
                    self.local[c] = {n: t.clone() for n, t in local[c].items()}
                    self.shared = {n: t.clone() for n, t in shared.items()}  # empty in local mode
        else:
            v = float(np.mean(losses))
            if v < self.loss[0]:
                self.loss[0], self.round[0] = v, rnd
                self.shared = {n: t.clone() for n, t in shared.items()}
                self.local = [{n: t.clone() for n, t in loc.items()} for loc in local]


def _validation_rounds(total: int, every: int) -> set[int]:
    return set(range(every, total + 1, every)) | {total}


def train(src: NeuralSource, mode: str, lmbda: float, s: Settings, progress: bool = True) -> Trained:
    """Train ``mode`` at ``lmbda`` under ``s.trainer`` (module docstring); every client takes part in
    every round. Returns the best validation round's tensors (the last round's with
    ``val_fraction=0``); its records carry ``val_loss`` (the clients' mean) and ``val_client_loss``
    at each validation."""
    if mode == "oracle":
        return train_oracle(src, lmbda, s, progress)
    sim, state = build_simulation(src, mode, lmbda, s)
    _, val = split_data(src, s)
    task: NTCTask = sim.runtime.task
    total = sim.cfg.rounds
    per = total // s.rounds  # engine rounds per round (fedsgd-adam: the steps of a round)
    checks = _validation_rounds(total, s.validate_every * per) if s.val_fraction > 0 else set()
    best = _Best(mode == "local", src.num_clients)
    bar = tqdm(total=total, desc=f"{src.name} {mode} λ={lmbda:g}", disable=not progress, unit="round")
    while state.round < total:
        state = run_round(sim, state)
        if state.round in checks:
            points = task.client_losses(sim.runtime, state.global_params, state.client_states, val)
            losses = [p["loss"] for p in points]
            state.records[-1].update(val_loss=float(np.mean(losses)), val_client_loss=losses)
            best.offer(state.round, losses, state.global_params,
                       [client_tensors(sim, state, c) for c in range(src.num_clients)])
        bar.set_postfix(loss=f"{state.records[-1]['train_loss']:.3f}")
        bar.update()
    bar.close()
    ups = [e for e in state.ledger.entries if e.direction == "up"]
    if best.shared is None:  # no validation: the last round
        shared = {k: v.clone() for k, v in state.global_params.items()}
        local = [client_tensors(sim, state, c) for c in range(src.num_clients)]
        best_round: int | list[int] = [total] * src.num_clients if mode == "local" else total
    else:
        shared, local = best.shared, best.local
        best_round = list(best.round) if mode == "local" else best.round[0]
    return Trained(model_config(src, s), mode, lmbda, shared, local, state.records, sum(e.nbytes for e in ups),
                   len(ups), best_round)


def train_oracle(src: NeuralSource, lmbda: float, s: Settings, progress: bool = True) -> Trained:
    """The pooled oracle (``mode="oracle"``): the shared transforms trained jointly on all clients'
    training parts, each client's loss under its own entropy model, with one Adam on everything
    (transforms at ``lr``, the priors at ``lr · prior_lr_scale``). Each round every client shuffles
    its part for ``local_epochs`` epochs (the engine's generator of that round and client, which
    also draws its noise); step t takes the t-th batch of every client that has one and averages
    their losses over all K clients (a constant weight per client), so each client gives exactly the
    gradient evaluations a federated client takes. A ceiling that needs every client's data in one
    place: not a deployable method. Validation and best round as for ``federated``."""
    sim, _ = build_simulation(src, "oracle", lmbda, s)
    _, val = split_data(src, s)
    runtime, task = sim.runtime, sim.runtime.task
    model = runtime.model
    k = src.num_clients
    shared = {n: p for n, p in model.named_parameters() if n not in runtime.local}
    personal = [{n: v.clone().requires_grad_(True) for n, v in runtime.local_init.items()} for _ in range(k)]
    scales = task.lr_scales
    groups = param_groups(shared, scales, s.lr)
    for c in range(k):
        groups += param_groups(personal[c], scales, s.lr)
    opt = torch.optim.Adam(groups, lr=s.lr)
    loss_of = TaskLoss(task, model)
    checks = _validation_rounds(s.rounds, s.validate_every) if s.val_fraction > 0 else set()
    best = _Best(False, k)
    records: list[dict] = []

    def stores() -> dict[int, dict[str, torch.Tensor]]:
        return {c: {LOCAL + n: v.detach().clone() for n, v in personal[c].items()} for c in range(k)}

    bar = tqdm(total=s.rounds, desc=f"{src.name} oracle λ={lmbda:g}", disable=not progress, unit="round")
    for rnd in range(1, s.rounds + 1):
        model.train()
        plans = []
        for c in range(k):
            x, _ = sim.client_data(c)
            gen = rngs.torch_generator(rngs.derive_seed(s.seed, rnd, rngs.CLIENT_TRAIN, c))
            plans.append((x, gen, [idx for _ in range(s.local_epochs) for idx in batches(len(x), s.batch_size, gen)]))
        loss_sum, count = 0.0, 0
        for t in range(max(len(p[2]) for p in plans)):
            loss = 0.0
            for c, (x, gen, steps) in enumerate(plans):
                if t < len(steps):
                    xb = x[steps[t]]
                    lc = torch.func.functional_call(loss_of, {f"model.{n}": v for n, v in personal[c].items()},
                                                    (xb, xb, gen))
                    loss = loss + lc / k
                    loss_sum += float(lc.detach()) * len(xb)
                    count += len(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        record = {"round": rnd, "train_loss": loss_sum / max(count, 1)}
        params = {n: p.detach().clone() for n, p in shared.items()}
        if rnd in checks:
            points = task.client_losses(runtime, params, stores(), val)
            losses = [p["loss"] for p in points]
            record.update(val_loss=float(np.mean(losses)), val_client_loss=losses)
            best.offer(rnd, losses, params, [{n: v.detach() for n, v in personal[c].items()} for c in range(k)])
        if rnd == s.rounds:
            record.update(task.evaluate(runtime, params, stores()))
        records.append(record)
        bar.update()
    bar.close()
    if best.shared is None:
        out_shared, out_local, best_round = params, [{n: v.detach().clone() for n, v in p.items()} for p in personal], \
            s.rounds
    else:
        out_shared, out_local, best_round = best.shared, best.local, best.round[0]
    return Trained(model_config(src, s), "oracle", lmbda, out_shared, out_local, records, 0, 0, best_round)


def fit_prior(model: NTC, x: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> NTC:
    """Fit only the entropy model to ``x`` (transforms frozen): a newcomer's or a fine-tuning step.
    Returns a new model; ``model`` is left as it was."""
    m = copy.deepcopy(model).train()
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("prior."))
    opt = torch.optim.Adam(m.prior.parameters(), lr=lr)
    gen = rngs.torch_generator(seed)
    with torch.no_grad():
        y = m.g_a(x)  # frozen analysis: its output does not change
    for _ in range(epochs):
        for idx in batches(len(y), batch_size, gen):
            yb = y[idx]
            noisy = yb + torch.rand(yb.shape, generator=gen) - 0.5
            loss = -torch.log2(m.prior.likelihood(noisy)).sum() / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in m.parameters():
        p.requires_grad_(True)
    return m.eval()


def average_prior(models: list[NTC]) -> dict[str, torch.Tensor]:
    """The parameter mean of several clients' entropy models (what a server could offer a newcomer)."""
    names = models[0].prior_names()
    params = [dict(m.named_parameters()) for m in models]
    return {n: torch.stack([p[n].detach() for p in params]).mean(0) for n in names}


@torch.no_grad()
def rd_point(model: NTC, data: list[torch.Tensor] | torch.Tensor) -> dict:
    """Code ``data`` (a batch, one stream; or a list of batches, one stream each) to real bytes and
    back: rate from the bytes, the model's estimate, MSE."""
    coder = Coder.of(model)
    items = data if isinstance(data, list) else [data]
    nbytes, est, se, n_el, units = 0, 0.0, 0.0, 0, 0
    for x in items:
        blob, x_hat, bits = coder.code_batch(x)
        nbytes += len(blob)
        est += bits
        se += float(((x_hat - x) ** 2).double().sum())
        n_el += x.numel()
        units += len(x) * model.pixels(x)
    mse = se / n_el
    return {"rate": 8 * nbytes / units, "rate_est": est / units, "mse": mse, "bytes": nbytes,
            "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else math.inf}


def mean_point(points: list[dict]) -> dict:
    """Clients' points averaged with equal weight (rates and MSEs; PSNR of the mean MSE)."""
    out = {k: float(np.mean([p[k] for p in points])) for k in ("rate", "rate_est", "mse")}
    out["bytes"] = int(sum(p["bytes"] for p in points))
    out["psnr"] = 10 * math.log10(1.0 / out["mse"])
    return out
