"""Federated training of a learned compressor on fedcodec's engine, and its rate-distortion evaluation.

Three ways to train, all through the same engine (:func:`fedcodec.fl.simulation.run_round`, the same
client and server functions as classification runs), differing only in which tensors are
client-local:

- ``federated`` (the paper's method): ``g_a``/``g_s`` are averaged (their updates go through any
  update codec, fp32 by default; a codec that changes how clients train, such as FedMRN's masks
  over noise, applies to them alone), the entropy model ``prior.*`` is personalized, trains
  directly and never leaves its client;
- ``global``: everything averaged, one codec for all;
- ``local``: everything client-local: each client trains its own codec alone with the same local
  steps (its uplink carries no tensor at all).

``global-ft`` (global codec + a local fit of the entropy model) and newcomers are derived after
training with :func:`fit_prior`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..codecs import ModelSpec, Update, build_codec, build_uplink
from ..config import Config
from ..errors import CodecModelError, ConfigError
from ..fl import rng as rngs
from ..fl.client import ClientRuntime, batches
from ..fl.downlink import Downlink
from ..fl.simulation import RunState, Simulation, local_training, pooled, run_round
from ..safetensors_header import load_tensors, read_header
from .codec import Coder
from .models import NTC, PRIOR_PREFIX, NTCConfig, NTCTask, build_ntc, ntc_shapes
from .sources import NeuralSource

MODES = ("federated", "global", "local")


@dataclass
class Settings:
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    method: str = "fedavg"  # update codec of the shared transforms (any fedcodec method; lr is ``lr``, not its own)
    codec_options: dict = field(default_factory=dict)
    finetune_epochs: int = 5  # entropy-model fits (global-ft, newcomers)
    keep_optimizer_state: bool = True  # each client's Adam moments carry over between rounds
    prior_lr_scale: float = 10.0  # the entropy model's learning rate, relative to lr (training and fits)

    @classmethod
    def for_source(cls, src: NeuralSource, **overrides) -> "Settings":
        return cls(**{**src.defaults, **{k: v for k, v in overrides.items() if v is not None}})


def local_names(model: NTC, mode: str) -> frozenset[str]:
    if mode == "federated":
        return frozenset(model.prior_names())
    if mode == "global":
        return frozenset()
    if mode == "local":
        return frozenset(n for n, _ in model.named_parameters())
    raise ConfigError(f"unknown training mode {mode!r}; choose one of {', '.join(MODES)}")


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
                "uplink_bytes": self.uplink_bytes, "uplink_payloads": self.uplink_payloads, **(meta or {})}
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
        local = local_names_of(shapes, info["mode"])
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
                   info["uplink_payloads"])


#: a codec.safetensors header (tensor entries and the info JSON) is at most this large
MAX_CODEC_HEADER = 8 << 20
#: clients a codec.safetensors may hold
MAX_CODEC_CLIENTS = 10_000
#: parameters of a codec's architecture (64 Mi float32: 256 MiB)
MAX_CODEC_PARAMS = 1 << 26
_CODEC_INFO = {"model": dict, "mode": str, "lmbda": (int, float), "clients": int, "uplink_bytes": int,
               "uplink_payloads": int}


def local_names_of(shapes: dict[str, tuple[int, ...]], mode: str) -> frozenset[str]:
    """:func:`local_names` from parameter names alone (what a model built on ``meta`` gives)."""
    if mode == "federated":
        return frozenset(n for n in shapes if n.startswith(PRIOR_PREFIX))
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
    try:
        info["model"] = NTCConfig.parse(info["model"])
    except ConfigError as err:
        raise fail(f"its architecture is invalid ({err})") from None
    info["lmbda"] = float(info["lmbda"])
    return info


def build_simulation(src: NeuralSource, mode: str, lmbda: float, s: Settings) -> tuple[Simulation, RunState]:
    """The engine's simulation of training ``mode`` at ``lmbda``: every client in every round, the
    shared tensors through ``s.method``'s uplink codec, a float32 broadcast, and the compression
    task (:class:`NTCTask`) evaluating on each client's test data with its own local tensors."""
    model = build_ntc(src.model, s.seed)
    local = local_names(model, mode)
    spec = ModelSpec.from_model(model, local=local)
    k = src.num_clients
    cfg = Config(seed=s.seed, rounds=s.rounds, num_clients=k, clients_per_round=k, local_epochs=s.local_epochs,
                 batch_size=s.batch_size, lr=s.lr, optimizer="adam", keep_optimizer_state=s.keep_optimizer_state,
                 method=s.method, codec_options=dict(s.codec_options), eval_every=s.rounds).validate()
    uplink = build_uplink(cfg.method_spec().codec, **cfg.uplink_options)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    initial = uplink.algorithm.init_global({t.name: tensors[t.name].detach().clone() for t in spec.tensors}, spec)
    uplink.bind_initial(initial)
    downlink = Downlink(build_codec(cfg.downlink, **cfg.downlink_options), cfg.downlink_delta, spec, s.seed, initial)
    task = NTCTask(lmbda, s.prior_lr_scale, test=src.test)
    runtime = ClientRuntime(model, spec, uplink, downlink, s.seed, task=task, local=local)
    data, parts = pooled([(x, x) for x in src.train])  # a compressor's target is its input
    return Simulation(cfg, data, runtime, parts, local_training(cfg)), RunState(0, dict(initial))


def client_tensors(sim: Simulation, state: RunState, client: int) -> Update:
    return {n: v.clone() for n, v in sim.runtime.local_tensors(state.client_states.get(client, {})).items()}


def train(src: NeuralSource, mode: str, lmbda: float, s: Settings, progress: bool = True) -> Trained:
    """Train ``mode`` at ``lmbda``; every client takes part in every round."""
    sim, state = build_simulation(src, mode, lmbda, s)
    bar = tqdm(total=s.rounds, desc=f"{src.name} {mode} λ={lmbda:g}", disable=not progress, unit="round")
    while state.round < s.rounds:
        state = run_round(sim, state)
        bar.set_postfix(loss=f"{state.records[-1]['train_loss']:.3f}")
        bar.update()
    bar.close()
    ups = [e for e in state.ledger.entries if e.direction == "up"]
    return Trained(src.model, mode, lmbda, {k: v.clone() for k, v in state.global_params.items()},
                   [client_tensors(sim, state, c) for c in range(src.num_clients)], state.records,
                   sum(e.nbytes for e in ups), len(ups))


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
