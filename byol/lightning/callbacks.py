"""Lightning callbacks: a pretraining run's checkpoints, clean stops on signals (an evaluation's too), the epoch line.

They receive plain values (folders, intervals, the resume command to print) and never read a config.
"""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import nn

from byol.core.errors import Interrupted
from byol.lightning.internals import as_saved_before_the_batch, take_over_sigterm

COLLAPSE_STD = 0.1  # std/<head> below this: collapsed (about 0.8 at initialisation, 1 at best)
# Signals that stop a run cleanly: cluster preemption (SIGTERM, SLURM's --signal=USR1) and Ctrl+C.
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                 signal.SIGINT) if s is not None)
STEP_LOSS = "train/loss_step"  # what BYOLModule logs each step
EPOCH_CHECKPOINT = re.compile(r"epoch(\d{4,})\.ckpt")  # the periodic checkpoints RunCheckpoints writes (and deletes)


def optimizer_steps_per_epoch(batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``batches`` (one process's): Lightning also steps on an epoch's last,
    incomplete accumulation (5 batches, accumulating 2: 3 steps)."""
    return max(1, math.ceil(batches / max(1, accumulate)))


def describe_step(step: int, steps_per_epoch: int) -> str:
    """Where training stands after ``step`` optimizer steps, epochs counted from 1 as a person reads them:
    ``step 6 (epoch 2, 2 of 4 batches done)``, ``step 8 (the end of epoch 2)``."""
    epoch, batch = divmod(int(step), max(1, steps_per_epoch))
    if batch == 0 and epoch > 0:
        return f"step {step} (the end of epoch {epoch})"
    return f"step {step} (epoch {epoch + 1}, {batch} of {steps_per_epoch} batches done)"


class StepStopped(Interrupted):
    """Raised at a stop point inside a training step after a stop signal; the step is undone and its
    message replaced by the saved checkpoint's once :class:`RunCheckpoints` has saved it."""


def add_stop_points(model: nn.Module, check) -> list:
    """Call ``check()`` before every convolution and linear layer runs, and when the gradient of each one's
    output arrives in the backward pass: a signal is then answered within one layer's time (a step of
    a ResNet-18 BYOL has several hundred such points), not after the whole step. Returns the hook handles."""
    def before(module, args):
        check()

    def after(module, args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: check())  # returns None: the gradient is left as it is

    handles = []
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    return handles


class CatchStopSignals(pl.Callback):
    """Records SIGTERM, SIGUSR1 and Ctrl+C during fitting instead of dying of them (or, for SIGTERM,
    letting Lightning end the process with status 0 as if it had finished), so that the subclass
    stops at a point of its choosing; a second Ctrl+C stops at once. Under DDP a signal any rank
    received counts for all of them (:meth:`_agree_on_stop`)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: stop now
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        # Replaces Lightning's SIGTERM handler (installed just before), which would stop after the
        # batch without saving; a SIGTERM it already caught is taken over.
        if take_over_sigterm(trainer):
            self.received = signal.SIGTERM
        try:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: leave signals to the caller
            self._previous = {}

    def _restore_signals(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signals()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_signals()

    def _agree_on_stop(self, trainer) -> None:
        """Under DDP all ranks stop at the same batch (saving is collective, and a rank that went on
        alone would wait forever for the others): a signal any rank received counts for all of them.
        One tiny all-reduce per step, as Lightning's own per-step SIGTERM check."""
        if getattr(trainer, "world_size", 1) <= 1:
            return
        flag = torch.tensor([self.received or 0], device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if agreed and self.received is None:
            self.received = agreed


class StopEvaluationOnSignal(CatchStopSignals):
    """An evaluation that trains (fine-tuning, the augmented linear protocol) stops after the running
    batch on a stop signal, with :class:`~byol.core.errors.Interrupted` (status 128 + signal) and a
    message: it writes no result, since a result is only what a finished evaluation measured."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._agree_on_stop(trainer)
        if self.received is not None:
            name = signal.Signals(self.received).name
            raise Interrupted(
                f"received {name}: {self.what} stopped in epoch {trainer.current_epoch + 1} of "
                f"{trainer.max_epochs}; no result written for it (results.json is written only when an "
                f"evaluation finishes). Run the same command again to evaluate from the start", self.received)


class RunCheckpoints(CatchStopSignals):
    """``last.ckpt`` and ``epochNNNN.ckpt``, and a clean stop on preemption signals.

    ``last.ckpt`` is the run's one full training state: written at every epoch end and every
    ``last_every_n_steps`` optimizer steps inside an epoch (not on an epoch's last batch: the epoch
    end follows), and once more when fitting ends anywhere else, so that at the end it is the final
    state (no second copy is written). With ``keep_last=K``, an ``epochNNNN.ckpt`` every
    ``every_n_epochs`` epochs, of which the K newest are kept (a checkpoint costs the size of the
    whole state: online and target networks and the optimizer's momentum). Lightning's own
    resume from a checkpoint taken on an epoch's last batch continues correctly once, but the
    checkpoints that run then writes in the next epoch resume that epoch from its first batch
    (measured with Lightning 2.6), so that moment is avoided.

    On SIGTERM, SIGUSR1 or Ctrl+C the run stops with :class:`~byol.core.errors.Interrupted` (exit
    status 128 + signal number) after saving ``last.ckpt``. With ``stop_inside_steps`` (one process,
    no gradient accumulation, no torch.compile) a signal is answered within a layer's time: the
    running step is abandoned before its optimizer step, what its forward passes changed (BatchNorm
    buffers, loss sums) is undone, and the checkpoint holds the state after the previous step, which
    a resumed run continues by training the abandoned batch again. Otherwise the run saves at the
    next batch boundary (the epoch end for an epoch's last batch) and stops when the next batch
    starts, after that step's metrics reached metrics.csv. A second Ctrl+C stops at once.
    """

    def __init__(self, ckpt_dir: Path, run_dir: Path, resume_command: str,
                 every_n_epochs: int | None = None, last_every_n_steps: int | None = None,
                 keep_last: int | None = None, stop_inside_steps: bool = False):
        super().__init__()
        self.ckpt_dir, self.run_dir, self.resume_command = Path(ckpt_dir), Path(run_dir), resume_command
        self.last = self.ckpt_dir / "last.ckpt"
        self.every_n_epochs, self.last_every_n_steps = every_n_epochs, last_every_n_steps
        self.keep_last = keep_last
        self._last_step: int | None = None  # the optimizer step last.ckpt was last written at
        self.stop_message: str | None = None  # set once last.ckpt holds the state to stop at
        self.stop_inside_steps = stop_inside_steps
        self._in_step = False  # between a batch's start and its optimizer step
        self._saving_inside_step = False
        self._stop_points: list = []

    # -- signals
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.stop_inside_steps and trainer.accumulate_grad_batches == 1 and trainer.world_size == 1:
            pl_module.undoable = True
            self._stop_points = add_stop_points(pl_module.model, self._stop_point)

    def _stop_point(self) -> None:
        if self.received is not None and self._in_step and self.stop_message is None:
            self._in_step = False  # the backward hooks still queued must not raise again
            raise StepStopped(f"received {signal.Signals(self.received).name} inside a step", self.received)

    def _restore_signals(self) -> None:
        super()._restore_signals()
        for handle in self._stop_points:
            handle.remove()
        self._stop_points = []

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_signals()
        if isinstance(exception, StepStopped):
            pl_module.undo_step()  # weights and optimizer are untouched: the optimizer step did not run
            self._saving_inside_step = True
            try:
                self._save_to_stop(trainer)
            finally:
                self._saving_inside_step = False
            exception.args = (self.stop_message,)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._saving_inside_step:
            as_saved_before_the_batch(checkpoint)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._in_step = False  # from here on the step changes weights: it is finished, not undone

    # -- saving
    def _save(self, trainer, path: Path) -> None:
        trainer.save_checkpoint(path, weights_only=False)
        if path == self.last:
            self._last_step = trainer.global_step

    def _save_to_stop(self, trainer) -> None:
        self._save(trainer, self.last)
        steps = optimizer_steps_per_epoch(trainer.num_training_batches, trainer.accumulate_grad_batches)
        where = describe_step(trainer.global_step, steps)
        name = signal.Signals(self.received).name
        self.stop_message = (f"received {name}: saved {self.last.relative_to(self.run_dir)} at {where}; "
                             f"resume with: {self.resume_command}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stop_message is not None:
            raise Interrupted(self.stop_message, self.received)
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False
        self._agree_on_stop(trainer)
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch end saves
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # between the micro-batches of one optimizer step
        if self.received is not None:
            self._save_to_stop(trainer)
            return
        n = self.last_every_n_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer, self.last)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._agree_on_stop(trainer)
        if self.received is not None:
            self._save_to_stop(trainer)  # stops at the next epoch's first batch, if there is one
        else:
            self._save(trainer, self.last)
        done = trainer.current_epoch + 1  # named by the epochs it holds, counted from 1 like every other line
        if self.keep_last and self.every_n_epochs and done % self.every_n_epochs == 0:
            self._save(trainer, self.ckpt_dir / f"epoch{done:04d}.ckpt")
            if trainer.is_global_zero:
                self._delete_older(done)

    def _delete_older(self, epoch: int) -> None:
        """Delete the ``epochNNNN.ckpt`` older than the ``keep_last`` newest, once the new one is written.
        Those of later epochs (from before a resume of an earlier checkpoint) are not this run's to delete."""
        numbered = sorted((int(found.group(1)), path) for path in self.ckpt_dir.glob("epoch*.ckpt")
                          if (found := EPOCH_CHECKPOINT.fullmatch(path.name)) and int(found.group(1)) <= epoch)
        for _, path in numbered[:-self.keep_last]:
            path.unlink(missing_ok=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        # fitting ended outside an epoch end (trainer.max_steps, or nothing left to train from a
        # resumed checkpoint): last.ckpt must still hold the state it ended with
        if self._last_step != trainer.global_step:
            self._save(trainer, self.last)


class EpochSummary(pl.Callback):
    """One console line per epoch (loss per head, tau, lr, images/s): progress that reads well
    in log files too, at the cost of one host synchronisation per epoch."""

    def __init__(self, knn=None):
        """``knn``: the run's :class:`~byol.lightning.monitors.OnlineKNN`, whose scores of this epoch
        (when it ran in this epoch) the line shows."""
        self.knn = knn
        self._start, self._images = time.perf_counter(), 0  # also right for an epoch resumed midway

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += int(batch[0].shape[0])

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
        seconds = time.perf_counter() - self._start
        images = self._images * trainer.world_size  # every rank trains on as many images as rank 0
        losses = {k: float(v) for k, v in pl_module.epoch_means().items()}
        heads = ", ".join(f"{k[len('loss/'):]} {v:.3f}" for k, v in losses.items() if k.startswith("loss/"))
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        total = losses.get("loss", float("nan"))
        spread = {k[len("std/"):]: v for k, v in losses.items() if k.startswith("std/")}
        knn, knn_seconds = self.knn_text(trainer.current_epoch)
        seconds = max(seconds - knn_seconds, 1e-9)
        line = (f"[byol] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: loss {total:.4f} ({heads}), "
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
