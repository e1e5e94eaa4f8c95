"""Lightning wrappers: BYOL pretraining and the device-resident data module.

The method lives in plain modules (``byol.core.model``, ``byol.core.augment``, ``byol.core.ema``); this file
only connects them to Lightning's loop, checkpoints and logs.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from byol.core.augment import ViewAugment, ViewConfig
from byol.core.ema import tau_at
from byol.core.errors import NonFiniteLossError
from byol.core.optim import build_optimizer, build_schedule, param_groups
from byol.data import IndexBatches, load_split, seeded_subset


def rng_state() -> dict:
    """Every global RNG as tensors/plain types (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class BYOLModule(pl.LightningModule):
    """BYOL pretraining step: augment on the device, both networks forward, EMA after each step.

    ``cfg`` is the run's resolved config as a plain dict; it is saved in every checkpoint so
    the model can be rebuilt from the checkpoint alone.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        from byol.jobs.build import build_byol  # moves out when the module receives built objects

        self.model = build_byol(cfg)
        if cfg.get("channels_last", True):
            self.model.to(memory_format=torch.channels_last)
        aug, data = cfg["augment"], cfg["data"]
        self.augment = ViewAugment([ViewConfig.from_dict(aug["view1"]), ViewConfig.from_dict(aug["view2"])],
                                   data["mean"], data["std"], data.get("crop_size"))
        self._generator = None
        self._first_bad_step = None
        self._skip_ema = False
        self._epoch_sums: dict = {}  # see _accumulate_epoch_means
        self.skipped_steps = 0
        self.last_good_checkpoint = None  # set by the training script
        self.last_saved_step = None  # global step of the newest checkpoint written or loaded
        if cfg.get("compile"):
            self.model.compile()

    # ---------------------------------------------------------------- training
    def _step_generator(self, batch_idx: int) -> torch.Generator:
        """Augmentation randomness is a function of (seed, epoch, batch): exact on resume."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        seed = hash((int(self.cfg["seed"]), self.current_epoch, batch_idx)) & (2**63 - 1)
        return self._generator.manual_seed(seed)

    def training_step(self, batch, batch_idx):
        images = batch[0]
        view1, view2 = self.augment(images, self._step_generator(batch_idx))
        skip_mode = self.cfg["train"]["on_nonfinite"] == "skip"
        if skip_mode:  # forward passes update BatchNorm statistics: keep a copy to undo a bad step
            buffers = list(self.model.buffers())
            saved = [b.clone() for b in buffers]
        losses = self.model(view1, view2)
        loss = losses["loss"]
        finite = torch.isfinite(loss)
        self._skip_ema = False
        if skip_mode:
            if not finite:  # one host sync per step, the price of skipping
                for b, s in zip(buffers, saved, strict=True):
                    b.copy_(s)
                self._skip_ema = True
                self.skipped_steps += 1
                self.print(f"[byol] non-finite loss at step {self.global_step}; skipping this step "
                           f"({self.skipped_steps} skipped so far)")
                return None  # Lightning then skips backward; the optimizer sees no gradients
        else:  # record the first bad step on the device, checked without a per-step sync
            # a fill, not a host-to-device copy
            step = torch.full((), self.global_step, device=loss.device, dtype=torch.long)
            if self._first_bad_step is None:
                self._first_bad_step = torch.full((), -1, device=loss.device, dtype=torch.long)
            first = self._first_bad_step
            self._first_bad_step = torch.where(~finite & (first < 0), step, first)
        self._accumulate_epoch_means(losses, images.shape[0])
        for name, value in losses.items():
            self.log(f"train/{name}_step", value.detach(), prog_bar=name == "loss")
        return loss

    def _accumulate_epoch_means(self, losses: dict, n: int) -> None:
        """Running sums for the ``train/*_epoch`` means, kept here (not in Lightning's logger
        state, which checkpoints do not hold) so an epoch resumed midway reports its full mean."""
        if self._epoch_sums.get("epoch") != self.current_epoch:
            self._epoch_sums = {"epoch": self.current_epoch, "images": 0, "sums": {}}
        sums = self._epoch_sums["sums"]
        for name, value in losses.items():
            total = value.detach().float() * n
            sums[name] = sums[name].to(total.device) + total if name in sums else total  # .to: after a load
        self._epoch_sums["images"] += n

    def optimizer_step(self, *args, **kwargs):
        """EMA right after each real optimizer step (so never on accumulation micro-batches)."""
        super().optimizer_step(*args, **kwargs)
        if not self._skip_ema:
            # Lightning counts this step in global_step only after this hook returns
            self.model.update_target(self.current_tau(self.global_step))

    def current_tau(self, step: int | None = None) -> float:
        step = self.global_step if step is None else step
        ema = self.cfg["ema"]
        return tau_at(step, self.trainer.estimated_stepping_batches - 1, ema["tau_base"], ema["tau_schedule"])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite()
            self.log("train/tau", self.current_tau(), on_step=True, on_epoch=False)

    def epoch_means(self) -> dict[str, torch.Tensor]:
        """Mean of each loss (``loss``, ``loss/<tap>``) over the current epoch so far."""
        if self._epoch_sums.get("epoch") != self.current_epoch or not self._epoch_sums["images"]:
            return {}
        return {name: total / self._epoch_sums["images"] for name, total in self._epoch_sums["sums"].items()}

    def on_train_epoch_end(self):
        self.check_finite()
        for name, mean in self.epoch_means().items():
            self.log(f"train/{name}_epoch", mean)

    def _last_good(self) -> str:
        last = self.last_good_checkpoint
        if last and Path(last).exists():
            n = self.last_saved_step
            after = f", saved after {n} step{'s' * (n != 1)}" if n is not None else ""
            return f"the last good checkpoint is {last}{after}"
        return "no checkpoint was saved before it"

    def check_finite(self) -> None:
        """Stop with the first bad step named; costs one sync, so called every few steps."""
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            raise NonFiniteLossError(
                f"loss became NaN/inf at optimizer step {int(self._first_bad_step)} (counted from 0); "
                f"{self._last_good()}. Lower optim.base_lr, check the data, or set "
                f"train.on_nonfinite=skip to skip such steps")

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        o = self.cfg["optim"]
        batch = self.cfg["data"]["batch_size"] * self.trainer.accumulate_grad_batches
        lr = o["base_lr"] * (batch / 256 if o.get("scale_lr_with_batch", True) else 1.0)
        modules = [self.model.online_encoder, self.model.online_projectors, self.model.predictors]
        groups = param_groups(modules, o["weight_decay"])
        optimizer = build_optimizer(o["name"], groups, lr, o.get("optimizer"))
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        sched = dict(o["scheduler"])
        warmup = int(sched.pop("warmup_epochs", 0) * per_epoch)
        scheduler = build_schedule(sched.pop("name"), optimizer, total, warmup, sched)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to save non-finite weights; store the config and RNG states for exact resumption.

        The augmentation generator needs no saved state: it is re-seeded every step from
        ``(seed, epoch, batch index)`` (:meth:`_step_generator`), so a resumed run draws the
        same views; ``augment_rng`` records that rule.
        """
        self.check_finite()
        tensors = [t.detach() for t in self.model.parameters()]
        tensors += [b for b in self.model.buffers() if b.is_floating_point()]
        # element-wise, not a norm: the norm of huge but finite weights overflows to inf
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise NonFiniteLossError(
                f"weights became NaN/inf by optimizer step {self.global_step}; nothing was saved and "
                f"{self._last_good()}. Lower optim.base_lr or set train.on_nonfinite=skip")
        checkpoint["byol_config"] = self.cfg
        checkpoint["rng"] = rng_state()
        rule = "reseeded every step: manual_seed(hash((seed, epoch, batch_idx)) & (2**63 - 1))"
        checkpoint["augment_rng"] = {"seed": int(self.cfg["seed"]), "rule": rule}
        sums = {k: v.cpu() for k, v in self._epoch_sums.get("sums", {}).items()}
        checkpoint["epoch_loss_sums"] = {**self._epoch_sums, "sums": sums}
        self.last_saved_step = int(checkpoint.get("global_step", self.global_step))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        self.last_saved_step = checkpoint.get("global_step")
        self._epoch_sums = checkpoint.get("epoch_loss_sums") or {}


class TensorDataModule(pl.LightningDataModule):
    """The training images as one uint8 tensor on the training device, batched by index."""

    def __init__(self, data_cfg: dict, seed: int, on_device: bool = True):
        super().__init__()
        self.cfg, self.seed, self.on_device = data_cfg, seed, on_device
        self.batches = None

    def prepare(self) -> IndexBatches:
        """Load (and decode/cache) the data; separate from ``setup`` so errors surface early."""
        if self.batches is None:
            data = seeded_subset(load_split(self.cfg, "train"), self.cfg.get("subset"), self.seed)
            self.batches = IndexBatches(data, self.cfg["batch_size"], seed=self.seed, progress=self._progress)
        return self.batches

    def _progress(self) -> tuple[int, int]:
        loop = self.trainer.fit_loop
        return self.trainer.current_epoch, loop.epoch_loop.batch_progress.current.ready

    def setup(self, stage: str) -> None:
        batches = self.prepare()
        if self.on_device:
            batches.to(self.trainer.strategy.root_device)

    def train_dataloader(self):
        return self.batches

