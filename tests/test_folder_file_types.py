"""Which files of a class folder are read: every name Pillow gives the formats read ('.jfif', '.jpe', '.mpo',
'.pnm', '.apng'...), and a note naming the files left out ('.heic' photos, notes) by type; class names that
differ between the splits only in their Unicode form are said to."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
import torch
from conftest import class_folders
from PIL import Image

from byol.core.errors import DataError
from byol.core.image_folder import load_image_folder
from byol.jobs.datasets import eval_splits


def test_images_under_every_name_of_a_read_format_are_read_and_the_rest_named(tmp_path, capsys):
    folder = tmp_path / "train"
    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for name in ("a.png", "b.jfif", "c.JPE", "d.pnm",
                                                                               "e.apng", "f.png")}
    for name, a in pixels.items():
        cls = "dog" if name == "f.png" else "cat"
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / cls / name, format="JPEG" if name[-4:].lower() in ("jfif", ".jpe")
                                else "PPM" if name.endswith("pnm") else "PNG", quality=100)
    (folder / "cat" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (folder / "cat" / "labels.txt").write_text("cat\n")
    data = load_image_folder(folder, 8, workers=1)
    assert data.classes == ("cat", "dog") and data.labels.tolist() == [0, 0, 0, 0, 0, 1]
    for row, name in enumerate(pixels):  # each file's own pixels (JPEG's within its loss), in name order
        with Image.open(next(folder.glob(f"*/{name}"))) as im:
            want = torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())
        assert torch.equal(data.images[row], want), name
    out = capsys.readouterr().out
    assert "2 file(s) in image folder" in out and "(.heic: 1, .txt: 1;" in out and "'cat/IMG_0001.HEIC'" in out
    assert out.count("left out, not of an image type") == 1


def test_class_names_spelt_in_two_unicode_forms_are_said_to_be(tmp_path):
    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    class_folders(tmp_path / "train", 1, classes=(composed, "dog"))
    class_folders(tmp_path / "test", 1, classes=(decomposed, "dog"))
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "cache_dir": None}
    with pytest.raises(DataError) as e:
        eval_splits(cfg, {"name": "holdout", "val_size": 0})
    assert "'café' is spelt with other Unicode characters in each split" in str(e.value)
    assert "\n" not in str(e.value)
