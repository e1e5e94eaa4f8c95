"""The batched colour jitter equals torchvision's ops applied image by image in each image's order."""

import functools

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import byol.core.augment as augment
from byol.core.augment import ViewConfig, color_jitter, sample_view_params

TORCHVISION_OPS = {
    0: lambda im, v: TF.adjust_brightness(im, v),
    1: lambda im, v: TF.adjust_contrast(im, v),
    2: lambda im, v: TF.adjust_saturation(im, v),
    3: lambda im, v: TF.adjust_hue(im, v),
}
NAMES = ("brightness", "contrast", "saturation", "hue")


@pytest.mark.parametrize("subset", [True, False], ids=["cpu-hue-on-the-chosen-images", "gpu-hue-where"])
def test_color_jitter_matches_per_image_torchvision_in_random_order(subset, monkeypatch):
    """Both ways of hue-rotating the chosen images: the CPU's (only those converted) and the one
    accelerators take (the whole batch converted, then selected), both run here on the CPU."""
    monkeypatch.setattr(augment, "_hue_where", functools.partial(augment._hue_where, subset=subset))
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(48, 3, 12, 12, generator=gen)
    params = sample_view_params(48, ViewConfig(jitter_p=0.8), gen, "cpu")
    expected = []
    for i in range(48):
        img = x[i]
        if params["jitter"][i]:
            for op in params["order"][i].tolist():
                img = TORCHVISION_OPS[op](img, params[NAMES[op]][i].item())
        expected.append(img)
    got = color_jitter(x, params)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-4, rtol=0)
    # the orders really vary between images, and skipped images are untouched
    assert len({tuple(o) for o in params["order"].tolist()}) > 10
    skipped = ~params["jitter"]
    assert skipped.any()
    torch.testing.assert_close(got[skipped], x[skipped])
