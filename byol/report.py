"""Results table of an evaluation sweep: ``python -m byol.report [FOLDER ...] [--out DIR]``.

Scans the folders for ``results.json`` (written by ``evaluate.py``), groups them into cells
(loss x repr x eval), and writes ``results.md``, ``results.csv`` and ``results.png`` (a
grouped bar chart). Each cell shows the mean ± sample standard deviation (n - 1) over runs
(seeds) of the test and validation accuracy, the number of runs and of failed runs. The 8
cells of the study (classic/multi x avgpool/combined x linear/finetune) are always listed,
marked ``missing`` when no result exists, so a gap in a sweep cannot go unnoticed; the
random-init baseline and other protocols (kNN) are listed when present.
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
    """All results of one (loss, repr, eval) combination."""

    loss: str
    repr: str
    eval: str
    test: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    backbones: set[str] = field(default_factory=set)
    pretrain_epochs: set = field(default_factory=set)
    eval_epochs: set = field(default_factory=set)

    @property
    def runs(self) -> int:
        return len(self.test)

    @property
    def status(self) -> str:
        if self.runs:
            return "ok"
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
        r["_path"] = str(path)
        results.append(r)
    return results


def _order(value: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(value), "") if value in known else (len(known), str(value))


def build_cells(results: Iterable[dict]) -> list[Cell]:
    """Cells keyed by (loss, repr, eval): the 8 expected ones first, then baselines and others."""
    cells = {key: Cell(*key) for key in EXPECTED}
    for r in results:
        key = (str(r.get("loss")), str(r.get("repr")), str(r.get("eval")))
        cell = cells.setdefault(key, Cell(*key))
        if r.get("status") == "ok" and r.get("test_acc") is not None:
            cell.test.append(float(r["test_acc"]))
            if r.get("val_acc") is not None:
                cell.val.append(float(r["val_acc"]))
        else:
            cell.failed += 1
            cell.errors.append(str(r.get("error", "no error recorded")))
        if r.get("backbone"):
            cell.backbones.add(f"{r['backbone']}/{r.get('stem')}")
        for attr, k in (("pretrain_epochs", "pretrain_epochs"), ("eval_epochs", "eval_epochs")):
            if r.get(k) is not None:
                getattr(cell, attr).add(r[k])
    return sorted(cells.values(), key=lambda c: (_order(c.eval, EVALS + ("knn",)), _order(c.repr, REPRS),
                                                   _order(c.loss, LOSSES + (BASELINE,))))


def _pct(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "–"
    return f"{100 * m:.2f}" if math.isnan(s) else f"{100 * m:.2f} ± {100 * s:.2f}"


def _joined(values) -> str:
    return ", ".join(str(v) for v in sorted(values, key=str))


def _note(cell: Cell) -> str:
    if cell.status == "missing":
        return "**missing**"
    if cell.status == "failed":
        return f"**failed**: {cell.errors[0][:120]}"
    if cell.failed:
        return f"{cell.failed} failed"
    return "baseline" if cell.loss == BASELINE else ""


MD_COLUMNS = ("loss", "repr", "eval", "test acc", "val acc", "runs", "failed", "backbone", "pretrain epochs",
              "eval epochs", "note")


def markdown(cells: Sequence[Cell], n_files: int) -> str:
    missing = [c for c in cells if c.status == "missing"]
    failed = [c for c in cells if c.status == "failed"]
    lines = [
        "# Results",
        "",
        f"{n_files} results.json files. Accuracy in %, mean ± sample std (n - 1) over runs (seeds); "
        f"validation selected nothing (final epoch).",
        "",
        "| " + " | ".join(MD_COLUMNS) + " |",
        "|" + "---|" * len(MD_COLUMNS),
    ]
    for c in cells:
        row = [c.loss, c.repr, c.eval, _pct(c.test), _pct(c.val), c.runs, c.failed, _joined(c.backbones),
               _joined(c.pretrain_epochs), _joined(c.eval_epochs), _note(c)]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    lines.append("")
    if missing:
        lines.append(f"Missing cells ({len(missing)} of {len(EXPECTED)} expected): "
                     + ", ".join(f"{c.loss}/{c.repr}/{c.eval}" for c in missing) + ".")
    if failed:
        lines.append("Failed cells (no successful run): "
                     + ", ".join(f"{c.loss}/{c.repr}/{c.eval}" for c in failed) + ".")
    if not missing and not failed:
        lines.append(f"All {len(EXPECTED)} expected cells have results.")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["loss", "repr", "eval", "runs", "failed", "status", "test_acc_mean", "test_acc_std",
              "val_acc_mean", "val_acc_std", "backbone", "pretrain_epochs", "eval_epochs"]


def write_csv(cells: Sequence[Cell], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for c in cells:
            tm, ts = mean_std(c.test)
            vm, vs = mean_std(c.val)
            stats = ["" if math.isnan(v) else f"{v:.6f}" for v in (tm, ts, vm, vs)]
            w.writerow([c.loss, c.repr, c.eval, c.runs, c.failed, c.status, *stats, _joined(c.backbones),
                        _joined(c.pretrain_epochs), _joined(c.eval_epochs)])


def plot(cells: Sequence[Cell], path: Path) -> bool:
    """Grouped bar chart: one group per (eval, repr), one bar per loss, error bars = sample std."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[report] no results.png: matplotlib is missing (pip install 'byol[plot]')", file=sys.stderr)
        return False
    groups = list(dict.fromkeys((c.eval, c.repr) for c in cells))
    losses = list(dict.fromkeys(c.loss for c in cells))
    by_key = {(c.loss, c.repr, c.eval): c for c in cells}
    width = 0.8 / max(1, len(losses))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.0))
    for i, loss in enumerate(losses):
        heights, errors = [], []
        for e, r in groups:
            m, s = mean_std(by_key[(loss, r, e)].test if (loss, r, e) in by_key else [])
            heights.append(0.0 if math.isnan(m) else 100 * m)
            errors.append(0.0 if math.isnan(s) else 100 * s)
        xs = [g + (i - (len(losses) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=loss)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{e}\n{r}" for e, r in groups])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(title="pretraining loss", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(folders: Sequence[str | Path], out: str | Path) -> list[Cell]:
    """Write results.md / results.csv / results.png into ``out`` and return the cells."""
    paths = find_results(folders)
    if not paths:
        raise SystemExit(f"error: no results.json under {', '.join(map(str, folders))}; run evaluate.py "
                         f"first")
    cells = build_cells(load_results(paths))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(cells, len(paths))
    (out / "results.md").write_text(text)
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
    args = parser.parse_args(argv)
    folders = args.folders
    if not folders:
        newest = newest_eval_sweep()
        if newest is None:
            raise SystemExit("error: no evaluation sweep under outputs/multirun/eval; name folders to scan")
        print(f"[report] newest evaluation sweep: {newest}")
        folders = [newest]
    first = Path(folders[0])
    report(folders, args.out or (first if first.is_dir() else first.parent))


if __name__ == "__main__":
    main()
