"""Value tests for the report's recent helpers, each written against a mutant the rest of the suite let through (a
hand-made mutation audit of byol/jobs since f5ecc9f): what pairs two rows, a seed's mean, text made safe for a
spreadsheet and for markdown, and a setting's value cut short in a row's name."""

from __future__ import annotations

import json
import math

from byol.jobs.report_cells import Cell, accuracy_text, build_cells, by_seed, csv_row, md_cell
from byol.jobs.report_labels import short_value
from byol.jobs.report_paired import paired_comparisons

LINEAR = {"cached_features": True, "cached_lr": 0.1}
TRAINED = {"optim.base_lr": 1.0, "loss.taps": []}


def result(loss: str, seed: int, test: float, eval_settings=None, taps=None) -> dict:
    return {"pretrained": f"/runs/{loss}{seed}", "loss": loss, "repr": "combined", "eval": "linear",
            "backbone": "resnet18", "stem": "imagenet", "pretrain_epochs": 5, "eval_epochs": 100, "seed": seed,
            "test_acc": test, "val_acc": test, "status": "ok",
            "trained": {**TRAINED, "loss.taps": ["layer2.0"] if loss == "multi" else []},
            "eval_settings": eval_settings or LINEAR, "taps": taps or ["avgpool", "layer2.0"]}


def pairs_of(classic: dict, multi: dict) -> int:
    """How many paired comparisons two seeds of each loss give, each loss with its own eval settings and taps."""
    results = [result(loss, seed, 0.5 + seed / 10 + (loss == "multi") / 50, **fields)
               for seed in (0, 1) for loss, fields in (("classic", classic), ("multi", multi))]
    return len(paired_comparisons(build_cells(results)))


def test_rows_pair_only_on_the_same_protocol_settings_and_taps():
    """multi - classic on another probe or other taps measures the protocol, not the loss."""
    assert pairs_of({}, {}) == 1
    assert pairs_of({}, {"eval_settings": {**LINEAR, "cached_features": False}}) == 0
    assert pairs_of({}, {"taps": ["avgpool", "layer3.0"]}) == 0


def test_a_result_without_a_seed_is_in_no_seeds_mean():
    """It cannot be paired with any seed of another row (before, it counted as a seed numbered by its position)."""
    assert by_seed([0.9, 0.5, 0.75], [None, 1, 1]) == {1: 0.625}
    assert by_seed([0.5], [None]) == {}


def test_only_text_that_starts_like_a_formula_gets_a_quote_numbers_stay_numbers():
    assert csv_row(["-0.5000", "-1.2 0.4", "+3", "=cmd()", "-x", "@a", "\tb", "name", 3, -1.5]) == \
        ["-0.5000", "-1.2 0.4", "+3", "'=cmd()", "'-x", "'@a", "'\tb", "name", 3, -1.5]


def test_a_tag_in_a_markdown_cell_is_shown_not_rendered():
    assert md_cell("<script>x</script>") == "&lt;script>x&lt;/script>"
    assert md_cell("<!-- a -->") == "&lt;!-- a -->"
    assert md_cell("acc < 0.5 and 2<3") == "acc < 0.5 and 2<3"  # not a tag: as written


def test_a_long_setting_is_cut_at_60_characters():
    assert short_value("x" * 60) == "x" * 60
    assert short_value("x" * 61) == "x" * 57 + "..."
    assert short_value(list(range(30))) == ("[" + ",".join(map(str, range(30))) + "]")[:57] + "..."


def test_seed_labels_sort_by_their_numbers_and_any_other_digit_is_text():
    """A run's config.yaml is handed data: a seed written "1²" (a digit to str.isdigit, not to int) stopped
    the sort of the overlay's seeds with a ValueError."""
    from byol.jobs.curves import natural_order

    labels = ["seed 10", "seed 2", "seed 1²", "seed ٣"]  # ٣: Arabic-Indic three, a decimal digit int() reads
    assert sorted(labels, key=natural_order) == ["seed 1²", "seed 2", "seed ٣", "seed 10"]


def test_the_synthetic_data_counts_are_recorded_for_synthetic_data_only():
    """experiment=smoke sets num_train/num_test for its synthetic data; an image folder evaluated under it
    recorded them beside its own settings, as if they described it."""
    from byol.jobs.pretrained import data_fields

    folder = {"name": "imagefolder", "root": "/data", "subset": None, "image_size": 32, "num_train": 128,
              "num_test": 64}
    assert data_fields(folder) == {"name": "imagefolder", "root": "/data", "subset": None, "image_size": 32}
    assert data_fields({**folder, "name": "synthetic"})["num_train"] == 128


def test_no_val_split_is_said_of_the_validation_accuracy_only_and_only_where_val_size_is_zero():
    """accuracy_text(..., val=True) with no value: 'no val split' for evaluation data with val_size 0; a test
    accuracy, other data, or eval_data that is absent, not JSON or not a JSON object: 'not recorded'."""
    def text(eval_data, val=True):
        cell = Cell("classic", "avgpool", "linear", eval_data=eval_data, test=[0.5], seeds=[0])
        return accuracy_text(cell, [math.nan], digits=2, val=val)

    assert text(json.dumps({"name": "cifar10", "val_size": 0})) == ("no val split", "")
    assert text(json.dumps({"name": "cifar10", "val_size": 0}), val=False) == ("not recorded", "")
    for other in (json.dumps({"name": "cifar10"}), json.dumps({"val_size": 5000}), None, "not json", "[0]"):
        assert text(other) == ("not recorded", ""), other
