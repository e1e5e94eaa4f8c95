"""The two views' augmentation settings of a run: the shared ``augment.*`` keys, each view's changes, and the
paper's blur where the crops are large enough for it."""

from __future__ import annotations

from collections.abc import Mapping

VIEWS = ("view1", "view2")


# blur_p: auto gives each view the paper's blur probability on crops larger than BLUR_ABOVE pixels, and none
# at CIFAR's 32 px, where the CIFAR recipes (solo-learn's among them) leave blur out.
PAPER_BLUR_P = (1.0, 0.1)  # view 1, view 2 (Grill et al., 2020, appendix B)
BLUR_ABOVE = 32


def view_settings(augment: Mapping, crop_side: int) -> list[dict]:
    """Each view's settings: the shared ``augment.*`` keys, then what ``augment.viewN`` changes; a
    ``blur_p`` of ``auto`` becomes the view's paper probability on crops of more than 32 pixels, else 0."""
    shared = {k: v for k, v in augment.items() if k not in VIEWS}
    views = [{**shared, **(augment.get(view) or {})} for view in VIEWS]
    for view, paper in zip(views, PAPER_BLUR_P, strict=True):
        if view.get("blur_p") == "auto":
            view["blur_p"] = paper if crop_side > BLUR_ABOVE else 0.0
    return views


def crop_side(data: Mapping) -> int:
    """The side of the views' crops: ``data.crop_size``, else the images' own side."""
    return int(data.get("crop_size") or data.get("image_size") or BLUR_ABOVE)


def build_augment(cfg: dict):
    """The two per-image view augmentations of a run, normalised with the data's mean/std."""
    from byol.core.augment import ViewAugment, ViewConfig

    data = cfg["data"]
    views = [ViewConfig.from_dict(view) for view in view_settings(cfg["augment"], crop_side(data))]
    return ViewAugment(views, data["mean"], data["std"], data.get("crop_size"), compile=bool(cfg.get("compile")))
