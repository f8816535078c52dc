import pytest
import torch
from torch import nn

from fedcodec.codecs import ModelSpec
from fedcodec.errors import ConfigError
from fedcodec.models import build_model


@pytest.mark.parametrize("name, shape, linear_in", [("cnn4", (1, 28, 28), 256), ("cnn4", (3, 32, 32), 1024),
                                                    ("cnn8", (3, 32, 32), 1024)])
def test_architecture(name, shape, linear_in):
    m = build_model(name, shape, 10, seed=0)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs] == ([32, 64, 128, 256] if name == "cnn4"
                                               else [32, 32, 64, 64, 128, 128, 256, 256])
    assert m.classifier.in_features == linear_in and m.classifier.bias is None
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == len(convs)
    assert m(torch.zeros(2, *shape)).shape == (2, 10)


def test_init_is_seeded_normal_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_model("cnn4", (1, 28, 28), 10, seed=1), build_model("cnn4", (1, 28, 28), 10, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    w = a.features[8].weight.detach()  # the 128->256 conv
    assert abs(float(w.std()) - 0.01) < 5e-4 and abs(float(w.mean())) < 5e-4


def test_spec_roles_for_cnn4():
    spec = ModelSpec.from_model(build_model("cnn4", (1, 28, 28), 10, seed=0))
    assert spec.numel(("weight",)) == 288 + 18432 + 73728 + 294912 + 2560
    assert spec.numel(("param",)) == 2 * (32 + 64 + 128 + 256)  # BatchNorm scale and shift
    assert spec.numel(("buffer",)) == 2 * (32 + 64 + 128 + 256)  # running mean and variance


def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet", (1, 28, 28), 10, seed=0)
