"""Evaluation settings that would do nothing, the report's choice of the newest sweep, and a sweep's baselines
for each data setting its runs are evaluated on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import compose_config, plain_config
from in_process import run_here
from omegaconf import OmegaConf

from byol.core.backbone import Encoder
from byol.core.checkpoint import save_encoder
from byol.core.errors import ConfigError
from byol.jobs.evaluate import _start_job, evaluate
from byol.jobs.report import newest_eval_sweep, report

# --------------------------------------------------------------------------- eval=linear's two protocols


def _eval(*overrides: str) -> dict:
    return plain_config(compose_config("evaluate", list(overrides)))["eval"]


@pytest.mark.parametrize("given, overrides, expected", [
    (["eval.lr"], [], "eval.lr applies to the augmented linear protocol only (eval.cached_features=false); the "
                      "cached probe run here (eval.cached_features=true) uses eval.cached_lr: set eval.cached_lr, "
                      "or add eval.cached_features=false"),
    (["eval.batch_size", "eval.lr"], [], "eval.lr and eval.batch_size apply to the augmented linear protocol only"),
    (["eval.cached_lr", "eval.cached_features"], ["eval.cached_features=false"],
     "eval.cached_lr applies to the cached linear probe only (eval.cached_features=true); the augmented protocol "
     "run here (eval.cached_features=false) uses eval.lr: set eval.lr, or leave eval.cached_features at true"),
    (["eval.cached_batch_size"], ["eval.cached_features=false"], "eval.cached_batch_size applies to the cached"),
])
def test_a_setting_of_the_linear_protocol_not_run_is_refused(given, overrides, expected):
    """eval.lr=50 under the default cached probe gave the accuracy of the default lr, without a word."""
    from byol.jobs.evaluation_checks import refuse_other_protocol_settings

    with pytest.raises(ConfigError) as refused:
        refuse_other_protocol_settings(given, _eval(*overrides))
    assert str(refused.value).startswith(expected) and "\n" not in str(refused.value)


@pytest.mark.parametrize("given, overrides", [
    (["eval.cached_lr", "eval.cached_batch_size"], []),
    (["eval.lr", "eval.batch_size", "eval.cached_features"], ["eval.cached_features=false"]),
    ([""], ["preset=original"]),  # the preset sets eval.lr and eval.cached_lr: it decides for both protocols
    ([""], ["preset=original", "eval.cached_features=false"]),
    (["eval", "eval.lr", "eval.batch_size"], ["eval=finetune"]),  # fine-tuning's own lr and batch
])
def test_the_settings_of_the_protocol_run_and_a_presets_settings_are_accepted(given, overrides):
    from byol.jobs.evaluation_checks import refuse_other_protocol_settings

    refuse_other_protocol_settings(given, _eval(*overrides))


def test_evaluate_py_refuses_eval_lr_under_the_cached_probe_in_one_line(tmp_path):
    """The keys come from the command line as Hydra saw it; nothing is evaluated."""
    command = ["pretrained=random", "preset=smoke", "data=synthetic", "eval.lr=50", f"hydra.run.dir={tmp_path / 'ev'}"]
    done = run_here("evaluate.py", *command)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["error: eval.lr applies to the augmented linear protocol only (eval.cached_features=false); "
                     "the cached probe run here (eval.cached_features=true) uses eval.cached_lr: set eval.cached_lr, "
                     "or add eval.cached_features=false"], done.stderr
    assert not (tmp_path / "ev" / "results.json").exists()


def test_a_presets_training_settings_under_knn_are_one_note(tmp_path, capsys):
    _start_job(compose_config("evaluate", ["preset=original", "eval=knn"], tmp_path), tmp_path / "knn")
    assert "[eval] note: eval=knn trains nothing; the preset's eval.epochs=300, eval.lr=0.01, eval.cached_lr=0.01 " \
           "do not apply\n" in capsys.readouterr().out
    for overrides in (["preset=original"], ["eval=knn"]):  # the preset's protocol; kNN's own settings
        _start_job(compose_config("evaluate", overrides, tmp_path), tmp_path / "other")
        assert "trains nothing" not in capsys.readouterr().out


# --------------------------------------------------------------------------- the newest evaluation sweep


def _result_at(folder: Path, when: float) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text("{}")
    os.utime(folder / "results.json", (when, when))


def test_the_newest_sweep_is_the_one_with_the_newest_results_not_the_last_written_into(tmp_path):
    """A report written into an older sweep made it the newest (its folder's time moved)."""
    root = tmp_path / "outputs" / "multirun" / "eval"
    older, newer = root / "2026-01-01_10-00-00", root / "2026-01-02_10-00-00"
    _result_at(older / "0_repr=avgpool" / "run", 1000)
    _result_at(newer / "0_repr=avgpool" / "run", 2000)
    (root / "2026-01-03_10-00-00").mkdir()  # no results yet: nothing to report
    os.utime(newer, (2000, 2000))
    os.utime(older, (3000, 3000))  # results.md written into it since
    assert newest_eval_sweep(tmp_path / "outputs") == newer
    os.utime(older / "0_repr=avgpool" / "run" / "results.json", (4000, 4000))  # evaluated again
    assert newest_eval_sweep(tmp_path / "outputs") == older
    os.utime(newer / "0_repr=avgpool" / "run" / "results.json", (4000, 4000))  # the same time: the name's
    assert newest_eval_sweep(tmp_path / "outputs") == newer
    assert newest_eval_sweep(tmp_path / "nowhere") is None


# --------------------------------------------------------------------------- baselines per data setting


def test_data_tags_name_what_differs_else_number_the_settings():
    from byol.jobs.evaluation_data import data_tags

    a, b = {"name": "synthetic", "subset": 64, "root": None}, {"name": "synthetic", "subset": 100, "root": None}
    assert data_tags([a]) == [""]
    assert data_tags([a, b]) == ["_subset64", "_subset100"]
    assert data_tags([a, {**b, "subset": 64, "name": "cifar100"}]) == ["_synthetic", "_cifar100"]
    assert data_tags([{**a, "root": "/data/x=1,y"}, {**a, "root": "/data/x=2,y"}]) == ["_root-data-x-1-y",
                                                                                          "_root-data-x-2-y"]
    assert data_tags([{**a, "root": "/" + "r" * 50}, a]) == ["_data1", "_data2"]  # too long for a folder name


def _run(folder: Path, subset: int, seed: int = 0) -> None:
    """A run folder of ``python train.py experiment=smoke data.subset=SUBSET seed=SEED``: encoder.pt and config.yaml."""
    cfg = plain_config(compose_config("train", ["experiment=smoke", f"data.subset={subset}", f"seed={seed}"], folder))
    folder.mkdir(parents=True)
    backbone = cfg["backbone"]
    save_encoder(Encoder(backbone["name"], backbone["stem"], [], {}, width=backbone["width"]), folder / "encoder.pt",
                 meta={"loss": "classic", "epochs": 1, "seed": seed})
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))


def test_a_sweep_over_data_settings_gets_a_baseline_for_each_in_its_row(tmp_path, capsys):
    """One baseline was built, on the first run's data: the other runs' row had no random-init beside it."""
    sweep = tmp_path / "sweep"
    for number, subset in enumerate((64, 100, 64)):
        _run(sweep / f"{number}_data.subset={subset},seed={number // 2}", subset, seed=number // 2)
    cfg = compose_config("evaluate", ["preset=smoke", f"pretrained={sweep}", "eval=knn"], tmp_path)
    results = evaluate(cfg, tmp_path / "ev")
    assert [r["status"] for r in results] == ["ok"] * 6
    bases = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "ev").glob("random-init*/results.json")}
    assert {name: (b["eval_data"]["subset"], b["seed"]) for name, b in bases.items()} == {
        "random-init_subset64_seed0": (64, 0), "random-init_subset64_seed1": (64, 1),
        "random-init_subset100": (100, 0)}
    rows = {(c.loss, json.loads(c.eval_data)["subset"]): c.seeds for c in report([tmp_path / "ev"], tmp_path / "ev")}
    assert rows == {("classic", 64): [0, 1], ("classic", 100): [0],
                    ("random-init", 64): [0, 1], ("random-init", 100): [0]}


def test_a_sweep_on_one_data_setting_keeps_its_baseline_names(tmp_path):
    for seed in (0, 1):
        _run(tmp_path / "sweep" / f"{seed}_seed={seed}", 64, seed=seed)
    cfg = compose_config("evaluate", ["preset=smoke", f"pretrained={tmp_path / 'sweep'}", "eval=knn"], tmp_path)
    evaluate(cfg, tmp_path / "ev")
    assert sorted(p.parent.name for p in (tmp_path / "ev").glob("random-init*/results.json")) == [
        "random-init_seed0", "random-init_seed1"]
