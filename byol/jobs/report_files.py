"""The report's files. Its input: the ``results.json`` files found under the folders given, each read as
untrusted data (whatever wrote it) and checked field by field; a file that cannot be used is one note, never
a traceback halfway through the report. Its output: each file written as a new file in its place, with a
name that is not UTF-8 (a folder's bytes, a ``\\udcff`` in a results.json) escaped, never a traceback."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from byol.core.checkpoint import atomic_write_bytes
from byol.jobs.figures import escaped
from byol.jobs.report_cells import md_cell


def find_results(folders: Iterable[str | Path]) -> list[Path]:
    """The results.json files named or found under ``folders``, each once (links resolved); a link that
    leads nowhere readable (a loop) is skipped with a note."""
    found = set()
    for folder in folders:
        folder = Path(folder)
        candidates = [folder] if folder.is_file() and folder.name == "results.json" else \
            folder.rglob("results.json") if folder.is_dir() else []
        for path in candidates:
            try:
                found.add(path.resolve())
            except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop
                skip_note(path, f"unreadable ({getattr(e, 'strerror', None) or e})")
    return sorted(found)


def jobs_without_result(folders: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """(job folder, the first line of its FAILED file) for each evaluation job under ``folders`` that failed before
    it wrote a results.json (a value the config check refused), and (sweep folder, which jobs) for the jobs its
    command planned that never started (:func:`~byol.jobs.sweep_plan.unstarted_note`): no row counts them, and the
    report had said "failed 0" and that its cells had results. Each is a note here, and a line under the table."""
    from byol.jobs.run_folder import FAILED, STOPPED, lock_holder, sweep_jobs
    from byol.jobs.sweep_plan import unstarted_note

    failed = []
    for folder in map(Path, folders):
        running = sorted({pid for job in [folder, *sweep_jobs(folder)] if (pid := lock_holder(job))})
        note = unstarted_note(folder, "they have no result") if folder.is_dir() and not running else None
        if running:  # its jobs still to come are not "never started", nor its cells complete
            note = (f"still running (process {', '.join(running)}): the table holds the results written so far; "
                    f"report again once it has finished")
        if note:
            print(escaped(f"[report] note: {folder}: {note}"), file=sys.stderr)
            failed.append((folder, note))
        marks = [*folder.rglob(FAILED), *folder.rglob(STOPPED)] if folder.is_dir() else []
        for path in marks:
            job = path.parent
            if path.name == FAILED and next(job.rglob("results.json"), None) or not (job / "evaluate.log").exists():
                continue  # it has results (a row says which failed), or it is a training job
            try:
                why = (path.read_text(errors="replace").strip().splitlines() or ["(empty)"])[0][:300]
            except OSError as e:
                why = f"its {path.name} file is unreadable ({e.strerror})"
            said = "failed before writing a result" if path.name == FAILED else "was stopped"
            print(escaped(f"[report] note: {job} {said}: {why}"), file=sys.stderr)
            failed.append((job, why))
    return sorted(failed)


def skipped_lines(skipped: Sequence[tuple]) -> list[str]:
    """The lines under the table naming each results.json left out, and why (a NaN accuracy, not JSON...)."""
    if not skipped:
        return []
    return ["", f"Skipped results.json files ({len(skipped)}, in no row):", *(md_cell(f"- {path}: {why}")
                                                                             for path, why in skipped)]


def training_sweeps(results: Iterable[dict]) -> list[Path]:
    """The training sweeps whose runs ``results`` evaluated, when none of their jobs is running: the jobs their
    command planned and never started are in no evaluation, and the report of one said its cells were complete."""
    from byol.jobs.run_folder import SWEEP_RECORD, lock_holder, run_folder_of, sweep_jobs

    sweeps = set()
    for result in results:
        pretrained = result.get("pretrained")
        if isinstance(pretrained, str) and os.path.isabs(pretrained):
            sweep = run_folder_of(Path(pretrained)).parent
            if (sweep / SWEEP_RECORD).is_file():
                sweeps.add(sweep)
    return sorted(s for s in sweeps if not any(lock_holder(job) for job in sweep_jobs(s)))


def failed_job_lines(failed: Sequence[tuple]) -> list[str]:
    """The lines under the table naming each evaluation job that failed before writing a result, was stopped
    before its last run (a ``STOPPED`` file), or never started."""
    if not failed:
        return []
    return ["", f"Jobs with results missing: failed before writing one, stopped, or never started ({len(failed)}, "
                f"in no row):",
            *(md_cell(f"- {job}: {why}") for job, why in failed)]


# The kind of each results.json field the report reads (null is always allowed): a file edited by hand
# or written by something else is skipped with the field named, not a traceback halfway through.
RESULT_FIELDS = {
    **dict.fromkeys(("test_acc", "val_acc"), "accuracy"),
    **dict.fromkeys(("seed", "pretrain_epochs", "pretrain_epochs_planned", "eval_epochs", "num_classes"), "int"),
    "width": "number", "allow_incomplete": "bool",
    **dict.fromkeys(("status", "loss", "repr", "eval", "backbone", "stem", "label", "pretrain_status", "data",
                     "pretrained", "error"), "str"),
    **dict.fromkeys(("eval_data", "pretrain_data"), "settings"),
    **dict.fromkeys(("trained", "eval_settings"), "options"),
    "maps": "maps", "taps": "names",
}
REQUIRED_FIELDS = ("repr", "eval")  # every results.json evaluate.py has written names both
_KINDS = {"int": (int,), "number": (int, float), "accuracy": (int, float), "bool": (bool,), "str": (str,),
          "settings": (dict,), "maps": (dict,), "options": (dict,), "names": (list,)}
_WHAT = {"accuracy": "an accuracy in [0, 1]", "int": "a whole number", "number": "a number", "bool": "a bool",
         "str": "a str", "settings": "a dict of plain values (text, numbers) with a text name",
         "maps": "a dict of map names to file names",
         "options": "a dict of settings to plain values (or lists and dicts of them)", "names": "a list of names"}
_PLAIN = (str, int, float, bool, type(None))
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "true/false",
               type(None): "null"}
MAX_RESULTS_BYTES = 16 * 2**20  # a results.json is a few kB; a larger file is not one


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _wrong(value, kind: str) -> bool:
    if not isinstance(value, _KINDS[kind]) or (isinstance(value, bool) and kind != "bool"):
        return True
    if kind in ("number", "accuracy"):
        return not _finite(value) or (kind == "accuracy" and not 0 <= value <= 1)
    if kind == "str":
        return "\x00" in value  # no path, name or label holds a NUL (it stops every file call)
    if kind == "settings":  # shown in the table and compared: plain values only
        plain = all(isinstance(v, (str, int, float, bool, type(None))) for v in value.values())
        return not plain or not isinstance(value.get("name", ""), str)
    if kind == "maps":
        return not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if kind == "options":  # compared and named in the table: one level of lists or dicts at most
        inner = [x for v in value.values() if isinstance(v, (list, dict))
                 for x in (v.values() if isinstance(v, dict) else v)]
        return not all(isinstance(v, (*_PLAIN, list, dict)) for v in value.values()) or \
            not all(isinstance(x, _PLAIN) for x in inner)
    if kind == "names":
        return not all(isinstance(x, str) for x in value)
    return False


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def field_problem(r: dict) -> str | None:
    """What makes ``r`` unusable as a results object (a field missing or of the wrong kind), or None."""
    absent = [key for key in REQUIRED_FIELDS if not r.get(key)]
    if absent:
        return f"no {' and no '.join(absent)} field (not a results.json of evaluate.py)"
    for key, kind in RESULT_FIELDS.items():
        value = r.get(key)
        if value is not None and _wrong(value, kind):
            return f"{key} is {_shown(value)}, not {_WHAT[kind]}"
    if r.get("status") == "ok" and r.get("eval") != "embed" and r.get("test_acc") is None:  # counted failed, unnamed
        return "status ok but no test_acc (only eval=embed measures no accuracy)"
    return None


def _read_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a results.json (not a regular file: a FIFO would block; too large), or None."""
    try:
        info = Path(path).stat()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > MAX_RESULTS_BYTES:
        return f"{info.st_size} bytes, too large for a results.json"
    return None


def why_unreadable(e: Exception, kind: str) -> str:
    """Why a file of ``kind`` (JSON, CSV) handed to the report could not be read, in one phrase."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at position {e.start}"
    if isinstance(e, OSError):
        return f"cannot be read: {e.strerror or e}"
    if isinstance(e, RecursionError):
        return f"not {kind} the report reads (nested too deep)"
    if isinstance(e, ValueError | csv.Error):  # JSONDecodeError; a number of 4300+ digits; a CSV field too long
        return f"not {kind} the report reads: {str(e).strip()[:200]}"
    return f"{type(e).__name__}: {str(e).strip()[:200]}"


def skip_note(path, why: str) -> None:
    """The one line that says a results.json is left out, and why."""
    print(escaped(f"[report] note: skipping {path}: {why}"), file=sys.stderr)


def load_results(paths: Iterable[Path], skipped: list | None = None) -> list[dict]:
    """The readable results objects, each with its ``_path``; the others are skipped with one line each
    (:func:`skip_note`), so one broken file does not hide a whole sweep, and added to ``skipped`` as
    (path, why) when it is given (results.md lists them)."""
    results = []
    for path in paths:
        r = read_result(path)
        if isinstance(r, str):  # why it cannot be used
            skip_note(path, r)
            if skipped is not None:
                skipped.append((str(path), r))
            continue
        r["_path"] = str(path)
        results.append(r)
    return results


def read_result(path: Path) -> dict | str:
    """The results object in ``path``, or (text) why it cannot be used."""
    problem = _read_problem(path)
    if problem:
        return problem
    try:
        r = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        return why_unreadable(e, "JSON")
    if not isinstance(r, dict):
        return f"not a results object (a JSON {_JSON_KINDS.get(type(r), type(r).__name__)})"
    return field_problem(r) or r


def write_file(path: Path, text: str) -> None:
    """``text`` into ``path`` as a new file (temporary file beside it, then a rename): a symbolic link at
    ``path`` is replaced, its target never written, and a reader never sees half a file. A name that is
    not UTF-8 (a run folder ``e\\xff1``) is written escaped: UTF-8 refused it, and nothing was written."""
    atomic_write_bytes(escaped(text).encode("utf-8"), path)


def note_links(paths: Sequence[Path]) -> None:
    """One line for each of the report's files that is a symbolic link: the report replaces the link with
    its own file and leaves the target as it was (a run folder from elsewhere could point them anywhere)."""
    for path in paths:
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            print(escaped(f"[report] note: {path} was a symbolic link (to {target}); replaced by the report's "
                          f"file, the link's target left as it was"), file=sys.stderr)
