"""Datasets as uint8 tensors (N, 3, H, W), and batches sampled by index on the training device.

Decoding images once and keeping them as one tensor (150 MB for CIFAR-10's training set)
removes the DataLoader worker pipeline that starves BYOL on small images: a batch is an
index into that tensor, and augmentation happens on the device (``byol.core.augment``).
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

from byol.core.errors import DataError

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


@dataclass
class _Scan:
    """An image folder's files, each counted once, with their labels and real paths."""

    files: list[Path]
    labels: list[int]
    classes: tuple[str, ...]
    real: list[str]  # each file's resolved path (symlinks followed)


def _contains(outer: str, inner: str) -> bool:
    """Whether real path ``inner`` is ``outer`` or below it."""
    return os.path.commonpath([outer, inner]) == outer


def _scan(folder: Path) -> _Scan:
    """Walk ``folder/<class>/**`` (or a flat folder of images) once, following symlinks safely.

    Hidden files and folders (names starting with '.', such as macOS '._*' resource forks and
    '.DS_Store') are skipped everywhere. A symlinked folder is followed unless it resolves to
    the dataset folder or a folder above it (a link cycle: every image again) or to a folder
    already scanned (images counted twice); those are skipped with one printed line each. A
    file reached through several paths (file symlinks) is counted once, at its own place when
    it has one in the dataset, else at its first path in sorted order.
    """
    if not folder.is_dir():
        raise DataError(f"image folder '{folder}' does not exist; set data.root to a folder laid out as "
                        f"DIR/train/<class>/*.jpg (or a flat folder of images for pretraining)")
    root = os.path.realpath(folder)
    scanned = {root}  # real paths of the folders walked
    found: list[tuple[str | None, Path, str, bool]] = []  # (class, path, real path, through a file link)
    nested: list[tuple[Path, str | None]] = []  # symlinked folders met on the way, followed last
    skipped: list[str] = []

    def walk(path: Path, real: str, cls: str | None, top: bool = False) -> list[tuple[Path, str]]:
        """Images below ``path`` (whose real path is ``real``); at the top, the class folders."""
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if top:
                raise DataError(f"cannot read image folder '{path}' ({e.strerror}); check its permissions "
                                f"or point data.root elsewhere") from None
            print(f"[data] skipping unreadable folder '{path}' ({e.strerror})", flush=True)
            return []
        subfolders = []
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            try:
                link, is_dir = e.is_symlink(), e.is_dir()
            except OSError:
                continue
            if is_dir and link:
                if not top:
                    nested.append((p, cls))
                else:
                    subfolders.append((p, ""))
            elif is_dir:
                sub = os.path.join(real, e.name)
                if top:
                    subfolders.append((p, sub))
                elif sub not in scanned:
                    scanned.add(sub)
                    walk(p, sub, cls)
            elif p.suffix.lower() in IMAGE_EXTENSIONS and e.is_file():
                found.append((cls, p, os.path.realpath(p) if link else os.path.join(real, e.name), link))
        return subfolders

    def follow(link: Path) -> str | None:
        """The real path of a symlinked folder to walk, or None (skipped, with a line)."""
        target = os.path.realpath(link)
        if _contains(target, root):
            why = ("it is the dataset folder or a folder above it (a link cycle); its images would be "
                   "counted twice")
        elif target in scanned:
            why = "that folder is already part of the dataset; its images are counted once"
        else:
            scanned.add(target)
            return target
        print(f"[data] skipping symlinked folder '{link}' -> '{target}': {why}", flush=True)
        skipped.append(str(link.relative_to(folder)))
        return None

    top = walk(folder, root, None, top=True)
    classes = []
    for path, real in top:  # plain class folders first: a link to one of them is the duplicate
        if real:
            scanned.add(real)
            classes.append(path.name)
            walk(path, real, path.name)
    for path, real in top:
        if not real and (target := follow(path)) is not None:
            classes.append(path.name)
            walk(path, target, path.name)
    i = 0
    while i < len(nested):  # walking a linked folder may meet further links
        path, cls = nested[i]
        if (target := follow(path)) is not None:
            walk(path, target, cls)
        i += 1

    classes = sorted(classes)
    label = {c: k for k, c in enumerate(classes)}
    in_classes = [f for f in found if f[0] is not None]
    chosen = in_classes or [f for f in found if f[0] is None]
    chosen.sort(key=lambda f: (label.get(f[0], -1), f[1]))
    own = {real for _, _, real, link in chosen if not link}
    files, labels, reals, seen = [], [], [], set()
    for cls, path, real, link in chosen:
        if real in seen or (link and real in own):
            continue
        seen.add(real)
        files.append(path)
        labels.append(label[cls] if cls is not None else -1)
        reals.append(real)
    if len(chosen) > len(files):
        n = len(chosen) - len(files)
        print(f"[data] {n} {'file' if n == 1 else 'files'} reached through more than one path (symlinks) "
              f"{'is' if n == 1 else 'are'} counted once", flush=True)
    if not files:
        note = f"; symlinked folders skipped: {', '.join(skipped)}" if skipped else ""
        raise DataError(f"no images found in '{folder}' (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                        f"in class subfolders or directly inside it{note})")
    if not in_classes:
        classes = []
    return _Scan(files, labels, tuple(classes), reals)


def scan_folder(folder: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of ``folder/<class>/*``; a flat folder of images gives label -1.

    Each image is counted once however many symlinks lead to it; hidden files and folders are
    skipped (see :func:`_scan`).
    """
    scan = _scan(folder)
    return scan.files, scan.labels, scan.classes


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


def _cache_key(folder: Path, scan: _Scan, size: int, skip_bad: bool) -> str:
    """What the decoded tensors depend on: the class list (an empty class folder shifts the
    labels), and per file its path, label, real path (where a symlink leads), size and mtime."""
    h = hashlib.sha256(f"{folder.resolve()}|{size}|{skip_bad}|v2|{list(scan.classes)}\n".encode())
    for f, label, real in zip(scan.files, scan.labels, scan.real, strict=True):
        st = os.stat(real)
        h.update(f"{f.relative_to(folder)}|{label}|{real}|{st.st_size}|{st.st_mtime_ns}\n".encode())
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
    scan = _scan(folder)
    files, labels, classes = scan.files, scan.labels, scan.classes
    cache = None
    if cache_dir:
        key = _cache_key(folder, scan, size, skip_bad_files)
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
        from byol.core.checkpoint import atomic_torch_save

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


def image_digests(data: ImageTensors) -> list[bytes]:
    """The SHA-256 of each image's decoded uint8 pixels: equal for byte-identical files (and for
    any two files that decode to the same pixels), distinct otherwise. About 0.3 s for the
    50,000 CIFAR-10 training images on one core (decoding them takes about 15 s)."""
    rows = data.images.reshape(len(data), -1).cpu().contiguous().numpy()
    return [hashlib.sha256(row).digest() for row in rows]


def holdout(perm: torch.Tensor, digests: list[bytes], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(val, rest)``: about ``size`` indices held out in the order of ``perm``, keeping every
    group of identical images (same digest) whole, on one side.

    Groups are taken in the order their first image appears in ``perm``; a group that would
    overshoot ``size`` stays in ``rest``. Without identical images this is ``perm[:size]``,
    ``perm[size:]``.
    """
    count: dict[bytes, int] = {}
    for d in digests:
        count[d] = count.get(d, 0) + 1
    if len(count) == len(digests):
        return perm[:size], perm[size:]
    held: dict[bytes, bool] = {}
    taken = 0
    for i in perm.tolist():
        if taken == size:
            break
        d = digests[i]
        if d not in held:
            held[d] = taken + count[d] <= size
            taken += count[d] if held[d] else 0
    mask = torch.tensor([held.get(digests[i], False) for i in perm.tolist()], dtype=torch.bool)
    return perm[mask], perm[~mask]


def _train_folder(cfg) -> str:
    if cfg["name"] != "imagefolder":
        return "the training set"
    root = Path(cfg["root"])
    return f"'{root / 'train' if (root / 'train').is_dir() else root}'"


def eval_splits(cfg, seed: int = 0) -> dict[str, ImageTensors]:
    """train / val / test for evaluation, without leaking the test set into validation.

    ``data.split=holdout`` (default): ``data.val_size`` training images (seeded) are held
    out as validation; identical images (same decoded pixels: copies of a file) are kept on
    one side of that split. ``data.split=seed_original``: the original project's split of the
    test set into two halves with seed 42 (val: first half, test: second half). Test images
    identical to training images are counted in a warning.
    """
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    if len(train.classes) and len(test.classes) and train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(f"train and test class folders differ (only in train: {only_train or 'none'}; "
                        f"only in test: {only_test or 'none'}); both splits need the same <class> "
                        f"subfolders: add, rename or remove folders")
    digests = image_digests(train)
    known = set(digests)
    leaked = sum(d in known for d in image_digests(test))
    if leaked:
        print(f"[data] warning: {leaked} of the {len(test)} test images {'is' if leaked == 1 else 'are'} "
              f"identical to training images (same pixels as images in {_train_folder(cfg)}); test "
              f"accuracy will be optimistic: remove the copies from one of the folders", flush=True)
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
    if len(known) < len(train):
        n = len(train) - len(known)
        copies = "image is a copy of another" if n == 1 else "images are copies of others"
        print(f"[data] {n} training {copies} (same pixels); each set of copies stays on one side of the "
              f"train/val split", flush=True)
    held, rest = holdout(perm, digests, val_size)
    val, rest = train.subset(held), train.subset(rest)
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
