"""Evaluation splits by value: the seed_original halves, the seeded subset, the pixel digests that find
copies, the count of test images copied from training, and unlabelled training images refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol.core.data import ImageTensors, holdout, image_digests, make_synthetic, seeded_subset, split_in_place
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


def test_the_holdout_split_is_taken_in_place_and_equals_the_copying_one(monkeypatch):
    """The evaluation's training split is reordered in place (it held the training set twice while the
    validation images were taken out): the same images, labels and order as two copies, with copies of an
    image kept on one side and with a subset on top; the training images a caller hands in stay as they were."""
    import byol.jobs.datasets as datasets

    train = make_synthetic(50, 8, 4, seed=0)
    train.images[7] = train.images[3]  # two files with the same pixels: the holdout keeps them together
    loaded = []
    real_load = datasets.load_split

    def load(cfg, split, unlabelled=True):
        if split != "train":
            return real_load(cfg, split, unlabelled)
        loaded.append(ImageTensors(train.images.clone(), train.labels.clone(), train.classes))
        return loaded[-1]

    monkeypatch.setattr(datasets, "load_split", load)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(12345))
    held, rest = holdout(perm, image_digests(train), 9)
    assert len(held) == 9 and (3 in held.tolist()) == (7 in held.tolist())
    for subset in (None, 12):
        config = {**SYNTHETIC, "num_train": 50, "subset": subset}
        splits = eval_splits(config, {"name": "holdout", "val_size": 9}, seed=5)
        kept = seeded_subset(train.subset(rest), subset, seed=5)
        assert torch.equal(splits["val"].images, train.images[held])
        assert torch.equal(splits["val"].labels, train.labels[held])
        assert torch.equal(splits["train"].images, kept.images) and torch.equal(splits["train"].labels, kept.labels)
        if subset is None:  # views of the loaded tensor, not copies
            assert splits["train"].images.untyped_storage().data_ptr() == loaded[-1].images.untyped_storage().data_ptr()
    handed = ImageTensors(train.images.clone(), train.labels.clone(), train.classes)
    splits = eval_splits({**SYNTHETIC, "num_train": 50}, {"name": "holdout", "val_size": 9}, seed=5, train=handed)
    assert torch.equal(handed.images, train.images) and torch.equal(splits["val"].images, train.images[held])


def test_split_in_place_reorders_the_rows_along_every_cycle():
    for n in (1, 2, 7, 300):
        generator = torch.Generator().manual_seed(n)
        images = torch.randint(0, 256, (n, 3, 2, 2), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 5, (n,), generator=generator)
        perm, k = torch.randperm(n, generator=generator), n // 3
        data = ImageTensors(images.clone(), labels.clone(), ("a",))
        first, second = split_in_place(data, perm[:k], perm[k:])
        assert torch.equal(first.images, images[perm[:k]]) and torch.equal(second.images, images[perm[k:]])
        assert torch.equal(first.labels, labels[perm[:k]]) and torch.equal(second.labels, labels[perm[k:]])
        assert second.images.untyped_storage().data_ptr() == data.images.untyped_storage().data_ptr()  # no copy
        assert first.classes == second.classes == ("a",)
