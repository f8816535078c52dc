"""Small models and specs shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from fedcodec.codecs import CodecContext, ModelSpec
from fedcodec.fl.rng import torch_generator


class Tiny(nn.Module):
    """A conv + BN + linear model whose masked weight count (3*1*3*3 + 3*5 = 42) is not a multiple of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 5, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def tiny_spec() -> ModelSpec:
    return ModelSpec.from_model(Tiny())


def ctx(spec: ModelSpec, seed: int = 7, client: int = 3, rng_seed: int = 11,
        reference: dict[str, torch.Tensor] | None = None) -> CodecContext:
    """A client-round context; ``reference`` (the model the update is relative to, which FedPM needs)
    defaults to the all-zero model of ``spec``."""
    if reference is None:
        reference = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    return CodecContext(spec, client=client, round=1, seed=seed, rng=torch_generator(rng_seed), reference=reference)


def random_update(spec: ModelSpec, seed: int = 0, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(t.shape, generator=g) * scale for t in spec.tensors}
