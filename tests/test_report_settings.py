"""Rows never pool results of one seed that differ in what was trained or how it was evaluated: the run's
other trained settings (optimizer, heads, EMA, batch size...), the protocol's settings (cached features,
probe lr, k) and the representation's taps. Such rows are named by the settings that differ."""

from __future__ import annotations

import csv
import json

import pytest

from byol.jobs.pretrained import trained_settings
from byol.jobs.report import report
from byol.jobs.report_cells import build_cells
from byol.jobs.report_files import load_results
from byol.jobs.report_paired import paired_comparisons

LINEAR = {"cached_features": True, "cached_lr": 0.1, "lr": 0.1, "optimizer": {"name": "sgd", "momentum": 0.9}}
TRAINED = {"optim.base_lr": 1.0, "optim.name": "lars", "head.hidden_dim": 64, "loss.taps": [], "loss.weights": {}}
MULTI = {**TRAINED, "loss.taps": ["layer2.0", "layer3.0"]}


def result(loss="classic", seed=0, test=0.5, trained=None, eval_settings=None, taps=None, **fields) -> dict:
    r = {"pretrained": f"/runs/{loss}{seed}", "loss": loss, "repr": "avgpool", "eval": "linear",
         "backbone": "resnet18", "stem": "imagenet", "pretrain_epochs": 5, "eval_epochs": 100, "seed": seed,
         "test_acc": test, "val_acc": test, "status": "ok",
         "trained": trained if trained is not None else (MULTI if loss == "multi" else TRAINED),
         "eval_settings": eval_settings or LINEAR, "taps": taps or ["avgpool"]}
    r.update(fields)
    return r


def rows(results) -> list:
    return [c for c in build_cells(results) if c.n_results]


def test_a_sweep_over_a_trained_setting_at_one_seed_gets_a_row_per_value():
    """Before: one row, "seed 0 (2 results)", the two learning rates averaged as one run."""
    other = {**TRAINED, "optim.base_lr": 5.0}
    cells = rows([result(test=0.6), result(test=0.8, trained=other)])
    assert sorted((c.variant, c.test) for c in cells) == [("optim.base_lr=1.0", [0.6]), ("optim.base_lr=5.0", [0.8])]
    assert all(not c.repeated_seeds for c in cells)


def test_two_protocol_settings_and_two_tap_lists_are_separate_rows():
    augmented = {**LINEAR, "cached_features": False}
    cells = rows([result(test=0.75), result(test=0.69, eval_settings=augmented)])
    assert sorted(c.variant for c in cells) == ["eval.cached_features=False", "eval.cached_features=True"]
    combined = [result(test=0.9, repr="combined", eval="knn", eval_settings={"k": 200}, taps=t)
                for t in (["avgpool", "layer2.0", "layer3.0"], ["avgpool", "layer4.0"])]
    cells = rows(combined)
    assert sorted(c.variant for c in cells) == ["taps=[avgpool,layer2.0,layer3.0]", "taps=[avgpool,layer4.0]"]


def test_equal_settings_pool_and_an_older_result_without_them_stays_apart():
    cells = rows([result(seed=0, test=0.5), result(seed=1, test=0.7)])
    assert len(cells) == 1 and cells[0].runs == 2 and cells[0].variant == ""
    old = result(seed=2, test=0.9)
    for key in ("trained", "eval_settings", "taps"):
        del old[key]
    cells = rows([result(seed=0, test=0.5), old])
    assert len(cells) == 2  # settings unknown: never averaged with known ones


def test_a_failed_result_joins_the_row_of_its_settings():
    failed = result(seed=1, test=None, status="failed", error="NaN loss", taps=None)
    del failed["taps"]  # failed before the model was read: taps unknown
    other = result(seed=2, test=None, status="failed", error="x", trained={**TRAINED, "optim.base_lr": 5.0})
    cells = rows([result(seed=0, test=0.5), failed, other])
    by_variant = {c.variant: c for c in cells}
    assert by_variant["optim.base_lr=1.0"].failed == 1 and by_variant["optim.base_lr=1.0"].runs == 1
    assert by_variant["optim.base_lr=5.0"].status == "failed"


def test_multi_and_classic_pair_on_equal_other_settings_only():
    """The loss's own taps differ between the two losses; a learning-rate sweep pairs value with value."""
    results = []
    for lr in (1.0, 5.0):
        for seed in (0, 1):
            for loss, base in (("classic", TRAINED), ("multi", MULTI)):
                results.append(result(loss, seed, test=0.5 + lr / 100 + seed / 10 + (loss == "multi") / 50,
                                      trained={**base, "optim.base_lr": lr}))
    pairs = paired_comparisons(build_cells(results))
    assert len(pairs) == 2
    for p in pairs:
        assert json.loads(p.a.trained)["optim.base_lr"] == json.loads(p.b.trained)["optim.base_lr"]
        assert p.diffs == pytest.approx([0.02, 0.02])


def test_the_report_names_the_settings_in_the_notes_and_the_csv(tmp_path):
    folder = tmp_path / "sweep"
    for i, r in enumerate([result(test=0.6), result(test=0.8, trained={**TRAINED, "optim.base_lr": 5.0})]):
        (folder / f"job{i}").mkdir(parents=True)
        (folder / f"job{i}" / "results.json").write_text(json.dumps(r))
    report([folder], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "settings: optim.base_lr=1.0" in md and "settings: optim.base_lr=5.0" in md
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        assert sorted(r["settings"] for r in csv.DictReader(f) if r["settings"]) == \
            ["optim.base_lr=1.0", "optim.base_lr=5.0"]


@pytest.mark.parametrize("field, value", [("trained", ["lr", 1]), ("trained", {"a": [[1]]}),
                                          ("eval_settings", "k=200"), ("taps", [1, 2])])
def test_a_settings_field_of_the_wrong_kind_is_skipped_and_named(tmp_path, capsys, field, value):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result(**{field: value})))
    assert load_results([path]) == []
    assert f"{field} is " in capsys.readouterr().err


def test_trained_settings_leave_out_what_the_table_shows_apart():
    cfg = {"seed": 3, "trainer": {"max_epochs": 9, "precision": "bf16-mixed", "devices": 2},
           "backbone": {"name": "resnet18", "stem": "cifar", "width": 1.0, "grids": {"layer2.0": 2}},
           "data": {"name": "cifar10", "root": "/d", "subset": None, "image_size": 32, "batch_size": 256,
                    "cache_dir": "/c", "storage": "auto"},
           "loss": {"taps": ["layer2.0"], "weights": {"layer2.0": 0.5}}, "optim": {"name": "lars", "base_lr": 1.0},
           "monitor": {"enabled": True}, "logger": {"csv": {}}}
    assert trained_settings(cfg) == {
        "backbone.grids.layer2.0": 2, "data.batch_size": 256, "loss.taps": ["layer2.0"],
        "loss.weights": {"layer2.0": 0.5}, "optim.base_lr": 1.0, "optim.name": "lars",
        "trainer.precision": "bf16-mixed"}
    assert trained_settings(None) is None
