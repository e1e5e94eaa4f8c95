"""ResNet encoder with named feature taps, each pooled to a fixed grid.

BYOL's classic head reads the global average pool; the multi-loss variant and the
``combined`` representation also read intermediate blocks (``layer2.0``, ``layer3.0``).
Pooling every tap to a configured grid makes its flattened size independent of the stem
and the input resolution (128x4x4 = 2048 and 256x2x2 = 1024 for ResNet-18).

A width multiplier scales the channels of every stage (0.5: 32/64/128/256 for ResNet-18), for
small and fast runs whose checkpoints stay small; the module names, and so the taps, are unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision import models
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import conv1x1

from byol.core.errors import ConfigError, UnknownTap

# torchvision's ResNets (the wide and ResNeXt variants change the blocks' inner widths: not offered)
RESNETS = {name: getattr(models, name) for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")}
STEMS = ("cifar", "imagenet")
AVGPOOL = "avgpool"
BASE_WIDTHS = (64, 128, 256, 512)  # torchvision's channels per stage (before a Bottleneck's x4 expansion)


MAX_WIDTH = 16  # ResNet-50 x16: 6 billion weights; a file naming width 1e6 asked for a 37 GB first layer


def width_fits(width: float) -> bool:
    """Whether a numeric ``width`` is finite, leaves the first stage at least one channel, and is at most
    :data:`MAX_WIDTH` (the rule for a config's width and for an export's alike)."""
    return math.isfinite(width) and round(BASE_WIDTHS[0] * width) >= 1 and width <= MAX_WIDTH


def stage_widths(width: float) -> list[int]:
    """The channels of the four stages at ``width`` x torchvision's (0.5 -> 32, 64, 128, 256)."""
    if not (isinstance(width, int | float) and width_fits(width)):
        raise ConfigError(f"backbone.width must be a positive number up to {MAX_WIDTH} that leaves the first stage "
                          f"at least one of its {BASE_WIDTHS[0]} channels, not {width!r}")
    return [round(base * width) for base in BASE_WIDTHS]


def build_resnet(name: str, stem: str, width: float = 1.0) -> nn.Module:
    """A randomly initialised torchvision ResNet without its classifier.

    The CIFAR stem (3x3 stride-1 conv, no max-pool) keeps 32x32 inputs at full resolution;
    the ImageNet stem is torchvision's own (what the original implementation used). ``width``
    scales every stage's channels (:func:`stage_widths`).
    """
    if name not in RESNETS:
        raise ConfigError(f"unknown backbone.name '{name}'; choose one of: {', '.join(RESNETS)}")
    if stem not in STEMS:
        raise ConfigError(f"unknown backbone.stem '{stem}'; choose one of: {', '.join(STEMS)}")
    widths = stage_widths(width)
    net = RESNETS[name](weights=None)
    if width != 1:  # width 1 keeps torchvision's network as it is, initialisation included
        _rebuild_stages(net, widths)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def _rebuild_stages(net: models.ResNet, widths: Sequence[int]) -> None:
    """Replace the stem's conv and BatchNorm and the four stages of ``net`` by ones with ``widths``
    channels: the same blocks per stage, strides and module names as torchvision's ``ResNet``
    (whose constructor has no width argument), initialised as it initialises them."""
    block = type(net.layer1[0])
    inplanes = widths[0]
    net.conv1 = nn.Conv2d(3, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(inplanes)
    for index, planes in enumerate(widths):
        name, stride = f"layer{index + 1}", 1 if index == 0 else 2
        blocks = []
        for position in range(len(getattr(net, name))):
            step = stride if position == 0 else 1
            downsample = None
            if step != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, step),
                                           nn.BatchNorm2d(planes * block.expansion))
            blocks.append(block(inplanes, planes, step, downsample))
            inplanes = planes * block.expansion
        setattr(net, name, nn.Sequential(*blocks))
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)


class CentreTapConv2d(nn.Conv2d):
    """A strided, zero-padded convolution that, on a 1x1 input, computes with its kernel's centre alone.

    With 'same' padding (odd kernel, padding kernel // 2) a 1x1 input meets only the centre tap, so the
    result is the same and the other taps' weight gradient is zero, as it must be. Why: PyTorch's CPU
    bfloat16 convolution (torch 2.14, AMD EPYC with avx512_bf16) returns uninitialised memory as those
    taps' gradient for a stride-2 3x3 convolution of a 1x1 input (values up to 1e37, often NaN): ResNet's
    layer4 sees 1x1 inputs at 16 px with the ImageNet stem, and runs ended in 'weights became NaN/inf'.
    Stride 1 is left to the library, whose result there is right.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[-2:] == (1, 1):
            kh, kw = self.kernel_size
            centre = weight[:, :, kh // 2:kh // 2 + 1, kw // 2:kw // 2 + 1]
            return nn.functional.conv2d(x, centre, bias, 1, 0, 1, self.groups)
        return super()._conv_forward(x, weight, bias)


def guard_strided_convs(net: nn.Module) -> None:
    """Make every strided, zero-'same'-padded convolution of ``net`` a :class:`CentreTapConv2d` (in place:
    the same parameters and state_dict)."""
    for module in net.modules():
        if type(module) is nn.Conv2d and _centre_tap_applies(module):
            module.__class__ = CentreTapConv2d


def _centre_tap_applies(conv: nn.Conv2d) -> bool:
    """Whether a 1x1 input meets only the centre of ``conv``'s kernel, and the convolution is strided."""
    return (conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and conv.stride != (1, 1)
            and conv.dilation == (1, 1) and all(k % 2 == 1 and p == k // 2
                                                for k, p in zip(conv.kernel_size, conv.padding, strict=True)))


@functools.cache
def module_names(name: str) -> frozenset[str]:
    """Every module name of the ResNet ``name`` (a key of :data:`RESNETS`), the names a tap or a grid may
    use: the same for both stems and every width. Built on the meta device: no memory, no randomness."""
    with torch.device("meta"):
        net = build_resnet(name, STEMS[0])
    return frozenset(n for n, _ in net.named_modules() if n)


def tap_names(net: nn.Module) -> list[str]:
    """Module names a user may tap, listed down to residual blocks (``layer2.0``)."""
    return [name for name, _ in net.named_modules() if name and name.count(".") <= 1 and name != "fc"]


def tap_list(taps: str | Sequence[str]) -> list[str]:
    """``taps`` as a list of module names, a single name given as a string being that one tap: iterated, the
    string ``"layer2.0"`` was its letters, each refused as an unknown tap."""
    return [taps] if isinstance(taps, str) else list(taps)


class Encoder(nn.Module):
    """ResNet returning ``{tap name: (N, D) features}``; ``avgpool`` is always included.

    Args:
        name: one of :data:`RESNETS` (``resnet18`` to ``resnet152``).
        stem: ``cifar`` or ``imagenet``.
        taps: extra module names to expose besides ``avgpool`` (one name may be given as a string).
        grids: side of the adaptive-average-pool grid per tap (missing taps use 1).
        width: channel multiplier of every stage (1.0: torchvision's ResNet).
    """

    def __init__(
        self,
        name: str = "resnet18",
        stem: str = "cifar",
        taps: str | Sequence[str] = (),
        grids: Mapping[str, int] | None = None,
        width: float = 1.0,
    ):
        super().__init__()
        taps = tap_list(taps)
        net = build_resnet(name, stem, width)
        valid = set(dict(net.named_modules()))
        unknown = [t for t in taps if not isinstance(t, str) or t not in valid or not t]  # [[layer2.0]]: a list
        if unknown:
            raise UnknownTap(
                f"unknown tap {', '.join(repr(t) for t in unknown)} for {name}; valid names include: "
                f"{', '.join(tap_names(net))} (or any deeper module name)"
            )
        stray = [t for t in (grids or {}) if t not in valid or not t]
        if stray:
            raise ConfigError(
                f"backbone.grids names {', '.join(repr(t) for t in stray)}, which is no module of {name}; "
                f"valid names include: {', '.join(tap_names(net))}. A grid applies to a tap of that name "
                "(loss.taps or repr.taps); on the command line a dotted name goes inside braces: "
                "'+backbone.grids={layer4.0: 2}'"
            )
        bad_grids = {t: g for t, g in (grids or {}).items() if not isinstance(g, int) or g < 1
                     or (t == AVGPOOL and g != 1)}
        if bad_grids:
            raise ConfigError(
                f"invalid backbone.grids {bad_grids}: each grid side must be a positive integer, and "
                f"'{AVGPOOL}' is the network's own global pool (always 1x1); to pool the last block to a "
                "larger grid, add 'layer4' to the taps (loss.taps or repr.taps) and set "
                "+backbone.grids.layer4=2"
            )
        self.config = {"name": name, "stem": stem, "width": float(width), "taps": list(taps),
                       "grids": dict(grids or {})}
        self.taps = [AVGPOOL] + [t for t in dict.fromkeys(taps) if t != AVGPOOL]
        self.body = create_feature_extractor(net, return_nodes={t: t for t in self.taps})
        guard_strided_convs(self.body)  # after tracing: the traced graph calls each convolution as a module
        grid = {t: int((grids or {}).get(t, 1)) for t in self.taps}
        self.pools = nn.ModuleDict(
            {_key(t): nn.AdaptiveAvgPool2d(grid[t]) for t in self.taps if t != AVGPOOL}
        )
        self.dims = self._probe_dims(grid)

    def _probe_dims(self, grid: Mapping[str, int]) -> dict[str, int]:
        was_training = self.body.training
        self.body.eval()
        with torch.no_grad():
            out = self.body(torch.zeros(1, 3, 64, 64))
        self.body.train(was_training)
        flat = [t for t in self.taps if t != AVGPOOL and out[t].dim() != 4]
        if flat:  # e.g. fc (an identity after the global pool): no feature map to pool to a grid
            raise ConfigError(f"tap {', '.join(repr(t) for t in flat)} gives no feature map (its output is "
                              f"{out[flat[0]].dim()}-D); a tap is a block or layer before the global pool, e.g. "
                              f"layer2.0 or layer3 ('avgpool' is always included)")
        return {t: out[t].shape[1] * grid[t] ** 2 for t in self.taps}

    def forward(self, x: torch.Tensor, taps: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        out = self.body(x)
        feats = {}
        for t in tap_list(taps) if taps is not None else self.taps:
            f = out[t]
            if t != AVGPOOL:
                f = self.pools[_key(t)](f)
            feats[t] = torch.flatten(f, 1)
        return feats


def _key(tap: str) -> str:
    """ModuleDict keys may not contain dots."""
    return tap.replace(".", "_")
