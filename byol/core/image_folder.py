"""Image folders decoded once into ``ImageTensors``: decoding, resizing, and the cache (in memory, or a
memory-mapped file for folders larger than memory). What the folder holds is found by
:mod:`byol.core.folder_scan`.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from byol.core.cache_files import (  # noqa: F401 (_cache_prefix: named here by earlier code and tests)
    CACHE_KEY_LENGTH,
    _cache_files,
    _cache_name,
    _cache_prefix,
    _meta_of,
    _temp_files_cache,
    decode_lock,
)
from byol.core.checkpoint import atomic_torch_save, remove_dead_writers_files
from byol.core.data import ImageTensors, digest_tensor
from byol.core.disk_images import (
    cache_folder_problem,
    cache_write_problem,
    choose_storage,
    decoded_bytes,
    kept_digests,
    kept_names,
    open_images,
    recorded_folder,
    size_text,
    usable_cache,
    warn_unusable,
    write_images,
)
from byol.core.errors import CheckpointError, DataError
from byol.core.folder_scan import FolderScan, scan_images
from byol.core.load_guards import empty_file
from byol.core.progress import Progress

# The decoders Pillow may use, whatever a file's name: Pillow picks the decoder from the content, and some
# (EPS runs Ghostscript on the file) must never see a file handed to us. JPEG includes cameras' MPO files.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF")


SKIPPED_KEPT = 5  # names of skipped unreadable files kept in a cache's metadata, to name them on every read

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


def _about(folder: Path, scan: FolderScan, kept: list[int]) -> dict:
    """What a cache records beside its images: the folder it was decoded from (its other caches are named by
    it) and the first unreadable files the decode skipped (named again on every read of the cache)."""
    kept_rows = set(kept)
    skipped = [str(f.relative_to(folder)) for i, f in enumerate(scan.files) if i not in kept_rows]
    return {"folder": str(folder.resolve()), "skipped": skipped[:SKIPPED_KEPT]}


class _Cached(NamedTuple):
    """A cache's images and the names it keeps of the unreadable files its decode skipped."""

    data: ImageTensors
    skipped: list[str]


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

    The cache file is keyed by the folder's content (paths, sizes, modification and change times, inodes) and
    the image size, so a changed folder is decoded again and an unchanged one loads in seconds.
    ``storage="mmap"`` keeps the images in a ``.npy`` file in ``cache_dir`` instead, decoded into
    it a chunk at a time, and returns a tensor backed by that file (see ``byol.core.disk_images``);
    ``storage="auto"`` picks it when the decoded images would take more than ``mmap_above`` bytes.
    """
    folder = Path(folder)
    scan = scan_images(folder, skip_unreadable=skip_bad_files)
    if choose_storage(storage, decoded_bytes(len(scan.files), size), mmap_above) == "mmap":
        return _load_mmap(folder, scan, size, cache_dir, skip_bad_files, workers)
    if not cache_dir:
        return _decode_into_memory(folder, scan, size, skip_bad_files, workers, False)[0]
    names = _cache_files(cache_dir, folder, scan, size, skip_bad_files)
    with decode_lock(names["pt"], folder):  # runs started together decode the folder once
        return _load_in_memory(folder, scan, size, names, skip_bad_files, workers)


def _load_in_memory(folder: Path, scan: FolderScan, size: int, names: dict[str, Path], skip_bad: bool,
                    workers: int) -> ImageTensors:
    """The folder's images in memory: from its in-memory cache (an unusable one is decoded again, which replaces
    it), else from its memory-mapped one, else decoded and cached (where the cache folder allows)."""
    cache = names["pt"]
    cached = _cached_images(cache, size) if cache.exists() else _read_mapped_cache(names, folder, size)
    if cached is not None:
        return _said_skipped(cached, scan, folder)
    problem = _prepare_decode([cache], folder, decoded_bytes(len(scan.files), size))
    if problem:  # the cache only saves time: decode anyway, and say so before the minutes of decoding
        warnings.warn(f"data.cache_dir '{cache.parent}' {problem}: decoding without keeping the images, so "
                      f"every run decodes them again; set data.cache_dir to a writable folder with room "
                      f"(data.cache_dir=null: no cache, no warning)", stacklevel=3)
        cache = None
    data, keep = _decode_into_memory(folder, scan, size, skip_bad, workers, cache is not None)
    if cache is not None:
        try:
            atomic_torch_save({"images": data.images, "labels": data.labels, "classes": list(data.classes),
                               "digests": data.digests, **_about(folder, scan, keep)}, cache)
        except CheckpointError as e:  # the disk filled up while decoding: the images are decoded all the same
            warnings.warn(f"the decoded images were not cached: {cache_write_problem(cache.parent, e)}",
                          stacklevel=3)
    return data


def _decode_into_memory(folder: Path, scan: FolderScan, size: int, skip_bad: bool, workers: int,
                        cached: bool) -> tuple[ImageTensors, list[int]]:
    """The folder's images decoded into one tensor, and the positions of the files read (others skipped)."""
    files, labels = scan.files, scan.labels
    print(f"[data] decoding {len(files)} images from {folder} "
          f"({'once; cached afterwards' if cached else 'not cached'})", flush=True)
    images, keep = np.empty((len(files), 3, size, size), np.uint8), []  # filled as decoded: one copy in memory
    for i, array in enumerate(_decoded(files, size, skip_bad, workers)):
        if array is not None:
            images[len(keep)] = array
            keep.append(i)
    if not keep:
        raise DataError(f"none of the {len(files)} images in '{folder}' could be read")
    if len(keep) < len(files):  # skipped files: the rows left over are given back, in place where it can
        images.resize((len(keep), 3, size, size), refcheck=False)
    data = ImageTensors(torch.from_numpy(images), torch.tensor([labels[i] for i in keep], dtype=torch.long),
                        scan.classes)
    data.digests = digest_tensor(data)
    return data, keep


def _said_skipped(cached: _Cached, scan: FolderScan, folder: Path) -> ImageTensors:
    """The cached images, with one warning when their decode skipped unreadable files (data.skip_bad_files):
    only the decoding run named them, and later runs read fewer images without a word."""
    n = len(scan.files) - len(cached.data)
    if n > 0:
        shown = ", ".join(cached.skipped) + (", ..." if n > len(cached.skipped) else "") if cached.skipped \
            else "their names were not kept by the version that decoded it"
        warnings.warn(f"{n} unreadable image(s) of '{folder}' left out, skipped when its cache was decoded "
                      f"(data.skip_bad_files=true): {shown}; replace or remove them (the folder is then decoded "
                      f"again)", stacklevel=3)
    return cached.data


def _prepare_decode(unusable: list[Path], folder: Path, size: int) -> str | None:
    """Before a decode into the cache file ``unusable[0]``: the same-key cache files that could not be used are
    removed (a ``.u8.npy`` left without its labels took the room of its own decode again), the unfinished
    files of stopped decodes too, the folder's other caches named; then why the cache folder cannot take
    ``size`` bytes (None: it can)."""
    gone = [p for p in unusable if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    if gone:
        print(f"[data] removed the unusable cache file(s) {', '.join(p.name for p in gone)} from "
              f"{gone[0].parent}: made again", flush=True)
    _remove_unfinished(unusable[0], folder)
    return cache_folder_problem(unusable[0].parent, size)


def _remove_unfinished(cache: Path, folder: Path) -> None:
    """The cache files that a stopped decode of this folder left half-written are removed (before counting the
    free space), and the folder's other caches are named: each change to a folder, or another image size,
    leaves one as large as the decoded images, and nothing else says so until the disk is full."""
    prefix = _cache_prefix(folder)
    removed = []  # a killed decode's temporary file, of this cache or of another of the folder's (another size)
    for name in sorted({_temp_files_cache(p.name, prefix) for p in cache.parent.glob(".*.tmp")} - {None}
                       if cache.parent.is_dir() else []):
        removed += remove_dead_writers_files(cache.parent / name)
    if removed:
        print(f"[data] removed {len(removed)} unfinished cache file(s) that a stopped process left in "
              f"{cache.parent} ({', '.join(p.name for p in removed)})", flush=True)
    own, source = cache.name[:len(prefix) + 1 + CACHE_KEY_LENGTH], str(folder.resolve())
    others = sorted(p for p in cache.parent.glob(f"{glob.escape(prefix)}-*")
                    if re.fullmatch(_cache_name(prefix), p.name) and not p.name.startswith(own + ".")
                    and p.is_file() and recorded_folder(_meta_of(p)) == source)
    if others:
        size = sum(p.stat().st_size for p in others)
        print(f"[data] note: {len(others)} other cache file(s) of {folder} in {cache.parent} ({size_text(size)}), "
              f"from another image size or setting, or from the folder before it changed: "
              f"{', '.join(p.name for p in others)}; delete those no longer needed", flush=True)


def _decoded(files: list[Path], size: int, skip_bad: bool, workers: int, chunk: int = 4096,
             progress: Progress | None = None):
    """Each file's decoded array (None: skipped), a chunk at a time, in order; a progress line now and then
    (a large folder decodes for hours, once)."""
    progress = progress or Progress(len(files))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in range(0, len(files), chunk):
            yield from pool.map(lambda p: _decode(p, size, skip_bad), files[s:s + chunk])
            progress.update(min(s + chunk, len(files)))


def _cached_images(pt: Path, size: int) -> _Cached | None:
    """The images an in-memory ``.pt`` cache holds, or None with a warning when the file is damaged or not
    what this project writes (the folder is then decoded again)."""
    try:
        d = torch.load(pt, weights_only=True)
        data = ImageTensors(d["images"], d["labels"], tuple(d["classes"]), digests=kept_digests(d, len(d["labels"])))
        return _Cached(usable_cache(data, size, pt), kept_names(d, SKIPPED_KEPT))
    except Exception as e:
        warn_unusable(pt, e)
        return None


def _load_mmap(folder: Path, scan: FolderScan, size: int, cache_dir, skip_bad: bool, workers: int) -> ImageTensors:
    """The folder's images in the memory-mapped cache ``<name>-<key>.u8.npy`` (written when missing,
    from the in-memory ``.pt`` cache when there is one, else by decoding), labels beside it."""
    if not cache_dir:
        raise DataError("data.storage=mmap keeps the decoded images in a file in data.cache_dir; set "
                        "data.cache_dir to a folder on a local disk")
    names = _cache_files(cache_dir, folder, scan, size, skip_bad)
    with decode_lock(names["pt"], folder):  # runs started together decode the folder once
        return _mapped_or_written(folder, scan, size, names, skip_bad, workers)


def _mapped_or_written(folder: Path, scan: FolderScan, size: int, names: dict[str, Path], skip_bad: bool,
                       workers: int) -> ImageTensors:
    """The folder's memory-mapped cache, written first when missing (see :func:`_load_mmap`)."""
    npy, meta = names["npy"], names["meta"]
    mapped = _mapped_cache(npy, meta, size)
    if mapped is not None:
        return _said_skipped(mapped, scan, folder)
    problem = _prepare_decode([npy, meta], folder, decoded_bytes(len(scan.files), size))
    if problem:
        raise DataError(f"data.storage=mmap keeps the decoded images in a file in data.cache_dir, but "
                        f"'{npy.parent}' {problem}: set data.cache_dir to a folder on a local disk with room")
    pt = names["pt"]
    cached = _cached_images(pt, size) if pt.exists() else None  # decoded before for the in-memory path: copied once
    if cached is not None:
        _said_skipped(cached, scan, folder)
        arrays, n = (a.numpy() for a in cached.data.images), len(cached.data)
    else:
        print(f"[data] decoding {len(scan.files)} images from {folder} into {npy} (once)", flush=True)
        arrays, n = _decoded(scan.files, size, skip_bad, workers), len(scan.files)
    try:  # the pair or nothing: a .u8.npy without its labels is never read, and took the room of the next decode
        return _write_mapped(arrays, n, folder, scan, size, names, cached)
    except BaseException as e:
        npy.unlink(missing_ok=True)
        if isinstance(e, CheckpointError | OSError):
            raise DataError(f"the memory-mapped cache was not written: {cache_write_problem(npy.parent, e)}") \
                from None
        raise


def _write_mapped(arrays, n: int, folder: Path, scan: FolderScan, size: int, names: dict[str, Path],
                  cached: _Cached | None) -> ImageTensors:
    """Write ``arrays`` (``n``, None: skipped) into the ``.u8.npy`` cache and then its ``.labels.pt``: copied
    from the in-memory ``cached`` images, or decoded from ``scan``."""
    npy = names["npy"]
    kept = write_images(arrays, n, (3, size, size), npy)
    if not kept:
        raise DataError(f"none of the {n} images in '{folder}' could be read")
    labels = cached.data.labels[kept] if cached is not None else torch.tensor(scan.labels, dtype=torch.long)[kept]
    data = ImageTensors(open_images(npy), labels, scan.classes, mapped=True)
    digests = cached.data.digests if cached is not None else None
    data.digests = digests[kept] if digests is not None else digest_tensor(data)  # read once here, never per job
    about = _about(folder, scan, kept) if cached is None else {"folder": str(folder.resolve()),
                                                                "skipped": cached.skipped}
    atomic_torch_save({"labels": labels, "classes": list(scan.classes), "digests": data.digests, **about},
                      names["meta"])
    return data


def _read_mapped_cache(names: dict[str, Path], folder: Path, size: int) -> _Cached | None:
    """The images of the folder's memory-mapped cache (:func:`_cache_files`; decoded before for
    ``data.storage=mmap``), read into memory: a folder is not decoded twice for its two storages."""
    mapped = _mapped_cache(names["npy"], names["meta"], size)
    if mapped is None:
        return None
    data = mapped.data
    print(f"[data] reading {len(data)} images into memory from the memory-mapped cache of {folder}", flush=True)
    return _Cached(ImageTensors(data.images.clone(), data.labels, data.classes, digests=data.digests), mapped.skipped)


def _mapped_cache(npy: Path, meta: Path, size: int) -> _Cached | None:
    """The images of a memory-mapped cache (``<name>-<key>.u8.npy`` and its ``.labels.pt``), backed by
    the file; None if there is none, or an unreadable one (said in a warning: decoded again)."""
    if not (npy.exists() and meta.exists()):
        return None
    try:
        d = torch.load(meta, weights_only=True, mmap=True)  # a huge file is not read whole before its check
        data = ImageTensors(open_images(npy), d["labels"], tuple(d["classes"]), mapped=True,
                            digests=kept_digests(d, len(d["labels"])))
        return _Cached(usable_cache(data, size, npy), kept_names(d, SKIPPED_KEPT))
    except Exception as e:
        warn_unusable(npy, e)
        return None
