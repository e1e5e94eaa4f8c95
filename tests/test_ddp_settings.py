"""Trainer settings whose processes could not start or meet are refused in one line before training (a
traceback, or a 30-minute wait for nodes that never come, before); the same checks serve training and
evaluation."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import LAUNCHER_NAMES, LAUNCHER_PREFIXES, ROOT, compose_config, python

from byol.core.errors import ConfigError
from byol.jobs.build import build_trainer, trainer_for_this_machine

DDP = {"strategy": "ddp", "accelerator": "cpu", "devices": 2, "num_nodes": 1}


def test_several_nodes_without_a_launcher_are_refused_at_once(no_launcher):
    """Rank 0 waited 30 minutes in the rendezvous for a second node nobody started, without a word."""
    with pytest.raises(ConfigError, match=r"^trainer.num_nodes=2 needs the same command on every node, started by "
                                          r"srun or torchrun \(or with NODE_RANK, MASTER_ADDR and MASTER_PORT set "
                                          r"on each\).*\(README: Scaling out\)$"):
        build_trainer({**DDP, "devices": 1, "num_nodes": 2}, logger=False)


@pytest.mark.parametrize("environment", [
    {"TORCHELASTIC_RUN_ID": "r1", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"},  # torchrun
    {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0"},  # srun
    {"NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},  # by hand
    {"MASTER_ADDR": "node0", "MASTER_PORT": "29500"},  # node 0 by hand (NODE_RANK defaults to 0)
    {"LSB_JOBID": "1", "LSB_DJOB_RANKFILE": "f", "JSM_NAMESPACE_LOCAL_RANK": "0", "JSM_NAMESPACE_SIZE": "2"},  # jsrun
])
def test_nodes_a_launcher_started_pass(no_launcher, environment):
    from byol.jobs.build import check_launcher

    for key, value in environment.items():
        no_launcher.setenv(key, value)
    check_launcher({**DDP, "devices": 1, "num_nodes": 2})


def test_an_interactive_slurm_allocation_is_no_launcher(no_launcher):
    """Lightning ignores SLURM's variables in an allocation named bash or interactive (salloc), and so does
    the check: such a command still needs srun or torchrun."""
    no_launcher.setenv("SLURM_NTASKS", "2")
    no_launcher.setenv("SLURM_JOB_NAME", "interactive")
    with pytest.raises(ConfigError, match="needs the same command on every node"):
        build_trainer({**DDP, "devices": 1, "num_nodes": 2}, logger=False)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook"])
def test_spawning_strategies_are_refused_in_training_as_in_evaluation(no_launcher, strategy):
    """ddp_spawn was a pickling traceback in training (conf/trainer/ddp.yaml said it worked), while evaluation
    refused it: one check, one message for both."""
    from byol.jobs.evaluation_checks import check_processes

    message = f"run several processes with trainer=ddp \\(trainer.strategy=ddp\\), not trainer.strategy={strategy}$"
    with pytest.raises(ConfigError, match=message) as training:
        build_trainer({**DDP, "strategy": strategy}, logger=False)
    with pytest.raises(ConfigError) as evaluation:
        check_processes({"trainer": {**DDP, "strategy": strategy}, "eval": {"name": "finetune", "batch_size": 8}})
    assert str(training.value) == str(evaluation.value)


def test_a_spawning_strategy_ends_the_training_job_in_one_line(no_launcher, tmp_path, capsys):
    from byol.jobs.cli import command_line_keys, run_job
    from byol.jobs.pretrain import pretrain

    cfg = compose_config("train", ["experiment=smoke", "trainer=ddp", "trainer.strategy=ddp_spawn",
                                   "trainer.accelerator=cpu"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_job(pretrain, cfg, requested=command_line_keys())
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: trainer.strategy=ddp_spawn hands the job to processes it starts itself"), err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("devices", [-1, [0, 1], "0,1"])
def test_device_ids_or_minus_one_on_cpu_are_refused_in_one_line_before_the_data(no_launcher, devices):
    """Lightning refuses devices=-1 or device ids on CPU (a TypeError), but only once the trainer is built, after
    the data was loaded: minutes for a large folder. The settings check says it first."""
    from byol.jobs.build import check_strategy

    with pytest.raises(ConfigError, match=r"^trainer.devices=.* with trainer.accelerator=cpu: on CPU, devices are a "
                                          r"number of processes \(trainer.devices=2\), not device ids or -1$"):
        check_strategy({**DDP, "devices": devices})
    with pytest.raises(ConfigError, match=r"with trainer.accelerator=cpu: on CPU"):
        build_trainer({**DDP, "devices": devices}, logger=False)


def test_several_devices_in_a_submitit_job_are_refused(no_launcher):
    """Lightning re-ran submitit's _submit.py with Hydra's arguments (a traceback, no FAILED file)."""
    no_launcher.setenv("SUBMITIT_EXECUTOR", "local")
    with pytest.raises(ConfigError, match=r"^trainer.devices=2 in a submitit_local job: Lightning cannot start the "
                                          r"other processes inside it, submitit must start one task per device \(on "
                                          r"SLURM: hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=2\); "
                                          r"or run the sweep with Hydra's basic launcher"):
        build_trainer(DDP, logger=False)


def test_a_submitit_slurm_job_passes_with_one_task_per_device(no_launcher):
    from byol.jobs.build import check_launcher

    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "train",
                       "SLURM_PROCID": "0"}.items():
        no_launcher.setenv(key, value)
    check_launcher({**DDP, "num_nodes": 2})  # tasks per node not in the environment: Lightning checks the rest
    no_launcher.setenv("SLURM_NTASKS_PER_NODE", "2")
    check_launcher({**DDP, "num_nodes": 2})
    no_launcher.setenv("SLURM_NTASKS_PER_NODE", "1")
    with pytest.raises(ConfigError, match=r"trainer.devices=2 x trainer.num_nodes=2 in a submitit_slurm job.*"
                                          r"tasks_per_node=2 hydra.launcher.nodes=2\)"):
        check_launcher({**DDP, "num_nodes": 2})
    check_launcher({**DDP, "devices": 1})  # one process a job: nothing to start


@pytest.mark.slow
def test_a_ddp_sweep_through_submitit_local_fails_its_job_in_one_line(tmp_path):
    """The audit's command: the sweep ended in a traceback, with no FAILED file and a stray outputs/ folder."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_NAMES}
    proc = subprocess.run([python(), str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                           "experiment=smoke", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                           "monitor=off", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "1 job(s) of the sweep" in proc.stderr, proc.stderr[-3000:]
    (job,) = (p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert "trainer.devices=2 in a submitit_local job" in (job / "FAILED").read_text()
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("settings", [{"devices": 2}, {"accelerator": "gpu", "devices": [0, 1]},  # ids: not on CPU
                                      {"devices": 1, "num_nodes": 2}])
def test_several_devices_without_trainer_ddp_are_refused_in_training_too(no_launcher, settings):
    """Lightning's auto strategy trained DDP without SyncBatchNorm and without a note; evaluation refused it."""
    with pytest.raises(ConfigError, match="^several devices .* need the DDP strategy: add trainer=ddp$"):
        build_trainer({"accelerator": "cpu", "strategy": "auto", **settings}, logger=False)


def test_the_cpu_syncbatchnorm_note_is_for_several_processes_only(no_launcher, capsys):
    """A DDP run continued on one process keeps sync_batchnorm: true in its config; one process shares no
    statistics, so the note about CPU processes keeping their own says nothing there."""
    one = trainer_for_this_machine({**DDP, "devices": 1, "sync_batchnorm": True}, "[t]")
    assert one["sync_batchnorm"] is False and capsys.readouterr().out == ""
    two = trainer_for_this_machine({**DDP, "sync_batchnorm": True}, "[t]")
    assert two["sync_batchnorm"] is False
    assert capsys.readouterr().out.startswith("[t] note: trainer.sync_batchnorm needs GPUs")


def test_the_processes_asked_for_are_counted_as_lightning_reads_devices(monkeypatch):
    """``trainer.devices=-1`` (every GPU) or a string of ids counted as one process: a DDP sweep on all GPUs lost
    its shared sweep folder and the steps of an epoch were planned for one process."""
    import torch

    from byol.jobs.build import planned_world, requested_processes

    cases = {2: 2, "3": 3, "0,1": 2, "0,": 1, (0, 1, 2): 3, 0: 1, -1: 1, "auto": 1}
    for devices, count in cases.items():
        devices = list(devices) if isinstance(devices, tuple) else devices
        assert requested_processes({"devices": devices, "accelerator": "cpu"}) == count, devices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for devices in (-1, "-1", "auto"):
        assert requested_processes({"devices": devices, "accelerator": "gpu", "num_nodes": 2}) == 8
        assert planned_world({"devices": devices, "accelerator": "auto", "strategy": "ddp"}) == 4


@pytest.mark.parametrize("devices", ["[]", "','", "0", "-2", "4.0", "1000000000000000000000000000000", "[-1]", "abc",
                                     "'--1'", "'²'", "'0,²'", "['¹']"])
def test_devices_lightning_cannot_read_are_refused_before_the_data(tmp_path, capsys, devices, monkeypatch):
    """An empty list counted 0 processes (a ZeroDivisionError when the epoch was planned), 10**30 overflowed
    inside Lightning, and the others were refused only after the training images were decoded; strings that
    str.isdigit takes and int() does not ("--1", "²") were a traceback."""
    from byol.jobs import pretrain as job
    from byol.jobs.cli import command_line_keys, run_job
    from byol.jobs.pretrain import pretrain

    monkeypatch.setattr(job, "training_data", lambda config: pytest.fail("the data was read"))
    cfg = compose_config("train", ["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu",
                                   f"trainer.devices={devices}"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_job(pretrain, cfg, requested=command_line_keys())
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: trainer.devices=") and "is not a number of devices (1 to 4096" in err, err


def test_a_dataset_too_small_for_the_global_batch_is_one_line_before_the_processes_start(tmp_path):
    """Checked by every process once they had started: each rank's error, run together on one line, about
    10 s in. Now rank 0 says it once, before Lightning starts the others."""
    result = subprocess.run([python(), "train.py", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu",
                             "data.batch_size=100", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, text=True,
                            capture_output=True, timeout=300)
    line = ("error: data.batch_size=100 x 2 processes is more than the dataset (128 images), so an epoch would have "
            "no full global batch; lower data.batch_size or use more images")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == line
    assert result.stderr.count("error:") == 1 and "rank 1" not in result.stderr + result.stdout
