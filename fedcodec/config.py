"""Typed experiment configuration: presets, TOML files and ``key=value`` overrides.

Precedence (later wins): dataclass defaults < preset < TOML file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    """A named recipe: which uplink codec, its options, and the client learning rate it wants."""

    codec: str
    options: dict[str, Any]
    lr: float
    summary: str


METHODS: dict[str, Method] = {
    "fedavg": Method("fp32", {}, 0.03, "FedAvg, float32 updates"),
    "fp16": Method("fp16", {}, 0.03, "FedAvg with float16 updates"),
    "signsgd": Method("signsgd", {}, 0.03, "sign of the update, scaled by its mean magnitude per tensor"),
    "signsgd-vote": Method("signsgd", {"vote": True}, 0.03, "signSGD with majority vote at the server"),
    "ef-signsgd": Method("signsgd", {"ef": True}, 0.03, "scaled sign with client error feedback (EF-SignSGD)"),
    "qsgd-1": Method("qsgd", {"levels": 1}, 0.03, "stochastic binarization between +-max (QSGD/FedPAQ, s=1)"),
    "qsgd-4": Method("qsgd", {"levels": 4}, 0.03, "stochastic uniform quantization, 5 levels (s=4)"),
    "topk-ef": Method("topk", {"fraction": 0.01, "ef": True}, 0.03, "top-1% sparsification with error feedback"),
    "fedpm": Method("fedpm", {"score_lr_scale": 10000.0}, 0.1,
                    "FedPM: Bernoulli masks over frozen random weights, Beta aggregation (score lr x1e4)"),
    "fedbat": Method("fedbat", {}, 0.1, "FedBAT: learned-step stochastic binarization of the update"),
    "fedmrn-binary": Method("fedmrn", {"mask": "binary", "alpha": 0.01}, 0.1,
                            "FedMRN, binary masks over uniform noise (alpha 0.01)"),
    "fedmrn-signed": Method("fedmrn", {"mask": "signed", "alpha": 0.005}, 0.1,
                            "FedMRN, signed masks over uniform noise (alpha 0.005)"),
    "fedmrn-binary-ec": Method("fedmrn", {"mask": "binary", "alpha": 0.01, "entropy": True}, 0.1,
                               "FedMRN binary + range coding of the mask bits"),
    "fedmrn-signed-ec": Method("fedmrn", {"mask": "signed", "alpha": 0.005, "entropy": True}, 0.1,
                               "FedMRN signed + range coding of the mask bits"),
}
# the autoencoder codec at three latent sizes (chunks of 1024, linear AE, 6-bit latents; biases and
# BatchNorm scales/shifts coded too, running statistics as float16), each with and without error
# feedback. No range coding: for ~1.5k latents its 256-entry count table costs more than it saves
for _k in (4, 16, 64):
    METHODS[f"ae-{_k}"] = Method("ae", {"latent": _k, "bits": 6}, 0.03,
                                 f"per-client autoencoder, 1024-value chunks -> {_k} latents (Chandar et al.)")
    METHODS[f"ae-{_k}-ef"] = Method("ae", {"latent": _k, "bits": 6, "ef": True}, 0.03,
                                    f"ae-{_k} with error feedback")


@dataclass
class Config:
    # run
    seed: int = 0
    rounds: int = 30
    num_clients: int = 100
    clients_per_round: int = 10
    min_clients: int = 1
    dropout: float = 0.0  # fraction of sampled clients that fail each round (never send)
    stragglers: float = 0.0  # fraction that send after the round's deadline (bytes spent, update ignored)
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    allow_subset: bool = False  # accept dataset files smaller than the official release (fixtures)
    partition: str = "iid"
    beta: float = 0.3
    classes_per_client: int = 3
    min_client_size: int = 10
    # model
    model: str = "cnn4"
    init_std: float = 0.01
    # local training
    local_epochs: int = 2
    batch_size: int = 64
    lr: float | None = None  # None: the method's own learning rate
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # local optimizer: sgd or adam
    keep_optimizer_state: bool = False  # a client keeps its optimizer state between rounds (else afresh)
    # method
    method: str = "fedavg"
    codec_options: dict[str, Any] = field(default_factory=dict)
    downlink: str = "fp32"  # codec of the server -> client broadcast
    downlink_options: dict[str, Any] = field(default_factory=dict)
    downlink_delta: bool = False  # send global - (the client's copy) instead of the model
    max_update_norm: float | None = None  # reject decoded updates with a larger L2 norm
    # evaluation and output
    eval_every: int = 1
    out_dir: str = "runs"
    checkpoint_every: int = 1
    threads: int | None = None

    def method_spec(self) -> Method:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        return METHODS[self.method]

    @property
    def client_lr(self) -> float:
        return self.lr if self.lr is not None else self.method_spec().lr

    @property
    def uplink_options(self) -> dict[str, Any]:
        return {**self.method_spec().options, **self.codec_options}

    def validate(self) -> "Config":
        """Fail fast, before any data is loaded, with a message that says how to fix it."""
        self.method_spec()
        checks = [
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.num_clients >= 1, "num_clients must be >= 1"),
            (1 <= self.clients_per_round <= self.num_clients,
             f"clients_per_round must be in 1..num_clients ({self.num_clients}), got {self.clients_per_round}"),
            (1 <= self.min_clients <= self.clients_per_round, "min_clients must be in 1..clients_per_round"),
            (self.local_epochs >= 1, "local_epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (BatchNorm needs two samples)"),
            (self.client_lr > 0, "lr must be positive"),
            (self.optimizer in ("sgd", "adam"), f"optimizer must be sgd or adam, got {self.optimizer!r}"),
            (self.beta > 0, "beta (Dirichlet concentration) must be positive"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (0 <= self.dropout < 1 and 0 <= self.stragglers < 1 and self.dropout + self.stragglers < 1,
             "dropout and stragglers are fractions of the sampled clients: each in [0, 1), their sum < 1"),
            (self.max_update_norm is None or self.max_update_norm > 0, "max_update_norm must be positive"),
            (self.partition in ("iid", "dirichlet", "k-classes"),
             f"partition must be iid, dirichlet or k-classes, got {self.partition!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        from .codecs import build_codec, build_uplink

        build_uplink(self.method_spec().codec, **self.uplink_options)  # unknown codec options fail here
        if self.downlink_options.get("ef") in (True, "true"):
            raise ConfigError("the downlink takes no ef option: with downlink_delta=true the error is sent "
                              "next round anyway")
        down = build_codec(self.downlink, **self.downlink_options)
        if not down.carries_models and not self.downlink_delta:
            raise ConfigError(f"downlink {self.downlink!r} compresses updates, not models: set downlink_delta=true "
                              "(send the change of the global model), or use fp32/fp16")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # about a minute per method on a 2-core machine
    "quick": {"rounds": 5, "local_epochs": 1, "num_clients": 100, "clients_per_round": 5},
    # the foundation benchmark (issue: FedAvg vs FedMRN on Fashion-MNIST)
    "bench": {"rounds": 30, "local_epochs": 2, "num_clients": 100, "clients_per_round": 10},
    # the paper's setting; meant for a GPU
    "paper": {"rounds": 100, "local_epochs": 10, "num_clients": 100, "clients_per_round": 10},
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any) -> Any:
    """Convert a string from the command line to the field's type."""
    if key not in _FIELDS:
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(_FIELDS))}")
    if not isinstance(value, str):
        return value
    kind = str(_FIELDS[key].type)
    if value.lower() in ("none", "null") and "None" in kind:
        return None
    if kind == "bool":
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        raise ConfigError(f"{key} expects {kind.split(' ')[0]}, got {value!r}") from None
    return value


def _parse_scalar(text: str) -> Any:
    """Parse a codec option value: TOML scalar syntax, or a bare word as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_config(preset: str | None = None, file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> Config:
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {file} is not valid TOML: {err}") from None
        for k, v in data.items():
            values[k] = _coerce(k, v)
    for k, v in (overrides or {}).items():
        if k in ("codec_options", "downlink_options") and isinstance(v, dict):
            values[k] = {**values.get(k, {}), **v}
        elif v is not None:
            values[k] = _coerce(k, v)
    return Config(**values).validate()


def parse_assignments(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` strings → (config overrides, codec options); ``codec.X=v`` sets uplink codec
    option X, ``downlink.X=v`` sets downlink codec option X (in the overrides' ``downlink_options``)."""
    overrides: dict[str, Any] = {}
    codec: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key.startswith("codec."):
            codec[key[len("codec."):]] = _parse_scalar(value.strip())
        elif key.startswith("downlink."):
            overrides.setdefault("downlink_options", {})[key[len("downlink."):]] = _parse_scalar(value.strip())
        else:
            overrides[key] = _coerce(key, value.strip())
    return overrides, codec
