"""Learning curves from a run's metrics.csv: ``curves.png`` in each run folder, and an overlay of a sweep.

One figure answers "is it learning?": the BYOL loss per head, the online kNN and linear-probe
accuracy per representation (the kNN curve starts at the random-init encoder, measured before the
first step), the collapse monitor, tau and the learning rate, against epochs. matplotlib is
imported only here, when a figure is drawn.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from byol.jobs.figures import escaped, literal_text, pyplot, save_png
from byol.jobs.report_files import why_unreadable

CURVES_FILE = "curves.png"
# the largest value (or epoch) a figure draws: beyond it an axis' span or its ticks overflow a float
# (-1e308 and 1e308 on one axis: "arange: cannot compute length"), and an accuracy in % (x 100) is inf
MAX_DRAWN = 1e300


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(epoch, value), ...]}``: epoch-end values at their epoch (1 = after the first),
    per-step values at their fraction of an epoch, the random-init kNN at 0."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    steps_per_epoch = _steps_per_epoch(rows)
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        step, epoch = _number(row.get("step")), _number(row.get("epoch"))
        for key, text in row.items():
            value = _number(text)
            if key in ("step", "epoch") or value is None:
                continue
            if key.endswith("_epoch") or key.startswith("monitor/"):
                x = 0.0 if key.startswith("monitor/") and step == 0 and epoch is None else (epoch or 0) + 1
            else:  # Lightning's step column counts from 0: step s ends after s + 1 optimizer steps
                x = ((step or 0) + 1) / steps_per_epoch
            series[key.removesuffix("_epoch")].append((x, value))
    return {k: sorted(v) for k, v in series.items()}


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _steps_per_epoch(rows: list[dict]) -> float:
    """Optimizer steps per epoch, from the rows that carry both (the last step of an epoch gives it)."""
    pairs = [(_number(r.get("epoch")), _number(r.get("step"))) for r in rows]
    ratios = [(step + 1) / (epoch + 1) for epoch, step in pairs if epoch is not None and step is not None
              and epoch + 1 > 0]  # an epoch of -1 (a hand-edited file) would divide by 0
    return max([1.0, *ratios])


COLLAPSE = "train/std/"  # its panel starts at 0, where collapse is: a fall toward it shows, noise looks flat
PANELS = (  # (title, metric prefix, y label, as percent)
    ("BYOL loss per head (lower is not better if std collapses)", "train/loss/", "loss", False),
    ("online kNN accuracy (epoch 0: random init)", "monitor/knn/", "test accuracy, %", True),
    ("online linear probe (training batches)", "monitor/probe/", "accuracy, %", True),
    ("collapse monitor: std of projections (0 = collapsed)", COLLAPSE, "std x sqrt(dim)", False),
    ("EMA tau", "train/tau", "tau", False),
    ("learning rate", "lr-", "lr", False),
)


# lines of one run in a panel at most: a run has a head per tap and block (18 for every block of a ResNet-50);
# a metrics.csv with thousands of columns (damaged, or crafted) would take minutes to draw at every epoch
MAX_LINES = 24
MARKERS = {"avgpool": "o", "combined": "s"}  # the intermediate blocks: "^"; an overlay tells them apart by it


def _fits(point: tuple[float, float]) -> bool:
    return abs(point[0]) <= MAX_DRAWN and abs(point[1]) <= MAX_DRAWN


def undrawable(series: dict[str, list[tuple[float, float]]]) -> str | None:
    """Why ``series`` cannot be drawn (the first value of a panel's metric beyond :data:`MAX_DRAWN`, named),
    or None; a column no panel draws does not count."""
    drawn = tuple(prefix for _, prefix, _, _ in PANELS)
    for key, points in series.items():
        if not key.startswith(drawn):
            continue
        for x, y in points:
            if not _fits((x, y)):
                return f"{key} = {y:g} at epoch {x:g}, beyond the ±{MAX_DRAWN:g} a figure can draw"
    return None


def drawable(series: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """``series`` without the points a figure cannot draw (:data:`MAX_DRAWN`): a run's own curves.png
    shows the rest (a loss that blew up to 1e308 stopped the figure, refreshed at every epoch)."""
    kept = {key: [p for p in points if _fits(p)] for key, points in series.items()}
    return {key: points for key, points in kept.items() if points}


def _draw(axes, runs: Sequence[tuple[str, dict, dict]], taps: bool = True, legends: bool = True) -> None:
    """``runs``: (label, series, line style) for each run; one panel per entry of :data:`PANELS`.
    ``taps=False`` leaves out the curves of single intermediate blocks (``layer2.0``...): an overlay of
    several runs stays readable with avgpool and combined alone. ``legends=False``: no legend in the
    panels (an overlay has one for the whole figure)."""
    from matplotlib.ticker import MaxNLocator

    for ax, (title, prefix, ylabel, percent) in zip(axes.flat, PANELS, strict=True):
        drawn, left_out, at, heights = False, 0, set(), []
        for label, series, style in runs:
            rates = []  # a run's learning rates drawn so far: parameter groups on one schedule are drawn once
            keys = [k for k in series if k.startswith(prefix) and "_step" not in k and not k.endswith("seconds")]
            left_out += max(0, len(keys) - MAX_LINES)
            for key in keys[:MAX_LINES]:
                points = series[key]
                if len(points) < 3 and len(series.get(key + "_step", ())) > len(points):
                    points = series[key + "_step"]  # a run of one or two epochs: its logged steps, not a dot
                if prefix == "lr-":
                    if points in rates:
                        continue
                    rates.append(points)
                name = key[len(prefix):] or key
                if not taps and name.startswith("layer"):
                    continue
                xs, ys = zip(*points, strict=True)
                at.update(xs)
                ys = [100 * y for y in ys] if percent else ys
                heights += ys
                # markers on every point of a short run, on about 15 of a long one's
                ax.plot(xs, ys, label=f"{label}{name}" if label or len(runs) == 1 else name, **style,
                        marker=MARKERS.get(name, "^" if name.startswith("layer") else "o"),
                        markevery=max(1, len(xs) // 15), markersize=3.5)
                drawn = True
        ax.set_title(title + (f" ({left_out} more not drawn)" if left_out else ""), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.2, 1.4 on a short run
        if len(at) == 1:  # one epoch's value: matplotlib would centre it on ticks 0.945 ... 1.050
            ax.set_xlim(0, max(at) + 0.5)
        ax.set_ylabel(ylabel)
        _y_axis(ax, prefix, heights)
        ax.grid(alpha=0.3)
        if drawn and legends:
            ax.legend(fontsize=7, ncol=1 if len(runs) == 1 else 2)
        elif not drawn:
            why = "not logged\n(monitor=off, or data without labels)" if prefix.startswith("monitor/") else "not logged"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="grey")


def _y_axis(ax, prefix: str, heights: list[float]) -> None:
    """Ticks in steps of 1, 2 or 5 (not 2.5: "0.8375" pushed the axis label out of the figure). The collapse
    monitor from 0 to 1 (or its largest value): autoscaled, a healthy 0.830-0.834 looked like a wild zig-zag.
    An empty panel has no ticks: matplotlib's 0-1 beside "accuracy, %" read as values."""
    from matplotlib.ticker import MaxNLocator

    if not heights:
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
    if prefix == COLLAPSE:
        ax.set_ylim(0, max(1.0, max(heights)))
    else:
        _flat_if_constant(ax, heights)


def _flat_if_constant(ax, heights: list[float]) -> None:
    """Draw values that differ only by rounding (a constant tau logged once as float32, once as float64:
    0.9599999785 and 0.96) as the constant they are: matplotlib would zoom into the 2e-8 between them
    and label the axis '1e-8+9.6e-1'."""
    if heights and max(heights) - min(heights) <= 1e-6 * max(abs(h) for h in heights):
        middle = (max(heights) + min(heights)) / 2
        half = 0.05 * abs(middle) or 1.0
        ax.set_ylim(middle - half, middle + half)


def _key_legend(fig, colours: dict[str, str], styles: dict[str, object]) -> None:
    """One legend for an overlay, below the panels: colour = loss, line style = seed, marker =
    representation (20 entries per panel for 10 runs would cover the curves)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, linewidth=3, label=f"loss={loss}") for loss, colour in colours.items()]
    handles += [Line2D([], [], color="black", linestyle=style, label=seed) for seed, style in styles.items()]
    handles += [Line2D([], [], color="black", marker=marker, linestyle="none", label=name)
                for name, marker in MARKERS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)


def _save(fig, path: Path) -> None:
    save_png(fig, path, dpi=110)  # atomic: a reader never sees half a PNG; a link at path is replaced


def write_curves(run_dir: Path) -> Path | None:
    """Draw ``run_dir/curves.png`` from ``run_dir/metrics.csv`` (None when there is nothing to draw)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return None
    plt = pyplot()
    # the folder's name and the metrics' names are drawn as written ("$" is no mathtext); the PNG replaces
    # a link at curves.png, never writes through it
    with literal_text():
        # fixed margins: a constrained layout would double the time of each refresh during training (0.6 s -> 0.3 s)
        fig, axes = plt.subplots(2, 3, figsize=(15, 8))
        try:
            fig.subplots_adjust(left=0.06, right=0.98, top=0.92, bottom=0.07, wspace=0.24, hspace=0.3)
            _draw(axes, [("", drawable(read_metrics(metrics)), {})])
            fig.suptitle(f"{escaped(run_dir.name)}: learning curves (metrics.csv)", fontsize=11)
            _save(fig, run_dir / CURVES_FILE)
        finally:
            plt.close(fig)
    return run_dir / CURVES_FILE


def natural_order(text: str) -> list:
    """A sort key that reads the numbers in ``text`` as numbers: "seed 2" before "seed 10"."""
    return [(0, int(part), "") if part.isdecimal() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def overlay_curves(runs: Sequence[tuple[str, str, Path]], path: Path, title: str) -> Path | None:
    """One figure with every run's curves: ``runs`` are (loss mode, seed label, run folder); colour by
    loss mode, line style by seed. A run whose metrics.csv cannot be read or drawn is left out with one
    note naming it (:func:`readable_runs`): one damaged file no longer costs the curves of every run."""
    runs = readable_runs(runs, Path(path).name)
    if not runs:
        return None
    plt = pyplot()
    colours = {"classic": "tab:blue", "multi": "tab:orange"}
    # seven distinguishable dash patterns: solid, dashed, dotted, dash-dot, long dash, dash-dot-dot, dense dots
    dashes = ["-", "--", ":", "-.", (0, (8, 2)), (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1))]
    seeds = sorted({seed for _, seed, _, _ in runs}, key=natural_order)
    styles = {seed: dashes[i % len(dashes)] for i, seed in enumerate(seeds)}
    drawn = [(f"{loss} {seed} ", series, {"color": colours.get(loss, "tab:grey"), "linestyle": styles[seed]})
             for loss, seed, folder, series in sorted(runs, key=lambda run: (run[0], natural_order(run[1]), run[2]))]
    with literal_text():  # seeds and losses come from the runs' files: drawn as written
        fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
        try:
            _draw(axes, drawn, taps=False, legends=False)
            fig.suptitle(f"{title} (each run's own curves.png also has every intermediate block)", fontsize=11)
            _key_legend(fig, {loss: colours.get(loss, "tab:grey") for loss, _, _, _ in sorted(runs)}, styles)
            _save(fig, Path(path))
        finally:
            plt.close(fig)
    return Path(path)


def readable_runs(runs: Sequence[tuple[str, str, Path]], figure: str) -> list[tuple[str, str, Path, dict]]:
    """(loss, seed, folder, series) of each run whose metrics.csv reads and can be drawn; each other run is
    one ``[report] note:`` naming its metrics.csv and why (not UTF-8, not CSV, a value too large to draw)."""
    read = []
    for loss, seed, folder in runs:
        metrics = Path(folder) / "metrics.csv"
        if not metrics.is_file():
            continue
        try:
            series = read_metrics(metrics)
            why = undrawable(series)
        except Exception as e:  # the file is data from whoever wrote it: any failure leaves this run out
            series, why = {}, why_unreadable(e, "CSV")
        if why is None:
            read.append((loss, seed, Path(folder), series))
        else:
            print(escaped(f"[report] note: {metrics} left out of {figure} ({why})"), file=sys.stderr)
    return read
