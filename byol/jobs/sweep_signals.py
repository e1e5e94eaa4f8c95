"""A stop signal sent to a sweep command reaches the sweep's jobs when a launcher runs them in processes of
their own (``hydra/launcher=joblib``, ``hydra/launcher=submitit_local``).

A scheduler or ``kill PID`` signals the command's process alone; its jobs went on training as orphans, holding
their folders' locks, so the command that resumes the sweep found them busy (SIGTERM did not even end the joblib
workers). Ctrl+C in a terminal reaches the whole process group and needs nothing of this. A job found holding its
folder's lock (:func:`~byol.jobs.run_folder.lock_holder`) gets the signal, saves ``last.ckpt`` and stops as a job
stopped by a signal does; the command waits for them and ends with status 128 + signal.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from byol.jobs.run_folder import lock_holder, sweep_jobs

FORWARDED = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)
# launchers whose jobs run in other processes of this machine (the SLURM launcher's command ends once it submits)
JOB_PROCESS_LAUNCHERS = ("JoblibLauncher", "LocalLauncher")
WAIT_SECONDS = 600  # for the jobs to save and stop: a checkpoint of a large model takes a while to write


def running_jobs(sweep: Path) -> dict[Path, int]:
    """The sweep's job folders held by a live process other than this one, with its PID."""
    held = {job: lock_holder(job) for job in sweep_jobs(sweep)}
    return {job: int(pid) for job, pid in held.items() if pid and pid.isdigit() and int(pid) != os.getpid()}


def forward_stop(sweep: Path, signum: int, wait_seconds: float = WAIT_SECONDS) -> None:
    """Hand ``signum`` to the sweep's running jobs, wait until they have stopped, and end this process with status
    128 + ``signum``. With no job running (between two jobs) the signal acts as it would have without us."""
    name = signal.Signals(signum).name
    jobs = running_jobs(sweep)
    if not jobs:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    print(f"[sweep] received {name}: handing it to the {len(jobs)} running job(s), which save and stop: "
          f"{', '.join(str(pid) for pid in jobs.values())}", flush=True)
    deadline, signalled = time.monotonic() + wait_seconds, set(jobs.values())
    while jobs and time.monotonic() < deadline:
        for pid in jobs.values():
            _send(pid, signum)  # again each round: a job that took its lock meanwhile gets it too
        signalled |= set(jobs.values())
        time.sleep(1.0)
        jobs = running_jobs(sweep)
    for pid in signalled - set(jobs.values()):  # their jobs have stopped: a joblib worker would idle on, orphaned
        _send(pid, signal.SIGKILL)
    left = f"; still running after {wait_seconds:.0f} s: {', '.join(map(str, jobs.values()))}" if jobs else ""
    print(f"[sweep] stopped{left}. Run the same command again (hydra.sweep.dir={sweep}) to resume the sweep",
          flush=True)
    os._exit(128 + signum)  # the launcher would report its stopped jobs as a failure with a traceback


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class ForwardStopSignals(Callback):
    """Hydra callback: for launchers that run jobs in processes of their own, SIGTERM and SIGUSR1 to the sweep
    command are handed to the running jobs (:func:`forward_stop`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if not target.endswith(JOB_PROCESS_LAUNCHERS):
            return
        sweep, command = Path(config.hydra.sweep.dir), os.getpid()

        def on_signal(number, frame):
            if os.getpid() != command:  # a job process forked with this handler: the signal is its own
                signal.signal(number, signal.SIG_DFL)
                os.kill(os.getpid(), number)
                return
            forward_stop(sweep, number)

        for signum in FORWARDED:
            signal.signal(signum, on_signal)
