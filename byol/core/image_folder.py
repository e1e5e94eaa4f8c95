"""Image folders decoded once into ``ImageTensors``: decoding, resizing, and the cache (in memory, or a
memory-mapped file for folders larger than memory). What the folder holds is found by
:mod:`byol.core.folder_scan`.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from byol.core.checkpoint import atomic_torch_save, remove_dead_writers_files
from byol.core.data import DIGEST_BYTES, ImageTensors, digest_tensor
from byol.core.disk_images import choose_storage, decoded_bytes, open_images, write_images
from byol.core.errors import CheckpointError, DataError
from byol.core.folder_scan import FolderScan, scan_images
from byol.core.load_guards import empty_file
from byol.core.progress import Progress

# The decoders Pillow may use, whatever a file's name: Pillow picks the decoder from the content, and some
# (EPS runs Ghostscript on the file) must never see a file handed to us. JPEG includes cameras' MPO files.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF")


# --------------------------------------------------------------------------- decoding


def _to_rgb(im):
    """Any PIL image as 8-bit RGB: grayscale, palette, CMYK and RGBA (alpha dropped, as
    torchvision's loader) through ``convert``; 16-bit and float grayscale rescaled first, which
    ``convert`` would clip to white."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # one float32 array, worked on in place: float64 and a copy per step took 3.3x an RGB image's memory
        # (2.2 GB for one 9400x9400 16-bit PNG); float32 holds every 16-bit value exactly
        a = np.array(im, dtype=np.float32)
        if not np.isfinite(a).all():  # a float image's NaN would be cast to black without a word
            raise ValueError(f"its {im.mode} pixels hold NaN or infinite values")
        # 16 bits -> 8 bits; 32-bit integers ("I": a 16-bit PNG, or 8-bit values a program stored so) by range
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max() > 255):
            a /= 257.0
        elif a.max() <= 1.0:
            a *= 255.0  # float image in [0, 1]
        im = Image.fromarray(np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8), "L")
    return im.convert("RGB")


class _TooLarge(ValueError):
    """An image above Pillow's decompression-bomb threshold, which Pillow itself only warns about (up to twice
    it): decoding eight of those at once would take gigabytes."""


def _decode(path: Path, size: int, skip_bad: bool) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            im.draft("RGB", (size, size))  # a JPEG decodes at 1/2, 1/4 or 1/8 scale when that still covers size
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise _TooLarge(f"{im.width}x{im.height} pixels, more than {Image.MAX_IMAGE_PIXELS:,}")
            im = _to_rgb(im)
            if im.size != (size, size):
                im = _resize_center(im, size)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        # an empty file: Pillow's "cannot identify image file" says less
        reason = "it is empty (0 bytes): a copy or download that never finished" if empty_file(path) else e
        if skip_bad:
            warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)
            return None
        if isinstance(e, _TooLarge) or type(e).__name__ == "DecompressionBombError":  # a slide, a satellite
            raise DataError(f"image '{path}' is larger than Pillow decodes ({e}); save a smaller copy of it (a few "
                            f"thousand pixels a side is far more than data.image_size needs), or set "
                            f"data.skip_bad_files=true to skip it with a warning") from None
        raise DataError(f"cannot read image '{path}' ({reason}). Remove or replace the file, or set "
                        f"data.skip_bad_files=true to skip unreadable files with a warning") from None


def _resize_center(im, size: int):
    """The centred square of side min(width, height), resized to ``size``: the square is read from the
    source (``box``), so a long thin image is never enlarged whole (6 GB for a 1,000,000 x 1 PNG at 32 px)."""
    from PIL import Image

    w, h = im.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return im.resize((size, size), Image.BICUBIC, box=box)


def _cache_key(folder: Path, scan: FolderScan, size: int, skip_bad: bool) -> str:
    """What the decoded tensors depend on: the class list (an empty class folder shifts the
    labels), and per file its path, label, real path (where a symlink leads), size and mtime. v3: decoded
    with JPEG's reduced scales and the square read by ``box`` (pixels differ slightly from v2's)."""
    def raw(text: str) -> bytes:  # a name's own bytes, also where they are not UTF-8
        return text.encode("utf-8", "surrogateescape")

    h = hashlib.sha256(raw(f"{folder.resolve()}|{size}|{skip_bad}|v3|{list(scan.classes)}\n"))
    for f, label, real in zip(scan.files, scan.labels, scan.real, strict=True):
        st = os.stat(real)
        h.update(raw(f"{f.relative_to(folder)}|{label}|{real}|{st.st_size}|{st.st_mtime_ns}\n"))
    return h.hexdigest()[:CACHE_KEY_LENGTH]


CACHE_KEY_LENGTH = 20  # hex digits of the key in a cache file's name
CACHE_SUFFIXES = {"pt": ".pt", "npy": ".u8.npy", "meta": ".labels.pt"}  # the kinds of cache file, by suffix


def _cache_files(cache_dir, folder: Path, scan: FolderScan, size: int, skip_bad: bool) -> dict[str, Path]:
    """The folder's cache files in ``cache_dir``, all named ``<folder>-<key>``: ``pt`` (the in-memory path's
    images), ``npy`` and ``meta`` (the memory-mapped images and their labels)."""
    base = Path(cache_dir).expanduser() / f"{folder.name}-{_cache_key(folder, scan, size, skip_bad)}"
    return {kind: base.with_name(base.name + suffix) for kind, suffix in CACHE_SUFFIXES.items()}


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
    scan = scan_images(folder, skip_unreadable=skip_bad_files)
    if choose_storage(storage, decoded_bytes(len(scan.files), size), mmap_above) == "mmap":
        return _load_mmap(folder, scan, size, cache_dir, skip_bad_files, workers)
    files, labels, classes = scan.files, scan.labels, scan.classes
    cache = None
    if cache_dir:
        names = _cache_files(cache_dir, folder, scan, size, skip_bad_files)
        cache = names["pt"]
        # the folder's in-memory cache (an unusable one is decoded again, which replaces it), else its mapped one
        cached = _cached_images(cache) if cache.exists() else _read_mapped_cache(names, folder)
        if cached is not None:
            return cached
        _remove_unfinished(cache, folder)
        problem = cache_folder_problem(cache.parent, decoded_bytes(len(files), size))
        if problem:  # the cache only saves time: decode anyway, and say so before the minutes of decoding
            warnings.warn(f"data.cache_dir '{cache.parent}' {problem}: decoding without keeping the images, so "
                          f"every run decodes them again; set data.cache_dir to a writable folder with room "
                          f"(data.cache_dir=null: no cache, no warning)", stacklevel=2)
            cache = None
    kept = "once; cached afterwards" if cache is not None else "not cached"
    print(f"[data] decoding {len(files)} images from {folder} ({kept})", flush=True)
    images, keep = np.empty((len(files), 3, size, size), np.uint8), []  # filled as decoded: one copy in memory
    for i, array in enumerate(_decoded(files, size, skip_bad_files, workers)):
        if array is not None:
            images[len(keep)] = array
            keep.append(i)
    if not keep:
        raise DataError(f"none of the {len(files)} images in '{folder}' could be read")
    if len(keep) < len(files):  # skipped files: the rows left over are given back, in place where it can
        images.resize((len(keep), 3, size, size), refcheck=False)
    data = ImageTensors(torch.from_numpy(images), torch.tensor([labels[i] for i in keep], dtype=torch.long), classes)
    data.digests = digest_tensor(data)
    if cache is not None:
        try:
            atomic_torch_save({"images": data.images, "labels": data.labels, "classes": list(classes),
                               "digests": data.digests}, cache)
        except CheckpointError as e:  # the disk filled up while decoding: the images are decoded all the same
            warnings.warn(f"the decoded images were not cached: {e}", stacklevel=2)
    return data


def _remove_unfinished(cache: Path, folder: Path) -> None:
    """Before a decode: the cache files that a stopped decode of this folder left half-written are removed (before
    counting the free space), and the folder's other caches are named: each change to a folder, or another image
    size, leaves one as large as the decoded images, and nothing else says so until the disk is full."""
    removed = []  # a killed decode's temporary file, of this cache or of another of the folder's (another size)
    for name in sorted({_temp_files_cache(p.name, folder.name) for p in cache.parent.glob(".*.tmp")} - {None}
                       if cache.parent.is_dir() else []):
        removed += remove_dead_writers_files(cache.parent / name)
    if removed:
        print(f"[data] removed {len(removed)} unfinished cache file(s) that a stopped process left in "
              f"{cache.parent} ({', '.join(p.name for p in removed)})", flush=True)
    own = cache.name[:len(folder.name) + 1 + CACHE_KEY_LENGTH]  # "<folder>-<key>" (_cache_files), any suffix
    others = sorted(p for p in cache.parent.glob(f"{glob.escape(folder.name)}-*") if p.is_file()
                    and p.name.endswith((".pt", ".npy")) and not p.name.startswith(own + "."))
    if others:
        size = sum(p.stat().st_size for p in others)
        print(f"[data] note: {len(others)} other cache file(s) of a folder named '{folder.name}' in {cache.parent} "
              f"({size / 1e9:.2f} GB), from another image size or setting, or from the folder before it changed: "
              f"{', '.join(p.name for p in others)}; delete those no longer needed", flush=True)


def _temp_files_cache(name: str, folder_name: str) -> str | None:
    """The cache file (``<folder>-<key>`` and a cache suffix, see :func:`_cache_files`) whose temporary file
    (:func:`byol.core.checkpoint.new_temp_file`) is named ``name``; None for any other file."""
    key, suffixes = rf"[0-9a-f]{{{CACHE_KEY_LENGTH}}}", "(?:" + "|".join(map(re.escape, CACHE_SUFFIXES.values())) + ")"
    found = re.fullmatch(rf"\.({re.escape(folder_name)}-{key}{suffixes})\..+-\d+\.[^.]+\.tmp", name)
    return found.group(1) if found else None


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


def _decoded(files: list[Path], size: int, skip_bad: bool, workers: int, chunk: int = 4096,
             progress: Progress | None = None):
    """Each file's decoded array (None: skipped), a chunk at a time, in order; a progress line now and then
    (a large folder decodes for hours, once)."""
    progress = progress or Progress(len(files))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in range(0, len(files), chunk):
            yield from pool.map(lambda p: _decode(p, size, skip_bad), files[s:s + chunk])
            progress.update(min(s + chunk, len(files)))


def _cached_images(pt: Path) -> ImageTensors | None:
    """The images an in-memory ``.pt`` cache holds, or None with a warning when the file is damaged or not
    what this project writes (the folder is then decoded again)."""
    try:
        d = torch.load(pt, weights_only=True)
        data = ImageTensors(d["images"], d["labels"], tuple(d["classes"]), digests=_kept_digests(d, len(d["labels"])))
        if not isinstance(data.images, torch.Tensor) or len(data.images) != len(data.labels):
            raise ValueError("images and labels differ")
        return _checked_digests(data, pt)
    except Exception as e:
        _warn_unusable(pt, e)
        return None


def _load_mmap(folder: Path, scan: FolderScan, size: int, cache_dir, skip_bad: bool, workers: int) -> ImageTensors:
    """The folder's images in the memory-mapped cache ``<name>-<key>.u8.npy`` (written when missing,
    from the in-memory ``.pt`` cache when there is one, else by decoding), labels beside it."""
    if not cache_dir:
        raise DataError("data.storage=mmap keeps the decoded images in a file in data.cache_dir; set "
                        "data.cache_dir to a folder on a local disk")
    names = _cache_files(cache_dir, folder, scan, size, skip_bad)
    npy, meta = names["npy"], names["meta"]
    mapped = _mapped_cache(npy, meta)
    if mapped is not None:
        return mapped
    _remove_unfinished(npy, folder)
    problem = cache_folder_problem(npy.parent, decoded_bytes(len(scan.files), size))
    if problem:
        raise DataError(f"data.storage=mmap keeps the decoded images in a file in data.cache_dir, but "
                        f"'{npy.parent}' {problem}: set data.cache_dir to a folder on a local disk with room")
    pt = names["pt"]
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
    data = ImageTensors(open_images(npy), label_t, scan.classes, mapped=True)
    from_pt = cached is not None and cached.digests is not None and len(kept) == len(cached.digests)
    data.digests = cached.digests[kept] if from_pt else digest_tensor(data)  # read once here, never per job
    atomic_torch_save({"labels": label_t, "classes": list(scan.classes), "digests": data.digests}, meta)
    return data


def _read_mapped_cache(names: dict[str, Path], folder: Path) -> ImageTensors | None:
    """The images of the folder's memory-mapped cache (:func:`_cache_files`; decoded before for
    ``data.storage=mmap``), read into memory: a folder is not decoded twice for its two storages."""
    mapped = _mapped_cache(names["npy"], names["meta"])
    if mapped is None:
        return None
    print(f"[data] reading {len(mapped)} images into memory from the memory-mapped cache of {folder}", flush=True)
    return ImageTensors(mapped.images.clone(), mapped.labels, mapped.classes, digests=mapped.digests)


def _mapped_cache(npy: Path, meta: Path) -> ImageTensors | None:
    """The images of a memory-mapped cache (``<name>-<key>.u8.npy`` and its ``.labels.pt``), backed by
    the file; None if there is none, or an unreadable one (said in a warning: decoded again)."""
    if not (npy.exists() and meta.exists()):
        return None
    try:
        d = torch.load(meta, weights_only=True, mmap=True)  # a huge file is not read whole before its check
        return _checked_digests(ImageTensors(open_images(npy), d["labels"], tuple(d["classes"]), mapped=True,
                                             digests=_kept_digests(d, len(d["labels"]))), npy)
    except Exception as e:
        _warn_unusable(npy, e)
        return None


def _kept_digests(saved: dict, n: int) -> torch.Tensor | None:
    """The image digests a cache file keeps, if they are what this project writes (else None: computed when
    needed; caches of earlier versions have none)."""
    digests = saved.get("digests")
    ok = isinstance(digests, torch.Tensor) and digests.layout == torch.strided and digests.device.type == "cpu" \
        and digests.dtype == torch.uint8 and digests.shape == (n, DIGEST_BYTES)
    return digests if ok else None


class DamagedCacheError(ValueError):
    """A cache file's pixels and the digests kept with them disagree: one of them was edited or damaged."""


def _checked_digests(data: ImageTensors, source: Path, sample: int = 64) -> ImageTensors:
    """``data`` if a spread sample of the digests it keeps matches its pixels (or it keeps none: a cache of an
    earlier version; computed when needed). Else :class:`DamagedCacheError`: which side was damaged cannot
    be told, and damaged pixels would train and evaluate on images that are not the folder's, so the folder
    is decoded again (digests kept wrong would have put copies of an image on both sides of the split)."""
    if data.digests is None or not len(data):
        return data
    rows = torch.linspace(0, len(data) - 1, min(sample, len(data))).long().unique()
    if torch.equal(digest_tensor(ImageTensors(data.pixels(rows), data.labels[rows])), data.digests[rows]):
        return data
    raise DamagedCacheError(f"the images in the cache {source} do not match the digests kept with them "
                            f"(the file was edited or damaged)")


def _warn_unusable(cache: Path, error: Exception) -> None:
    """The one warning for a cache that cannot be used: it is made again (decoded, or copied from the folder's
    other cache), replacing it."""
    reason = str(error) if isinstance(error, DamagedCacheError) else f"the cache {cache} cannot be read"
    warnings.warn(f"{reason}; not using it: the cache is made again", stacklevel=4)
