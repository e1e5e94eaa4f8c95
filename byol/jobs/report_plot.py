"""The figure of the results report (``results.png``): the test accuracy of each cell as grouped bars.

One group per (evaluation protocol, representation), and per number of evaluation epochs where a
protocol was run for several (fine-tuning for 1 and 5 epochs: two groups); one bar per pretraining loss
(and per setting where the rows of a cell differ), error bars = sample std over runs. A cell of the study with no
accuracy keeps its place, left empty and labelled with the loss and the reason (``multi: missing``,
``failed``, ``incomplete``): a zero-height bar would read as 0 %. The title says what was measured
(datasets, pretraining epochs, runs per bar), a dashed line marks chance (100 / number of classes)
and the y-axis is fitted to the values. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from byol.jobs.figures import escape_texts, escaped, literal_text, pyplot, save_png
from byol.jobs.report_cells import BASELINE, LOSSES, Cell, cell_states, mean_std, settings_text
from byol.jobs.report_labels import dataset_names

SETTINGS = ("backbone", "data", "pretrain epochs", "eval epochs", "settings")
EMPTY_REASONS = ("missing", "failed", "incomplete")  # a cell's state that explains an empty slot
SLOT_SPAN = 0.8  # of the 1.0 between groups


@dataclass
class Series:
    """The bars of one colour: the rows of one loss under one set of settings, by group (:func:`group_of`)."""

    name: str
    loss: str
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)


@dataclass
class Slot:
    """One place in a group: a bar (``mean`` set) or an empty place with the reason (``label``)."""

    series: int                # index of its series: the colour
    mean: float | None = None  # in %; None: no accuracy here
    std: float = 0.0           # in %; 0 for a single run
    runs: int = 0
    label: str = ""            # "multi: missing" (or failed, incomplete), for an empty place
    x: float = 0.0
    width: float = 0.0


def split_protocols(cells: Sequence[Cell]) -> set[str]:
    """Protocols run for several numbers of epochs: each length gets its own groups of bars, so that the
    colours keep meaning the pretraining loss."""
    shown = [c for c in cells if c.runs]
    return {e for e in {c.eval for c in shown} if len({settings_text(c)[2] for c in shown if c.eval == e}) > 1}


def group_of(cell: Cell, split: set[str]) -> tuple[str, str, str]:
    """(eval, repr, eval epochs where the protocol is split, else "")."""
    return cell.eval, cell.repr, settings_text(cell)[2] if cell.eval in split else ""


def _series(cells: Sequence[Cell], split: set[str]) -> list[Series]:
    """The series of the chart; the settings that tell rows of one group apart are added to their names.
    A loss with no accuracy anywhere still gets a series, so that its empty slots are labelled."""
    shown = [c for c in cells if c.runs]
    texts = {id(c): dict(zip(("backbone", "pretrain epochs", "eval epochs"), settings_text(c), strict=True),
                         data=c.data, settings=c.variant) for c in shown}
    key = {id(c): (c.loss, *group_of(c, split)) for c in shown}  # the rows that share one place
    varying = [k for k in SETTINGS
               if any(len({texts[id(c)][k] for c in shown if key[id(c)] == place}) > 1 for place in set(key.values()))]
    series: dict[str, Series] = {}
    for c in shown:
        extra = ", ".join(f"{k} {texts[id(c)][k]}" for k in varying)
        name = f"{c.loss} ({extra})" if extra else c.loss
        series.setdefault(name, Series(name, c.loss)).cells[group_of(c, split)] = c
    for c in cells:
        if not any(s.loss == c.loss for s in series.values()):
            series[c.loss] = Series(c.loss, c.loss)
    order = [*LOSSES, BASELINE]
    return sorted(series.values(), key=lambda s: order.index(s.loss) if s.loss in order else len(order))


def _runs_text(runs: Sequence[int]) -> str:
    low, high = min(runs), max(runs)
    return f"{low} run" if high == 1 else f"{low} runs" if low == high else f"{low}–{high} runs"


def figure_title(cells: Sequence[Cell]) -> str:
    """What the bars measure: datasets, pretraining epochs and runs per bar (seeds)."""
    shown = [c for c in cells if c.runs]
    if not shown:
        return "Test accuracy: no result with an accuracy yet"
    data = ", ".join(dataset_names(shown)) or "dataset not recorded"
    pretrained = [c for c in shown if c.loss != BASELINE]
    known = sorted({c.pretrain_epochs for c in pretrained if c.pretrain_epochs is not None},
                   key=lambda e: str(e).zfill(12))  # numbers in numeric order
    epochs = [str(e) for e in known] + ["?"] * any(c.pretrain_epochs is None for c in pretrained)
    pretraining = f"{' / '.join(epochs)} pretraining epochs" if epochs else "no pretraining"
    return (f"Test accuracy on {data}, {pretraining}, {_runs_text([c.runs for c in shown])} per bar\n"
            f"mean ± sample std over runs (seeds); an empty slot has no result, its label says why")


def chance_levels(cells: Sequence[Cell]) -> list[tuple[int, float]]:
    """(number of classes, chance accuracy in %) for each number of classes the results record."""
    classes = sorted({k for c in cells if c.runs for k in c.num_classes})
    return [(k, 100 / k) for k in classes]


def y_limits(points: Sequence[float], chance: Sequence[float] = ()) -> tuple[float, float]:
    """The y-axis in %: fitted to ``points`` (the bars' mean ± std) in steps of 5 from 0, room above for
    the value labels (up to 110: a bar at 100% keeps its label below the title; no tick is drawn above
    100); widened to a chance level that lies within one spread of the values (further away, it would
    squash the bars)."""
    if not points:
        return 0.0, 100.0
    low, high = min(points), max(points)
    spread = max(high - low, 5.0)
    near = [c for c in chance if low - spread <= c <= high + spread]
    low, high = min([low, *near]), max([high, *near])
    bottom = max(0.0, 5 * math.floor((low - max(2.0, 0.1 * (high - low))) / 5))
    top = min(110.0, 5 * math.ceil((high + max(3.0, 0.08 * (high - low))) / 5))
    return bottom, top


def slots(series: Sequence[Series], groups: Sequence[tuple[str, str, str]], cells: Sequence[Cell]) -> list[Slot]:
    """The places of each group, centred on it: a bar where a series has an accuracy, a labelled empty
    place where the study's cell has none (missing, failed, incomplete). A series with nothing to say
    in a group (the baseline beside finetune, say) takes no place there."""
    states = cell_states(cells)
    places: list[list[Slot]] = []
    for e, r, epochs in groups:
        places.append([])
        for i, s in enumerate(series):
            cell, state = s.cells.get((e, r, epochs)), states.get((s.loss, r, e))
            if cell is not None:
                m, sd = mean_std(cell.test_by_seed)
                places[-1].append(Slot(i, 100 * m, 0.0 if math.isnan(sd) else 100 * sd, cell.runs))
            elif state in EMPTY_REASONS:
                places[-1].append(Slot(i, label=f"{s.loss}: {state}"))
    width = SLOT_SPAN / max([1, *map(len, places)])
    for g, group in enumerate(places):
        for k, slot in enumerate(group):
            slot.x, slot.width = g + (k - (len(group) - 1) / 2) * width, width
    return [slot for group in places for slot in group]


def _draw_slots(ax, placed: Sequence[Slot], colors) -> None:
    """Each bar with its error bar and value; each empty place with the reason it is empty."""
    low, high = ax.get_ylim()
    runs_vary = len({s.runs for s in placed if s.mean is not None}) > 1
    for s in placed:
        if s.mean is None:
            ax.text(s.x, low + 0.02 * (high - low), s.label, rotation=90, ha="center", va="bottom", fontsize=9,
                    color=colors[s.series % len(colors)], fontweight="bold",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            continue
        ax.bar(s.x, s.mean, s.width, color=colors[s.series % len(colors)], edgecolor="white",
               yerr=s.std or None, capsize=3, ecolor="black")
        label = f"{s.mean:.1f}" + (f"\nn={s.runs}" if runs_vary else "")
        ax.text(s.x, s.mean + s.std + 0.01 * (high - low), label, ha="center", va="bottom", fontsize=7,
                clip_on=False)


def _legend(ax, series, colors, chance) -> None:
    """The series' colours, then the chance level (said to be off the axis when it is)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    low, high = ax.get_ylim()
    handles = [Patch(color=colors[i % len(colors)], label=s.name) for i, s in enumerate(series)]
    for k, level in chance:
        where = "" if low <= level <= high else " (below the axis)" if level < low else " (above the axis)"
        if not where:
            ax.axhline(level, color="gray", linestyle="--", linewidth=1, zorder=0)
        handles.append(Line2D([], [], color="gray", linestyle="--", label=f"chance, {k} classes: {level:.1f}%{where}"))
    ax.legend(handles=handles, title="pretraining loss", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title_fontsize=8, frameon=False)


def figure(cells: Sequence[Cell]):
    """The chart as a matplotlib Figure (the caller closes it); None without matplotlib. Its texts are made
    with mathtext and LaTeX off (the labels come from results.json files); save it inside
    :func:`byol.jobs.figures.literal_text` too, as :func:`plot` does, for the tick labels made when drawn."""
    plt = _pyplot()
    if plt is None:
        return None
    with literal_text():  # each text made here keeps parse_math / usetex off, wherever it is drawn
        return _chart(plt, cells)


def _chart(plt, cells: Sequence[Cell]):
    split = split_protocols(cells)
    series = _series(cells, split)
    groups = list(dict.fromkeys(group_of(c, split) for c in cells))
    lengths = {(e, r) for e, r, epochs in groups if epochs}  # a cell with no result has no length: shown in those
    groups = [g for g in groups if g[2] or g[:2] not in lengths]
    placed = slots(series, groups, cells)
    chance = chance_levels(cells)
    widest = round(SLOT_SPAN / placed[0].width) if placed else 1  # places in the fullest group
    legend_width = 2.6  # inches, right of the axes
    fig, ax = plt.subplots(figsize=(1.2 + len(groups) * max(1.3, 0.3 + 0.5 * widest) + legend_width, 4.8))
    bars = [s for s in placed if s.mean is not None]
    ax.set_ylim(*y_limits([v for s in bars for v in (s.mean - s.std, s.mean + s.std)],
                          [level for _, level in chance]))
    colors = plt.get_cmap("tab10").colors
    _draw_slots(ax, placed, colors)
    _legend(ax, series, colors, chance)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([escaped(f"{e}" + (f", {n} epoch{'s' * (n != '1')}" if n else "") + f"\n{r}")
                        for e, r, n in groups])
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_xlabel("evaluation protocol / representation")
    low, high = ax.get_ylim()
    ax.set_yticks([t for t in ax.get_yticks() if low <= t <= min(high, 100.0)])  # no accuracy above 100%
    ax.set_ylabel("test accuracy (%)" + (f"\naxis starts at {low:.0f}%, not 0" if low > 0 else ""))
    ax.set_title(figure_title(cells), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    escape_texts(fig)  # a name that is not UTF-8 (a "\\udcff" in a results.json) stopped the layout
    fig.tight_layout()
    return fig


def _pyplot():
    try:
        return pyplot()
    except ImportError:
        print("[report] no results.png: matplotlib is missing (pip install 'byol[plot]')", file=sys.stderr)
        return None


def plot(cells: Sequence[Cell], path: Path) -> bool:
    """Write the chart to ``path``; False (and a message) without matplotlib. Its text (losses, labels,
    data names from the results.json files) is drawn as written, never as mathtext or LaTeX; the PNG
    replaces a link at ``path``, never writes through it."""
    if _pyplot() is None:
        return False
    with literal_text():
        fig = figure(cells)
        try:
            save_png(fig, path, dpi=120, bbox_inches="tight")
        finally:
            _pyplot().close(fig)
    return True
