"""Device augmentation: per-sample randomness, view asymmetry, distributions against torchvision.

Statistical checks use N = 20,000 draws; a frequency p is accepted within 5 standard errors,
5 * sqrt(p (1 - p) / N) (at most 0.018), so a correct sampler fails about once in 10^6 runs
while an error of a few percentage points is caught.
"""

import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import compose_config, plain_config
from torchvision.transforms import RandomResizedCrop

from byol.core.augment import (
    ViewAugment,
    ViewConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_view,
    crop_and_flip,
    gaussian_blur,
    sample_view_params,
)
from byol.jobs.build_views import view_settings

N = 20_000
IDENTITY_NORM = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # keep outputs in [0, 1] to read them directly


@pytest.fixture(scope="module")
def default_views() -> tuple[ViewConfig, ViewConfig]:
    """View 1 and view 2 exactly as conf/train.yaml configures them."""
    aug = plain_config(compose_config("train"))["augment"]
    view1, view2 = view_settings(aug, 32)
    return ViewConfig.from_dict(view1), ViewConfig.from_dict(view2)


def within(fraction: float, p: float, n: int = N) -> bool:
    return abs(fraction - p) <= 5 * math.sqrt(p * (1 - p) / n)


def frac(mask: torch.Tensor) -> float:
    return mask.float().mean().item()


def random_image(n: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)


def all_pairs_differ(images: torch.Tensor, min_diff: float = 1e-3) -> bool:
    pairs = itertools.combinations(range(len(images)), 2)
    return all((images[i] - images[j]).abs().max() > min_diff for i, j in pairs)


# ----------------------------------------------------------------------------- per-sample randomness


@pytest.mark.parametrize(("augment", "side", "expected"), [
    ({"blur_p": "auto"}, 32, (0.0, 0.0)),  # CIFAR practice: no blur at 32 px
    ({"blur_p": "auto"}, 96, (1.0, 0.1)),  # the paper's asymmetric blur on larger crops (STL-10, image folders)
    ({"blur_p": "auto", "view2": {"blur_p": 0.5}}, 96, (1.0, 0.5)),  # a view's own number wins
    ({"blur_p": 0.3}, 96, (0.3, 0.3)),  # a number is used as given, at any size
    ({"blur_p": 0.0, "view1": {"blur_p": "auto"}}, 64, (1.0, 0.0)),
])
def test_blur_auto_is_the_papers_per_view_above_32_pixels(augment, side, expected):
    views = view_settings(augment, side)
    assert tuple(v["blur_p"] for v in views) == expected


def test_default_config_blurs_stl10_views_as_the_paper_and_cifar_not(default_views):
    from byol.jobs.build_views import build_augment

    for data, expected in (("stl10", (1.0, 0.1)), ("cifar10", (0.0, 0.0))):
        augment = build_augment(plain_config(compose_config("train", [f"data={data}"])))
        assert tuple(v.blur_p for v in augment.views) == expected, data
    assert (default_views[0].blur_p, default_views[1].blur_p) == (0.0, 0.0)


def test_identical_images_get_different_views(default_views):
    batch = random_image().expand(12, -1, -1, -1)
    views = ViewAugment(default_views, *IDENTITY_NORM)(batch, torch.Generator().manual_seed(1))
    for v in views:
        assert v.shape == (12, 3, 32, 32)
        assert all_pairs_differ(v)


def test_each_image_gets_its_own_crop():
    crop_only = ViewConfig(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    batch = random_image().expand(12, -1, -1, -1)
    (view,) = ViewAugment([crop_only], *IDENTITY_NORM)(batch, torch.Generator().manual_seed(2))
    assert all_pairs_differ(view)


def test_each_image_gets_its_own_colour():
    """A flat coloured image, always the full crop: only the colour jitter can tell outputs apart."""
    colour_only = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=1.0,
                             grayscale_p=0.0)
    flat = torch.tensor([200, 80, 40], dtype=torch.uint8).view(1, 3, 1, 1).expand(12, 3, 16, 16)
    (view,) = ViewAugment([colour_only], *IDENTITY_NORM)(flat, torch.Generator().manual_seed(3))
    colours = view.mean(dim=(2, 3))
    still_flat = colours.view(12, 3, 1, 1).expand_as(view)
    torch.testing.assert_close(view, still_flat, rtol=0, atol=1e-5)
    assert all_pairs_differ(colours)


def test_same_seed_same_views_other_seed_other_views(default_views):
    images = random_image(6)
    augment = ViewAugment(default_views, [0.5] * 3, [0.25] * 3)
    a = augment(images, torch.Generator().manual_seed(42))
    b = augment(images, torch.Generator().manual_seed(42))
    c = augment(images, torch.Generator().manual_seed(43))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert not torch.equal(a[0], a[1])  # the two views of one call differ too


# ----------------------------------------------------------------------------- view asymmetry


def test_solarize_only_on_view_2_by_parameters(default_views):
    view1, view2 = default_views
    assert view1.solarize_p == 0.0 and view2.solarize_p == 0.2
    gen = torch.Generator().manual_seed(4)
    assert not sample_view_params(N, view1, gen, "cpu")["solarize"].any()
    assert within(frac(sample_view_params(N, view2, gen, "cpu")["solarize"]), 0.2)


def test_solarize_only_on_view_2_by_output(default_views):
    """Flat grey images at 0.9: jitter keeps them >= 0.54 (brightness >= 0.6, grey is unaffected by
    contrast, saturation and hue), so a value below the 0.5 threshold can only come from solarize."""
    n = 2000
    grey = torch.full((n, 3, 8, 8), 230, dtype=torch.uint8)
    view1, view2 = ViewAugment(default_views, *IDENTITY_NORM)(grey, torch.Generator().manual_seed(5))
    assert view1.min() >= 0.5
    inverted = view2.amax(dim=(1, 2, 3)) < 0.5
    assert within(frac(inverted), 0.2, n)
    # an inverted image is 1 - x of a value >= 0.54
    assert view2[inverted].max() <= 0.46


# ----------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("view", [0, 1])
def test_probabilities_match_config(default_views, view):
    cfg = default_views[view]
    p = sample_view_params(N, cfg, torch.Generator().manual_seed(6 + view), "cpu")
    assert within(frac(p["flip"]), cfg.flip_p)
    assert within(frac(p["jitter"]), cfg.jitter_p)
    assert within(frac(p["grayscale"]), cfg.grayscale_p)
    assert within(frac(p["solarize"]), cfg.solarize_p) if cfg.solarize_p else not p["solarize"].any()
    assert not p["blur"].any()  # blur is off for 32x32 images in the default config
    # the random choices are independent: flip and grayscale together ~ 0.5 * 0.2
    assert within(frac(p["flip"] & p["grayscale"]), cfg.flip_p * cfg.grayscale_p)


@pytest.mark.parametrize(("name", "strength", "identity"),
                         [("brightness", 0.4, 1.0), ("contrast", 0.4, 1.0), ("saturation", 0.2, 1.0),
                          ("hue", 0.1, 0.0)])
def test_jitter_factors_are_uniform_around_identity(default_views, name, strength, identity):
    """As ColorJitter: U(max(0, 1 - s), 1 + s) for brightness/contrast/saturation, U(-h, h) for hue;
    images the jitter skips get the identity factor."""
    p = sample_view_params(N, default_views[1], torch.Generator().manual_seed(8), "cpu")
    jittered, skipped = p[name][p["jitter"]], p[name][~p["jitter"]]
    assert torch.all(skipped == identity)
    lo, hi = identity - strength, identity + strength
    assert jittered.min() >= lo and jittered.max() <= hi
    # both ends of the range are reached (a half-range sampler fails here) and the mean is the centre
    assert jittered.min() < lo + 0.01 * strength and jittered.max() > hi - 0.01 * strength
    se = (hi - lo) / math.sqrt(12 * len(jittered))
    assert abs(jittered.mean().item() - identity) < 5 * se


def test_a_jitter_stronger_than_one_keeps_factors_non_negative():
    """ColorJitter(brightness=1.5) draws from U(0, 2.5), not U(-0.5, 2.5): the lower end is clamped at 0."""
    p = sample_view_params(N, ViewConfig(jitter_p=1.0, brightness=1.5), torch.Generator().manual_seed(10), "cpu")
    factors = p["brightness"]
    assert factors.min() >= 0.0 and factors.min() < 0.01 and factors.max() > 2.49 and factors.max() <= 2.5
    se = 2.5 / math.sqrt(12 * N)
    assert abs(factors.mean().item() - 1.25) < 5 * se  # the centre of [0, 2.5], not the identity 1


def test_colour_op_order_is_a_uniform_random_permutation(default_views):
    order = sample_view_params(N, default_views[0], torch.Generator().manual_seed(9), "cpu")["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(N, 4))
    for slot in range(4):
        for op in range(4):
            assert within(frac(order[:, slot] == op), 0.25)


def quantile_agreement(ours: torch.Tensor, theirs: torch.Tensor, q: float) -> float:
    """Fraction of ``theirs`` below the q-quantile of ``ours``: q up to sampling error if the laws agree.

    Its standard error is sqrt(2 q (1 - q) / N) (both samples contribute), and unlike a
    difference of quantiles it needs no density estimate.
    """
    return (theirs <= torch.quantile(ours, q)).double().mean().item()


def test_crop_distribution_matches_torchvision(default_views):
    cfg = default_views[0]
    crops = sample_view_params(N, cfg, torch.Generator().manual_seed(10), "cpu")["crop"].double()
    w, h, cx, cy = crops.unbind(1)
    ours = {"area": w * h, "log_aspect": torch.log(w / h)}

    # torchvision on a 256x256 image, where rounding crops to whole pixels is negligible
    torch.manual_seed(11)
    size = 256
    image = torch.empty(1, size, size)
    boxes = torch.tensor([RandomResizedCrop.get_params(image, list(cfg.crop_scale), list(cfg.crop_ratio))
                          for _ in range(N)], dtype=torch.float64)
    th, tw = boxes[:, 2], boxes[:, 3]
    theirs = {"area": th * tw / size**2, "log_aspect": torch.log(tw / th)}

    for key in ours:
        a, b = ours[key], theirs[key]
        se = math.sqrt(a.var().item() / N + b.var().item() / N)
        assert abs(a.mean().item() - b.mean().item()) < 5 * se, key
        for q in (0.1, 0.5, 0.9):
            assert abs(quantile_agreement(a, b, q) - q) < 5 * math.sqrt(2 * q * (1 - q) / N), (key, q)
    # the configured ranges hold, and every crop lies inside the image
    assert ours["area"].min() >= cfg.crop_scale[0] - 1e-6 and ours["area"].max() <= 1 + 1e-6
    assert ours["log_aspect"].abs().max() <= math.log(4 / 3) + 1e-6
    assert torch.all(cx - w / 2 >= -1e-6) and torch.all(cx + w / 2 <= 1 + 1e-6)
    assert torch.all(cy - h / 2 >= -1e-6) and torch.all(cy + h / 2 <= 1 + 1e-6)
    # positions are uniform over the free space, as torchvision's randint offsets
    free = (1 - w) > 0.05
    assert abs(((cx - w / 2) / (1 - w))[free].mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / free.sum().item())


# ----------------------------------------------------------------------------- colour ops and geometry


def test_colour_ops_match_torchvision():
    gen = torch.Generator().manual_seed(12)
    n = 16
    x = torch.rand(n, 3, 12, 12, generator=gen)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    # brightness and hue over wide ranges; contrast and saturation over the configured ones (their
    # grey level uses 0.299 for red where torchvision's tensor path uses 0.2989: < 1e-4 here)
    cases = [(adjust_brightness, TF.adjust_brightness, uniform(0.0, 2.0)),
             (adjust_contrast, TF.adjust_contrast, uniform(0.6, 1.4)),
             (adjust_saturation, TF.adjust_saturation, uniform(0.8, 1.2)),
             (adjust_hue, TF.adjust_hue, uniform(-0.5, 0.5))]
    for ours, theirs, factors in cases:
        expected = torch.stack([theirs(x[i], factors[i].item()) for i in range(n)])
        torch.testing.assert_close(ours(x, factors), expected, rtol=0, atol=1e-4, msg=ours.__name__)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_gaussian_blur_matches_torchvision(kernel_size):
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(8, 3, 12, 12, generator=gen)
    sigma = 0.1 + 1.9 * torch.rand(8, generator=gen)
    apply = torch.tensor([True, False] * 4)
    expected = torch.stack([TF.gaussian_blur(x[i], [kernel_size] * 2, [sigma[i].item()] * 2) if apply[i]
                            else x[i] for i in range(8)])
    torch.testing.assert_close(gaussian_blur(x, sigma, apply, kernel_size), expected, rtol=0, atol=1e-4)


def test_full_crop_without_flip_is_identity_and_flip_mirrors():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(14))
    full = torch.tensor([[1.0, 1.0, 0.5, 0.5]]).expand(3, 4)
    no, yes = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(crop_and_flip(x, full, no, 16), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(crop_and_flip(x, full, yes, 16), x.flip(-1), rtol=0, atol=1e-5)
    mixed = crop_and_flip(x, full, torch.tensor([True, False, True]), 16)  # each image its own flip
    torch.testing.assert_close(mixed, torch.stack([x[0].flip(-1), x[1], x[2].flip(-1)]), rtol=0, atol=1e-5)


def test_apply_view_greys_blurs_and_solarizes_only_the_images_drawn_for_it():
    """The per-image masks inside a whole view, against torchvision image by image: grayscale, blur
    (kernel about a tenth of the side, odd: 5 at 40 pixels; each image its own sigma), solarize."""
    n, size = 4, 40
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(21))
    cfg = ViewConfig(jitter_p=0.0, grayscale_p=0.5, blur_p=0.5, solarize_p=0.5)
    params = {"crop": torch.tensor([[1.0, 1.0, 0.5, 0.5]]).expand(n, 4), "flip": torch.zeros(n, dtype=torch.bool),
              "grayscale": torch.tensor([True, False, True, False]),
              "blur": torch.tensor([True, True, False, False]), "sigma": torch.tensor([0.6, 1.7, 1.0, 1.0]),
              "solarize": torch.tensor([False, True, True, False])}
    out = apply_view(x, params, cfg, size)
    for i in range(n):
        expected = x[i]
        if params["grayscale"][i]:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        if params["blur"][i]:
            expected = TF.gaussian_blur(expected, [5, 5], [float(params["sigma"][i])] * 2)
        near_threshold = (expected - 0.5).abs() < 1e-3  # the full crop is exact to 1e-5 only
        if params["solarize"][i]:
            expected = TF.solarize(expected, 0.5)
        torch.testing.assert_close(out[i][~near_threshold], expected[~near_threshold], rtol=0, atol=1e-4)


def test_crop_geometry_selects_the_right_pixels():
    """Quadrant crops resampled at their own resolution land exactly on pixel centres: x is width."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(15))
    no = torch.zeros(1, dtype=torch.bool)
    top_right = torch.tensor([[0.5, 0.5, 0.75, 0.25]])
    bottom_left = torch.tensor([[0.5, 0.5, 0.25, 0.75]])
    torch.testing.assert_close(crop_and_flip(x, top_right, no, 4), x[..., :4, 4:], rtol=0, atol=1e-5)
    torch.testing.assert_close(crop_and_flip(x, bottom_left, no, 4), x[..., 4:, :4], rtol=0, atol=1e-5)


def _integer_crops(n: int, side: int, seed: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Square crops on whole pixels (torchvision's boxes are integers): our (w, h, cx, cy) and (top, left, side)."""
    g = torch.Generator().manual_seed(seed)
    sides = torch.randint(side // 5, side + 1, (n,), generator=g)
    left = (torch.rand(n, generator=g) * (side - sides + 1)).floor().clamp(max=side - sides)
    top = (torch.rand(n, generator=g) * (side - sides + 1)).floor().clamp(max=side - sides)
    crop = torch.stack([sides / side, sides / side, (left + sides / 2) / side, (top + sides / 2) / side], 1)
    return crop, [(int(t), int(le), int(s)) for t, le, s in zip(top, left, sides, strict=True)]


@pytest.mark.parametrize("out", [64, 32])
def test_crops_shrunk_to_a_smaller_output_are_antialiased_as_torchvision(out):
    """data.crop_size below the image side (STL-10's 96 px to 64 or 32): a crop larger than the output is
    blurred by its shrink factor before sampling, as torchvision's antialiased resize; plain bilinear
    sampling skipped pixels (on noise: a mean error of 0.06-0.1 against torchvision, and the noise kept)."""
    n, side = 64, 96
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(31))
    crop, boxes = _integer_crops(n, side, seed=32)
    ours = crop_and_flip(x, crop, torch.zeros(n, dtype=torch.bool), out)
    shrunk = torch.tensor([s > 1.3 * out for _, _, s in boxes])
    for antialias, bound in ((True, 0.03), (False, None)):
        ref = torch.stack([TF.resized_crop(x[i], t, le, s, s, [out, out], antialias=antialias)
                           for i, (t, le, s) in enumerate(boxes)])
        error = (ours - ref).abs().mean(dim=(1, 2, 3))[shrunk].mean().item()
        if antialias:
            assert error < bound
            ours_error = error
        else:
            assert ours_error < error / 2.5  # bilinear without the blur is what torchvision's antialias=False gives
    enlarged = torch.tensor([s < out for _, _, s in boxes])  # crops enlarged to the output: plain bilinear
    ref = torch.stack([TF.resized_crop(x[i], t, le, s, s, [out, out], antialias=True) for i, (t, le, s) in
                       enumerate(boxes)])
    assert (ours - ref).abs().mean(dim=(1, 2, 3))[enlarged].mean().item() < 0.01


def test_a_sigma_of_zero_leaves_its_axis_as_it_is():
    """The blur's second sigma (along the height), used by the antialiasing of non-square crops."""
    rows = torch.rand(2, 3, 12, 1, generator=torch.Generator().manual_seed(33)).expand(2, 3, 12, 12)
    on = torch.ones(2, dtype=torch.bool)
    across = gaussian_blur(rows, torch.tensor([1.5, 2.0]), on, 7, sigma_y=torch.zeros(2))
    torch.testing.assert_close(across, rows, rtol=0, atol=1e-6)  # constant along the width: nothing to blur
    down = gaussian_blur(rows, torch.zeros(2), on, 7, sigma_y=torch.tensor([1.5, 2.0]))
    assert (down - rows).abs().max() > 0.05


# ----------------------------------------------------------------------------- compiled views


@pytest.mark.slow
def test_compiled_views_equal_the_eager_ones():
    """``compile=true`` compiles the view (fused kernels, the hue rotation by ``where`` instead of the
    CPU's subset): same parameters from the same generator, same images up to float rounding."""
    # every op of the view on; one settings object for both views, so one compilation (a graph per settings)
    views = [ViewConfig(blur_p=0.5, solarize_p=0.5)] * 2
    batch = random_image(16)
    eager = ViewAugment(views, [0.5] * 3, [0.25] * 3)(batch, torch.Generator().manual_seed(8))
    compiled_augment = ViewAugment(views, [0.5] * 3, [0.25] * 3, compile=True)
    compiled = compiled_augment(batch, torch.Generator().manual_seed(8))
    assert compiled_augment._view is not compiled_augment._one_view  # the compiled wrapper ran
    for e, c in zip(eager, compiled, strict=True):
        assert c.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
    assert not torch.equal(compiled[0], compiled[1])
