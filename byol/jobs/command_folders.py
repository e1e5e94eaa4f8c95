"""Which folders a command line names (the run's, a sweep's, what ``resume=`` continues) and what they hold,
checked before Hydra writes its record and log into them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from byol.core.errors import ByolError

NO_RESUME = (None, "", "null", "None")  # resume= values that continue nothing
HYDRA_RECORD = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes into <run>/.hydra/
_kept_record: dict[Path, bytes] = {}
_new_folders: set[Path] = set()  # the time-stamped run folders this command made (byol.jobs.cli.new_folder)


def keep_hydra_record(run_dir: Path | None) -> None:
    """The ``.hydra/`` record of the run in ``run_dir``, kept in memory before Hydra rewrites it for this
    command: a job that then refuses to start puts it back (:func:`restore_hydra_record`), so that the run's
    record keeps describing the command that trained it, not one that never ran."""
    _kept_record.clear()
    for path in [run_dir / ".hydra" / name for name in HYDRA_RECORD] if run_dir is not None else []:
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= 1 << 20:
                _kept_record[path] = path.read_bytes()
        except OSError:
            pass


def restore_hydra_record() -> None:
    """Put back the record :func:`keep_hydra_record` kept (nothing when it kept none)."""
    from byol.core.checkpoint import atomic_write_bytes
    from byol.core.errors import CheckpointError

    for path, data in _kept_record.items():
        try:
            atomic_write_bytes(data, path)
        except (OSError, CheckpointError):
            pass  # the folder cannot be written: the refusal's own line is what matters


def mark_new_folder(folder: Path | str) -> None:
    """``folder`` was made by this command: a single job refused in it leaves nothing behind there."""
    _new_folders.add(Path(folder).absolute())


@contextmanager
def before_training():
    """Tag a :class:`ByolError` raised in the block as ``nothing_trained``: the job stopped before any work (a
    refused setting or resume, a missing logger package, bad data), so a run already in the folder is as it was
    and gets no ``FAILED`` file (a sweep's evaluation would then list a finished run as failed), and a folder made
    for this command is removed (:func:`remove_refused_folder`)."""
    try:
        yield
    except ByolError as e:
        e.nothing_trained = True
        restore_hydra_record()  # Hydra rewrote the run's .hydra/ for this command, which did not run
        raise


def remove_refused_folder(run_dir: Path, job: str) -> bool:
    """Remove ``run_dir`` when this command made it and holds only what Hydra and a job refused before any work
    wrote (its ``.hydra/`` record, log, lock, ``FAILED``, ``config.yaml``): an outputs/<kind>/<time>/ folder of a
    command that did nothing listed it among the runs. Whether it went; anything else in it keeps it whole."""
    from byol.jobs.run_folder import CONFIG_FILE, FAILED, LOCK_FILE

    if Path(run_dir).absolute() not in _new_folders or not run_dir.is_dir() or run_dir.is_symlink():
        return False
    record, left = run_dir / ".hydra", {".hydra", LOCK_FILE, FAILED, f"{job}.log", CONFIG_FILE}
    try:
        if not {p.name for p in run_dir.iterdir()} <= left or (record.is_dir() and (
                record.is_symlink() or not {p.name for p in record.iterdir()} <= set(HYDRA_RECORD))):
            return False
        for path in [*(record / name for name in HYDRA_RECORD), *(run_dir / name for name in left - {".hydra"})]:
            if path.is_file() or path.is_symlink():
                path.unlink()
        if record.is_dir():
            record.rmdir()
        os.rmdir(run_dir)
    except OSError:
        return False
    return True


def is_sweep(argv: Sequence[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def last_value(argv: Sequence[str], keys: Sequence[str]) -> str | None:
    """The last plain value the command line gives one of ``keys`` (None: none, or an interpolation)."""
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in keys]
    return values[-1].strip("'\"") if values and "${" not in values[-1] else None


def given_run_dir(argv: Sequence[str], config_name: str = "evaluate") -> Path | None:
    """The folder a single run writes into, when the command line says: ``hydra.run.dir=DIR``, else for
    train.py the folder of ``resume=`` (None for a sweep, an interpolation or a new timestamped folder)."""
    if is_sweep(argv):
        return None
    given = last_value(argv, ("hydra.run.dir", "++hydra.run.dir"))
    if given is not None:
        return Path(given)
    resume = last_value(argv, ("resume", "++resume")) if config_name == "train" else None
    if resume in NO_RESUME:
        return None
    from byol.jobs.cli import run_dir_of

    folder = run_dir_of(resume, "")
    return Path(folder) if folder else None


def given_sweep_folders(argv: Sequence[str]) -> list[Path]:
    """The sweep folder ``hydra.sweep.dir=DIR`` names for a sweep, and the job folders already in it."""
    if not is_sweep(argv):
        return []
    given = last_value(argv, ("hydra.sweep.dir", "++hydra.sweep.dir"))
    if given is None or not Path(given).is_dir():
        return []
    return [Path(given), *sorted(p for p in Path(given).iterdir() if p.is_dir() and not p.is_symlink())]


def start_problem(resume: str | None, run_dir: Path | None) -> str | None:
    """train.py's start, checked before Hydra writes its record and log into the folder: ``resume=`` names
    something to continue, an earlier checkpoint is not continued over its run's later state, and a new run
    does not start over a run's weights (the job checks all of it again; this only comes first)."""
    from byol.core.errors import ByolError
    from byol.jobs.run_folder import CHECKPOINTS_DIR, check_new_run_folder, check_not_behind

    try:
        if resume in NO_RESUME:
            if run_dir is not None:
                check_new_run_folder(run_dir)
            return None
        from byol.core.checkpoint import safe_load  # torch and torchvision: only to check a resume=
        from byol.jobs.resume import find_resume

        checkpoint = find_resume(resume, Path("."))
        if run_dir is not None and checkpoint.resolve().parent == (run_dir / CHECKPOINTS_DIR).resolve():
            step = safe_load(checkpoint, mmap=True).get("global_step")
            if isinstance(step, int):
                check_not_behind(run_dir, checkpoint, step)
    except ByolError as e:
        return f"error: {e}"
    except (AttributeError, OSError):  # a file of another kind: the job says what is wrong with it
        return None
    return None


def other_sweeps_evaluation(argv: Sequence[str], folder: Path) -> str | None:
    """The error line for an evaluation sweep into ``folder`` when it holds the evaluation of another training
    sweep than the ``pretrained=`` one (before Hydra rewrites the folder's records)."""
    from byol.jobs.evaluation_checks import refuse_another_sweeps_evaluation
    from byol.jobs.run_folder import SWEEP_RECORD, sweep_jobs

    pretrained = last_value(argv, ("pretrained", "++pretrained"))
    if not pretrained or not (Path(pretrained).expanduser() / SWEEP_RECORD).is_file():
        return None
    try:
        for job in sweep_jobs(folder):
            refuse_another_sweeps_evaluation(job, Path(pretrained).expanduser())
    except ByolError as e:
        return f"error: {e}"
    return None
