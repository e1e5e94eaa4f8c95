"""Lightning callbacks: a pretraining run's checkpoints and clean stops on signals (an evaluation's too);
what a run shows each epoch is in :mod:`byol.lightning.epoch_output`.

They receive plain values (folders, intervals, the resume command to print) and never read a config.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from byol.core.errors import Interrupted
from byol.lightning.internals import as_saved_before_the_batch, take_over_sigterm

# Signals that stop a run cleanly: cluster preemption (SIGTERM, SLURM's --signal=USR1) and Ctrl+C.
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                 signal.SIGINT) if s is not None)
EPOCH_CHECKPOINT = re.compile(r"epoch(\d{4,})\.ckpt")  # the periodic checkpoints RunCheckpoints writes (and deletes)


def optimizer_steps_per_epoch(batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``batches`` (one process's): Lightning also steps on an epoch's last,
    incomplete accumulation (5 batches, accumulating 2: 3 steps)."""
    return max(1, math.ceil(batches / max(1, accumulate)))


def describe_step(step: int, steps_per_epoch: int, offset: int = 0) -> str:
    """Where training stands after ``step`` optimizer steps, epochs counted from 1 as a person reads them:
    ``step 6 (epoch 2, 2 of 4 batches done)``, ``step 8 (the end of epoch 2)``. ``offset``: the steps by which
    the run's count differs from its epochs x ``steps_per_epoch`` (:meth:`BYOLModule.step_offset`)."""
    epoch, batch = divmod(int(step) - int(offset), max(1, steps_per_epoch))
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


# Set when a second Ctrl+C ended a job: Lightning ends the process on it with status 1, the job with 130.
STOPPED_AT_ONCE = threading.Event()


@contextmanager
def stop_signals_held():
    """The stop signals held back from this thread while a checkpoint is written, delivered when it is whole:
    one landing in the writer's system call could cut the write short, and a resumable run was marked FAILED
    with a message blaming the disk. A handler that Python runs meanwhile (a signal taken by another thread)
    only records it (``_writing``)."""
    if not _can_hold():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _can_hold() -> bool:
    """Whether stop signals can be held back here: POSIX, and the main thread (Python's handlers run there)."""
    return hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()


def hold_stop_signals() -> None:
    """Hold the stop signals back from the main thread (one that comes waits) until
    :func:`release_stop_signals`: from the end of training until the run's export is written, a SIGTERM
    met Python's default handler and ended the finished run silently, without its ``encoder.pt``."""
    if _can_hold():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals(done: str) -> None:
    """Deliver what :func:`hold_stop_signals` held back (its handler acts then: the process ends), after a line
    that says the run was complete when it came; ``done`` says what was written."""
    if not _can_hold():
        return
    pending = sorted(set(signal.sigpending()) & set(STOP_SIGNALS))
    if pending:
        names = " and ".join(signal.Signals(s).name for s in pending)
        print(f"[byol] received {names} as training ended: {done}", flush=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class CatchStopSignals(pl.Callback):
    """Records SIGTERM, SIGUSR1 and Ctrl+C during fitting instead of dying of them (or, for SIGTERM,
    letting Lightning end the process with status 0 as if it had finished), so that the subclass
    stops at a point of its choosing; a second Ctrl+C stops at once. Under DDP a signal any rank
    received counts for all of them (:meth:`_agree_on_stop`)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}
        self._writing = self._stop_after_write = False  # a checkpoint being written; a second Ctrl+C meanwhile

    def _on_signal(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:  # second Ctrl+C: stop now
            if self._writing:  # torch's writer, interrupted, reports a failed write: stop once it is done
                self._stop_after_write = True
                return
            self._stop_at_once()
        self.received = signum

    def _stop_at_once(self) -> None:
        # said here: Lightning ends the process on the KeyboardInterrupt with a line that is silenced
        print(f"[byol] second Ctrl+C: stopped at once; {self.after_second_interrupt()}", file=sys.stderr,
              flush=True)
        STOPPED_AT_ONCE.set()
        raise KeyboardInterrupt

    def after_second_interrupt(self) -> str:
        """What is left after a second Ctrl+C, for the line that says it stopped."""
        return "nothing of this job was written"

    def on_train_start(self, trainer, pl_module) -> None:
        # Replaces Lightning's SIGTERM handler (installed just before), which would stop after the
        # batch without saving; a SIGTERM it already caught is taken over.
        STOPPED_AT_ONCE.clear()
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

    def after_second_interrupt(self) -> str:
        return "no result written for it; run the same command again to evaluate from the start"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._agree_on_stop(trainer)
        self._stop_if_received(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._agree_on_stop(trainer)
        self._stop_if_received(trainer)  # taken after the last batch (its validation): it was absorbed
        super().on_train_end(trainer, pl_module)

    def _stop_if_received(self, trainer) -> None:
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
    starts, after that step's metrics reached metrics.csv. A second Ctrl+C stops at once, with a line that
    says what is kept; one that comes while a checkpoint is written stops once the file is complete.
    ``hold_signals_at_end``: from the end of training on, a stop signal waits (:func:`hold_stop_signals`)
    for the caller's :func:`release_stop_signals`, once the run's export is written.
    """

    def __init__(self, ckpt_dir: Path, run_dir: Path, resume_command: str,
                 every_n_epochs: int | None = None, last_every_n_steps: int | None = None,
                 keep_last: int | None = None, stop_inside_steps: bool = False, hold_signals_at_end: bool = False):
        super().__init__()
        self.hold_signals_at_end = hold_signals_at_end  # for whoever releases them: fit_run, after the export
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
        self._batches_seen = 0  # of the running epoch

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

    def on_train_end(self, trainer, pl_module) -> None:
        if self.hold_signals_at_end:  # before the handlers go: one landing between met Python's default handler
            hold_stop_signals()  # until the export is written: byol.jobs.pretrain_fit.fit_run releases them
            if self.received is not None:  # taken after the last batch (last.ckpt is whole): acted on after the export
                signal.pthread_kill(threading.get_ident(), self.received)
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        # the signal handlers stay until the checkpoint is saved: with Python's own back, a second Ctrl+C
        # raised KeyboardInterrupt inside the writer, and the resumable run was marked FAILED (write failed)
        try:
            if isinstance(exception, StepStopped):
                pl_module.undo_step()  # weights and optimizer are untouched: the optimizer step did not run
                self._saving_inside_step = True
                try:
                    self._save_to_stop(trainer)
                finally:
                    self._saving_inside_step = False
                exception.args = (self.stop_message,)
        finally:
            self._restore_signals()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._saving_inside_step:
            as_saved_before_the_batch(checkpoint)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._in_step = False  # from here on the step changes weights: it is finished, not undone

    def after_second_interrupt(self) -> str:
        if self.last.is_file():
            return f"the last checkpoint saved is kept ({self.last}); resume with: {self.resume_command}"
        return "no checkpoint was saved yet: the run starts again from its beginning"

    # -- saving
    def _save(self, trainer, path: Path) -> None:
        self._writing = True  # a second Ctrl+C meanwhile (held, or taken by another thread) stops once it is saved
        try:
            with stop_signals_held():
                trainer.save_checkpoint(path, weights_only=False)
        finally:
            self._writing = False
        if path == self.last:
            self._last_step = trainer.global_step
        if self._stop_after_write:
            self._stop_at_once()

    def _save_to_stop(self, trainer) -> None:
        self._save(trainer, self.last)
        steps = optimizer_steps_per_epoch(trainer.num_training_batches, trainer.accumulate_grad_batches)
        offset = getattr(getattr(trainer, "lightning_module", None), "step_offset", lambda: 0)()  # BYOLModule's
        where = describe_step(trainer.global_step, steps, offset)
        name = signal.Signals(self.received).name
        self.stop_message = (f"received {name}: saved {self.last.relative_to(self.run_dir)} at {where}; "
                             f"resume with: {self.resume_command}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stop_message is not None:
            raise Interrupted(self.stop_message, self.received)
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False
        self._batches_seen = batch_idx + 1
        self._agree_on_stop(trainer)
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch end saves
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # between the micro-batches of one optimizer step
        if self.received is not None:
            self._save_to_stop(trainer)
            return
        n = self.last_every_n_steps
        # max_steps or max_time cutting a run that counts epochs (one of max_steps alone ends where it planned)
        cut_here = (trainer.max_epochs or -1) >= 1 and (trainer.should_stop or
                                                        0 < trainer.max_steps <= trainer.global_step)
        if n and trainer.global_step % n == 0 or cut_here:
            self._save(trainer, self.last)  # a fit cut here: saved as the mid-epoch state it is

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._agree_on_stop(trainer)
        if self.received is not None:
            self._save_to_stop(trainer)  # stops at the next epoch's first batch, if there is one
        elif self._last_step != trainer.global_step or not self._cut(trainer):
            # an epoch cut by max_steps / max_time was saved at its last batch: saved here, Lightning's counters
            # call it done, and a resume skipped the rest of it
            self._save(trainer, self.last)
        done = trainer.current_epoch + 1  # named by the epochs it holds, counted from 1 like every other line
        if self.keep_last and self.every_n_epochs and done % self.every_n_epochs == 0:
            self._save(trainer, self.ckpt_dir / f"epoch{done:04d}.ckpt")
            if trainer.is_global_zero:
                self._delete_older(done)

    def _cut(self, trainer) -> bool:
        """Whether the epoch ending now ended before its last batch."""
        return self._batches_seen < trainer.num_training_batches

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
