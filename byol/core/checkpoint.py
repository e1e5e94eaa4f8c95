"""Checkpoint files: atomic writes, safe reads, and the self-describing encoder export.

Every file is read with ``torch.load(weights_only=True)``: a crafted checkpoint cannot run
code while it is unpickled. Every file is written to a temporary file in the same folder,
flushed to disk, then renamed over the old one, so a crash mid-write leaves the previous
file intact.
"""

from __future__ import annotations

import errno
import glob
import os
import pickle
import re
import shutil
import socket
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from byol.core.errors import CheckpointError
from byol.core.load_guards import empty_file, refuse_inflating, starts_like_torch, torch_detail
from byol.core.state_check import kinds_problem, tensors_problem, weights_problem, whole

ENCODER_FORMAT = "byol-encoder"
ONLINE_PREFIX = "model.online_encoder."  # where BYOLModule keeps the online encoder in its state_dict
ENCODER_VERSION = 1
TEMP_SUFFIX = ".tmp"


def usual_permissions(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (private, 0600) the permissions of any other new file (umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``: readers (and a crash at any moment) see the old file or the new one, never half.

    On any error the temporary file is removed and the previous ``path`` is left untouched; an
    ``OSError`` (disk full, permissions) becomes a :class:`CheckpointError` that says so.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = new_temp_file(path)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        if isinstance(e, RuntimeError) and _is_torch_write_failure(e):
            raise _write_error(path, _disk_error(path.parent, e)) from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# torch.save reports a failed write of its zip container as a RuntimeError, not an OSError
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _is_torch_write_failure(e: RuntimeError) -> bool:
    return any(text in str(e) for text in TORCH_WRITE_FAILURES)


def _disk_error(folder: Path, e: RuntimeError) -> OSError:
    """The OSError behind torch's RuntimeError: a full disk if the folder's file system is (nearly) full."""
    try:
        full = shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, f"write failed: {str(e).splitlines()[0]}")


def _write_error(path: Path, e: OSError) -> CheckpointError:
    hint = ("the disk is full: free space or choose another output folder" if e.errno == errno.ENOSPC
            else "check the folder's permissions and free space, or choose another output folder")
    return CheckpointError(f"could not write '{path}' ({e.strerror or e}); the previous file, if any, is "
                           f"intact. {hint[0].upper()}{hint[1:]}")


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` straight into the temporary file (no second copy of the checkpoint in memory)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def new_temp_file(path: Path) -> tuple[int, str]:
    """A new, empty file beside ``path`` (descriptor, name), created exclusively under a name nobody can
    guess (a link planted under a predictable one would be written through), that says which process of
    which machine writes it: :func:`remove_dead_writers_files` can then tell a killed writer's file."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{socket.gethostname()}-{os.getpid()}.",
                            suffix=TEMP_SUFFIX)


def remove_dead_writers_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files for ``path`` that a process of this machine, no longer running, left (a decode
    killed by SIGTERM or SIGKILL leaves one the size of the dataset), removed. Files of live processes
    (another job decoding the same folder) and of other machines (a shared disk) are left alone."""
    path, removed = Path(path), []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        writer = tmp.name[len(path.name) + 2:-len(TEMP_SUFFIX)].rpartition(".")[0]  # "<host>-<pid>"
        host, _, pid = writer.rpartition("-")
        if host == socket.gethostname() and pid.isdecimal() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed process left in ``folder`` (call before writers start)."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*{TEMP_SUFFIX}")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def safe_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False, job: str = "train") -> Any:
    """``torch.load`` restricted to tensors and plain containers; clear errors otherwise.

    ``mmap=True`` maps the file instead of reading it (cheap when only metadata is needed). ``job`` (train or
    evaluate) is the job that reads it: a corrupt file's error says how that job takes another checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint '{path}' {what}")
    refuse_inflating(path)
    try:
        with warnings.catch_warnings():  # a plain pickle of another protocol: torch's note to file an issue
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated or damaged files fail in many ways
        # not only tensors and containers: a zip or pickle that names a global (protocol 0 begins with its name)
        if isinstance(e, pickle.UnpicklingError) and (starts_like_torch(path) or BLOCKED_NAME.search(str(e))):
            raise CheckpointError(
                f"refusing to load '{path}': {blocked(e)}, so unpickling it could run code (or the file is "
                f"damaged). Nothing was executed. Only load checkpoints written by this project, or re-save the "
                f"weights as a plain state_dict") from None
        if mmap and isinstance(e, RuntimeError):  # old (non-zip) serialisation cannot be mapped: read it
            return safe_load(path, map_location, job=job)
        if path.suffix not in (".ckpt", ".pt", ".pth") and not starts_like_torch(path):  # a config.yaml...
            beside = sorted(q for glob in ("*.pt", "*.ckpt", "checkpoints/*.ckpt") for q in path.parent.glob(glob))
            listed = f"; PyTorch files beside it: {', '.join(map(str, beside))}" if beside else ""
            raise CheckpointError(f"'{path}' is not a PyTorch file (a checkpoint or an encoder export){listed}") \
                from None
        if empty_file(path):
            raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes), e.g. a copy or download that never "
                                  f"finished.{alternatives(path, job)}") from None
        detail = "it begins as neither a zip archive nor a pickle" if isinstance(e, pickle.UnpicklingError) else \
            torch_detail(e)
        raise CheckpointError(f"checkpoint '{path}' is corrupt, truncated or not a PyTorch file "
                              f"({type(e).__name__}: {detail}).{alternatives(path, job)}") from None


# the global torch's weights_only unpickler names when it refuses a file (torch 2.14: "Trying to load
# unsupported GLOBAL posix.system whose module posix is blocked"; earlier, and for modules it does not block:
# "Unsupported global: GLOBAL datetime.date was not an allowed global")
BLOCKED_NAME = re.compile(r"\bGLOBAL ([\w.]{1,120})")


def blocked(error: pickle.UnpicklingError) -> str:
    """What a refused file holds, in our words: the blocked name torch gives, never torch's own text (its
    banner advises loading the file with weights_only=False, which would run the code)."""
    found = BLOCKED_NAME.search(str(error))
    if found:
        return f"it refers to {found.group(1)} (a Python function or class), not only to tensors and plain containers"
    operand = re.search(r"Unsupported operand (\d{1,3})", str(error))
    if operand:  # e.g. 149, FRAME: protocol 4 and above, which torch.save never writes
        return (f"it is another program's pickle: it uses an instruction (opcode {operand.group(1)}) that torch.save "
                f"never writes and the safe reader does not take")
    return "it holds more than tensors and plain containers (torch's refusal does not name what)"


# how each job takes another checkpoint in place of one it cannot read
TAKE_INSTEAD = {"train": "e.g. python train.py resume={}", "evaluate": "evaluate one instead: pretrained={}"}


def alternatives(path: Path, job: str = "train") -> str:
    """The other checkpoints that could stand in for ``path`` (final, last, then the latest epochs first) and
    how ``job`` (train or evaluate) takes one, as a sentence: those beside it, and for a file outside a
    ``checkpoints/`` folder (a run's encoder.pt) also those in the ``checkpoints/`` folder beside it."""
    rank = {"final.ckpt": 0, "last.ckpt": 1}
    folders = [path.parent] if path.parent.name == "checkpoints" else [path.parent, path.parent / "checkpoints"]
    where = "beside it" if len(folders) == 1 else "beside it or in checkpoints/ beside it"
    # whole zip archives (torch.save's format) only: one cut short by a full disk would lead to its twin
    others = sorted((p for folder in folders for p in folder.glob("*.ckpt") if p != path and zipfile.is_zipfile(p)),
                    key=lambda p: (rank.get(p.name, 2), [-ord(c) for c in p.name]))
    if not others:
        return f" No other readable checkpoint lies {where}"
    names = ", ".join(str(p) for p in others)
    return f" Other checkpoints {where}, latest first: {names}; {TAKE_INSTEAD[job].format(others[0])}"


def online_encoder_state(ckpt: dict) -> dict:
    """The online encoder's weights from a train.py Lightning checkpoint (never the EMA target)."""
    return {k[len(ONLINE_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(ONLINE_PREFIX)}


def _loop_counter(ckpt: dict, progress: str, counter: str):
    """A counter of a Lightning checkpoint's fit loop (``epoch_progress`` / ``epoch_loop.batch_progress``,
    its ``current`` ``ready`` / ``processed``...), or None."""
    value = ckpt
    for key in ("loops", "fit_loop", progress, "current", counter):
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def epochs_done(ckpt: dict) -> int:
    """Epochs a train.py Lightning checkpoint has finished: Lightning's count of processed epochs (a
    checkpoint taken at an epoch's end, or after the last one, counts it; one taken mid-epoch does not).
    Its ``epoch`` field is the 0-based epoch it was taken in, one less than that after the last epoch;
    only a file without loop counters falls back to it. -1 when neither is a whole number."""
    done = _loop_counter(ckpt, "epoch_progress", "processed")
    value = done if done is not None else ckpt.get("epoch", -1)
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def mid_epoch(ckpt: dict) -> bool:
    """Whether a train.py checkpoint was taken inside an epoch after some of its batches: the epoch started
    (``ready``) but not processed, and batches of it processed. One taken during an epoch's first batch resumes
    at the epoch's start, and one at an epoch's end has processed it."""
    started, done = _loop_counter(ckpt, "epoch_progress", "ready"), _loop_counter(ckpt, "epoch_progress", "processed")
    batches = _loop_counter(ckpt, "epoch_loop.batch_progress", "processed")
    return started is not None and done is not None and started > done and bool(batches)


def save_encoder(encoder, path: str | os.PathLike, meta: dict | None = None, taps=None) -> None:
    """Export the online encoder with the config that built it; loadable without Lightning.

    ``taps``: the taps to record (default: the encoder's own; one name may be a string), e.g. the loss's
    without those that only the training monitors read; taps never change the weights.
    """
    from byol.core.backbone import tap_list

    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    backbone = dict(encoder.config, taps=tap_list(taps)) if taps is not None else encoder.config
    atomic_torch_save({"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "backbone": backbone,
                       "state_dict": state, "meta": meta or {}}, path)


def load_encoder(path: str | os.PathLike, taps=None):
    """Rebuild an :class:`~byol.core.backbone.Encoder` from an export written by :func:`save_encoder`.

    ``taps`` overrides the exported taps (e.g. the evaluation's representation; one name may be a string);
    pooling grids stay those of the export unless the tap is new.
    """
    from byol.core.backbone import Encoder, tap_list

    blob = safe_load(path)
    if not isinstance(blob, dict) or blob.get("format") != ENCODER_FORMAT:
        raise CheckpointError(f"'{path}' is not a byol encoder export (expected format '{ENCODER_FORMAT}')")
    cfg = encoder_config(blob.get("backbone"), path)
    state = checked_state_dict(blob.get("state_dict"), path)
    if taps is not None:
        cfg["taps"] = tap_list(taps)
    return built_with_weights(lambda: Encoder(**cfg), state, path), blob.get("meta", {})


# what fixes an export that is not what this project writes
REWRITE_EXPORT = ("evaluate the run's checkpoints/last.ckpt instead, or write the export again from it (move the "
                  "file away, then python train.py resume=RUN)")


def encoder_config(raw, source, fix: str = f"For a run's encoder.pt: {REWRITE_EXPORT}") -> dict:
    """The ``backbone`` description of an export as checked plain values: ``name`` (a ResNet this project
    builds), ``stem`` (cifar or imagenet), ``width`` (a positive number; 1.0 for exports written before it
    existed), ``taps`` (module names of that network), ``grids`` ({module name: positive whole number}).
    A file is data: anything else is refused, before any of it is used (a name, a path...)."""
    from byol.core.backbone import AVGPOOL, MAX_WIDTH, RESNETS, STEMS, module_names, width_fits

    if not isinstance(raw, dict):
        raise CheckpointError(f"refusing '{source}': its backbone description is not a mapping")
    unknown = sorted(str(k) for k in raw if k not in ("name", "stem", "width", "taps", "grids"))
    taps, grids, width = raw.get("taps") or [], raw.get("grids") or {}, raw.get("width", 1.0)
    name, stem = raw.get("name"), raw.get("stem")
    names = module_names(name) if isinstance(name, str) and name in RESNETS else frozenset()
    problem = (f"unknown key(s) {', '.join(unknown)}" if unknown
               else "backbone.name and backbone.stem must be strings" if not (
                   isinstance(name, str) and isinstance(stem, str))
               else f"backbone.name {name[:40]!r} is none of the networks this project builds "
                    f"({', '.join(RESNETS)})" if name not in RESNETS
               else f"backbone.stem {stem[:40]!r} is not one of the stems ({', '.join(STEMS)})" if stem not in STEMS
               else f"backbone.width must be a positive number up to {MAX_WIDTH} that leaves the first stage a "
                    f"channel" if not (type(width) in (int, float) and width_fits(width))
               else "backbone.taps must be a list of strings" if not (
                   isinstance(taps, list) and all(isinstance(t, str) for t in taps))
               else f"backbone.taps names {next(t for t in taps if t not in names)[:40]!r}, no module of {name}"
               if any(t not in names for t in taps)
               else "backbone.grids must map module names to positive whole numbers (avgpool: 1)" if not (
                   isinstance(grids, dict) and all(isinstance(k, str) and k in names and whole(v, 1)
                                                   and (k != AVGPOOL or v == 1) for k, v in grids.items()))
               else None)
    if problem:
        raise CheckpointError(f"refusing '{source}': {problem}; a file may only hold what this project writes, "
                              f"and this one was edited or not written by it. {fix}")
    return {"name": name, "stem": stem, "width": float(width), "taps": list(taps), "grids": dict(grids)}


def checked_state_dict(state, source, fix: str = f"For a run's encoder.pt: {REWRITE_EXPORT}") -> dict:
    """``state`` if it is a state_dict (names mapped to tensors of finite numbers); else a one-line error naming
    ``source``."""
    problem = tensors_problem(state, "its state_dict")
    if problem:
        raise CheckpointError(f"refusing '{source}': {problem}; the file is damaged or was not written by this "
                              f"project. {fix}")
    return state


def load_weights(module: torch.nn.Module, state: dict, source, job: str = "evaluate") -> None:
    """``load_state_dict`` with an error that says what does not match, instead of a 60-line dump (and a
    state that is not names mapped to tensors refused, instead of a traceback). ``job``: see :func:`safe_load`."""
    check_weights(module, state, source, job)
    _load_checked(module, state)


def _load_checked(module: torch.nn.Module, state: dict) -> None:
    module.load_state_dict({k: state[k] for k in module.state_dict()}, strict=True)


def built_with_weights(build, state, source) -> torch.nn.Module:
    """``build()`` holding ``state``. The weights are compared with a meta-device build first, so a file whose
    description names a huge network is refused before memory is spent on it."""
    with torch.device("meta"):
        check_weights(build(), state, source)  # names, shapes, kinds of number and the file's values: all of it
    module = build()
    _load_checked(module, state)  # the same architecture as checked: not scanned again
    return module


def check_weights(module: torch.nn.Module, state, source, job: str = "evaluate") -> None:
    """What :func:`load_weights` checks, alone (``module`` may live on the meta device): names, shapes, kinds
    of number (load_state_dict would cast integer or complex weights silently) and finite values (a diverged
    run's NaN weights score chance accuracy with no error)."""
    fix = weights_fix(source, job)
    state = checked_state_dict(state, source, fix)
    own = module.state_dict()
    problem = weights_problem(state, own, "the checkpoint", extra_ok=True, kinds=False)
    if problem:
        raise CheckpointError(f"'{source}' holds weights of another architecture: {problem}. "
                              f"Evaluate it with the backbone it was trained with (its run folder's config)")
    problem = kinds_problem(state, own, "the file")
    if problem:
        raise CheckpointError(f"refusing '{source}': its state_dict holds {problem}; the file is damaged or was "
                              f"not written by this project. {fix}")


def weights_fix(source, job: str = "evaluate") -> str:
    """How to get good weights instead of those of ``source``: another checkpoint of the run (named, with how
    ``job`` takes it) for a .ckpt; the run's checkpoint or a new export for an encoder.pt."""
    path = Path(str(source))
    if path.suffix == ".ckpt":
        return f"Use another checkpoint of the run.{alternatives(path, job)}"
    return f"For a run's encoder.pt: {REWRITE_EXPORT}"
