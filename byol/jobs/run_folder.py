"""Who owns a run folder: the run id, and the lock held by the one process writing into it.

Each pretraining run has an id, written in its ``config.yaml`` and every checkpoint. A checkpoint
of another run is never continued into a folder that holds a run (its config, metrics and
weights would be overwritten); a new or empty folder is fine. A lock file held for the whole
job stops a second process from writing into the same run or evaluation folder; the kernel
releases it when the holder dies, so a killed run never blocks the next one.

It is also the one home of the run-folder layout (the file names below) and of the lookups
built on it: which folders are runs, which file holds a run's weights, which jobs of a sweep
failed, which kind of job a folder holds.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path

from byol.core.errors import ByolError, CheckpointError, ConfigError
from byol.jobs.console import script_command
from byol.jobs.handed_yaml import refuse_unsafe_yaml

LOCK_FILE = ".lock"
RUN_ID_KEY = "run_id"
# the layout of a run folder
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
ENCODER_FILE = "encoder.pt"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_GLOB = "*.ckpt"
FINAL_CHECKPOINT = "final.ckpt"  # written by earlier versions at the end of a run (now last.ckpt is); still read
LAST_CHECKPOINT = "last.ckpt"  # the run's one full training state, the final one once it has finished
FAILED = "FAILED"  # a sweep job's failure, its first line the reason
STOPPED = "STOPPED"  # an evaluation of a sweep stopped by a signal: which runs had no result yet
HYDRA_DIR = ".hydra"
SWEEP_RECORD = "multirun.yaml"  # Hydra's record of a sweep (-m), in the sweep's folder only
# what pretrained= may name besides a path
RANDOM = "random"
LATEST = "latest"
LATEST_SWEEP = "latest_sweep"


class FolderBusyError(ByolError):
    """Another live process holds the folder's lock."""


class FolderTakenError(FolderBusyError):
    """The folder holds the other kind of job's output (a pretraining run's, an evaluation's)."""


def check_job_folder(folder: Path, job: str) -> None:
    """Refuse to run ``job`` (train or evaluate) in a folder that holds the other kind of job's output:
    evaluating into a pretraining run's folder rewrote its config.yaml, after which the run could not
    be evaluated on its own data, and added to its metrics.csv; pretraining into an evaluation's folder
    replaced that evaluation's metrics.csv. (Log files tell nothing: Hydra creates one before any job.)"""
    folder = Path(folder)
    links = links_in(folder)
    if links:
        shown = ", ".join(f"'{link}' -> '{os.readlink(link)}'" for link in links[:3])
        raise FolderTakenError(
            f"'{folder}' holds symbolic links where jobs write ({shown}{', ...' if len(links) > 3 else ''}); a job "
            f"writes only into its own folder, never through a link to another place: replace each link by the "
            f"file or folder itself, or write into another folder (hydra.run.dir=NEW). To keep a run on another "
            f"disk, link the whole run folder instead")
    kind = job_kind(folder)
    if (folder / SWEEP_RECORD).is_file():
        held = (f"a sweep (multirun.yaml, its jobs' folders): a single {'run' if job == 'train' else 'evaluation'} "
                f"there would overwrite the sweep's record and read as one of its jobs")
    elif job == "evaluate" and kind == "train":
        held = "a pretraining run, whose config.yaml and metrics.csv the evaluation would overwrite"
    elif job == "train" and kind == "evaluate":
        held = "an evaluation, whose config.yaml and metrics.csv the run would overwrite"
    else:
        return
    hydras_log = folder / f"{job}.log"  # created empty by Hydra before the job started: leave nothing behind
    if hydras_log.is_file() and not hydras_log.stat().st_size:
        hydras_log.unlink()
    raise FolderTakenError(f"'{folder}' holds {held}; write into another folder (hydra.run.dir=NEW, or leave "
                           f"hydra.run.dir out for a new one under outputs/)")


def job_kind(folder: Path) -> str | None:
    """Which kind of job's output ``folder`` holds: "train" (a pretraining run: weights, or a config with a
    loss), "evaluate" (results.json, or a config with an eval), None (neither, or nothing yet). The files are
    looked at first: parsing each job's config took 14 ms (a sweep of 300 jobs: 4.3 s, 2-core AMD EPYC)."""
    folder = Path(folder)
    if is_run_dir(folder):
        return "train"
    if (folder / "results.json").is_file():
        return "evaluate"
    try:
        raw = raw_run_config(folder)
    except ConfigError:  # an unreadable config.yaml: the job itself says so
        raw = None
    keys = set(raw) if isinstance(raw, dict) else set()  # a file of any shape: it is not ours to trust
    return "train" if "loss" in keys else "evaluate" if "eval" in keys else None


def evaluation_output(path: Path) -> str | None:
    """What an evaluation left at ``path`` (its folder, a file in it, or a sweep of them), in words; None for
    anything else. pretrained= or resume= of one said only that it held no weights, and of an evaluation sweep
    listed each job as a training run without weights."""
    path = Path(path)
    if job_kind(path if path.is_dir() else path.parent) == "evaluate":
        return "an evaluation's output (results.json, no weights)"
    if path.is_dir() and not find_runs(path) and any(job_kind(j) == "evaluate" for j in sweep_jobs(path)):
        return "an evaluation sweep (its jobs hold results.json, no weights)"
    return None


def check_sweep_folder(sweep: Path, job: str) -> None:
    """Refuse a sweep (``-m``) of ``job`` into a folder that holds a single job's output or another kind of
    sweep: Hydra would replace that sweep's multirun.yaml with this one's, and its folder would mix runs and
    evaluations (a report of it, ``pretrained=`` of it, would read both). A sweep of the same kind is
    fine: that is how a sweep is resumed or re-evaluated."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        return
    what = {"train": "pretraining", "evaluate": "evaluation"}
    a_sweep = {"train": "a pretraining sweep", "evaluate": "an evaluation sweep"}
    own = job_kind(sweep)
    if own is not None:
        held = f"a single {what[own]} job's output (its config.yaml, metrics, weights or results)"
    else:
        other = next(((j, kind) for j in sweep_jobs(sweep) if (kind := job_kind(j)) not in (None, job)), None)
        if other is None:
            return
        held = (f"{a_sweep[other[1]]} (its job '{other[0].name}'); {a_sweep[job]} there would replace its "
                f"multirun.yaml and mix its folders with these")
    raise FolderTakenError(f"'{sweep}' holds {held}; sweep into another folder (hydra.sweep.dir=NEW, or leave "
                           f"hydra.sweep.dir out for a new one under outputs/multirun/)")


def links_in(folder: Path) -> list[Path]:
    """Symbolic links where jobs (and Hydra) write: any among the folder's entries and those of its
    ``.hydra/`` and ``checkpoints/``, and deeper (a logger's folder, the folders of a sweep's evaluated
    models) any that leads out of the folder. Writing through one would change a file elsewhere (another
    run's checkpoint, any file the link names), outside the folder's lock. The folder itself may be a link;
    a link that stays inside it (wandb's ``latest-run``) is harmless."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    top = {folder, folder / HYDRA_DIR, folder / CHECKPOINTS_DIR}
    inside, found = folder.resolve(), []
    for parent, dirs, files in os.walk(folder):  # never into a linked folder
        for name in dirs + files:
            path = Path(parent, name)
            if path.is_symlink() and (Path(parent) in top or not _leads_into(path, inside)):
                found.append(path)
    return sorted(found)


def _leads_into(link: Path, folder: Path) -> bool:
    try:
        return link.resolve().is_relative_to(folder)
    except (OSError, RuntimeError):  # a loop of links
        return False


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class FolderLock:
    """An exclusive ``flock`` on ``folder/.lock`` (holding the holder's PID) for a ``with`` block."""

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        try:  # never through a link: truncating it would wipe the file it names
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise FolderTakenError(f"'{path}' is a symbolic link; remove it (the lock file holds only a process "
                                   f"id) or write into another folder (hydra.run.dir=NEW)") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # once more: an evaluation's look (lock_holder) holds it for microseconds
                time.sleep(0.05)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise FolderBusyError(
                f"{self.what} folder '{self.folder}' is in use by another process (PID {holder}); wait for "
                f"it to finish or stop it, or write into another folder (hydra.run.dir=NEW)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (unlinking it would race)
            self._fd = None


def lock_holder(folder: Path) -> str | None:
    """The PID written in ``folder/.lock`` while a live process holds it (a job still running), else None."""
    import fcntl

    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when closed
        return None
    except OSError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


def raw_run_config(folder: Path, fix: str = "move it away or use another folder (hydra.run.dir=NEW)") -> dict | None:
    """A run folder's ``config.yaml`` as written, unchecked and unresolved (None when absent); an
    unreadable file is a ConfigError that ends with ``fix``. Callers check it as untrusted data before using it."""
    from omegaconf import OmegaConf

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        if not (path.exists() or path.is_symlink()):
            return None
        raise ConfigError(f"'{path}' is not a readable config (not a regular file: a device, a pipe, a folder or a "
                          f"link to none); {fix}")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes, more than any run's config ({MAX_CONFIG_BYTES:,})")
        text = path.read_text()
        refuse_unsafe_yaml(text)
        return OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except Exception as e:
        detail = " ".join(str(e).split())  # YAML's errors span lines, with a caret under the place
        raise ConfigError(f"'{path}' is not a readable config ({type(e).__name__}: {detail[:300]}); {fix}") from None


MAX_CONFIG_BYTES = 1 << 20  # a run's config.yaml takes a few kB


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` already holds (part of) a pretraining run."""
    folder = Path(folder)
    return any((folder / name).exists() for name in (CONFIG_FILE, METRICS_FILE, ENCODER_FILE)) or any(
        (folder / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB))


def check_resume_target(run_dir: Path, checkpoint: Path, checkpoint_run_id: str | None,
                        folder_run_id: str | None) -> bool:
    """Refuse to continue ``checkpoint`` in ``run_dir`` when that folder holds another run.

    Returns whether the run keeps its id: True when it continues in its own folder, False when
    it starts a new folder (a branch of the checkpoint's run, with a new id).
    """
    run_dir = Path(run_dir).resolve()
    if not holds_run(run_dir):
        return False
    inside = Path(checkpoint).resolve().parent == run_dir / CHECKPOINTS_DIR
    if checkpoint_run_id and folder_run_id:
        same = checkpoint_run_id == folder_run_id
    else:  # written before run ids: only a checkpoint of the folder itself is known to belong to it
        same = inside
    if not same:
        ids = f" (run {checkpoint_run_id or 'without an id'} into run {folder_run_id or 'without an id'})"
        raise CheckpointError(
            f"refusing to continue '{checkpoint}' in '{run_dir}': that folder holds another run{ids}, whose "
            f"config, metrics and weights would be overwritten. Continue it in a new or empty folder "
            f"(hydra.run.dir=NEW) or in its own run folder")
    return True


def check_new_run_folder(run_dir: Path) -> None:
    """A new run (nothing to continue from: no ``checkpoints/last.ckpt``) in a folder that holds a run's
    weights would overwrite them (a finished run whose last.ckpt was deleted to save space, a run that
    kept only ``epochNNNN.ckpt`` files): refused, naming what is there."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT).is_file():
        return  # continued from there (a requeued or re-run job), not started anew
    kept = sorted((run_dir / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB), key=lambda p: p.name)
    weights = [p for p in (run_dir / ENCODER_FILE, *kept) if p.is_file()]
    if not weights:
        return
    names = ", ".join(p.name for p in weights[:4]) + (", ..." if len(weights) > 4 else "")
    hint = f"; or continue its newest checkpoint there: {script_command('train.py')} resume={kept[-1]}" if kept else ""
    raise CheckpointError(f"'{run_dir}' holds a run's weights ({names}) and no {CHECKPOINTS_DIR}/{LAST_CHECKPOINT} "
                          f"to continue from; a new run there would overwrite them: write into another folder "
                          f"(hydra.run.dir=NEW, or leave hydra.run.dir out){hint}")


def check_not_behind(run_dir: Path, checkpoint: Path, step: int) -> None:
    """Continuing an earlier checkpoint of a run in the run's own folder would overwrite the later state
    (its last.ckpt, encoder.pt and metrics) with another branch: refused, pointing to a new folder."""
    from byol.core.checkpoint import safe_load

    last = Path(run_dir) / CHECKPOINTS_DIR / LAST_CHECKPOINT
    if not last.is_file() or Path(checkpoint).resolve() == last.resolve():
        return
    try:
        later = safe_load(last, mmap=True).get("global_step")
    except (ByolError, AttributeError):
        return  # an unreadable last.ckpt holds nothing to protect; resuming from the other file replaces it
    if isinstance(later, int) and later > step:
        raise CheckpointError(f"'{checkpoint}' (step {step}) is behind its run's {last} (step {later}); continued in "
                              f"'{run_dir}' it would overwrite that later state and the run's encoder.pt and "
                              f"metrics: continue it in a new folder (add hydra.run.dir=NEW)")


# --------------------------------------------------------------------------- finding runs


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a pretraining run's weights (an export or a checkpoint)."""
    return (path / ENCODER_FILE).is_file() or any((path / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB))


def weights_file(run_dir: Path) -> Path:
    """encoder.pt, else checkpoints/final.ckpt (run folders of earlier versions), else last.ckpt, else the
    newest checkpoint."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    for candidate in (run_dir / ENCODER_FILE, checkpoints / FINAL_CHECKPOINT, checkpoints / LAST_CHECKPOINT):
        if candidate.is_file():
            return candidate
    found = sorted(checkpoints.glob(CHECKPOINT_GLOB), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointError(f"'{run_dir}' holds no {ENCODER_FILE} and no {CHECKPOINTS_DIR}/{CHECKPOINT_GLOB}")
    return found[-1]


def run_folder_of(weights: Path) -> Path:
    """The run folder of a weights file: a checkpoint lives one level further down."""
    return weights.parent.parent if weights.parent.name == CHECKPOINTS_DIR else weights.parent


def find_runs(folder: Path) -> list[Path]:
    """Pretraining run folders at or below ``folder``, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = {p.parent for p in folder.rglob(ENCODER_FILE)}
    candidates |= {p.parent.parent for p in folder.rglob(f"{CHECKPOINTS_DIR}/{CHECKPOINT_GLOB}")}
    return sorted(p for p in candidates if is_run_dir(p))


def sweep_jobs(sweep: Path) -> list[Path]:
    """The job folders of a sweep: its subfolders with a ``.hydra/`` folder or a ``config.yaml``."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        return []
    return sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and ((d / HYDRA_DIR).is_dir() or (d / CONFIG_FILE).is_file()))


def failed_jobs(sweep: Path) -> list[tuple[Path, str]]:
    """``(job folder, reason)`` for each job of a sweep with no model to evaluate (:func:`why_no_model`)."""
    return [(job, why) for job in sweep_jobs(sweep) if (why := why_no_model(job))]


def why_no_model(job: Path) -> str | None:
    """Why a training job has no model to evaluate: a ``FAILED`` file (its first line), still training, or no
    weights at all; None when it has one."""
    if (job / FAILED).is_file():
        lines = (job / FAILED).read_text(errors="replace").strip().splitlines()
        return f"training failed: {lines[0].strip() if lines else 'no reason recorded'}"
    if find_runs(job):
        return None
    holder = lock_holder(job)
    return (f"still training (PID {holder}), no checkpoint yet" if holder else
            f"no weights: no {ENCODER_FILE} and no {CHECKPOINTS_DIR}/{CHECKPOINT_GLOB}")


def sweep_runs(sweep: Path) -> list[Path]:
    """The run folders of a sweep that can be evaluated: :func:`find_runs` minus the jobs that failed."""
    failed = [job for job, _ in failed_jobs(sweep)]
    return [r for r in find_runs(sweep) if not any(r == job or r.is_relative_to(job) for job in failed)]


def run_label(weights: Path, sweep: Path | None = None) -> str:
    """A run's name in a sweep (its path below the sweep folder), else its folder's name."""
    run = run_folder_of(weights)
    if sweep is not None and run != sweep and run.is_relative_to(sweep):
        return str(run.relative_to(sweep))
    return run.name if is_run_dir(run) else weights.stem
