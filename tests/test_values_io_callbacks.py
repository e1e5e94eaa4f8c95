"""RunCheckpoints' files on every rank, the data modules' shares under DDP and the resumed batch position,
and metrics.csv rows kept on resume: exact files, ranks and rows."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import torch

import byol.lightning.data_module as data_module
from byol.core.data import IndexBatches, make_synthetic
from byol.lightning.callbacks import RunCheckpoints
from byol.lightning.csv_logger import ContinuingCSVLogger, kept_rows
from byol.lightning.data_module import SplitsDataModule, TensorDataModule


class Trainer(SimpleNamespace):
    """What RunCheckpoints reads of a Lightning Trainer; ``save_checkpoint`` writes the step into the file."""

    def save_checkpoint(self, path, weights_only=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(str(self.global_step))


def trainer(**kw) -> Trainer:
    return Trainer(**{"num_training_batches": 2, "accumulate_grad_batches": 1, "global_step": 0, "current_epoch": 0,
                      "is_global_zero": True, "world_size": 1, "max_epochs": 1, "max_steps": -1, "should_stop": False,
                      **kw})


def test_only_rank_zero_deletes_older_epoch_checkpoints(tmp_path):
    """Under DDP rank 0 alone writes into the run folder: another rank deletes nothing."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (1, 2):
        (folder / f"epoch{epoch:04d}.ckpt").write_text("rank 0's")
    other = RunCheckpoints(folder, tmp_path, "resume", every_n_epochs=1, keep_last=1)
    other.on_train_epoch_end(trainer(is_global_zero=False, global_step=6, current_epoch=2), None)  # deletes nothing
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0001.ckpt", "epoch0002.ckpt", "epoch0003.ckpt",
                                                       "last.ckpt"]
    rank0 = RunCheckpoints(folder, tmp_path, "resume", every_n_epochs=1, keep_last=1)
    rank0.on_train_epoch_end(trainer(global_step=6, current_epoch=2), None)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0003.ckpt", "last.ckpt"]


def test_fit_end_after_max_steps_mid_epoch_writes_last_ckpt_at_that_step(tmp_path):
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, "resume", last_every_n_steps=100)
    t = trainer(num_training_batches=10)
    for batch in range(3):  # trainer.max_steps=3 ends fitting inside the first epoch
        t.global_step += 1
        cb.on_train_batch_end(t, None, None, None, batch)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    cb.on_fit_end(t, None)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_text() == "3"


# --------------------------------------------------------------------------- data modules


def module_trainer(rank: int, world: int, epoch: int = 0, done: int = 0):
    return SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch,
                           strategy=SimpleNamespace(root_device=torch.device("cpu"),  # every rank: the same data
                                                    all_gather=lambda mine: torch.stack([mine] * world)),
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                               batch_progress=SimpleNamespace(current=SimpleNamespace(ready=done)))))


def test_pretraining_data_module_gives_each_rank_its_share():
    data = make_synthetic(40, size=8)
    reference = IndexBatches(data, 4, seed=3).shard(1, 2)
    dm = TensorDataModule(IndexBatches(data, 4, seed=3), on_device=False)
    dm.trainer = module_trainer(rank=1, world=2)
    dm.setup("fit")
    got = [(x, y) for x, y in dm.train_dataloader()]
    expected = [(x, y) for x, y in reference]
    assert len(got) == len(expected) == 5  # 40 images, 4 per rank and step, 2 ranks
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected, strict=True))


def test_pretraining_data_module_resumes_at_the_trainers_batch():
    data = make_synthetic(40, size=8)
    full = [x for x, _ in IndexBatches(data, 8, seed=5, progress=lambda: (2, 0))]
    dm = TensorDataModule(IndexBatches(data, 8, seed=5), on_device=False)
    dm.trainer = module_trainer(rank=0, world=1, epoch=2, done=3)
    dm.setup("fit")
    resumed = [x for x, _ in dm.train_dataloader()]
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, full[3:], strict=True))
    assert data_module.batches_done_this_epoch(dm.trainer) == 3


def test_evaluation_data_module_divides_the_global_batch_among_ranks():
    data = make_synthetic(24, size=8)
    splits = [IndexBatches(data, 8, seed=0), IndexBatches(data, 8, shuffle=False, drop_last=False),
              IndexBatches(data, 8, shuffle=False, drop_last=False)]
    dm = SplitsDataModule(*splits)
    dm.trainer = module_trainer(rank=1, world=2)
    dm.setup("fit")
    dm.setup("test")  # once: the batch is not halved again
    assert [b.batch_size for b in splits] == [4, 4, 4] and all(b.rank == 1 and b.world_size == 2 for b in splits)
    first = next(iter(dm.val_dataloader()))[1]
    assert first.tolist() == data.labels[4:8].tolist()  # rank 1: the second half of the first global batch


# --------------------------------------------------------------------------- metrics.csv


def test_rows_without_a_step_are_kept_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,note\n0,0,0.5,\n,,,hparams\n0,4,0.4,\n")
    header, rows = kept_rows(path, before_step=3)
    assert header == ["epoch", "step", "train/loss", "note"]
    assert [(r["step"], r["note"]) for r in rows] == [("0", ""), ("", "hparams")]
    logger = ContinuingCSVLogger(tmp_path, keep_before_step=3)
    assert logger.experiment is not None
    with open(path, newline="") as f:
        assert [r["note"] for r in csv.DictReader(f)] == ["", "hparams"]
