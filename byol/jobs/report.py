"""Results table of an evaluation sweep: ``python -m byol.report [FOLDER ...] [--out DIR]``.

Scans the folders for ``results.json`` (written by ``evaluate.py``), groups them into rows (loss x
repr x eval, and within a cell one row per set of settings: backbone and stem, pretraining and
evaluation data, pretraining and evaluation epochs; results whose settings differ are never averaged
together), and writes ``results.md``, ``results.csv`` (both in %) and ``results.png`` (a grouped bar
chart). Each row shows the mean ± sample standard deviation (n - 1) over runs (seeds) of the test
and validation accuracy, the number of runs and of failed runs, and the seeds the means are over
(the last column). The 8 cells of the study (classic/multi x avgpool/combined x linear/finetune) are
always listed, their accuracy written ``missing`` when no result exists (``failed`` / ``incomplete``
when no run counts), in the table, the CSV and the figure, so a gap in a sweep cannot go unnoticed;
the random-init baseline and other protocols (kNN) are listed when present. Training jobs with no
model (``status: missing``) are listed by folder with their reason, and evaluations that have not
written their result (``status: running``: in progress, or killed) by folder, in no mean and not
counted as failed; results of pretraining runs that did not finish their epochs (``pretrain_status:
incomplete``) get rows of their own, marked ``incomplete``, and enter no mean unless allowed
(``--allow-incomplete``, or evaluate.py's ``allow_incomplete=true``). Results with no accuracy by
design (``eval=embed``: t-SNE maps) are listed under the table with their maps, never counted as
failed. Rows with two or more seeds in common are compared seed by seed under the table and in
``paired.csv`` (:mod:`byol.jobs.report_paired`).

The folders scanned are data from whoever wrote them: a malformed ``results.json`` is skipped with one
``[report] note:`` line naming it (:func:`byol.jobs.report_files.load_results`); every file the report
writes is a new file in its place (temporary file, then a rename), so a symbolic link there is replaced,
never written through; text from the files is drawn as written in the figures (no mathtext, no LaTeX).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from byol.core.errors import ByolError
from byol.jobs.console import names_printable
from byol.jobs.figures import escaped
from byol.jobs.report_cells import (
    BASELINE,
    RUNNING,
    RUNNING_TEXT,
    Cell,
    accuracy_text,
    build_cells,
    cell_states,
    csv_row,
    expected_cells,
    md_cell,
    or_unknown,
    seeds_text,
    settings_text,
    unscored_results,
)
from byol.jobs.report_curves import training_curves
from byol.jobs.report_files import (
    failed_job_lines,
    find_results,
    jobs_without_result,
    load_results,
    note_links,
    skipped_lines,
    training_sweeps,
    write_file,
)
from byol.jobs.report_paired import markdown_lines as paired_lines
from byol.jobs.report_paired import paired_comparisons
from byol.jobs.report_paired import write_csv as write_paired_csv
from byol.jobs.report_plot import plot

MD_COLUMNS = ("loss", "repr", "eval", "test acc", "val acc", "runs", "failed", "backbone", "data",
              "pretrain epochs", "eval epochs", "note", "seeds")
CSV_FIELDS = ["loss", "repr", "eval", "runs", "failed", "incomplete", "missing", "running", "status",
              "test_acc_mean_pct", "test_acc_std_pct", "val_acc_mean_pct", "val_acc_std_pct",
              "backbone", "data", "pretrain_epochs", "pretrain_epochs_planned", "eval_epochs", "settings", "seeds"]


def _pct(cell: Cell, values: Sequence[float], val: bool = False) -> str:
    mean, std = accuracy_text(cell, values, digits=2, val=val)
    return f"{mean} ± {std}" if std else mean


def _names(runs: Sequence[dict]) -> str:
    return ", ".join(dict.fromkeys(r["name"] for r in runs))


def _running(cell: Cell) -> str:
    """The evaluations of a row that have no result yet, named as such (not as failures)."""
    return f"{len(cell.running_runs)} {RUNNING_TEXT} ({_names(cell.running_runs)})"


def _note(cell: Cell) -> str:
    notes = [f"settings: {cell.variant}"] if cell.variant else []  # what tells this row from others of its loss
    if cell.status == "missing":
        why = [f"no model ({_names(cell.missing_runs)})"] * bool(cell.missing_runs) + \
            [_running(cell)] * bool(cell.running_runs)
        notes.append("**missing**" + (f": {'; '.join(why)}" if why else ""))
    elif cell.status == "failed":
        notes.append(f"**failed**: {cell.errors[0][:120]}")
    elif cell.status == "incomplete":
        n = len(cell.test)
        if cell.counted:
            notes.append(f"**incomplete** pretraining ({n} run(s)), counted: allow_incomplete")
        else:
            notes.append(f"**incomplete**: {n} run(s) not in any mean ({_names(cell.incomplete_runs)})")
    if cell.failed and cell.status != "failed":
        notes.append(f"{cell.failed} failed")
    if cell.missing_runs and cell.status != "missing":
        notes.append(f"{len(cell.missing_runs)} missing ({_names(cell.missing_runs)})")
    if cell.running_runs and cell.status != "missing":
        notes.append(_running(cell))
    if cell.repeated_seeds:
        seeds = ", ".join(f"seed {s} ({n} results)" for s, n in cell.repeated_seeds.items())
        notes.append(f"**repeated seeds**: {seeds}, each averaged into one run")
    if cell.loss == BASELINE and cell.status == "ok":
        notes.append("baseline")
    return "; ".join(notes)


def _unique_runs(cells: Sequence[Cell], attr: str) -> list[dict]:
    runs = {}
    for c in cells:
        for r in getattr(c, attr):
            runs.setdefault(r.get("path") or r["name"], r)
    return sorted(runs.values(), key=lambda r: (str(r.get("path")), r["name"]))


def _table(cells: Sequence[Cell]) -> list[str]:
    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for c in cells:
        backbone, pretrain_epochs, eval_epochs = settings_text(c)
        row = [c.loss, c.repr, c.eval, _pct(c, c.test_by_seed), _pct(c, c.val_by_seed, val=True), c.runs, c.failed,
               backbone, c.data, pretrain_epochs, eval_epochs, _note(c), seeds_text(c.seeds, ranges=True)]
        lines.append("| " + " | ".join(map(md_cell, row)) + " |")  # a | or a line break in a name: escaped
    return lines


def _gaps(cells: Sequence[Cell], jobs_missing: bool = False) -> list[str]:
    """The sentences under the table naming the cells with no result, the runs that are missing or did not
    finish pretraining, and the evaluations that have not written their result."""
    states = cell_states(cells)
    expected = expected_cells(c.triple for c in cells)
    missing = [t for t in expected if states.get(t) == "missing"]
    failed = [t for t, s in states.items() if s == "failed"]
    only_incomplete = [t for t, s in states.items() if s == "incomplete"]
    lines = []
    if missing:
        lines.append(f"Missing cells ({len(missing)} of {len(expected)} expected): "
                     + ", ".join(md_cell("/".join(t)) for t in missing) + ".")
    if failed:
        lines.append("Failed cells (no successful run): " + ", ".join(md_cell("/".join(t)) for t in failed) + ".")
    if only_incomplete:
        lines.append("Cells with only unfinished pretraining runs (not in any mean): "
                     + ", ".join(md_cell("/".join(t)) for t in only_incomplete) + ".")
    if expected and not missing and not failed and not only_incomplete:  # jobs without a result: rows may lack runs
        but = ", but some jobs have none (listed below)" if jobs_missing else ""
        lines.append(f"All {len(expected)} expected cells have results{but}." if len(expected) > 1 else
                     f"The expected cell has results{but}.")
    absent = _unique_runs(cells, "missing_runs")
    if absent:
        lines += ["", f"Missing pretraining runs ({len(absent)}, not evaluated):"]
        lines += [md_cell(f"- {r['path']}: {r['reason']}") for r in absent]
    running = _unique_runs(cells, "running_runs")
    if running:
        lines += ["", f"Evaluations {RUNNING_TEXT} ({len(running)}, in no mean, not counted as failed):"]
        lines += [md_cell(f"- {r['name']} ({r['path']})") for r in running]
    for counted in (False, True):
        unfinished = _unique_runs([c for c in cells if c.counted == counted], "incomplete_runs")
        if not unfinished:
            continue
        lines += ["", f"Incomplete pretraining runs ({len(unfinished)}), "
                  + ("counted in the means of their own rows (allow_incomplete):" if counted else
                     "not in any mean (count them with allow_incomplete=true in evaluate.py, or "
                     "python -m byol.report --allow-incomplete):")]
        lines += [md_cell(f"- {r['name']}: {or_unknown(r['done'])} of {or_unknown(r['planned'])} epochs ({r['path']})")
                  for r in unfinished]
    return lines


def _unscored(results: Sequence[dict]) -> list[str]:
    """The lines under the table that list the results with no accuracy (eval=embed: t-SNE maps)."""
    if not results:
        return []
    lines = ["", f"Results with no accuracy ({len(results)}, not in the table: eval=embed writes embeddings.pt "
             f"and t-SNE maps):"]
    for r in sorted(results, key=lambda r: str(r.get("_path"))):
        folder = Path(str(r.get("_path"))).parent
        done = f"maps {', '.join((r.get('maps') or {}).values()) or 'none'}" if r.get("status") == "ok" else \
            RUNNING_TEXT if r.get("status") == RUNNING else \
            f"**{r.get('status')}**: {str(r.get('error', 'no error recorded'))[:120]}"
        lines.append(md_cell(f"- {r.get('label') or folder.name} ({r.get('loss')}, repr={r.get('repr')}): {done} "
                             f"({folder})"))
    return lines


def markdown(cells: Sequence[Cell], n_files: int, unscored: Sequence[dict] = (), paired: Sequence = (),
             n_read: int | None = None, skipped: Sequence[tuple] = (), failed: Sequence[tuple] = ()) -> str:
    """results.md; ``skipped``: (path, why) for each results.json that could not be used; ``failed``: (job
    folder, why) for each job that failed before writing one (:func:`jobs_without_result`)."""
    n_skipped = len(skipped) or (n_files - n_read if n_read is not None else 0)
    counted = f"{n_files} results.json files" + (f" ({n_skipped} skipped, listed below)" if skipped else
                                                 f" ({n_skipped} skipped)" if n_skipped else "")
    intro = (f"{counted}. Accuracy in %, mean ± sample std (n - 1) over runs (seeds); "
             f"validation selected nothing (final epoch). Results whose settings differ (backbone, data, "
             f"pretraining or evaluation epochs; other training, protocol or representation settings, named "
             f"in the notes) are in separate rows, never averaged together. A row "
             f"with no accuracy says why: missing (no result), failed (no run succeeded) or incomplete "
             f"(pretraining did not finish; not counted).")
    if not cells:  # eval=embed alone: no accuracy, so no table to explain (it was a header without rows)
        intro, table = f"{counted}. None holds an accuracy (no table).", []
    else:
        table = [*_table(cells), "", *_gaps(cells, bool(failed))]
    return "\n".join(["# Results", "", intro, "", *table, *paired_lines(paired), *_unscored(unscored),
                      *skipped_lines(skipped), *failed_job_lines(failed)]) + "\n"


def write_csv(cells: Sequence[Cell], path: Path) -> None:
    """One line per row of the table; accuracies in %, like the markdown table, and the same words
    (``missing``, ``failed``, ``incomplete``) where a row has none. Written atomically (:func:`write_file`)."""
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(CSV_FIELDS)
    for c in cells:
        stats = [*accuracy_text(c, c.test_by_seed, digits=4), *accuracy_text(c, c.val_by_seed, digits=4, val=True)]
        backbone, _, eval_epochs = settings_text(c)
        epochs = ["" if v is None else v for v in (c.pretrain_epochs, c.planned_epochs)]
        w.writerow(csv_row([c.loss, c.repr, c.eval, c.runs, c.failed, len(c.incomplete_runs), len(c.missing_runs),
                    len(c.running_runs), c.status, *stats, backbone, c.data, *epochs, eval_epochs, c.variant,
                            seeds_text(c.seeds)]))
    write_file(path, f.getvalue())


def _plot(cells: Sequence[Cell], path: Path) -> bool:
    """results.png; a figure that cannot be drawn is a note, the table and the CSV are written all the same.
    A file that cannot be written is an error (the caller's one line). No cell, no figure (eval=embed alone)."""
    if not cells:
        print(f"[report] note: {path.name} not drawn: no accuracy to draw (the results hold none)", file=sys.stderr)
        return False
    if importlib.util.find_spec("matplotlib") is not None:
        note_links([path])
    try:
        return plot(cells, path)
    except (OSError, ByolError):
        raise
    except Exception as e:
        print(escaped(f"[report] note: {path.name} not drawn ({type(e).__name__}: {str(e).strip()[:200]})"),
              file=sys.stderr)
        return False


def report(folders: Sequence[str | Path], out: str | Path,
           allow_incomplete: bool | None = None) -> list[Cell]:
    """Write results.md / results.csv / results.png into ``out`` and return the rows.

    ``allow_incomplete``: count the results of unfinished pretraining runs in the means (in rows of
    their own); None: as each results.json says (evaluate.py's ``allow_incomplete``).
    """
    paths = find_results(folders)
    skipped: list[tuple] = []  # (path, why) of each results.json left out
    results = load_results(paths, skipped) if paths else []
    curves = training_curves(folders, results, Path(out))
    where = ", ".join(map(str, folders))
    if not paths:
        if curves:  # a training sweep before its evaluation: say what the table needs
            print(escaped(f"[report] no results.json under {where} yet, so no results table: evaluate the runs "
                          f"first (python evaluate.py -m pretrained=SWEEP ...), then report that evaluation"))
            return []
        from byol.jobs.run_folder import find_runs

        runs = [run for folder in folders for run in find_runs(Path(folder))]
        if runs:  # there are runs: their metrics.csv could not be drawn (a note above says why)
            raise SystemExit(f"error: no results.json under {where}, and the learning curves of its {len(runs)} "
                             f"training run(s) could not be drawn (see above); evaluate them with evaluate.py "
                             f"pretrained=... first")
        raise SystemExit(f"error: no results.json and no training run under {where}; run train.py / evaluate.py "
                         f"first")
    if not results:
        drawn = f"; only the learning curves were drawn ({curves})" if curves else ""
        raise SystemExit(f"error: none of the {len(paths)} results.json file(s) under {where} could be used (each "
                         f"named above); no results table written{drawn}")
    cells = build_cells(results, allow_incomplete)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paired = paired_comparisons(cells)
    text = markdown(cells, len(paths), unscored_results(results), paired, n_read=len(results), skipped=skipped,
                    failed=jobs_without_result([*folders, *training_sweeps(results)]))
    note_links([out / "results.md", out / "results.csv"] + ([out / "paired.csv"] if paired else []))
    write_file(out / "results.md", text)
    write_csv(cells, out / "results.csv")
    if paired:
        write_paired_csv(paired, out / "paired.csv")
    plotted = _plot(cells, out / "results.png")
    print(escaped(text))  # a name that is not UTF-8: escaped, as in the files (a strict stdout would refuse it)
    written = [out / "results.md", out / "results.csv"] + ([out / "paired.csv"] if paired else []) + \
        ([out / "results.png"] if plotted else [])
    print(escaped(f"[report] wrote {', '.join(map(str, written))}"))
    return cells


def checked_folders(folders: Sequence[str]) -> list[Path]:
    """The folders (or results.json files) to scan; a name that does not exist, or a file of another kind,
    is refused: a typo would otherwise leave its runs out of the table without a word."""
    for folder in map(Path, folders):
        if not folder.exists():
            raise SystemExit(f"error: '{folder}' does not exist; name evaluation or training folders (or "
                             f"results.json files) to report on")
        if folder.is_file() and folder.name != "results.json":
            raise SystemExit(f"error: '{folder}' is a file, not a folder or a results.json; name the folder "
                             f"that holds it ('{folder.parent}')")
    return [Path(f) for f in folders]


def newest_eval_sweep(outputs: Path = Path("outputs")) -> Path | None:
    """By newest results.json, not folder time (a report written into a sweep moves it), then by name (its time)."""
    root = outputs / "multirun" / "eval"
    if not root.is_dir():
        return None
    found = {d: list(d.rglob("results.json")) for d in root.iterdir() if d.is_dir()}  # each sweep walked once
    newest = {d: max((f.stat().st_mtime for f in files if f.is_file()), default=0.0) for d, files in found.items()
              if files}
    return max(newest, key=lambda d: (newest[d], d.name)) if newest else None


def skipped_sweeps(chosen: Path) -> str:
    """``; skipped the newer X: why`` for the evaluation sweeps begun after ``chosen``'s last result that have no
    results.json yet (still running, failed, nothing written): the report on the newest results said nothing of
    them, and a sweep just started looked lost."""
    from byol.jobs.run_folder import FAILED, lock_holder, sweep_jobs

    last = max(f.stat().st_mtime for f in chosen.rglob("results.json") if f.is_file())
    newer = sorted((d for d in chosen.parent.iterdir() if d.is_dir() and d != chosen and d.stat().st_mtime > last
                    and next(d.rglob("results.json"), None) is None), key=lambda d: (d.stat().st_mtime, d.name))
    if not newer:
        return ""
    sweep, jobs = newer[-1], sweep_jobs(newer[-1])
    running = sorted({pid for job in [sweep, *jobs] if (pid := lock_holder(job))})
    failed = [job for job in jobs if (job / FAILED).is_file()]
    why = (f"still running (process {', '.join(running)})" if running else
           f"{len(failed)} of its {len(jobs)} jobs failed" if failed else f"{len(jobs)} job folder(s)")
    more = f" (and {len(newer) - 1} more newer without results)" if len(newer) > 1 else ""
    return f"; skipped the newer {sweep}{more}: no results.json yet, {why}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m byol.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="folders to scan for results.json (default: the newest "
                        "evaluation sweep under outputs/multirun/eval)")
    parser.add_argument("--out", help="where to write results.md/.csv/.png, paired.csv and the curves figure "
                        "(default: the first folder)")
    parser.add_argument("--allow-incomplete", action=argparse.BooleanOptionalAction, default=None,
                        help="count (--no-allow-incomplete: do not count) the results of pretraining runs "
                        "that did not finish their epochs in the means, in rows of their own (default: as "
                        "each results.json says, i.e. evaluate.py's allow_incomplete)")
    args = parser.parse_args(argv)
    names_printable()  # folder names of sweeps handed in, on the console
    folders = checked_folders(args.folders)
    if not folders:
        newest = newest_eval_sweep()
        if newest is None:
            raise SystemExit("error: no evaluation sweep under outputs/multirun/eval; name folders to scan")
        print(escaped(f"[report] newest evaluation sweep: {newest}{skipped_sweeps(newest)}"))
        folders = [newest]
    first = Path(folders[0])
    out = args.out or (first if first.is_dir() else first.parent)
    try:
        report(folders, out, args.allow_incomplete)
    except OSError as e:  # an unwritable or full output folder: one line, like the jobs
        raise SystemExit(f"error: cannot write the report into '{out}' ({e.strerror or e}); choose another "
                         f"folder with --out DIR") from None
    except ByolError as e:  # a file of the report that could not be replaced (names it, says why)
        raise SystemExit(f"error: {e}") from None
