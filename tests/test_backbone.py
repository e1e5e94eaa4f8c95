"""Encoder taps: raw shapes per stem, pooled dimensions, CIFAR stem layout, the width multiplier,
configuration errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from byol.core.backbone import BASE_WIDTHS, Encoder, _rebuild_stages, build_resnet
from byol.core.checkpoint import encoder_config, load_encoder, save_encoder
from byol.core.errors import CheckpointError, ConfigError

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
    assert "fc" not in message.split("valid names include: ")[1].split(", ")  # no feature map there


@pytest.mark.parametrize("tap", ["fc", "avgpool.0"])
def test_a_tap_after_the_global_pool_is_refused_at_build_not_at_the_first_step(tap):
    """fc (an identity after the pool) gave a shape error inside the first training step."""
    with pytest.raises(ConfigError, match=r"gives no feature map|unknown tap"):
        Encoder("resnet18", "imagenet", [tap])


def test_unknown_backbone_and_stem_raise_config_error():
    with pytest.raises(ConfigError, match="resnet18"):
        Encoder("resnet19", "cifar")
    with pytest.raises(ConfigError, match="imagenet"):
        Encoder("resnet18", "tiny")


def test_config_records_what_built_the_encoder():
    enc = Encoder("resnet18", "imagenet", TAPS, GRIDS)
    assert enc.config == {"name": "resnet18", "stem": "imagenet", "width": 1.0, "taps": TAPS, "grids": GRIDS}
    assert Encoder("resnet18", "imagenet", TAPS, GRIDS, width=0.5).config["width"] == 0.5


# --------------------------------------------------------------------------- width multiplier


def out_channels(enc: Encoder, module: str) -> int:
    return enc.body.get_submodule(module).out_channels


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_half_width_halves_every_stage_of_resnet18(stem):
    full, half = Encoder("resnet18", stem, TAPS, GRIDS), Encoder("resnet18", stem, TAPS, GRIDS, width=0.5)
    # 32/64/128/256 channels instead of 64/128/256/512, down to the last block
    assert [out_channels(half, m) for m in ("conv1", "layer1.0.conv2", "layer2.0.conv1", "layer3.1.conv2",
                                            "layer4.1.conv2", "layer2.0.downsample.0")] == [32, 32, 64, 128, 256, 64]
    assert [out_channels(full, m) for m in ("conv1", "layer4.1.conv2")] == [64, 512]
    assert half.dims == {"avgpool": 256, "layer2.0": 64 * 4 * 4, "layer3.0": 128 * 2 * 2}
    with torch.no_grad():
        feats = half.eval()(torch.randn(2, 3, 32, 32))
    assert {t: tuple(f.shape) for t, f in feats.items()} == {"avgpool": (2, 256), "layer2.0": (2, 1024),
                                                             "layer3.0": (2, 512)}
    # the same module names (taps like layer2.0 keep working), about a quarter of the weights
    assert [n for n, _ in half.named_modules()] == [n for n, _ in full.named_modules()]
    count = {e: sum(p.numel() for p in e.parameters()) for e in (full, half)}
    assert (count[full], count[half]) == ((11_168_832, 2_795_040) if stem == "cifar" else (11_176_512, 2_798_880))


def test_half_width_resnet50_keeps_its_bottleneck_expansion():
    half = Encoder("resnet50", "cifar", TAPS, GRIDS, width=0.5)
    assert [out_channels(half, m) for m in ("conv1", "layer1.0.conv1", "layer1.0.conv3", "layer4.2.conv3")] == [
        32, 32, 128, 1024]
    assert half.dims == {"avgpool": 1024, "layer2.0": 256 * 16, "layer3.0": 512 * 4}


def test_rebuilt_stages_are_torchvisions_layout():
    """At torchvision's own widths the rebuilt stages hold exactly torchvision's tensors, so a width
    multiplier changes the channel counts and nothing else."""
    for name in ("resnet18", "resnet50"):
        reference, rebuilt = getattr(models, name)(weights=None), getattr(models, name)(weights=None)
        _rebuild_stages(rebuilt, BASE_WIDTHS)
        want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == want
        conv = rebuilt.layer3[0].conv1.weight  # initialised as torchvision does: kaiming normal, fan out
        fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
        assert conv.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


@pytest.mark.parametrize("width", [0, -0.5, 0.001, float("nan"), float("inf"), 16.5, 1e6])
def test_width_that_leaves_no_channel_or_is_beyond_any_machine_is_refused(width):
    """Up to 16 (ResNet-50 x16: 6 billion weights); a file naming width 1e6 was an allocation traceback."""
    with pytest.raises(ConfigError, match="backbone.width must be a positive number"):
        Encoder("resnet18", "cifar", width=width)


def test_width_export_round_trips(tmp_path):
    torch.manual_seed(0)
    half = Encoder("resnet18", "imagenet", TAPS, GRIDS, width=0.5).eval()
    save_encoder(half, tmp_path / "encoder.pt", meta={"loss": "multi"})
    assert torch.load(tmp_path / "encoder.pt", weights_only=True)["backbone"]["width"] == 0.5
    loaded, meta = load_encoder(tmp_path / "encoder.pt")
    assert loaded.config == half.config and loaded.dims == half.dims and meta == {"loss": "multi"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = loaded.eval()(x), half(x)
    assert all(torch.equal(got[t], want[t]) for t in want)


def test_export_width_is_checked_and_defaults_to_one():
    base = {"name": "resnet18", "stem": "cifar", "taps": [], "grids": {}}
    assert encoder_config(base, "old.pt")["width"] == 1.0  # exports written before the width existed
    assert encoder_config({**base, "width": 0.5}, "new.pt")["width"] == 0.5
    for bad in ("0.5", True, -1.0, 0, float("nan"), [0.5]):
        with pytest.raises(CheckpointError, match="backbone.width must be a positive number"):
            encoder_config({**base, "width": bad}, "bad.pt")


@pytest.mark.parametrize("grids", [{"avgpool": 2}, {"layer2.0": 0}, {"layer3.0": 1.5}])
def test_invalid_grids_are_refused_with_the_fix(grids):
    # avgpool is torchvision's own 1x1 pool: a larger grid there would report dims it never returns
    with pytest.raises(ConfigError, match="invalid backbone.grids") as err:
        Encoder("resnet18", "imagenet", taps=["layer2.0", "layer3.0"], grids=grids)
    assert "layer4" in str(err.value)


def test_avgpool_grid_of_one_is_accepted():
    enc = Encoder("resnet18", "imagenet", grids={"avgpool": 1})
    assert enc(torch.zeros(2, 3, 32, 32))["avgpool"].shape == (2, enc.dims["avgpool"]) == (2, 512)


@pytest.mark.parametrize("name,dim", [("resnet34", 512), ("resnet101", 2048), ("resnet152", 2048)])
def test_every_offered_resnet_builds_with_taps(name, dim):
    encoder = Encoder(name, "cifar", ["layer2.0"], {"layer2.0": 2})
    feats = encoder(torch.zeros(2, 3, 32, 32))
    assert feats["avgpool"].shape == (2, dim) and feats["layer2.0"].shape[0] == 2


def test_a_single_tap_given_as_a_string_is_that_one_tap(tmp_path):
    """``load_encoder(path, taps="layer2.0")`` iterated the string into letters, each an unknown tap; every
    public entry that takes taps takes one name as a string, as a list of that one name."""
    from byol.core.features import concat_features, extract_features, feature_dim, representation_taps

    torch.manual_seed(0)
    encoder = Encoder("resnet18", "cifar", "layer2.0", GRIDS, width=0.25).eval()
    assert encoder.taps == ["avgpool", "layer2.0"] and encoder.config["taps"] == ["layer2.0"]
    save_encoder(encoder, tmp_path / "encoder.pt", taps="layer2.0")
    assert torch.load(tmp_path / "encoder.pt", weights_only=True)["backbone"]["taps"] == ["layer2.0"]
    loaded, _ = load_encoder(tmp_path / "encoder.pt", taps="layer3.0")
    assert loaded.taps == ["avgpool", "layer3.0"] and loaded.config["taps"] == ["layer3.0"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        one = loaded(x, taps="layer3.0")
        assert list(one) == ["layer3.0"] and torch.equal(one["layer3.0"], loaded(x, taps=["layer3.0"])["layer3.0"])
    assert representation_taps("combined", "layer3.0") == ["avgpool", "layer3.0"]
    assert feature_dim(loaded, "layer3.0") == loaded.dims["layer3.0"] == concat_features(one, "layer3.0").shape[1]
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert extract_features(loaded, images, "layer3.0", [0.5] * 3, [0.5] * 3).shape == (2, loaded.dims["layer3.0"])
