"""Datasets as uint8 tensors (N, 3, H, W), and batches sampled by index on the training device.

Decoding images once and keeping them as one tensor (150 MB for CIFAR-10's training set)
removes the DataLoader worker pipeline that starves BYOL on small images: a batch is an
index into that tensor, and augmentation happens on the device (``byol.augment``).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from byol.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ImageTensors:
    """Images (N, 3, H, W) uint8 and labels (N,) int64 (-1 where unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> ImageTensors:
        return ImageTensors(self.images[index], self.labels[index], self.classes)

    def to(self, device) -> ImageTensors:
        return ImageTensors(self.images.to(device), self.labels.to(device), self.classes)


# --------------------------------------------------------------------------- CIFAR-10


def load_cifar10(root: str, train: bool, download: bool = True) -> ImageTensors:
    """CIFAR-10 through torchvision (downloaded into ``root`` when missing)."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root, train=train, download=download)
    except Exception as e:  # no network, or a damaged archive
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        get = ("let the download run on a machine with internet access" if download
               else "set data.download=true (needs internet access)")
        raise DataError(
            f"could not load CIFAR-10 from '{Path(root).resolve()}' ({type(e).__name__}: {reason}). Either "
            f"{get}, copy the extracted 'cifar-10-batches-py' folder into that folder, or use an image "
            f"folder instead: data=imagefolder data.root=DIR (DIR/train/<class>/*.png)"
        ) from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return ImageTensors(images, torch.tensor(ds.targets, dtype=torch.long), CIFAR10_CLASSES)


# --------------------------------------------------------------------------- image folders


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def scan_folder(folder: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of ``folder/<class>/*``; a flat folder of images gives label -1."""
    if not folder.is_dir():
        raise DataError(f"image folder '{folder}' does not exist; set data.root to a folder laid out as "
                        f"DIR/train/<class>/*.jpg (or a flat folder of images for pretraining)")
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).rglob("*") if _is_image(p))
        files += found
        labels += [label] * len(found)
    flat = sorted(p for p in folder.iterdir() if _is_image(p))
    if flat and not files:
        return flat, [-1] * len(flat), ()
    if not files:
        raise DataError(f"no images found in '{folder}' (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                        f"in class subfolders or directly inside it)")
    return files, labels, classes


def _to_rgb(im):
    """Any PIL image as 8-bit RGB: grayscale, palette, CMYK and RGBA (alpha dropped, as
    torchvision's loader) through ``convert``; 16-bit and float grayscale rescaled first, which
    ``convert`` would clip to white."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode != "F":
            a = a / 257.0  # 16 bits -> 8 bits
        elif a.max() <= 1.0:
            a = a * 255.0  # float image in [0, 1]
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def _decode(path: Path, size: int, skip_bad: bool) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = _to_rgb(im)
            if im.size != (size, size):
                im = _resize_center(im, size)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        if skip_bad:
            warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None
        raise DataError(f"cannot read image '{path}' ({e}). Remove or replace the file, or set "
                        f"data.skip_bad_files=true to skip unreadable files with a warning") from None


def _resize_center(im, size: int):
    """Resize the short side to ``size`` then centre-crop to a square."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _cache_key(folder: Path, files: list[Path], size: int, skip_bad: bool) -> str:
    h = hashlib.sha256(f"{folder.resolve()}|{size}|{skip_bad}|v1".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_image_folder(
    folder: str | os.PathLike,
    size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_files: bool = False,
    workers: int = 8,
) -> ImageTensors:
    """Decode every image of a folder once into a uint8 tensor, cached on disk.

    The cache file is keyed by the folder's content (paths, sizes, modification times) and
    the image size, so a changed folder is decoded again and an unchanged one loads in seconds.
    """
    folder = Path(folder)
    files, labels, classes = scan_folder(folder)
    cache = None
    if cache_dir:
        key = _cache_key(folder, files, size, skip_bad_files)
        cache = Path(cache_dir).expanduser() / f"{folder.name}-{key}.pt"
        if cache.exists():
            try:
                d = torch.load(cache, weights_only=True)
                return ImageTensors(d["images"], d["labels"], tuple(d["classes"]))
            except Exception:
                warnings.warn(f"ignoring unreadable cache {cache}; decoding again", stacklevel=2)
    print(f"[data] decoding {len(files)} images from {folder} (once; cached afterwards)", flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: _decode(p, size, skip_bad_files), files))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        raise DataError(f"none of the {len(files)} images in '{folder}' could be read")
    images = torch.from_numpy(np.stack([arrays[i] for i in keep]))
    data = ImageTensors(images, torch.tensor([labels[i] for i in keep], dtype=torch.long), classes)
    if cache is not None:
        from byol.checkpoint import atomic_torch_save

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"images": data.images, "labels": data.labels, "classes": list(classes)}, cache)
    return data


# --------------------------------------------------------------------------- synthetic


def make_synthetic(n: int, size: int = 32, num_classes: int = 4, seed: int = 0) -> ImageTensors:
    """Tiny learnable data for tests and demos: class k is a stripe pattern of frequency k+1
    and a class colour, with random phase, orientation and noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    vertical = (torch.rand(n, 1, 1, generator=g) < 0.5).float()
    coord = vertical * yy + (1 - vertical) * xx
    freq = (labels.float() + 1).view(n, 1, 1) * 2 * math.pi
    pattern = 0.5 + 0.5 * torch.sin(freq * coord + phase)
    hue = torch.stack([torch.cos(2 * math.pi * labels / num_classes + s) for s in (0.0, 2.1, 4.2)], 1)
    color = 0.5 + 0.4 * hue.view(n, 3, 1, 1)
    img = pattern.unsqueeze(1) * color + 0.1 * torch.randn(n, 3, size, size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageTensors(images, labels.long(), tuple(f"class{k}" for k in range(num_classes)))



# --------------------------------------------------------------------------- selection


def load_split(cfg, split: str) -> ImageTensors:
    """``split`` of the dataset described by ``cfg`` (the ``data`` config group).

    ``train`` and ``test`` are the dataset's own splits; see :func:`eval_splits` for
    the validation split.
    """
    name = cfg["name"]
    if name == "cifar10":
        return load_cifar10(cfg["root"], train=split == "train", download=cfg.get("download", True))
    if name == "imagefolder":
        root = Path(cfg["root"])
        if not root.exists():
            raise DataError(f"data.root '{root}' does not exist; point data.root at a folder laid out as "
                            f"DIR/train/<class>/* (and DIR/test/<class>/* for evaluation)")
        folder = root / split
        if not folder.is_dir():
            if split == "train":
                folder = root  # a plain folder of images or of class folders
            else:
                raise DataError(f"no '{split}' folder in '{root}'; evaluation needs {root}/{split}/<class>/*")
        return load_image_folder(folder, cfg["image_size"], cfg.get("cache_dir"),
                                 cfg.get("skip_bad_files", False))
    if name == "synthetic":
        n = cfg["num_train"] if split == "train" else cfg["num_test"]
        return make_synthetic(n, cfg["image_size"], cfg["num_classes"], seed=0 if split == "train" else 1)
    raise DataError(f"unknown data.name '{name}'; choose cifar10, imagefolder or synthetic")


def seeded_subset(data: ImageTensors, n: int | None, seed: int) -> ImageTensors:
    """``n`` images chosen with a fixed seed (all of them when ``n`` is None or too large)."""
    if not n or n >= len(data):
        return data
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[:n])


def eval_splits(cfg, seed: int = 0) -> dict[str, ImageTensors]:
    """train / val / test for evaluation, without leaking the test set into validation.

    ``data.split=holdout`` (default): ``data.val_size`` training images (seeded) are held
    out as validation. ``data.split=seed_original``: the original project's split of the
    test set into two halves with seed 42 (val: first half, test: second half).
    """
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    if len(train.classes) and len(test.classes) and train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(f"train and test class folders differ (only in train: {only_train or 'none'}; "
                        f"only in test: {only_test or 'none'}); both splits need the same <class> "
                        f"subfolders: add, rename or remove folders")
    split = cfg.get("split", "holdout")
    if split == "seed_original":
        perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(42))
        half = len(test) // 2
        return {"train": seeded_subset(train, cfg.get("subset"), seed), "val": test.subset(perm[:half]),
                "test": test.subset(perm[half:])}
    if split != "holdout":
        raise DataError(f"unknown data.split '{split}'; choose holdout or seed_original")
    val_size = min(int(cfg.get("val_size", 0)), len(train) // 5)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
    val, rest = train.subset(perm[:val_size]), train.subset(perm[val_size:])
    return {"train": seeded_subset(rest, cfg.get("subset"), seed), "val": val, "test": test}


# --------------------------------------------------------------------------- batching


class IndexBatches:
    """Shuffled batches of a tensor dataset, drawn by index: no DataLoader, no workers.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``. ``progress``, when
    given, returns ``(epoch, batches already done in it)`` from the trainer at the start of
    each pass, so a run resumed mid-epoch continues with exactly the batches the
    uninterrupted run would have seen, with no loader state to save.
    """

    def __init__(self, data: ImageTensors, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, progress=None):
        if batch_size > len(data) and drop_last:
            raise DataError(f"data.batch_size={batch_size} is larger than the dataset ({len(data)} images), "
                            f"so an epoch would have no full batch; set data.batch_size to at most "
                            f"{len(data)} or use more images (a larger data.subset, or data.subset=null)")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle, self.drop_last, self.progress = shuffle, drop_last, progress
        self._passes = 0

    def to(self, device) -> IndexBatches:
        self.data = self.data.to(device)
        return self

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.data))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.data), generator=gen)

    def __iter__(self):
        epoch, start = self.progress() if self.progress else (self._passes, 0)
        self._passes += 1
        order = self.order(epoch).to(self.data.images.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.data.images[idx], self.data.labels[idx]
