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
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from byol.jobs.figures import escaped, literal_text, pyplot, save_png

CURVES_FILE = "curves.png"
# the largest value (or epoch) a figure draws: beyond it an axis' span or its ticks overflow a float
# (-1e308 and 1e308 on one axis: "arange: cannot compute length"), and an accuracy in % (x 100) is inf
MAX_DRAWN = 1e300


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(epoch, value), ...]}``: epoch-end values at their epoch (1 = after the first),
    per-step values at their fraction of an epoch, the random-init kNN at 0."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and cut_short(path):  # its last row ends mid-value (a copy cut short): "0.8" of "0.83" is no value
        rows.pop()
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


def cut_short(path: Path) -> bool:
    """Whether ``path`` ends inside a row: the CSV logger ends each row with a newline."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) not in (b"\n", b"\r")


def trained_epochs(series: dict[str, list[tuple[float, float]]]) -> float:
    """The last epoch a panel has a value at (0 when only the random-init kNN was logged)."""
    drawn = tuple(prefix for _, prefix, _, _ in PANELS)
    return max([0.0, *(x for key, points in series.items() if key.startswith(drawn) for x, _ in points)])


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
LEARNING_RATE = "lr-"
SKIPPED = "train/skipped_steps"  # per epoch, with train.on_nonfinite=skip: marked in the loss panel
REPRESENTATION_PANELS = ("train/loss/", "monitor/knn/", "monitor/probe/", COLLAPSE)  # a curve per representation
PARAMETER_GROUPS = {1: "weights", 2: "biases & BN"}  # Lightning's pg1, pg2: the groups of byol.core.optim.param_groups


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
    panels (an overlay has one for the whole figure). A representation keeps one colour in every panel
    (a style without one), and every panel spans the same epochs: the panels are read side by side."""
    colours = representation_colours(runs)
    spans = [_panel(ax, panel, runs, taps, legends, colours) for ax, panel in zip(axes.flat, PANELS, strict=True)]
    drawn = [x for xs in spans for x in xs]
    for ax, xs in zip(axes.flat, spans, strict=True):
        if xs:
            _epoch_axis(ax, min([0.0, *drawn]), max(drawn))


def representation_colours(runs: Sequence[tuple[str, dict, dict]]) -> dict[str, str]:
    """``{representation: colour}`` over every panel: avgpool, combined, then the blocks in natural order
    (each panel cycling its own colours gave layer2.0 green in one panel and orange in the next)."""
    names = {key.split("/")[-1].removesuffix("_step") for _, series, _ in runs for key in series
             if key.startswith(REPRESENTATION_PANELS)}
    order = sorted(names, key=lambda n: (n != "avgpool", n != "combined", natural_order(n)))
    return {name: f"C{i % 10}" for i, name in enumerate(order)}


def _epoch_axis(ax, low: float, high: float) -> None:
    """The epochs drawn in every panel, whole epochs as ticks: each one up to 12 epochs (a run of one epoch
    was ticked 0.48, 0.54 ... 1.02), whole numbers chosen by matplotlib beyond."""
    from matplotlib.ticker import MaxNLocator

    pad = max(0.03 * (high - low), 0.05)
    ax.set_xlim(low - pad, high + pad)
    if high - low <= 12:
        ax.set_xticks(range(math.floor(low), math.ceil(high) + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _panel(ax, panel: tuple, runs: Sequence[tuple[str, dict, dict]], taps: bool, legends: bool,
           colours: dict[str, str]) -> list[float]:
    """One panel's curves, title, labels and legend; returns the epochs it drew at."""
    title, prefix, ylabel, percent = panel
    drawn, left_out, at, heights = False, 0, [], []
    for label, series, style in runs:
        keys = [k for k in series if k.startswith(prefix) and "_step" not in k and not k.endswith("seconds")]
        left_out += max(0, len(keys) - MAX_LINES)
        for name, points in _curves(series, keys[:MAX_LINES], prefix):
            if not taps and name.startswith("layer"):
                continue
            xs, ys = zip(*points, strict=True)
            at += xs
            ys = [100 * y for y in ys] if percent else ys
            heights += ys
            colour = {} if "color" in style or name not in colours else {"color": colours[name]}
            # markers on every point of a short run, on about 15 of a long one's
            ax.plot(xs, ys, label=f"{label}{name}" if label or len(runs) == 1 else name, **style, **colour,
                    marker=MARKERS.get(name, "^" if name.startswith("layer") else "o"),
                    markevery=max(1, len(xs) // 15), markersize=3.5)
            drawn = True
    ax.set_title(title + (f" ({left_out} more not drawn)" if left_out else ""), fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    _y_axis(ax, prefix, heights)
    ax.grid(alpha=0.3)
    if drawn and legends:
        ax.legend(fontsize=7, ncol=1 if len(runs) == 1 else 2)
    elif not drawn:
        why = "not logged\n(monitor=off, or data without labels)" if prefix.startswith("monitor/") else "not logged"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="grey")
    return at


def _curves(series: dict, keys: Sequence[str], prefix: str) -> list[tuple[str, list]]:
    """(name, points) of each curve a panel draws for one run: a run of one or two epochs by its logged steps,
    not a dot; learning rates of parameter groups on one schedule once, named by all of them."""
    curves: list[tuple[str, list]] = []
    for key in keys:
        points = series[key]
        if len(points) < 3 and len(series.get(key + "_step", ())) > len(points):
            points = series[key + "_step"]
        if prefix != LEARNING_RATE:
            curves.append((key[len(prefix):] or key.rsplit("/", 1)[-1], points))
            continue
        optimizer, group = rate_name(key)
        same = next((i for i, (name, p) in enumerate(curves) if p == points and name.startswith(optimizer)), None)
        if same is None:
            curves.append((f"{optimizer}: {group}", points))
        else:
            curves[same] = (f"{curves[same][0]} and {group}", points)
    return curves


def rate_name(key: str) -> tuple[str, str]:
    """(optimizer, parameter group) of a learning-rate column in words: Lightning's ``lr-LARS/pg1`` is the
    weights of :func:`byol.core.optim.param_groups`, ``pg2`` its biases and normalisation parameters."""
    optimizer, _, group = key.removeprefix(LEARNING_RATE).partition("/")
    number = group.removeprefix("pg")
    if not group:
        return optimizer, "all parameters"
    if not number.isdecimal():
        return optimizer, group
    return optimizer, PARAMETER_GROUPS.get(int(number), f"parameter group {number}")


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


def skipped_steps(series: dict[str, list[tuple[float, float]]]) -> list[tuple[float, int]]:
    """(epoch, steps) of the epochs in which ``train.on_nonfinite=skip`` skipped non-finite steps: their points
    stand on fewer steps (an epoch with every step skipped has none, and its gap needs a reason)."""
    return [(x, int(y)) for x, y in series.get(SKIPPED, []) if y > 0]


def mark_skipped_steps(ax, skipped: list[tuple[float, int]]) -> None:
    """A red dotted line at each epoch of :func:`skipped_steps` in the loss panel, in its legend."""
    total = sum(n for _, n in skipped)
    for i, (epoch, _) in enumerate(skipped):
        ax.axvline(epoch, color="red", linestyle=":", alpha=0.6,
                   label=f"non-finite steps skipped ({total} in {len(skipped)} epochs)" if i == 0 else None)
    if skipped:
        ax.legend(fontsize=7)


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
            series = drawable(read_metrics(metrics))
            _draw(axes, [("", series, {})])
            mark_skipped_steps(axes.flat[0], skipped_steps(series))
            fig.suptitle(f"{escaped(run_dir.name)}: learning curves (metrics.csv)", fontsize=11)
            _save(fig, run_dir / CURVES_FILE)
        finally:
            plt.close(fig)
    return run_dir / CURVES_FILE


def natural_order(text: str) -> list:
    """A sort key that reads the numbers in ``text`` as numbers: "seed 2" before "seed 10"."""
    return [(0, int(part), "") if part.isdecimal() else (1, 0, part) for part in re.split(r"(\d+)", text)]
