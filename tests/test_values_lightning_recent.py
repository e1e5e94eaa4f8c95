"""Values of byol/lightning code added since the last audit of these folders, for mutants of it that the suite
let through: byol_layout fields out of range, of another kind or with extra keys, an edited offset in a first
epoch's checkpoint, where a stop and a resume say they are on a run whose epochs were cut into other steps,
the learning-rate row of an epoch's last step written once, the heartbeat counted from each epoch's start,
and the progress bar's refresh rate."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import byol.lightning.epoch_output as epoch_output
from byol.lightning.callbacks import STOP_SIGNALS, RunCheckpoints, describe_step, stop_signals_held
from byol.lightning.checkpoint_io import _counters_problem
from byol.lightning.epoch_output import EpochSummary, StepRates, progress_bar
from byol.lightning.pretrain_module import layout_problem


def checkpoint(step=8, epoch_steps=4, world=1, offset=0, ready=2, processed=2, batches=4, **extra) -> dict:
    """A train.py checkpoint's step, byol_layout and loop counters (``ready`` > ``processed``: inside an epoch)."""
    epochs = {"ready": ready, "started": ready, "processed": processed, "completed": processed}
    return {"global_step": step,
            "byol_layout": {"epoch_steps": epoch_steps, "world_size": world, "step_offset": offset, **extra},
            "loops": {"fit_loop": {"epoch_progress": {"current": epochs, "total": epochs},
                                   "epoch_loop.batch_progress": {"current": {"processed": batches}}}}}


@pytest.mark.parametrize("edited", [{"epoch_steps": 0}, {"world": 0}, {"world": -2}, {"epoch_steps": True},
                                    {"world": True}, {"epoch_steps": 4.0}])
def test_layout_fields_are_whole_numbers_from_one(edited):
    assert checkpoint()["byol_layout"]["epoch_steps"] == 4 and layout_problem(checkpoint()) is None
    assert layout_problem(checkpoint(**edited)).startswith("byol_layout's fields must be whole numbers, epoch_steps")


def test_a_layout_with_a_field_more_is_not_one_the_module_writes():
    assert layout_problem(checkpoint(extra_field=1)).endswith(
        "not a mapping of 'epoch_steps', 'world_size', 'step_offset'")


def test_an_offset_is_checked_in_a_checkpoint_of_the_first_epoch_too():
    """3 batches into epoch 1 (0 epochs done): step 3 lies within the 4 steps of that epoch; an offset of -10
    put it at step 13."""
    first = {"step": 3, "ready": 1, "processed": 0, "batches": 3}
    assert layout_problem(checkpoint(**first)) is None and layout_problem(checkpoint(offset=-1, **first)) is None
    assert layout_problem(checkpoint(offset=-10, **first)) == (
        "byol_layout.step_offset=-10 puts its step 3 at step 13 of its epochs, outside the 4 steps of the epochs "
        "it has trained")


def test_an_offset_that_puts_the_step_at_the_end_of_its_epochs_is_kept():
    """8 steps of 4-step epochs, 2 done: step 8 is the last one they hold (and an offset of 2 puts step 10 there)."""
    assert layout_problem(checkpoint(step=8, offset=0)) is None
    assert layout_problem(checkpoint(step=10, offset=2)) is None
    assert "outside the 8 steps" in layout_problem(checkpoint(step=10, offset=1))


def counters(ready, started, processed, completed) -> dict:
    return {"ready": ready, "started": started, "processed": processed, "completed": completed}


@pytest.mark.parametrize(("part", "scope", "edited"), [
    ("epoch_progress", "current", counters(4, 4, 2, 2)),  # two epochs under way
    ("epoch_progress", "total", counters(2, 2, 3, 3)),  # more processed than started
    ("epoch_loop.batch_progress", "current", counters(5, 5, 6, 6)),
    ("epoch_loop.batch_progress", "total", counters(9, 9, 9, -1)),
])
def test_each_scope_of_the_epoch_and_batch_counters_is_in_lightnings_order(part, scope, edited):
    fit_loop = checkpoint()["loops"]["fit_loop"]
    fit_loop["epoch_loop.batch_progress"] = {"current": counters(6, 6, 5, 5), "total": counters(14, 14, 13, 13)}
    assert _counters_problem(fit_loop) is None
    fit_loop[part][scope] = edited
    problem = _counters_problem(fit_loop)
    assert problem.startswith(f"loops.fit_loop.{part}.{scope} is ") and problem.endswith("not counters Lightning keeps")


def test_counters_without_all_four_fields_are_left_to_lightning():
    """Lightning fills the fields a file lacks; this check compares only what it can order."""
    assert _counters_problem({"epoch_progress": {"current": {"ready": 3, "processed": 2}}}) is None


def test_where_a_step_stands_counts_the_epochs_from_the_offset():
    """Step 6 of a run continued with 2-step epochs after 4 steps of another cut (offset 2): the end of epoch 2."""
    assert describe_step(6, 2, 2) == "step 6 (the end of epoch 2)"
    assert describe_step(5, 2, 2) == "step 5 (epoch 2, 1 of 2 batches done)"
    assert describe_step(3, 4, -1) == "step 3 (the end of epoch 1)"


def test_a_stop_says_where_the_run_stands_in_its_own_epochs(tmp_path):
    class Trainer(SimpleNamespace):
        def save_checkpoint(self, path, weights_only=None):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(str(self.global_step))

    callback = RunCheckpoints(tmp_path / "checkpoints", tmp_path, "resume")
    callback.received = signal.SIGTERM
    callback._save_to_stop(Trainer(global_step=6, num_training_batches=2, accumulate_grad_batches=1,
                                   lightning_module=SimpleNamespace(step_offset=lambda: 2)))
    assert callback.stop_message == ("received SIGTERM: saved checkpoints/last.ckpt at step 6 (the end of epoch 2); "
                                     "resume with: resume")


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread(),
                    reason="signals are held on POSIX, in the main thread")
def test_stop_signals_are_blocked_while_held_and_the_mask_before_comes_back():
    """A signal blocked before (here SIGUSR1) stays blocked after the checkpoint is written."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        with stop_signals_held():
            assert set(STOP_SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before | {signal.SIGUSR1}
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def test_the_rates_of_an_epochs_last_step_are_written_once(monkeypatch):
    """Lightning's monitor writes them on a logging step; a step it leaves out gets its row from StepRates."""
    written = []
    monkeypatch.setattr(epoch_output, "write_step_row", lambda trainer, metrics: written.append(metrics))
    rates = StepRates()
    rates._extract_stats = lambda trainer, interval: {"lr-LARS": 0.5}

    def trainer(logs: bool):
        return SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=logs), fast_dev_run=False,
                               num_training_batches=4, loggers=[])

    rates.on_train_batch_start(trainer(False), None, None, 2)  # not the last batch
    rates.on_train_batch_start(trainer(True), None, None, 3)  # the last, and a logging step
    assert written == []
    rates.on_train_batch_start(trainer(False), None, None, 3)
    assert written == [{"lr-LARS": 0.5}]


def test_the_heartbeat_counts_from_the_start_of_each_epoch(capsys):
    trainer = SimpleNamespace(current_epoch=0, max_epochs=2, is_global_zero=True, world_size=1,
                              num_training_batches=100)
    batch = (SimpleNamespace(shape=(4,)), None)
    times = iter([0.0, 0.0, 130.0, 200.0, 300.0, 330.0])  # created, epoch 1, a batch; epoch 2, two batches
    summary = EpochSummary(heartbeat=120.0, clock=lambda: next(times))
    summary.on_train_epoch_start(trainer, None)
    summary.on_train_batch_end(trainer, None, None, batch, 0)
    trainer.current_epoch = 1
    summary.on_train_epoch_start(trainer, None)
    summary.on_train_batch_end(trainer, None, None, batch, 0)  # 100 s into epoch 2: no line yet
    summary.on_train_batch_end(trainer, None, None, batch, 1)
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == [
        "[byol] epoch 1/2: step 1 of 100", "[byol] epoch 2/2: step 2 of 100"]


def test_the_bar_refreshes_at_least_20_times_an_epoch():
    assert [progress_bar(True, 50, steps)[0].refresh_rate for steps in (100, 1000, 10, None)] == [5, 50, 1, 50]
    assert progress_bar(False, 50, 100) == []
