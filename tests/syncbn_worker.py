"""Run by tests/test_ddp.py (MODE ``single``, in the test's process) and tests/ddp_worker.py (the two-process
modes): three optimizer steps of the smoke config without augmentation (each view is the image itself, so
both runs see the same inputs), either in one process on the global batch (MODE ``single``, batch 64) or on
two DDP CPU processes with synchronised BatchNorm (MODE ``ddp``, batch 32 each). Each rank writes its
per-step losses and final weights and buffers to ``OUT_DIR/<mode>_rank<r>.pt``. MODE ``ddp_local``: two
processes, each normalising over its own 32 images.

torch's ``SyncBatchNorm`` runs on GPUs only (its DDP wrapper refuses it in CPU processes), so here every
BatchNorm of the encoders and heads is replaced by :class:`AllReducedBatchNorm`, which normalises with the
statistics of the global batch from all-reduced sums, as SyncBatchNorm does.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed.nn as dist_nn
from conftest import compose_config, plain_config
from hydra.core.hydra_config import HydraConfig
from torch import nn

from byol.jobs.pretrain_fit import build_datamodule, build_module

NO_AUGMENTATION = ["augment.crop_scale=[1.0,1.0]", "augment.crop_ratio=[1.0,1.0]", "augment.flip_p=0",
                   "augment.jitter_p=0", "augment.grayscale_p=0", "augment.view2.solarize_p=0",
                   "trainer.precision=32-true", "channels_last=false", "monitor=off"]


_GROUP: list = []


def stats_group():
    """A process group of its own: DDP all-reduces gradient buckets from autograd threads while the backward
    of these statistics all-reduces too; on one group the two could be issued in different orders."""
    if not _GROUP:
        _GROUP.append(torch.distributed.new_group(backend="gloo"))
    return _GROUP[0]


class AllReducedBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the batch of every process: sums and counts, then sums of squared deviations from
    the global mean, are all-reduced (with gradients); running statistics as torch keeps them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        totals = dist_nn.all_reduce(torch.cat([x.sum(dims), count]), group=stats_group())
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)  # two passes: E[x^2] - mean^2 loses digits when the mean dwarfs the spread
        var = dist_nn.all_reduce((centred * centred).sum(dims), group=stats_group()) / n
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * n / (n - 1))
            self.num_batches_tracked.add_(1)
        y = centred / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def all_reduced_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm1d/2d below ``module`` by an :class:`AllReducedBatchNorm` holding its state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = AllReducedBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            new.load_state_dict(child.state_dict())
            new.requires_grad_(any(p.requires_grad for p in child.parameters()))  # the target's stay frozen
            setattr(module, name, new)
        else:
            all_reduced_batchnorm(child)


class Losses(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def main(out: Path, mode: str) -> None:
    batch = 64 if mode == "single" else 32
    config = plain_config(compose_config("train", ["experiment=smoke", f"data.batch_size={batch}", *NO_AUGMENTATION],
                                         out))
    HydraConfig.instance().cfg = None  # else Lightning would relaunch rank 1 as a Hydra app
    pl.seed_everything(config["seed"], verbose=False)  # the same initial weights in both runs
    datamodule, module = build_datamodule(config), build_module(config)
    if mode == "ddp":
        all_reduced_batchnorm(module.model)  # mode ddp_local keeps per-process BatchNorm: what the test must tell apart
    losses = Losses()
    strategy = {"devices": 1} if mode == "single" else {"strategy": "ddp", "devices": 2}
    trainer = pl.Trainer(**strategy, accelerator="cpu", max_steps=3, precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[losses])
    trainer.fit(module, datamodule=datamodule)
    state = {name: t.detach().clone() for name, t in module.model.state_dict().items()}
    torch.save({"losses": losses.losses, "state": state, "steps": trainer.global_step,
                "lr": trainer.optimizers[0].param_groups[0]["lr"]}, out / f"{mode}_rank{trainer.global_rank}.pt")

