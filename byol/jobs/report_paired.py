"""Paired comparisons for the results report: two rows compared seed by seed.

A pretraining seed fixes a run's initial weights and its data order, and the random-init baseline of
the same seed is that run's starting encoder; so the runs of one seed under two losses (or a loss and
its starting point) differ only by what is compared. Differences taken seed by seed cancel the part
of the spread that the seed causes, which is how the report can say whether a gap is steady.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from byol.jobs.report_cells import BASELINE, Cell, by_seed, csv_row, md_cell, mean_std, seed_order
from byol.jobs.report_files import write_file

# (a, b): each line of the section reads "a - b"
COMPARISONS = (("multi", "classic"), ("classic", BASELINE), ("multi", BASELINE))
MIN_SEEDS = 2  # a spread needs two
# a spread of the per-seed differences below this (fractions) is rounding, not a spread: accuracies are counts over
# test sets of far fewer than 10^9 images, so two equal differences can differ only in their last bits
NO_SPREAD = 1e-9
# what two rows must share to be compared; it also groups the section's lines
SAME_EVALUATION = ("repr", "eval", "eval_epochs", "backbone", "eval_data", "eval_settings", "taps")


@dataclass
class Paired:
    """Row ``a`` against row ``b`` on the seeds both have (test accuracy, fractions)."""

    a: Cell
    b: Cell
    seeds: list
    a_values: list[float]
    b_values: list[float]

    @property
    def diffs(self) -> list[float]:
        return [x - y for x, y in zip(self.a_values, self.b_values, strict=True)]

    @property
    def ahead(self) -> int:
        """Seeds on which ``a`` scores higher."""
        return sum(d > 0 for d in self.diffs)

    @property
    def beyond_spread(self) -> bool:
        """The difference of the means exceeds the two rows' standard deviations added (over the shared
        seeds). A rule of thumb, not a test, and a weak one on few seeds (:func:`spread_rule_p`)."""
        (ma, sa), (mb, sb) = mean_std(self.a_values), mean_std(self.b_values)
        return abs(ma - mb) > sa + sb

    @property
    def p_value(self) -> float:
        """The paired t-test's two-sided p-value for the per-seed differences (:func:`t_test_p`)."""
        return t_test_p(self.diffs)


def t_test_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test: is the mean per-seed difference non-zero? t = mean / (std /
    sqrt(n)) with n - 1 degrees of freedom (:func:`student_p`). NaN for fewer than two differences, and
    for differences all equal (std 0, or below :data:`NO_SPREAD`: float rounding): t is then undefined or
    infinite, and a p of 0 ("<0.001") would claim a certainty that two or three seeds, equal perhaps only
    because the accuracies are counts over a small test set, cannot give."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean, std = mean_std(diffs)
    if std < NO_SPREAD:
        return math.nan
    return student_p(abs(mean) / (std / math.sqrt(n)), n - 1)


def spread_rule_p(n: int) -> float:
    """What "beyond the spread" amounts to on ``n`` seeds: the two-sided p of an unpaired t-test (2n - 2 degrees of
    freedom) for two rows of equal std s whose means differ by exactly 2s, the rule's threshold (t = sqrt(2n)):
    0.18 on 2 seeds, 0.07 on 3, 0.03 on 4, 0.003 on 7: weaker than p < 0.05 below 4 seeds, stricter from 4."""
    return student_p(math.sqrt(2 * n), 2 * n - 2)


def student_p(t: float, dof: int) -> float:
    """Two-sided tail probability P(|T| > t) of Student's t with ``dof`` (whole) degrees of freedom, in the closed
    form that integer degrees of freedom allow (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(abs(t) / math.sqrt(dof))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if dof % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), dof - 2 terms in all
        for k in range(1, (dof - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        inside = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if dof > 1 else 0.0))
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        for k in range(1, dof // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        inside = math.sin(theta) * total
    return min(1.0, max(0.0, 1.0 - inside))


def _comparable(a: Cell, b: Cell) -> bool:
    """Same representation, protocol, architecture, evaluation data and epochs; two pretrained rows
    also need the same pretraining data and epochs (random init has none)."""
    same = all(getattr(a, k) == getattr(b, k) for k in SAME_EVALUATION)
    if BASELINE not in (a.loss, b.loss):
        same = same and a.pretrain_data == b.pretrain_data and a.pretrain_epochs == b.pretrain_epochs and \
            _beside_the_loss(a.trained) == _beside_the_loss(b.trained)
    return same and a.counted and b.counted and not a.incomplete and not b.incomplete


def _beside_the_loss(trained: str | None) -> dict | None:
    """A row's trained settings other than the loss's (its taps and weights are what two losses differ in)."""
    if trained is None:
        return None
    return {k: v for k, v in json.loads(trained).items() if not k.startswith("loss.")}


def _group(cell: Cell) -> tuple:
    """The cells one comparison may join (:data:`SAME_EVALUATION`, as text: eval_data is a dict)."""
    return tuple(str(getattr(cell, k)) for k in SAME_EVALUATION)


def paired_comparisons(cells: Sequence[Cell]) -> list[Paired]:
    """Every :data:`COMPARISONS` pair of comparable rows sharing at least :data:`MIN_SEEDS` seeds, in the
    order of the table, one group of rows (e.g. fine-tuning for 5 epochs on avgpool) after another."""
    first_row: dict = {}
    for i, cell in enumerate(cells):
        first_row.setdefault(_group(cell), i)
    found = []
    for a in cells:
        for b in cells:
            if (a.loss, b.loss) not in COMPARISONS or not _comparable(a, b):
                continue
            va, vb = by_seed(a.test, a.seeds), by_seed(b.test, b.seeds)
            seeds = sorted((s for s in va if s in vb), key=seed_order)
            if len(seeds) >= MIN_SEEDS:
                found.append(((first_row[_group(a)], COMPARISONS.index((a.loss, b.loss))),
                              Paired(a, b, seeds, [va[s] for s in seeds], [vb[s] for s in seeds])))
    return [p for _, p in sorted(found, key=lambda f: f[0])]


def _points(values: Sequence[float]) -> tuple[float, float]:
    m, s = mean_std(values)
    return 100 * m, 100 * s


def _signed(m: float, s: float) -> str:
    return f"{m:+.2f}" + ("" if math.isnan(s) else f" ± {s:.2f}")


def _intro(pairs: Sequence[Paired]) -> str:
    """What the columns mean, and how much a "yes" or a small p can say on this many seeds."""
    fewest = min(len(p.seeds) for p in pairs)
    rule = spread_rule_p(fewest)
    on = f"on {fewest} seeds" if all(len(p.seeds) == fewest for p in pairs) else f"on the fewest seeds here, {fewest}"
    return ("Each line compares two rows of the table on the seeds both have (a seed fixes the initial weights "
            "and the data order; the random-init baseline of a seed is that seed's starting encoder). "
            "Δ: the per-seed differences a − b in points, mean ± sample std; ahead: the seeds on which a "
            "scores higher; a, b: each row's mean ± sample std on those seeds; beyond the spread: |mean of a − "
            "mean of b| is larger than the two rows' standard deviations added, a rule of thumb, not a test: "
            f"{on}, a gap of exactly that size between rows of equal spread has p {_p_text(rule)} in an unpaired "
            f"t-test ({'weaker' if rule > 0.05 else 'stricter'} than p < 0.05); p: two-sided paired t-test of "
            "the differences (n − 1 degrees of freedom), which assumes them normally distributed (a few seeds "
            f"cannot show that), one line at a time, with no correction for multiple comparisons ({len(pairs)} "
            f"line{'s' * (len(pairs) != 1)} here); few "
            "seeds give large p even for steady gaps; n/a: the differences are all equal, no spread to judge "
            "them by.")


# the settings a line's rows may differ in from another line of the same cell and comparison, as the table names
# them; paired.csv ends with them (spaces as underscores), in this order
SETTINGS_COLUMNS = ("backbone", "data", "pretrain epochs", "settings")


def _settings(p: Paired) -> dict:
    """The values of :data:`SETTINGS_COLUMNS` for a line, as its row ``a`` has them."""
    return dict(zip(SETTINGS_COLUMNS, (p.a.backbone, p.a.data, p.a.pretrain_epochs, p.a.variant), strict=True))


def _labels(pairs: Sequence[Paired]) -> list[str]:
    """``a − b`` for each line, with the settings that tell it apart from the other lines of its cell (two
    pretraining lengths, backbones or datasets in one report), as the table's columns name them."""
    same = {}
    for p in pairs:
        same.setdefault((_group(p.a), p.a.loss, p.b.loss), []).append(_settings(p))
    labels = []
    for p in pairs:
        others = same[(_group(p.a), p.a.loss, p.b.loss)]
        varying = [k for k in _settings(p) if len({str(o[k]) for o in others}) > 1]
        extra = ", ".join(f"{k} {_settings(p)[k]}" for k in varying)
        labels.append(f"{p.a.loss} − {p.b.loss}" + (f" ({extra})" if extra else ""))
    return labels


def markdown_lines(pairs: Sequence[Paired]) -> list[str]:
    """The report's section: one line per comparison, in points (percentage points of test accuracy)."""
    if not pairs:
        return []
    lines = ["", "## Paired by seed", "", _intro(pairs), "",
             "| repr | eval | eval epochs | a − b | Δ (points) | ahead | a | b | beyond the spread | p |",
             "|" + "---|" * 10]
    for p, label in zip(pairs, _labels(pairs), strict=True):
        a, b = (f"{m:.2f} ± {s:.2f}" for m, s in (_points(p.a_values), _points(p.b_values)))
        row = [p.a.repr, p.a.eval, p.a.eval_epochs, label, _signed(*_points(p.diffs)), f"{p.ahead} of {len(p.seeds)}",
               a, b, "yes" if p.beyond_spread else "no", _p_text(p.p_value)]
        lines.append("| " + " | ".join(map(md_cell, row)) + " |")
    return lines


def _p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def write_csv(pairs: Sequence[Paired], path: Path) -> None:
    """``paired.csv``: the section's lines, with the seeds and the per-seed differences (points)."""
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["repr", "eval", "eval_epochs", "a", "b", "seeds", "diff_mean_pts", "diff_std_pts", "ahead",
                "a_mean_pct", "b_mean_pct", "beyond_spread", "p_paired_t", "diffs_pts",
                *(k.replace(" ", "_") for k in SETTINGS_COLUMNS)])
    for p in pairs:
        (dm, ds), (am, _), (bm, _) = _points(p.diffs), _points(p.a_values), _points(p.b_values)
        w.writerow(csv_row([p.a.repr, p.a.eval, p.a.eval_epochs, p.a.loss, p.b.loss, " ".join(map(str, p.seeds)),
                    f"{dm:.4f}", f"{ds:.4f}", p.ahead, f"{am:.4f}", f"{bm:.4f}", p.beyond_spread,
                    f"{p.p_value:.4g}", " ".join(f"{100 * d:.4f}" for d in p.diffs), *_settings(p).values()]))
    # temporary file + rename: a symbolic link at paired.csv is replaced, never written through
    write_file(path, f.getvalue())
