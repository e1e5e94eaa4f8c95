"""Lightning adapter for BYOL pretraining: the step, the EMA after each optimizer step, checkpoints.

The method lives in :mod:`byol.core` (model, augmentation, EMA schedule); this module receives
those objects already built and connects them to Lightning's loop, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from byol.core.augment import ViewAugment
from byol.core.checkpoint import epochs_done, mid_epoch
from byol.core.ema import tau_at
from byol.core.errors import NonFiniteLossError
from byol.core.model import BYOL
from byol.core.optim import read_schedule_at_offset
from byol.core.rng import process_keys, rng_state, rng_state_problem, set_rng_state, step_generator
from byol.core.state_check import optimizer_problem, scheduler_problem, shown, tensors_problem, weights_problem
from byol.lightning.callbacks import optimizer_steps_per_epoch
from byol.lightning.checkpoint_io import damaged_checkpoint, layout_problem, lightning_fields_problem, loss_sums_problem
from byol.lightning.internals import epoch_cut_short, is_last_batch, logs_this_step, write_step_row

# (modules to optimise, total optimizer steps, epochs, world size) -> (optimizer, per-step LR scheduler)
OptimizerFactory = Callable[[Sequence[nn.Module], int, int, int], tuple]


class BYOLModule(pl.LightningModule):
    """BYOL pretraining step: augment on the device, both networks forward, EMA after each step.

    Args:
        model: the online and target networks.
        augment: the two per-image view augmentations (on the device).
        make_optimizer: builds the optimizer and schedule once the number of steps is known.
        tau_base, tau_schedule: the EMA coefficient and its schedule (:func:`byol.core.ema.tau_at`).
        seed: augmentation randomness is a function of (seed, epoch, batch): exact on resume.
        skip_nonfinite: skip a step whose loss is NaN/inf instead of stopping.
        schedule_epochs: the epochs the learning-rate and tau schedules span, when more than the run's
            (:meth:`schedule_steps`).
        run_config: stored in every checkpoint so the run can be rebuilt from it; never read here.
        checkpoint_path: where ``last.ckpt`` is written, named in the non-finite error.
    """

    def __init__(self, model: BYOL, augment: ViewAugment, make_optimizer: OptimizerFactory, *,
                 tau_base: float, tau_schedule: str, seed: int, skip_nonfinite: bool = False,
                 run_config: dict | None = None, checkpoint_path: Path | None = None,
                 schedule_epochs: int | None = None):
        super().__init__()
        self.schedule_epochs = schedule_epochs
        self.model, self.augment, self.make_optimizer = model, augment, make_optimizer
        self.tau_base, self.tau_schedule, self.seed = tau_base, tau_schedule, int(seed)
        self.skip_nonfinite, self.run_config = skip_nonfinite, run_config or {}
        self.checkpoint_path = checkpoint_path
        self._generator: torch.Generator | None = None
        self._first_bad_step: torch.Tensor | None = None
        self._window_skipped = False  # a micro-batch since the last optimizer step was skipped (non-finite)
        self._epoch_sums: dict = {}  # see _accumulate_epoch_means
        self.skipped_steps = 0
        self.last_saved_step: int | None = None  # global step of the newest checkpoint written or loaded
        self.undoable = False  # keep what a step changes before its optimizer step, to undo it (undo_step)
        self._step_start: tuple | None = None
        self._kept_buffers: list[torch.Tensor] | None = None  # step_start_state's copies of the buffers
        self._resumed: tuple | None = None  # a checkpoint's (step, epochs done, byol_layout, mid_epoch)

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        images = batch[0]
        self._generator = step_generator(self._generator, self.device, *self.step_keys(batch_idx))
        view1, view2 = self.augment(images, self._generator)
        if self.skip_nonfinite or self.undoable:
            self._step_start = self.step_start_state()
        losses = self.model(view1, view2)
        loss = losses["loss"]
        finite = torch.isfinite(loss)
        if self.skip_nonfinite and not finite:  # one host sync per step, the price of skipping
            self.undo_step()
            self._window_skipped = True
            self.skipped_steps += 1
            self._this_epochs_sums()["skipped"] = self.skipped_this_epoch() + 1
            self.print(f"[byol] non-finite loss at step {self.global_step}; skipping this step "
                       f"({self.skipped_steps} skipped so far)")
            return None  # Lightning then skips backward; the optimizer sees no gradients
        if not self.skip_nonfinite:
            self._record_first_bad_step(finite, loss.device)
        self._accumulate_epoch_means(losses, images.shape[0])
        if self._trainer is None or logs_this_step(self.trainer):  # other steps' values are never written
            for name, value in losses.items():
                self.log(f"train/{name}_step", value.detach())  # not prog_bar: Lightning would read it back every step
        return loss

    def step_start_state(self) -> tuple:
        """What a step changes before its optimizer step: the BatchNorm buffers (the forward passes
        update them) and the epoch's loss sums. Weights and optimizer state change only at the step.

        The buffers are copied into tensors kept from step to step, in one fused copy: cloning them
        one by one was over a hundred operators a step, each a kernel launch on a GPU."""
        buffers = list(self.model.buffers())
        kept = self._kept_buffers
        if kept is None or len(kept) != len(buffers) or (buffers and kept[0].device != buffers[0].device):
            kept = self._kept_buffers = [b.clone() for b in buffers]
        elif kept:
            torch._foreach_copy_(kept, buffers)
        return kept, {**self._epoch_sums, "sums": dict(self._epoch_sums.get("sums", {}))}

    def undo_step(self) -> None:
        """Back to the state before the current step's forward passes (a skipped non-finite step, or
        a step stopped midway by a signal, whose checkpoint then holds the state after the previous step)."""
        buffers, sums = self._step_start
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers, strict=True):
                b.copy_(saved)
        self._epoch_sums = sums

    def step_keys(self, batch_idx: int) -> tuple[int, ...]:
        """:func:`~byol.core.rng.process_keys` of this step and process."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return process_keys(self.seed, self.current_epoch, batch_idx, self.global_rank, world)

    def _record_first_bad_step(self, finite: torch.Tensor, device) -> None:
        """Kept on the device, checked without a per-step host sync."""
        step = torch.full((), self.global_step, device=device, dtype=torch.long)  # a fill, not a copy
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        first = self._first_bad_step
        self._first_bad_step = torch.where(~finite & (first < 0), step, first)

    def _accumulate_epoch_means(self, losses: dict, n: int) -> None:
        """Running sums for the ``train/*_epoch`` means, kept here (not in Lightning's logger
        state, which checkpoints do not hold) so an epoch resumed midway reports its full mean."""
        sums = self._this_epochs_sums()["sums"]
        for name, value in losses.items():
            total = value.detach().float() * n
            sums[name] = sums[name].to(total.device) + total if name in sums else total  # .to: after a load
        self._epoch_sums["images"] += n

    def _this_epochs_sums(self) -> dict:
        """The running sums of the current epoch, started afresh at its first step."""
        if self._epoch_sums.get("epoch") != self.current_epoch:
            self._epoch_sums = {"epoch": self.current_epoch, "images": 0, "sums": {}}
        return self._epoch_sums

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """EMA right after each real optimizer step (never on accumulation micro-batches, nor on a step that
        16-mixed's gradient scaler skipped for inf/NaN gradients).

        A non-finite micro-batch skipped (``train.on_nonfinite=skip``) skips its whole accumulation window:
        the optimizer step, on the other micro-batches' gradients alone, would be a fraction of a step (each
        loss is divided by the window's length), and the EMA after it. The closure then returns None, which
        Lightning's gradient scaler reads as "no step", and leaves no gradient for the optimizer to apply."""
        def closure():
            result = optimizer_closure() if optimizer_closure is not None else None
            if self._window_skipped:
                optimizer.zero_grad(set_to_none=True)
                return None
            return result

        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed's GradScaler, if any
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        # the scaler lowers its scale when it skips a step for inf/NaN gradients (common in the first steps):
        # no online update, so no EMA either; its step already synchronised, so reading the scale is cheap
        scaler_skipped = scale is not None and scaler.get_scale() < scale
        if not self._window_skipped and not scaler_skipped:
            # Lightning counts this step in global_step only after this hook returns
            self.model.update_target(self.current_tau(self.global_step))
        self._window_skipped = False

    def current_tau(self, step: int | None = None) -> float:
        step = self.global_step if step is None else step
        return tau_at(step - self.step_offset(), self.schedule_steps() - 1, self.tau_base, self.tau_schedule)

    def last_tau(self) -> float:
        """The tau of the latest optimizer step's EMA update (logged after that step has been counted)."""
        return self.current_tau(max(self.global_step - 1, 0))

    def schedule_epochs_and_steps(self) -> tuple[int, int]:
        """The epochs and optimizer steps the learning-rate and tau schedules span (:func:`schedule_span`);
        they are read at the step count less :meth:`step_offset`."""
        trainer = self.trainer
        run_steps = int(trainer.estimated_stepping_batches)  # first: it sets up the data, which counts the batches
        return schedule_span(run_steps, trainer.max_epochs, self.epoch_steps(), self.schedule_epochs)

    def epoch_steps(self) -> int:
        """Optimizer steps in an epoch of each process (the run's steps for training data without a length)."""
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            return int(self.trainer.estimated_stepping_batches)
        return optimizer_steps_per_epoch(batches, self.trainer.accumulate_grad_batches)

    def step_offset(self) -> int:
        """Steps by which this run's step count differs from its epochs x :meth:`epoch_steps`: 0, unless it
        continues a checkpoint whose epochs were cut into another number of steps (another world size,
        batch or accumulation). Its steps done, less what its finished epochs come to now: the schedules go
        on from where the run stands in its epochs (read at step - offset). Counted in steps alone, a run
        continued on twice the processes stood at its schedules' end already (lr 0 and tau 1 for the rest).
        A run with no epoch count (bounded by ``trainer.max_steps`` alone) gets none. A checkpoint of an earlier
        version keeps no layout: taken at an epoch's end, its offset is worked out the same way."""
        if self._resumed is None or (self.trainer.max_epochs or 0) < 1:
            return 0
        step, epochs, layout, inside_an_epoch = self._resumed
        if layout and layout["epoch_steps"] == self.epoch_steps():
            return layout["step_offset"]
        if inside_an_epoch:  # the same cut of its epoch (refused otherwise) or an earlier version's file
            return layout["step_offset"] if layout else 0
        return step - epochs * self.epoch_steps()

    def layout(self) -> dict:
        """How this run cuts its epochs into steps, kept in each checkpoint (``byol_layout``) for
        :meth:`step_offset` and for the refusal of a mid-epoch checkpoint resumed under another cut."""
        return {"epoch_steps": self.epoch_steps(), "world_size": int(self.trainer.world_size),
                "step_offset": self.step_offset()}

    def schedule_steps(self) -> int:
        return self.schedule_epochs_and_steps()[1]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite()
            # float64: a float would be logged as float32 (0.96 -> 0.9599999785), unlike the row written below
            self.log("train/tau", torch.tensor(self.last_tau(), dtype=torch.float64), on_step=True, on_epoch=False)
        elif is_last_batch(self.trainer, batch_idx) and not logs_this_step(self.trainer):
            write_step_row(self.trainer, {"train/tau": self.last_tau()})  # the curve ends where the epoch does

    def epoch_means(self) -> dict[str, torch.Tensor]:
        """Mean of each loss (``loss``, ``loss/<tap>``) over the current epoch so far."""
        if self._epoch_sums.get("epoch") != self.current_epoch or not self._epoch_sums["images"]:
            return {}
        return {name: total / self._epoch_sums["images"] for name, total in self._epoch_sums["sums"].items()}

    def skipped_this_epoch(self) -> int:
        """Non-finite steps skipped in the current epoch (``train.on_nonfinite=skip``)."""
        return int(self._epoch_sums.get("skipped", 0)) if self._epoch_sums.get("epoch") == self.current_epoch else 0

    def on_train_epoch_end(self):
        self.check_finite()
        if epoch_cut_short(self.trainer):
            return  # a stop limit cut the epoch: its rows are logged once, when a resumed run ends it
        for name, mean in self.epoch_means().items():
            self.log(f"train/{name}_epoch", mean, sync_dist=True)  # under DDP: the mean over the ranks
        if self.skip_nonfinite:  # a column that says which epochs' points stand on fewer steps, or on none
            self.log("train/skipped_steps_epoch", float(self.skipped_this_epoch()), rank_zero_only=True)

    def _last_good(self) -> str:
        last = self.checkpoint_path
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
    def optimized_modules(self) -> list[nn.Module]:
        return [self.model.online_encoder, self.model.online_projectors, self.model.predictors]

    def configure_optimizers(self):
        epochs, total = self.schedule_epochs_and_steps()
        # the global batch (learning-rate scaling) counts every process: devices x nodes
        world = int(self.trainer.world_size)
        optimizer, scheduler = self.make_optimizer(self.optimized_modules(), total, epochs, world)
        read_schedule_at_offset(scheduler, self.step_offset())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """The first step's learning rate from the schedule this run follows. A resumed optimizer holds the rate
        its checkpoint was saved with, which the scheduler replaces only after a step: continued on a longer or
        shorter schedule (or on another number of processes), the run took its first step at the old rate."""
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, LambdaLR):
            rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                                strict=True)]
            for group, lr in zip(scheduler.optimizer.param_groups, rates, strict=True):
                group["lr"] = lr
            scheduler._last_lr = rates

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to save non-finite weights; store the run's config and the RNG states.

        The augmentation generator needs no saved state: it is re-seeded every step from
        (seed, epoch, batch index), so a resumed run draws the same views.
        """
        self.check_finite()
        tensors = [t.detach() for t in self.model.parameters()]
        tensors += [b for b in self.model.buffers() if b.is_floating_point()]
        # element-wise, not a norm: the norm of huge but finite weights overflows to inf
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise NonFiniteLossError(
                f"weights became NaN/inf by optimizer step {self.global_step}; nothing was saved and "
                f"{self._last_good()}. Lower optim.base_lr" + (
                    " (train.on_nonfinite=skip skips a step whose loss is NaN/inf; these losses were finite, an "
                    "update was not)" if self.skip_nonfinite else " or set train.on_nonfinite=skip"))
        checkpoint["byol_config"] = self.run_config
        checkpoint["rng"] = rng_state()
        sums = {k: v.cpu() for k, v in self._epoch_sums.get("sums", {}).items()}
        checkpoint["epoch_loss_sums"] = {**self._epoch_sums, "sums": sums}
        checkpoint["byol_layout"] = self.layout()
        self.last_saved_step = int(checkpoint.get("global_step", self.global_step))

    def check_checkpoint(self, checkpoint: dict, path) -> None:
        """Refuse, in one line naming ``path``, a checkpoint whose training state does not fit this module:
        Lightning's fields (:func:`~byol.lightning.checkpoint_io.lightning_fields_problem`), the weights
        (names and shapes), the optimizer and schedule states, the random states and the epoch's loss sums.
        Called before Lightning loads any of it (also on a module built on the meta device, before a
        resumed run writes anything)."""
        problem = lightning_fields_problem(checkpoint) or self._state_problem(checkpoint)
        if problem:
            raise damaged_checkpoint(path, problem)

    def _state_problem(self, checkpoint: dict) -> str | None:
        if not isinstance(checkpoint.get("byol_config"), dict):
            return f"byol_config is {shown(checkpoint.get('byol_config'))}, not a mapping"
        state = checkpoint.get("state_dict")
        problem = tensors_problem(state, "state_dict")
        if problem:
            return problem
        mismatch = weights_problem(state, self.state_dict())
        if mismatch:
            return f"its weights do not match the architecture its own config describes; {mismatch}"
        with contextlib.redirect_stdout(io.StringIO()):  # a note on the warm-up, for the run to print
            optimizer, scheduler = self.make_optimizer(self.optimized_modules(), 1, 1, 1)
        for key, template, problem_of in (("optimizer_states", optimizer, optimizer_problem),
                                          ("lr_schedulers", scheduler, scheduler_problem)):
            saved = checkpoint[key]
            if len(saved) != 1:
                return f"{key} holds {len(saved)} states, not the one of its optimizer"
            problem = problem_of(saved[0], template, f"{key}[0]")
            if problem:
                return problem
        return (rng_state_problem(checkpoint["rng"]) if "rng" in checkpoint else None) or \
            loss_sums_problem(checkpoint.get("epoch_loss_sums")) or layout_problem(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint, self.trainer.ckpt_path if self._trainer is not None else "the checkpoint")
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        self.last_saved_step = checkpoint.get("global_step")
        self._epoch_sums = checkpoint.get("epoch_loss_sums") or {}
        self._resumed = (int(checkpoint["global_step"]), epochs_done(checkpoint), checkpoint.get("byol_layout") or {},
                         mid_epoch(checkpoint))


def schedule_span(run_steps: int, max_epochs: int | None, epoch_steps: int,
                  schedule_epochs: int | None) -> tuple[int, int]:
    """(epochs, optimizer steps) that the learning-rate and tau schedules span: the run's own, or
    ``schedule_epochs`` x ``epoch_steps`` when that is more epochs than ``max_epochs`` (the run then
    stops part-way along them, exactly where the longer run is at that epoch). A run bounded by
    ``trainer.max_steps`` alone (``max_epochs`` -1 or None) spans its ``run_steps``: it counts no epochs. Beside
    ``max_epochs``, ``max_steps`` is a stop, as ``max_time`` is: the schedules span the epochs (they spanned the
    capped steps, so the cut run was another run and no resume could continue it).
    """
    if max_epochs is None or max_epochs < 1:
        return 1, run_steps
    return max(max_epochs, schedule_epochs or 0), epoch_steps * max(max_epochs, schedule_epochs or 0)
