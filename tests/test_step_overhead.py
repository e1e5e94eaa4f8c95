"""What a training step costs the host, where a GPU waits on it: at CIFAR sizes a step on an H100/H200 is
bound by the operators the host dispatches, not by arithmetic (``benchmarks/host_ops.py`` counts them).
Two rules follow, tested here: no operator in a step reads a value back from the device (each such read
stalls the GPU until it has caught up), and the views are augmented in one pass, not one per view."""

from __future__ import annotations

import csv
import functools

import pytest
import pytorch_lightning as pl
import torch
from conftest import add_run_callback, compose_config
from torch.profiler import ProfilerActivity, profile

import byol.jobs.pretrain as pretrain_job
import byol.jobs.pretrain_fit as pretrain_fit
from byol.core import augment
from byol.core.augment import ViewAugment, ViewConfig, joint_config
from byol.lightning.pretrain_module import BYOLModule

# operators after which the host waits for the device: item / float / bool of a tensor, nonzero; and
# torch.tensor(<Python value>) (lift_fresh), which on a GPU is a blocking copy, a wait for the stream
HOST_WAITS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::lift_fresh"}


class ProfileSteps(pl.Callback):
    """The operators of the optimizer steps after ``first`` up to ``last`` (hooks of those steps included)."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.names: list[str] = []

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.first:
            self.prof.start()
        elif trainer.global_step == self.last:
            self.prof.stop()
            self.names = [e.name for e in self.prof.events()]


def run_with(callback, tmp_path, monkeypatch, *overrides: str):
    add_run_callback(monkeypatch, callback)
    run_dir = tmp_path / "run"
    # 8 steps an epoch, metrics written at the 8th only: steps 2-4 are plain steps
    cfg = compose_config("train", ["experiment=smoke", "trainer.max_epochs=1", "data.num_train=256",
                                   "trainer.log_every_n_steps=8", f"hydra.run.dir={run_dir}", *overrides], run_dir)
    pretrain_job.pretrain(cfg, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["classic", "multi"])
def test_training_steps_read_nothing_back_from_the_device(tmp_path, monkeypatch, loss):
    """Steps of a real run (train.py's callbacks: online probes, checkpoint and signal hooks, learning-rate
    monitor; the state kept to undo a stopped step) issue no item / bool / nonzero and make no tensor from
    Python values (on a GPU a blocking copy). The augmentation takes the
    accelerators' path: views joined, the hue rotation a where over the batch (the CPU's picks the chosen
    images with nonzero)."""
    monkeypatch.setattr(augment, "_hue_where", functools.partial(augment._hue_where, subset=False))
    build = pretrain_fit.build_augment
    monkeypatch.setattr(pretrain_fit, "build_augment", lambda *a: (v := build(*a), setattr(v, "join_views", True))[0])
    steps = ProfileSteps(first=1, last=4)
    run_with(steps, tmp_path, monkeypatch, f"loss={loss}")
    assert "aten::convolution" in steps.names  # the window held training steps
    assert "aten::_foreach_lerp_" in steps.names  # ... with their EMA updates
    assert "aten::repeat" in steps.names  # ... and the views made in one pass
    assert sorted(HOST_WAITS & set(steps.names)) == []


@pytest.mark.slow
def test_the_progress_bar_shows_the_step_loss(tmp_path, monkeypatch, capfd):
    """The loss is no longer logged to the bar (a read back every step); the bar reads it when it redraws."""
    run_with(pl.Callback(), tmp_path, monkeypatch, "trainer.enable_progress_bar=true")
    bar = capfd.readouterr().out  # Lightning's bar writes to stdout
    assert "Epoch 1/1" in bar and "loss=" in bar


class StepLosses(pl.Callback):
    """Each optimizer step's loss, by the step's index (counted from 0)."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


@pytest.mark.slow
def test_step_losses_are_logged_only_on_the_steps_whose_metrics_are_written(tmp_path, monkeypatch):
    """Lightning writes step metrics every log_every_n_steps steps; each self.log call costs dozens of
    operators, so the step losses are logged on those steps only, and metrics.csv holds the same rows."""
    logged = []
    log = BYOLModule.log

    def spy(module, name, *args, **kwargs):
        if name.startswith("train/") and name.endswith("_step"):
            logged.append((module.global_step, name))
        return log(module, name, *args, **kwargs)

    monkeypatch.setattr(BYOLModule, "log", spy)
    losses = StepLosses()
    run_with(losses, tmp_path, monkeypatch, "trainer.log_every_n_steps=3", "loss=multi")
    assert sorted(losses.losses) == list(range(8))  # one epoch of 8 steps
    assert sorted({step for step, _ in logged}) == [2, 5]  # the 3rd and 6th steps
    assert {name for _, name in logged} >= {"train/loss_step", "train/loss/avgpool_step", "train/loss/layer3.0_step"}
    rows = [row for row in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if row["train/loss_step"]]
    assert [int(row["step"]) for row in rows] == [2, 5]
    for row in rows:
        assert float(row["train/loss_step"]) == pytest.approx(losses.losses[int(row["step"])], rel=1e-6)


VIEW_PAIRS = {
    "defaults": [ViewConfig(), ViewConfig(solarize_p=0.2)],
    "paper, blur": [ViewConfig(blur_p=1.0), ViewConfig(blur_p=0.1, solarize_p=0.2)],
    "one view plain": [ViewConfig(jitter_p=0.0, grayscale_p=0.0), ViewConfig(blur_p=0.5, solarize_p=0.2)],
}


@pytest.mark.parametrize("name", VIEW_PAIRS)
def test_views_made_in_one_pass_equal_views_made_one_by_one(name):
    """Joining the views' batches changes nothing, bit for bit, also where one view lacks an op the other
    has (its images are drawn that op's identity)."""
    views = VIEW_PAIRS[name]
    images = torch.randint(0, 256, (24, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    joined = ViewAugment(views, [0.5] * 3, [0.25] * 3, size=32, join_views=True)  # the accelerators' way
    assert joined.joint is not None
    one_by_one = ViewAugment(views, [0.5] * 3, [0.25] * 3, size=32)  # on a CPU: one pass per view
    together = joined(images, torch.Generator().manual_seed(4))
    apart = one_by_one(images, torch.Generator().manual_seed(4))
    assert len(together) == len(apart) == 2
    for t, a in zip(together, apart, strict=True):
        assert t.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(t, a)
    assert not torch.equal(together[0], together[1])


def test_views_whose_fixed_settings_differ_are_made_one_by_one():
    """Settings not drawn per image (blur kernel size, solarize threshold) cannot differ within one pass."""
    assert joint_config([ViewConfig(blur_kernel_size=3), ViewConfig(blur_kernel_size=5)]) is None
    assert joint_config([ViewConfig(solarize_threshold=0.5), ViewConfig(solarize_threshold=0.6)]) is None
    joint = joint_config([ViewConfig(jitter_p=0.0, blur_p=1.0), ViewConfig(grayscale_p=0.0, solarize_p=0.2)])
    assert (joint.jitter_p, joint.grayscale_p, joint.blur_p, joint.solarize_p) == (0.8, 0.2, 1.0, 0.2)
