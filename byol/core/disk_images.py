"""Decoded images larger than memory: the uint8 cache as a memory-mapped ``.npy`` file, and batches
read from it by index in a background thread.

``MmapBatches`` keeps :class:`byol.core.data.IndexBatches`' contract (same order for a seed and an
epoch, the same ``progress`` resume mid-epoch, the same uint8 ``(images, labels)`` batches): it
iterates IndexBatches over the image *indices* and reads each batch's rows from the file, into
pinned memory and onto the device with an asynchronous copy when CUDA is used, a few batches ahead.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from byol.core.checkpoint import new_temp_file, usual_permissions
from byol.core.data import ImageTensors, IndexBatches
from byol.core.errors import DataError

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
