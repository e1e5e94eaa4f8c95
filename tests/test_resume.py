"""Resuming: which checkpoint and config a run continues with, and that a run killed with
SIGKILL at a random step and requeued ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, epochs_reported, python, signal_when
from in_process import run_here
from omegaconf import OmegaConf

from byol.core.checkpoint import TEMP_SUFFIX, safe_load
from byol.core.data import IndexBatches, make_synthetic
from byol.core.errors import CheckpointError, ConfigError
from byol.jobs.build import architecture
from byol.jobs.cli import command_line_keys, run_dir_of
from byol.jobs.pretrained import read_pretrained
from byol.jobs.resume import epochs_trained, find_resume, resume_config
from byol.lightning.callbacks import describe_step
from byol.lightning.csv_logger import ContinuingCSVLogger

# Tiny deterministic run: 64 synthetic images, batch 16 -> 4 steps per epoch, 3 epochs; last.ckpt
# after every optimizer step so that a kill at any step has a mid-epoch checkpoint to resume.
STEPS_PER_EPOCH, EPOCHS = 4, 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
EXACT = ["experiment=smoke", "trainer.precision=32-true", "trainer.deterministic=true", "data.num_train=64",
         "data.batch_size=16", f"trainer.max_epochs={EPOCHS}", "checkpoint.last_every_n_steps=1",
         "trainer.log_every_n_steps=1"]
# one intra-op thread: several times faster on a small shared CPU, and the same sums every run
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(*overrides: str) -> subprocess.CompletedProcess:
    return run_here("train.py", *overrides, env=ENV)


def start(*overrides: str) -> subprocess.Popen:
    return subprocess.Popen([python(), "train.py", *overrides], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def saved_step(path: Path) -> int | None:
    """global_step of a checkpoint being rewritten by another process (None if not there yet)."""
    try:
        return int(torch.load(path, weights_only=True, mmap=True)["global_step"])
    except (FileNotFoundError, RuntimeError, KeyError):
        return None


def wait_for_step(proc: subprocess.Popen, last: Path, step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = saved_step(last)
        if got is not None and got >= step:
            return got
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training ended before step {step}:\n{out[-2000:]}\n{err[-2000:]}")
        assert time.monotonic() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.05)


def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run of :data:`EXACT`, shared by this file and test_signals.py; it keeps its
    epoch-end checkpoints (``epoch0001.ckpt``...) for the tests that resume one."""
    run_dir = tmp_path_factory.getbasetemp() / "uninterrupted"
    if not (run_dir / "encoder.pt").is_file():
        result = train(*EXACT, f"checkpoint.keep_last={EPOCHS}", f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assert_same_training_state(got_dir: Path, want_dir: Path) -> None:
    """Online and target networks (weights and BatchNorm buffers), optimizer and scheduler
    states and step counters of the finished runs' last.ckpt (their final state) are bitwise equal."""
    got = safe_load(got_dir / "checkpoints" / "last.ckpt")
    want = safe_load(want_dir / "checkpoints" / "last.ckpt")
    assert got["global_step"] == want["global_step"] == TOTAL_STEPS
    assert got["state_dict"].keys() == want["state_dict"].keys()
    assert any(k.startswith("model.target_encoder.") for k in want["state_dict"])
    different = [k for k, v in want["state_dict"].items() if not torch.equal(got["state_dict"][k], v)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    got_opt, want_opt = got["optimizer_states"][0]["state"], want["optimizer_states"][0]["state"]
    assert got_opt.keys() == want_opt.keys() and want_opt
    assert all(torch.equal(got_opt[k]["momentum_buffer"], want_opt[k]["momentum_buffer"]) for k in want_opt)
    assert got["lr_schedulers"] == want["lr_schedulers"]
    exported, wanted = safe_load(got_dir / "encoder.pt"), safe_load(want_dir / "encoder.pt")
    assert all(torch.equal(exported["state_dict"][k], v) for k, v in wanted["state_dict"].items())


def metric_rows(run_dir: Path) -> dict[tuple[str, str], dict]:
    """Step rows of metrics.csv keyed by (step, kind), without empty cells."""
    with open(run_dir / "metrics.csv", newline="") as f:
        # without empty cells and wall-clock timings (the monitors' seconds differ from run to run)
        rows = [{k: v for k, v in r.items() if v != "" and not k.endswith("_seconds")} for r in csv.DictReader(f)]
    keyed = {}
    for r in rows:
        kind = ("lr" if any(k.startswith("lr-") for k in r) else "epoch" if "train/loss_epoch" in r
                else "before training" if all(k.startswith("monitor/") or k == "step" for k in r) else "step")
        key = (int(r["step"]), kind)
        assert key not in keyed, f"row logged twice: {key}"
        keyed[key] = r
    return keyed


# --------------------------------------------------------------------------- unit tests


def test_global_rng_states_come_back_from_a_checkpoint_file(tmp_path):
    """torch, Python and NumPy streams saved with rng_state, written and read as a checkpoint is
    (weights_only), restored with set_rng_state: the same draws as straight after saving."""
    import numpy as np

    from byol.core.rng import rng_state, set_rng_state

    def draws():
        return torch.rand(5).tolist(), [random.random() for _ in range(5)], np.random.rand(5).tolist()

    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    draws()  # somewhere along each stream, not at a seed
    torch.save({"rng": rng_state()}, tmp_path / "state.ckpt")
    expected = draws()
    draws()  # move every stream on
    set_rng_state(safe_load(tmp_path / "state.ckpt")["rng"])
    assert draws() == expected


SAVED = {"seed": 0, "backbone": {"name": "resnet18", "stem": "imagenet", "grids": {"layer2.0": 4}},
         "loss": {"name": "classic", "taps": []}, "head": {"proj_dim": 32},
         "optim": {"name": "lars", "base_lr": 1.0}, "data": {"name": "synthetic", "num_train": 64},
         "trainer": {"max_epochs": 2, "accelerator": "auto"}, "resume": None, "old_key": 1}


def composed(**changes) -> dict:
    """What a bare ``python train.py ...`` composes: defaults that differ from the run's own."""
    c = {"seed": 0, "backbone": {"name": "resnet18", "stem": "cifar", "grids": {"layer2.0": 4}},
         "loss": {"name": "classic", "taps": []}, "head": {"proj_dim": 256},
         "optim": {"name": "lars", "base_lr": 1.0}, "data": {"name": "cifar10", "root": "data/cifar10"},
         "trainer": {"max_epochs": 200, "accelerator": "auto"}, "resume": "RUN"}
    for key, value in changes.items():
        OmegaConf.update(c := OmegaConf.create(c), key.replace("__", "."), value)
        c = OmegaConf.to_container(c)
    return c


def test_bare_resume_keeps_the_runs_own_config():
    cfg, changed = resume_config(SAVED, composed(), requested=[])
    assert changed == []
    assert cfg == {**SAVED, "resume": "RUN"}


def test_showing_a_progress_bar_or_not_is_no_change_to_the_run():
    """A run started with the bar on, continued where output goes to a file (the default null): still an
    exact continuation, in the run's own config or in the one composed now."""
    saved = {**SAVED, "trainer": {**SAVED["trainer"], "enable_progress_bar": True}}
    now = composed(trainer__max_epochs=2, trainer__enable_progress_bar=None)
    for requested in ([], [""], None):
        _, changed = resume_config(saved, {**now, "backbone": saved["backbone"], "head": saved["head"],
                                           "data": saved["data"]}, requested=requested)
        assert not [c for c in changed if "enable_progress_bar" in c], requested


def test_resume_applies_only_requested_settings():
    cfg, changed = resume_config(SAVED, composed(trainer__max_epochs=5, optim__base_lr=0.5),
                                 requested=["trainer.max_epochs"])
    assert cfg["trainer"]["max_epochs"] == 5 and cfg["optim"]["base_lr"] == 1.0  # only what was asked
    assert cfg["data"] == SAVED["data"] and cfg["backbone"]["stem"] == "imagenet"
    assert changed == ["trainer.max_epochs: 2 -> 5"]
    cfg, changed = resume_config(SAVED, composed(optim__name="sgd", optim__base_lr=0.3), requested=["optim"])
    assert cfg["optim"] == {"name": "sgd", "base_lr": 0.3} and cfg["trainer"]["max_epochs"] == 2
    assert cfg["old_key"] == 1  # a key the current config lacks stays as the run had it


def test_resume_refuses_another_architecture():
    with pytest.raises(CheckpointError) as err:
        resume_config(SAVED, composed(), requested=["backbone.stem", "head"])
    message = str(err.value)
    assert "another architecture" in message
    assert "backbone.stem: 'imagenet' in the checkpoint, 'cifar' now" in message
    assert "head.proj_dim: 32 in the checkpoint, 256 now" in message
    with pytest.raises(CheckpointError, match="loss.taps"):  # an experiment (global group) may touch anything
        resume_config(SAVED, composed(backbone__stem="imagenet", head__proj_dim=32, loss__taps=["layer2.0"]),
                      requested=[""])
    with pytest.raises(CheckpointError, match="backbone.stem"):  # called without a command line
        resume_config(SAVED, composed(), requested=None)


def test_checkpoints_from_before_the_width_setting_are_width_one():
    """SAVED has no backbone.width: it was trained at 1.0, so the same command (which now composes
    width 1.0) continues it, and another width is refused like any other architecture change."""
    same = composed(backbone__stem="imagenet", head__proj_dim=32, backbone__width=1.0)
    cfg, changed = resume_config(SAVED, same, requested=[""])
    assert architecture(cfg["backbone"])["width"] == 1.0 and not [c for c in changed if c.startswith("backbone")]
    with pytest.raises(CheckpointError, match=r"backbone.width: 1.0 in the checkpoint, 0.5 now"):
        resume_config(SAVED, {**same, "backbone": {**same["backbone"], "width": 0.5}}, requested=["backbone.width"])


@pytest.mark.parametrize("image_size,is_change", [(32, False), (96, True)])
def test_a_blur_setting_is_a_change_only_where_it_changes_the_views(image_size, is_change):
    """A run saved with ``blur_p: 0.0`` (before ``auto`` existed) continued under today's ``auto``: at 32 px
    auto is no blur, the same views, so not "no longer an exact continuation"; at 96 px it is blur."""
    augment = {"blur_p": 0.0, "view1": {}, "view2": {}}
    data = {"name": "folder", "image_size": image_size}
    saved = {**SAVED, "augment": augment, "data": data}
    now = {**saved, "augment": {**augment, "blur_p": "auto"}, "resume": "RUN"}
    for requested in ([""], None):
        _, changed = resume_config(saved, now, requested=requested)
        assert changed == (["augment.blur_p: 0.0 -> 'auto'"] if is_change else []), requested
    _, changed = resume_config(saved, {**now, "augment": {**augment, "blur_p": 0.5}}, requested=None)
    assert changed == ["augment.blur_p: 0.0 -> 0.5"]  # a number is a change at any size


def test_epochs_trained_counts_finished_epochs(tmp_path):
    path = tmp_path / "x.ckpt"
    for progress, epoch, done in ((2, 1, 2), (1, 1, 1), (None, 3, 3)):  # epoch end, mid-epoch, no loop counters
        loops = {"fit_loop": {"epoch_progress": {"current": {"processed": progress}}}} if progress else {}
        torch.save({"epoch": epoch, "loops": loops}, path)
        assert epochs_trained(path) == done


def test_find_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert find_resume(None, run) is None  # fresh start
    with pytest.raises(CheckpointError, match="no checkpoints/last.ckpt"):
        find_resume(str(run), run)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_resume(str(tmp_path / "typo"), run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    assert find_resume(None, run) == last  # requeued job: auto-resume
    assert find_resume(str(run), tmp_path / "other") == last
    assert find_resume(str(run / "checkpoints" / "last.ckpt"), run) == last


def test_resume_sets_the_hydra_run_folder(tmp_path):
    run = tmp_path / "2026-01-01_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    assert run_dir_of(str(run), "default") == str(run)
    assert run_dir_of(str(run / "checkpoints" / "epoch0003.ckpt"), "default") == str(run)
    assert run_dir_of(str(tmp_path / "loose.ckpt"), "default") == "default"
    assert run_dir_of(None, "default") == "default"
    cfg = compose_config("train", [f"resume={run}"], tmp_path)
    assert cfg.hydra.run.dir == str(run)
    assert compose_config("train", [], tmp_path).hydra.run.dir.startswith("outputs/train/")


def test_command_line_keys(tmp_path):
    compose_config("train", ["experiment=smoke", "trainer.max_epochs=3", "optim=sgd", "resume=/x",
                             "hydra.job.name=y"], tmp_path)
    assert command_line_keys() == ["", "trainer.max_epochs", "optim"]


def test_a_trainer_group_on_resume_chooses_the_machine_and_keeps_the_runs_training(tmp_path):
    """`resume=RUN trainer=default` (the README's way back to one process) took every key of the option: the
    run's 2 epochs became 200 and its precision bf16; `trainer=ddp` the same the other way. A trainer group
    now chooses the machine (strategy, devices, nodes, accelerator, SyncBatchNorm); the run keeps the rest
    unless given as trainer.KEY=VALUE."""
    from conftest import plain_config

    ddp_run = ["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true",
               "trainer.log_every_n_steps=3"]
    saved = plain_config(compose_config("train", ddp_run, tmp_path))
    composed = plain_config(compose_config("train", ["trainer=default", "trainer.accumulate_grad_batches=2"], tmp_path))
    requested = command_line_keys()
    machine = ("strategy", "devices", "num_nodes", "accelerator", "sync_batchnorm")
    assert requested == [f"trainer.{k}" for k in machine] + ["trainer.accumulate_grad_batches"]
    resumed, changed = resume_config(saved, composed, requested)
    trainer = resumed["trainer"]
    assert (trainer["strategy"], trainer["devices"], trainer["accelerator"]) == ("auto", 1, "auto")
    assert (trainer["max_epochs"], trainer["precision"], trainer["log_every_n_steps"]) == (2, "32-true", 3)
    assert trainer["accumulate_grad_batches"] == 2  # given as a key: changed
    assert not any(line.startswith(("trainer.max_epochs", "trainer.precision")) for line in changed)
    # the other way: a one-process run (no sync_batchnorm key) continued with trainer=ddp gets the option's
    one = plain_config(compose_config("train", ["experiment=smoke", "trainer.precision=32-true"], tmp_path))
    composed = plain_config(compose_config("train", ["trainer=ddp", "trainer.accelerator=cpu"], tmp_path))
    assert "sync_batchnorm" not in one["trainer"]
    resumed, _ = resume_config(one, composed, command_line_keys())
    trainer = resumed["trainer"]
    assert (trainer["strategy"], trainer["devices"], trainer["sync_batchnorm"]) == ("ddp", 2, True)
    assert (trainer["max_epochs"], trainer["precision"]) == (2, "32-true")


def test_describe_step():
    assert describe_step(6, 4) == "step 6 (epoch 2, 2 of 4 batches done)"
    assert describe_step(8, 4) == "step 8 (the end of epoch 2)"
    assert describe_step(0, 4) == "step 0 (epoch 1, 0 of 4 batches done)"


def test_metrics_csv_continues_without_repeated_steps(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n" + "".join(f"0,{s},{s / 10}\n" for s in range(6)))
    logger = ContinuingCSVLogger(tmp_path, keep_before_step=3)  # resumed at step 3: 3..5 will be redone
    logger.log_metrics({"train/loss": 0.33, "epoch": 0}, step=3)
    logger.save()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "0.0"), ("1", "0.1"), ("2", "0.2"),
                                                           ("3", "0.33")]
    fresh = ContinuingCSVLogger(tmp_path, keep_before_step=None)  # a fresh run starts a fresh file
    assert fresh.experiment is not None and not path.exists()


@pytest.mark.parametrize("content", [
    b"epoch,step,train/loss\n0,0,0.1\n,abc,\n0,1,0.2\n",  # the audit's: int(float('abc')) stopped the resume
    b"epoch,step,train/loss\n0,1.5,0.1\n",
    b"epoch,step,train/loss\n0,nan,0.1\n",
    b"epoch,step,train/loss\n0,-1,0.1\n",
    b"epoch,step,train/loss\n0,1,0.1,surplus\n",  # more values than the header
    b"epoch,step,train/loss\n0,1,\xff\xfe\n",  # not UTF-8
], ids=["text step", "fraction", "nan", "negative", "surplus value", "not utf-8"])
def test_a_metrics_csv_that_cannot_be_continued_is_kept_aside_and_a_new_one_started(tmp_path, capsys, content):
    """A resumed run continues metrics.csv; one it cannot read as metrics stopped the resume with a traceback.
    The file is kept beside it, as it was, under a name that says so; the run goes on with a new one."""
    path = tmp_path / "metrics.csv"
    path.write_bytes(content)
    logger = ContinuingCSVLogger(tmp_path, keep_before_step=3)
    logger.log_metrics({"train/loss": 0.33}, step=3)
    logger.save()
    (kept,) = tmp_path.glob("metrics.unreadable-*.csv")
    assert kept.read_bytes() == content
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"step": "3", "train/loss": "0.33"}]
    out = capsys.readouterr().out
    assert out.startswith(f"[byol] note: {path} cannot be continued (") and out.count("\n") == 1
    assert out.endswith(f"it is kept as {kept.name} beside it, and this run writes a new metrics.csv\n")
    path.write_bytes(content)  # a second time: kept under another name, the first one untouched
    assert ContinuingCSVLogger(tmp_path, keep_before_step=3).experiment is not None
    assert len(list(tmp_path.glob("metrics.unreadable-*.csv"))) == 2 and kept.read_bytes() == content


def test_index_batches_resume_mid_epoch():
    """Batches after a resume at (epoch, batch) are those the uninterrupted pass yields there."""
    data = make_synthetic(40, size=8)
    full = [x for x, _ in IndexBatches(data, 8, seed=3, progress=lambda: (2, 0))]
    resumed = [x for x, _ in IndexBatches(data, 8, seed=3, progress=lambda: (2, 3))]
    assert len(full) == 5 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed, strict=True))
    other_epoch = [x for x, _ in IndexBatches(data, 8, seed=3, progress=lambda: (1, 0))]
    assert not torch.equal(other_epoch[0], full[0])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def killed_and_requeued(tmp_path_factory):
    """A run SIGKILLed at a random step, then re-launched with the same command (a requeue)."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    kill_at = random.randint(2, TOTAL_STEPS - 2)
    proc = start(*EXACT, f"hydra.run.dir={run_dir}")
    last = run_dir / "checkpoints" / "last.ckpt"
    killed_after, _, _ = signal_when(proc, lambda: wait_for_step(proc, last, kill_at), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "encoder.pt").exists()  # killed before the end
    resumed = train(*EXACT, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"run_dir": run_dir, "reference": reference, "kill_at": kill_at, "killed_after": killed_after,
            "stdout": resumed.stdout}


@pytest.mark.slow
def test_requeued_run_resumes_and_says_where(killed_and_requeued):
    r = killed_and_requeued
    line = next((s for s in r["stdout"].splitlines() if "resuming from" in s), None)
    assert line is not None, r["stdout"][-2000:]
    step = int(line.split(": step ")[1].split()[0])
    assert step >= r["killed_after"], (line, r)  # at least as far as the checkpoint we saw
    assert f"{r['run_dir']}/checkpoints/last.ckpt: {describe_step(step, STEPS_PER_EPOCH)}" in line


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(killed_and_requeued):
    """Bitwise: CPU, float32, deterministic algorithms, one thread; data order and augmentation
    are functions of (seed, epoch, batch), the RNGs, optimizer, scheduler and EMA target are
    restored, so nothing may differ."""
    r = killed_and_requeued
    assert_same_training_state(r["run_dir"], r["reference"])


@pytest.mark.slow
def test_resumed_metrics_continue_the_killed_ones(killed_and_requeued):
    r = killed_and_requeued
    got, want = metric_rows(r["run_dir"]), metric_rows(r["reference"])
    # the rows of the step that was running when the process died may be lost with it
    resumed_step = int(r["stdout"].split("resuming from")[1].split(": step ")[1].split()[0])
    lost = {key for key in want if key not in got}
    assert all(step == resumed_step - 1 for step, _ in lost), sorted(lost)
    assert set(got) <= set(want)
    assert {k: v for k, v in want.items() if k in got} == got  # same losses, lr and tau, step by step
    assert (TOTAL_STEPS - 1, "step") in got and (0, "step") in got


@pytest.mark.slow
def test_no_temporary_files_left(killed_and_requeued):
    assert not list((killed_and_requeued["run_dir"] / "checkpoints").glob(f"*{TEMP_SUFFIX}"))


@pytest.mark.slow
def test_finished_run_is_not_retrained(killed_and_requeued):
    """last.ckpt is the final state: its epoch count says the run is finished (there is no final.ckpt)."""
    run_dir = killed_and_requeued["run_dir"]
    last, export = run_dir / "checkpoints" / "last.ckpt", run_dir / "encoder.pt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert epochs_trained(last) == EPOCHS and safe_load(last)["global_step"] == TOTAL_STEPS
    stamps = {p: p.stat().st_mtime_ns for p in (last, export, run_dir / "metrics.csv")}
    result = train(*EXACT, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"{run_dir} already finished its {EPOCHS} epochs ({last}, {export}); nothing to do"
            in result.stdout)
    assert "pretraining" not in result.stdout and "epoch 1/" not in result.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained, nothing rewritten
    export.unlink()  # killed between its last checkpoint and the export: the export is written from last.ckpt
    result = train(*EXACT, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0 and "already finished" in result.stdout, result.stderr[-2000:]
    assert last.stat().st_mtime_ns == stamps[last]
    assert safe_load(export)["meta"]["global_step"] == TOTAL_STEPS
    # all its epochs (last.ckpt's 0-based `epoch` is one less): evaluation must not call the run incomplete
    assert safe_load(export)["meta"]["epochs"] == EPOCHS
    assert read_pretrained(str(export)).pretrain_status == "complete"


@pytest.mark.slow
def test_resume_with_another_architecture_fails_clearly(killed_and_requeued):
    run_dir = killed_and_requeued["run_dir"]
    result = train(f"resume={run_dir}", "backbone.stem=cifar")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume: the checkpoint was trained with another architecture "
                           "(backbone.stem: 'imagenet' in the checkpoint, 'cifar' now)")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_resume_from_an_epoch_end_checkpoint_in_a_new_folder(tmp_path_factory):
    """The other kind of checkpoint (written at an epoch end, here the uninterrupted run's
    kept epoch0001.ckpt, after its first epoch), continued in another folder: the rest of the run is the same."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("fork") / "run"
    result = train(f"resume={reference}/checkpoints/epoch0001.ckpt", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {reference}/checkpoints/epoch0001.ckpt: {describe_step(4, 4)}" in result.stdout
    assert epochs_reported(result.stdout) == [2, 3]  # it trained the rest, not the whole run again
    assert_same_training_state(run_dir, reference)
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == [  # the source run is left alone
        "epoch0001.ckpt", "epoch0002.ckpt", "epoch0003.ckpt", "last.ckpt"]


def test_a_run_continued_with_its_epochs_cut_into_other_steps_goes_on_with_its_schedules(tmp_path_factory):
    """Continued with twice the batch (as on twice the processes: 2 steps an epoch instead of 4), the run's
    epoch-1 checkpoint stood at step 4 of a schedule now 6 steps long: epochs 2 and 3 trained at tau 1 and a
    learning rate of 0. The schedules now go on from the end of epoch 1 (read at step - 2 of 6), ending where
    the run ends; the resume line names the checkpoint's own epoch; the offset is kept in its checkpoints."""
    from byol.core.ema import tau_at

    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("recut") / "run"
    result = train(f"resume={reference}/checkpoints/epoch0001.ckpt", "data.batch_size=32", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {reference}/checkpoints/epoch0001.ckpt: step 4 (the end of epoch 1)" in result.stdout
    assert epochs_reported(result.stdout) == [2, 3]
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r["step"] and int(r["step"]) >= 4]
    tau = {int(r["step"]): float(r["train/tau"]) for r in rows if r.get("train/tau")}
    assert sorted(tau) == [4, 5, 6, 7] and tau == pytest.approx({s: tau_at(s - 2, 5, 0.99) for s in tau}, abs=1e-7)
    rate = {int(r["step"]): float(r["lr-LARS/pg1"]) for r in rows if r.get("lr-LARS/pg1")}
    factor = {s: 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in rate}  # warmup_cosine, no warm-up
    assert sorted(rate) == [4, 5, 6, 7] and rate[4] > 0
    assert {s: rate[s] / rate[4] for s in rate} == pytest.approx({s: factor[s] / factor[4] for s in rate})
    layout = safe_load(run_dir / "checkpoints" / "last.ckpt")["byol_layout"]
    assert layout == {"epoch_steps": 2, "world_size": 1, "step_offset": 2}


def test_a_mid_epoch_checkpoint_is_not_continued_under_another_cut_of_its_epoch(tmp_path):
    """Its batches done are counted in its own cut: under another global batch or accumulation the rest of its
    epoch skipped some images and repeated others. Refused in one line; the same global batch goes on, also on
    another number of processes. Mid-epoch is read from the file's loop counters (also of earlier versions):
    a stop during an epoch's first batch resumes at its start, one during its last is inside it."""
    from byol.core.checkpoint import mid_epoch
    from byol.jobs.pretrain import refuse_another_cut_of_an_epoch as refuse

    def loops(epoch_ready, epoch_done, batches_done):
        return {"loops": {"fit_loop": {"epoch_progress": {"current": {"ready": epoch_ready, "processed": epoch_done}},
                                       "epoch_loop.batch_progress": {"current": {"processed": batches_done}}}}}

    assert mid_epoch(loops(3, 2, 5)) and mid_epoch(loops(3, 2, 3))  # 5 of 8 batches; the last batch running
    assert not mid_epoch(loops(2, 2, 8)) and not mid_epoch(loops(3, 2, 0)) and not mid_epoch({})
    saved = {"data": {"batch_size": 16}, "trainer": {"strategy": "ddp", "devices": 2, "accumulate_grad_batches": 1}}
    refuse(2, saved, saved, tmp_path / "last.ckpt", 6)
    refuse(2, saved, {**saved, "data": {"batch_size": 32}, "trainer": {}}, tmp_path / "last.ckpt", 6)  # 1 x 32
    for other in ({**saved, "trainer": {"devices": 1}}, {**saved, "data": {"batch_size": 32}},
                  {**saved, "trainer": {**saved["trainer"], "accumulate_grad_batches": 2}}):
        with pytest.raises(ConfigError, match=r"saved in the middle of an epoch \(step 6\) on 2 process\(es\) x "
                                              r"batch 16, accumulating 1; continued on .* skip some images"):
            refuse(2, saved, other, tmp_path / "last.ckpt", 6)


def test_a_checkpoint_past_the_asked_epochs_is_refused_in_a_new_folder_too(tmp_path_factory):
    """Continued into a new folder with fewer epochs than it holds, a checkpoint trained nothing and the job said
    "done" (the folder's config planning 2 epochs, its weights holding 3); in its own folder this was refused."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("fewer") / "run"
    result = train(f"resume={reference}/checkpoints/last.ckpt", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: '{reference}/checkpoints/last.ckpt' has trained {EPOCHS} epochs, more than trainer.max_epochs=2: "
        f"nothing would be trained. Ask for more (trainer.max_epochs above {EPOCHS}), or evaluate that checkpoint "
        f"as it is: python evaluate.py pretrained={reference}/checkpoints/last.ckpt")
    assert not (run_dir / "encoder.pt").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_a_run_stopped_early_on_a_longer_schedule_ends_where_the_longer_run_is_at_that_epoch(tmp_path_factory):
    """schedule_epochs (experiment=cpu: 25 epochs of a 40-epoch schedule): 2 epochs of the 3-epoch
    schedule end bit for bit in the 3-epoch run's state after its 2nd epoch (weights, target, optimizer,
    learning-rate schedule), and tau and the learning rate were those of the longer run at every step."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("early") / "run"
    result = train(*EXACT, "trainer.max_epochs=2", f"schedule_epochs={EPOCHS}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 epochs (of a {EPOCHS}-epoch learning-rate and tau schedule)" in result.stdout
    got = safe_load(run_dir / "checkpoints" / "last.ckpt")
    want = safe_load(reference / "checkpoints" / "epoch0002.ckpt")
    assert got["global_step"] == want["global_step"] == 2 * STEPS_PER_EPOCH
    different = [k for k, v in want["state_dict"].items() if not torch.equal(got["state_dict"][k], v)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert got["lr_schedulers"] == want["lr_schedulers"]
    early, full = metric_rows(run_dir), metric_rows(reference)
    steps = [key for key in early if key[1] in ("step", "lr")]  # per-step rows: loss, tau, learning rate
    assert len(steps) >= 2 * STEPS_PER_EPOCH and all(early[key] == full[key] for key in steps)
    tau = [float(early[key]["train/tau"]) for key in steps if "train/tau" in early[key]]
    assert tau and tau[-1] < 0.999  # the 2-epoch run's own cosine would have ended at 1


def test_the_step_offset_of_each_kind_of_resumed_checkpoint():
    """Read off the module's rule: same cut (its saved offset, 0 for an exact resume), another cut at an epoch
    end (steps done less the finished epochs in the new cut), a file of an earlier version without a layout
    (the same, at an epoch end; none inside one), a run bounded by max_steps alone (steps, not epochs: none).
    max_steps beside max_epochs is a stop that leaves the schedules on the epochs: the offset applies."""
    from types import SimpleNamespace

    from byol.lightning.pretrain_module import BYOLModule

    def offset(resumed, epoch_steps=2, max_epochs=4, max_steps=-1):
        module = SimpleNamespace(_resumed=resumed, epoch_steps=lambda: epoch_steps,
                                 trainer=SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps))
        return BYOLModule.step_offset(module)

    layout = {"epoch_steps": 4, "world_size": 1, "step_offset": 0}
    assert offset(None) == 0
    assert offset((8, 2, layout, False), epoch_steps=4) == 0 and offset((8, 2, {**layout, "step_offset": 3}, False),
                                                                         epoch_steps=4) == 3
    assert offset((8, 2, layout, False)) == 4  # 8 steps done, 2 epochs of 2 now
    assert offset((8, 2, {}, False)) == 4 and offset((9, 2, {}, True)) == 0  # an earlier version's file
    assert offset((8, 2, layout, False), max_steps=100) == 4
    assert offset((8, 2, layout, False), max_epochs=-1, max_steps=100) == 0


@pytest.mark.slow
def test_a_resume_onto_another_schedule_takes_its_first_step_at_that_schedules_rate(tmp_path_factory):
    """2 epochs of a 10-epoch schedule, continued as 3 epochs of a 3-epoch one: from the first resumed step on,
    the learning rate is the 3-epoch run's (the reference), not the rate the checkpoint's optimizer held (the
    10-epoch schedule's: 0.058 where the new one is at 0.0156), which the scheduler replaced only after it."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("reschedule") / "run"
    first = train(*EXACT, "trainer.max_epochs=2", "schedule_epochs=10", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(f"resume={run_dir}", f"trainer.max_epochs={EPOCHS}", f"schedule_epochs={EPOCHS}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, full = metric_rows(run_dir), metric_rows(reference)
    rates = {step: float(row["lr-LARS/pg1"]) for (step, kind), row in ours.items() if kind == "lr"}
    want = {step: float(row["lr-LARS/pg1"]) for (step, kind), row in full.items() if kind == "lr"}
    later = [step for step in rates if step >= 2 * STEPS_PER_EPOCH]
    assert later and min(later) == 2 * STEPS_PER_EPOCH
    assert all(rates[step] == want[step] for step in later), {s: (rates[s], want[s]) for s in later}
    assert rates[2 * STEPS_PER_EPOCH - 1] != want[2 * STEPS_PER_EPOCH - 1]  # before: the 10-epoch schedule


@pytest.mark.slow
def test_a_run_stopped_before_its_planned_epochs_asked_for_fewer_is_not_called_finished(tmp_path_factory):
    """Stopped after 2 of its 10 planned epochs (here by max_steps; a signal does the same) and resumed with
    trainer.max_epochs=1: it was refused as "a finished run trained with other settings", which it is not. It
    holds more epochs than asked for, and the line says that and how to evaluate it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    first = train("experiment=smoke", "data.num_train=64", "data.batch_size=16", "trainer.max_epochs=10",
                  f"+trainer.max_steps={2 * STEPS_PER_EPOCH}", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    # not called done, as it was: what stopped it, and how it continues
    assert "[byol] done" not in first.stdout and (
        f"[byol] stopped short of its plan after 2 of 10 epochs and {2 * STEPS_PER_EPOCH} optimizer steps "
        f"(trainer.max_steps={2 * STEPS_PER_EPOCH}): ") in first.stdout
    assert f"python train.py resume={run_dir} continues it" in first.stdout
    result = train(f"resume={run_dir}", "trainer.max_epochs=1")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: '{last}' has trained 2 epochs, more than trainer.max_epochs=1: nothing would be trained. Ask for "
        f"more (trainer.max_epochs above 2), or evaluate that checkpoint as it is: python evaluate.py "
        f"pretrained={last}")


def test_a_resume_goes_past_the_trainer_limit_that_stopped_the_run_unless_given_again():
    """trainer.max_steps / max_time / fast_dev_run were kept in the run's config, so `resume=RUN` (which the
    stop line suggests) stopped again at once, training nothing, and trainer.max_steps=-1 was refused."""
    from byol.jobs.resume import drop_stop_limits

    config = {"trainer": {"max_epochs": 10, "max_steps": 8, "max_time": "00:00:05:00", "precision": "32-true"}}
    assert drop_stop_limits(config, ["resume"]) == ["trainer.max_time=00:00:05:00", "trainer.max_steps=8"]
    assert config == {"trainer": {"max_epochs": 10, "precision": "32-true"}}
    again = {"trainer": {"max_epochs": 10, "max_steps": 12}}
    assert drop_stop_limits(again, ["resume", "trainer.max_steps"]) == [] and again["trainer"]["max_steps"] == 12


@pytest.mark.slow
def test_a_run_cut_mid_epoch_by_max_steps_counts_whole_epochs_and_resumes_to_its_end(tmp_path_factory):
    """Cut by max_steps inside its second epoch, a run said "after 2 of 3 epochs" and its encoder.pt claimed 2
    epochs (Lightning counts the cut epoch); resumed with resume= alone it trained nothing, and with the limit
    lifted it skipped the rest of the cut epoch (last.ckpt was written as at an epoch's end). Now it continues
    to the same state as the uninterrupted run. The cut epoch's rows (epoch loss, kNN, probes) were logged as a
    finished epoch's, and again when the resumed run ended it: each epoch's rows now stand once, as in the
    uninterrupted run, and the cut epoch's line says it was cut."""
    run_dir = tmp_path_factory.mktemp("cut") / "run"
    first = train(*EXACT, f"+trainer.max_steps={STEPS_PER_EPOCH + 1}", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (f"stopped short of its plan after 1 of {EPOCHS} epochs and {STEPS_PER_EPOCH + 1} optimizer "
            f"steps") in first.stdout
    assert epochs_reported(first.stdout) == [1]
    assert f"[byol] stopped by a limit in epoch 2/{EPOCHS} after batch 1 of {STEPS_PER_EPOCH}, so far: loss " in \
        first.stdout
    assert [row["epoch"] for row in metric_rows(run_dir).values() if "train/loss_epoch" in row] == ["0"]
    assert torch.load(run_dir / "encoder.pt", weights_only=True)["meta"]["epochs"] == 1
    result = train(f"resume={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"[byol] note: trainer.max_steps={STEPS_PER_EPOCH + 1} stopped the run before and is not carried "
            f"over") in result.stdout
    assert "[byol] done: " in result.stdout
    assert_same_training_state(run_dir, reference_run(tmp_path_factory))
    assert metric_rows(run_dir) == metric_rows(reference_run(tmp_path_factory))


@pytest.mark.slow
def test_a_refused_resume_leaves_the_runs_hydra_record_as_it_was(tmp_path_factory):
    """Hydra writes <run>/.hydra/ (config, overrides) before the job's own checks: a resume refused for another
    architecture left the finished run's record describing a command that never ran. It is put back."""
    run_dir = tmp_path_factory.mktemp("record") / "run"
    first = train(*EXACT, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    refused = train(f"resume={run_dir}", "loss=multi")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "error: " in refused.stderr.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record


def test_a_run_cut_by_max_time_is_saved_where_the_timer_stopped_it(tmp_path):
    """Lightning appends max_time's Timer after our callbacks: RunCheckpoints saw should_stop only at the epoch end,
    saved there, Lightning's counters called the cut epoch done, and a resume skipped the rest of it (a 6-epoch run
    cut at step 88 ended at 189 of 192 steps, "5 of 6 epochs", by hand on 2026-12-02). The Timer goes first, so the
    batch where it stops the fit is saved as the mid-epoch state it is (the max_steps case above, end to end)."""
    from byol.jobs.config_check import plain_config
    from byol.jobs.pretrain_fit import build_run_trainer

    cfg = plain_config(compose_config("train", ["experiment=smoke", "+trainer.max_time=00:00:01:00"], tmp_path))
    kinds = [type(c).__name__ for c in build_run_trainer(cfg, tmp_path, False, [], 4).callbacks]
    assert "Timer" in kinds and kinds.index("Timer") < kinds.index("RunCheckpoints"), kinds
