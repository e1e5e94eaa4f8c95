"""Glue for the Hydra entry points: run folders, resuming, short user-facing errors, sweep summaries."""

from __future__ import annotations

import atexit
import errno
import importlib
import os
import re
import shlex
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from byol.core.errors import ByolError, Interrupted
from byol.jobs.command_folders import mark_new_folder, remove_refused_folder
from byol.jobs.console import ESCAPED_NAMES, console_copied_to, name_too_long, neutralized, script_command
from byol.jobs.evaluation_help import evaluation_config
from byol.jobs.hydra_callbacks import SweepSummary, WritableOutput  # noqa: F401 (named here by older sweeps' configs)
from byol.jobs.run_folder import (
    CHECKPOINTS_DIR,
    FAILED,
    SWEEP_RECORD,
    FolderBusyError,
    FolderLock,
    check_job_folder,
    is_run_dir,
)

# OSErrors that mean "this storage cannot take the run's files": reported as one line
STORAGE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}


def run_dir_of(resume, default: str) -> str:
    """``hydra.run.dir`` for ``resume=...``: the run folder itself, or the folder of its
    ``checkpoints/*.ckpt``; ``default`` (a new timestamped folder) without resume or for a
    checkpoint outside a run folder."""
    if resume in (None, "", "None", "null"):
        return default
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".ckpt" and path.parent.name == CHECKPOINTS_DIR:
        return str(path.parent.parent)
    return default


_CLAIMED: dict[str, str] = {}


def new_folder(stamped: str) -> str:
    """A new folder for this process: ``stamped`` (a time-stamped path), created here, or ``stamped-2``,
    ``-3``... when another job started in the same second took it (two jobs in one folder: the second
    failed on the folder's lock after Hydra had rewritten the first one's ``.hydra/`` record). The same
    answer on every call of a process."""
    if stamped not in _CLAIMED:
        _CLAIMED[stamped] = stamped  # a read-only or full disk: Hydra's attempt reports it (WritableOutput)
        for candidate in [Path(stamped), *(Path(f"{stamped}-{n}") for n in range(2, 1000))]:
            try:
                candidate.parent.mkdir(parents=True, exist_ok=True)
                candidate.mkdir()
            except FileExistsError:
                continue
            except OSError:
                break
            _CLAIMED[stamped] = str(candidate)
            mark_new_folder(candidate)
            atexit.register(_remove_if_empty, candidate)
            break
    return _CLAIMED[stamped]


def _remove_if_empty(folder: Path) -> None:
    """A claimed folder no job wrote into (``--cfg``, ``--help``, a refused command line) is not left behind."""
    try:
        folder.rmdir()  # only an empty folder goes
    except OSError:
        pass


def new_run_dir_of(resume, stamped: str) -> str:
    """:func:`run_dir_of`, with a new time-stamped folder claimed (:func:`new_folder`) when it starts a run."""
    folder = run_dir_of(resume, stamped)
    return new_folder(stamped) if folder == stamped else folder


# A sweep run with trainer=ddp: Lightning starts the other processes by re-running the command, sweep
# included, and each would time-stamp a sweep folder of its own; rank 0 names its folder here first.
SWEEP_DIR_ENV = "BYOL_DDP_SWEEP_DIR"


def sweep_dir_of(default: str) -> str:
    """``hydra.sweep.dir``: rank 0's sweep folder in the processes it started (:data:`SWEEP_DIR_ENV`). (Not
    claimed as :func:`new_folder` does: a launcher's job processes resolve it again, to the same folder.)"""
    return os.environ.get(SWEEP_DIR_ENV) or default


if not OmegaConf.has_resolver("byol_run_dir"):
    OmegaConf.register_new_resolver("byol_run_dir", new_run_dir_of)
    OmegaConf.register_new_resolver("byol_sweep_dir", sweep_dir_of)
    OmegaConf.register_new_resolver("byol_new_dir", new_folder)
    OmegaConf.register_new_resolver("byol_evaluation_config", evaluation_config)  # evaluate.py --help


def command_arg(key: str, value) -> str:
    """``key=value`` as one shell word that Hydra reads back as ``value``.

    Sweep job folders are named like ``1_loss=multi,seed=0``: unquoted, Hydra would read the
    ``=`` and ``,`` as syntax, so such values are quoted for Hydra, then for the shell.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    text = str(value)
    try:
        plain = OverridesParser.create().parse_override(f"{key}={text}").value() == text
    except Exception:  # Hydra's parse error: the value needs quoting
        plain = False
    if plain and all(c.isalnum() or c in "/._-+:=" for c in text):
        return f"{key}={text}"
    # Hydra unescapes backslashes only before a quote or at the end of a quoted string
    quoted = "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text) + "'"
    return shlex.quote(f"{key}={quoted}") if any(c in text for c in '"$`\\!') else f'"{key}={quoted}"'


def evaluate_hint(run_dir: Path, config: dict) -> str:
    """What to do with a finished single run: the command that evaluates it (a sweep names one command for
    all its runs at its end instead, so its jobs say nothing). A run on synthetic data (``experiment=smoke``,
    also when resumed with ``resume=`` alone) is evaluated in seconds with ``preset=smoke``."""
    if not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.MULTIRUN:
        return ""
    toy = (config.get("data") or {}).get("name") == "synthetic"
    smoke = " preset=smoke" if toy or "experiment=smoke" in list(HydraConfig.get().overrides.task) else ""
    return f"; evaluate it: {script_command('evaluate.py')} {command_arg('pretrained', run_dir)}{smoke}"


def resume_hint(run_dir: Path) -> str:
    """The command that continues ``run_dir``; inside a sweep also the one that continues the whole
    sweep (re-running its command in the same sweep folder skips finished jobs, resumes the rest)."""
    hint = f"{script_command('train.py')} {command_arg('resume', run_dir)}"
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return hint
    sweep_dir = Path(HydraConfig.get().sweep.dir).resolve()
    entry = OmegaConf.select(HydraConfig.get(), "job.name", default=None) or Path(sys.argv[0]).stem
    if Path(sys.argv[0]).name != f"{entry}.py":  # a launcher's process (submitit, joblib) runs the job
        sweep = command_arg("hydra.sweep.dir", sweep_dir)
        return f"{hint} (this job alone), or the whole sweep: its command with {sweep}"
    args = [shlex.quote(a) for a in sys.argv[1:] if not a.startswith("hydra.sweep.dir=")]
    command = " ".join(["python", Path(sys.argv[0]).name, *args, command_arg("hydra.sweep.dir", sweep_dir)])
    return f"{hint} (this job alone), or the whole sweep: {command}"


def command_line_keys() -> list[str]:
    """Config keys this invocation set on the command line, as prefixes for ``resume_config``.

    ``loss.taps=[...]`` gives ``loss.taps``; a group choice gives its package (``optim=sgd``:
    ``optim``), except ``trainer=...``, which chooses the machine a run continues on
    (:data:`~byol.jobs.config_check.TRAINER_MACHINE_KEYS`): ``resume=RUN trainer=default`` took the option's
    200 epochs and its precision too. An experiment (a global package) may touch any key and gives ``""``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from byol.jobs.config_check import PACKAGED_GROUPS, TRAINER_MACHINE_KEYS

    hc = HydraConfig.get()
    groups = set(hc.runtime.choices)
    keys = []
    for o in OverridesParser.create().parse_overrides(list(hc.overrides.task)):
        key = o.key_or_group
        if key == "resume" or key.split(".")[0] == "hydra":
            continue
        if key == "trainer":
            keys += [f"trainer.{name}" for name in TRAINER_MACHINE_KEYS]
        elif key in groups:
            keys.append(key if key in PACKAGED_GROUPS else "")
        else:
            keys.append(key)
    return keys


# where Lightning reads a launched process's rank at import, in its order (LOCAL_RANK before SLURM_PROCID: SLURM
# sets that also for a job whose processes it does not start)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def launched_rank() -> int:
    """This process's global rank: set by a launcher (Lightning's DDP processes, torchrun, SLURM: read
    from the environment by Lightning) or by Lightning once its processes start; 0 for a process alone. Read
    from the environment as Lightning does while Lightning is not loaded: a job's folder is checked and held
    before the job loads it (:func:`job_named`)."""
    rank_zero = sys.modules.get("pytorch_lightning.utilities.rank_zero")
    if rank_zero is not None:
        return int(getattr(rank_zero.rank_zero_only, "rank", 0) or 0)
    return next((int(os.environ[key]) for key in RANK_VARIABLES if os.environ.get(key) is not None), 0)


def hand_on_signal(signum: int) -> None:
    """After a signal stopped the run and ``last.ckpt`` is saved, deliver it again to the handler that
    was there before training, when that is Python code: a launcher's (submitit requeues the job on
    ``SUBMITIT_PREEMPT_SIGNAL``, see conf/hydra/launcher/submitit_slurm.yaml). Otherwise nothing."""
    try:
        handler = signal.getsignal(signum)
    except (ValueError, OSError):
        return
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)


def job_named(module: str, name: str):
    """The job function ``module.name``, imported when :func:`run_job` calls it, once the job's folder is held:
    a folder in use or refused is then said before torch, torchvision and Lightning load (seconds)."""
    def job(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    return job


def run_job(fn, cfg, *args, **kwargs):
    """Call ``fn(cfg, run_dir, ...)``; a :class:`ByolError` prints one line instead of a stack trace.

    A single run exits with the error's status (1; 128 + signal for a preempted run). In a
    multirun the failure is recorded in the job folder's ``FAILED`` file and the sweep goes on
    with its other jobs (an unexpected exception is printed with its traceback, as the bug it
    is); :class:`SweepSummary` reports the failures and exits non-zero at the end. A preempted
    job stops the whole sweep: the scheduler wants the process gone.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    ddp_sweep = multirun and launched_rank() == 0 and _planned_world(cfg) > 1
    if ddp_sweep:  # the processes it starts join its sweep
        os.environ[SWEEP_DIR_ENV] = str(Path(hc.sweep.dir).resolve())
    if launched_rank() != 0:  # another DDP process of rank 0's run: rank 0 holds the folder and its log
        return _run_on_another_rank(fn, cfg, run_dir, *args, **kwargs)
    earlier_failure, log = None, None  # FAILED as a re-run job found it (_failed); the log once the folder is held
    try:
        check_job_folder(run_dir, hc.job.name)  # before the lock, the log or FAILED is written into it
        with FolderLock(run_dir, "run" if hc.job.name == "train" else "evaluation"), \
                console_copied_to(run_dir / f"{hc.job.name}.log"), \
                sweep_record_kept(Path(hc.sweep.dir) / SWEEP_RECORD if ddp_sweep else None):
            log = run_dir / f"{hc.job.name}.log"
            failed = run_dir / FAILED  # a job re-run in the same folder starts clean
            earlier_failure = failed.read_text(errors="replace") if failed.is_file() else None
            failed.unlink(missing_ok=True)
            overrides = " ".join(hc.overrides.task) or "none (the defaults)"
            print(f"[{hc.job.name}] overrides: {overrides}", flush=True)
            return fn(cfg, run_dir, *args, **kwargs)
    except FolderBusyError as e:  # the folder is another process's or job's: write nothing into it
        print(f"error: {e}", file=sys.stderr, flush=True)
        if multirun:
            return None
        sys.exit(e.exit_code)
    except OSError as e:  # a full disk or a read-only folder met outside the checkpoint writer; a path too long
        if e.errno not in STORAGE_ERRORS | {errno.ENAMETOOLONG}:
            raise
        own = [run_dir, Path(hc.sweep.dir)] if multirun else [run_dir]
        return _failed(run_dir, multirun, ByolError(storage_error(e, own)), log=log)
    except ByolError as e:
        if isinstance(e, Interrupted):  # not a failure: the run continues when resumed
            _say(str(e), log)
            hand_on_signal(e.exit_code - 128)
            sys.exit(e.exit_code)
        return _failed(run_dir, multirun, e, earlier_failure, log)
    except SystemExit as e:  # Lightning ends a fit stopped by a second Ctrl+C with status 1: the job's is 130
        if _stopped_at_once() and e.code not in (0, None):
            sys.exit(128 + signal.SIGINT)
        raise
    except KeyboardInterrupt:  # Ctrl+C outside training (which stops cleanly itself): no traceback
        if not _stopped_at_once():  # a second Ctrl+C in training said what is kept
            _say(f"[{hc.job.name}] interrupted (Ctrl+C); what was finished before is kept", log)
        sys.exit(128 + signal.SIGINT)
    except Exception as e:
        if not multirun:
            raise
        traceback.print_exc()
        (run_dir / FAILED).write_text(f"{type(e).__name__}: {e}\n", "utf-8", ESCAPED_NAMES)
        return None


def storage_error(e: OSError, own: list[Path]) -> str:
    """One line for a storage error: on a path in the job's own folders (or none named), the output folder's
    advice; on any other path (an input: pretrained=, data.root...), that it lies outside them and what to check."""
    if e.errno == errno.ENAMETOOLONG:  # a path handed in (data.root, pretrained=, a run's config)
        return name_too_long(e)
    path = os.fsdecode(e.filename) if isinstance(e.filename, str | bytes) else None
    if not path or any(_within(Path(path), folder) for folder in own):
        where = f" ('{path}')" if path else ""
        return (f"{e.strerror or e}{where}; free space or choose a writable output folder (hydra.run.dir=DIR). "
                f"Checkpoints already written are intact")
    fix = ("this job cannot read or access that path; check its permissions and those of the folders above it"
           if e.errno in (errno.EACCES, errno.EPERM) else "check that path's disk (full, read-only or failing)")
    return f"{e.strerror or e} ('{path}'), outside this job's output folder: {fix}"


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder``, as written or with links resolved (a run folder may be a link)."""
    try:
        resolved = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        resolved = False
    return resolved or path.absolute().is_relative_to(folder.absolute())


def _run_on_another_rank(fn, cfg, run_dir: Path, *args, **kwargs):
    """``fn`` in a DDP process of rank 0's job: its errors are one line, and rank 0 says the rest."""
    try:
        return fn(cfg, run_dir, *args, **kwargs)
    except Interrupted as e:  # rank 0 says where the run was saved and how to resume it
        sys.exit(e.exit_code)
    except ByolError as e:
        print(f"error (rank {launched_rank()}): {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def _planned_world(cfg) -> int:
    from byol.jobs.build import planned_world

    return planned_world(cfg.get("trainer") or {})


@contextmanager
def sweep_record_kept(record: Path | None):
    """Keep rank 0's ``multirun.yaml`` through a job: the processes Lightning starts re-run the sweep,
    and their sweeper saves its own copy (with Lightning's extra ``hydra.*`` overrides) over it."""
    kept = record.read_bytes() if record is not None and record.is_file() else None
    try:
        yield
    finally:
        if kept is not None and (not record.is_file() or record.read_bytes() != kept):
            record.write_bytes(kept)


def _stopped_at_once() -> bool:
    """Whether a second Ctrl+C ended training (read without importing Lightning, which a Ctrl+C during the
    imports would wait for)."""
    callbacks = sys.modules.get("byol.lightning.callbacks")
    return callbacks is not None and callbacks.STOPPED_AT_ONCE.is_set()


def _say(line: str, log: Path | None) -> None:
    """A job's last line (stopped, failed) on stderr and at the end of its log: it is printed after the log's
    copy of the console has closed, and a run read from its log alone looked as if it were still running."""
    print(line, file=sys.stderr, flush=True)
    if log is not None and log.is_file() and not log.is_symlink():
        try:
            with open(log, "a", encoding="utf-8", errors=ESCAPED_NAMES) as f:
                f.write(neutralized(line) + "\n")
        except OSError:
            pass  # the folder cannot be written: the console has the line


def _failed(run_dir: Path, multirun: bool, e: ByolError, earlier_failure: str | None = None,
            log: Path | None = None):
    """Print the one-line error (and add it to the job's log) and record it in the job's FAILED file (a sweep
    goes on with its other jobs). A job that stopped before training, in a folder holding a run, leaves the
    run's state as it was: no FAILED for a finished run, the earlier one for a failed run; a single job's folder
    that this command made is removed (a sweep's job keeps its FAILED: the sweep's summary reads it)."""
    refused = getattr(e, "nothing_trained", False)
    if refused and not multirun and log is not None and remove_refused_folder(run_dir, log.stem):
        print(f"error: {e}", file=sys.stderr, flush=True)  # a folder this command made: gone, as if never made
        sys.exit(e.exit_code)
    _say(f"error: {e}", log)
    if refused and is_run_dir(run_dir):
        if earlier_failure is not None:
            (run_dir / FAILED).write_text(earlier_failure, "utf-8", ESCAPED_NAMES)
    else:
        try:
            (run_dir / FAILED).write_text(f"{e}\n", "utf-8", ESCAPED_NAMES)
        except OSError:
            pass  # the folder itself cannot be written: the line above is all there is
    if multirun:
        return None
    sys.exit(e.exit_code)
