"""The few places where this project needs Lightning internals that have no public hook.

Checked against pytorch-lightning 2.6.6. Each function says what it needs and why no public
API serves; if a Lightning upgrade breaks one, the tests of resume (tests/test_resume.py),
signals (tests/test_signals.py) and metrics.csv continuation fail here, in one file.
"""

from __future__ import annotations

import math


def batches_done_this_epoch(trainer) -> int:
    """Batches of the current epoch already trained (restored from a checkpoint saved mid-epoch).

    ``fit_loop.epoch_loop.batch_progress`` is the loop's own counter; ``global_step`` alone is not
    enough because skipped non-finite steps and accumulation remainders do not advance it.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def epoch_cut_short(trainer) -> bool:
    """Whether the epoch ending now stopped before its last batch: a stop limit (``max_steps``, ``max_time``)
    cut a run that counts epochs. Lightning still calls the epoch-end hooks and counts the epoch done, but a
    resumed run trains the rest of it and ends it again: logged now, its rows (epoch loss, monitors) stood twice
    in metrics.csv, the first of a part of the epoch. A run bounded by ``max_steps`` alone (no epoch count)
    ends where it planned: its last epoch is not cut."""
    total = trainer.num_training_batches
    return ((trainer.max_epochs or -1) >= 1 and math.isfinite(total)
            and batches_done_this_epoch(trainer) < total)


def take_over_sigterm(trainer) -> bool:
    """Whether Lightning already caught a SIGTERM; if so, clear its flag so that the run saves a
    checkpoint before stopping instead of Lightning stopping it without one. ``trainer.received_sigterm``
    is public but read-only; clearing it needs the signal connector."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not connector.received_sigterm:
        return False
    connector.received_sigterm = False
    return True


def install_csv_writer(logger, writer) -> None:
    """Make a ``CSVLogger`` write through ``writer`` (an ``ExperimentWriter``): Lightning creates
    its writer lazily in the ``experiment`` property, which deletes an existing metrics.csv."""
    logger._fs.makedirs(logger.root_dir, exist_ok=True)
    logger._experiment = writer


def as_saved_before_the_batch(checkpoint: dict) -> None:
    """Make a checkpoint saved inside a training step (before its optimizer step) resume like one saved
    after the previous batch. Lightning's loop counters already say the running batch was started but
    not completed, so a resumed run trains it again; only ``_batches_that_stepped`` (the step of logged
    rows), which Lightning advances by one on such a resume, would run one ahead."""
    state = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
    state["_batches_that_stepped"] -= 1


def logs_this_step(trainer) -> bool:
    """Whether Lightning writes the running training batch's step metrics to the loggers (every
    ``log_every_n_steps`` optimizer steps, and when the run is stopping). Metrics logged on the other
    batches are never written, yet each ``self.log`` call costs dozens of small tensor operations: on a
    GPU, where a step at CIFAR sizes is bound by the host, a few percent of the step. Lightning asks the
    same question of its logger connector, which has no public accessor; the answer is the same in the
    training step as when the metrics are written after it (the counter it reads moves on after both)."""
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def write_step_row(trainer, metrics: dict) -> None:
    """Write ``metrics`` to the loggers as a row of the running step, as Lightning writes the metrics of a
    logging step (the same step number, the epoch column). For an epoch's last step, which logging every
    ``log_every_n_steps`` steps leaves out when that does not divide the epoch: the tau and learning-rate
    curves stopped short of the values the epoch line shows. Lightning writes a row only through its logger
    connector, which has no public accessor."""
    trainer._logger_connector.log_metrics(metrics)


def is_last_batch(trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the last batch of the epoch (never for training data without a length)."""
    return batch_idx + 1 == trainer.num_training_batches


def fit_loop_state_template() -> dict:
    """The layout of ``checkpoint["loops"]["fit_loop"]`` that this Lightning writes and reads back: the
    state of a fit loop that has not run. Lightning loads each progress counter of a checkpoint with
    ``__dict__.update``, so a checkpoint is compared with this layout before it is loaded; the fit
    loop class has no public constructor, and it needs no trainer to say its state."""
    from pytorch_lightning.loops.fit_loop import _FitLoop

    return _FitLoop(None).state_dict()
