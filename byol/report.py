"""Results table of an evaluation sweep: ``python -m byol.report [FOLDER ...] [--out DIR]``.

Scans the folders for ``results.json`` (written by ``evaluate.py``), groups them into rows
(loss x repr x eval, and within a cell one row per set of settings: backbone and stem,
pretraining and evaluation data, pretraining and evaluation epochs; results whose settings
differ are never averaged together), and writes ``results.md``, ``results.csv`` (both in %)
and ``results.png`` (a grouped bar chart). Each row shows the mean ± sample standard deviation
(n - 1) over runs (seeds) of the test and validation accuracy, the number of runs and of failed
runs. The 8 cells of the study (classic/multi x avgpool/combined x linear/finetune) are always
listed, marked ``missing`` when no result exists, so a gap in a sweep cannot go unnoticed; the
random-init baseline and other protocols (kNN) are listed when present. Training jobs with no
model (``status: missing``) are listed by folder with their reason; results of pretraining runs
that did not finish their epochs (``pretrain_status: incomplete``) get rows of their own, marked
``incomplete``, and enter no mean unless allowed (``--allow-incomplete``, or evaluate.py's
``allow_incomplete=true``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOSSES = ("classic", "multi")
REPRS = ("avgpool", "combined")
EVALS = ("linear", "finetune")
BASELINE = "random-init"
EXPECTED = [(loss, r, e) for e in EVALS for r in REPRS for loss in LOSSES]


@dataclass
class Cell:
    """The results of one (loss, repr, eval) combination under one set of settings.

    Results are pooled only when their settings agree: backbone and stem, pretraining data,
    evaluation data, pretraining epochs (done, and planned for an unfinished run) and evaluation
    epochs. ``counted``: whether the accuracies enter the means (False for the results of unfinished
    pretraining runs, unless ``allow_incomplete``).
    """

    loss: str
    repr: str
    eval: str
    backbone: str | None = None         # "resnet18/imagenet"
    pretrain_data: str | None = None    # the data settings, as canonical JSON (None: unknown / random-init)
    eval_data: str | None = None
    pretrain_epochs: int | None = None  # epochs done
    planned_epochs: int | None = None   # epochs the run planned, for unfinished runs only
    eval_epochs: int | None = None
    incomplete: bool = False            # the runs of this row did not finish their pretraining
    counted: bool = True
    test: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    incomplete_runs: list[dict] = field(default_factory=list)
    missing_runs: list[dict] = field(default_factory=list)
    n_results: int = 0                  # results.json files in this row (0: an expected cell with none)
    data: str = ""                      # how the data settings read in the table (set by build_cells)

    @property
    def key(self) -> tuple:
        return (self.loss, self.repr, self.eval, self.backbone, self.pretrain_data, self.eval_data,
                self.pretrain_epochs, self.planned_epochs, self.eval_epochs, self.incomplete, self.counted)

    @property
    def runs(self) -> int:
        """Runs in the means."""
        return len(self.test) if self.counted else 0

    @property
    def status(self) -> str:
        if self.test:
            return "incomplete" if self.incomplete else "ok"
        return "failed" if self.failed else "missing"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is NaN for fewer than two values."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def find_results(folders: Iterable[str | Path]) -> list[Path]:
    found = set()
    for folder in folders:
        folder = Path(folder)
        if folder.is_file() and folder.name == "results.json":
            found.add(folder.resolve())
        elif folder.is_dir():
            found |= {p.resolve() for p in folder.rglob("results.json")}
    return sorted(found)


def load_results(paths: Iterable[Path]) -> list[dict]:
    results = []
    for path in paths:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"[report] skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(r, dict):
            print(f"[report] skipping {path}: not a results object", file=sys.stderr)
            continue
        r["_path"] = str(path)
        results.append(r)
    return results


def _order(value: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(value), "") if value in known else (len(known), str(value))


def result_status(r: dict) -> str:
    """``ok``, ``failed`` or ``missing`` (a training job with no model). A results.json written before
    ``status`` existed is finished when it has a test accuracy."""
    status = r.get("status") or ("ok" if r.get("test_acc") is not None else "failed")
    return "failed" if status == "ok" and r.get("test_acc") is None else status


def _canonical(data) -> str | None:
    return json.dumps(data, sort_keys=True, default=str) if isinstance(data, dict) else None


def _settings(r: dict) -> dict:
    """The settings of a result that decide which results may be pooled; None where unknown (older
    results.json files lack some of them)."""
    eval_data = r.get("eval_data")
    if not isinstance(eval_data, dict) and isinstance(r.get("data"), str):
        eval_data = {"name": r["data"]}  # before eval_data: the dataset's name only
    incomplete = r.get("pretrain_status") == "incomplete"
    return {"backbone": f"{r['backbone']}/{r.get('stem')}" if r.get("backbone") else None,
            "pretrain_data": _canonical(r.get("pretrain_data")), "eval_data": _canonical(eval_data),
            "pretrain_epochs": r.get("pretrain_epochs"),
            "planned_epochs": r.get("pretrain_epochs_planned") if incomplete else None,
            "eval_epochs": r.get("eval_epochs"), "incomplete": incomplete}


def _run_name(r: dict) -> str:
    """The run's label, else its folder's name (``pretrained`` is a weights file or a job folder)."""
    if r.get("label"):
        return str(r["label"])
    path = Path(str(r.get("pretrained")))
    if path.suffix in (".pt", ".ckpt"):
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path.name


def _matches(cell: Cell, triple: tuple, settings: dict) -> bool:
    """Whether a result without accuracies (failed, missing) belongs to ``cell``: same loss / repr /
    eval, and each setting it knows equal to the cell's."""
    if (cell.loss, cell.repr, cell.eval) != triple or not cell.n_results:
        return False
    return all(v is None or getattr(cell, k) == v for k, v in settings.items() if k != "incomplete")


def build_cells(results: Iterable[dict], allow_incomplete: bool | None = None) -> list[Cell]:
    """Rows keyed by (loss, repr, eval) and settings: the 8 expected cells first, then baselines and others.

    ``allow_incomplete``: whether the results of unfinished pretraining runs enter the means; None:
    as each results.json says (evaluate.py's ``allow_incomplete``). They stay in rows of their own.
    Failed and missing results join the row of their cell whose settings they match.
    """
    results = list(results)
    cells: dict[tuple, Cell] = {}
    for r in results:
        if result_status(r) != "ok":
            continue
        settings = _settings(r)
        counted = not settings["incomplete"] or bool(
            r.get("allow_incomplete", False) if allow_incomplete is None else allow_incomplete)
        cell = Cell(str(r.get("loss")), str(r.get("repr")), str(r.get("eval")), counted=counted, **settings)
        cell = cells.setdefault(cell.key, cell)
        cell.n_results += 1
        cell.test.append(float(r["test_acc"]))
        if r.get("val_acc") is not None:
            cell.val.append(float(r["val_acc"]))
        if cell.incomplete:
            cell.incomplete_runs.append({"name": _run_name(r), "done": r.get("pretrain_epochs"),
                                         "planned": r.get("pretrain_epochs_planned"),
                                         "path": r.get("pretrained")})
    for r in results:
        status = result_status(r)
        if status == "ok":
            continue
        triple, settings = (str(r.get("loss")), str(r.get("repr")), str(r.get("eval"))), _settings(r)
        candidates = sorted((c for c in cells.values() if _matches(c, triple, settings)),
                            key=lambda c: c.incomplete)
        if candidates:
            cell = candidates[0]
        else:
            settings.update(incomplete=False, planned_epochs=None)
            cell = Cell(*triple, **settings)
            cell = cells.setdefault(cell.key, cell)
        cell.n_results += 1
        if status == "missing":
            cell.missing_runs.append({"name": _run_name(r), "path": r.get("pretrained"),
                                      "reason": str(r.get("error", "no model"))})
        else:
            cell.failed += 1
            cell.errors.append(str(r.get("error", "no error recorded")))
    present = {(c.loss, c.repr, c.eval) for c in cells.values()}
    for triple in EXPECTED:
        if triple not in present:
            cells[triple] = Cell(*triple)
    _label_data(cells.values())
    return sorted(cells.values(), key=lambda c: (
        _order(c.eval, EVALS + ("knn",)), _order(c.repr, REPRS), _order(c.loss, LOSSES + (BASELINE,)),
        str(c.backbone), c.data, c.incomplete, str(c.pretrain_epochs), str(c.eval_epochs)))


CORE_DATA = ("name", "root", "subset", "image_size")  # what every results.json of this version records


def _label_data(cells: Iterable[Cell]) -> None:
    """``cell.data``: the dataset's name, plus each data setting whose value differs between results
    of that dataset in this report (``cifar10 subset=10000``); ``A → B`` when pretraining and
    evaluation data differ; ``(settings unknown)`` for an older results.json that records only the
    dataset's name, ``?`` when nothing is known."""
    cells = list(cells)
    found = {s for c in cells for s in (c.pretrain_data, c.eval_data) if s is not None}
    dicts = {s: json.loads(s) for s in found}
    values: dict = {}  # (dataset name, setting) -> the values recorded for it
    for d in dicts.values():
        for k, v in d.items():
            values.setdefault((str(d.get("name")), k), set()).add(json.dumps(v))

    def parts(s: str | None) -> list[str]:
        if s is None:
            return ["?"]
        d = dicts[s]
        name = str(d.get("name"))
        out = [f"{k}={'none' if v is None else v}" for k, v in sorted(d.items())
               if k != "name" and len(values[(name, k)]) > 1]
        return [str(d.get("name", "?"))] + out + (["(settings unknown)"] * any(k not in d for k in CORE_DATA))

    for c in cells:
        if not c.n_results:
            continue
        e = parts(c.eval_data)
        if c.loss == BASELINE and c.pretrain_data is None:  # no pretraining
            c.data = " ".join(e)
            continue
        p = parts(c.pretrain_data)
        # the settings only evaluation has (split, val_size) do not make the data differ
        pretrain_keys = {x.split("=")[0] for x in p[1:]}
        comparable = [x for x in e if "=" not in x or x.split("=")[0] in pretrain_keys or
                      x.split("=")[0] in CORE_DATA]
        c.data = " ".join(e) if p == comparable else f"{' '.join(p)} → {' '.join(e)}"


def _pct(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "–"
    return f"{100 * m:.2f}" if math.isnan(s) else f"{100 * m:.2f} ± {100 * s:.2f}"


def _text(value) -> str:
    return "?" if value is None else str(value)


def _settings_text(c: Cell) -> tuple[str, str, str]:
    """backbone, pretrain epochs, eval epochs as the table shows them (blank for an empty cell)."""
    if not c.n_results:
        return "", "", ""
    epochs = f"{_text(c.pretrain_epochs)} of {_text(c.planned_epochs)}" if c.incomplete else \
        _text(c.pretrain_epochs)
    return _text(c.backbone), epochs, _text(c.eval_epochs)


def _names(runs: Sequence[dict]) -> str:
    return ", ".join(dict.fromkeys(r["name"] for r in runs))


def _note(cell: Cell) -> str:
    notes = []
    if cell.status == "missing":
        runs = f": no model ({_names(cell.missing_runs)})" if cell.missing_runs else ""
        notes.append(f"**missing**{runs}")
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
    if cell.loss == BASELINE and cell.status == "ok":
        notes.append("baseline")
    return "; ".join(notes)


def cell_states(cells: Sequence[Cell]) -> dict[tuple, str]:
    """(loss, repr, eval) -> ``ok`` (some row has runs in its means), ``failed``, ``incomplete`` (only
    results of unfinished runs, not counted) or ``missing``."""
    states = {}
    for c in cells:
        triple = (c.loss, c.repr, c.eval)
        rank = {"missing": 0, "incomplete": 1, "failed": 2, "ok": 3}
        state = "ok" if c.runs else ("failed" if c.failed else "incomplete" if c.test else "missing")
        if rank[state] > rank[states.get(triple, "missing")] or triple not in states:
            states[triple] = state
    return states


MD_COLUMNS = ("loss", "repr", "eval", "test acc", "val acc", "runs", "failed", "backbone", "data",
              "pretrain epochs", "eval epochs", "note")


def _unique_runs(cells: Sequence[Cell], attr: str) -> list[dict]:
    runs = {}
    for c in cells:
        for r in getattr(c, attr):
            runs.setdefault(r.get("path") or r["name"], r)
    return sorted(runs.values(), key=lambda r: (str(r.get("path")), r["name"]))


def markdown(cells: Sequence[Cell], n_files: int) -> str:
    states = cell_states(cells)
    missing = [t for t in EXPECTED if states.get(t) == "missing"]
    failed = [t for t, s in states.items() if s == "failed"]
    only_incomplete = [t for t, s in states.items() if s == "incomplete"]
    lines = [
        "# Results",
        "",
        f"{n_files} results.json files. Accuracy in %, mean ± sample std (n - 1) over runs (seeds); "
        f"validation selected nothing (final epoch). Results whose settings differ (backbone, data, "
        f"pretraining or evaluation epochs) are in separate rows, never averaged together.",
        "",
        "| " + " | ".join(MD_COLUMNS) + " |",
        "|" + "---|" * len(MD_COLUMNS),
    ]
    for c in cells:
        backbone, pretrain_epochs, eval_epochs = _settings_text(c)
        row = [c.loss, c.repr, c.eval, _pct(c.test if c.counted else []), _pct(c.val if c.counted else []),
               c.runs, c.failed, backbone, c.data, pretrain_epochs, eval_epochs, _note(c)]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    lines.append("")
    if missing:
        lines.append(f"Missing cells ({len(missing)} of {len(EXPECTED)} expected): "
                     + ", ".join("/".join(t) for t in missing) + ".")
    if failed:
        lines.append("Failed cells (no successful run): " + ", ".join("/".join(t) for t in failed) + ".")
    if only_incomplete:
        lines.append("Cells with only unfinished pretraining runs (not in any mean): "
                     + ", ".join("/".join(t) for t in only_incomplete) + ".")
    if not missing and not failed and not only_incomplete:
        lines.append(f"All {len(EXPECTED)} expected cells have results.")
    absent = _unique_runs(cells, "missing_runs")
    if absent:
        lines.append("")
        lines.append(f"Missing pretraining runs ({len(absent)}, not evaluated):")
        lines += [f"- {r['path']}: {r['reason']}" for r in absent]
    for counted in (False, True):
        unfinished = _unique_runs([c for c in cells if c.counted == counted], "incomplete_runs")
        if not unfinished:
            continue
        lines.append("")
        lines.append(f"Incomplete pretraining runs ({len(unfinished)}), "
                     + ("counted in the means of their own rows (allow_incomplete):" if counted else
                        "not in any mean (count them with allow_incomplete=true in evaluate.py, or "
                        "python -m byol.report --allow-incomplete):"))
        lines += [f"- {r['name']}: {_text(r['done'])} of {_text(r['planned'])} epochs ({r['path']})"
                  for r in unfinished]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["loss", "repr", "eval", "runs", "failed", "incomplete", "missing", "status",
              "test_acc_mean_pct", "test_acc_std_pct", "val_acc_mean_pct", "val_acc_std_pct",
              "backbone", "data", "pretrain_epochs", "pretrain_epochs_planned", "eval_epochs"]


def write_csv(cells: Sequence[Cell], path: Path) -> None:
    """One line per row of the table; accuracies in %, like the markdown table."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for c in cells:
            tm, ts = mean_std(c.test if c.counted else [])
            vm, vs = mean_std(c.val if c.counted else [])
            stats = ["" if math.isnan(v) else f"{100 * v:.4f}" for v in (tm, ts, vm, vs)]
            backbone, _, eval_epochs = _settings_text(c)
            epochs = ["" if v is None else v for v in (c.pretrain_epochs, c.planned_epochs)]
            w.writerow([c.loss, c.repr, c.eval, c.runs, c.failed, len(c.incomplete_runs), len(c.missing_runs),
                        c.status, *stats, backbone, c.data, *epochs, eval_epochs])


def plot(cells: Sequence[Cell], path: Path) -> bool:
    """Grouped bar chart: one group per (eval, repr), one bar per loss (and per setting, where the
    rows of a cell differ in settings), error bars = sample std. Rows with no run in the means: no bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[report] no results.png: matplotlib is missing (pip install 'byol[plot]')", file=sys.stderr)
        return False
    shown = [c for c in cells if c.runs]
    groups = list(dict.fromkeys((c.eval, c.repr) for c in cells))
    # the settings that tell rows of one cell apart name the bars
    texts = {id(c): dict(zip(("backbone", "pretrain epochs", "eval epochs"), _settings_text(c), strict=True),
                         data=c.data) for c in shown}
    varying = [k for k in ("backbone", "data", "pretrain epochs", "eval epochs")
               if any(len({texts[id(c)][k] for c in shown if (c.loss, c.repr, c.eval) == t}) > 1
                      for t in {(c.loss, c.repr, c.eval) for c in shown})]

    def series(c: Cell) -> str:
        extra = ", ".join(f"{k} {texts[id(c)][k]}" for k in varying)
        return f"{c.loss} ({extra})" if extra else c.loss

    names = list(dict.fromkeys(series(c) for c in shown))
    by_key = {(series(c), c.eval, c.repr): c for c in shown}
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.0))
    for i, name in enumerate(names):
        heights, errors = [], []
        for e, r in groups:
            m, s = mean_std(by_key[(name, e, r)].test if (name, e, r) in by_key else [])
            heights.append(0.0 if math.isnan(m) else 100 * m)
            errors.append(0.0 if math.isnan(s) else 100 * s)
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{e}\n{r}" for e, r in groups])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    if names:
        ax.legend(title="pretraining loss", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(folders: Sequence[str | Path], out: str | Path,
           allow_incomplete: bool | None = None) -> list[Cell]:
    """Write results.md / results.csv / results.png into ``out`` and return the rows.

    ``allow_incomplete``: count the results of unfinished pretraining runs in the means (in rows of
    their own); None: as each results.json says (evaluate.py's ``allow_incomplete``).
    """
    paths = find_results(folders)
    if not paths:
        raise SystemExit(f"error: no results.json under {', '.join(map(str, folders))}; run evaluate.py "
                         f"first")
    cells = build_cells(load_results(paths), allow_incomplete)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(cells, len(paths))
    (out / "results.md").write_text(text, encoding="utf-8")
    write_csv(cells, out / "results.csv")
    plotted = plot(cells, out / "results.png")
    print(text)
    written = [out / "results.md", out / "results.csv"] + ([out / "results.png"] if plotted else [])
    print(f"[report] wrote {', '.join(map(str, written))}")
    return cells


def newest_eval_sweep(outputs: Path = Path("outputs")) -> Path | None:
    root = outputs / "multirun" / "eval"
    if not root.is_dir():
        return None
    sweeps = [d for d in root.iterdir() if d.is_dir() and any(d.rglob("results.json"))]
    return max(sweeps, key=lambda d: d.stat().st_mtime) if sweeps else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m byol.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="folders to scan for results.json (default: the newest "
                        "evaluation sweep under outputs/multirun/eval)")
    parser.add_argument("--out", help="where to write results.md/.csv/.png (default: the first folder)")
    parser.add_argument("--allow-incomplete", action=argparse.BooleanOptionalAction, default=None,
                        help="count (--no-allow-incomplete: do not count) the results of pretraining runs "
                        "that did not finish their epochs in the means, in rows of their own (default: as "
                        "each results.json says, i.e. evaluate.py's allow_incomplete)")
    args = parser.parse_args(argv)
    folders = args.folders
    if not folders:
        newest = newest_eval_sweep()
        if newest is None:
            raise SystemExit("error: no evaluation sweep under outputs/multirun/eval; name folders to scan")
        print(f"[report] newest evaluation sweep: {newest}")
        folders = [newest]
    first = Path(folders[0])
    report(folders, args.out or (first if first.is_dir() else first.parent), args.allow_incomplete)


if __name__ == "__main__":
    main()
