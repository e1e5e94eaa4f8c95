"""The two asymmetric BYOL views, generated on the training device for a whole batch at once.

torchvision's transforms draw one set of random parameters per call, so applied to a batch
tensor every image gets the same crop and colour change. Here each image gets its own
parameters, drawn as tensors (no Python loop over images, no host synchronisation):

* random resized crop + horizontal flip: one affine sampling grid per image (``grid_sample``);
* colour jitter in a random order per image, grayscale, blur, solarize: per-image factors
  and masks, with identity factors for images the transform skips.

Distributions follow torchvision's ``RandomResizedCrop``, ``ColorJitter``, ``RandomGrayscale``,
``GaussianBlur`` and ``RandomSolarize`` (tests compare them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from byol.core.errors import ConfigError

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's tensor ops


@dataclass
class ViewConfig:
    """Augmentation of one view; probabilities are per image.

    Defaults are the paper's view 1 without blur (blur is off for 32x32 images).
    """

    crop_scale: Sequence[float] = (0.08, 1.0)
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: Sequence[float] = (0.1, 2.0)
    blur_kernel_size: int = 0  # 0: about 10% of the image side, odd
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    @classmethod
    def from_dict(cls, d: Mapping) -> ViewConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown augmentation keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**dict(d))


CROP_ONLY = ViewConfig(jitter_p=0.0, grayscale_p=0.0)  # fine-tuning: crop + flip


def _uniform(n, low, high, gen, device):
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _bernoulli(n, p, gen, device):
    return torch.rand(n, generator=gen, device=device) < p


def sample_crops(n: int, scale, ratio, gen, device, tries: int = 10) -> torch.Tensor:
    """(n, 4) crops as fractions of the image: width, height, centre x, centre y.

    Like ``RandomResizedCrop.get_params``: area ~ U(scale), log aspect ~ U(log ratio), up to
    ``tries`` draws until the crop fits, else the whole image.
    """
    area = _uniform((n, tries), scale[0], scale[1], gen, device)
    log_r = _uniform((n, tries), math.log(ratio[0]), math.log(ratio[1]), gen, device)
    w = torch.sqrt(area * torch.exp(log_r))
    h = torch.sqrt(area / torch.exp(log_r))
    fits = (w <= 1) & (h <= 1)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # first fitting draw (0 if none)
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), 1.0)
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), 1.0)
    cx = w / 2 + (1 - w) * torch.rand(n, generator=gen, device=device)
    cy = h / 2 + (1 - h) * torch.rand(n, generator=gen, device=device)
    return torch.stack([w, h, cx, cy], dim=1)


def sample_view_params(n: int, cfg: ViewConfig, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """All random choices for ``n`` images of one view, as tensors on ``device``."""
    jitter = _bernoulli(n, cfg.jitter_p, gen, device)

    def factor(strength, identity):
        lo, hi = identity - strength, identity + strength
        if identity == 1.0:  # multiplicative factors stay non-negative; the hue shift is symmetric
            lo = max(0.0, lo)
        drawn = _uniform(n, lo, hi, gen, device)
        return torch.where(jitter, drawn, identity)

    return {
        "crop": sample_crops(n, cfg.crop_scale, cfg.crop_ratio, gen, device),
        "flip": _bernoulli(n, cfg.flip_p, gen, device),
        "jitter": jitter,
        "brightness": factor(cfg.brightness, 1.0),
        "contrast": factor(cfg.contrast, 1.0),
        "saturation": factor(cfg.saturation, 1.0),
        "hue": factor(cfg.hue, 0.0),
        # per image, the slot in which each of the 4 colour ops is applied
        "order": torch.argsort(torch.rand(n, 4, generator=gen, device=device), dim=1),
        "grayscale": _bernoulli(n, cfg.grayscale_p, gen, device),
        "blur": _bernoulli(n, cfg.blur_p, gen, device),
        "sigma": _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], gen, device),
        "solarize": _bernoulli(n, cfg.solarize_p, gen, device),
    }


# Gaussian sigma, in source pixels, that makes a bilinear sample of a crop shrunk by a factor f > 1 close to
# torchvision's antialiased resize: c * sqrt(f**2 - 1) (bilinear sampling already spans one pixel; c fitted on
# noise images against torchvision's resized_crop: a third of plain bilinear's error where f > 1.3).
ANTIALIAS_SIGMA = 0.57


def crop_and_flip(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resample of each image's crop to ``size`` x ``size``, mirrored where ``flip``.

    A crop larger than ``size`` (``data.crop_size`` below the image side) is first blurred by its own
    shrink factor, as torchvision antialiases: bilinear sampling alone skips pixels and keeps noise that
    a resized photo does not have. Crops that are enlarged are sampled as they are.
    """
    w, h, cx, cy = crop.unbind(1)
    if size < max(x.shape[-2:]):
        x = _antialias(x, w * x.shape[-1] / size, h * x.shape[-2] / size, max(x.shape[-2:]) / size)
    # the sampling grid of affine_grid (align_corners=False) for the map (u, v) -> (+-w u + 2 cx - 1, h v + 2 cy - 1),
    # written out: x depends on the column only and y on the row only, so no (n, size^2, 3) x (3, 2) product
    # (a third of this function's time on a CPU)
    base = torch.linspace(1 / size - 1, 1 - 1 / size, size, device=x.device, dtype=x.dtype)
    grid_x = torch.addcmul((2 * cx - 1).unsqueeze(1), torch.where(flip, -w, w).unsqueeze(1), base)  # (n, size)
    grid_y = torch.addcmul((2 * cy - 1).unsqueeze(1), h.unsqueeze(1), base)
    n = x.shape[0]
    grid = torch.stack([grid_x.unsqueeze(1).expand(n, size, size), grid_y.unsqueeze(2).expand(n, size, size)], dim=3)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma as torchvision computes it (written out: no host-to-device copy of the weights)."""
    r, g, b = x.unbind(1)
    return torch.add(r * GRAY_WEIGHTS[0], g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return torch.lerp(b, a, _per_image(ratio)).clamp_(0, 1)  # ratio * a + (1 - ratio) * b in one pass


def adjust_brightness(x, f):
    return (x * _per_image(f)).clamp(0, 1)


def adjust_contrast(x, f):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, grayscale(x), f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``shift`` (in turns, [-0.5, 0.5]) in HSV space, as torchvision.

    Written for few passes over the pixels (the costliest colour op here) and few operators (on a GPU it
    runs four times a step): the hue is worked out in sixths of a turn, and v x s is the max - min
    spread, so saturation is never formed.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)  # values only: max(dim) / min(dim) also build the indices
    delta = maxc - minc
    # hue in sixths: (g - b) / delta where red is the max, 2 + (b - r) / delta for green, 4 + (r - g) / delta
    sector = torch.where(maxc == r, g - b, torch.where(maxc == g, torch.add(b - r, delta, alpha=2),
                                                       torch.add(r - g, delta, alpha=4)))
    # the rotated hue in turns; where delta is 0 the channels are equal and sector is 0, so any positive
    # divisor gives torchvision's hue 0 (it divides by 1 there)
    turns = torch.addcdiv(shift.view(-1, 1, 1), sector, delta.clamp_min(torch.finfo(x.dtype).tiny), value=1 / 6)
    # HSV -> RGB: channel n is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, and v s = delta
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.add(n, turns.unsqueeze(1), alpha=6).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(1), delta.unsqueeze(1), ramp, value=-1)


COLOR_OPS = ("brightness", "contrast", "saturation", "hue")  # index = op id in params["order"]


def _hue_where(x: torch.Tensor, shift: torch.Tensor, chosen: torch.Tensor,
               subset: bool | None = None) -> torch.Tensor:
    """Hue-rotate only the chosen images (``x`` may be overwritten: :func:`color_jitter` owns it).

    On the CPU dynamic shapes cost nothing, so only the chosen quarter of the batch is
    converted (``subset``, the default there); on accelerators the whole batch is converted and
    selected with a ``where``, which avoids the host synchronisation that a data-dependent shape would force.
    """
    if subset is None:  # a compiled graph fuses the where; a data-dependent shape would break it
        subset = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if subset:
        idx = chosen.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        return x.index_copy_(0, idx, adjust_hue(x.index_select(0, idx), shift.index_select(0, idx)))
    return torch.where(_per_image(chosen), adjust_hue(x, shift), x)


def color_jitter(x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The four colour ops in each image's own random order (as ``ColorJitter`` per image).

    Brightness, contrast and saturation are all ``clamp(a * x + (1 - a) * m)`` with m = 0,
    the mean grey level, or the grey image; so each of the 4 slots applies them as one fused
    blend with per-image ``a`` and ``m`` (identity for images whose op in that slot is
    another one), then the hue rotation for the images whose op it is. What each slot does to
    each image is worked out for all slots at once, before the pixels are touched: a handful of
    operations on (n, 4) tensors instead of a dozen per slot (on a GPU, each is a kernel launch).
    """
    n = x.shape[0]
    op = torch.where(params["jitter"].unsqueeze(1), params["order"], -1)  # (n, slot): op id, -1 if not jittered
    is_b, is_c, is_s, is_h = (op == COLOR_OPS.index(name) for name in COLOR_OPS)
    a = torch.where(is_b, params["brightness"].unsqueeze(1),
                    torch.where(is_c, params["contrast"].unsqueeze(1),
                                torch.where(is_s, params["saturation"].unsqueeze(1), 1.0)))
    # (n, slot, 1, 1, 1): selecting a slot gives per-image factors that broadcast over (n, C, H, W)
    a, c_w, s_w = (t.to(x.dtype).view(n, 4, 1, 1, 1) for t in (a, is_c, is_s))
    for slot in range(4):
        gray = grayscale(x)
        m = torch.addcmul(c_w[:, slot] * gray.mean(dim=(1, 2, 3), keepdim=True), s_w[:, slot], gray)
        x = _blend(x, m, a[:, slot])
        x = _hue_where(x, params["hue"], is_h[:, slot])
    return x


def _antialias(x: torch.Tensor, shrink_x: torch.Tensor, shrink_y: torch.Tensor, most: float) -> torch.Tensor:
    """Each image blurred along each axis by its crop's shrink factor there (none where it is at most 1).
    The kernel's size follows from the largest possible factor ``most`` (a whole-image crop: the image side
    over the output's), not from the draw, so that a compiled pass keeps its shapes."""
    sigma_x, sigma_y = (ANTIALIAS_SIGMA * (f.clamp(min=1) ** 2 - 1).sqrt() for f in (shrink_x, shrink_y))
    widest = ANTIALIAS_SIGMA * math.sqrt(most ** 2 - 1)
    half = max(1, min(math.ceil(3 * widest), min(x.shape[-2:]) - 1))  # reflect padding needs less than the side
    return gaussian_blur(x, sigma_x, (shrink_x > 1) | (shrink_y > 1), 2 * half + 1, sigma_y)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor,
                  kernel_size: int, sigma_y: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (reflect padding, as torchvision); ``sigma_y``: another
    one along the height. A sigma of 0 leaves the image as it is along that axis."""
    n, c, hgt, wid = x.shape
    half = kernel_size // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    delta = (pos == 0).to(x.dtype).expand(n, -1)

    def kernel(s: torch.Tensor) -> torch.Tensor:
        s = s.view(-1, 1).to(x.dtype)
        k = torch.exp(-(pos.view(1, -1) ** 2) / (2 * s.clamp(min=1e-6) ** 2))
        k = torch.where(s > 0, k / k.sum(dim=1, keepdim=True), delta)
        return torch.where(apply.view(-1, 1), k, delta).repeat_interleave(c, dim=0)  # (n*c, k)

    across = kernel(sigma)
    down = across if sigma_y is None else kernel(sigma_y)
    y = F.pad(x.reshape(1, n * c, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, across.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, down.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def apply_view(x: torch.Tensor, params: Mapping[str, torch.Tensor], cfg: ViewConfig,
               size: int) -> torch.Tensor:
    """One view of float images in [0, 1] given sampled ``params`` (not yet normalised)."""
    x = crop_and_flip(x, params["crop"], params["flip"], size)
    if cfg.jitter_p > 0:
        x = color_jitter(x, params)
    if cfg.grayscale_p > 0:
        x = torch.where(_per_image(params["grayscale"]), grayscale(x).expand_as(x), x)
    if cfg.blur_p > 0:
        k = cfg.blur_kernel_size or (int(0.1 * size) // 2 * 2 + 1)
        x = gaussian_blur(x, params["sigma"], params["blur"], max(k, 3))
    if cfg.solarize_p > 0:
        hit = _per_image(params["solarize"]) & (x >= cfg.solarize_threshold)
        x = torch.where(hit, 1.0 - x, x)
    return x


class Normalize(torch.nn.Module):
    """uint8 images -> float, normalised by the dataset's channel mean and std: ``(x - mean) / std``
    as one multiply-add per pixel, the uint8 scale 1/255 folded into it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
        for name, value in (("scale", 1 / std), ("shift", -mean / std), ("byte_scale", 1 / (255 * std))):
            self.register_buffer(name, value.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return torch.addcmul(self.shift, x.float(), self.byte_scale)
        return torch.addcmul(self.shift, x, self.scale)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def joint_config(views: Sequence[ViewConfig]) -> ViewConfig | None:
    """One config under which :func:`apply_view` gives every view's images their own view's result,
    so that all views go through one pass; None where the views' fixed settings differ.

    An op runs if any view uses it; the images of a view that does not are drawn its identity
    (no jitter, grey, blur or solarize), which the op leaves as they are. Only what is not drawn
    per image (the blur kernel's size, the solarize threshold) must agree.
    """
    first = views[0]
    if any((v.blur_kernel_size, v.solarize_threshold) != (first.blur_kernel_size, first.solarize_threshold)
           for v in views):
        return None
    return replace(first, **{p: max(getattr(v, p) for v in views)
                             for p in ("jitter_p", "grayscale_p", "blur_p", "solarize_p")})


class ViewAugment(torch.nn.Module):
    """Generates augmented, normalised views of a uint8 batch, one ``ViewConfig`` per view.

    Runs in float32 outside autocast (cheap next to the network) and returns channels_last
    tensors ready for the encoder. Each view's parameters are drawn in turn from ``gen``; then, on an
    accelerator, all views are made in one pass over their batches joined (:func:`joint_config`;
    the same images bit for bit): there a training step at CIFAR sizes is bound by kernel launches,
    not arithmetic, and the augmentation's were about as many as the network's; one pass cuts them
    by 40% for two views (``benchmarks/host_ops.py`` counts them). On a CPU, where the arithmetic is
    the cost, one pass per view is faster (two views of 256 images: 25.5 against 28.3 ms on one thread, AMD EPYC):
    ``join_views`` None picks by device, True / False force it. ``compile``: ``torch.compile`` the
    pass (not the sampling, which reads the generator), fusing its few hundred small kernels into a few.
    """

    def __init__(self, views: Sequence[ViewConfig], mean, std, size: int | None = None,
                 compile: bool = False, join_views: bool | None = None):
        super().__init__()
        self.views = list(views)
        self.joint = joint_config(self.views)
        self.join_views = join_views
        self.size = size
        self.normalize = Normalize(mean, std)
        self._view = torch.compile(self._one_view, dynamic=False) if compile else self._one_view

    def _one_view(self, x: torch.Tensor, params: dict[str, torch.Tensor], cfg: ViewConfig,
                  size: int) -> torch.Tensor:
        v = self.normalize(apply_view(x, params, cfg, size))
        return v.contiguous(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        with torch.autocast(images.device.type, enabled=False):
            x = to_unit_float(images)
            size = self.size or x.shape[-1]
            params = [sample_view_params(x.shape[0], cfg, gen, x.device) for cfg in self.views]
            join = self.join_views if self.join_views is not None else x.device.type != "cpu"
            if not join or self.joint is None or len(self.views) == 1:
                return [self._view(x, p, cfg, size) for p, cfg in zip(params, self.views, strict=True)]
            joined = {key: torch.cat([p[key] for p in params]) for key in params[0]}
            both = self._view(x.repeat(len(self.views), 1, 1, 1), joined, self.joint, size)
            return list(both.chunk(len(self.views)))
