"""Decoding an image folder: a non-square image keeps its centre (short side to the size, then a centred
square), exact pixels where no resampling is needed."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from byol.core.image_folder import load_image_folder


def test_a_non_square_image_is_cropped_to_its_centre(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # 8 high, 12 wide: short side already 8
    tall = rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(wide).save(tmp_path / "a" / "0_wide.png")
    Image.fromarray(tall).save(tmp_path / "a" / "1_tall.png")
    data = load_image_folder(tmp_path, 8, workers=1)
    assert data.images.shape == (2, 3, 8, 8)
    assert torch.equal(data.images[0], torch.from_numpy(wide[:, 2:10]).permute(2, 0, 1))
    assert torch.equal(data.images[1], torch.from_numpy(tall[2:10, :]).permute(2, 0, 1))
