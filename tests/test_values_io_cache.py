"""The decoded-image cache: a changed folder (an image rewritten in place, another size, another
skip_bad_files) is decoded again, and a cache file is data: a pickle in it runs nothing."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol.core.errors import DataError
from byol.core.image_folder import load_image_folder


class Payload:
    """Unpickling this creates ``target``: what a crafted cache file would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def pixels(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def folder(root: Path) -> Path:
    for k, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(pixels(10 * k + i)).save(root / cls / f"{i}.png")
    return root


def test_an_image_rewritten_in_place_is_decoded_again(tmp_path):
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    first = load_image_folder(data, 8, cache_dir=cache, workers=1)
    assert torch.equal(first.images[0], torch.from_numpy(pixels(0)).permute(2, 0, 1))
    path = data / "cat" / "0.png"
    mtime = path.stat().st_mtime_ns
    Image.fromarray(pixels(99)).save(path)  # same path, same format: another picture
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    second = load_image_folder(data, 8, cache_dir=cache, workers=1)
    assert torch.equal(second.images[0], torch.from_numpy(pixels(99)).permute(2, 0, 1))
    assert torch.equal(second.images[1:], first.images[1:])


def test_another_image_size_is_decoded_again(tmp_path):
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    assert load_image_folder(data, 8, cache_dir=cache, workers=1).images.shape == (4, 3, 8, 8)
    assert load_image_folder(data, 4, cache_dir=cache, workers=1).images.shape == (4, 3, 4, 4)
    assert len(list(cache.iterdir())) == 2


def test_a_cache_made_skipping_bad_files_does_not_hide_them_later(tmp_path):
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    bad = data / "dog" / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert len(load_image_folder(data, 8, cache_dir=cache, skip_bad_files=True, workers=1)) == 4
    with pytest.raises(DataError, match=f"cannot read image '{bad}'"):
        load_image_folder(data, 8, cache_dir=cache, skip_bad_files=False, workers=1)


def test_a_pickle_in_the_in_memory_cache_runs_nothing_and_the_folder_is_decoded_again(tmp_path):
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    clean = load_image_folder(data, 8, cache_dir=cache, workers=1)
    (file,) = cache.iterdir()
    marker = tmp_path / "pwned"
    torch.save({"images": Payload(marker), "labels": clean.labels, "classes": ["cat", "dog"]}, file)
    with pytest.warns(UserWarning, match="cannot be read; not using it"):
        again = load_image_folder(data, 8, cache_dir=cache, workers=1)
    assert not marker.exists()
    assert torch.equal(again.images, clean.images) and again.labels.tolist() == [0, 0, 1, 1]


def test_a_pickle_in_the_mapped_caches_labels_runs_nothing(tmp_path):
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    clean = load_image_folder(data, 8, cache_dir=cache, storage="mmap", workers=1)
    (labels,) = cache.glob("*.labels.pt")
    marker = tmp_path / "pwned"
    torch.save({"labels": Payload(marker), "classes": ["cat", "dog"]}, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_image_folder(data, 8, cache_dir=cache, storage="mmap", workers=1)
    assert not marker.exists()
    assert again.mapped and torch.equal(again.images, clean.images) and again.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("damage", ["truncated", "pickle", "wrong contents"])
def test_a_damaged_in_memory_cache_is_decoded_again_for_the_mapped_path(tmp_path, damage):
    """data.storage=mmap copies the in-memory path's .pt cache when there is one: a damaged one (a traceback
    from torch.load before) is a warning and the folder is decoded again, as on the in-memory path."""
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    clean = load_image_folder(data, 8, cache_dir=cache, storage="memory", workers=1)
    (pt,) = cache.glob("*.pt")
    marker = tmp_path / "pwned"
    if damage == "truncated":
        pt.write_bytes(pt.read_bytes()[:100])
    elif damage == "pickle":
        torch.save({"images": Payload(marker), "labels": torch.zeros(4), "classes": ["cat", "dog"]}, pt)
    else:
        torch.save({"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4)}, pt)
    with pytest.warns(UserWarning, match="cannot be read; not using it"):
        mapped = load_image_folder(data, 8, cache_dir=cache, storage="mmap", workers=1)
    assert not marker.exists()
    assert mapped.mapped and torch.equal(mapped.images, clean.images) and mapped.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("storage", ["memory", "mmap"])
def test_the_cache_keeps_each_images_digest_and_a_later_load_reads_no_pixels_for_them(tmp_path, storage, monkeypatch):
    """The pixel digests that keep copies of an image on one side of the train/val split were computed by every
    evaluation and every run's monitors, reading the whole folder (hours of reads for a folder larger than
    memory); they are kept with the decoded cache, follow subsets and splits, and a cache of an earlier
    version (none kept) or with digests of the wrong shape is hashed as before."""
    from byol.core.data import ImageTensors, image_digests, split_in_place

    root = folder(tmp_path / "images")
    Image.fromarray(pixels(0)).save(root / "dog" / "copy.png")  # a copy of cat/0.png
    first = load_image_folder(root, 8, tmp_path / "cache", storage=storage)
    hashed = image_digests(ImageTensors(first.pixels(), first.labels))  # from the pixels themselves
    assert first.digests is not None and image_digests(first) == hashed and len(set(hashed)) == 4
    again = load_image_folder(root, 8, tmp_path / "cache", storage=storage)  # spot-checks at most 64 of them
    monkeypatch.setattr(ImageTensors, "pixels", lambda *a: pytest.fail("pixels read for the digests"))
    assert image_digests(again) == hashed
    index = torch.tensor([4, 0, 2])
    assert image_digests(again.subset(index)) == [hashed[i] for i in index.tolist()]
    assert image_digests(again.by_reference().subset(index)) == [hashed[i] for i in index.tolist()]
    monkeypatch.undo()
    if storage == "memory":
        held, rest = split_in_place(again, torch.tensor([3, 1]), torch.tensor([0, 2, 4]))
        assert image_digests(held) == [hashed[3], hashed[1]] and image_digests(rest) == [hashed[i] for i in (0, 2, 4)]
    kept_in = ".labels.pt" if storage == "mmap" else ".pt"
    meta = next(p for p in (tmp_path / "cache").iterdir() if p.name.endswith(kept_in))
    saved = torch.load(meta, weights_only=True)
    for digests in (None, saved["digests"][:2]):  # an earlier version's cache; a damaged one
        torch.save({**saved, "digests": digests}, meta)
        older = load_image_folder(root, 8, tmp_path / "cache", storage=storage)
        assert older.digests is None and image_digests(older) == hashed
    # digests of the right shape that are not the images': all zeros (every image a copy: an empty validation
    # split), or another folder's (copies where there are none); found by the spot check: the cache is made again
    for digests in (torch.zeros_like(saved["digests"]), saved["digests"].flip(0)):
        torch.save({**saved, "digests": digests}, meta)
        with pytest.warns(UserWarning, match=r"the images in the cache .* do not match the digests kept with them"):
            edited = load_image_folder(root, 8, tmp_path / "cache", storage=storage)
        assert edited.digests is not None and image_digests(edited) == hashed
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # remade: read without a warning now
            assert image_digests(load_image_folder(root, 8, tmp_path / "cache", storage=storage)) == hashed


@pytest.mark.parametrize("storage", ["memory", "mmap"])
def test_a_cache_with_damaged_pixels_is_decoded_again_not_trained_on(tmp_path, storage):
    """Pixels changed in the cache file after it was written (the digests kept with them untouched): the spot
    check finds it and the folder's own images come back, the cache rewritten, with one warning naming it.
    (Before, only the digests were dropped and the damaged pixels went on to train and evaluate.)"""
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    clean = load_image_folder(data, 8, cache_dir=cache, storage=storage, workers=1)
    expected = clean.images.clone()
    if storage == "mmap":
        (npy,) = cache.glob("*.u8.npy")
        pixels = np.load(npy, mmap_mode="r+")
        pixels[0], pixels[-1] = 0, 255
        pixels.flush()
        del pixels
        damaged = npy
    else:
        (damaged,) = cache.glob("*.pt")
        saved = torch.load(damaged, weights_only=True)
        saved["images"][0], saved["images"][-1] = 0, 255
        torch.save(saved, damaged)
    with pytest.warns(UserWarning, match=f"the images in the cache {damaged} do not match the digests"):
        again = load_image_folder(data, 8, cache_dir=cache, storage=storage, workers=1)
    assert torch.equal(again.images, expected) and again.labels.tolist() == [0, 0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache is read as it is
        assert torch.equal(load_image_folder(data, 8, cache_dir=cache, storage=storage, workers=1).images, expected)


def test_a_same_size_image_replaced_with_its_mtime_restored_is_decoded_again(tmp_path):
    """The key held each file's size and mtime only: an image replaced by another of the same size (a BMP of
    the same resolution) with its mtime restored (cp -p, rsync -t, tar x, touch -r) was served from the old
    cache. Its ctime, which no one can set, and its inode are in the key now."""
    data, cache = tmp_path / "train", tmp_path / "cache"
    for k, cls in enumerate(("cat", "dog")):
        (data / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(pixels(10 * k + i)).save(data / cls / f"{i}.bmp")
    first = load_image_folder(data, 8, cache_dir=cache, workers=1)
    assert torch.equal(first.images[0], torch.from_numpy(pixels(0)).permute(2, 0, 1))
    path = data / "cat" / "0.bmp"
    before = path.stat()
    time.sleep(0.05)  # past the coarse clock tick that stamps ctime
    Image.fromarray(pixels(99)).save(path)  # rewritten in place: same inode, same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # what cp -p and touch -r do
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    second = load_image_folder(data, 8, cache_dir=cache, workers=1)
    assert torch.equal(second.images[0], torch.from_numpy(pixels(99)).permute(2, 0, 1))
    assert torch.equal(second.images[1:], first.images[1:])


@pytest.mark.parametrize("storage", ["memory", "mmap"])
@pytest.mark.parametrize("wrong", ["fewer rows", "another size", "another dtype"])
def test_an_earlier_versions_cache_of_the_wrong_shape_is_decoded_again(tmp_path, storage, wrong):
    """An earlier version's cache (no digests to check it by) was used as it was: a .u8.npy of 30 rows beside
    40 labels, or of 16-px images in a 32-px run, was trained on. Its shape and dtype are checked on every read
    now: the folder is decoded again, with one line saying why."""
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    clean = load_image_folder(data, 8, cache_dir=cache, storage=storage, workers=1)
    expected = clean.images.clone()
    images = {"fewer rows": expected[:3], "another size": torch.zeros(4, 3, 16, 16, dtype=torch.uint8),
              "another dtype": expected.float()}[wrong]
    meta = next(p for p in cache.iterdir() if p.name.endswith(".labels.pt" if storage == "mmap" else ".pt"))
    saved = {k: v for k, v in torch.load(meta, weights_only=True).items() if k != "digests"}  # as written before
    if storage == "mmap":
        (npy,) = cache.glob("*.u8.npy")
        np.save(npy, images.numpy())
        torch.save(saved, meta)
        source = npy
    else:
        torch.save({**saved, "images": images}, meta)
        source = meta
    want = re.escape("(4, 3, 8, 8) torch.uint8")
    with pytest.warns(UserWarning, match=rf"^the cache {re.escape(str(source))} holds .* not {want} .* the cache is "
                                         r"made again$"):
        again = load_image_folder(data, 8, cache_dir=cache, storage=storage, workers=1)
    assert torch.equal(again.images, expected) and again.labels.tolist() == [0, 0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remade: read as it is
        assert torch.equal(load_image_folder(data, 8, cache_dir=cache, storage=storage, workers=1).images, expected)


@pytest.mark.parametrize("storage", ["memory", "mmap"])
def test_the_files_a_decode_skipped_are_named_again_when_its_cache_is_read(tmp_path, storage):
    """With data.skip_bad_files=true only the decoding run named the unreadable files; later runs read the cache
    and trained on fewer images without a word. The cache keeps their names, and every read says so in a line."""
    data, cache = folder(tmp_path / "train"), tmp_path / "cache"
    for name in ("bad1.png", "bad2.png"):
        (data / "dog" / name).write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        first = load_image_folder(data, 8, cache_dir=cache, skip_bad_files=True, storage=storage, workers=1)
    assert len(first) == 4
    for other in ("memory", "mmap"):  # its own cache, and the other storage's read or copy of it
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            again = load_image_folder(data, 8, cache_dir=cache, skip_bad_files=True, storage=other, workers=1)
        assert len(again) == 4 and torch.equal(again.images, first.images)
        assert [str(w.message) for w in said] == [
            f"2 unreadable image(s) of '{data}' left out, skipped when its cache was decoded "
            f"(data.skip_bad_files=true): dog/bad1.png, dog/bad2.png; replace or remove them (the folder is then "
            f"decoded again)"]
