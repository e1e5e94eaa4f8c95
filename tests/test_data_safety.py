"""Image folders that would silently mislead: symlinks that reach the dataset twice, hidden
files, one-class evaluation, the same image on both sides of a split, and a decoded-image
cache that must notice all of it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol.core.errors import DataError
from byol.core.folder_scan import scan_folder
from byol.core.image_folder import load_image_folder
from byol.jobs.datasets import eval_splits, load_eval_data

SIZE = 8


def image(path: Path, seed: int, fmt: str | None = None) -> Path:
    """A distinct random 8x8 RGB image (``seed`` picks it) saved at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def tree(root: Path, classes=("cat", "dog"), n=3, start=0) -> Path:
    """``root/<class>/<i>.png``, every image distinct (seeds ``start``, ``start + 1``, ...)."""
    seed = start
    for c in classes:
        for i in range(n):
            image(root / c / f"{i}.png", seed)
            seed += 1
    return root


def cfg(root: Path, **kw) -> dict:
    return {"name": "imagefolder", "root": str(root), "image_size": SIZE, "cache_dir": None, **kw}


def holdout(val_size: int) -> dict:
    return {"name": "holdout", "val_size": val_size}


def rows(data) -> list[bytes]:
    return [bytes(x) for x in data.images.reshape(len(data), -1).numpy()]


def shared(a, b) -> int:
    """How many images of ``a`` are also in ``b`` (same pixels)."""
    return len(set(rows(a)) & set(rows(b)))


def data_lines(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("[data]") and "decoding" not in x]


# --------------------------------------------------------------------------- symlinks


def test_class_link_to_the_dataset_root_is_skipped_with_a_line(tmp_path, capsys):
    train = tree(tmp_path / "train")
    (train / "zz").symlink_to("../train")  # the example of the issue: 2x the data and an extra class
    data = load_image_folder(train, SIZE)
    assert data.classes == ("cat", "dog")
    assert len(data) == 6 and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(set(rows(data))) == 6
    lines = data_lines(capsys.readouterr().out)
    assert lines == [f"[data] skipping symlinked folder '{train / 'zz'}' -> '{train.resolve()}': it is the "
                     f"dataset folder or a folder above it (a link cycle); its images would be counted twice"]


def test_links_to_folders_already_in_the_dataset_are_skipped(tmp_path, capsys):
    train = tree(tmp_path / "train")
    (train / "aa").symlink_to("dog")  # sorts before the folder it points to
    (train / "cat" / "up").symlink_to("..")  # a cycle inside a class
    (train / "cat" / "sub").mkdir()
    image(train / "cat" / "sub" / "deep.png", 100)
    (train / "dog" / "again").symlink_to("../cat/sub")  # another class's subfolder
    (train / "parent").symlink_to("..")  # above the dataset: would pull in everything beside it
    image(tmp_path / "beside" / "x.png", 200)
    files, labels, classes = scan_folder(train)
    assert classes == ("cat", "dog")
    assert [f.relative_to(train).as_posix() for f in files] == [
        "cat/0.png", "cat/1.png", "cat/2.png", "cat/sub/deep.png", "dog/0.png", "dog/1.png", "dog/2.png"]
    assert labels == [0, 0, 0, 0, 1, 1, 1]
    lines = data_lines(capsys.readouterr().out)
    assert len(lines) == 4
    for name in ("aa", "cat/up", "dog/again", "parent"):
        assert sum(f"'{train / name}'" in x for x in lines) == 1, (name, lines)


def test_links_outside_the_dataset_keep_working_and_count_once(tmp_path, capsys):
    train = tree(tmp_path / "train")
    outside = tree(tmp_path / "elsewhere", ("birds",), n=2, start=50)
    (train / "bird").symlink_to(outside / "birds")  # a class assembled from another disk
    (train / "bird2").symlink_to(outside / "birds")  # the same folder again: skipped
    image(tmp_path / "lone.png", 60)
    (train / "cat" / "lone.png").symlink_to(tmp_path / "lone.png")  # a file link: counted
    (train / "dog" / "also_lone.png").symlink_to(tmp_path / "lone.png")  # the same file again: not
    (train / "dog" / "cat0.png").symlink_to(train / "cat" / "0.png")  # a file inside the dataset: not
    (train / "dog" / "more").symlink_to(outside / "birds")  # a nested link to a folder already read
    data = load_image_folder(train, SIZE)
    assert data.classes == ("bird", "cat", "dog")
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert len(set(rows(data))) == 9
    out = capsys.readouterr().out
    lines = data_lines(out)
    assert sum("bird2" in x and "already part of the dataset" in x for x in lines) == 1
    assert sum(f"'{train / 'dog' / 'more'}'" in x for x in lines) == 1
    assert "[data] 2 files reached through more than one path (symlinks) are counted once" in lines


def test_links_that_lead_nowhere_are_an_error_or_skipped_with_a_warning(tmp_path, capsys):
    """A file link or a class folder link whose target is gone (unmounted storage) was skipped without a word:
    its images, or a whole class, vanished. Now it is named, as an unreadable folder is: an error, or with
    data.skip_bad_files=true a warning line, and the rest is used. Cycles stay skipped with their own line."""
    train = tree(tmp_path / "train")
    (train / "bird").symlink_to(tmp_path / "unmounted" / "birds")  # a whole class on storage that is not there
    (train / "cat" / "gone.png").symlink_to(tmp_path / "unmounted" / "x.png")  # one image
    (train / "dog" / "loop.png").symlink_to("loop.png")  # a link to itself: nothing to read either
    (train / "dog" / "notes.txt").symlink_to(tmp_path / "unmounted" / "notes.txt")  # never an image: ignored
    (train / "cat" / "up").symlink_to("..")  # a cycle: skipped with its own line, as before
    with pytest.raises(DataError) as refused:
        load_image_folder(train, SIZE)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"3 symbolic link(s) in image folder '{train}' lead to nothing")
    assert f"'{train / 'bird'}' -> '{tmp_path / 'unmounted' / 'birds'}'" in message
    assert f"'{train / 'cat' / 'gone.png'}'" in message and f"'{train / 'dog' / 'loop.png'}'" in message
    assert "notes.txt" not in message and "data.skip_bad_files=true" in message
    for i in range(3):  # more than three: the first three and the count
        (train / "dog" / f"z{i}.png").symlink_to(tmp_path / "unmounted" / f"{i}.png")
    with pytest.raises(DataError, match=r"^6 symbolic link\(s\) .* and 3 more; the images there would be left out"):
        load_image_folder(train, SIZE)
    capsys.readouterr()
    data = load_image_folder(train, SIZE, skip_bad_files=True)
    assert data.classes == ("cat", "dog") and len(data) == 6  # the rest of the folder
    lines = data_lines(capsys.readouterr().out)
    said = f"[data] warning: skipping 6 symbolic link(s) in image folder '{train}' that lead to nothing that exists: "
    warned = [x for x in lines if x.startswith(said)]
    assert len(warned) == 1 and f"'{train / 'bird'}'" in warned[0]
    assert sum(f"'{train / 'cat' / 'up'}'" in x and "link cycle" in x for x in lines) == 1


# --------------------------------------------------------------------------- hidden files


def test_hidden_files_and_folders_are_skipped_everywhere(tmp_path):
    train = tree(tmp_path / "train")
    (train / "cat" / "._0000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (train / "cat" / ".DS_Store").write_bytes(b"Bud1\x00\x00")
    (train / ".DS_Store").write_bytes(b"Bud1\x00\x00")
    (train / "._cat").write_bytes(b"\x00\x05\x16\x07")
    image(train / "dog" / ".thumbnails" / "0.png", 99)  # a hidden folder inside a class
    image(train / ".hidden.png", 98)
    data = load_image_folder(train, SIZE)
    assert data.classes == ("cat", "dog") and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    flat = tmp_path / "flat"
    image(flat / "a.png", 1)
    (flat / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    files, labels, classes = scan_folder(flat)
    assert [f.name for f in files] == ["a.png"] and labels == [-1] and classes == ()


def test_loose_images_beside_class_folders_are_said_to_be_unused(tmp_path, capsys):
    """Images directly in a folder that also holds class folders belong to no class: they were left out without
    a word (a user who dropped new images at the top trained without them). One note counts and names one;
    a flat folder's images are all used, as before, with no note."""
    train = tree(tmp_path / "train")
    image(train / "new.png", 50)
    image(train / "other.jpg", 51)
    files, labels, classes = scan_folder(train)
    assert classes == ("cat", "dog") and len(files) == 6 and -1 not in labels
    assert capsys.readouterr().out == (f"[data] note: 2 image(s) directly in '{train}' (e.g. 'new.png') are not "
                                       f"used: beside class folders an image belongs in one; move them into theirs\n")
    flat = tmp_path / "flat"
    image(flat / "a.png", 1)
    assert scan_folder(flat)[1] == [-1] and capsys.readouterr().out == ""


# --------------------------------------------------------------------------- evaluation


def test_evaluation_with_one_class_is_refused(tmp_path):
    tree(tmp_path / "train", ("cat",), n=10)
    tree(tmp_path / "test", ("cat",), n=2, start=20)
    with pytest.raises(DataError) as err:
        load_eval_data(cfg(tmp_path), holdout(2), seed=0)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("evaluation needs at least 2 classes, but the training data has 1 ('cat')")
    assert "add class folders" in message
    # two class folders of which one is empty are one class too
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(DataError, match="at least 2 classes, but the training data has 1 "):
        load_eval_data(cfg(tmp_path), holdout(2), seed=0)
    # and two classes are fine
    tree(tmp_path / "train", ("dog",), n=5, start=40)
    splits, num_classes = load_eval_data(cfg(tmp_path), holdout(2), seed=0)
    assert num_classes == 2 and sorted(set(splits["train"].labels.tolist())) == [0, 1]


def test_a_linked_copy_of_the_data_never_lands_in_train_and_val(tmp_path):
    tree(tmp_path / "train", ("cat", "dog"), n=10)
    tree(tmp_path / "test", ("cat", "dog"), n=2, start=100)
    for split in ("train", "test"):
        (tmp_path / split / "zz").symlink_to(f"../{split}")
    for i in range(5):
        (tmp_path / "train" / "dog" / f"link{i}.png").symlink_to(f"../cat/{i}.png")
    splits = eval_splits(cfg(tmp_path), holdout(4))
    train, val = splits["train"], splits["val"]
    assert shared(train, val) == 0
    assert len(val) == 4 and len(train) == 16 and len(splits["test"]) == 4
    assert train.classes == ("cat", "dog")


def copies_tree(root: Path) -> None:
    """20 distinct images in cat/ and dog/, plus 8 byte-identical copies of 6 of them (one of
    them in the other class), and 4 other images in test/."""
    tree(root / "train", ("cat", "dog"), n=10)
    tree(root / "test", ("cat", "dog"), n=2, start=100)
    for src, dst in [("cat/0", "cat/c0"), ("cat/0", "dog/c0"), ("cat/3", "cat/c3"), ("dog/5", "dog/c5"),
                     ("dog/7", "cat/c7"), ("dog/9", "dog/c9a"), ("dog/9", "dog/c9b"), ("cat/8", "cat/c8")]:
        shutil.copyfile(root / "train" / f"{src}.png", root / "train" / f"{dst}.png")


@pytest.mark.parametrize("val_size", [3, 4, 5])
def test_byte_identical_images_stay_on_one_side_of_the_split(tmp_path, val_size):
    copies_tree(tmp_path)
    full = load_image_folder(tmp_path / "train", SIZE)
    assert len(full) == 28
    splits = eval_splits(cfg(tmp_path), holdout(val_size))
    train, val = splits["train"], splits["val"]
    assert len(val) == val_size and len(train) + len(val) == 28
    assert shared(train, val) == 0
    # every copy is kept (on one side): the multiset of images is the folder's
    assert sorted(rows(train) + rows(val)) == sorted(rows(full))


def test_a_validation_split_larger_than_a_fifth_is_capped_and_said(tmp_path, capsys):
    tree(tmp_path / "train", ("cat", "dog"), n=10)
    tree(tmp_path / "test", ("cat", "dog"), n=2, start=100)
    splits = eval_splits(cfg(tmp_path), holdout(1000))
    assert (len(splits["val"]), len(splits["train"])) == (4, 16)  # 20 training images: a fifth held out
    assert "[data] note: 1000 validation images asked, 4 held out (at most a fifth of the 20 training images)" \
        in capsys.readouterr().out
    eval_splits(cfg(tmp_path), holdout(4))
    assert "validation images asked" not in capsys.readouterr().out


def test_val_size_0_keeps_every_training_image_and_an_empty_split_asked_for_is_refused(tmp_path):
    tree(tmp_path / "train", ("cat", "dog"), n=10)
    tree(tmp_path / "test", ("cat", "dog"), n=2, start=100)
    splits, num_classes = load_eval_data(cfg(tmp_path), holdout(0), seed=0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"]), num_classes) == (20, 0, 4, 2)
    assert sorted(rows(splits["train"])) == sorted(rows(load_image_folder(tmp_path / "train", SIZE)))
    small = tmp_path / "small"
    tree(small / "train", ("cat", "dog"), n=2)
    tree(small / "test", ("cat", "dog"), n=1, start=100)
    with pytest.raises(DataError, match="the val split is empty"):  # 3 asked, a fifth of 4 images is 0
        load_eval_data(cfg(small), holdout(3), seed=0)


def test_a_subset_larger_than_the_data_uses_all_of_it_and_says_so(tmp_path, capsys):
    tree(tmp_path / "train", ("cat", "dog"), n=10)
    tree(tmp_path / "test", ("cat", "dog"), n=2, start=100)
    splits = eval_splits(cfg(tmp_path, subset=500), holdout(4))
    assert len(splits["train"]) == 16
    assert "[data] note: data.subset=500 is more than the 16 training images left after the validation split; " \
           "all of them are used" in capsys.readouterr().out
    assert len(eval_splits(cfg(tmp_path, subset=16), holdout(4))["train"]) == 16
    assert len(eval_splits(cfg(tmp_path, subset=10), holdout(4))["train"]) == 10
    assert "data.subset" not in capsys.readouterr().out


def test_num_classes_below_the_labels_is_refused_and_above_them_noted(tmp_path, capsys):
    """Fewer classes than the labels made kNN score 100% on synthetic-like data and crashed the
    classifier with an index error; more leave outputs unused, which is said."""
    tree(tmp_path / "train", ("ant", "bee", "cat"), n=5)
    tree(tmp_path / "test", ("ant", "bee", "cat"), n=2, start=100)
    with pytest.raises(DataError, match=r"data.num_classes=2, but the data has 3 classes \(ant, bee, cat\); "
                                        r"set data.num_classes=3, or data.num_classes=null"):
        load_eval_data(cfg(tmp_path, num_classes=2), holdout(3), seed=0)
    _, num_classes = load_eval_data(cfg(tmp_path, num_classes=5), holdout(3), seed=0)
    assert num_classes == 5
    assert "[data] note: data.num_classes=5, but the data has 3 classes (ant, bee, cat); 2 classifier outputs " \
           "stay unused" in capsys.readouterr().out
    for given in (None, 3):
        assert load_eval_data(cfg(tmp_path, num_classes=given), holdout(3), seed=0)[1] == 3
        assert "note" not in capsys.readouterr().out


def test_a_class_folder_without_images_is_named_and_counted_once(tmp_path, capsys):
    """An empty class folder (first in sorted order here) made the labels' count and the folders' count
    differ: "data.num_classes=3, but the data has 2 classes (ant, bee, cat)"."""
    tree(tmp_path / "train", ("bee", "cat"), n=5)
    tree(tmp_path / "test", ("bee", "cat"), n=2, start=100)
    for split in ("train", "test"):
        (tmp_path / split / "ant").mkdir()
    splits, num_classes = load_eval_data(cfg(tmp_path), holdout(2), seed=0)
    out = capsys.readouterr().out
    assert num_classes == 3 and splits["train"].classes == ("ant", "bee", "cat")
    assert out.count("[data] note:") == 1, out
    assert "[data] note: class folders without images: 'ant' (training and test); they stay classes (all 3 " \
           "folders count): remove empty folders" in out
    assert load_eval_data(cfg(tmp_path, num_classes=3), holdout(2), seed=0)[1] == 3  # no contradiction
    assert "data.num_classes" not in capsys.readouterr().out
    (tmp_path / "test" / "ant").rmdir()
    with pytest.raises(DataError, match=r"only in train: \['ant'\]; only in test: none\) \('ant' holds no images\)"):
        load_eval_data(cfg(tmp_path), holdout(2), seed=0)


def test_without_copies_the_split_is_the_seeded_one_of_before(tmp_path):
    tree(tmp_path / "train", ("cat", "dog"), n=10)
    tree(tmp_path / "test", ("cat", "dog"), n=2, start=100)
    full = load_image_folder(tmp_path / "train", SIZE)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(12345))
    splits = eval_splits(cfg(tmp_path), holdout(4))
    assert torch.equal(splits["val"].images, full.images[perm[:4]])
    assert torch.equal(splits["train"].images, full.images[perm[4:]])


def test_copies_between_train_and_test_are_counted_in_a_warning(tmp_path, capsys):
    copies_tree(tmp_path)
    for i, src in enumerate(["cat/1", "cat/2", "dog/4"]):
        shutil.copyfile(tmp_path / "train" / f"{src}.png", tmp_path / "test" / "cat" / f"leak{i}.png")
    splits = eval_splits(cfg(tmp_path), holdout(4))
    assert len(splits["test"]) == 7  # warned, not refused
    lines = data_lines(capsys.readouterr().out)
    warning = [x for x in lines if x.startswith("[data] warning:")]
    assert warning == [f"[data] warning: 3 of the 7 test images are identical to training images (same "
                       f"pixels as images in '{tmp_path / 'train'}'); test accuracy will be optimistic: "
                       f"remove the copies from one of the folders"]


# --------------------------------------------------------------------------- the decoded-image cache


def test_cache_key_follows_classes_and_link_targets(tmp_path, capsys):
    cache = tmp_path / "cache"
    train = tree(tmp_path / "data" / "train")
    first = load_image_folder(train, SIZE, cache_dir=cache)
    assert first.classes == ("cat", "dog")
    # an empty class folder changes the labels (classes are sorted): the cached tensors are stale
    (train / "bee").mkdir()
    second = load_image_folder(train, SIZE, cache_dir=cache)
    assert second.classes == ("bee", "cat", "dog") and second.labels.tolist() == [1, 1, 1, 2, 2, 2]
    # a hidden file is not part of the data: the cache still answers
    (train / "cat" / ".DS_Store").write_bytes(b"Bud1")
    capsys.readouterr()
    assert torch.equal(load_image_folder(train, SIZE, cache_dir=cache).images, second.images)
    assert "decoding" not in capsys.readouterr().out
    # a file link moved to another file of the same size and modification time
    a = image(tmp_path / "a.bmp", 1, "BMP")
    b = image(tmp_path / "b.bmp", 2, "BMP")
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    assert a.stat().st_size == b.stat().st_size
    link = train / "dog" / "link.bmp"
    link.symlink_to(a)
    with_a = load_image_folder(train, SIZE, cache_dir=cache)
    link.unlink()
    link.symlink_to(b)
    with_b = load_image_folder(train, SIZE, cache_dir=cache)
    assert not torch.equal(with_a.images[-1], with_b.images[-1])
    assert len(list(cache.iterdir())) == 4


def test_a_class_folder_deeper_than_pythons_recursion_limit_is_read_in_order(tmp_path):
    """The scan once recursed a level per folder: 1,100 nested folders ended in RecursionError (a traceback).
    Its images are found, depth first in name order as before: a folder's images and subfolders by name
    (400 levels under a recursion limit of 300 here)."""
    import sys

    train = tree(tmp_path / "train", classes=("cat",), n=1)
    deep = train / "dog"
    deep.mkdir()
    for _ in range(400):  # one level at a time: pathlib's mkdir(parents=True) recurses too
        deep = deep / "d"
        deep.mkdir()
    image(deep / "0.png", 50)
    image(train / "dog" / "a" / "1.png", 51)  # before d/ by name
    image(train / "dog" / "z.png", 52)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        files, labels, classes = scan_folder(train)
    finally:
        sys.setrecursionlimit(limit)
    assert classes == ("cat", "dog") and labels == [0, 1, 1, 1]
    assert [f.name for f in files] == ["0.png", "1.png", "0.png", "z.png"]
    assert files[2].parent == deep
    (deep / "0.png").unlink()
    while deep != train / "dog":  # deepest first: pytest's clean-up of old temporary folders at exit recursed on it
        deep.rmdir()
        deep = deep.parent


def test_a_file_given_as_the_image_folder_is_called_a_file():
    """data.root pointing at a file (an archive not yet extracted) was said not to exist."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".tar.gz") as archive:
        with pytest.raises(DataError, match=re.escape(f"image folder '{archive.name}' is a file, not a folder; ")):
            scan_folder(Path(archive.name))
