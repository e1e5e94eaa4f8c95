"""Sweeps through Hydra's launcher plugins (conf/hydra/launcher/): submitit (SLURM's launcher, run
locally here) and joblib; and the hand-over of a preemption signal to submitit's requeue."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, python

from byol.jobs.cli import hand_on_signal

TINY = ["experiment=smoke", "data.num_train=64", "trainer.max_epochs=1"]


def _sweep(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    proc = subprocess.run([python(), str(ROOT / "train.py"), "-m", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    (sweep,) = (tmp_path / "outputs" / "multirun" / "train").iterdir()
    return proc, sweep


def _wait_for(condition, timeout: float = 300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := condition():
            return result
        time.sleep(0.5)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_submitit_local_sweep_requeues_a_preempted_job_into_its_folder_and_records_a_failed_one(tmp_path):
    """One submitit_local sweep of two jobs (one sweep for both cases: each job process imports torch and Lightning).
    Job 0 gets SIGUSR1 (SLURM's --signal=USR1@120) mid-run: it saves last.ckpt and hands the signal to submitit,
    which requeues it; it resumes mid-run in its own folder and finishes. Job 1, with a batch larger than the data,
    fails: its FAILED file says why and the sweep ends with status 1, naming 1 of its 2 jobs."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cloudpickle = pytest.importorskip("cloudpickle")
    from byol.jobs.run_folder import lock_holder

    env = {**os.environ, "SUBMITIT_PREEMPT_SIGNAL": "USR1"}  # what submitit_slurm.yaml's `setup` exports
    proc = subprocess.Popen([python(), str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                             *TINY[:2], "trainer.max_epochs=20", "monitor=off", "data.batch_size=16,1000"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = _wait_for(lambda: next(tmp_path.glob("outputs/multirun/train/*/0_*/train.log"), None))
        _wait_for(lambda: "epoch 2/20" in log.read_text())  # 18 epochs left (seconds) to find the job in
        os.kill(int(_wait_for(lambda: lock_holder(log.parent))), signal.SIGUSR1)  # the job's own process
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    assert "1 of the 2 job(s) of the sweep" in err and "data.batch_size=1000 is larger" in err
    assert "ConfigStore schema" not in err + out  # Hydra's schema-matching deprecation, silenced
    sweep = log.parent.parent
    ok, bad = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert ok == log.parent and not (ok / "FAILED").exists()
    assert "is larger than the dataset" in (bad / "FAILED").read_text()
    text = log.read_text()
    assert "resuming from" in text and "epoch 20/20" in text and (ok / "encoder.pt").is_file()
    assert (ok / "checkpoints" / "last.ckpt").is_file()
    assert len(list(sweep.glob(".submitit/[0-9]*"))) == 2  # job 0 requeued as the same job, not a third
    assert any("the whole sweep: its command with hydra.sweep.dir=" in p.read_text()  # ours, not _submit.py's
               for p in sweep.glob(".submitit/[0-9]*/*_log.err"))
    # a requeued job runs its pickled submission again: it must resolve to this sweep folder (so that
    # train.py finds its last.ckpt there), not to a new ${now:} folder
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    setup_globals()
    for pkl in sweep.glob(".submitit/*/*_submitted.pkl"):
        with open(pkl, "rb") as f:
            launcher = cloudpickle.load(f).function
        folder = tmp_path / OmegaConf.select(launcher.config, "hydra.sweep.dir")  # relative to the job's cwd
        assert folder.resolve() == sweep.resolve()


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc, sweep = _sweep(tmp_path, "hydra/launcher=joblib", *TINY, "seed=0,1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(sweep.glob("*/encoder.pt"))) == 2
    # our launcher configs extend the plugin's schema of the same name on purpose: Hydra's deprecation
    # warning about it (in the command and again in each worker) is not shown
    assert "ConfigStore schema" not in proc.stderr + proc.stdout



@pytest.mark.parametrize("console", [True, False])
def test_hydras_schema_matching_warning_is_silenced_by_the_jobs_console(console):
    """Composing our launcher configs warns (Hydra 1.1+) that each is validated against the plugin's schema of
    the same name, two to four times a sweep; conf/hydra/launcher/*.yaml extend those schemas on purpose, so
    byol.jobs.console (imported by every job and joblib worker) silences that warning, and only it. Checked in a
    fresh process (the filter is set on import) for each launcher, without sweeping."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    code = ("import warnings\n"
            + ("import byol.jobs.console\n" if console else "")
            + "from hydra import compose, initialize_config_dir\n"
            f"with initialize_config_dir({str(ROOT / 'conf')!r}, version_base='1.3'):\n"
            "    for launcher in ('joblib', 'submitit_local', 'submitit_slurm'):\n"
            "        compose('train', [f'hydra/launcher={launcher}'], return_hydra_config=True)\n"
            "warnings.warn('another warning')\n")
    proc = subprocess.run([python(), "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("is validated against ConfigStore schema") == (0 if console else 3), proc.stderr
    assert "another warning" in proc.stderr  # other warnings are shown


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["max_num_timeout"] > 0
    assert cfg.hydra.launcher.tasks_per_node == 4  # one process per GPU
    assert cfg.hydra.launcher.additional_parameters.signal == "USR1@120"
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in cfg.hydra.launcher.setup


def test_a_slurm_sweep_without_slurm_is_one_line_before_anything_is_launched(tmp_path, monkeypatch, capsys):
    """submitit refuses a machine without SLURM with a traceback from inside the launcher; the sweep's
    start callback says it in one line naming the launchers that do run here. With sbatch present: no word."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from byol.jobs.hydra_callbacks import WritableOutput

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                      return_hydra_config=True)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        WritableOutput().on_multirun_start(cfg)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: hydra/launcher=submitit_slurm submits to SLURM, but this machine has no sbatch "
                          "or srun; ") and "hydra/launcher=submitit_local" in err
    assert not (tmp_path / "sweep").exists()  # refused before the sweep's folder is made: no empty one left
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}" if name == "sbatch" else None)
    WritableOutput().on_multirun_start(cfg)
    assert capsys.readouterr().err == ""


def test_a_signal_is_handed_on_to_a_python_handler_only():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        hand_on_signal(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        hand_on_signal(signal.SIGUSR1)  # the default action would kill the process: not delivered
        hand_on_signal(signal.SIGINT)  # Python's own Ctrl+C handler: not delivered
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_a_stop_signal_to_the_sweep_command_reaches_its_jobs(tmp_path, launcher):
    """A scheduler or ``kill PID`` signals the sweep command alone: with a launcher that runs the jobs in
    processes of their own, they went on training as orphans holding their folders' locks. Now each saves its
    last.ckpt and stops, the command waits for them and ends with 143, saying how to resume; nothing is left."""
    pytest.importorskip(f"hydra_plugins.hydra_{launcher}_launcher".replace("submitit_local", "submitit"))
    from byol.jobs.run_folder import lock_holder

    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([python(), str(ROOT / "train.py"), "-m", f"hydra/launcher={launcher}",
                             "experiment=smoke", "data.num_train=256", "trainer.max_epochs=200", "seed=0,1",
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    jobs: list[Path] = []
    while len(jobs) < 2 or not all((job / "metrics.csv").is_file() for job in jobs):  # both are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        jobs = [job for job in sweep.glob("*_*") if lock_holder(job)]
        time.sleep(0.5)
    holders = [int(lock_holder(job)) for job in jobs]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "[sweep] received SIGTERM: handing it to the 2 running job(s)" in out
    assert "to resume the sweep" in out.strip().splitlines()[-1] and "Traceback" not in err
    for job, pid in zip(jobs, holders, strict=True):
        assert (job / "checkpoints" / "last.ckpt").is_file() and lock_holder(job) is None
        assert _ends(pid), f"job process {pid} left running"  # no orphan left training (or idling: joblib's)


def _ends(pid: int, within: float = 10) -> bool:
    """Whether process ``pid`` is gone (or a zombie, dead but not yet reaped by init) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.2)
    return False
