"""Two training loops (or any two sets of runs) compared seed by seed on the same evaluation.

The report (``python -m byol.report``) puts runs of the same settings in one row, so our runs and the
textbook loop's (``benchmarks/reference_byol.py``), both loss=classic, would be averaged together. This
script keeps them apart: each side is a list of evaluation sweep folders, one per seed
(``evaluate.py -m pretrained=RUN ... hydra.sweep.dir=DIR``); a run's seed is the one its results.json
records. It prints, per representation and protocol, both sides' test accuracy (mean ± sample std),
the differences a − b on the seeds both have, Welch's t-test over all runs and the paired t-test over
the shared seeds (scipy, which scikit-learn of the dev extra brings).

    python benchmarks/compare_ab.py --a outputs/lars_ab/eval_ours_seed{0,1,2} \\
        --b outputs/lars_ab/eval_ref_seed{0,1,2} --names ours "textbook loop"
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def test_accuracies(folders: list[str]) -> dict[tuple[str, str], dict[int, float]]:
    """(repr, eval) -> {seed: test accuracy in %} over the results.json files below ``folders``."""
    found: dict[tuple[str, str], dict[int, float]] = {}
    for folder in folders:
        files = sorted(Path(folder).rglob("results.json"))
        if not files:
            raise SystemExit(f"compare_ab: no results.json below {folder}: give evaluation sweep folders")
        for path in files:
            result = json.loads(path.read_text())
            if result.get("test_acc") is None or result.get("seed") is None:
                continue  # missing, failed, or a result without a seed: nothing to pair
            cell = found.setdefault((result["repr"], result["eval"]), {})
            if result["seed"] in cell:
                raise SystemExit(f"compare_ab: seed {result['seed']} twice for {result['repr']}/{result['eval']} "
                                 f"({path}): one folder per seed on each side")
            cell[result["seed"]] = 100 * result["test_acc"]
    return found


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def p_values(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """Welch's t-test over all runs of each side, the paired t-test over the shared seeds (nan: too few)."""
    from scipy import stats

    welch = paired = math.nan
    if len(a) > 1 and len(b) > 1:
        welch = float(stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).pvalue)
    shared = sorted(set(a) & set(b))
    if len(shared) > 1:
        paired = float(stats.ttest_rel([a[s] for s in shared], [b[s] for s in shared]).pvalue)
    return welch, paired


def table(a: dict, b: dict, names: tuple[str, str]) -> str:
    """The comparison as a markdown table, one row per (repr, eval) that both sides have."""
    lines = [f"| repr | eval | {names[0]} | {names[1]} | {names[0]} − {names[1]}, per seed | seeds | mean difference "
             "| Welch p | paired p |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(set(a) & set(b), key=lambda k: (k[1], k[0])):
        left, right = a[key], b[key]
        shared = sorted(set(left) & set(right))
        diffs = [left[s] - right[s] for s in shared]
        welch, paired = p_values(left, right)
        lines.append(f"| {key[0]} | {key[1]} | {mean_std(list(left.values()))} | {mean_std(list(right.values()))} | "
                     f"{', '.join(f'{d:+.2f}' for d in diffs) or '-'} | {' '.join(map(str, shared)) or '-'} | "
                     f"{f'{statistics.mean(diffs):+.2f}' if diffs else '-'} | {welch:.2f} | {paired:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", required=True, help="evaluation sweep folders of side a, one per seed")
    parser.add_argument("--b", nargs="+", required=True, help="evaluation sweep folders of side b, one per seed")
    parser.add_argument("--names", nargs=2, default=("a", "b"), metavar=("A", "B"), help="the sides' names")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    a, b = test_accuracies(args.a), test_accuracies(args.b)
    if not set(a) & set(b):
        raise SystemExit("compare_ab: the two sides share no (repr, eval) with a result")
    text = table(a, b, tuple(args.names))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
