"""Preemption: SIGTERM / SIGUSR1 save last.ckpt at the next batch boundary and stop with a
clear message and status 128 + signal; the run resumes from there as if never stopped."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    ROOT,
    add_run_callback,
    compose_config,
    epochs_reported,
    python,
    signal_when,
    wait_for_fine_tuning_epoch,
)
from in_process import run_here
from test_resume import (
    ENV,
    EPOCHS,
    EXACT,
    STEPS_PER_EPOCH,
    assert_same_training_state,
    metric_rows,
    reference_run,
    saved_step,
    start,
    train,
    wait_for_step,
)

import byol.jobs.pretrain as pretrain_job
from byol.core.errors import Interrupted
from byol.jobs.cli import command_arg, resume_hint, run_job
from byol.lightning.callbacks import RunCheckpoints, StepStopped, StopEvaluationOnSignal, describe_step

# --------------------------------------------------------------------------- the callback alone


class FakeTrainer(SimpleNamespace):
    def save_checkpoint(self, path, weights_only=None):
        self.saved.append((Path(path).name, self.global_step))
        if self.write_files:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(str(self.global_step))


def fake_trainer(**kw) -> FakeTrainer:
    defaults = {"num_training_batches": 4, "accumulate_grad_batches": 1, "global_step": 0, "current_epoch": 0,
                "saved": [], "_signal_connector": SimpleNamespace(received_sigterm=False), "is_global_zero": True,
                "write_files": False, "lightning_module": SimpleNamespace(step_offset=lambda: 0), "should_stop": False,
                "max_steps": -1, "max_epochs": 1}
    return FakeTrainer(**{**defaults, **kw})


def train_epochs(cb: RunCheckpoints, t: FakeTrainer, epochs, batches: int = 4) -> None:
    """The callback's hooks for ``epochs`` (epoch indices) of ``batches`` optimizer steps each."""
    for epoch in epochs:
        t.current_epoch = epoch
        for batch in range(batches):
            t.global_step += 1
            cb.on_train_batch_end(t, None, None, None, batch)
        cb.on_train_epoch_end(t, None)


def test_periodic_and_step_checkpoints(tmp_path):
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, "python train.py resume=RUN", every_n_epochs=2,
                        last_every_n_steps=2, keep_last=3)
    t = fake_trainer()
    train_epochs(cb, t, range(2))
    # every 2 steps inside an epoch, never on its last batch (the epoch end saves), epochNNNN every 2 epochs
    assert t.saved == [("last.ckpt", 2), ("last.ckpt", 4), ("last.ckpt", 6), ("last.ckpt", 8),
                       ("epoch0002.ckpt", 8)]  # named by the epochs it holds
    cb.on_fit_end(t, None)  # last.ckpt already holds the state training ended with: no second copy
    assert len(t.saved) == 5


def test_without_keep_last_only_last_ckpt_is_written(tmp_path):
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, "python train.py resume=RUN", every_n_epochs=1)
    t = fake_trainer(write_files=True)
    train_epochs(cb, t, range(3))
    cb.on_fit_end(t, None)
    assert t.saved == [("last.ckpt", 4), ("last.ckpt", 8), ("last.ckpt", 12)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_keep_last_keeps_the_k_newest_epoch_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    cb = RunCheckpoints(folder, tmp_path, "python train.py resume=RUN", every_n_epochs=2, keep_last=2)
    t = fake_trainer(write_files=True)
    folder.mkdir()
    (folder / "epoch0007-copy.ckpt").write_text("mine")  # not a name the callback writes: never deleted
    train_epochs(cb, t, range(4))  # epoch0002 and epoch0004 written (after 2 and 4 epochs)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0002.ckpt", "epoch0004.ckpt", "epoch0007-copy.ckpt",
                                                       "last.ckpt"]
    train_epochs(cb, t, range(4, 10))  # epoch0006, 0008, 0010: each deletes the oldest once written
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0007-copy.ckpt", "epoch0008.ckpt", "epoch0010.ckpt",
                                                       "last.ckpt"]
    assert (folder / "epoch0010.ckpt").read_text() == "40" and (folder / "last.ckpt").read_text() == "40"


def test_keep_last_leaves_checkpoints_of_later_epochs_alone(tmp_path):
    """A run resumed from an earlier checkpoint in its own folder: the files of the epochs it went
    further before are not counted among the newest and are not deleted."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (1, 2, 5):
        (folder / f"epoch{epoch:04d}.ckpt").write_text("before")
    cb = RunCheckpoints(folder, tmp_path, "python train.py resume=RUN", every_n_epochs=1, keep_last=1)
    t = fake_trainer(write_files=True, global_step=12)
    train_epochs(cb, t, [3])
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0004.ckpt", "epoch0005.ckpt", "last.ckpt"]


def test_fit_ending_outside_an_epoch_end_refreshes_last_ckpt(tmp_path):
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, "python train.py resume=RUN")
    t = fake_trainer(global_step=12)  # e.g. resumed from a checkpoint with nothing left to train
    cb.on_fit_end(t, None)
    assert t.saved == [("last.ckpt", 12)]


def test_signal_mid_epoch_saves_then_stops_at_next_batch(tmp_path):
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, resume_hint(tmp_path))
    t = fake_trainer(global_step=6, current_epoch=1)
    cb.received = signal.SIGTERM
    cb.on_train_batch_end(t, None, None, None, 1)
    assert t.saved == [("last.ckpt", 6)]  # saved now; the step's metrics are logged after this hook
    with pytest.raises(Interrupted) as err:
        cb.on_train_batch_start(t, None, None, 2)
    assert err.value.exit_code == 128 + signal.SIGTERM == 143
    assert str(err.value) == (f"received SIGTERM: saved checkpoints/last.ckpt at {describe_step(6, 4)}; "
                              f"resume with: python train.py resume={tmp_path}")


def test_signal_on_last_batch_waits_for_the_epoch_end(tmp_path):
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, resume_hint(tmp_path), every_n_epochs=1, keep_last=1)
    t = fake_trainer(global_step=4)
    cb.received = signal.SIGUSR1
    cb.on_train_batch_end(t, None, None, None, 3)
    assert t.saved == [] and cb.stop_message is None
    cb.on_train_epoch_end(t, None)
    assert t.saved == [("last.ckpt", 4), ("epoch0001.ckpt", 4)]  # the periodic checkpoint is not lost
    with pytest.raises(Interrupted) as err:
        cb.on_train_batch_start(t, None, None, 0)
    assert err.value.exit_code == 138 and "received SIGUSR1" in str(err.value)


def test_signal_between_accumulated_batches_waits_for_the_step(tmp_path):
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, resume_hint(tmp_path))
    t = fake_trainer(num_training_batches=8, accumulate_grad_batches=2, global_step=1)
    cb.received = signal.SIGTERM
    cb.on_train_batch_end(t, None, None, None, 2)  # first half of optimizer step 2
    assert t.saved == []
    t.global_step = 2
    cb.on_train_batch_end(t, None, None, None, 3)
    assert t.saved == [("last.ckpt", 2)]


def test_handlers_are_installed_for_training_only(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, resume_hint(tmp_path))
    t = fake_trainer()
    cb.on_train_start(t, None)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread before kill returns
        assert cb.received == signal.SIGUSR1
        cb.received = None
        os.kill(os.getpid(), signal.SIGINT)  # first Ctrl+C: stop cleanly at the next boundary
        assert cb.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # second Ctrl+C: stop now
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        cb.on_train_end(t, None)
    assert {s: signal.getsignal(s) for s in before} == before
    # nothing held back after training either, unless asked for (fit_run asks, and releases after the export)
    assert not set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) & set(before)


def test_sigterm_caught_by_lightning_before_training_is_kept(tmp_path):
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, resume_hint(tmp_path))
    t = fake_trainer()
    t._signal_connector.received_sigterm = True  # Lightning's handler got it during setup
    cb.on_train_start(t, None)
    cb.on_exception(t, None, RuntimeError())
    assert cb.received == signal.SIGTERM and t._signal_connector.received_sigterm is False


def test_an_evaluation_that_trains_stops_after_the_batch_with_the_signal_status():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    cb = StopEvaluationOnSignal("fine-tuning")
    t = fake_trainer(max_epochs=50, current_epoch=2)
    cb.on_train_start(t, None)
    cb.on_train_batch_end(t, None, None, None, 0)  # no signal: goes on
    os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal: Lightning would end the process with status 0
    with pytest.raises(Interrupted) as stopped:
        cb.on_train_batch_end(t, None, None, None, 1)
    cb.on_exception(t, None, stopped.value)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert str(stopped.value).startswith("received SIGTERM: fine-tuning stopped in epoch 3 of 50; no result written")
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("stop", [Interrupted("received SIGTERM: ...", signal.SIGTERM), KeyboardInterrupt()])
def test_an_interrupted_evaluation_writes_no_result_and_stops_the_sweep(tmp_path, monkeypatch, stop):
    """evaluate_model records a model's failure and goes on; a stop signal is not one: it propagates. An
    earlier evaluation in the folder is put back whole (it had been kept aside for the new one), and the
    stopped one's partial outputs are gone: the folder's config.yaml and metrics.csv are those of its result."""
    from byol.jobs import evaluate as evaluate_job
    from byol.jobs import protocols
    from byol.jobs.config_check import plain_config
    from byol.jobs.pretrained import random_model

    def interrupted(model, cfg, splits, num_classes, out_dir):
        (out_dir / "metrics.csv").write_text("epoch,train/loss\n0,2.3\n")  # the stopped evaluation's first rows
        raise stop

    monkeypatch.setattr(protocols, "run_protocol", interrupted)  # imported by evaluate_model when it runs one
    cfg = plain_config(compose_config("evaluate", ["pretrained=random", "data=synthetic", "eval=finetune"], tmp_path))
    model = random_model({"name": "resnet18", "stem": "cifar"}, 0, "random-init")
    fresh, again = tmp_path / "fresh", tmp_path / "again"
    again.mkdir()
    earlier = {"results.json": '{"status": "ok"}', "config.yaml": "earlier: 1", "metrics.csv": "epoch\n0\n"}
    for name, text in earlier.items():
        (again / name).write_text(text)
    for folder in (fresh, again):
        with pytest.raises(type(stop)):
            evaluate_job.evaluate_model(model, cfg, {}, 10, folder)
    assert not (fresh / "results.json").exists()
    assert {p.name: p.read_text() for p in again.iterdir()} == earlier


def test_a_stop_stays_a_stop_when_the_earlier_evaluation_cannot_be_put_back(tmp_path, monkeypatch, capsys):
    """Putting the earlier evaluation back can meet a full or read-only disk: the stop still propagates as
    itself (an OSError in its place read as a storage failure of the job), and one note says the next
    evaluation of the folder puts it back."""
    from byol.jobs import results_json

    def unwritable(folder, results_file):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(results_json, "undo_unfinished_evaluation", unwritable)
    try:
        raise Interrupted("received SIGTERM: ...", signal.SIGTERM)
    except Interrupted:
        results_json.undo_stopped_result(tmp_path)  # as evaluate_model's handler calls it, before re-raising
    assert (f"[eval] note: {tmp_path}: the earlier evaluation's files could not be put back now (Permission "
            f"denied); the next evaluation of this folder does it") in capsys.readouterr().out


def test_a_ddp_process_lost_during_an_evaluation_writes_no_result_and_stops_the_sweep(tmp_path, monkeypatch):
    """A DDP evaluation whose other process died: the error said "no result written for it", yet it was
    recorded as this model's failure: a results.json with status failed replaced the earlier result in the
    folder (and a sweep went on to its next model, whose first exchange failed the same way). Now it is a stop
    like a signal: the earlier evaluation is put back, no result is written, and the error propagates."""
    from byol.core.errors import ByolError
    from byol.jobs import evaluate as evaluate_job
    from byol.jobs import protocols
    from byol.jobs.config_check import plain_config
    from byol.jobs.console import other_processes_lost
    from byol.jobs.pretrained import random_model

    def lost(model, cfg, splits, num_classes, out_dir):
        (out_dir / "metrics.csv").write_text("epoch,train/loss\n0,2.3\n")  # the stopped evaluation's first rows
        with other_processes_lost(2, lambda: "no result written for it"):
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")

    monkeypatch.setattr(protocols, "run_protocol", lost)
    cfg = plain_config(compose_config("evaluate", ["pretrained=random", "data=synthetic", "eval=finetune"], tmp_path))
    model = random_model({"name": "resnet18", "stem": "cifar"}, 0, "random-init")
    again = tmp_path / "again"
    again.mkdir()
    earlier = {"results.json": '{"status": "ok"}', "config.yaml": "earlier: 1", "metrics.csv": "epoch\n0\n"}
    for name, text in earlier.items():
        (again / name).write_text(text)
    with pytest.raises(ByolError, match=r"stopped \(Connection reset by peer\).*no result written for it$"):
        evaluate_job.evaluate_model(model, cfg, {}, 10, again)
    assert {p.name: p.read_text() for p in again.iterdir()} == earlier


def test_ctrl_c_outside_training_is_one_line_and_status_130(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    compose_config("evaluate", [], run)

    def job(cfg, run_dir):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_job(job, None)
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err.count("\n") == 1  # "[<job name>] interrupted ...": no traceback
    assert err.endswith("] interrupted (Ctrl+C); what was finished before is kept\n")


# --------------------------------------------------------------------------- end to end


class CtrlCInsideStep(pl.Callback):
    """Sends this process a real SIGINT inside optimizer step ``step`` (counted from 0): in the
    forward pass (when the target network starts, after the online passes changed their BatchNorm
    buffers) or when the backward pass starts."""

    def __init__(self, step: int, where: str):
        self.step, self.where, self.handle = step, where, None

    def ctrl_c(self, *args) -> None:
        if self.trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # handled in this thread before kill returns

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainer = trainer
        if self.where == "forward":
            self.handle = pl_module.model.target_encoder.register_forward_pre_hook(self.ctrl_c)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.where == "backward":
            self.ctrl_c()


@pytest.mark.slow
@pytest.mark.parametrize(("step", "where"), [(5, "forward"), (8, "backward")])
def test_ctrl_c_inside_a_step_stops_at_once_and_resumes_exactly(tmp_path_factory, monkeypatch, step, where):
    """The step that was running is abandoned (its BatchNorm updates and loss sums undone), the checkpoint
    holds the state after the previous step, and the resumed run ends bit for bit where an uninterrupted
    one ends, with the same metrics.csv rows. Step 8 is the first of epoch 3."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp(f"ctrl_c_{where}") / "run"
    trigger = CtrlCInsideStep(step, where)
    add_run_callback(monkeypatch, trigger)
    threads, sigint = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    torch.set_num_threads(1)  # as the reference run (OMP_NUM_THREADS=1): the same sums
    try:
        with pytest.raises(StepStopped) as stopped:
            pretrain_job.pretrain(compose_config("train", [*EXACT, f"hydra.run.dir={run_dir}"], run_dir), run_dir)
    finally:
        torch.set_num_threads(threads)
    assert stopped.value.exit_code == 128 + signal.SIGINT == 130
    assert str(stopped.value) == (f"received SIGINT: saved checkpoints/last.ckpt at {describe_step(step, 4)}; "
                                  f"resume with: python train.py resume={run_dir}")
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == step  # the steps finished before the abandoned one
    assert signal.getsignal(signal.SIGINT) == sigint  # the handler before training is back

    monkeypatch.undo()  # the resume, run in this process too, goes on without the Ctrl+C
    resumed = train(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(run_dir, reference)
    assert metric_rows(run_dir) == metric_rows(reference)  # every step's row once, the same values


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])  # SIGUSR1: the same handler (unit tests above,
# and through DDP in tests/test_ddp.py); SIGINT at chosen points inside a step: below
def test_signal_saves_stops_and_resumes_exactly(tmp_path_factory, sig):
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp(sig.name) / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = start(*EXACT, f"hydra.run.dir={run_dir}")
    _, _, err = signal_when(proc, lambda: wait_for_step(proc, last, 1), sig, timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    step = saved_step(last)
    assert step is not None and 1 <= step < 12
    assert err.strip().splitlines()[-1] == (
        f"received {sig.name}: saved checkpoints/last.ckpt at {describe_step(step, STEPS_PER_EPOCH)}; resume "
        f"with: python train.py resume={run_dir}")
    assert "Traceback" not in err and not (run_dir / "encoder.pt").exists()  # stopped, not finished

    resumed = train(f"resume={run_dir}")  # exactly what the message says, nothing else
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}: {describe_step(step, STEPS_PER_EPOCH)}" in resumed.stdout
    assert "changed settings" not in resumed.stdout
    # it trained from its step on, not from 0: no epoch that ended before the step is reported again (one
    # that ended at the step itself may be, as its epoch-end work may not have run when the signal came)
    reported = epochs_reported(resumed.stdout)
    assert reported == list(range(reported[0], EPOCHS + 1)) and reported[0] > (step - 1) // STEPS_PER_EPOCH
    assert_same_training_state(run_dir, reference)


def hydra_value(shell_word: str) -> str:
    """What Hydra reads from one shell word ``key=value`` as the shell would pass it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (arg,) = shlex.split(shell_word)
    return OverridesParser.create().parse_override(arg).value()


@pytest.mark.parametrize("value", ["outputs/train/2026-11-28_02-19-28", "/runs/1_loss=multi,seed=0",
                                   "~/runs/a b", "/runs/it's", '/runs/say "hi" $HOME', "/runs/x\\y",
                                   "/runs/end\\", "/runs/x\\'y"])
def test_printed_commands_give_hydra_the_path_back(value):
    # sweep job folders contain = and , which Hydra would otherwise read as syntax
    word = command_arg("resume", value)
    assert hydra_value(word) == value
    if value.startswith("outputs/"):
        assert word == f"resume={value}"  # plain paths stay readable


def test_stop_message_inside_a_sweep_also_says_how_to_continue_the_whole_sweep(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    sweep, job = tmp_path / "sweep", tmp_path / "sweep" / "1_loss=multi,seed=0"
    hydra_cfg = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}}})
    monkeypatch.setattr(HydraConfig.instance(), "cfg", hydra_cfg)
    argv = ["/repo/train.py", "-m", "loss=classic,multi", "seed=0", "hydra.sweep.dir=old"]
    monkeypatch.setattr("sys.argv", argv)
    cb = RunCheckpoints(job / "checkpoints", job, resume_hint(job))
    cb.received = signal.SIGTERM
    cb.on_train_epoch_end(fake_trainer(global_step=4), None)
    hints = cb.stop_message.split("resume with: ")[1]
    job_alone, whole = hints.split(" (this job alone), or the whole sweep: ")
    assert job_alone.startswith("python train.py ") and hydra_value(job_alone.split(" ", 2)[2]) == str(job)
    *command, sweep_arg = shlex.split(whole)
    assert command == ["python", "train.py", "-m", "loss=classic,multi", "seed=0"]
    assert sweep_arg == f"hydra.sweep.dir={sweep}"


@pytest.mark.slow
def test_sigterm_stops_a_fine_tuning_with_status_143_and_no_result(tmp_path):
    """Lightning alone ends a fit on SIGTERM with status 0, so a scheduler or a script would take the
    evaluation for finished; it must say that it stopped and write no result."""
    run_dir = tmp_path / "eval"
    # preset=smoke: the smoke run's small network (an epoch of the full CIFAR-stem one took 117 s on a 2-core AMD
    # EPYC in bf16, past the wait below)
    proc = subprocess.Popen([python(), "evaluate.py", "pretrained=random", "data=synthetic", "preset=smoke",
                             "eval=finetune",
                             "eval.epochs=500", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, out, err = signal_when(proc, lambda: wait_for_fine_tuning_epoch(proc, run_dir, timeout=120), signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM: fine-tuning stopped in epoch" in err.strip().splitlines()[-1]
    assert "Traceback" not in err and not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_a_signal_as_training_ends_waits_for_the_export_and_says_so(tmp_path):
    """A SIGTERM between the end of training and the written ``encoder.pt`` (here: as the final curves are
    drawn) ended the finished run silently, its export missing. It now waits for the export, then one line
    says what came and the signal takes its course (Python's default: the process ends by it)."""
    run_dir = tmp_path / "run"
    driver = (
        "import os, runpy, signal, sys\n"
        "import byol.jobs.pretrain_fit as fit\n"
        "draw = fit.draw_curves\n"
        "def draw_after_a_signal(run_dir):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    draw(run_dir)\n"
        "fit.draw_curves = draw_after_a_signal\n"
        f"sys.argv = ['train.py', 'experiment=smoke', 'hydra.run.dir={run_dir}']\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    proc = subprocess.run([python(), "-c", driver], cwd=ROOT, env=ENV, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("[byol] done: ") and (run_dir / "encoder.pt").is_file()
    assert lines[-1] == (f"[byol] received SIGTERM as training ended: training had finished "
                         f"({run_dir / 'checkpoints' / 'last.ckpt'} holds its final state); stopping")
    assert (run_dir / "curves.png").is_file() and "Traceback" not in proc.stderr


def test_a_stop_signal_outside_a_fit_raises_once_and_the_handlers_come_back():
    """kNN, the cached probe, embed and the loading before them train nothing through Lightning: SIGTERM and
    SIGUSR1 there met Python's default handler (no stop line, an earlier result left set aside). Inside
    stop_signals_raise the first raises Interrupted (status 128 + signal); one that follows while the job cleans up
    is ignored; the handlers before (a launcher's) are back afterwards."""
    from byol.jobs.job_signals import stop_signals_raise

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        with pytest.raises(Interrupted) as stopped, stop_signals_raise("the evaluation stopped"):
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # the handler runs between two bytecodes of this thread
                pass
        assert stopped.value.exit_code == 128 + signum
        assert str(stopped.value) == f"received {signal.Signals(signum).name}: the evaluation stopped"
    with stop_signals_raise("the evaluation stopped"):
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        os.kill(os.getpid(), signal.SIGTERM)  # during the clean-up: ignored
        for _ in range(1000):
            pass
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_during_a_knn_evaluation_puts_the_earlier_result_back_and_says_so(tmp_path):
    """The whole command: SIGTERM while kNN runs (here sent by the protocol itself, at a known point) ends
    evaluate.py with status 143 and one line, and the folder's earlier evaluation is as it was (it had been set
    aside for the new one; the default handler left it so, beside the new config.yaml)."""
    out = tmp_path / "eval"
    command = [python(), str(ROOT / "evaluate.py"), "pretrained=random", "data=synthetic", "eval=knn",
               "preset=smoke", f"hydra.run.dir={out}"]
    assert run_here(*command[1:]).returncode == 0  # the earlier evaluation, in this process

    def files():
        kept = (p for p in out.iterdir() if p.is_file() and p.name not in ("evaluate.log", ".lock"))
        return {p.name: p.read_bytes() for p in kept}

    earlier = files()
    assert set(earlier) >= {"results.json", "config.yaml", "metrics.csv"}
    stop_in_protocol = (
        "import os, runpy, signal, sys, time\n"
        "import byol.jobs.protocols as p\n"
        "def stopped(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "p.run_protocol = stopped\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    done = subprocess.run([python(), "-c", stop_in_protocol, *command[1:], "eval.k=5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert "received SIGTERM: the evaluation stopped before it finished" in done.stdout + done.stderr
    assert files() == earlier


def test_a_signal_taken_after_the_last_batch_still_stops_an_evaluation():
    """A SIGTERM during the last epoch's validation was recorded and never acted on: the fine-tuning went on to
    its test, wrote results.json and ended with status 0. The end of training stops it as a batch end would."""
    cb = StopEvaluationOnSignal("fine-tuning")
    t = fake_trainer(max_epochs=5, current_epoch=4)
    cb.on_train_start(t, None)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        cb.on_train_end(t, None)
    cb.on_exception(t, None, stopped.value)
    assert stopped.value.exit_code == 128 + signal.SIGTERM


def test_a_signal_taken_after_the_last_batch_of_a_run_waits_for_its_export(tmp_path):
    """RunCheckpoints put Python's default handlers back before holding the signals at the end of training: a
    SIGTERM in between ended the finished run without its encoder.pt, and one recorded after the last batch was
    absorbed. The signals are held first, and a recorded one is pending for release_stop_signals."""
    from byol.lightning.callbacks import release_stop_signals

    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, resume_hint(tmp_path), hold_signals_at_end=True)
    t = fake_trainer()
    cb.on_train_start(t, None)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert cb.received == signal.SIGUSR1
    caught = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(signum))
    try:
        cb._previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)  # what on_train_end puts back
        cb.on_train_end(t, None)
        assert caught == [] and signal.SIGUSR1 in signal.sigpending()  # held until the export is written
        release_stop_signals("training had finished")
        assert caught == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
