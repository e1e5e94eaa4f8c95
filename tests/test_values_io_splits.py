"""Evaluation splits by value: the seed_original halves, the seeded subset, the pixel digests that find
copies, the count of test images copied from training, and unlabelled training images refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol.core.data import ImageTensors, image_digests, make_synthetic, seeded_subset
from byol.core.errors import DataError
from byol.jobs.datasets import eval_splits, load_eval_data

SYNTHETIC = {"name": "synthetic", "num_train": 40, "num_test": 20, "image_size": 8, "num_classes": 4}


def test_seed_original_splits_the_test_set_into_two_disjoint_seeded_halves():
    splits = eval_splits(SYNTHETIC, {"name": "seed_original"})
    test = make_synthetic(20, 8, 4, seed=1)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(42))
    assert torch.equal(splits["val"].images, test.images[perm[:10]])
    assert torch.equal(splits["test"].images, test.images[perm[10:]])
    assert torch.equal(splits["test"].labels, test.labels[perm[10:]])
    assert len(splits["train"]) == 40


def test_a_subset_is_a_function_of_its_seed_alone():
    data = make_synthetic(30, 8, 3)
    expected = torch.randperm(30, generator=torch.Generator().manual_seed(7))[:5]
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # the global random stream plays no part
        chosen = seeded_subset(data, 5, seed=7)
        assert torch.equal(chosen.images, data.images[expected]) and torch.equal(chosen.labels, data.labels[expected])


def test_images_that_differ_in_any_channel_are_no_copies():
    base = torch.zeros(3, 3, 2, 2, dtype=torch.uint8)
    base[1, 1, 0, 0] = 5  # differs from image 0 in the green channel only
    base[2, 2, 1, 1] = 9  # in the blue channel only
    digests = image_digests(ImageTensors(torch.cat([base, base[:1]]), torch.zeros(4, dtype=torch.long)))
    assert len(set(digests[:3])) == 3 and digests[3] == digests[0]


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_every_test_image_copied_from_training_is_counted(tmp_path, capsys):
    for k, cls in enumerate(("cat", "dog")):
        for i in range(5):
            image(tmp_path / "train" / cls / f"{i}.png", 10 * k + i)
        image(tmp_path / "test" / cls / "own.png", 100 + k)
    for name in ("copy_a.png", "copy_b.png"):  # two copies of the same training image
        (tmp_path / "test" / "cat" / name).write_bytes((tmp_path / "train" / "cat" / "0.png").read_bytes())
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "cache_dir": None}
    eval_splits(cfg, {"name": "holdout", "val_size": 2})
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[data] warning:")]
    assert len(warning) == 1 and warning[0].startswith("[data] warning: 2 of the 4 test images are identical")


def test_unlabelled_training_images_are_refused_for_evaluation(tmp_path):
    for i in range(10):
        image(tmp_path / "train" / f"{i}.png", i)  # a flat folder: images without a class
    for k, cls in enumerate(("cat", "dog")):
        image(tmp_path / "test" / cls / "0.png", 100 + k)
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "cache_dir": None}
    with pytest.raises(DataError, match="the train split has unlabelled images; evaluation needs class folders"):
        load_eval_data(cfg, {"name": "holdout", "val_size": 2}, seed=0)
