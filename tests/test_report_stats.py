"""The report's statistics checked by hand on crafted results.json files: one value per seed in the means,
rows in numeric order of epochs, a table no name can break, p-values that claim nothing the seeds cannot
give, and paired lines that say which rows they compare."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from test_report import write

from byol.jobs.report import markdown, write_csv
from byol.jobs.report_cells import build_cells, md_cell
from byol.jobs.report_files import load_results
from byol.jobs.report_paired import markdown_lines, paired_comparisons, spread_rule_p, t_test_p
from byol.jobs.report_paired import write_csv as write_paired_csv
from byol.jobs.report_plot import _series, group_of, slots, split_protocols


def _cells(folder: Path):
    return build_cells(load_results(sorted(folder.rglob("results.json"))))


def _markdown(folder: Path) -> str:
    """results.md as ``python -m byol.report`` writes it (without its figures: seconds of imports per test)."""
    cells = _cells(folder)
    return markdown(cells, len(list(folder.rglob("results.json"))), paired=paired_comparisons(cells))


def _columns(line: str) -> list[str]:
    """The cells of a markdown table row as a GFM renderer splits it: at each pipe no backslash escapes."""
    cells, current, escaped = [], "", False
    for ch in line.strip()[1:-1]:
        if ch == "|" and not escaped:
            cells.append(current)
            current = ""
        else:
            current += ch
        escaped = ch == "\\" and not escaped
    return [*cells, current]


def _row(md: str, start: str) -> str:
    (line,) = [line for line in md.splitlines() if line.startswith(start)]
    return line


def test_a_seed_evaluated_twice_is_one_run_in_the_mean_the_std_the_csv_and_the_figure(tmp_path):
    """Two sweeps over the same runs put seed 0 twice in a row: it was counted as two runs (4 runs of 3 seeds,
    seed 0 weighing double, the spread shrunk by a pseudo-replicate)."""
    for seed, t in enumerate((0.50, 0.60, 0.70)):
        write(tmp_path / "first", f"c{seed}", "classic", "avgpool", "knn", t, val=t, seed=seed)
    write(tmp_path / "again", "c0", "classic", "avgpool", "knn", 0.90, val=0.80, seed=0)
    md = _markdown(tmp_path)
    # mean 66.67 (not 67.50), sample std 5.77 over the 3 seeds (not 17.08 over 4 results)
    row = _row(md, "| classic | avgpool | knn |")
    assert row.startswith("| classic | avgpool | knn | 66.67 ± 5.77 | 65.00 ± 5.00 | 3 | 0 |")
    assert "**repeated seeds**: seed 0 (2 results), each averaged into one run" in row
    (cell,) = [c for c in _cells(tmp_path) if c.test]
    assert cell.test_by_seed == pytest.approx([0.70, 0.60, 0.70])  # seed 0: (0.50 + 0.90) / 2
    assert cell.val_by_seed == pytest.approx([0.65, 0.60, 0.70])
    assert (cell.runs, cell.repeated_seeds) == (3, {0: 2})
    write_csv(_cells(tmp_path), tmp_path / "results.csv")
    (line,) = csv.DictReader(open(tmp_path / "results.csv"))
    assert (line["runs"], line["test_acc_mean_pct"], line["test_acc_std_pct"]) == ("3", "66.6667", "5.7735")
    cells = _cells(tmp_path)  # the figure's bar: its height and error bar
    split = split_protocols(cells)
    (bar,) = slots(_series(cells, split), list(dict.fromkeys(group_of(c, split) for c in cells)), cells)
    assert (round(bar.mean, 4), round(bar.std, 4), bar.runs) == (66.6667, 5.7735, 3)


def test_rows_follow_epochs_in_numeric_order(tmp_path):
    """Epochs were sorted as text: fine-tuning for 10 and 20 epochs came before 5, 10 pretraining epochs before 5."""
    for epochs in (20, 5, 10):
        write(tmp_path, f"ft{epochs}", "classic", "avgpool", "finetune", 0.5, eval_epochs=epochs)
    for epochs in (10, 5):
        write(tmp_path, f"knn{epochs}", "classic", "avgpool", "knn", 0.5, pretrain_epochs=epochs)
    rows = [(c.eval, c.eval_epochs, c.pretrain_epochs) for c in _cells(tmp_path) if c.test]
    assert rows == [("finetune", 5, 5), ("finetune", 10, 5), ("finetune", 20, 5), ("knn", 0, 5), ("knn", 0, 10)]


def test_a_pipe_or_a_line_break_in_a_name_never_breaks_the_table(tmp_path):
    write(tmp_path, "a", "cla|ssic", "avgpool", "knn", 0.5)
    write(tmp_path, "b", "multi\nx", "avgpool", "knn", 0.6, pretrained="/runs/with|pipe")
    write(tmp_path, "c", "multi", "combined", "knn", status="failed", error="bad | thing\nsecond line")
    write(tmp_path, "d", "back\\|slash", "avgpool", "knn", 0.7)  # a backslash before the pipe would undo \|
    write(tmp_path, "e", "classic", "combined", "linear", status="missing", error="no\nmodel | here",
          pretrained="/runs/x|y\nz")
    md = _markdown(tmp_path)
    table = md.split("\n\n")[2].splitlines()
    # header, rule, the 4 kNN rows, the other 3 expected kNN cells (classic, multi x avgpool, combined: "c" holds
    # one), the 4 expected linear cells (one holds "e")
    assert len(table) == 2 + 4 + 3 + 4
    assert all(line.startswith("|") and len(_columns(line)) == 13 for line in table)
    assert "| cla\\|ssic | avgpool | knn | 50.00 |" in md and "| multi x | avgpool | knn | 60.00 |" in md
    assert "| back\\\\\\|slash | avgpool | knn | 70.00 |" in md  # back\\\|slash: a backslash, then an escaped |
    assert "**failed**: bad \\| thing second line |" in md
    assert "- /runs/x\\|y z: no model \\| here" in md  # the list of missing runs: one line each
    assert md_cell("a\r\nb|c") == "a b\\|c"


def test_differences_that_are_all_equal_have_no_p_value(tmp_path):
    """Two seeds both +1/64 (a test set of 64 images), or three +5 points equal but for float rounding: the
    t statistic is infinite, and "<0.001" claimed a certainty that two or three seeds cannot give."""
    for seed in (0, 1):
        write(tmp_path / "q", f"c{seed}", "classic", "avgpool", "knn", 0.5 + seed / 64, seed=seed)
        write(tmp_path / "q", f"m{seed}", "multi", "avgpool", "knn", 0.5 + (seed + 1) / 64, seed=seed)
    for seed in (0, 1, 2):
        write(tmp_path / "r", f"c{seed}", "classic", "avgpool", "knn", 0.5 + seed / 10, seed=seed)
        write(tmp_path / "r", f"m{seed}", "multi", "avgpool", "knn", 0.55 + seed / 10, seed=seed)
    for folder in ("q", "r"):
        (pair,) = paired_comparisons(_cells(tmp_path / folder))
        assert 0 < max(pair.diffs) - min(pair.diffs) < 1e-15 or len(set(pair.diffs)) == 1
        assert math.isnan(pair.p_value)
        (line,) = [x for x in markdown_lines([pair]) if x.startswith("| avgpool")]
        assert line.endswith(" | no | n/a |") and "<0.001" not in line
    assert t_test_p([0.05, 0.06, 0.07]) == pytest.approx(0.0091326, abs=1e-7)  # a spread: the t-test as before


def test_the_section_says_how_much_beyond_the_spread_and_p_can_say_on_few_seeds(tmp_path):
    """On 3 seeds "beyond the spread" is weaker than p < 0.05, and p is per line: the section says both."""
    # two rows of equal std s whose means differ by 2s: unpaired t = sqrt(2n), 2n - 2 degrees of freedom
    expected = {2: 0.183503, 3: 0.070484, 4: 0.030020, 7: 0.002813}  # scipy.stats.ttest_ind_from_stats
    assert {n: round(spread_rule_p(n), 6) for n in expected} == expected
    for seed, (c, m, r) in enumerate([(0.50, 0.55, 0.40), (0.60, 0.62, 0.42), (0.70, 0.80, 0.44)]):
        write(tmp_path, f"c{seed}", "classic", "avgpool", "knn", c, seed=seed)
        write(tmp_path, f"m{seed}", "multi", "avgpool", "knn", m, seed=seed)
        write(tmp_path, f"r{seed}", "random-init", "avgpool", "knn", r, seed=seed, pretrain_epochs=0)
    text = "\n".join(markdown_lines(paired_comparisons(_cells(tmp_path))))
    assert ("a rule of thumb, not a test: on 3 seeds, a gap of exactly that size between rows of equal spread has "
            "p 0.070 in an unpaired t-test (weaker than p < 0.05)") in text
    assert "no correction for multiple comparisons (3 lines here)" in text


def test_paired_lines_say_which_pretraining_length_they_compare(tmp_path):
    """Runs of 10 and 25 pretraining epochs in one report gave two identical-looking "multi − classic" lines."""
    for seed in (0, 1, 2):
        for epochs in (10, 25):
            write(tmp_path, f"c{seed}_{epochs}", "classic", "avgpool", "knn", 0.50 + seed / 10 + epochs / 1000
                  + seed * seed / 100, seed=seed, pretrain_epochs=epochs)
            write(tmp_path, f"m{seed}_{epochs}", "multi", "avgpool", "knn", 0.55 + seed / 10 + epochs / 1000,
                  seed=seed, pretrain_epochs=epochs)
    pairs = paired_comparisons(_cells(tmp_path))
    labels = [_columns(x)[3].strip() for x in markdown_lines(pairs) if x.startswith("| avgpool")]
    assert labels == ["multi − classic (pretrain epochs 10)", "multi − classic (pretrain epochs 25)"]
    write_paired_csv(pairs, tmp_path / "paired.csv")
    rows = list(csv.DictReader(open(tmp_path / "paired.csv")))
    assert [r["pretrain_epochs"] for r in rows] == ["10", "25"]
    assert [r["diffs_pts"] for r in rows] == ["5.0000 4.0000 1.0000"] * 2


def test_the_overlay_gives_seeds_their_line_styles_in_numeric_order():
    """Seed labels are text ("seed 10"): line styles and drawing order follow the numbers (2 before 10)."""
    from byol.jobs.curves import natural_order

    labels = ["seed 10", "seed 2", "seed ?", "seed 1"]
    assert sorted(labels, key=natural_order) == ["seed 1", "seed 2", "seed 10", "seed ?"]


def test_the_seeds_column_names_the_runs_of_each_mean(tmp_path):
    """Two rows of 3 runs each may be over different seeds; the table and the CSV name them, so that a reader can
    tell a like-for-like comparison (the same seeds) from one that is not. Seeds in numeric order, each once."""
    for i, seed in enumerate((10, 2, 0, 1, 2)):  # seed 2 twice (two sweeps), 10 after 2
        write(tmp_path / f"sweep{i}", f"c{seed}", "classic", "avgpool", "knn", 0.5, seed=seed)
    for seed in (4, 6):
        write(tmp_path, f"m{seed}", "multi", "avgpool", "knn", 0.6, seed=seed)
    write(tmp_path, "m_unknown", "multi", "avgpool", "knn", 0.6, seed=None)  # an older result without one
    write(tmp_path, "m_linear", "multi", "avgpool", "linear", 0.6, seed=0)  # classic's linear cell: expected
    md = _markdown(tmp_path)
    header = _columns(_row(md, "| loss |"))
    assert [c.strip() for c in header][-1] == "seeds"
    assert _columns(_row(md, "| classic | avgpool | knn |"))[-1].strip() == "0-2, 10"
    assert _columns(_row(md, "| multi | avgpool | knn |"))[-1].strip() == "4, 6, unknown"
    assert _columns(_row(md, "| classic | avgpool | linear |"))[-1].strip() == ""  # a missing cell: no seeds
    write_csv(_cells(tmp_path), tmp_path / "results.csv")
    rows = {(r["loss"], r["eval"]): r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert rows[("classic", "knn")]["seeds"] == "0 1 2 10" and rows[("classic", "knn")]["runs"] == "4"
    assert rows[("multi", "knn")]["seeds"] == "4 6 unknown" and rows[("classic", "linear")]["seeds"] == ""
