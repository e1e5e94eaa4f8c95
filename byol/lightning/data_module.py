"""The training images as one uint8 tensor on the training device, batched by index."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from byol.core.data import ImageTensors, IndexBatches
from byol.core.errors import DataError
from byol.lightning.internals import batches_done_this_epoch


def check_same_data(strategy, data: ImageTensors) -> None:
    """A :class:`DataError` on every process when the processes of a run loaded different data (each loads its own:
    a folder that changed while they started, the nodes' copies differing): their shards would not fit together, and
    the run waited forever in a collective of another length (each rank derives its epoch from its data)."""
    mine = data.fingerprint().to(strategy.root_device)
    every = strategy.all_gather(mine).reshape(-1, mine.numel()).cpu()
    if bool((every == every[0]).all()):
        return
    seen = "; ".join(f"rank {rank}: {int(row[0])} images" + ("" if int(row[0]) != int(every[0][0]) or
                                                               torch.equal(row, every[0]) else " (other content)")
                     for rank, row in enumerate(every))
    raise DataError(f"the {len(every)} processes of this run loaded different training data ({seen}): the folder "
                    f"changed while they started, or the nodes' copies of it differ; give every process the same data "
                    f"and start again")


class TensorDataModule(pl.LightningDataModule):
    """Hands Lightning ``batches`` (already loaded), moved to the training device when ``on_device``.

    A run resumed mid-epoch continues with the batches the uninterrupted run would have seen:
    the batch order is a function of (seed, epoch) and the start is the trainer's own count.
    Under DDP, ``setup`` gives the batches this process's rank and the world size.
    """

    def __init__(self, batches: IndexBatches, on_device: bool = True):
        super().__init__()
        self.batches, self.on_device = batches, on_device
        batches.progress = self._progress

    def _progress(self) -> tuple[int, int]:
        return self.trainer.current_epoch, batches_done_this_epoch(self.trainer)

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            check_same_data(self.trainer.strategy, self.batches.data)
        # under DDP each process trains on its own disjoint share of every epoch (IndexBatches.shard)
        self.batches.shard(self.trainer.global_rank, self.trainer.world_size)
        if self.on_device:
            self.batches.to(self.trainer.strategy.root_device)

    def train_dataloader(self):
        return self.batches


class SplitsDataModule(pl.LightningDataModule):
    """An evaluation protocol's train / val / test batches, moved to the device and, under DDP, each
    split shared among the processes (``IndexBatches.shard``): ``batch_size`` is the protocol's global
    batch, divided among the ranks; training shards are disjoint, and val / test shards are padded so
    that every image is scored once, whatever the number of processes."""

    def __init__(self, train: IndexBatches, val: IndexBatches, test: IndexBatches):
        super().__init__()
        self.splits = {"train": train, "val": val, "test": test}
        self._placed = False

    def setup(self, stage: str) -> None:
        if self._placed:  # fit, then test: once
            return
        self._placed = True
        for batches in self.splits.values():
            batches.shard(self.trainer.global_rank, self.trainer.world_size, split_batch=True)
            batches.to(self.trainer.strategy.root_device)

    def train_dataloader(self):
        return self.splits["train"]

    def val_dataloader(self):
        return self.splits["val"]

    def test_dataloader(self):
        return self.splits["test"]
