"""The Lightning module of the augmented linear protocol and of fine-tuning.

It receives built things (the encoder, numbers, an optimizer factory) and reads no config, so
the same module serves any optimizer or schedule the job builds.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from byol.core.augment import CROP_ONLY, Normalize, ViewAugment
from byol.core.backbone import Encoder
from byol.core.data import NOT_COUNTED
from byol.core.features import concat_features, feature_dim
from byol.core.linear_probe import MakeOptimizer
from byol.core.optim import param_groups
from byol.core.rng import process_keys, step_generator


class ClassifierModule(pl.LightningModule):
    """Encoder + linear classifier for the augmented linear protocol and for fine-tuning.

    The classifier is a BatchNorm without affine parameters (combined features mix scales)
    followed by a linear layer. ``finetune=False``: the encoder is frozen AND kept in eval
    mode, so neither its weights nor its BatchNorm statistics move. ``finetune=True``: both
    are trained, the encoder at ``encoder_lr``. Training images get crop + flip, per sample,
    on the device; validation and test images only the normalisation.

    ``make_optimizer(param_groups, total_steps, steps_per_epoch)`` returns the optimizer and its
    per-step scheduler; each group carries its ``lr`` and ``weight_decay`` (none on biases and
    normalisation parameters).

    Validation and test accuracy are torchmetrics that count correct predictions and images over
    every batch, and under DDP over every rank, so a split is scored as one process would score it;
    images labelled -1 (the padding of a rank's last batch) are not counted.
    """

    def __init__(self, encoder: Encoder, taps: Sequence[str], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], finetune: bool, make_optimizer: MakeOptimizer, lr: float,
                 encoder_lr: float | None = None, weight_decay: float = 0.0, seed: int = 0,
                 channels_last: bool = True):
        super().__init__()
        self.encoder = encoder
        self.taps = list(taps)
        self.finetune = finetune
        self.make_optimizer = make_optimizer
        if finetune and encoder_lr is None:
            raise ValueError("fine-tuning trains the encoder: give its learning rate, encoder_lr")
        self.lr, self.encoder_lr, self.weight_decay = lr, encoder_lr, weight_decay
        self.seed = seed
        dim = feature_dim(encoder, self.taps)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
        self.normalize = Normalize(mean, std)
        self.augment = ViewAugment([CROP_ONLY], mean, std)
        self._generator = None
        # per split: the accuracy (a mean over the counted images) and how many images it counted
        self.accuracy = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self.counted = nn.ModuleDict({split: SumMetric() for split in ("val", "test")})
        self.encoder.requires_grad_(finetune)
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.train()  # a frozen encoder starts in eval mode

    def train(self, mode: bool = True):
        """``module.train()`` switches every submodule to train mode; a frozen encoder stays in eval."""
        super().train(mode)
        if not self.finetune:
            self.encoder.eval()
        return self

    def on_train_epoch_start(self):
        """Lightning keeps the modes it finds (a new module is in train mode): set them each epoch."""
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            features = concat_features(self.encoder(x, taps=self.taps), self.taps)
        return self.head(features.float())

    def _generator_for(self, batch_idx: int) -> torch.Generator:
        """The augmentation's generator, seeded by :func:`~byol.core.rng.process_keys` (with the rank under DDP,
        else every rank drew the same crops for its batch): a run's crops are reproducible."""
        world = self.trainer.world_size if self._trainer is not None else 1
        keys = process_keys(self.seed, self.current_epoch, batch_idx, self.global_rank, world)
        self._generator = step_generator(self._generator, self.device, *keys)
        return self._generator

    def training_step(self, batch, batch_idx):
        images, labels = batch
        (view,) = self.augment(images, self._generator_for(batch_idx))
        logits = self(view)
        loss = F.cross_entropy(logits, labels)
        n = images.shape[0]
        # under DDP: the mean over the ranks (all of them train on batches of the same size)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=n,
                 sync_dist=True)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean(), on_step=False, on_epoch=True,
                 batch_size=n, sync_dist=True)
        return loss

    def _eval_step(self, batch, split: str):
        images, labels = batch
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        counted = labels != NOT_COUNTED
        correct = (self(x).argmax(1) == labels)[counted].float()
        self.accuracy[split].update(correct)
        self.counted[split].update(counted.sum())
        self.log(f"{split}/acc", self.accuracy[split], on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/images", self.counted[split], on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_train_epoch_end(self):
        metrics = self.trainer.callback_metrics
        parts = [f"{k} {float(metrics[k]):.4f}" for k in ("train/loss", "train/acc", "val/acc") if k in metrics]
        self.print(f"[eval] epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: {', '.join(parts)}")

    def configure_optimizers(self):
        groups = [dict(g, lr=self.lr) for g in param_groups([self.head], self.weight_decay)]
        if self.finetune:
            groups += [dict(g, lr=self.encoder_lr) for g in param_groups([self.encoder], self.weight_decay)]
        groups = [g for g in groups if g["params"]]
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        optimizer, scheduler = self.make_optimizer(groups, total, per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
