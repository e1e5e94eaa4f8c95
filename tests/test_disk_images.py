"""Data larger than memory: the memory-mapped cache gives the same batches as the in-memory path."""

import numpy as np
import pytest
import torch
from in_process import run_here
from PIL import Image

from byol.core.backbone import Encoder
from byol.core.data import IndexBatches, image_digests, make_synthetic
from byol.core.disk_images import MmapBatches, batches_of, choose_storage, open_images, write_images
from byol.core.errors import DataError
from byol.core.features import extract_features
from byol.core.image_folder import load_image_folder
from byol.jobs.datasets import load_eval_data


def _mapped(tmp_path, n=103, size=8):
    data = make_synthetic(n, size, num_classes=3)
    path = tmp_path / "images.npy"
    assert write_images((a.numpy() for a in data.images), n, (3, size, size), path) == list(range(n))
    images = open_images(path)
    return data, type(data)(images, data.labels, data.classes, mapped=True)


def _all(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.dtype == xb.dtype == torch.uint8
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("shuffle,drop_last", [(True, True), (False, False)])
def test_mmap_batches_equal_in_memory_batches(tmp_path, shuffle, drop_last):
    data, mapped = _mapped(tmp_path)
    memory = IndexBatches(data, 16, seed=3, shuffle=shuffle, drop_last=drop_last)
    disk = MmapBatches(mapped, 16, seed=3, shuffle=shuffle, drop_last=drop_last, prefetch=2)
    assert len(memory) == len(disk)
    for _ in range(3):  # epochs 0, 1, 2: a new order each
        _same(_all(memory), _all(disk))


def test_mmap_batches_resume_mid_epoch(tmp_path):
    data, mapped = _mapped(tmp_path)
    full = _all(IndexBatches(data, 10, seed=7, progress=lambda: (4, 0)))
    for start in (0, 3, 9):
        resumed = MmapBatches(mapped, 10, seed=7, progress=lambda s=start: (4, s))
        _same(_all(resumed), full[start:])
    assert _all(MmapBatches(mapped, 10, seed=7, progress=lambda: (4, 10))) == []  # epoch already done


def test_mmap_batches_stop_early_and_errors(tmp_path):
    _, mapped = _mapped(tmp_path)
    batches = MmapBatches(mapped, 4, prefetch=1)
    for i, _ in enumerate(batches):  # leaving the loop early ends the reader thread
        if i == 2:
            break
    assert len(_all(batches)) == len(batches)
    broken = MmapBatches(mapped, 4)
    broken.images = mapped.images[:8]  # rows missing: the reader's error reaches the caller
    with pytest.raises((IndexError, RuntimeError)):
        _all(broken)


def test_write_images_skips_unreadable(tmp_path):
    arrays = [np.full((3, 2, 2), i, np.uint8) if i % 3 else None for i in range(7)]
    kept = write_images(iter(arrays), 7, (3, 2, 2), tmp_path / "x.npy")
    assert kept == [1, 2, 4, 5]
    assert open_images(tmp_path / "x.npy")[:, 0, 0, 0].tolist() == kept


def test_choose_storage():
    assert choose_storage("auto", 10, 5) == "mmap" and choose_storage("auto", 5, 5) == "memory"
    assert choose_storage("memory", 10, 5) == "memory" and choose_storage("mmap", 1, 5) == "mmap"
    with pytest.raises(DataError):
        choose_storage("disk", 1, 5)


def _folder(root, n=12):
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = root / f"c{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    return root


@pytest.mark.parametrize("memory_first", [True, False])
def test_image_folder_mmap_equals_memory(tmp_path, memory_first):
    folder, cache = _folder(tmp_path / "imgs"), tmp_path / "cache"
    order = ["memory", "mmap"] if memory_first else ["mmap", "memory"]  # mmap from the .pt cache, or decoded
    loaded = {s: load_image_folder(folder, 8, cache, storage=s, workers=2) for s in order}
    memory, mapped = loaded["memory"], loaded["mmap"]
    assert mapped.mapped and not memory.mapped and mapped.classes == memory.classes
    assert torch.equal(mapped.images, memory.images) and torch.equal(mapped.labels, memory.labels)
    again = load_image_folder(folder, 8, cache, storage="auto", mmap_above=0)  # from the .npy cache
    assert again.mapped and torch.equal(again.images, memory.images)
    assert not load_image_folder(folder, 8, cache, storage="auto").mapped  # small: in memory
    _same(_all(IndexBatches(memory, 5, seed=1)), _all(MmapBatches(mapped, 5, seed=1)))
    with pytest.raises(DataError, match="cache_dir"):
        load_image_folder(folder, 8, None, storage="mmap")


def test_memory_storage_reads_an_existing_mmap_cache_instead_of_decoding_again(tmp_path, monkeypatch, capsys):
    """A folder decoded once for data.storage=mmap (or auto above the threshold) is not decoded again for the
    in-memory path: its .npy cache is read into memory (the dataset's own tensor, not the file's), with its
    labels, classes and kept digests; without that cache the folder is decoded as before."""
    import byol.core.image_folder as image_folder

    folder, cache = _folder(tmp_path / "imgs"), tmp_path / "cache"
    mapped = load_image_folder(folder, 8, cache, storage="mmap", workers=2)
    decoded = []
    real = image_folder._decoded
    monkeypatch.setattr(image_folder, "_decoded", lambda *a, **k: decoded.append(1) or real(*a, **k))
    capsys.readouterr()
    memory = load_image_folder(folder, 8, cache, storage="memory", workers=2)
    assert not decoded and "from the memory-mapped cache" in capsys.readouterr().out
    assert not memory.mapped and torch.equal(memory.images, mapped.images)
    assert memory.images.data_ptr() != mapped.images.data_ptr()  # its own memory: the file can go
    assert torch.equal(memory.labels, mapped.labels) and memory.classes == mapped.classes
    assert memory.digests is not None and torch.equal(memory.digests, mapped.digests)
    load_image_folder(folder, 8, tmp_path / "other_cache", storage="memory", workers=2)
    assert decoded  # no cache of either kind: decoded


def test_mmap_batches_sharded_like_index_batches(tmp_path):
    data, mapped = _mapped(tmp_path)
    for rank in range(2):
        memory = IndexBatches(data, 8, seed=2).shard(rank, 2)
        _same(_all(memory), _all(MmapBatches(mapped, 8, seed=2).shard(rank, 2)))


def test_a_subset_of_mapped_images_stays_mapped_and_reads_the_same_images(tmp_path):
    """Splits and subsets of a dataset larger than memory must not copy it into memory: they keep row
    numbers into the file, and read the same images the in-memory dataset's subsets hold."""
    data, mapped = _mapped(tmp_path)
    first = torch.randperm(103, generator=torch.Generator().manual_seed(0))[:60]
    second = torch.tensor([59, 0, 7, 7, 31])
    sub = mapped.subset(first).subset(second)
    assert sub.mapped and sub.images is mapped.images and len(sub) == 5  # nothing read, the file kept
    assert torch.equal(sub.row_numbers(), first[second])
    expected = data.subset(first).subset(second)
    assert torch.equal(sub.pixels(), expected.images) and torch.equal(sub.labels, expected.labels)
    assert torch.equal(sub.pixels(slice(1, 3)), expected.images[1:3])
    moved = sub.to("cpu")  # a sample moved to the device is read into memory
    assert not moved.mapped and torch.equal(moved.images, expected.images)
    assert image_digests(sub) == image_digests(expected)
    for rank in range(2):  # training batches of the subset, also sharded, read from the file
        _same(_all(IndexBatches(data.subset(first), 8, seed=2).shard(rank, 2)),
              _all(MmapBatches(mapped.subset(first), 8, seed=2).shard(rank, 2)))
    _same(_all(IndexBatches(data.subset(first), 7, shuffle=False, drop_last=False)),
          _all(batches_of(mapped.subset(first), 7, shuffle=False, drop_last=False)))
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "imagenet", width=0.25)
    for images, dataset in ((expected.images, sub), (data.images[first], mapped.subset(first))):
        assert torch.equal(extract_features(encoder, images, ["avgpool"], [0.5] * 3, [0.25] * 3, batch_size=4),
                           extract_features(encoder, dataset, ["avgpool"], [0.5] * 3, [0.25] * 3, batch_size=4))


def test_evaluation_splits_of_a_mapped_folder_stay_mapped_and_equal_the_in_memory_ones(tmp_path):
    """The online monitors and evaluate.py split the training folder: with data.storage=mmap the splits
    (and data.subset) are row numbers into the file, holding the images the in-memory splits hold."""
    root = tmp_path / "data"
    _folder(root / "train", n=30)
    _folder(root / "test", n=9)
    splits = {}
    for storage in ("memory", "mmap"):
        cfg = {"name": "imagefolder", "root": str(root), "image_size": 8, "cache_dir": str(tmp_path / "cache"),
               "storage": storage, "subset": 20}
        splits[storage], _ = load_eval_data(cfg, {"name": "holdout", "val_size": 5}, seed=3)
    for name in ("train", "val", "test"):
        memory, mapped = splits["memory"][name], splits["mmap"][name]
        assert mapped.mapped and not memory.mapped and len(mapped) == len(memory) > 0
        assert torch.equal(mapped.pixels(), memory.images) and torch.equal(mapped.labels, memory.labels)
    assert len(splits["mmap"]["train"]) == 20


@pytest.mark.slow
def test_training_on_the_mmap_cache_equals_training_in_memory(tmp_path):
    """End to end: the same run, once from the in-memory tensor and once from the memory-mapped
    cache, ends with bit-identical encoder weights (the steps received the same batches) and the same
    online kNN scores; data.subset and the monitors' splits of the mapped folder stay on disk."""
    import csv

    import yaml
    from conftest import ROOT

    folder = _folder(tmp_path / "imgs" / "train", n=60)
    _folder(tmp_path / "imgs" / "test", n=12)
    args = ["-m", "experiment=smoke", "data=imagefolder", f"data.root={folder.parent}", "data.batch_size=16",
            f"data.cache_dir={tmp_path / 'cache'}", "data.storage=memory,mmap", "data.image_size=16",
            "data.subset=40", "trainer.max_epochs=2", "trainer.precision=32-true", "trainer.deterministic=true",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # one sweep: the two runs in one process, one after the other
    proc = run_here(str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {yaml.safe_load((run / "config.yaml").read_text())["data"]["storage"]: run
            for run in (tmp_path / "sweep").glob("*_*")}
    weights = {storage: torch.load(run / "encoder.pt", weights_only=False) for storage, run in runs.items()}
    assert len(list((tmp_path / "cache").glob("*.u8.npy"))) == 2  # train and test
    memory, mapped = weights["memory"]["state_dict"], weights["mmap"]["state_dict"]
    assert memory.keys() == mapped.keys() and all(torch.equal(memory[k], mapped[k]) for k in memory)
    knn = {storage: [row for row in csv.DictReader((run / "metrics.csv").open()) if row.get("monitor/knn/avgpool")]
           for storage, run in runs.items()}
    assert len(knn["memory"]) == 3  # before the first step, and after each epoch
    assert [r["monitor/knn/avgpool"] for r in knn["memory"]] == [r["monitor/knn/avgpool"] for r in knn["mmap"]]
    assert proc.stdout.count("[byol] online monitors: kNN of 12 test images against 40 training images") == 2
