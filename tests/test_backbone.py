"""Encoder taps: raw shapes per stem, pooled dimensions, CIFAR stem layout, configuration errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from byol.core.backbone import Encoder, build_resnet
from byol.core.errors import ConfigError

GRIDS = {"layer2.0": 4, "layer3.0": 2}
TAPS = ["layer2.0", "layer3.0"]

# (name, stem) -> raw (C, H, W) of layer2.0 and layer3.0 at 32x32 input, and the avgpool width.
# ImageNet stem: /4 after conv1+max-pool, then /2 per stage; CIFAR stem: no reduction before layer2.
RAW = {
    ("resnet18", "imagenet"): ((128, 4, 4), (256, 2, 2), 512),
    ("resnet18", "cifar"): ((128, 16, 16), (256, 8, 8), 512),
    ("resnet50", "imagenet"): ((512, 4, 4), (1024, 2, 2), 2048),
    ("resnet50", "cifar"): ((512, 16, 16), (1024, 8, 8), 2048),
}
POOLED = {"resnet18": {"avgpool": 512, "layer2.0": 2048, "layer3.0": 1024},
          "resnet50": {"avgpool": 2048, "layer2.0": 8192, "layer3.0": 4096}}


@pytest.mark.parametrize(("name", "stem"), list(RAW))
def test_tap_shapes_and_pooled_dims(name, stem):
    torch.manual_seed(0)
    enc = Encoder(name, stem, TAPS, GRIDS).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = enc.body(x)
        feats = enc(x)
    l2, l3, width = RAW[(name, stem)]
    assert tuple(raw["layer2.0"].shape[1:]) == l2
    assert tuple(raw["layer3.0"].shape[1:]) == l3
    assert enc.taps == ["avgpool", "layer2.0", "layer3.0"]
    assert enc.dims == POOLED[name]
    assert {t: f.shape for t, f in feats.items()} == {t: (2, d) for t, d in POOLED[name].items()}
    assert feats["avgpool"].shape[1] == width
    # the pooled features are the adaptive average of the raw tap, flattened channel-major
    for tap, grid in GRIDS.items():
        expected = torch.flatten(F.adaptive_avg_pool2d(raw[tap], grid), 1)
        torch.testing.assert_close(feats[tap], expected)
    torch.testing.assert_close(feats["avgpool"], raw["avgpool"].flatten(1))


def test_forward_subset_of_taps():
    enc = Encoder("resnet18", "imagenet", TAPS, GRIDS).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        everything, only = enc(x), enc(x, taps=["layer3.0"])
    assert list(only) == ["layer3.0"]
    torch.testing.assert_close(only["layer3.0"], everything["layer3.0"])


def test_cifar_stem_is_3x3_stride_1_without_max_pool():
    cifar, imagenet = build_resnet("resnet18", "cifar"), build_resnet("resnet18", "imagenet")
    assert (cifar.conv1.kernel_size, cifar.conv1.stride, cifar.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(cifar.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    # behaviour, not only attributes: layer1 keeps the full 32x32 resolution with the CIFAR stem
    with torch.no_grad():
        out = Encoder("resnet18", "cifar", ["layer1"]).body(torch.randn(2, 3, 32, 32))
    assert tuple(out["layer1"].shape[1:]) == (64, 32, 32)


def test_unknown_tap_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        Encoder("resnet18", "cifar", ["layer2.7"])
    message = str(info.value)
    assert "layer2.7" in message
    for valid in ("layer2.0", "layer3.0", "layer4.1", "avgpool"):
        assert valid in message
    assert "\n" not in message  # one line for the user, no dump


def test_unknown_backbone_and_stem_raise_config_error():
    with pytest.raises(ConfigError, match="resnet18"):
        Encoder("resnet19", "cifar")
    with pytest.raises(ConfigError, match="imagenet"):
        Encoder("resnet18", "tiny")


def test_config_records_what_built_the_encoder():
    enc = Encoder("resnet18", "imagenet", TAPS, GRIDS)
    assert enc.config == {"name": "resnet18", "stem": "imagenet", "taps": TAPS, "grids": GRIDS}


@pytest.mark.parametrize("grids", [{"avgpool": 2}, {"layer2.0": 0}, {"layer3.0": 1.5}])
def test_invalid_grids_are_refused_with_the_fix(grids):
    # avgpool is torchvision's own 1x1 pool: a larger grid there would report dims it never returns
    with pytest.raises(ConfigError, match="invalid backbone.grids") as err:
        Encoder("resnet18", "imagenet", taps=["layer2.0", "layer3.0"], grids=grids)
    assert "layer4" in str(err.value)


def test_avgpool_grid_of_one_is_accepted():
    enc = Encoder("resnet18", "imagenet", grids={"avgpool": 1})
    assert enc(torch.zeros(2, 3, 32, 32))["avgpool"].shape == (2, enc.dims["avgpool"]) == (2, 512)
