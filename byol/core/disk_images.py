"""Decoded images larger than memory: the uint8 cache as a memory-mapped ``.npy`` file, and batches
read from it by index in a background thread; and what the decoded-image cache needs of the disk (room, a
folder) and of its files (images of the right shape, digests that match them) before they are used.

``MmapBatches`` keeps :class:`byol.core.data.IndexBatches`' contract (same order for a seed and an
epoch, the same ``progress`` resume mid-epoch, the same uint8 ``(images, labels)`` batches): it
iterates IndexBatches over the image *indices* and reads each batch's rows from the file, into
pinned memory and onto the device with an asynchronous copy when CUDA is used, a few batches ahead.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from byol.core.checkpoint import new_temp_file, usual_permissions
from byol.core.data import DIGEST_BYTES, ImageTensors, IndexBatches, digest_tensor, spread_rows
from byol.core.errors import CheckpointError, DataError

STORAGES = ("auto", "memory", "mmap")


def decoded_bytes(n: int, size: int) -> int:
    """Bytes of ``n`` decoded RGB images of ``size`` x ``size`` (uint8)."""
    return n * 3 * size * size


def choose_storage(setting: str, nbytes: int, limit_bytes: float) -> str:
    """``memory`` or ``mmap``: ``setting`` itself, or for ``auto``, ``mmap`` above ``limit_bytes``."""
    if setting not in STORAGES:
        raise DataError(f"unknown data.storage '{setting}'; choose one of: {', '.join(STORAGES)}")
    if setting == "auto":
        return "mmap" if nbytes > limit_bytes else "memory"
    return setting


def size_text(nbytes: float) -> str:
    """A size in GB, in MB under 0.01 GB (a small folder's cache read "0.00 GB"), in bytes under 0.01 MB."""
    if nbytes >= 1e7:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e4 else f"{int(nbytes)} bytes"


def cache_folder_problem(folder: Path, size: int) -> str | None:
    """Why ``folder`` cannot take a cache file of ``size`` bytes (None: it can): found before the decode,
    which takes minutes on a large folder and would otherwise end in a traceback."""
    if folder.exists() and not folder.is_dir():  # mkdir's "File exists" said nothing of the fix
        return "is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as e:
        return f"cannot be written ({e.strerror or e})"
    if size > free:
        return f"has {size_text(free)} free, the decoded images need {size_text(size)}"
    return None


def cache_write_problem(cache_dir: Path, error: Exception) -> str:
    """A cache file that could not be written, with data.cache_dir as the fix (a checkpoint's advice,
    'choose another output folder', names no setting)."""
    reason = (str(error).split("; the previous file")[0] if isinstance(error, CheckpointError)
              else f"could not write in '{cache_dir}' ({getattr(error, 'strerror', None) or error})")
    return f"{reason}; free space in data.cache_dir '{cache_dir}', or set data.cache_dir to a folder with room"


def recorded_folder(meta: Path) -> str | None:
    """The folder a cache file (``.pt``, or a ``.u8.npy``'s ``.labels.pt``) says it was decoded from; None when
    it says none (an earlier version's) or cannot be read."""
    try:
        source = torch.load(meta, weights_only=True, mmap=True).get("folder")
    except Exception:  # not this project's file, or damaged: not named
        return None
    return source if isinstance(source, str) else None


def open_images(path: str | os.PathLike) -> torch.Tensor:
    """The (N, 3, H, W) uint8 images of a ``.npy`` file as a tensor backed by the file (read-only
    use: copy-on-write pages, nothing is read until indexed)."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def write_images(arrays: Iterable[np.ndarray | None], n: int, shape: tuple[int, ...], path: Path) -> list[int]:
    """Write up to ``n`` arrays of ``shape`` (None: skipped) to the ``.npy`` file ``path``, one at a time
    (never all in memory), atomically; return the positions of the arrays written."""
    tmp, tmp2 = _new_temp_file(path), _new_temp_file(path)
    try:
        kept = _write_rows(arrays, n, shape, tmp, tmp2)
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:  # an interrupted decode (Ctrl+C, a bad image): no dataset-sized file left behind
        for leftover in (tmp, tmp2):
            leftover.unlink(missing_ok=True)
        raise
    tmp2.unlink(missing_ok=True)
    return kept


def _new_temp_file(path: Path) -> Path:
    """A new, empty file beside ``path`` (see :func:`byol.core.checkpoint.new_temp_file`)."""
    fd, name = new_temp_file(path)
    os.close(fd)
    return Path(name)


def _write_rows(arrays: Iterable[np.ndarray | None], n: int, shape: tuple[int, ...], tmp: Path,
                tmp2: Path) -> list[int]:
    """:func:`write_images` into ``tmp`` (``tmp2``: the shortened copy when arrays were skipped)."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
    kept = []
    for i, a in enumerate(arrays):
        if a is not None:
            out[len(kept)] = a
            kept.append(i)
    out.flush()
    del out
    if len(kept) < n:  # unreadable files skipped: copy the rows written into a file of the right length
        src = np.load(tmp, mmap_mode="r")
        dst = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(len(kept), *shape))
        for s in range(0, len(kept), 4096):
            dst[s:s + 4096] = src[s:min(s + 4096, len(kept))]
        dst.flush()
        del dst, src
        os.replace(tmp2, tmp)
    return kept


def kept_digests(saved: dict, n: int) -> torch.Tensor | None:
    """The image digests a cache file keeps, if they are what this project writes (else None: computed when
    needed; caches of earlier versions have none)."""
    digests = saved.get("digests")
    ok = isinstance(digests, torch.Tensor) and digests.layout == torch.strided and digests.device.type == "cpu" \
        and digests.dtype == torch.uint8 and digests.shape == (n, DIGEST_BYTES)
    return digests if ok else None


def kept_names(saved: dict, limit: int) -> list[str]:
    """The names of skipped unreadable files a cache file keeps (none in caches of earlier versions)."""
    names = saved.get("skipped")
    return names[:limit] if isinstance(names, list) and all(isinstance(n, str) for n in names) else []


class UnusableCacheError(ValueError):
    """A cache file that is readable but not what its folder decodes to: said as it is, and made again."""


class DamagedCacheError(UnusableCacheError):
    """A cache file's pixels and the digests kept with them disagree: one of them was edited or damaged."""


def usable_cache(data: ImageTensors, size: int, source: Path) -> ImageTensors:
    """``data`` read from the cache ``source`` if its images are (N, 3, size, size) uint8 beside N labels, and
    its digests match (:func:`checked_digests`); else :class:`UnusableCacheError`: an earlier version's cache
    (no digests) with 30 rows beside 40 labels, or of another size, was trained on."""
    images, labels = data.images, data.labels
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise UnusableCacheError(f"the cache {source} does not hold a tensor of images and one of labels")
    want = (len(labels), 3, size, size)
    if tuple(images.shape) != want or images.dtype != torch.uint8 or labels.dtype != torch.long:
        raise UnusableCacheError(f"the cache {source} holds {tuple(images.shape)} {images.dtype} images beside "
                                 f"{len(labels)} {labels.dtype} labels, not {want} torch.uint8 beside torch.int64")
    if len(labels) and (labels.min() < -1 or labels.max() >= len(data.classes)):
        raise UnusableCacheError(f"the cache {source} holds labels outside the {len(data.classes)} classes")
    return checked_digests(data, source)


def checked_digests(data: ImageTensors, source: Path, sample: int = 64) -> ImageTensors:
    """``data`` if a spread sample of the digests it keeps matches its pixels (or it keeps none: a cache of an
    earlier version; computed when needed). Else :class:`DamagedCacheError`: which side was damaged cannot
    be told, and damaged pixels would train and evaluate on images that are not the folder's, so the folder
    is decoded again (digests kept wrong would have put copies of an image on both sides of the split)."""
    if data.digests is None or not len(data):
        return data
    rows = spread_rows(len(data), sample)
    if torch.equal(digest_tensor(ImageTensors(data.pixels(rows), data.labels[rows])), data.digests[rows]):
        return data
    raise DamagedCacheError(f"the images in the cache {source} do not match the digests kept with them "
                            f"(the file was edited or damaged)")


def warn_unusable(cache: Path, error: Exception) -> None:
    """The one warning for a cache that cannot be used: it is made again (decoded, or copied from the folder's
    other cache), replacing it."""
    reason = str(error) if isinstance(error, UnusableCacheError) else f"the cache {cache} cannot be read"
    warnings.warn(f"{reason}; not using it: the cache is made again", stacklevel=4)


# --------------------------------------------------------------------------- batches read from the file


class MmapBatches(IndexBatches):
    """IndexBatches whose images stay in a (memory-mapped) tensor on the host, read batch by batch.

    ``prefetch`` batches are read ahead by one background thread. ``to(device)`` only says where
    batches go: on CUDA each is gathered into pinned memory and copied on a side stream.
    """

    def __init__(self, data: ImageTensors, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, progress=None, prefetch: int = 3):
        index = ImageTensors(data.row_numbers(), data.labels, data.classes)  # batches of row numbers
        super().__init__(index, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last, progress=progress)
        self.images, self.prefetch, self.device = data.images, max(1, prefetch), torch.device("cpu")

    def to(self, device) -> MmapBatches:
        self.device = torch.device(device)
        return self

    def _read(self, idx: torch.Tensor, labels: torch.Tensor, stream):
        """One batch gathered from the file, on ``self.device`` (with the event that marks its copy)."""
        pin = stream is not None
        images = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        torch.index_select(self.images, 0, idx, out=images)
        if not pin:
            return images.to(self.device), labels.to(self.device), None
        with torch.cuda.stream(stream):
            images = images.to(self.device, non_blocking=True)
            labels = labels.pin_memory().to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return images, labels, event

    @staticmethod
    def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
        """Hand ``item`` to the consumer unless it has stopped; whether it was handed over."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, indices, out: queue.Queue, stop: threading.Event, stream) -> None:
        try:
            for idx, labels in indices:
                if not self._put(out, self._read(idx, labels, stream), stop):
                    return
            self._put(out, None, stop)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(out, e, stop)

    def __iter__(self):
        indices = super().__iter__()
        first = next(indices, None)  # reads ``progress`` here, in the caller's thread
        if first is None:
            return
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        out: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        chain = ((idx, labels) for part in ([first], indices) for idx, labels in part)
        worker = threading.Thread(target=self._produce, args=(chain, out, stop, stream), daemon=True)
        worker.start()
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                images, labels, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    images.record_stream(current)
                    labels.record_stream(current)
                yield images, labels
        finally:
            stop.set()
            worker.join()


def batches_of(data: ImageTensors, batch_size: int, **kwargs) -> IndexBatches:
    """Index batches of ``data``: read from the file a batch at a time when it is memory-mapped."""
    return (MmapBatches if data.mapped else IndexBatches)(data, batch_size, **kwargs)
