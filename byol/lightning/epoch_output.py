"""What a pretraining run shows each epoch: the one-line summary, hooks that refresh files (curves.png),
the run's config written when training starts, and the progress bar."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar

from byol.core.progress import duration
from byol.lightning.internals import (
    batches_done_this_epoch,
    epoch_cut_short,
    is_last_batch,
    logs_this_step,
    write_step_row,
)

COLLAPSE_STD = 0.1  # std/<head> below this: collapsed (about 0.8 at initialisation, 1 at best)
STEP_LOSS = "train/loss_step"  # what BYOLModule logs each step


class StepRates(LearningRateMonitor):
    """Lightning's learning rates every ``log_every_n_steps`` steps, and those of each epoch's last step: the
    curve stopped short of the epoch's end when the interval does not divide the epoch."""

    def __init__(self):
        super().__init__(logging_interval="step")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not logs_this_step(trainer) and is_last_batch(trainer, batch_idx):
            write_step_row(trainer, self._extract_stats(trainer, "step"))


class EpochSummary(pl.Callback):
    """One console line per epoch (loss per head, tau, lr, images/s): progress that reads well
    in log files too, at the cost of one host synchronisation per epoch."""

    def __init__(self, knn=None, heartbeat: float | None = None, clock=time.perf_counter):
        """``knn``: the run's :class:`~byol.lightning.monitors.OnlineKNN`, whose scores of this epoch
        (when it ran in this epoch) the line shows. ``heartbeat``: seconds between lines inside an epoch
        (None: none; where no progress bar is drawn, a CPU epoch is minutes without a word otherwise)."""
        self.knn, self.heartbeat, self.clock = knn, heartbeat, clock
        self._start, self._images, self._steps = clock(), 0, 0  # also right for an epoch resumed midway
        self._said = self._start
        self._lr: float | None = None  # the rate of the epoch's last optimizer step

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._images, self._steps = self.clock(), 0, 0
        self._said = self._start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images, self._steps = self._images + int(batch[0].shape[0]), self._steps + 1
        if self.heartbeat is None or not trainer.is_global_zero:
            return
        now = self.clock()  # a clock read, no device sync: the rate counts steps queued, close enough
        if now - self._said >= self.heartbeat:
            self._said, total, done = now, trainer.num_training_batches, batch_idx + 1
            rate = self._images * trainer.world_size / max(now - self._start, 1e-9)
            left = duration((now - self._start) / self._steps * (total - done))
            print_line(trainer, f"[byol] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: step {done} of "
                                f"{total} ({100 * done / total:.0f}%), {rate:.1f} images/s, about {left} left "
                                f"in the epoch")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # the rate this step uses: the optimizer's after the epoch is the next step's (0 after the last)
        self._lr = optimizer.param_groups[0]["lr"]

    def knn_text(self, epoch: int) -> tuple[str, float]:
        """``, kNN avgpool 41.2% combined 45.0% (3 s)`` when the kNN monitor ran in ``epoch``, and its seconds
        (an epoch without it shows no stale scores and loses no time to them)."""
        if self.knn is None or self.knn.epoch != epoch:
            return "", 0.0
        shown = [f"{name} {100 * self.knn.last[name]:.1f}%" for name in ("avgpool", "combined")
                 if name in self.knn.last]
        return (f", kNN {' '.join(shown)} ({self.knn.seconds:.0f} s)", self.knn.seconds) if shown else ("", 0.0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # under DDP: rank 0's line (its share of the images, its loss means)
            return
        seconds = self.clock() - self._start
        images = self._images * trainer.world_size  # every rank trains on as many images as rank 0
        losses = {k: float(v) for k, v in pl_module.epoch_means().items()}
        lr = self._lr if self._lr is not None else float("nan")  # as tau: the value the last step used
        spread = {k[len("std/"):]: v for k, v in losses.items() if k.startswith("std/")}
        knn, knn_seconds = self.knn_text(trainer.current_epoch)
        seconds = max(seconds - knn_seconds, 1e-9)
        epoch = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        if epoch_cut_short(trainer):  # its epoch line comes when a resumed run ends the epoch
            epoch = (f"stopped by a limit in {epoch} after batch {batches_done_this_epoch(trainer)} of "
                     f"{trainer.num_training_batches}, so far")
        line = (f"[byol] {epoch}: {loss_text(losses, getattr(pl_module, 'skipped_this_epoch', int)())}, "
                f"std {min(spread.values(), default=float('nan')):.2f}, tau {pl_module.last_tau():.4f}, "
                f"lr {lr:.3g}, {images / seconds:.1f} images/s ({seconds:.0f} s){knn}")
        print_line(trainer, line)
        collapsed = {h: v for h, v in spread.items() if v < COLLAPSE_STD}
        if collapsed:
            found = ", ".join(f"std/{h} {v:.3f}" for h, v in collapsed.items())
            print(f"[byol] warning: the online projections have collapsed ({found}; "
                  f"about 1 is healthy, 0 means every image maps to the same point), so a low loss "
                  f"means nothing. Usual causes: a learning rate too high for the optimizer (Adam "
                  f"with a LARS-sized optim.base_lr), tau too low, or too little augmentation", flush=True)


def loss_text(losses: dict[str, float], skipped: int) -> str:
    """``loss 0.4012 (avgpool 0.401)`` for the epoch line, saying how many non-finite steps were skipped;
    an epoch whose every step was skipped has no mean to show (it read ``loss nan ()``)."""
    if "loss" not in losses:
        return f"loss n/a (all {skipped} steps non-finite, skipped)" if skipped else "loss n/a (no step)"
    heads = ", ".join(f"{k[len('loss/'):]} {v:.3f}" for k, v in losses.items() if k.startswith("loss/"))
    skips = f", {skipped} non-finite step{'s' * (skipped != 1)} skipped" if skipped else ""
    return f"loss {losses['loss']:.4f} ({heads}){skips}"


class EpochHook(pl.Callback):
    """Calls ``fn()`` once an epoch's metrics reached the loggers (at the next epoch's start; the job
    calls it once more after training), e.g. to refresh the run's curves, in at most about ``share`` of
    the run's time: after a call that took d seconds the next waits until d / share seconds have passed
    (a 0.7 s plot: every epoch of 40 s CPU epochs, every 4th of 4 s GPU epochs). The first call waits
    for ``first_cost`` / ``share`` seconds of training (20 s: a run shorter than that is drawn once, at
    its end). A failure of ``fn`` is reported once and never stops training."""

    def __init__(self, fn, share: float = 0.05, first_cost: float = 1.0):
        self.fn, self.failed, self.share, self.first_cost = fn, False, share, first_cost
        self._next_call = float("-inf")  # time.monotonic() from which the next call may run

    def on_train_start(self, trainer, pl_module) -> None:
        self._next_call = time.monotonic() + self.first_cost / self.share

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.failed or trainer.global_rank != 0 or trainer.current_epoch == 0:
            return
        start = time.monotonic()
        if start < self._next_call:
            return
        try:
            self.fn()
        except Exception as e:  # a plot must never cost a run
            self.failed = True
            print(f"[byol] note: {type(e).__name__}: {e} (curves are not refreshed for the rest of this run)",
                  flush=True)
        self._next_call = start + (time.monotonic() - start) / self.share


class OnTrainStart(pl.Callback):
    """Calls ``fn()`` on rank 0 once training starts: the loggers, the data and the model are ready and a
    resumed checkpoint restored, so a job that fails before (a missing logger package, a checkpoint that
    does not load) has not yet changed what ``fn`` writes, e.g. the run's config.yaml."""

    def __init__(self, fn):
        self.fn = fn

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.fn()


def print_line(trainer, line: str) -> None:
    """A console line on a line of its own, also while a progress bar is drawn (and in log files)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and hasattr(bar, "print"):
        bar.print(line)
    else:
        print(line, flush=True)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's bar, with epochs counted from 1 as in every other line a person reads, showing the
    newest step's loss. The loss is read from the device here, at a refresh: logged to the bar
    (``prog_bar=True``) Lightning would read it back after every step, a host sync that stalls a GPU."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get(STEP_LOSS)
        if loss is not None and trainer.training:
            items["loss"] = f"{float(loss):.4g}"
        return items


def progress_bar(enabled: bool, refresh_every: int, steps_per_epoch: int | None = None) -> list:
    """A progress bar that refreshes every ``refresh_every`` batches (each refresh reads the logged loss
    back from the device, and a per-step read would stall a GPU every step), but at least 20 times an
    epoch, so a short epoch shows progress too."""
    if not enabled:
        return []
    rate = max(1, int(refresh_every or 1))
    if steps_per_epoch:
        rate = min(rate, max(1, steps_per_epoch // 20))
    return [EpochProgressBar(refresh_rate=rate)]
