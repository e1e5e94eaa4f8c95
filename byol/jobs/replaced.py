"""An evaluation run again into its folder: the earlier one kept whole, under names the report does not read.

While the new evaluation runs, a small record (``.replacing.json``) says which files were kept. An evaluation
stopped before its result (a stop signal, Ctrl+C, or a kill that left the record behind) is undone: the kept
files go back to their names and the stopped one's partial outputs are removed, so the folder again holds one
evaluation whose config.yaml and metrics.csv made its results.json, and the next run keeps it once, not twice."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from byol.core.checkpoint import atomic_write_bytes
from byol.jobs.run_folder import CONFIG_FILE, METRICS_FILE


def keep_earlier_evaluation(folder: Path, results_file: str = "results.json") -> list[str]:
    """When ``folder`` holds a finished evaluation (its ``results_file``) about to be evaluated again, keep
    every file of it under ``<stem>.replaced-<its time><suffix>``, which the report does not read: the
    results (a copy whose file names point at the kept files), metrics.csv, config.yaml, embeddings and maps.
    The earlier ``results_file`` itself stays until the new one replaces it in one atomic write, so an
    evaluation stopped half-way leaves the earlier result readable. Returns the kept names."""
    undo_unfinished_evaluation(folder, results_file)  # one killed before its result: its files are not kept
    results = Path(folder) / results_file
    if not results.is_file() or results.is_symlink():  # a link's target is not this folder's to copy
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(results.stat().st_mtime))
    renamed = {}
    for path in _outputs(folder, results_file):  # moved away: the new evaluation starts without them
        target = _free_name(path, stamp)
        path.replace(target)
        renamed[path.name] = target.name
    earlier = results.read_bytes()
    kept = _free_name(results, stamp)
    atomic_write_bytes(_kept_copy(earlier, renamed), kept)
    record = {"results": kept.name, "moved": renamed, "sha256": hashlib.sha256(earlier).hexdigest()}
    atomic_write_bytes((json.dumps(record, indent=2) + "\n").encode(), Path(folder) / REPLACING)
    return [kept.name, *renamed.values()]


def evaluation_replaced(folder: Path) -> None:
    """The new evaluation's result is written: the files kept for the earlier one stay kept for good."""
    (Path(folder) / REPLACING).unlink(missing_ok=True)


def undo_unfinished_evaluation(folder: Path, results_file: str = "results.json") -> list[str]:
    """An evaluation that :func:`keep_earlier_evaluation` made room for and that stopped before writing its
    result: its partial outputs are removed and the earlier evaluation's files take their names again (its
    results.json never left). Nothing when no such evaluation is recorded, or the record is not this program's.
    Returns the names put back."""
    folder = Path(folder)
    record = _replacing_record(folder, results_file)
    if record is None:
        return []
    results = folder / results_file
    earlier = results.read_bytes() if results.is_file() and not results.is_symlink() else None
    if earlier is None or hashlib.sha256(earlier).hexdigest() != record.get("sha256"):
        evaluation_replaced(folder)  # its result was written (or removed): the kept files stay kept, as they are
        return []
    moved, copy = record["moved"], folder / record["results"]
    if not copy.is_file() or copy.is_symlink() or copy.read_bytes() != _kept_copy(earlier, moved):
        return []  # not the record of the kept results beside it: nothing is moved or removed
    for path in _outputs(folder, results_file):  # the stopped evaluation's: no result was written from them
        if path.name not in moved:  # the others are replaced by their kept file below (one already put back by
            path.unlink()           # an undo stopped half-way stays: it is the earlier evaluation's)
    restored = []
    for name, kept in moved.items():
        target = folder / name
        if (folder / kept).is_file() and not (folder / kept).is_symlink() and \
                (target.is_symlink() or not target.is_dir()):
            (folder / kept).replace(target)
            restored.append(name)
    copy.unlink()  # a copy of the results.json still in place
    evaluation_replaced(folder)
    print(f"[eval] note: {folder}: an evaluation stopped there before writing its result: its partial outputs "
          f"are removed and the earlier evaluation's files are back in place "
          f"({', '.join([results_file, *restored])})", flush=True)
    return restored


def _replacing_record(folder: Path, results_file: str = "results.json") -> dict | None:
    """The record of kept files in ``folder``, when it is one this program wrote: the kept results under
    ``results_file``'s kept name, and each moved file an evaluation output kept under its own kept name
    (:func:`_free_name`), all in ``folder``. A record that names anything else moves and removes nothing."""
    path = folder / REPLACING
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 16:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return None
    moved = record.get("moved") if isinstance(record, dict) else None
    if not isinstance(moved, dict) or not _kept_name(record.get("results"), results_file):
        return None
    if not all(_is_output(name, results_file) and _kept_name(kept, name) for name, kept in moved.items()):
        return None
    return record


def _is_output(name, results_file: str) -> bool:
    """``name`` is that of an evaluation output that :func:`keep_earlier_evaluation` moves."""
    return isinstance(name, str) and Path(name).name == name and "\0" not in name and name != results_file \
        and ".replaced-" not in name and (name in EVALUATION_OUTPUTS or name.startswith(MAP_PREFIX))


def _kept_name(kept, name: str) -> bool:
    """``kept`` is a name :func:`_free_name` gives the file ``name``: ``<stem>.replaced-<stamp>[-n]<suffix>``."""
    stem, suffix = Path(name).stem, Path(name).suffix
    return isinstance(kept, str) and re.fullmatch(
        rf"{re.escape(stem)}\.replaced-\d{{8}}-\d{{6}}(?:-\d+)?{re.escape(suffix)}", kept) is not None


def _kept_copy(earlier: bytes, renamed: dict) -> bytes:
    """What is kept of the results file ``earlier`` (its bytes): when it names embeddings or maps that were kept
    (``renamed``: old -> kept name), a copy naming the kept files; else the same bytes."""
    try:
        results = json.loads(earlier)
    except (ValueError, RecursionError):  # RecursionError: nested too deep (a handed-over folder)
        return earlier
    if isinstance(results, dict) and renamed and ({"embeddings", "maps"} & set(results)):
        results = {k: _renamed_in(v, renamed) if k in ("embeddings", "maps") else v for k, v in results.items()}
        return (json.dumps(results, indent=2) + "\n").encode()
    return earlier


def _outputs(folder: Path, results_file: str) -> list[Path]:
    """The outputs of the evaluation in ``folder`` other than its result: those a new evaluation writes again."""
    return [p for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.is_symlink()
            and ".replaced-" not in p.name and p.name != results_file
            and (p.name in EVALUATION_OUTPUTS or p.name.startswith(MAP_PREFIX))]


def set_aside_evaluation(folder: Path, results_file: str = "results.json") -> list[str]:
    """:func:`keep_earlier_evaluation` for a folder that no new evaluation will fill: its result is kept under
    the ``.replaced-`` name only, so that the report no longer reads it. Returns the kept names."""
    kept = keep_earlier_evaluation(folder, results_file)
    if kept:
        (Path(folder) / results_file).unlink()
    evaluation_replaced(folder)
    return kept


EVALUATION_OUTPUTS = (METRICS_FILE, CONFIG_FILE, "embeddings.pt")
MAP_PREFIX = "tsne_"  # the maps of eval=embed: tsne_<part>.png
REPLACING = ".replacing.json"  # which files were kept for the evaluation now running in the folder


def _free_name(path: Path, stamp: str) -> Path:
    """``<stem>.replaced-<stamp><suffix>`` beside ``path``, numbered when taken (replaced twice in a second)."""
    target, n = path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}"), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.stem}.replaced-{stamp}-{n}{path.suffix}")
    return target


def _renamed_in(value, renamed: dict):
    """``value`` (a file name, or a mapping / list of them) with each renamed file's new name."""
    if isinstance(value, str):
        return renamed.get(value, value)
    if isinstance(value, dict):
        return {k: _renamed_in(v, renamed) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed_in(v, renamed) for v in value]
    return value
