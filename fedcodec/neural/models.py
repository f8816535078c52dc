"""Nonlinear transform coding models: analysis ``g_a``, synthesis ``g_s``, a factorized prior.

Parameter names split the model the way federated training needs it: ``g_a.*`` and ``g_s.*`` are
the shared transforms, ``prior.*`` the entropy model that each client personalizes
(:data:`PRIOR_PREFIX`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .entropy import FactorizedPrior

if TYPE_CHECKING:
    from ..codecs import Update
    from ..fl.client import ClientRuntime

PRIOR_PREFIX = "prior."


class GDN(nn.Module):
    """Generalized divisive normalization (Ballé et al. 2016): ``x / sqrt(beta + gamma · x²)`` over
    channels; the inverse (IGDN, for synthesis) multiplies instead. ``beta`` and ``gamma`` are kept
    non-negative by squaring a bounded parameter."""

    def __init__(self, channels: int, inverse: bool = False, gamma_init: float = 0.1):
        super().__init__()
        self.inverse = inverse
        self.pedestal = 2.0 ** -18
        self.beta = nn.Parameter(torch.sqrt(torch.ones(channels) + self.pedestal))
        self.gamma = nn.Parameter(torch.sqrt(gamma_init * torch.eye(channels) + self.pedestal))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        floor = math.sqrt(self.pedestal)
        beta = self.beta.clamp_min(math.sqrt(1e-6 + self.pedestal)) ** 2 - self.pedestal
        gamma = self.gamma.clamp_min(floor) ** 2 - self.pedestal
        c = x.shape[1]
        norm = nn.functional.conv2d(x * x, gamma.reshape(c, c, 1, 1), beta)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)


@dataclass(frozen=True)
class NTCConfig:
    """The architecture, enough to rebuild a model: ``kind`` "vector" (MLPs on ``dim``-vectors) or
    "image" (conv/GDN on ``dim``-channel images, ``downs`` stride-2 stages). ``offsets``: quantize
    the latents around each channel's median of the entropy model instead of the integer grid (see
    :mod:`fedcodec.neural.entropy`); it adds no parameter, and its default (off) is what codecs
    saved before it existed mean, so they decode exactly as they did."""

    kind: str
    dim: int
    latent: int
    hidden: int = 64
    downs: int = 2
    offsets: bool = False

    def validate(self) -> "NTCConfig":
        if self.kind not in ("vector", "image"):
            raise ConfigError(f"model kind must be vector or image, got {self.kind!r}")
        if min(self.dim, self.latent, self.hidden, self.downs) < 1:
            raise ConfigError(f"model sizes must be >= 1: {self}")
        if not isinstance(self.offsets, bool):
            raise ConfigError(f"model offsets must be true or false, got {self.offsets!r}")
        return self

    @classmethod
    def parse(cls, value: object) -> "NTCConfig":
        """An architecture read from a file: exactly the fields, of their types (the integers within
        :data:`NTC_LIMITS`, the optional ``offsets`` a JSON bool, absent meaning false); anything
        else raises :class:`ConfigError`."""
        names = ("kind", *NTC_LIMITS, "offsets")
        if not isinstance(value, dict) or not set(value) <= set(names) or not {"kind", "dim", "latent"} <= set(value):
            raise ConfigError(f"an architecture is an object of {', '.join(names)} (kind, dim, latent required)")
        if value["kind"] not in ("vector", "image"):
            raise ConfigError("model kind must be vector or image")
        for name, top in NTC_LIMITS.items():
            v = value.get(name, 1)
            if type(v) is not int or not 1 <= v <= top:
                raise ConfigError(f"model {name} must be an integer in 1..{top}")
        if type(value.get("offsets", False)) is not bool:
            raise ConfigError("model offsets must be a JSON true or false")
        return cls(**value).validate()


def output_bias_name(cfg: NTCConfig) -> str:
    """The name of the synthesis transform's output bias (its last layer's bias: one value per
    output dimension or channel), which ``federated-bias`` training keeps client-local."""
    return "g_s.4.bias" if cfg.kind == "vector" else f"g_s.{2 * (cfg.downs - 1)}.bias"


#: the largest architecture a saved codec may declare (each field's maximum)
NTC_LIMITS = {"dim": 4096, "latent": 1024, "hidden": 4096, "downs": 8}


class NTC(nn.Module):
    """Nonlinear transform coding model; ``forward`` is the training pass with uniform noise."""

    def __init__(self, cfg: NTCConfig):
        super().__init__()
        self.cfg = cfg.validate()
        h, k = cfg.hidden, cfg.latent
        if cfg.kind == "vector":
            self.g_a = nn.Sequential(nn.Linear(cfg.dim, h), nn.Softplus(), nn.Linear(h, h), nn.Softplus(),
                                     nn.Linear(h, k))
            self.g_s = nn.Sequential(nn.Linear(k, h), nn.Softplus(), nn.Linear(h, h), nn.Softplus(),
                                     nn.Linear(h, cfg.dim))
        else:
            down, up = [], []
            for i in range(cfg.downs):
                last = i == cfg.downs - 1
                down.append(nn.Conv2d(cfg.dim if i == 0 else h, k if last else h, 5, stride=2, padding=2))
                if not last:
                    down.append(GDN(h))
                up.append(nn.ConvTranspose2d(k if i == 0 else h, cfg.dim if last else h, 5, stride=2, padding=2,
                                             output_padding=1))
                if not last:
                    up.append(GDN(h, inverse=True))
            self.g_a, self.g_s = nn.Sequential(*down), nn.Sequential(*up)
        self.prior = FactorizedPrior(k)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (1 for vectors)."""
        return 2 ** self.cfg.downs if self.cfg.kind == "image" else 1

    def pixels(self, x: torch.Tensor) -> int:
        """What the rate is normalised by, per sample: pixels of an image, 1 for a vector."""
        return int(x.shape[-1] * x.shape[-2]) if self.cfg.kind == "image" else 1

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.g_a(x)
        y_tilde = y + (torch.rand(y.shape, generator=gen, dtype=y.dtype) - 0.5)
        return self.g_s(y_tilde), self.prior.likelihood(y_tilde)

    def rd(self, x: torch.Tensor, lmbda: float, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Rate (bits per pixel, or per vector), MSE and loss = rate + λ·MSE under the noise proxy."""
        x_hat, lik = self(x, gen)
        rate = -torch.log2(lik).sum() / (x.shape[0] * self.pixels(x))
        mse = torch.mean((x_hat - x) ** 2)
        return {"rate": rate, "mse": mse, "loss": rate + lmbda * mse}

    def shared_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if not n.startswith(PRIOR_PREFIX)]

    def prior_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(PRIOR_PREFIX)]

    def transform_fingerprint(self) -> bytes:
        """8 bytes identifying the synthesis transform (what a decoder must hold). ``offsets`` is left
        out: it belongs to the entropy model, whose fingerprint covers it (and leaving it out keeps
        every transform fingerprint what it was before the field existed)."""
        h = hashlib.blake2b(digest_size=8)
        arch = {k: v for k, v in asdict(self.cfg).items() if k != "offsets"}
        h.update(repr(sorted(arch.items())).encode())
        for name, p in self.g_s.named_parameters():
            h.update(name.encode() + p.detach().contiguous().numpy().astype("<f4").tobytes())
        return h.digest()


class NTCTask:
    """The engine's task for learned compression: loss = rate + λ·MSE with uniform noise drawn from
    the round's training generator (a compressor's target is its input, so the targets ``y`` are
    not read); the entropy model may train at ``prior_lr_scale`` times the learning rate, and under
    an optimizer of its own kind (``prior_optimizer``, e.g. "adam" while the shared transforms take
    plain SGD steps: :func:`~fedcodec.fl.client.local_optimizer`'s ``local_optimizers`` hook; None:
    the client's optimizer, as the rest).

    Evaluation is personalised: each client codes its own test set ``test[c]`` with the shared
    tensors and its own client-local ones (its entropy model), and the record holds the clients'
    mean rate estimate ``rate_est`` (−log2 p of the rounded latents, per pixel or vector; no bytes
    are coded), mean ``mse`` and ``test_loss`` = rate_est + λ·mse. :meth:`client_losses` gives the
    same per client on any data (the trainer's validation split)."""

    def __init__(self, lmbda: float, prior_lr_scale: float = 1.0, test: Sequence[torch.Tensor] = (),
                 prior_optimizer: str | None = None):
        self.lmbda = lmbda
        self.lr_scales = {PRIOR_PREFIX: prior_lr_scale}
        self.local_optimizers = {PRIOR_PREFIX: prior_optimizer} if prior_optimizer is not None else {}
        self.test = list(test)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return model.rd(x, self.lmbda, gen)["loss"]

    @torch.no_grad()
    def client_losses(self, runtime: ClientRuntime, params: Update, stores: Mapping[int, Mapping[str, torch.Tensor]],
                      data: Sequence[torch.Tensor]) -> list[dict[str, float]]:
        """Client ``c``'s ``rate_est``, ``mse`` and ``loss`` = rate_est + λ·mse on ``data[c]``, coded
        with the shared tensors ``params`` and its own client-local ones (from ``stores[c]``)."""
        from .codec import Coder

        model = runtime.model.eval()
        runtime.load(params)
        out = []
        for c, x in enumerate(data):
            runtime.load(runtime.local_tensors(stores.get(c, {})))
            coder = Coder(model, None)  # estimates need no tables
            sym = coder.quantize(x)
            rate = coder.estimate_bits(sym) / (len(x) * model.pixels(x))
            mse = float(torch.mean((coder.reconstruct(sym) - x) ** 2))
            out.append({"rate_est": rate, "mse": mse, "loss": rate + self.lmbda * mse})
        return out

    def evaluate(self, runtime: ClientRuntime, params: Update,
                 stores: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, float]:
        if not self.test:
            raise ConfigError("this compression task has no test data to evaluate on; "
                              "give it each client's: NTCTask(lmbda, test=[...])")
        points = self.client_losses(runtime, params, stores, self.test)
        rate = float(np.mean([p["rate_est"] for p in points]))
        mse = float(np.mean([p["mse"] for p in points]))
        return {"rate_est": rate, "mse": mse, "test_loss": rate + self.lmbda * mse}


def ntc_shapes(cfg: NTCConfig) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of ``NTC(cfg)``, by name, computed without building it (a file may
    declare any architecture: nothing is allocated before its size is known). Kept equal to
    :class:`NTC` by a test."""
    h, k, d = cfg.hidden, cfg.latent, cfg.dim
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.kind == "vector":
        for part, sizes in (("g_a", (d, h, h, k)), ("g_s", (k, h, h, d))):
            for j in range(3):
                shapes[f"{part}.{2 * j}.weight"] = (sizes[j + 1], sizes[j])
                shapes[f"{part}.{2 * j}.bias"] = (sizes[j + 1],)
    else:
        for i in range(cfg.downs):
            last = i == cfg.downs - 1
            down_in, down_out = d if i == 0 else h, k if last else h
            up_in, up_out = k if i == 0 else h, d if last else h
            shapes[f"g_a.{2 * i}.weight"], shapes[f"g_a.{2 * i}.bias"] = (down_out, down_in, 5, 5), (down_out,)
            shapes[f"g_s.{2 * i}.weight"], shapes[f"g_s.{2 * i}.bias"] = (up_in, up_out, 5, 5), (up_out,)
            if not last:
                for part in ("g_a", "g_s"):
                    shapes[f"{part}.{2 * i + 1}.beta"], shapes[f"{part}.{2 * i + 1}.gamma"] = (h,), (h, h)
    dims = (1, 3, 3, 3, 1)  # FactorizedPrior's default filters
    for i in range(len(dims) - 1):
        shapes[f"prior.matrices.{i}"] = (k, dims[i + 1], dims[i])
        shapes[f"prior.biases.{i}"] = (k, dims[i + 1], 1)
        if i < len(dims) - 2:
            shapes[f"prior.factors.{i}"] = (k, dims[i + 1], 1)
    return shapes


def build_ntc(cfg: NTCConfig, seed: int) -> NTC:
    """The model of ``cfg`` initialised from ``seed`` alone (the global torch RNG is left as it was)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return NTC(cfg)
    finally:
        torch.random.set_rng_state(state)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()
