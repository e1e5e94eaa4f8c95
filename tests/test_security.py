"""Files users hand us are data: configs inside checkpoints and run folders never run code, a run
folder is never overwritten by another run, and storage or value errors are one line."""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, compose_config, imported, plain_config
from in_process import run_here
from omegaconf import OmegaConf

import byol.core.checkpoint as ckpt
from byol.core.checkpoint import atomic_torch_save, safe_load
from byol.core.errors import CheckpointError, ConfigError
from byol.jobs.cli import command_line_keys, run_job
from byol.jobs.config_check import check_config, check_file_config
from byol.jobs.hydra_callbacks import WritableOutput
from byol.jobs.pretrain import pretrain
from byol.jobs.run_folder import FolderBusyError, FolderLock, check_resume_target, lock_holder

LEGACY = json.loads((ROOT / "tests" / "data" / "legacy_v1_checkpoint_layout.json").read_text())


class RunsCode:
    """Unpickling this creates ``marker`` (what a pickled payload inside a config would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(RunsCode(marker), buffer)
    return buffer.getvalue()


# Each builds a config node that, passed to Hydra's instantiate, creates or empties `marker`.
PAYLOADS = {
    "torch.load chain": lambda m: {"_target_": "torch.load", "weights_only": False,
                                   "f": {"_target_": "io.BytesIO", "_args_": [pickled(m)]}},
    "builtins.open": lambda m: {"_target_": "builtins.open", "_args_": [str(m), "w"]},
    "os.system": lambda m: {"_target_": "os.system", "_args_": [f"touch {m}"]},
    "subprocess.call": lambda m: {"_target_": "subprocess.call", "_args_": [["touch", str(m)]]},
    "builtins.exec": lambda m: {"_target_": "builtins.exec", "_args_": [f"open({str(m)!r}, 'w').close()"]},
    "importlib.import_module": lambda m: {"_target_": "importlib.import_module", "_args_": ["byol_payload"]},
    "eval": lambda m: {"_target_": "builtins.eval", "_args_": [f"open({str(m)!r}, 'w').close()"]},
}
# Where a payload goes: a None-valued setting, a number, and a whole object's config.
PLACES = {"trainer.gradient_clip_val": ("trainer", "gradient_clip_val"),
          "optim.optimizer.eta": ("optim", "optimizer", "eta"),
          "logger": ("logger",)}


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """The file a payload would create; importing `byol_payload` would create it too."""
    target = tmp_path / "pwned"
    (tmp_path / "byol_payload.py").write_text(f"open({str(target)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return target


def run_config(tmp_path, *overrides) -> dict:
    return plain_config(compose_config("train", ["experiment=smoke", *overrides], tmp_path))


def with_payload(config: dict, place: tuple, node) -> dict:
    """A copy of ``config`` with ``node`` at ``place`` (a path of keys and list indices)."""
    config = copy.deepcopy(config)
    parent = config
    for key in place[:-1]:
        parent = parent[key]
    parent[place[-1]] = node
    return config


def fake_run(folder: Path, config: dict, step: int = 2) -> Path:
    """A run folder whose last.ckpt holds ``config`` (the config is checked before any weight is read)."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    last = folder / "checkpoints" / "last.ckpt"
    atomic_torch_save({"byol_config": config, "global_step": step, "epoch": 0,
                       "state_dict": {"model.online_encoder.x": torch.zeros(1)}}, last)
    return last


def refused_line(err: pytest.ExceptionInfo, key: str) -> str:
    message = str(err.value)
    assert "\n" not in message and key in message and "refusing" in message, message
    return message


# --------------------------------------------------------------------------- configs inside files


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_in_a_checkpoint_is_refused_on_resume_and_requeue(tmp_path, marker, payload, place):
    config = with_payload(run_config(tmp_path), PLACES[place], PAYLOADS[payload](marker))
    run = tmp_path / "run"
    last = fake_run(run, config)
    for how in ("resume", "requeue"):  # resume=RUN, or the same hydra.run.dir launched again
        overrides = [f"resume={run}"] if how == "resume" else []
        cfg = compose_config("train", ["experiment=smoke", *overrides], run)
        with pytest.raises(ConfigError) as err:
            pretrain(cfg, run)
        assert refused_line(err, f"{place}.") and str(last) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_in_a_run_folders_config_yaml_is_refused(tmp_path, marker, payload):
    from byol.jobs.pretrained import read_pretrained

    run = tmp_path / "run"
    fake_run(run, run_config(tmp_path))
    bad = with_payload(run_config(tmp_path), ("trainer", "gradient_clip_val"), PAYLOADS[payload](marker))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(bad)))
    with pytest.raises(ConfigError) as err:  # requeue reads the folder's config for its run id
        pretrain(compose_config("train", ["experiment=smoke"], run), run)
    refused_line(err, "trainer.gradient_clip_val.")
    with pytest.raises(ConfigError) as err:  # evaluation reads it for the run's settings
        read_pretrained(run / "checkpoints" / "last.ckpt")
    refused_line(err, "trainer.gradient_clip_val.")
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_in_a_checkpoint_is_refused_by_evaluation(tmp_path, marker, payload):
    from byol.jobs.pretrained import read_pretrained

    config = with_payload(run_config(tmp_path), ("optim", "optimizer", "eta"), PAYLOADS[payload](marker))
    path = fake_run(tmp_path / "elsewhere", config)
    (tmp_path / "elsewhere" / "config.yaml").unlink(missing_ok=True)
    with pytest.raises(ConfigError) as err:
        read_pretrained(path)
    refused_line(err, "optim.optimizer.eta.")
    assert not marker.exists()


def test_encoder_export_holding_code_or_odd_keys_is_refused(tmp_path, marker):
    from byol.core.backbone import Encoder
    from byol.core.checkpoint import load_encoder, save_encoder

    good = tmp_path / "encoder.pt"
    save_encoder(Encoder("resnet18", "imagenet", []), good)
    blob = safe_load(good)
    for change, expected in ((("backbone", "name"), "must be strings"), (("backbone", "extra"), "unknown key")):
        bad = copy.deepcopy(blob)
        bad[change[0]][change[1]] = PAYLOADS["os.system"](marker)
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=expected):
            load_encoder(tmp_path / "bad.pt")
    assert not marker.exists()


@pytest.mark.parametrize("node,key", [
    ({"_target_": "os.system"}, "optim.optimizer._target_"),      # a class where a name is expected
    ("${oc.env:HOME}", "optim.optimizer.eta"),                     # an interpolation
])
def test_instantiate_keys_and_interpolations_are_refused_anywhere(node, key):
    config = copy.deepcopy(LEGACY["byol_config"])
    if isinstance(node, dict):
        config["optim"]["optimizer"].update(node)
    else:
        config["optim"]["optimizer"]["eta"] = node
    with pytest.raises(ConfigError) as err:
        check_file_config(config, "checkpoint 'x.ckpt'")
    assert f"{key} = " in str(err.value)


def test_configs_written_before_builders_used_names_still_load():
    """The layout this project wrote until November 2026 (recorded from a real smoke run)."""
    config = check_file_config(LEGACY["byol_config"], "old checkpoint")
    assert config["optim"]["optimizer"] == {"momentum": 0.9, "eta": 0.02}
    assert config["optim"]["scheduler"] == {"name": "warmup_cosine", "warmup_epochs": 0}
    assert config["logger"] == {"name": "csv"}
    assert "_target_" not in json.dumps(config)
    assert config["backbone"] == LEGACY["byol_config"]["backbone"]
    check_config({k: v for k, v in config.items()})  # a valid config of today's layout


# --------------------------------------------------------------------------- run ids and locks


def test_another_runs_checkpoint_cannot_overwrite_a_run_folder(tmp_path):
    own = run_config(tmp_path)
    own["run_id"] = "aaaaaaaaaaaa"
    r18 = tmp_path / "r18"
    fake_run(r18, own)
    (r18 / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(own)))
    (r18 / "metrics.csv").write_text("step,loss\n0,1.0\n1,0.9\n2,0.8\n")
    before = {p: p.read_bytes() for p in (r18 / "config.yaml", r18 / "metrics.csv")}
    other = dict(run_config(tmp_path, "backbone.name=resnet50"), run_id="bbbbbbbbbbbb")
    foreign = fake_run(tmp_path / "r50", other)
    cfg = compose_config("train", ["experiment=smoke", f"resume={foreign}"], r18)
    with pytest.raises(CheckpointError) as err:
        pretrain(cfg, r18)
    assert str(err.value).startswith(f"refusing to continue '{foreign}' in '{r18}': that folder holds another run")
    assert {p: p.read_bytes() for p in before} == before


def test_resume_target_rules(tmp_path):
    empty, run = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    own = fake_run(run, {})
    assert check_resume_target(empty, own, "a1", None) is False               # an empty folder: a new run
    assert check_resume_target(tmp_path / "new", own, "a1", None) is False    # a new folder too
    assert check_resume_target(run, own, "a1", "a1") is True                  # its own folder
    assert check_resume_target(run, own, None, None) is True                  # old files, its own folder
    with pytest.raises(CheckpointError):
        check_resume_target(run, own, "a1", "b2")                             # copied in from another run
    with pytest.raises(CheckpointError):
        check_resume_target(run, tmp_path / "x.ckpt", None, None)             # old files, from elsewhere


def test_a_run_keeps_its_id_and_a_branch_gets_a_new_one(tmp_path):
    """pretrain() itself: the id is written into config.yaml and every checkpoint."""
    run = tmp_path / "run"
    cfg = compose_config("train", ["experiment=smoke", "data.num_train=32", "data.batch_size=16",
                                   "trainer.max_epochs=1", "trainer.precision=32-true"], run)
    pretrain(cfg, run)
    run_id = OmegaConf.load(run / "config.yaml").run_id
    assert len(run_id) == 12 and safe_load(run / "checkpoints" / "last.ckpt")["byol_config"]["run_id"] == run_id
    branch = tmp_path / "branch"
    cfg = compose_config("train", ["experiment=smoke", f"resume={run / 'checkpoints' / 'last.ckpt'}",
                                   "trainer.max_epochs=1"], branch)
    pretrain(cfg, branch, requested=[])
    assert OmegaConf.load(branch / "config.yaml").run_id not in (None, run_id)


HOLD_LOCK = "import sys, time; from byol.jobs.run_folder import FolderLock\n" \
            "with FolderLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n"


def test_lock_names_the_holder_and_a_killed_holder_does_not_block(tmp_path):
    tmp_path = tmp_path / "sweep" / "0_seed=0"  # a sweep's one job, for failed_jobs
    tmp_path.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError) as err:
            with FolderLock(tmp_path):
                pass
        assert f"'{tmp_path}' is in use by another process (PID {holder.pid})" in str(err.value)
        assert lock_holder(tmp_path) == str(holder.pid)  # what an evaluation of a running sweep reads
        failed_jobs_reason = failed_jobs_of_one(tmp_path)
        assert failed_jobs_reason == f"still training (PID {holder.pid}), no checkpoint yet"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_holder(tmp_path) is None and failed_jobs_of_one(tmp_path).startswith("no weights: ")
    with FolderLock(tmp_path):  # the kernel released the dead process's lock
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    assert lock_holder(tmp_path / "nowhere") is None


def failed_jobs_of_one(job: Path) -> str:
    """The reason failed_jobs gives for ``job`` as the one job of a sweep."""
    from byol.jobs.run_folder import failed_jobs

    (job / ".hydra").mkdir(exist_ok=True)
    [(found, reason)] = failed_jobs(job.parent)
    assert found == job
    return reason


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_job_refuses_the_folder_of_the_other_kind_of_job_and_writes_nothing_into_it(tmp_path, capsys):
    """`python evaluate.py pretrained=RUN hydra.run.dir=RUN` rewrote the run's config.yaml with the evaluation's
    (the run could then not be evaluated on its own data: CIFAR-10 was looked for instead) and wrote FAILED
    into it; pretraining into an evaluation's folder replaced its metrics.csv."""
    from byol.jobs.evaluate import evaluate

    run, evaluation, mixed = tmp_path / "run", tmp_path / "eval", tmp_path / "mixed"
    for folder, files in ((run, {"config.yaml": "loss: {taps: []}\n", "metrics.csv": "epoch\n0\n",
                                 "encoder.pt": "weights"}),
                          (evaluation, {"config.yaml": "eval: {name: linear}\n", "metrics.csv": "epoch\n0\n",
                                        "results.json": "{}"}),
                          (mixed, {"results.json": "{}", "checkpoints/last.ckpt": "state"})):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    for job, fn, folder, kind in (("evaluate", evaluate, run, "a pretraining run"),
                                  ("train", pretrain, evaluation, "an evaluation")):
        before = folder_contents(folder)
        (folder / f"{job}.log").write_text("")  # as Hydra's log handler leaves it before the job starts
        cfg = compose_config(job if job == "evaluate" else "train",
                             ["preset=smoke" if job == "evaluate" else "experiment=smoke", f"hydra.job.name={job}"],
                             folder)
        with pytest.raises(SystemExit) as exit_:
            run_job(fn, cfg, requested=[])
        assert exit_.value.code == 1
        assert capsys.readouterr().err == (f"error: '{folder}' holds {kind}, whose config.yaml and metrics.csv the "
                                           f"{'evaluation' if job == 'evaluate' else 'run'} would overwrite; write "
                                           f"into another folder (hydra.run.dir=NEW, or leave hydra.run.dir out for "
                                           f"a new one under outputs/)\n")
        assert folder_contents(folder) == before  # no FAILED, no lock, no log: nothing written
    # a run's folder that an earlier version evaluated into still continues (results.json beside checkpoints)
    from byol.jobs.run_folder import check_job_folder

    check_job_folder(mixed, "train")
    with pytest.raises(FolderBusyError, match="holds a pretraining run"):
        check_job_folder(mixed, "evaluate")
    check_job_folder(tmp_path / "new", "train"), check_job_folder(tmp_path / "new", "evaluate")
    odd = tmp_path / "odd"  # a config.yaml of another shape (a list of mappings): no traceback, not a run
    odd.mkdir()
    (odd / "config.yaml").write_text("- {a: 1}\n- b\n")
    check_job_folder(odd, "train"), check_job_folder(odd, "evaluate")


@pytest.mark.slow
def test_the_folder_check_comes_before_hydra_writes_its_own_files(tmp_path):
    """Given as hydra.run.dir, a run's folder is refused before Hydra rewrites its .hydra/ record and log;
    a sweep's job folders are checked by the job (above)."""
    from byol.jobs.command_folders import given_run_dir

    run = tmp_path / "run"
    files = {"encoder.pt": "weights", ".hydra/overrides.yaml": "- loss=multi\n", "train.log": "[byol]\n"}
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    before = folder_contents(run)
    result = run_here("evaluate.py", "pretrained=random", f"hydra.run.dir={run}")
    assert result.returncode == 1 and result.stderr.startswith(f"error: '{run}' holds a pretraining run"), result.stderr
    assert folder_contents(run) == before
    assert given_run_dir(["seed=1", "hydra.run.dir='/a b'", "hydra.run.dir=/c"]) == Path("/c")
    assert given_run_dir(["-m", "hydra.run.dir=/c"]) is None and given_run_dir(["hydra.run.dir=${now:%H}"]) is None


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [("train.py", ["trainer.max_epochs=1000"]),
                                         ("evaluate.py", ["pretrained=random", "eval=finetune", "eval.epochs=1000"])])
def test_second_process_in_the_same_folder_exits_1(tmp_path, script, args):
    """The second process refuses in one line and leaves the first one running, its lock untouched (the
    first is then stopped: it is sized to outlive the second by far)."""
    folder = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    smoke = ["experiment=smoke"] if script == "train.py" else ["preset=smoke", "data=synthetic"]
    cmd = [sys.executable, script, *smoke, f"hydra.run.dir={folder}"]
    first = subprocess.Popen(cmd + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while not (folder / ".lock").is_file() or not (folder / ".lock").read_text().strip():
            assert time.time() < deadline and first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.1)
        # -X importtime: the busy folder is refused before the job loads Lightning (seconds, not tens of them)
        second = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first process stopped while the second ran"
        assert (folder / ".lock").read_text().strip() == str(first.pid)
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"is in use by another process (PID {first.pid})" in second.stderr
    assert not imported(second.stderr, "pytorch_lightning") and not imported(second.stderr, "torchvision")


# --------------------------------------------------------------------------- storage and values


def test_torch_write_failure_on_a_full_disk_is_the_disk_full_message(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def full(obj, f):
        f.write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(CheckpointError) as err:
        atomic_torch_save({"step": torch.tensor(2)}, path)
    assert str(err.value).startswith(f"could not write '{path}' (No space left on device); the previous file")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(total=2**40, used=0, free=2**40))
    with pytest.raises(CheckpointError, match=r"write failed: \[enforce fail"):
        atomic_torch_save({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_storage_errors_anywhere_in_a_job_are_one_line(tmp_path, capsys, error):
    run = tmp_path / "run"
    run.mkdir()
    compose_config("train", ["experiment=smoke"], run)

    def job(cfg, run_dir):
        raise OSError(error, os.strerror(error), str(run_dir / "metrics.csv"))

    with pytest.raises(SystemExit) as exit_:
        run_job(job, None)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {os.strerror(error)} ('{run / 'metrics.csv'}'); free space or choose")


def test_unwritable_output_folder_is_one_line_before_hydra_writes(tmp_path, monkeypatch, capsys):
    def refuse(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    config = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "ro")}, "sweep": {"dir": str(tmp_path)}}})
    for start in (WritableOutput().on_run_start, WritableOutput().on_multirun_start):
        with pytest.raises(SystemExit) as exit_:
            start(config)
        assert exit_.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"error: cannot write into the output folder '{tmp_path / 'ro'}' (Read-only file system); "
                      f"free space, fix its permissions, or choose another with hydra.run.dir=DIR")
    assert err[1].endswith("hydra.sweep.dir=DIR")


BAD_VALUES = {
    "data.batch_size=0": "data.batch_size must be a positive whole number, not 0",
    "data.batch_size=-1": "data.batch_size must be a positive whole number, not -1",
    "data.batch_size=1": "data.batch_size must be at least 2, not 1: BatchNorm normalises over the images of a batch",
    "optim.base_lr=abc": "optim.base_lr must be a number",
    "optim.base_lr='0.1'": "optim.base_lr must be a number (got the string '0.1'; give it without quotes)",
    "optim.base_lr=-0.5": "optim.base_lr must be positive",
    "trainer.max_epochs=1.5": "trainer.max_epochs must be a positive whole number",
    "ema.tau_base=1.5": "ema.tau_base must lie between 0 and 1",
    "augment.view2.solarize_p=2": "augment.view2.solarize_p must lie between 0 and 1",
    "augment.hue=0.7": "augment.hue must lie between 0 and 0.5, not 0.7",
    "augment.brightness=-0.1": "augment.brightness must be a finite number, zero or more, not -0.1",
    "augment.contrast=inf": "augment.contrast must be a finite number, zero or more, not inf",  # was a NaN loss
    "trainer.gradient_clip_val=abc": "trainer.gradient_clip_val must be a number, zero or more, not 'abc'",  # TypeError
    "loss.taps=[[layer2.0]]": "loss.taps: unknown tap ['layer2.0'] for resnet18",  # was unhashable type: 'list'
    "+augment.view1.saturation=-1": "augment.view1.saturation must be a finite number, zero or more",
    "augment.crop_scale=[0.9,0.1]": "augment.crop_scale must be [min, max] with 0 < min <= max <= 1, not [0.9, 0.1]",
    "augment.crop_scale=[0,1]": "augment.crop_scale must be [min, max] with 0 < min <= max <= 1",
    "augment.crop_scale=[0.08]": "augment.crop_scale must be [min, max]",
    "+augment.view2.crop_ratio=[2,1]": "augment.view2.crop_ratio must be [min, max] with 0 < min <= max, not [2, 1]",
    "augment.blur_sigma=[2.0,0.1]": "augment.blur_sigma must be [min, max] with 0 < min <= max",
    "augment.blur_kernel_size=4": "augment.blur_kernel_size must be odd (or 0",
    "augment.blur_p=yes": "augment.blur_p must lie between 0 and 1 (or auto: BYOL's blur on crops above 32 px), "
                          "not 'yes'",
    "+augment.view1.blur_p=1.5": "augment.view1.blur_p must lie between 0 and 1 (or auto",
    "augment.solarize_threshold=2": "augment.solarize_threshold must lie between 0 and 1",
    "optim.optimizer.momentum=1.5": "optim.optimizer.momentum must lie in [0, 1), not 1.5",
    "optim.optimizer.momentum=1": "optim.optimizer.momentum must lie in [0, 1), not 1",
    "optim.optimizer.momentum=[0.1]": "optim.optimizer.momentum must be a number, not [0.1]",  # was a TypeError
    "ema.tau_schedule=linear": "unknown ema.tau_schedule 'linear'; choose one of: cosine, constant",
    "optim.name=rmsprop": "unknown optim.name 'rmsprop'; choose one of: lars, sgd, adam, adamw",
    "optim.scheduler.name=step": "unknown optim.scheduler.name 'step'; choose one of: warmup_cosine, constant",
    "+trainer.callbacks=x": "trainer.callbacks = 'x' is a Trainer argument the jobs set themselves: the jobs add",
    "+trainer.max_epoch=3": "trainer.max_epoch = 3 is not a Trainer argument this project passes on (did you mean "
                            "trainer.max_epochs?)",
    "data.std=[0,0,0]": "data.std must be in (0, 1], of pixels scaled to [0, 1], not [0, 0, 0]",
    "data.std=[62,62,66]": "not [62, 62, 66] (given on the 0-255 scale? divide by 255)",
    "data.mean=[0.5,0.5]": "data.mean must be 3 numbers, one per RGB channel, not [0.5, 0.5]",
    "data.mean=[0.5,nan,0.5]": "data.mean must be in [0, 1], of pixels scaled to [0, 1]",
    "data.mean=[a,b,c]": "data.mean must be 3 numbers",
    "trainer.precision=17": "unknown trainer.precision '17'; choose one of: auto, bf16-mixed, 16-mixed, 32-true",
    "seed=-1": "seed must be a whole number from 0 to 4294967295, not -1",
    "seed=4294967296": "seed must be a whole number from 0 to 4294967295, not 4294967296",
    "seed=1.5": "seed must be a whole number from 0 to 4294967295, not 1.5",
    "loss.taps=layer2.0": "loss.taps must be a list, in brackets: loss.taps=[layer2.0] (got the str 'layer2.0')",
    "augment.crop_scale=0.5": "augment.crop_scale must be a list, in brackets: augment.crop_scale=[min, max] (got "
                              "the number 0.5)",
}
if not torch.cuda.is_available():
    BAD_VALUES["trainer.accelerator=gpu"] = ("trainer.accelerator=gpu but no CUDA device is available; use "
                                             "trainer.accelerator=cpu")


@pytest.mark.parametrize("override", BAD_VALUES)
def test_invalid_values_are_one_line_and_exit_1(tmp_path, capsys, override):
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_config("train", ["experiment=smoke", override], run)
    with pytest.raises(SystemExit) as exit_:
        run_job(pretrain, cfg, requested=command_line_keys())
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: ") and BAD_VALUES[override] in err, err
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


@pytest.mark.parametrize("override, expected", [
    ("trainer.strategy=foo", "strategy=foo, precision="),  # precision=auto, as this machine chose it
    ("trainer.strategy=foo", "): You selected an invalid strategy name"),
    ("trainer.benchmark=abc", "benchmark=abc): set_benchmark_cudnn expects a bool"),  # torch's RuntimeError
])
def test_trainer_settings_lightning_refuses_are_one_line(tmp_path, capsys, override, expected):
    """Lightning checks its own arguments when the Trainer is built; what it refuses is one line naming
    the hardware settings, not a traceback."""
    cfg = compose_config("train", ["experiment=smoke", override], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_job(pretrain, cfg, requested=command_line_keys())
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: Lightning refused the trainer settings (accelerator=") and expected in err, err
    assert not (tmp_path / "checkpoints").exists()


def test_invalid_evaluation_values_are_refused():
    for override, expected in (("eval.epochs=0", "eval.epochs must be a positive whole number"),
                               ("eval.optimizer.name=lbfgs", "unknown eval.optimizer.name 'lbfgs'"),
                               ("eval.optimizer.momentum=-0.1", "eval.optimizer.momentum must lie in \\[0, 1\\)"),
                               ("trainer.precision=transformer-engine", "unknown trainer.precision"),
                               ("seed=-3", "seed must be a whole number from 0"),
                               ("data.std=[0.2,0.2,0]", "data.std must be in \\(0, 1\\]")):
        cfg = plain_config(compose_config("evaluate", ["preset=smoke", override]))
        with pytest.raises(ConfigError, match=expected):
            check_config(cfg)


def test_a_run_config_edited_to_a_zero_std_is_refused_by_evaluation():
    """A run's data settings come from its config.yaml or checkpoint, not the checked command line: a
    std of 0 there divided every pixel by zero and scored NaN features."""
    from byol.jobs.evaluation_data import EvaluationData

    composed = plain_config(compose_config("evaluate", ["preset=smoke"]))["data"]
    data = EvaluationData(composed, given=[], seed=0, split={"name": "holdout", "val_size": 8})
    assert data.settings({"data": composed}, "run")["std"] == composed["std"]
    with pytest.raises(ConfigError, match=r"data.std must be in \(0, 1\].*\(run: data from the run's own settings\)"):
        data.settings({"data": {**composed, "std": [0.0, 0.0, 0.0]}}, "run")
    # given on the command line, the std replaces the run's
    fixed = EvaluationData({**composed, "std": [0.5] * 3}, given=["data.std"], seed=0, split={})
    assert fixed.settings({"data": {**composed, "std": [0.0] * 3}}, "run")["std"] == [0.5] * 3


def test_truncated_checkpoint_message_is_whole_and_names_the_others(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("epoch0001.ckpt", "epoch0003.ckpt"):
        atomic_torch_save({"w": torch.ones(1)}, folder / name)
    last = folder / "last.ckpt"
    atomic_torch_save({"w": torch.ones(1000)}, last)
    last.write_bytes(last.read_bytes()[:2000])
    with pytest.raises(CheckpointError) as err:
        safe_load(last)
    message = str(err.value)
    assert message.startswith(f"checkpoint '{last}' is corrupt, truncated or not a PyTorch file (")
    assert "\n" not in message and ")." in message  # the whole reason, not cut mid-sentence
    assert message.endswith(f"Other checkpoints beside it, latest first: {folder / 'epoch0003.ckpt'}, "
                            f"{folder / 'epoch0001.ckpt'}; e.g. python train.py resume={folder / 'epoch0003.ckpt'}")


@pytest.mark.slow
def test_real_checkpoint_with_the_torch_load_chain_runs_nothing_end_to_end(tmp_path):
    """The reported attack, through the command line: a real run's last.ckpt whose embedded config holds
    the torch.load + io.BytesIO chain, used by resume=, by a requeue and by evaluate.py."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def cli(script, *args):
        smoke = ["experiment=smoke"] if script == "train.py" else ["preset=smoke"]
        return run_here(script, *smoke, *args, env=env)

    pretrain(compose_config("train", ["experiment=smoke", "trainer.max_epochs=1", "data.num_train=32",
                                      "data.batch_size=16"], run), run)  # in this process: the attack is later
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["byol_config"]["trainer"]["gradient_clip_val"] = PAYLOADS["torch.load chain"](marker)
    torch.save(checkpoint, last)
    before = last.read_bytes()
    for script, args in (("train.py", [f"resume={run}"]), ("train.py", [f"hydra.run.dir={run}"]),
                         ("evaluate.py", [f"pretrained={last}", f"hydra.run.dir={tmp_path / 'eval'}"])):
        result = cli(script, *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
        assert "trainer.gradient_clip_val.f._target_ = 'io.BytesIO'" in line or \
            "trainer.gradient_clip_val._target_ = 'torch.load'" in line, line
    assert not marker.exists() and last.read_bytes() == before


def test_training_settings_given_to_evaluation_are_refused_naming_the_right_key(tmp_path):
    from byol.jobs.evaluate import evaluate

    cfg = compose_config("evaluate", ["preset=smoke", "data=synthetic", "pretrained=random", "trainer.max_epochs=1"],
                         tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer.max_epochs does not apply to evaluation; use eval.epochs$"):
        evaluate(cfg, tmp_path / "run", requested=command_line_keys())


# --------------------------------------------------------------------------- what a checkpoint holds


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run (one epoch of two steps, in this process) and its last.ckpt as read from the file."""
    run = tmp_path_factory.mktemp("finished") / "run"
    pretrain(compose_config("train", ["experiment=smoke", "data.num_train=32", "data.batch_size=16",
                                      "trainer.max_epochs=1", "trainer.precision=32-true"], run), run)
    return run, torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


# Each: where in last.ckpt, what is put there, what the error line says. The smoke run is 0.5 wide.
CRAFTED_CHECKPOINTS = {
    "config width": (("byol_config", "backbone", "width"), 1.0,
                     "its weights do not match the architecture its own config describes; 202 tensors of another "
                     "shape (e.g. model.online_encoder.body.conv1.weight: (32, 3, 7, 7) in the file, (64, 3, 7, 7) "
                     "expected)"),
    "parameter groups": (("optimizer_states", 0, "param_groups"), [],
                         "optimizer_states[0] has 0 parameter groups, the optimizer 2"),
    "global_step": (("global_step",), "x", "global_step is 'x', not a whole number of 0 or more"),
    "epoch": (("epoch",), -1, "epoch is -1, not a whole number of 0 or more"),
    "loop counter": (("loops", "fit_loop", "epoch_progress", "current", "processed"), "1",
                     "loops.fit_loop.epoch_progress.current.processed is '1', not a whole number"),
    "loop attribute": (("loops", "fit_loop", "epoch_progress", "total", "increment_ready"), 1,
                       "loops.fit_loop.epoch_progress.total holds 'increment_ready', which it never holds"),
    "momentum shape": (("optimizer_states", 0, "state", 0, "momentum_buffer"), torch.zeros(2),
                       "optimizer_states[0].state[0].momentum_buffer has shape (2,), its parameter (32, 3, 7, 7)"),
    "learning rate": (("optimizer_states", 0, "param_groups", 0, "lr"), "0.1",
                      "optimizer_states[0].param_groups[0].lr is '0.1', not a number"),
    "scheduler attribute": (("lr_schedulers", 0, "optimizer"), {},
                            "lr_schedulers[0] holds 'optimizer', which would replace the scheduler's own attribute"),
    "scheduler counter": (("lr_schedulers", 0, "last_epoch"), 1.5,
                          "lr_schedulers[0].last_epoch is 1.5, not a whole number"),
    "random state": (("rng", "torch"), torch.zeros(3, dtype=torch.uint8),
                     "rng is not a saved random-number state (RuntimeError: "),
    "weights": (("state_dict", "model.online_encoder.body.conv1.weight"), "x",
                "state_dict['model.online_encoder.body.conv1.weight'] is 'x', not a tensor"),
    "version": (("pytorch-lightning_version",), "two", "pytorch-lightning_version is 'two', not a version number"),
    "loss sums": (("epoch_loss_sums", "images"), "x",
                  "epoch_loss_sums.epoch, .images and .skipped must be whole numbers"),
    "callbacks": (("callbacks",), [], "callbacks is [], not a mapping of callback names to their states"),
    "gradient scaler": (("MixedPrecision",), {"scale": 1.0}, "MixedPrecision lacks 'growth_factor'"),
    # resumed, NaN weights stopped the run at its first step with "the last good checkpoint is <this one>"
    "NaN weights": (("state_dict", "model.online_encoder.body.conv1.weight"), torch.full((32, 3, 7, 7), float("nan")),
                    "state_dict['model.online_encoder.body.conv1.weight'] holds NaN or infinite values (4704 of 4704)"),
    "inf target": (("state_dict", "model.target_encoder.body.bn1.running_var"), torch.full((32,), float("inf")),
                   "state_dict['model.target_encoder.body.bn1.running_var'] holds NaN or infinite values (32 of 32)"),
    "integer weights": (("state_dict", "model.predictors.avgpool.0.weight"), torch.zeros(128, 32, dtype=torch.int64),
                        "its weights do not match the architecture its own config describes; 1 tensor of another kind "
                        "of number (e.g. model.predictors.avgpool.0.weight: integer (torch.int64) in the file, "
                        "floating-point (torch.float32) expected)"),
    "stride-0 weights": (("state_dict", "model.online_encoder.body.conv1.weight"), torch.zeros(1).expand(32, 3, 7, 7),
                         "state_dict['model.online_encoder.body.conv1.weight'] has 4,704 elements over 4 bytes of "
                         "storage (a stride-0 or overlapping view); it is not a saved state"),
    "meta weights": (("state_dict", "model.target_encoder.body.conv1.weight"), torch.empty(32, 3, 7, 7, device="meta"),
                     "state_dict['model.target_encoder.body.conv1.weight'] is a tensor without numbers (on the meta "
                     "device)"),
    "NaN momentum": (("optimizer_states", 0, "state", 0, "momentum_buffer"), torch.full((32, 3, 7, 7), float("nan")),
                     "optimizer_states[0].state[0].momentum_buffer holds NaN or infinite values (4704 of 4704)"),
}


@pytest.mark.parametrize("change", CRAFTED_CHECKPOINTS)
def test_a_checkpoint_whose_state_does_not_fit_is_one_line_before_anything_is_written(tmp_path, finished_run, change):
    """`resume=RUN` of a finished run whose last.ckpt was edited: a 237-line size-mismatch dump (its config's width
    against its weights), torch's ValueError on the parameter groups, int('x') on the step... Now every part that
    Lightning or the job loads is checked first, against a model built on the meta device, and refused in one
    line naming the file, before the run's config.yaml, metrics.csv or export are touched."""
    source, checkpoint = finished_run
    keys, value, expected = CRAFTED_CHECKPOINTS[change]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.csv", "encoder.pt"):
        (run / name).write_bytes((source / name).read_bytes())
    last = run / "checkpoints" / "last.ckpt"
    torch.save(with_payload(checkpoint, keys, value), last)
    before = folder_contents(run)
    cfg = compose_config("train", ["experiment=smoke", f"resume={run}", "trainer.max_epochs=2"], run)
    with pytest.raises(CheckpointError) as err:
        pretrain(cfg, run, requested=["trainer.max_epochs"])
    message = str(err.value)
    assert message.startswith(f"checkpoint '{last}' is damaged or was edited, and cannot be resumed: {expected}"), \
        message
    assert "\n" not in message and message.endswith("or train into another folder (hydra.run.dir=NEW)")
    assert folder_contents(run) == before  # the finished run as it was: its config still says 1 epoch


def test_lightning_loading_a_checkpoint_checks_it_too(finished_run):
    """What Lightning calls before it loads anything (``on_load_checkpoint``) refuses the same files, before the
    random states are set: a checkpoint handed to the Trainer some other way is checked all the same."""
    from byol.core.rng import rng_state, set_rng_state
    from byol.jobs.pretrain_fit import build_module

    run, checkpoint = finished_run
    module = build_module(checkpoint["byol_config"])
    before = rng_state()
    module.on_load_checkpoint(copy.deepcopy(checkpoint))  # the run's own: loads (and sets the random states)
    set_rng_state(before)
    state = torch.get_rng_state()
    for change in ("config width", "parameter groups", "loop attribute"):
        keys, value, expected = CRAFTED_CHECKPOINTS[change]
        if keys[0] == "byol_config":  # the module is built from the config: its weights are the other kind
            bad = with_payload(checkpoint, ("state_dict", "model.online_encoder.body.conv1.weight"), torch.zeros(1))
            expected = "its weights do not match the architecture its own config describes; 1 tensor of another"
        else:
            bad = with_payload(checkpoint, keys, value)
        bad["rng"]["torch"] = torch.zeros_like(state)
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            module.on_load_checkpoint(bad)
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_crafted_checkpoint_and_export_are_one_error_line_end_to_end(tmp_path, finished_run):
    """The audit's commands: `train.py resume=RUN trainer.max_epochs=3` with last.ckpt's config edited to another
    width, and `evaluate.py pretrained=RUN` with a string among encoder.pt's weights: one `error:` line each."""
    source, checkpoint = finished_run
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.csv"):
        (run / name).write_bytes((source / name).read_bytes())
    torch.save(with_payload(checkpoint, ("byol_config", "backbone", "width"), 1.0), run / "checkpoints" / "last.ckpt")
    export = safe_load(source / "encoder.pt")
    torch.save(with_payload(export, ("state_dict", "body.conv1.weight"), "notatensor"), run / "encoder.pt")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for script, args, expected in (
            ("train.py", [f"resume={run}", "trainer.max_epochs=3"], "its weights do not match the architecture its "
                                                                     "own config describes"),
            ("evaluate.py", [f"pretrained={run}", "eval=knn", "preset=smoke", f"hydra.run.dir={tmp_path / 'eval'}"],
             "its state_dict['body.conv1.weight'] is 'notatensor', not a tensor")):
        result = run_here(script, *args, env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
        assert expected in line, line


# --------------------------------------------------------------------------- what an encoder export holds


def tiny_export(path: Path, **meta) -> Path:
    from byol.core.backbone import Encoder
    from byol.core.checkpoint import save_encoder

    save_encoder(Encoder("resnet18", "cifar", ["layer2.0"], width=0.125), path,
                 meta={"loss": "multi", "epochs": 2, "global_step": 8, "seed": 0, **meta})
    return path


@pytest.mark.parametrize("keys,value,expected", [
    (("state_dict", "body.conv1.weight"), "notatensor", "its state_dict['body.conv1.weight'] is 'notatensor', not a "
                                                         "tensor"),
    (("state_dict",), [1, 2], "its state_dict is [1, 2], not a mapping of names to tensors"),
    (("meta", "epochs"), "two", "meta.epochs is 'two', not a whole number of 0 or more"),
    (("meta", "global_step"), 1.5, "meta.global_step is 1.5, not a whole number of 0 or more"),
    (("meta", "seed"), -1, "meta.seed is -1, not a whole number from 0 to 4294967295"),
    (("meta", "loss"), "../x", "meta.loss is '../x', not classic or multi"),
    (("meta",), ["x"], "its meta is ['x'], not a mapping"),
    (("state_dict", "body.conv1.weight"), torch.full((8, 3, 3, 3), float("nan")),
     "its state_dict['body.conv1.weight'] holds NaN or infinite values (216 of 216)"),
], ids=["weight", "weights", "epochs", "global_step", "seed", "loss", "meta", "NaN weight"])
def test_an_export_holding_values_of_another_kind_is_one_line(tmp_path, keys, value, expected):
    """`evaluate.py pretrained=RUN` on an encoder.pt with a string among its weights (AttributeError: 'str' object
    has no attribute 'shape') or `meta.epochs: two` (int('two')): refused when the file is read, naming it."""
    from byol.core.checkpoint import load_encoder
    from byol.jobs.pretrained import read_pretrained

    good = tiny_export(tmp_path / "encoder.pt")
    assert read_pretrained(good).epochs == 2
    path = tmp_path / "bad.pt"
    torch.save(with_payload(safe_load(good), keys, value), path)
    readers = [read_pretrained, load_encoder] if keys[0] == "state_dict" else [read_pretrained]
    for read in readers:
        with pytest.raises(CheckpointError) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"refusing '{path}': {expected}; "), message
        assert "\n" not in message and message.endswith("(move the file away, then python train.py resume=RUN)")


def test_an_export_naming_a_huge_network_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """An encoder.pt of width 0.125 whose description says width 8 (a ResNet-18 of ~0.7 billion weights; 64 would
    be 45 billion): its weights are compared with a meta-device build, so no memory is spent on that network."""
    from byol.core import checkpoint
    from byol.jobs.pretrained import read_pretrained

    export = safe_load(tiny_export(tmp_path / "encoder.pt"))
    path = tmp_path / "huge.pt"
    torch.save(dict(export, backbone={**export["backbone"], "width": 8.0}), path)
    built_for_real = []
    real_load = checkpoint._load_checked  # where a real network receives the weights the meta build checked
    monkeypatch.setattr(checkpoint, "_load_checked", lambda module, *a: built_for_real.append(module) or
                        real_load(module, *a))
    for build in (lambda: read_pretrained(path).build(["layer2.0"]), lambda: checkpoint.load_encoder(path)):
        with pytest.raises(CheckpointError, match="holds weights of another architecture"):
            build()
    assert not built_for_real  # refused on the meta device, before a real network was made
    encoder, _ = checkpoint.load_encoder(tmp_path / "encoder.pt")
    assert built_for_real == [encoder] and next(encoder.parameters()).device.type == "cpu"


@pytest.mark.parametrize("change,expected", [
    ({"stem": "imagenet/../../../x"}, "backbone.stem 'imagenet/../../../x' is not one of the stems (cifar, imagenet)"),
    ({"name": "resnet18/../x"}, "backbone.name 'resnet18/../x' is none of the networks this project builds"),
    ({"name": "resnet19"}, "backbone.name 'resnet19' is none of the networks this project builds (resnet18, "),
    ({"taps": ["layer2.0", "../x"]}, "backbone.taps names '../x', no module of resnet18"),
    ({"grids": {"layer9": 2}}, "backbone.grids must map module names to positive whole numbers"),
    ({"grids": {"avgpool": 2}}, "backbone.grids must map module names to positive whole numbers (avgpool: 1)"),
    ({"width": 0.001}, "backbone.width must be a positive number"),
], ids=["stem path", "name path", "name", "tap", "grid", "avgpool grid", "width"])
def test_the_backbone_a_file_names_is_one_this_project_builds(tmp_path, change, expected):
    """An encoder.pt whose stem was `imagenet/../../../x` got into an evaluation folder's path: name, stem, taps and
    grids of an export (and of a checkpoint's config) are checked against what the project builds, not only for
    being strings; a run folder's config.yaml names nothing that is not."""
    from byol.core.checkpoint import load_encoder
    from byol.jobs.pretrained import read_pretrained, run_config_fields

    export = safe_load(tiny_export(tmp_path / "encoder.pt"))
    path = tmp_path / "bad.pt"
    torch.save(dict(export, backbone={**export["backbone"], **change}), path)
    for read in (read_pretrained, load_encoder):
        with pytest.raises(CheckpointError) as err:
            read(path)
        assert str(err.value).startswith(f"refusing '{path}': {expected}") and "\n" not in str(err.value), err.value
    if "taps" not in change:  # a checkpoint's config holds no backbone taps
        config = run_config(tmp_path)
        config["backbone"].update(change)
        last = fake_run(tmp_path / "run", config)
        with pytest.raises(CheckpointError) as err:
            read_pretrained(last)
        assert str(err.value).startswith(f"refusing '{last}': {expected}"), err.value
        assert str(err.value).endswith("Evaluate the run's encoder.pt or another of its checkpoints")
    fields = run_config_fields({"backbone": {"name": "resnet18/../x", "stem": "../x"}, "seed": "1", "loss": {}})
    assert fields.pop("trained") == {"loss": {}}  # compared and shown escaped; no name, stem or seed among them
    assert fields == {"loss": "classic"}
