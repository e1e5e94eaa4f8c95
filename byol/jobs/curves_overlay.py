"""The overlay of a sweep's learning curves (``curves.png`` of ``python -m byol.report``): every run in one figure.

Colour: the run's loss and the settings that differ between the runs (``optim.base_lr=0.5``, from each run's
overrides: two learning rates of one loss were one colour and one legend entry); line style: the seed. A run
that failed or has no weights is drawn as far as its metrics.csv goes, its end marked and its key entry saying
why; a run that cannot be drawn is named with the reason, on stderr and under the title, whose count is the
runs drawn. matplotlib is imported only when the figure is drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from byol.jobs import curves
from byol.jobs.curves import MARKERS, cut_short, natural_order, read_metrics, trained_epochs, undrawable
from byol.jobs.figures import escaped, literal_text, pyplot
from byol.jobs.report_files import why_unreadable

PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:grey")  # classic blue, multi orange where the loss is all that varies, as before
# seven distinguishable dash patterns: solid, dashed, dotted, dash-dot, long dash, dash-dot-dot, dense dots
DASHES = ("-", "--", ":", "-.", (0, (8, 2)), (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)))
SHOWN_LEFT_OUT = 3  # runs named under the title; the rest are counted (stderr names each)


@dataclass
class OverlayRun:
    """A run to overlay: ``settings`` are its overrides (``{"optim.base_lr": "0.5"}``), ``status`` why it
    has no final weights ("" for a finished run)."""

    loss: str
    seed: str
    folder: Path
    settings: dict[str, str] = field(default_factory=dict)
    status: str = ""


@dataclass
class Drawn:
    """A run as drawn: its series, its colour group (``loss=classic, optim.base_lr=0.5``) and what its key
    entry says about it (failed, cut short), if anything."""

    run: OverlayRun
    series: dict
    group: str = ""
    notes: list[tuple[str, str]] = field(default_factory=list)  # (in its key entry, in the title and on stderr)


def readable_runs(runs: Sequence[OverlayRun], figure: str) -> tuple[list[Drawn], list[tuple[Path, str]]]:
    """The runs whose metrics.csv reads and can be drawn, and (folder, why) of each other run, each also one
    ``[report] note:`` (no metrics.csv, not UTF-8, not CSV, a value too large to draw). A run drawn with a
    caveat (failed, its file cut short, nothing after epoch 0) gets a note too."""
    read, left_out = [], []
    for run in runs:
        metrics = Path(run.folder) / "metrics.csv"
        if not metrics.is_file():
            why = "no metrics.csv: it stopped before logging" if run.status else "no metrics.csv"
            series = {}
        else:
            try:
                series = read_metrics(metrics)
                why = undrawable(series)
            except Exception as e:  # the file is data from whoever wrote it: any failure leaves this run out
                series, why = {}, why_unreadable(e, "CSV")
        if why is not None:
            left_out.append((Path(run.folder), why))
            print(escaped(f"[report] note: {metrics} left out of {figure} ({why})"), file=sys.stderr)
            continue
        notes = _caveats(run, series, cut_short(metrics))
        if notes:
            said = "; ".join(long for _, long in notes)
            print(escaped(f"[report] note: {Path(run.folder).name} in {figure}: {said}"), file=sys.stderr)
        read.append(Drawn(run, series, notes=notes))
    return read, left_out


def _caveats(run: OverlayRun, series: dict, cut: bool) -> list[tuple[str, str]]:
    """(short, long) of what a reader must know about a drawn run's curve: no final weights (failed, still
    training), a file cut short, nothing logged after epoch 0; and where a curve so marked ends."""
    notes = []
    if run.status:
        short = next((word for word in ("failed", "still training", "no weights") if word in run.status), "partial")
        notes.append((short, run.status))
    if cut:
        notes.append(("metrics.csv cut short", "metrics.csv cut short mid-row: its last row left out"))
    epochs = trained_epochs(series)
    if epochs == 0:
        notes.append(("nothing after epoch 0", "nothing logged after epoch 0 (only the random-init kNN)"))
    elif notes:
        notes.append((f"ends at epoch {epochs:g}", f"drawn to epoch {epochs:g}"))
    return notes


def varying_settings(runs: Sequence[OverlayRun]) -> list[str]:
    """The settings whose value differs between ``runs``, in the order the runs name them; the seed is the
    line style and the loss is always named, so neither is listed. Runs alike in all of them are told apart
    by folder (``run``)."""
    keys = dict.fromkeys(k for r in runs for k in r.settings if k not in ("seed", "loss"))
    varying = [k for k in keys if len({r.settings.get(k) for r in runs}) > 1]
    seen = {(r.loss, r.seed, *(r.settings.get(k) for k in varying)) for r in runs}
    return varying + ["run"] * (len(seen) < len(runs))


def _groups(drawn: Sequence[Drawn], varying: Sequence[str]) -> dict[str, str]:
    """``{colour group: colour}``, and each run's ``group`` set: the loss and the settings that vary."""
    for d in drawn:
        values = {**d.run.settings, "run": Path(d.run.folder).name}
        d.group = ", ".join([f"loss={d.run.loss}", *(f"{k}={values.get(k, 'default')}" for k in varying)])
    order = sorted({(d.run.loss, d.group) for d in drawn},
                   key=lambda g: (["classic", "multi"].index(g[0]) if g[0] in ("classic", "multi") else 2,
                                  natural_order(g[1])))
    return {group: PALETTE[i % len(PALETTE)] for i, (_, group) in enumerate(order)}


def _key_legend(fig, colours: dict[str, str], styles: dict[str, object], drawn: Sequence[Drawn]) -> None:
    """One legend for the overlay, below the panels: colour = loss and settings (a run drawn with a caveat named
    in its entry: ``[seed 1: failed, ends at epoch 2]``), line style = seed, marker = representation, X = where
    such a run's curve ends (20 entries per panel would cover the curves)."""
    from matplotlib.lines import Line2D

    marked = {group: "; ".join(f"{d.run.seed}: {', '.join(short for short, _ in d.notes)}"
                               for d in drawn if d.group == group and d.notes) for group in colours}
    handles = [Line2D([], [], color=colour, linewidth=3, label=group + (f" [{marked[group]}]" if marked[group] else ""))
               for group, colour in colours.items()]
    handles += [Line2D([], [], color="black", linestyle=style, label=seed) for seed, style in styles.items()]
    handles += [Line2D([], [], color="black", marker=marker, linestyle="none", label=name)
                for name, marker in MARKERS.items()]
    if any(marked.values()):
        handles.append(Line2D([], [], color="black", marker="X", markersize=8, linestyle="none",
                              label="end of a partial curve"))
    labels = [h.get_label() for h in handles]
    fig.legend(handles=handles, loc="outside lower center", ncol=legend_columns(labels), fontsize=9, frameon=False)


def legend_columns(labels: Sequence[str], width: int = 190) -> int:
    """The most columns whose entries fit ``width`` characters side by side (a legend fills column by column,
    each as wide as its widest entry): one row where they fit, never past the figure's edge."""
    for columns in range(len(labels), 1, -1):
        rows = -(-len(labels) // columns)
        if sum(max(len(t) + 6 for t in labels[i:i + rows]) for i in range(0, len(labels), rows)) <= width:
            return columns
    return 1


def _mark_ends(axes, label: str) -> None:
    """An X at the last point of each curve of a run drawn with a caveat: where its curve stops."""
    for ax in axes.flat:
        for line in list(ax.get_lines()):
            if line.get_label().startswith(label) and len(line.get_xdata()):
                ax.plot(line.get_xdata()[-1:], line.get_ydata()[-1:], marker="X", markersize=8,
                        color=line.get_color(), linestyle="none")


def clipped(text: str, limit: int = 90) -> str:
    """``text`` cut at a word before ``limit`` characters, "..." saying so (a title line stays on the figure)."""
    return text if len(text) <= limit else text[:limit - 3].rsplit(" ", 1)[0] + "..."


def _title(title: str | None, drawn: Sequence[Drawn], varying: Sequence[str],
           left_out: Sequence[tuple[Path, str]]) -> str:
    """What the figure shows, counting the runs drawn, then a line naming the runs drawn with a caveat and one
    naming the runs left out, each with why."""
    colour, n = ", ".join(["loss", *varying]), len(drawn)
    text = (f"{title + ': ' if title else ''}learning curves of {n} pretraining run{'s' * (n != 1)} (colour: {colour}, "
            f"line style: seed; each run's own curves.png also has every intermediate block)")
    partial = [(Path(d.run.folder), "; ".join(long for _, long in d.notes)) for d in drawn if d.notes]
    for runs, what in ((partial, "drawn as far as logged"), (left_out, "left out")):
        if runs:
            names = "; ".join(f"{folder.name} ({clipped(why)})" for folder, why in runs[:SHOWN_LEFT_OUT])
            hidden = len(runs) - SHOWN_LEFT_OUT
            more = f"; {hidden} more (see the report's notes)" if hidden > 0 else ""
            text += f"\n{len(runs)} run{'s' * (len(runs) != 1)} {what}: {names}{more}"
    return text


def overlay_curves(runs: Sequence[OverlayRun | tuple], path: Path, title: str | None = None) -> Path | None:
    """One figure with every run's curves (``runs``: :class:`OverlayRun`, or (loss, seed label, folder));
    a run whose metrics.csv cannot be read or drawn is left out and named (:func:`readable_runs`): one
    damaged file no longer costs the curves of every run. None when no run can be drawn."""
    runs = [r if isinstance(r, OverlayRun) else OverlayRun(*r) for r in runs]
    drawn, left_out = readable_runs(runs, Path(path).name)
    if not drawn:
        return None
    plt = pyplot()
    varying = varying_settings([d.run for d in drawn])
    colours = _groups(drawn, varying)
    seeds = sorted({d.run.seed for d in drawn}, key=natural_order)
    styles = {seed: DASHES[i % len(DASHES)] for i, seed in enumerate(seeds)}
    drawn = sorted(drawn, key=lambda d: (list(colours).index(d.group), natural_order(d.run.seed), str(d.run.folder)))
    lines = [(f"{d.group} {d.run.seed} ", d.series, {"color": colours[d.group], "linestyle": styles[d.run.seed]})
             for d in drawn]
    with literal_text():  # seeds, losses and settings come from the runs' files: drawn as written
        fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
        try:
            curves._draw(axes, lines, taps=False, legends=False)
            for d, (label, _, _) in zip(drawn, lines, strict=True):
                if d.notes:
                    _mark_ends(axes, label)
            fig.suptitle(_title(title, drawn, varying, left_out), fontsize=11)
            _key_legend(fig, colours, styles, drawn)
            curves._save(fig, Path(path))
        finally:
            plt.close(fig)
    return Path(path)
