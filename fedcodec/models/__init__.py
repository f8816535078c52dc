"""Models used in the FedMRN paper: CNN4 (28x28 or 32x32 inputs) and CNN8 (CIFAR)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _init_normal(model: nn.Module, std: float) -> None:
    """Conv and linear weights ~ N(0, std); BatchNorm keeps its (1, 0) init."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)


class CNN4(nn.Module):
    """Four 3x3 conv blocks (32-64-128-256, no bias, BatchNorm, ReLU, 2x2 max-pool), linear, no bias.

    For 28x28 inputs the spatial size goes 28→14→7→3→1, so the linear layer is 256→classes; for
    32x32 inputs it goes 32→16→8→4→2 and the linear layer is 1024→classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (32, 64, 128, 256):
            layers += _conv_bn(cin, cout) + [nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        side = image_size
        for _ in range(4):
            side //= 2
        self.classifier = nn.Linear(256 * side * side, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class CNN8(nn.Module):
    """Eight 3x3 conv blocks (32,32 | 64,64 | 128,128 | 256,256), pool after each pair, linear 1024→classes."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (32, 64, 128, 256):
            layers += _conv_bn(cin, cout) + _conv_bn(cout, cout) + [nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        side = image_size // 16
        self.classifier = nn.Linear(256 * side * side, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


MODELS = {"cnn4": CNN4, "cnn8": CNN8}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int,
                init_std: float = 0.01) -> nn.Module:
    """Build ``name`` for inputs of ``input_shape`` (C, H, W), initialised from ``seed`` alone."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    channels, height, width = input_shape
    if height != width:
        raise ConfigError(f"{name} expects square images, got {height}x{width}")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = MODELS[name](in_channels=channels, num_classes=num_classes, image_size=height)
        _init_normal(model, init_std)
    finally:
        torch.random.set_rng_state(gen_state)
    return model
