"""What a compression method changes beyond the wire: local training and the server's step.

An :class:`Algorithm` is built from the same options object as its codec. The default,
:class:`FedAvg`, trains the weights themselves, starts from the model's initial weights, adds the
example-weighted mean of the decoded updates and evaluates the global model as it is. Methods that
differ override only what they change: FedMRN and FedBAT reparametrize local training, signSGD
with ``vote=true`` aggregates by majority vote, FedPM does all four (Bernoulli masks, a Beta
posterior, a sampled network for evaluation).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import CodecContext, ModelSpec, Options, Update


class Parametrization:
    """How an algorithm reparametrizes local training. The engine calls, in order:

    ``init()`` → trainable latent tensors; for every step ``deltas(latent, progress)`` →
    the update added to the frozen global weight in the forward pass (``progress`` runs from 0 to 1);
    at the end ``finish(latent)`` → the update handed to the codec's ``encode``.

    ``init()`` may return extra trainable tensors under names that are not model tensors (FedBAT's
    learned step sizes), and ``finish()`` may return side values under names containing ``/`` that
    only the matching codec's ``encode`` reads; the engine passes them through untouched.

    A parametrization is built on the CPU; a run on another device calls :meth:`to` once before
    ``init()``. Random draws go through :meth:`uniform`, which draws from the client's CPU generator
    and moves the result, so the draws are the same on every device (:mod:`fedcodec.fl.device`).
    """

    names: tuple[str, ...] = ()
    #: the latent tensors' learning rate is the client's lr times this; they get no weight decay
    lr_scale: float = 1.0
    #: the latents' own optimizer ("sgd" or "adam") at the learning rate :attr:`lr`; None: the latents
    #: train in the client's optimizer at its lr times :attr:`lr_scale` (FedPM's scores want Adam while
    #: the BatchNorm values beside them keep the client's SGD)
    optimizer: str | None = None
    lr: float | None = None
    #: where training runs (set by :meth:`to`)
    device: torch.device = torch.device("cpu")
    #: the client-round's generator of the draws (:meth:`uniform`); None: torch's global generator
    gen: torch.Generator | None = None

    def to(self, device: torch.device) -> "Parametrization":
        """Move the frozen tensors this parametrization holds (every tensor attribute, and every
        dict of tensors) to ``device``, once; later draws land there too. Returns ``self``."""
        device = torch.device(device)
        if device != self.device:
            for name, value in list(vars(self).items()):
                if isinstance(value, torch.Tensor):
                    setattr(self, name, value.to(device))
                elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                    setattr(self, name, {k: v.to(device) for k, v in value.items()})
            self.device = device
        return self

    def uniform(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """U[0, 1) float32 values of ``shape`` from :attr:`gen` (a CPU generator), on :attr:`device`."""
        return torch.rand(shape, generator=self.gen).to(self.device)

    def init(self) -> Update:
        raise NotImplementedError

    def deltas(self, latent: Update, progress: float) -> Update:
        raise NotImplementedError

    def finish(self, latent: Update) -> Update:
        raise NotImplementedError


def weighted_mean(spec: ModelSpec, updates: list[tuple[int, float, Update]]) -> dict[str, torch.Tensor]:
    """Sum of ``weight / total * update`` in float64, accumulated in the given (client-id) order."""
    total = sum(w for _, w, _ in updates)
    out = {}
    for t in spec.tensors:
        acc = torch.zeros(t.shape, dtype=torch.float64)
        for _, w, upd in updates:
            acc += upd[t.name].to(torch.float64) * (w / total)
        out[t.name] = acc
    return out


class Algorithm:
    """Plain FedAvg; subclasses override what their method changes. ``options`` are the codec's."""

    #: the server's step is "global += aggregate(...)" with an update-like aggregate (a server
    #: optimizer may rescale or accumulate it); False where the aggregate only encodes a new model
    #: that was computed directly (FedPM's Beta posterior), which such an optimizer must refuse
    additive_step: ClassVar[bool] = True

    def __init__(self, options: Options | None = None):
        self.options = options if options is not None else Options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def parametrization(self, ctx: CodecContext, global_params: Update) -> Parametrization | None:
        """Client side: how to train this round (None: the weights themselves)."""
        return None

    def init_global(self, params: Update, spec: ModelSpec) -> Update:
        """The global model the run starts from, given the model's initial weights."""
        return params

    def aggregate(self, spec: ModelSpec, global_params: Update,
                  updates: list[tuple[int, float, Update]]) -> dict[str, torch.Tensor]:
        """The float64 step added to the global model, from decoded ``(client, weight, update)``
        triples sorted by client id. Default: the weight-normalised mean."""
        return weighted_mean(spec, updates)

    def own_aggregate(self, spec: ModelSpec) -> list[str]:
        """The tensors :meth:`aggregate` does not average (FedPM's posterior, signSGD's vote): each
        client's influence on them is bounded by the rule itself, so the server's clipping and
        robust aggregators (:mod:`fedcodec.fl.robust`) leave them alone. Default: none."""
        return []

    def eval_params(self, params: Update, spec: ModelSpec, seed: int) -> Update:
        """The weights to evaluate for global model ``params`` (FedPM samples a mask from them)."""
        return params


FedAvg = Algorithm
