"""CIFAR-100 and STL-10 through torchvision, read from small files written in torchvision's on-disk
formats (no download): shapes, labels, pixels, which images pretraining and evaluation get, and
the one-line message when the files are missing."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.stl10 as tv_stl10
from conftest import compose_config, plain_config

from byol.core.data import image_digests, load_cifar100, load_stl10
from byol.core.errors import DataError
from byol.jobs.cli import command_line_keys, run_job
from byol.jobs.datasets import load_eval_data, load_split
from byol.jobs.pretrain import pretrain

FINE_NAMES = [f"fine{k:02d}" for k in range(100)]
STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
IMAGEFOLDER_HINT = "or use an image folder instead: data=imagefolder data.root=DIR (DIR/train/<class>/*.png)"


@pytest.fixture(autouse=True)
def small_files_pass_the_checksums(monkeypatch):
    """torchvision compares each file with the MD5 of the real dataset's; small files only need to exist."""
    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(tv_cifar, "check_integrity", exists)
    monkeypatch.setattr(tv_stl10, "check_integrity", exists)


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` distinct random images (N, 3, size, size) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def write_cifar100(root: Path, train: tuple, test: tuple) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: pickled dicts, each image a row of 3072 bytes
    (the red 32x32 plane row by row, then green, then blue), 100 fine and 20 coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, (images, labels) in {"train": train, "test": test}.items():
        entry = {"filenames": [f"{name}{i}.png" for i in range(len(labels))], "batch_label": name,
                 "fine_labels": list(labels), "coarse_labels": [k // 5 for k in labels],
                 "data": images.reshape(len(images), 3 * 32 * 32)}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": FINE_NAMES, "coarse_label_names": [f"coarse{k}" for k in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


def write_stl10(root: Path, train: tuple, test: tuple, unlabelled: np.ndarray) -> Path:
    """``root/stl10_binary``: each image 3 planes of 96x96 bytes stored column by column
    (column-major), labels one byte each, 1 to 10; the class names one per line."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)

    def column_major(images: np.ndarray) -> bytes:
        return np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()

    for name, (images, labels) in {"train": train, "test": test}.items():
        (folder / f"{name}_X.bin").write_bytes(column_major(images))
        (folder / f"{name}_y.bin").write_bytes(bytes(k + 1 for k in labels))
    (folder / "unlabeled_X.bin").write_bytes(column_major(unlabelled))
    (folder / "class_names.txt").write_text("\n".join(STL10_NAMES) + "\n")
    return root


def data_config(tmp_path: Path, option: str, root: Path, download: bool = False) -> dict:
    """The composed ``data`` group of ``data=<option>``, pointed at ``root``."""
    overrides = [f"data={option}", f"data.root={root}", f"data.download={str(download).lower()}"]
    return plain_config(compose_config("train", overrides, tmp_path))["data"]


@pytest.fixture
def cifar100(tmp_path):
    """10 training and 4 test images; labels span 0..99."""
    train = (random_images(10, 32, seed=1), [0, 99, 5, 42, 7, 99, 0, 13, 64, 5])
    test = (random_images(4, 32, seed=2), [99, 1, 0, 50])
    return write_cifar100(tmp_path / "cifar100", train, test), train, test


@pytest.fixture
def stl10(tmp_path):
    """10 labelled training, 3 test and 6 unlabelled 96x96 images; train image 0 has one red
    pixel at row 2, column 7 on black, so a transposed image would show."""
    train_images = random_images(10, 96, seed=3)
    train_images[0] = 0
    train_images[0, 0, 2, 7] = 255
    train = (train_images, [0, 9, 2, 9, 4, 1, 0, 3, 5, 9])
    test = (random_images(3, 96, seed=4), [9, 0, 6])
    unlabelled = random_images(6, 96, seed=5)
    return write_stl10(tmp_path / "stl10", train, test, unlabelled), train, test, unlabelled


# --------------------------------------------------------------------------- CIFAR-100


def test_cifar100_images_labels_and_classes(cifar100):
    root, (train_images, train_labels), (test_images, test_labels) = cifar100
    train = load_cifar100(str(root), train=True, download=False)
    test = load_cifar100(str(root), train=False, download=False)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (4, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(train_images))  # every pixel, in (N, 3, H, W)
    assert torch.equal(test.images, torch.from_numpy(test_images))
    assert train.labels.tolist() == train_labels and test.labels.tolist() == test_labels
    assert train.labels.dtype == torch.long
    assert train.classes == tuple(FINE_NAMES) and len(test.classes) == 100


def test_cifar100_config_pretrains_and_evaluates_on_its_splits(tmp_path, cifar100):
    root, (train_images, _), (test_images, test_labels) = cifar100
    cfg = data_config(tmp_path, "cifar100", root)
    assert (cfg["num_classes"], cfg["image_size"], cfg["crop_size"]) == (100, 32, None)
    assert torch.equal(load_split(cfg, "train").images, torch.from_numpy(train_images))
    splits, num_classes = load_eval_data(cfg, {"name": "holdout", "val_size": 2}, seed=0)
    assert num_classes == 100
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (8, 2, 4)
    assert splits["test"].labels.tolist() == test_labels
    assert int(splits["train"].labels.min()) >= 0 and int(splits["train"].labels.max()) <= 99


# --------------------------------------------------------------------------- STL-10


def test_stl10_images_are_not_transposed(stl10):
    root, (train_images, train_labels), _, _ = stl10
    train = load_stl10(str(root), "train", download=False)
    assert train.images.shape == (10, 3, 96, 96) and train.images.dtype == torch.uint8
    marked = train.images[0]
    assert int(marked[0, 2, 7]) == 255 and int(marked[0, 7, 2]) == 0 and int(marked.sum()) == 255
    assert torch.equal(train.images, torch.from_numpy(train_images))
    assert train.labels.tolist() == train_labels  # the file's 1..10, as 0..9
    assert train.classes == tuple(STL10_NAMES)


def test_stl10_pretraining_gets_train_and_unlabelled(tmp_path, stl10):
    root, (train_images, train_labels), _, unlabelled = stl10
    cfg = data_config(tmp_path, "stl10", root)
    assert (cfg["num_classes"], cfg["image_size"], cfg["crop_size"]) == (10, 96, None)
    images = load_split(cfg, "train")
    assert images.images.shape == (16, 3, 96, 96) and images.images.dtype == torch.uint8
    assert torch.equal(images.images, torch.from_numpy(np.concatenate([train_images, unlabelled])))
    assert images.labels.tolist() == train_labels + [-1] * 6
    assert images.labels.dtype == torch.long


def test_stl10_evaluation_gets_only_labelled_train_and_test(tmp_path, stl10):
    root, (train_images, train_labels), (test_images, test_labels), unlabelled = stl10
    cfg = data_config(tmp_path, "stl10", root)
    splits, num_classes = load_eval_data(cfg, {"name": "holdout", "val_size": 2}, seed=0)
    assert num_classes == 10
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (8, 2, 3)
    assert torch.equal(splits["test"].images, torch.from_numpy(test_images))
    assert splits["test"].labels.tolist() == test_labels
    labelled = set(image_digests(load_stl10(str(root), "train", download=False)))
    evaluated = image_digests(splits["train"]) + image_digests(splits["val"])
    assert set(evaluated) == labelled  # all 10 labelled training images, no unlabelled one
    assert sorted(splits["train"].labels.tolist() + splits["val"].labels.tolist()) == sorted(train_labels)
    halves = load_eval_data(cfg, {"name": "seed_original"}, seed=0)[0]
    assert len(halves["train"]) == 10 and int(halves["train"].labels.min()) >= 0


def test_stl10_unknown_split_is_refused(stl10):
    with pytest.raises(DataError, match="unknown STL-10 split 'val'; choose one of: train, test, unlabeled"):
        load_stl10(str(stl10[0]), "val", download=False)


# --------------------------------------------------------------------------- missing files


MISSING = {
    "cifar100": ("CIFAR-100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "stl10": ("STL-10", "stl10_binary", "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"),
}


@pytest.mark.parametrize("option", MISSING)
def test_missing_files_are_one_line_that_says_what_to_do(tmp_path, option):
    title, folder, url = MISSING[option]
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as err:
        load_split(data_config(tmp_path, option, root), "train")
    assert str(err.value) == (
        f"could not load {title} from '{root}' (no '{folder}' folder there). Either set data.download=true "
        f"(needs internet access), copy the extracted '{folder}' folder (from {url}) into that folder, "
        f"{IMAGEFOLDER_HINT}")


@pytest.mark.parametrize("option", MISSING)
def test_failed_download_says_how_to_get_the_files(tmp_path, monkeypatch, option):
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    title, folder, url = MISSING[option]
    root = tmp_path / option
    with pytest.raises(DataError) as err:
        load_split(data_config(tmp_path, option, root, download=True), "test")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"could not load {title} from '{root}' (")
    assert "Name or service not known" in message
    assert message.endswith(f"Either let the download run on a machine with internet access, copy the "
                            f"extracted '{folder}' folder (from {url}) into that folder, {IMAGEFOLDER_HINT}")


@pytest.mark.parametrize("option", MISSING)
def test_training_job_stops_with_one_error_line(tmp_path, capsys, option):
    run = tmp_path / "run"
    run.mkdir()  # Hydra creates it before the job starts
    overrides = ["experiment=smoke", f"data={option}", f"data.root={tmp_path}/none", "data.download=false"]
    with pytest.raises(SystemExit) as exit_:
        run_job(pretrain, compose_config("train", overrides, run), requested=command_line_keys())
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    title, folder, _ = MISSING[option]
    assert err.startswith(f"error: could not load {title} from '{tmp_path}/none' (no '{folder}' folder there)")


def test_missing_file_is_named(stl10):
    root = stl10[0]
    (root / "stl10_binary" / "unlabeled_X.bin").unlink()
    with pytest.raises(DataError, match=r"^could not load STL-10 from '.*' \('stl10_binary' lacks unlabeled_X.bin\)"):
        load_stl10(str(root), "test", download=False)
