"""Augmentation values the distribution tests leave open: crop ranges and positions, flip and blur draws,
and the order of the colour ops inside a whole view, against torchvision image by image."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from byol.core.augment import Normalize, ViewAugment, ViewConfig, apply_view, sample_view_params

N = 20_000


def within(fraction: float, p: float, n: int = N) -> bool:
    return abs(fraction - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_crop_area_follows_a_configured_scale_range():
    """crop_scale=(0.2, 0.5): every crop fits at that size, so the area is U(0.2, 0.5) exactly."""
    crops = sample_view_params(N, ViewConfig(crop_scale=(0.2, 0.5)), torch.Generator().manual_seed(0), "cpu")["crop"]
    area = (crops[:, 0] * crops[:, 1]).double()
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 0.5 + 1e-6
    assert area.min() < 0.201 and area.max() > 0.499
    assert abs(area.mean().item() - 0.35) < 5 * 0.3 / math.sqrt(12 * N)


def test_crop_positions_are_uniform_over_the_free_space():
    """Left and top edges over the room left, (c - w / 2) / (1 - w): uniform, so a quarter below 0.25 and
    a quarter above 0.75 (a centred crop would put them all at 0.5)."""
    crops = sample_view_params(N, ViewConfig(), torch.Generator().manual_seed(1), "cpu")["crop"].double()
    w, h, cx, cy = crops.unbind(1)
    for size, centre in ((w, cx), (h, cy)):
        free = (1 - size) > 0.05
        position = ((centre - size / 2) / (1 - size))[free]
        n = int(free.sum())
        assert within((position < 0.25).double().mean().item(), 0.25, n)
        assert within((position > 0.75).double().mean().item(), 0.25, n)


def test_flip_probability_is_the_configured_one_and_flips_the_image():
    p = sample_view_params(N, ViewConfig(flip_p=0.2), torch.Generator().manual_seed(2), "cpu")
    assert within(p["flip"].float().mean().item(), 0.2)
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    whole = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0)
    identity = ([0.0] * 3, [1.0] * 3)
    (always,) = ViewAugment([ViewConfig(flip_p=1.0, **whole)], *identity)(x, torch.Generator().manual_seed(4))
    (never,) = ViewAugment([ViewConfig(flip_p=0.0, **whole)], *identity)(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(always, x.float().div(255).flip(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(never, x.float().div(255), rtol=0, atol=1e-5)


def test_blur_sigma_is_uniform_over_its_range():
    sigma = sample_view_params(N, ViewConfig(blur_p=1.0), torch.Generator().manual_seed(5), "cpu")["sigma"].double()
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    assert sigma.min() < 0.11 and sigma.max() > 1.99
    assert abs(sigma.mean().item() - 1.05) < 5 * 1.9 / math.sqrt(12 * N)


def test_a_view_jitters_then_greys_as_torchvision():
    """BYOL's pipeline per image: colour jitter (in the image's own order), then grayscale. Hue strength 0.5
    makes the order visible: the grey of a hue-rotated image is not the grey of the image."""
    n = 16
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(n, 3, 8, 8, generator=gen)
    cfg = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.8, hue=0.5, grayscale_p=0.5)
    params = sample_view_params(n, cfg, gen, "cpu")
    assert (params["grayscale"] & params["jitter"]).sum() >= 3  # the images that tell the orders apart
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    names = ("brightness", "contrast", "saturation", "hue")
    expected = []
    for i in range(n):
        img = x[i]
        if params["jitter"][i]:
            for op in params["order"][i].tolist():
                img = ops[op](img, params[names[op]][i].item())
        if params["grayscale"][i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        expected.append(img)
    torch.testing.assert_close(apply_view(x, params, cfg, 8), torch.stack(expected), rtol=0, atol=2e-4)


def test_normalize_is_the_channel_formula_for_bytes_and_floats():
    """One multiply-add per pixel (the 1/255 of uint8 folded into it) against ``(x / 255 - mean) / std``
    in float64, per channel; float images are taken as already in [0, 1]."""
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    gen = torch.Generator().manual_seed(7)
    raw = torch.randint(0, 256, (4, 3, 5, 5), generator=gen, dtype=torch.uint8)
    m, s = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
    expected = (raw.double() / 255 - m) / s
    norm = Normalize(mean, std)
    for given in (raw, raw.float() / 255):
        out = norm(given)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    white = norm(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    assert float(white[0, 0]) == pytest.approx((1 - mean[0]) / std[0], abs=1e-6)
