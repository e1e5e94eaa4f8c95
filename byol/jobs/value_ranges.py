"""Ranges of the data and augmentation values that mean something (a normalisation of pixels in [0, 1],
crops the stem can take, augmentation strengths and [min, max] pairs): checked with the rest of a config
by :func:`byol.jobs.config_check.check_config`."""

from __future__ import annotations

import math
from collections.abc import Mapping

from byol.core.errors import ConfigError

AUGMENT_RANGES = {"brightness": (0, math.inf), "contrast": (0, math.inf), "saturation": (0, math.inf),
                  "hue": (0, 0.5), "solarize_threshold": (0, 1), "blur_kernel_size": (0, math.inf)}
AUGMENT_PAIRS = {"crop_scale": (0, 1), "crop_ratio": (0, math.inf), "blur_sigma": (0, math.inf)}


def number_at(container: Mapping, dotted: str):
    """The value at ``dotted`` (``a.b.c``) in ``container``, None where there is none."""
    node = container
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def augment_paths(container: Mapping, leaf: str) -> list[str]:
    """Where ``leaf`` is set: ``augment.<leaf>`` and each view's ``augment.<view>.<leaf>``."""
    augment = container.get("augment") or {}
    views = [f"augment.{v}.{leaf}" for v in augment if isinstance(augment[v], Mapping) and leaf in augment[v]]
    return ([f"augment.{leaf}"] if leaf in augment else []) + views


# the smallest crop each stem trains on: the ImageNet stem halves the image five times (at 8 px its last
# blocks see 1x1 maps and the first steps diverge), the CIFAR stem three times
SMALLEST_SIDE = {"imagenet": 16, "cifar": 8}


def check_image_side(container: Mapping, source: str) -> None:
    data, stem = container["data"], (container.get("backbone") or {}).get("stem")
    for key in ("image_size", "crop_size"):
        side, least = data.get(key), SMALLEST_SIDE.get(stem, 8)
        if isinstance(side, int) and not isinstance(side, bool) and side < least:
            other = " (the cifar stem takes 8 px and up: backbone.stem=cifar)" if stem == "imagenet" else ""
            raise ConfigError(f"data.{key}={side} is too small for the {stem or 'ResNet'} stem: at least {least} px"
                              f"{other} ({source})")


def check_normalization(data: Mapping, source: str) -> None:
    """``data.mean`` / ``data.std``: one number per RGB channel, of pixels scaled to [0, 1] (images are
    divided by 255 first), and a std above 0 (a zero divides every pixel by it)."""
    for key in ("mean", "std"):
        value = data.get(key)
        if value is None:
            continue
        numbers = isinstance(value, (list, tuple)) and all(is_number(v) for v in value)
        if not numbers or len(value) != 3:
            raise ConfigError(f"data.{key} must be 3 numbers, one per RGB channel, not {value!r} ({source})")
        if not all(0 <= v <= 1 for v in value) or (key == "std" and min(value) == 0):
            scale = " (given on the 0-255 scale? divide by 255)" if max(value) > 1 else ""
            bound = "in [0, 1]" if key == "mean" else "in (0, 1]"
            raise ConfigError(f"data.{key} must be {bound}, of pixels scaled to [0, 1], not {value!r}{scale} "
                              f"({source})")


def check_augment_ranges(container: Mapping, source: str) -> None:
    """Augmentation numbers within the ranges that mean something (hue shifts past half a turn wrap
    around; a [min, max] pair given as [max, min] would sample outside what was meant)."""
    for leaf, (low, high) in AUGMENT_RANGES.items():
        for key in augment_paths(container, leaf):
            value = number_at(container, key)
            if value is not None and not (math.isfinite(value) and low <= value <= high):  # inf: a NaN loss at once
                bound = "be a finite number, zero or more" if high == math.inf else f"lie between {low} and {high}"
                raise ConfigError(f"{key} must {bound}, not {value!r} ({source})")
            if leaf == "blur_kernel_size" and value and value % 2 == 0:
                raise ConfigError(f"{key} must be odd (or 0: about a tenth of the image side), not {value!r} "
                                  f"({source})")
    for leaf, (low, high) in AUGMENT_PAIRS.items():
        for key in augment_paths(container, leaf):
            pair = number_at(container, key)
            if pair is None:
                continue
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(is_number(v) for v in pair)
                    and low < pair[0] <= pair[1] <= high):
                top = "" if high == math.inf else f" <= {high}"
                raise ConfigError(f"{key} must be [min, max] with {low} < min <= max{top}, not {pair!r} ({source})")


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


SYNTHETIC_MOST = 100_000  # generated images per split: a demo's size (100,000 at 32 px: 300 MB)


def check_synthetic_size(data: Mapping, source: str) -> None:
    """``data=synthetic``'s sizes: each class needs a training image, and a handed run config naming billions
    of images (or classes: the kNN's votes are a matrix of them) must not take the machine's memory."""
    if data.get("name") != "synthetic":
        return
    for key in ("num_train", "num_test"):
        n = data.get(key)
        if isinstance(n, int) and n > SYNTHETIC_MOST:
            raise ConfigError(f"data.{key}={n} is more than synthetic data offers ({SYNTHETIC_MOST:,} images); "
                              f"use an image folder for more ({source})")
    classes, train = data.get("num_classes"), data.get("num_train")
    if isinstance(classes, int) and isinstance(train, int) and classes > train:
        raise ConfigError(f"data.num_classes={classes} is more than data.num_train={train}: each class needs a "
                          f"training image ({source})")


def check_root_is_read(data: Mapping) -> None:
    """A ``data.root`` given for ``data=synthetic`` (which ``experiment=smoke`` chooses): the images are generated
    and the folder was never read, without a word; a user who meant to train on it got a run on stripes."""
    if data.get("name") == "synthetic" and data.get("root") is not None:
        raise ConfigError(f"data.root={data['root']} does nothing with data=synthetic (generated images; "
                          f"experiment=smoke chooses them): add data=imagefolder to train on that folder, or leave "
                          f"data.root out")
