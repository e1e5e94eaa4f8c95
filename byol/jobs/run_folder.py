"""Who owns a run folder: the run id, and the lock held by the one process writing into it.

Each pretraining run has an id, written in its ``config.yaml`` and every checkpoint. A checkpoint
of another run is never continued into a folder that holds a run (its config, metrics and
weights would be overwritten); a new or empty folder is fine. A lock file held for the whole
job stops a second process from writing into the same run or evaluation folder; the kernel
releases it when the holder dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from byol.core.errors import ByolError, CheckpointError

LOCK_FILE = ".lock"
RUN_ID_KEY = "run_id"


class FolderBusyError(ByolError):
    """Another live process holds the folder's lock."""


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
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


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` already holds (part of) a pretraining run."""
    folder = Path(folder)
    return any((folder / name).exists() for name in ("config.yaml", "metrics.csv", "encoder.pt")) or any(
        (folder / "checkpoints").glob("*.ckpt"))


def check_resume_target(run_dir: Path, checkpoint: Path, checkpoint_run_id: str | None,
                        folder_run_id: str | None) -> bool:
    """Refuse to continue ``checkpoint`` in ``run_dir`` when that folder holds another run.

    Returns whether the run keeps its id: True when it continues in its own folder, False when
    it starts a new folder (a branch of the checkpoint's run, with a new id).
    """
    run_dir = Path(run_dir).resolve()
    if not holds_run(run_dir):
        return False
    inside = Path(checkpoint).resolve().parent == run_dir / "checkpoints"
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
