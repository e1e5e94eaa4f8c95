"""Image folders decoded once into ``ImageTensors``: scanning, decoding, resizing, and the cache.

A folder is ``<class>/**`` (or a flat folder of images for pretraining). The scan is careful
because a folder can silently mislead: symlinks that reach the same images twice or loop back
to the dataset, and hidden files (macOS '._*' resource forks, '.DS_Store') that are not images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from byol.core.data import ImageTensors
from byol.core.disk_images import choose_storage, decoded_bytes, open_images, write_images
from byol.core.errors import CheckpointError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Folders that archivers add beside the images (macOS zips: resource forks of every file): never a class
SKIPPED_FOLDERS = ("__MACOSX",)
# The decoders Pillow may use, whatever a file's name: Pillow picks the decoder from the content, and some
# (EPS runs Ghostscript on the file) must never see a file handed to us. JPEG includes cameras' MPO files.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF")


# --------------------------------------------------------------------------- scanning


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


class _Found(NamedTuple):
    """An image met on the walk: its class (None at the top of a flat folder), the path it was
    reached by, its real path, and whether that path is a file symlink."""

    cls: str | None
    path: Path
    real: str
    link: bool


class _Scanner:
    """One walk of an image folder, and what it has seen so far.

    The walk reads each real folder once (``scanned``), records the images it meets
    (``found``) and defers the symlinked folders met below the top (``nested``) until the
    plain folders are read, so that a link to a folder of the dataset is the one skipped.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.root = os.path.realpath(folder)
        self.scanned = {self.root}  # real paths of the folders walked
        self.found: list[_Found] = []
        self.nested: list[tuple[Path, str | None]] = []  # symlinked folders met on the way, followed last
        self.skipped: list[str] = []  # symlinked folders not followed, for the "no images" message

    def entries(self, path: Path, top: bool) -> list[os.DirEntry]:
        """The entries of ``path`` by name; unreadable is an error at the top, a skipped folder below."""
        try:
            with os.scandir(path) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            if top:
                raise DataError(f"cannot read image folder '{path}' ({e.strerror}); check its permissions "
                                f"or point data.root elsewhere") from None
            print(f"[data] skipping unreadable folder '{path}' ({e.strerror})", flush=True)
            return []

    def walk(self, path: Path, real: str, cls: str | None, top: bool = False) -> list[tuple[Path, str]]:
        """Record the images below ``path`` (whose real path is ``real``) as class ``cls``.

        At the top, subfolders are classes and are returned rather than walked, as
        ``(path, real path)``, with "" as the real path of a symlinked one.
        """
        subfolders = []
        for e in self.entries(path, top):
            if e.name.startswith(".") or e.name in SKIPPED_FOLDERS:
                continue
            p = Path(e.path)
            try:
                link, is_dir = e.is_symlink(), e.is_dir()
            except OSError:
                continue
            if is_dir and link:
                if not top:
                    self.nested.append((p, cls))
                else:
                    subfolders.append((p, ""))
            elif is_dir:
                sub = os.path.join(real, e.name)
                if top:
                    subfolders.append((p, sub))
                elif sub not in self.scanned:
                    self.scanned.add(sub)
                    self.walk(p, sub, cls)
            elif p.suffix.lower() in IMAGE_EXTENSIONS and e.is_file():
                self.found.append(_Found(cls, p, os.path.realpath(p) if link else os.path.join(real, e.name), link))
        return subfolders

    def follow(self, link: Path) -> str | None:
        """The real path of a symlinked folder to walk, or None (skipped, with a line)."""
        target = os.path.realpath(link)
        if _contains(target, self.root):
            why = ("it is the dataset folder or a folder above it (a link cycle); its images would be "
                   "counted twice")
        elif target in self.scanned:
            why = "that folder is already part of the dataset; its images are counted once"
        else:
            self.scanned.add(target)
            return target
        print(f"[data] skipping symlinked folder '{link}' -> '{target}': {why}", flush=True)
        self.skipped.append(str(link.relative_to(self.folder)))
        return None

    def walk_all(self) -> list[str]:
        """Walk the whole folder and return its class names, in the order met."""
        top = self.walk(self.folder, self.root, None, top=True)
        classes = []
        for path, real in top:  # plain class folders first: a link to one of them is the duplicate
            if real:
                self.scanned.add(real)
                classes.append(path.name)
                self.walk(path, real, path.name)
        for path, real in top:
            if not real and (target := self.follow(path)) is not None:
                classes.append(path.name)
                self.walk(path, target, path.name)
        i = 0
        while i < len(self.nested):  # walking a linked folder may meet further links
            path, cls = self.nested[i]
            if (target := self.follow(path)) is not None:
                self.walk(path, target, cls)
            i += 1
        return classes

    def collect(self, classes: list[str]) -> _Scan:
        """The images found, each real file once, labelled by the sorted ``classes``.

        Images in class folders win over loose ones at the top; a file reached through several
        paths is kept at its own place when it has one in the dataset, else at its first path.
        """
        classes = sorted(classes)
        label = {c: k for k, c in enumerate(classes)}
        in_classes = [f for f in self.found if f.cls is not None]
        chosen = in_classes or [f for f in self.found if f.cls is None]
        chosen.sort(key=lambda f: (label.get(f.cls, -1), f.path))
        own = {f.real for f in chosen if not f.link}
        files, labels, reals, seen = [], [], [], set()
        for f in chosen:
            if f.real in seen or (f.link and f.real in own):
                continue
            seen.add(f.real)
            files.append(f.path)
            labels.append(label[f.cls] if f.cls is not None else -1)
            reals.append(f.real)
        if len(chosen) > len(files):
            n = len(chosen) - len(files)
            print(f"[data] {n} {'file' if n == 1 else 'files'} reached through more than one path (symlinks) "
                  f"{'is' if n == 1 else 'are'} counted once", flush=True)
        if not files:
            note = f"; symlinked folders skipped: {', '.join(self.skipped)}" if self.skipped else ""
            raise DataError(f"no images found in '{self.folder}' (looked for {', '.join(IMAGE_EXTENSIONS)} "
                            f"files in class subfolders or directly inside it{note})")
        return _Scan(files, labels, tuple(classes) if in_classes else (), reals)


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
    scanner = _Scanner(folder)
    return scanner.collect(scanner.walk_all())


def scan_folder(folder: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of ``folder/<class>/*``; a flat folder of images gives label -1.

    Each image is counted once however many symlinks lead to it; hidden files and folders are
    skipped (see :func:`_scan`).
    """
    scan = _scan(folder)
    return scan.files, scan.labels, scan.classes


# --------------------------------------------------------------------------- decoding


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
        with Image.open(path, formats=IMAGE_FORMATS) as im:
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
    storage: str = "memory",
    mmap_above: float = float("inf"),
) -> ImageTensors:
    """Decode every image of a folder once into a uint8 tensor, cached on disk.

    The cache file is keyed by the folder's content (paths, sizes, modification times) and
    the image size, so a changed folder is decoded again and an unchanged one loads in seconds.
    ``storage="mmap"`` keeps the images in a ``.npy`` file in ``cache_dir`` instead, decoded into
    it a chunk at a time, and returns a tensor backed by that file (see ``byol.core.disk_images``);
    ``storage="auto"`` picks it when the decoded images would take more than ``mmap_above`` bytes.
    """
    folder = Path(folder)
    scan = _scan(folder)
    if choose_storage(storage, decoded_bytes(len(scan.files), size), mmap_above) == "mmap":
        return _load_mmap(folder, scan, size, cache_dir, skip_bad_files, workers)
    files, labels, classes = scan.files, scan.labels, scan.classes
    cache = None
    if cache_dir:
        key = _cache_key(folder, scan, size, skip_bad_files)
        cache = Path(cache_dir).expanduser() / f"{folder.name}-{key}.pt"
        cached = _cached_images(cache) if cache.exists() else None
        if cached is not None:
            return cached
        _remove_unfinished(cache)
        problem = cache_folder_problem(cache.parent, decoded_bytes(len(files), size))
        if problem:  # the cache only saves time: decode anyway, and say so before the minutes of decoding
            warnings.warn(f"data.cache_dir '{cache.parent}' {problem}: decoding without keeping the images, so "
                          f"every run decodes them again; set data.cache_dir to a writable folder with room "
                          f"(data.cache_dir=null: no cache, no warning)", stacklevel=2)
            cache = None
    kept = "once; cached afterwards" if cache is not None else "not cached"
    print(f"[data] decoding {len(files)} images from {folder} ({kept})", flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: _decode(p, size, skip_bad_files), files))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        raise DataError(f"none of the {len(files)} images in '{folder}' could be read")
    images = torch.from_numpy(np.stack([arrays[i] for i in keep]))
    data = ImageTensors(images, torch.tensor([labels[i] for i in keep], dtype=torch.long), classes)
    if cache is not None:
        from byol.core.checkpoint import atomic_torch_save
        try:
            atomic_torch_save({"images": data.images, "labels": data.labels, "classes": list(classes)}, cache)
        except CheckpointError as e:  # the disk filled up while decoding: the images are decoded all the same
            warnings.warn(f"the decoded images were not cached: {e}", stacklevel=2)
    return data


def _remove_unfinished(cache: Path) -> None:
    """Cache files that a stopped decode of this folder left half-written (before counting the free space)."""
    from byol.core.checkpoint import remove_dead_writers_files

    removed = remove_dead_writers_files(cache) if cache.parent.is_dir() else []
    if removed:
        print(f"[data] removed {len(removed)} unfinished cache file(s) that a stopped process left beside {cache}",
              flush=True)


def cache_folder_problem(folder: Path, size: int) -> str | None:
    """Why ``folder`` cannot take a cache file of ``size`` bytes (None: it can): found before the decode,
    which takes minutes on a large folder and would otherwise end in a traceback."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as e:
        return f"cannot be written ({e.strerror or e})"
    if size > free:
        return f"has {free / 1e9:.2f} GB free, the decoded images need {size / 1e9:.2f} GB"
    return None


def _decoded(files: list[Path], size: int, skip_bad: bool, workers: int, chunk: int = 4096):
    """Each file's decoded array (None: skipped), a chunk at a time, in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in range(0, len(files), chunk):
            yield from pool.map(lambda p: _decode(p, size, skip_bad), files[s:s + chunk])


def _cached_images(pt: Path) -> ImageTensors | None:
    """The images an in-memory ``.pt`` cache holds, or None with a warning when the file is damaged or not
    what this project writes (the folder is then decoded again)."""
    try:
        d = torch.load(pt, weights_only=True)
        data = ImageTensors(d["images"], d["labels"], tuple(d["classes"]))
        if not isinstance(data.images, torch.Tensor) or len(data.images) != len(data.labels):
            raise ValueError("images and labels differ")
        return data
    except Exception:
        warnings.warn(f"ignoring unreadable cache {pt}; decoding again", stacklevel=3)
        return None


def _load_mmap(folder: Path, scan: _Scan, size: int, cache_dir, skip_bad: bool, workers: int) -> ImageTensors:
    """The folder's images in the memory-mapped cache ``<name>-<key>.u8.npy`` (written when missing,
    from the in-memory ``.pt`` cache when there is one, else by decoding), labels beside it."""
    from byol.core.checkpoint import atomic_torch_save

    if not cache_dir:
        raise DataError("data.storage=mmap keeps the decoded images in a file in data.cache_dir; set "
                        "data.cache_dir to a folder on a local disk")
    key = _cache_key(folder, scan, size, skip_bad)
    base = Path(cache_dir).expanduser() / f"{folder.name}-{key}"
    npy, meta = base.with_name(base.name + ".u8.npy"), base.with_name(base.name + ".labels.pt")
    if npy.exists() and meta.exists():
        try:
            d = torch.load(meta, weights_only=True)
            return ImageTensors(open_images(npy), d["labels"], tuple(d["classes"]), mapped=True)
        except Exception:
            warnings.warn(f"ignoring unreadable cache {npy}; decoding again", stacklevel=2)
    _remove_unfinished(npy)
    problem = cache_folder_problem(npy.parent, decoded_bytes(len(scan.files), size))
    if problem:
        raise DataError(f"data.storage=mmap keeps the decoded images in a file in data.cache_dir, but "
                        f"'{npy.parent}' {problem}: set data.cache_dir to a folder on a local disk with room")
    pt = base.with_name(base.name + ".pt")
    cached = _cached_images(pt) if pt.exists() else None  # decoded before for the in-memory path: copied once
    if cached is not None:
        arrays, n = (a.numpy() for a in cached.images), len(cached.images)
        labels = cached.labels.tolist()
    else:
        print(f"[data] decoding {len(scan.files)} images from {folder} into {npy} (once)", flush=True)
        arrays, n, labels = _decoded(scan.files, size, skip_bad, workers), len(scan.files), scan.labels
    kept = write_images(arrays, n, (3, size, size), npy)
    if not kept:
        npy.unlink()
        raise DataError(f"none of the {n} images in '{folder}' could be read")
    label_t = torch.tensor([labels[i] for i in kept], dtype=torch.long)
    atomic_torch_save({"labels": label_t, "classes": list(scan.classes)}, meta)
    return ImageTensors(open_images(npy), label_t, scan.classes, mapped=True)
