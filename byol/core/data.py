"""Datasets as uint8 tensors (N, 3, H, W), and batches sampled by index on the training device.

Decoding images once and keeping them as one tensor (150 MB for CIFAR-10's training set)
removes the DataLoader worker pipeline that starves BYOL on small images: a batch is an
index into that tensor, and augmentation happens on the device (``byol.core.augment``).
Image folders are read by ``byol.core.image_folder``; the config picks a dataset in
``byol.jobs.datasets``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from byol.core.errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# torchvision reads the names from stl10_binary/class_names.txt; these are its lines, for a copy without it.
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

DIGEST_BYTES = 32  # SHA-256
# The label of an image that no metric counts: unlabelled, or the padding of an evaluation shard.
NOT_COUNTED = -1


@dataclass
class ImageTensors:
    """Images (N, 3, H, W) uint8 and labels (N,) int64 (-1 where unlabelled).

    ``mapped``: ``images`` is read by index rather than held as this dataset's own tensor (a memory-mapped
    file, ``byol.core.disk_images``, or another dataset's tensor: :meth:`by_reference`), and this dataset is
    its ``rows`` (None: every row). A subset of mapped images stays mapped, so the splits of a dataset larger
    than memory are too; :meth:`pixels` reads images. ``digests``: each image's :func:`image_digests`, (N, 32)
    uint8, when known (kept with a folder's decoded cache: hashing a folder larger than memory reads all of it).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    mapped: bool = False
    rows: torch.Tensor | None = None
    digests: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0] if self.rows is None else self.rows.shape[0]

    def subset(self, index: torch.Tensor) -> ImageTensors:
        digests = None if self.digests is None else self.digests[index]
        if self.mapped:  # row numbers only: nothing is read
            return ImageTensors(self.images, self.labels[index], self.classes, True, self.row_numbers()[index], digests)
        return ImageTensors(self.images[index], self.labels[index], self.classes, digests=digests)

    def by_reference(self) -> ImageTensors:
        """This dataset, with subsets that keep row numbers instead of copies (as mapped images do): for splits
        of which only samples are read (the online monitors' kNN bank and queries)."""
        return ImageTensors(self.images, self.labels, self.classes, True, self.rows, self.digests)

    def fingerprint(self, sample: int = 256) -> torch.Tensor:
        """Int64 numbers that differ between two datasets that differ in size, image shape, labels or the pixels
        of ``sample`` images spread over it (:func:`spread_rows`; read: cheap for a dataset larger than memory),
        for processes that must hold the same data to compare: the image shape and the SHA-256 of the labels
        and of those images' :func:`digest_tensor` (kept digests are not computed again)."""
        h = hashlib.sha256(self.labels.to("cpu", torch.int64).numpy().tobytes())
        h.update(digest_tensor(self.subset(spread_rows(len(self), sample))).numpy().tobytes())
        words = np.frombuffer(h.digest(), dtype=np.int64).tolist()
        return torch.tensor([len(self), *self.images.shape[1:], *words], dtype=torch.int64)

    def row_numbers(self) -> torch.Tensor:
        """The rows of ``images`` this dataset holds, in its order."""
        return torch.arange(self.images.shape[0]) if self.rows is None else self.rows

    def pixels(self, index: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The uint8 images at ``index`` (positions in this dataset); of mapped images only those rows are read."""
        if self.rows is None:
            return self.images[index]
        return self.images[self.rows[index].to(self.images.device)]

    def to(self, device) -> ImageTensors:
        """The dataset in memory on ``device`` (mapped images are read: for samples of them, not the whole)."""
        return ImageTensors(self.pixels().to(device), self.labels.to(device), self.classes, digests=self.digests)


# --------------------------------------------------------------------------- torchvision datasets


def _open_torchvision(dataset_class, title: str, root: str, download: bool, **kwargs):
    """``dataset_class(root, ...)``, or a one-line DataError that says how to get the files
    without a network: the first run on a cluster node often has none."""
    try:
        return dataset_class(root, download=download, **kwargs)
    except Exception as e:  # no network, a damaged archive, missing files
        folder = dataset_class.base_folder
        files = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
        missing = [name for name in files if not (Path(root) / folder / name).is_file()]
        if not download and not (Path(root) / folder).is_dir():
            reason = f"no '{folder}' folder there"
        elif not download and missing:
            reason = f"'{folder}' lacks {', '.join(missing)}"
        else:
            reason = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]
        get = ("let the download run on a machine with internet access" if download
               else "set data.download=true (needs internet access)")
        raise DataError(
            f"could not load {title} from '{Path(root).resolve()}' ({reason}). Either {get}, copy the "
            f"extracted '{folder}' folder (from {dataset_class.url}) into that folder, or use an image "
            f"folder instead: data=imagefolder data.root=DIR (DIR/train/<class>/*.png)"
        ) from None


def _cifar_tensors(ds, classes) -> ImageTensors:
    """torchvision's CIFAR arrays (N, H, W, 3) as ImageTensors (N, 3, H, W)."""
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return ImageTensors(images, torch.tensor(ds.targets, dtype=torch.long), tuple(classes))


def load_cifar10(root: str, train: bool, download: bool = True) -> ImageTensors:
    """CIFAR-10 through torchvision (downloaded into ``root`` when missing)."""
    from torchvision.datasets import CIFAR10

    return _cifar_tensors(_open_torchvision(CIFAR10, "CIFAR-10", root, download, train=train), CIFAR10_CLASSES)


def load_cifar100(root: str, train: bool, download: bool = True) -> ImageTensors:
    """CIFAR-100 through torchvision: 100 classes (the fine labels), names from its ``meta`` file."""
    from torchvision.datasets import CIFAR100

    ds = _open_torchvision(CIFAR100, "CIFAR-100", root, download, train=train)
    return _cifar_tensors(ds, ds.classes)


STL10_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")


def load_stl10(root: str, split: str, download: bool = True) -> ImageTensors:
    """STL-10 through torchvision: ``train`` (5,000 labelled 96x96 images), ``test`` (8,000),
    ``unlabeled`` (100,000, label -1) or ``train+unlabeled`` (the images to pretrain on)."""
    from torchvision.datasets import STL10

    if split not in STL10_SPLITS:  # torchvision's own refusal would read as missing files
        raise DataError(f"unknown STL-10 split '{split}'; choose one of: {', '.join(STL10_SPLITS)}")
    ds = _open_torchvision(STL10, "STL-10", root, download, split=split)
    images = torch.from_numpy(np.ascontiguousarray(ds.data))  # torchvision already made it (N, 3, H, W)
    labels = torch.from_numpy(ds.labels.astype(np.int64))  # unlabelled images: -1
    return ImageTensors(images, labels, tuple(getattr(ds, "classes", STL10_CLASSES)))


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


def seeded_subset(data: ImageTensors, n: int | None, seed: int) -> ImageTensors:
    """``n`` images chosen with a fixed seed (all of them when ``n`` is None or too large)."""
    if not n or n >= len(data):
        return data
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[:n])


def spread_rows(n: int, sample: int) -> torch.Tensor:
    """At most ``sample`` row numbers spread evenly over ``n`` rows, first and last included: the images a check
    reads of a dataset it cannot read whole."""
    return torch.linspace(0, max(n - 1, 0), min(n, sample)).long().unique()


def digest_tensor(data: ImageTensors) -> torch.Tensor:
    """:func:`image_digests` as an (N, 32) uint8 tensor, to keep beside the images."""
    joined = np.frombuffer(b"".join(image_digests(data)), dtype=np.uint8)
    return torch.from_numpy(joined.copy()).reshape(-1, DIGEST_BYTES)


def image_digests(data: ImageTensors) -> list[bytes]:
    """The SHA-256 of each image's decoded uint8 pixels: equal for byte-identical files (and for
    any two files that decode to the same pixels), distinct otherwise. About 0.3 s for the
    50,000 CIFAR-10 training images on one core (decoding them takes about 15 s); those ``data`` holds
    already (a folder's cache keeps them) are not computed again."""
    if data.digests is not None and data.digests.shape == (len(data), DIGEST_BYTES):
        return [bytes(row) for row in data.digests.numpy()]
    digests = []
    for start in range(0, len(data), 4096):  # a chunk at a time: mapped images are read, never all held
        rows = data.pixels(slice(start, start + 4096)).reshape(-1, data.images[0].numel())
        digests += [hashlib.sha256(row).digest() for row in rows.cpu().contiguous().numpy()]
    return digests


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


def split_in_place(data: ImageTensors, first: torch.Tensor, second: torch.Tensor) -> tuple[ImageTensors, ImageTensors]:
    """``(data.subset(first), data.subset(second))`` for in-memory images, without a copy: ``data``'s rows are
    reordered in place (one cycle of the permutation at a time, one row held aside), and the two parts are
    views of its tensor. ``data`` itself is used up: its rows are no longer where its labels say. An
    evaluation's training split held the whole set twice while its validation images were taken out."""
    order = torch.cat([first, second])
    if data.mapped or len(order) != len(data) or len(data) == 0:  # nothing to gain, or not a permutation
        return data.subset(first), data.subset(second)
    rows, source = data.images.numpy(), order.tolist()
    done = bytearray(len(source))
    for start in range(len(source)):
        if done[start] or source[start] == start:
            continue
        aside, at = rows[start].copy(), start
        while True:  # row at <- row source[at], along the cycle back to start
            done[at] = 1
            if source[at] == start:
                rows[at] = aside
                break
            rows[at] = rows[source[at]]
            at = source[at]
    images, labels, n = data.images, data.labels[order], len(first)
    digests = None if data.digests is None else data.digests[order]
    return (ImageTensors(images[:n], labels[:n], data.classes, digests=None if digests is None else digests[:n]),
            ImageTensors(images[n:], labels[n:], data.classes, digests=None if digests is None else digests[n:]))


# --------------------------------------------------------------------------- batching


class IndexBatches:
    """Shuffled batches of a tensor dataset, drawn by index: no DataLoader, no workers.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``. ``progress``, when
    given, returns ``(epoch, batches already done in it)`` from the trainer at the start of
    each pass, so a run resumed mid-epoch continues with exactly the batches the
    uninterrupted run would have seen, with no loader state to save.

    Under data parallelism (:meth:`shard`, ``world_size`` > 1) each step takes the next
    ``batch_size x world_size`` images of the epoch's permutation and rank ``r`` trains on the
    ``r``-th ``batch_size`` of them: the ranks' batches are disjoint, every rank has the same number
    of batches, and the images beyond the last full global batch (fewer than ``batch_size x
    world_size``, different ones each epoch) are dropped. Evaluation batches (``drop_last=False``)
    instead lose no image: the last global batch is padded so that every rank has the same number of
    batches (a rank that ran out would leave the others waiting), and the padding is labelled -1
    (:data:`NOT_COUNTED`), which the metrics skip, so every image counts exactly once across ranks.
    """

    def __init__(self, data: ImageTensors, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, progress=None):
        if batch_size > len(data) and drop_last:
            raise DataError(f"data.batch_size={batch_size} is larger than the dataset ({len(data)} images), "
                            f"so an epoch would have no full batch; set data.batch_size to at most "
                            f"{len(data)} or use more images (a larger data.subset, or data.subset=null)")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle, self.drop_last, self.progress = shuffle, drop_last, progress
        self.rank, self.world_size = 0, 1
        self._passes = 0

    def check_world(self, world_size: int) -> None:
        """A :class:`DataError` when ``world_size`` processes of a batch each find no full global batch."""
        if self.drop_last and self.batch_size * world_size > len(self.data):
            raise DataError(f"data.batch_size={self.batch_size} x {world_size} processes is more than the "
                            f"dataset ({len(self.data)} images), so an epoch would have no full global batch; "
                            f"lower data.batch_size or use more images")

    def shard(self, rank: int, world_size: int, split_batch: bool = False) -> IndexBatches:
        """Take rank ``rank``'s share of every epoch (see the class notes); (0, 1): all of it.
        ``split_batch``: ``batch_size`` is the global batch, divided among the processes (evaluation
        keeps its protocol's batch whatever the number of devices); otherwise it is per process."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size} processes")
        if split_batch and world_size > 1:
            if self.batch_size % world_size:
                raise DataError(f"a batch of {self.batch_size} images cannot be split evenly among {world_size} "
                                f"processes; choose a batch size divisible by {world_size}")
            self.batch_size //= world_size
        self.check_world(world_size)
        self.rank, self.world_size = int(rank), int(world_size)
        return self

    def to(self, device) -> IndexBatches:
        self.data = self.data.to(device)
        return self

    def __len__(self) -> int:
        n, step = len(self.data), self.batch_size * self.world_size
        return n // step if self.drop_last else -(-n // step)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.data))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.data), generator=gen)

    def __iter__(self):
        epoch, start = self.progress() if self.progress else (self._passes, 0)
        self._passes += 1
        order = self.order(epoch).to(self.data.labels.device)
        step, offset = self.batch_size * self.world_size, self.rank * self.batch_size
        padded = self.world_size > 1 and not self.drop_last
        for b in range(start, len(self)):
            first = b * step + offset
            if padded and first + self.batch_size > len(order):
                yield self._padded(order, first)
                continue
            idx = order[first:first + self.batch_size]
            yield self.data.pixels(idx), self.data.labels[idx]

    def _padded(self, order: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the last, short global batch, filled up to ``batch_size`` with copies
        of image 0 labelled :data:`NOT_COUNTED` (see the class notes)."""
        positions = torch.arange(first, first + self.batch_size, device=order.device)
        real = positions < len(order)
        idx = torch.where(real, order[positions.clamp(max=len(order) - 1)], order[0])
        labels = torch.where(real, self.data.labels[idx], torch.full_like(self.data.labels[idx], NOT_COUNTED))
        return self.data.pixels(idx), labels
