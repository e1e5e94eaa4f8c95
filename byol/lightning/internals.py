"""The few places where this project needs Lightning internals that have no public hook.

Checked against pytorch-lightning 2.6.6. Each function says what it needs and why no public
API serves; if a Lightning upgrade breaks one, the tests of resume (tests/test_resume.py),
signals (tests/test_signals.py) and metrics.csv continuation fail here, in one file.
"""

from __future__ import annotations


def batches_done_this_epoch(trainer) -> int:
    """Batches of the current epoch already trained (restored from a checkpoint saved mid-epoch).

    ``fit_loop.epoch_loop.batch_progress`` is the loop's own counter; ``global_step`` alone is not
    enough because skipped non-finite steps and accumulation remainders do not advance it.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


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
