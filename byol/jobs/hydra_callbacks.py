"""Hydra callbacks of both entry scripts (conf/train.yaml, conf/evaluate.yaml ``hydra.callbacks``): the output
folder checked before Hydra writes into it, and a sweep's end said: its failed jobs, and the command that comes
next (evaluate a training sweep, report an evaluation sweep)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from byol.jobs.console import script_command
from byol.jobs.run_folder import FAILED, find_runs, sweep_jobs


class WritableOutput(Callback):
    """Hydra callback: before Hydra writes into the run (or sweep) folder, check that it can, and before a
    SLURM sweep, that there is SLURM; else one line and exit status 1 instead of a traceback."""

    @staticmethod
    def _check(folder: str, key: str) -> None:
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            print(f"error: cannot write into the output folder '{path}' ({e.strerror or e}); free space, fix "
                  f"its permissions, or choose another with {key}=DIR", file=sys.stderr, flush=True)
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if target.endswith("SlurmLauncher") and not (shutil.which("sbatch") or shutil.which("srun")):
            # submitit's own refusal is a traceback from inside the launcher; checked before the sweep's folder
            print("error: hydra/launcher=submitit_slurm submits to SLURM, but this machine has no sbatch or srun; "
                  "run the command on the cluster's login node, or use hydra/launcher=submitit_local (the same "
                  "launcher on this machine) or hydra/launcher=joblib", file=sys.stderr, flush=True)
            sys.exit(1)
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class SweepSummary(Callback):
    """Hydra callback: after a multirun, the command that comes next (after train.py's, the evaluation of the
    sweep; after evaluate.py's, its report), then the failed jobs, with exit status 1 if any."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # the FAILED files already there: a job this command runs again removes its own first (cli.run_job), and
        # one it fails writes a new file; by identity and time, not by the clock (a cluster's nodes may differ)
        self.before = {path: _identity(path) for path in Path(config.hydra.sweep.dir).glob(f"*/{FAILED}")}

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if config.hydra.job.name == "evaluate":
            said = f"its report: python -m byol.report {shlex.quote(str(sweep))}" if next(sweep.rglob(
                "results.json"), None) else "no results.json to report: no job evaluated a model (below)"
            print(f"[eval] sweep: {sweep}; {said}", flush=True)
        elif config.hydra.job.name == "train" and find_runs(sweep):  # a job wrote weights: something to evaluate
            # a smoke sweep's evaluation at the smoke scale, not 50 epochs of fine-tuning
            task = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
            smoke = " preset=smoke" if "experiment=smoke" in list(task) else ""
            print(f"[train] sweep: {sweep}; evaluate it: {script_command('evaluate.py')} -m "
                  f"pretrained={shlex.quote(str(sweep))} "
                  f"repr=avgpool,combined eval=linear,finetune{smoke} (then python -m byol.report on the "
                  f"evaluation's sweep folder)", flush=True)
        # this command's failures: a FAILED left as it was is an earlier command's job that this one did not run
        # (another seed list); counting it failed every later command into the folder
        before = getattr(self, "before", {})
        failed, earlier = [], []
        for path in sorted(sweep.glob(f"*/{FAILED}")):
            (earlier if before.get(path) == _identity(path) else failed).append(path)
        if earlier:
            names = ", ".join(p.parent.name for p in earlier[:5]) + (", ..." if len(earlier) > 5 else "")
            print(f"[{config.hydra.job.name}] note: {len(earlier)} job(s) of an earlier command in this sweep folder "
                  f"failed and were not run again by this one: {names}", file=sys.stderr, flush=True)
        if not failed:
            return
        total = len({*sweep_jobs(sweep), *(f.parent for f in failed)})
        others = " (the others finished)" if total > len(failed) else ""
        print(f"error: {len(failed)} of the {total} job(s) of the sweep in {sweep} failed{others}:",
              file=sys.stderr)
        for f in failed:
            reason = f.read_text().strip().splitlines()
            print(f"  {f.parent.name}: {reason[0] if reason else 'failed'}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(1)
