"""The rows of the results report: ``results.json`` files read and grouped into cells.

A cell is one (loss, repr, eval) combination under one set of settings (backbone and stem,
pretraining and evaluation data, pretraining and evaluation epochs): results whose settings differ
are never averaged together. Each study loss x representation x protocol that the results hold is
present, empty when no result exists, so that a gap in a sweep shows up in the table and the figure;
a loss, representation or protocol nobody ran is no gap.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from byol.jobs.report_labels import BASELINE, label_data, label_variants

LOSSES = ("classic", "multi")
REPRS = ("avgpool", "combined")
EVALS = ("linear", "finetune")
EVAL_ORDER = (*EVALS, "knn")  # the table's order of protocols
NO_ACCURACY = ("embed",)  # protocols that score nothing (t-SNE maps): listed under the table, not in it
# status of a results.json written before its model was evaluated: still running, or killed before the end
RUNNING = "running"
RUNNING_TEXT = "running or stopped before writing a result"


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
    seeds: list = field(default_factory=list)  # the pretraining (or random-init) seed of each test accuracy
    val: list[float] = field(default_factory=list)
    val_seeds: list = field(default_factory=list)  # the seed of each validation accuracy
    num_classes: set[int] = field(default_factory=set)  # as its results record it: the chance level
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    incomplete_runs: list[dict] = field(default_factory=list)
    missing_runs: list[dict] = field(default_factory=list)
    running_runs: list[dict] = field(default_factory=list)  # evaluations with no result yet: not failures
    n_results: int = 0                  # results.json files in this row (0: an expected cell with none)
    data: str = ""                      # how the data settings read in the table (set by build_cells)
    # canonical JSON (None: unknown): the run's other trained settings (optimizer, heads...), the protocol's
    # settings (probe lr, cached features, k...) and the representation's taps
    trained: str | None = None
    eval_settings: str | None = None
    taps: str | None = None
    variant: str = ""                   # those of them that differ between rows, as text (set by build_cells)

    @property
    def key(self) -> tuple:
        return (self.loss, self.repr, self.eval, self.backbone, self.pretrain_data, self.eval_data,
                self.pretrain_epochs, self.planned_epochs, self.eval_epochs, self.incomplete, self.counted,
                self.trained, self.eval_settings, self.taps)

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.loss, self.repr, self.eval

    @property
    def test_by_seed(self) -> list[float]:
        """The test accuracies the mean and std are taken over: one per seed (:func:`seed_means`)."""
        return seed_means(self.test, self.seeds)

    @property
    def val_by_seed(self) -> list[float]:
        return seed_means(self.val, self.val_seeds)

    @property
    def repeated_seeds(self) -> dict:
        """Seed -> number of results, for the seeds with more than one result in this row."""
        counts = Counter(s for s in self.seeds if s is not None)
        return {s: n for s, n in sorted(counts.items(), key=lambda item: seed_order(item[0])) if n > 1}

    @property
    def runs(self) -> int:
        """Runs in the means: one per seed (two results of one seed are one run)."""
        return len(self.test_by_seed) if self.counted else 0

    @property
    def status(self) -> str:
        if self.test:
            return "incomplete" if self.incomplete else "ok"
        return "failed" if self.failed else "missing"  # running evaluations alone: no result yet, missing


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is NaN for fewer than two values."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def seed_means(values: Sequence[float], seeds: Sequence) -> list[float]:
    """One value per seed, in order of appearance: the results of one seed averaged. The spread is the seed-to-seed
    spread, and a seed evaluated twice (two sweeps over the same runs) is one run, not two samples of it; a
    result with no seed recorded counts as a run of its own."""
    return [statistics.fmean(g) for g in _seed_groups(values, seeds).values()]


def by_seed(values: Sequence[float], seeds: Sequence) -> dict:
    """{seed: the mean of its values} for the values whose seed is recorded, as :func:`seed_means` counts them."""
    return {key: statistics.fmean(g) for (kind, key), g in _seed_groups(values, seeds).items() if kind == "seed"}


def _seed_groups(values: Sequence[float], seeds: Sequence) -> dict:
    groups: dict = {}
    for i, (value, seed) in enumerate(zip(values, seeds, strict=True)):
        groups.setdefault(("seed", seed) if seed is not None else ("unknown", i), []).append(value)
    return groups


def seed_order(seed) -> tuple:
    """Integer seeds in numeric order (2 before 10), any others after them as text."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def seeds_text(seeds: Sequence, ranges: bool = False) -> str:
    """The seeds of a row's results, each once, in :func:`seed_order`: which runs a mean is over, so that two
    rows can be seen to share their seeds. Space-separated (``0 1 2``, for the CSV), or with ``ranges`` as a
    reader writes them (``0-2, 5``); a result with no seed recorded is ``unknown``."""
    known = sorted({s if type(s) is int else str(s) for s in seeds if s is not None}, key=seed_order)
    unknown = ["unknown"] * (None in seeds)
    if not ranges:
        return " ".join(map(str, [*known, *unknown]))
    parts, i = [], 0
    while i < len(known):
        j = i  # known[i..j]: consecutive integers
        while isinstance(known[i], int) and j + 1 < len(known) and known[j + 1] == known[j] + 1:
            j += 1
        parts.append(f"{known[i]}-{known[j]}" if j > i + 1 else ", ".join(map(str, known[i:j + 1])))
        i = j + 1
    return ", ".join([*parts, *unknown])


def _number_order(value) -> tuple:
    """Epochs in numeric order (5 before 10), unknown (None) last."""
    return (0, value) if isinstance(value, int | float) else (1, 0)


def md_cell(value) -> str:
    """``value`` as the text of one markdown table cell or list line: a line break would end the row, a ``|``
    would start a new column (escaped as ``\\|``, with any backslashes before it doubled so that the escape
    holds), and a ``<`` that opens an HTML tag (a name from a handed results.json) would be rendered as one."""
    text = " ".join(str(value).splitlines())
    text = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)
    return re.sub(r"(\\*)\|", lambda m: m.group(1) * 2 + "\\|", text)


def csv_row(values) -> list:
    """``values`` as a CSV row that a spreadsheet reads as data: text starting like a formula (``=``, ``+``,
    ``-``, ``@``, a tab, a carriage return: a name from a handed results.json) gets a leading ``'``;
    numbers, and text made of numbers (``-0.5000``, ``-1.2 0.4``), are kept."""
    return [f"'{v}" if isinstance(v, str) and v[:1] in FORMULA_STARTS and not _numbers(v) else v for v in values]


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _numbers(text: str) -> bool:
    words = text.split()
    try:
        [float(w) for w in words]
    except ValueError:
        return False
    return bool(words)


def _order(value: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(value), "") if value in known else (len(known), str(value))


def result_status(r: dict) -> str:
    """``ok``, ``failed``, ``missing`` (a training job with no model) or ``running`` (an evaluation that has
    not written its result: in progress, or killed). A results.json written before ``status`` existed is
    finished when it has a test accuracy."""
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
    width = f" x{float(r['width']):g}" if r.get("width") not in (None, 1, 1.0) else ""  # absent: width 1
    return {"backbone": f"{r['backbone']}{width}/{r.get('stem')}" if r.get("backbone") else None,
            "pretrain_data": _canonical(r.get("pretrain_data")), "eval_data": _canonical(eval_data),
            "pretrain_epochs": r.get("pretrain_epochs"),
            "planned_epochs": r.get("pretrain_epochs_planned") if incomplete else None,
            "eval_epochs": r.get("eval_epochs"), "incomplete": incomplete,
            "trained": _canonical(r.get("trained")), "eval_settings": _canonical(r.get("eval_settings")),
            "taps": json.dumps(r["taps"]) if isinstance(r.get("taps"), list) else None}


def _run_name(r: dict) -> str:
    """The run's label, else its folder's name (``pretrained`` is a weights file or a job folder)."""
    if r.get("label"):
        return str(r["label"])
    path = Path(str(r.get("pretrained")))
    if path.suffix in (".pt", ".ckpt"):
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path.name


def _triple(r: dict) -> tuple[str, str, str]:
    return str(r.get("loss")), str(r.get("repr")), str(r.get("eval"))


def _matches(cell: Cell, triple: tuple, settings: dict) -> bool:
    """Whether a result without accuracies (failed, missing) belongs to ``cell``: same loss / repr /
    eval, and each setting it knows equal to the cell's."""
    if cell.triple != triple or not cell.n_results:
        return False
    return all(v is None or getattr(cell, k) == v for k, v in settings.items() if k != "incomplete")


def _add_finished(cells: dict[tuple, Cell], r: dict, allow_incomplete: bool | None) -> None:
    """Put a result with accuracies into the row of its settings (a new row if none has them)."""
    settings = _settings(r)
    counted = not settings["incomplete"] or bool(
        r.get("allow_incomplete", False) if allow_incomplete is None else allow_incomplete)
    cell = Cell(*_triple(r), counted=counted, **settings)
    cell = cells.setdefault(cell.key, cell)
    cell.n_results += 1
    cell.test.append(float(r["test_acc"]))
    cell.seeds.append(r.get("seed"))
    if r.get("val_acc") is not None:
        cell.val.append(float(r["val_acc"]))
        cell.val_seeds.append(r.get("seed"))
    if isinstance(r.get("num_classes"), int) and r["num_classes"] > 0:
        cell.num_classes.add(r["num_classes"])
    if cell.incomplete:
        cell.incomplete_runs.append({"name": _run_name(r), "done": r.get("pretrain_epochs"),
                                     "planned": r.get("pretrain_epochs_planned"), "path": r.get("pretrained")})


def _add_unfinished(cells: dict[tuple, Cell], r: dict, status: str) -> None:
    """Count a failed, missing or running result in the row whose settings it matches (preferring finished
    runs' rows), else in a row of its own. A running one is listed, never counted as failed: its evaluation
    has not ended (or was killed), which says nothing of the method."""
    triple, settings = _triple(r), _settings(r)
    candidates = sorted((c for c in cells.values() if _matches(c, triple, settings)), key=lambda c: c.incomplete)
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
    elif status == RUNNING:
        folder = Path(r["_path"]).parent if r.get("_path") else r.get("pretrained")  # where it writes
        cell.running_runs.append({"name": _run_name(r), "path": str(folder)})
    else:
        cell.failed += 1
        cell.errors.append(str(r.get("error", "no error recorded")))


def expected_cells(triples: Iterable[tuple[str, str, str]]) -> list[tuple]:
    """The cells a report expects, from the (loss, repr, eval) of the results it holds: each study loss
    (:data:`LOSSES`; the baseline is a reference, not a cell of the study) with each representation and each
    scored protocol that occur somewhere. A combination whose three parts all occur but which has no result
    is a gap (a job of the sweep that died); one that was never asked for is not."""
    triples = list(triples)
    losses = [loss for loss in LOSSES if any(t[0] == loss for t in triples)]
    reprs = sorted({t[1] for t in triples}, key=lambda r: _order(r, REPRS))
    evals = sorted({t[2] for t in triples if t[2] not in NO_ACCURACY}, key=lambda e: _order(e, EVAL_ORDER))
    return [(loss, r, e) for e in evals for r in reprs for loss in losses]


def build_cells(results: Iterable[dict], allow_incomplete: bool | None = None) -> list[Cell]:
    """Rows keyed by (loss, repr, eval) and settings: the expected cells first (:func:`expected_cells`),
    then baselines and others.

    ``allow_incomplete``: whether the results of unfinished pretraining runs enter the means; None:
    as each results.json says (evaluate.py's ``allow_incomplete``). They stay in rows of their own.
    Failed, missing and running results join the row of their cell whose settings they match.
    """
    results = [r for r in results if r.get("eval") not in NO_ACCURACY]
    cells: dict[tuple, Cell] = {}
    for r in results:
        if result_status(r) == "ok":
            _add_finished(cells, r, allow_incomplete)
    for r in results:
        if result_status(r) != "ok":
            _add_unfinished(cells, r, result_status(r))
    present = {c.triple for c in cells.values()}
    for triple in expected_cells(_triple(r) for r in results):
        if triple not in present:
            cells[triple] = Cell(*triple)
    label_data(cells.values())
    label_variants(cells.values())
    return sorted(cells.values(), key=lambda c: (
        _order(c.eval, EVAL_ORDER), _order(c.repr, REPRS), _order(c.loss, LOSSES + (BASELINE,)),
        str(c.backbone), c.data, c.incomplete, _number_order(c.pretrain_epochs), _number_order(c.eval_epochs)))


def unscored_results(results: Iterable[dict]) -> list[dict]:
    """The results of protocols with no accuracy (``eval=embed``): never a row, never failed for lack of one."""
    return [r for r in results if r.get("eval") in NO_ACCURACY]


def cell_states(cells: Sequence[Cell]) -> dict[tuple, str]:
    """(loss, repr, eval) -> ``ok`` (some row has runs in its means), ``failed``, ``incomplete`` (only
    results of unfinished runs, not counted) or ``missing``."""
    rank = {"missing": 0, "incomplete": 1, "failed": 2, "ok": 3}
    states = {}
    for c in cells:
        state = shown_state(c)
        if c.triple not in states or rank[state] > rank[states[c.triple]]:
            states[c.triple] = state
    return states


def shown_state(cell: Cell) -> str:
    """Why a row has no accuracy to show: ``missing``, ``failed`` or ``incomplete`` (its runs did not
    finish pretraining and are not counted); ``ok`` when it has one."""
    if cell.runs:
        return "ok"
    return "failed" if cell.failed else "incomplete" if cell.test else "missing"


def or_unknown(value) -> str:
    return "?" if value is None else str(value)


def settings_text(c: Cell) -> tuple[str, str, str]:
    """backbone, pretrain epochs, eval epochs as the table shows them (blank for an empty cell)."""
    if not c.n_results:
        return "", "", ""
    epochs = f"{or_unknown(c.pretrain_epochs)} of {or_unknown(c.planned_epochs)}" if c.incomplete else \
        or_unknown(c.pretrain_epochs)
    return or_unknown(c.backbone), epochs, or_unknown(c.eval_epochs)


def _no_val_split(cell: Cell) -> bool:
    """Whether the row's evaluations held no validation images out (``split.val_size=0``)."""
    try:
        return json.loads(cell.eval_data or "{}").get("val_size") == 0
    except (ValueError, AttributeError):
        return False


def accuracy_text(cell: Cell, values: Sequence[float], digits: int, val: bool = False) -> tuple[str, str]:
    """Mean and sample std in percent of ``values`` (one per seed: :attr:`Cell.test_by_seed`), as text (std
    blank for one run). A row with no run in the means
    says why in place of the mean, so that no blank can be misread: ``missing``, ``failed`` or
    ``incomplete``; ``not recorded`` where runs exist but this accuracy was not saved (``no val split`` for
    the validation accuracy of evaluations that held none out)."""
    if not cell.runs:
        return shown_state(cell), ""
    m, s = mean_std(values)
    if math.isnan(m):
        return ("no val split" if val and _no_val_split(cell) else "not recorded"), ""
    return f"{100 * m:.{digits}f}", "" if math.isnan(s) else f"{100 * s:.{digits}f}"
