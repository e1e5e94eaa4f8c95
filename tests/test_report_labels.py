"""How the report files results that hold no accuracy: a training job with no model (``status: missing``)
joins the row of the data its sweep is evaluated on, and an evaluation that never wrote its result
(``status: running``) is neither a failure nor part of any mean."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import compose_config
from test_report import rows_of, write

from byol.core.backbone import Encoder
from byol.core.checkpoint import save_encoder
from byol.jobs.evaluate import evaluate
from byol.jobs.report import main as report_main
from byol.jobs.report import report
from byol.jobs.report_cells import build_cells
from byol.jobs.report_files import load_results

# the data a run of the sweep below was trained on: not evaluate.yaml's default (cifar10)
RUN_DATA = ("data:\n  name: synthetic\n  root: null\n  num_train: 64\n  num_test: 32\n  batch_size: 32\n"
            "  subset: null\n  num_classes: 4\n  image_size: 32\n  crop_size: null\n  mean: [0.5, 0.5, 0.5]\n"
            "  std: [0.25, 0.25, 0.25]\n  on_device: true\n")


def _run_config(seed: int) -> str:
    return (f"seed: {seed}\nloss:\n  name: classic\n  taps: []\nbackbone:\n  name: resnet18\n  stem: imagenet\n"
            f"  width: 0.5\n" + RUN_DATA)


def _sweep(root: Path) -> tuple[Path, Path]:
    """A training sweep of two jobs on synthetic data: 0_good exported its encoder, 1_failed has only its
    config.yaml and a FAILED file."""
    good, failed = root / "0_good", root / "1_failed"
    for job, seed in ((good, 0), (failed, 1)):
        (job / ".hydra").mkdir(parents=True)
        (job / "config.yaml").write_text(_run_config(seed))
    encoder = Encoder("resnet18", "imagenet", [], {}, width=0.5)
    save_encoder(encoder, good / "encoder.pt", meta={"loss": "classic", "epochs": 1, "seed": 0})
    (failed / "FAILED").write_text("non-finite loss at step 3\n")
    return good, failed


def test_a_missing_job_carries_the_data_its_sweep_is_evaluated_on(tmp_path):
    """Its eval data came from evaluate.yaml's default (cifar10) while the sweep was evaluated on the runs'
    own data: the report gave it a row of its own ("synthetic -> cifar10") instead of "1 missing" in its cell."""
    good, failed = _sweep(tmp_path / "sweep")
    cfg = compose_config("evaluate", ["preset=smoke", f"pretrained={tmp_path / 'sweep'}", "eval=knn",
                                      "baseline=false", f"outputs_dir={tmp_path / 'outputs'}"], tmp_path)
    assert cfg.data.name == "cifar10"  # the evaluation's own default, unlike the runs'
    evaluate(cfg, tmp_path / "ev")
    ok = json.loads((tmp_path / "ev" / good.name / "results.json").read_text())
    missing = json.loads((tmp_path / "ev" / failed.name / "results.json").read_text())
    assert (ok["status"], missing["status"], missing["pretrain_status"]) == ("ok", "missing", "failed")
    assert missing["data"] == ok["data"] == "synthetic"
    assert missing["eval_data"] == ok["eval_data"]
    assert missing["eval_data"]["num_train"] == 64

    report_main([str(tmp_path / "ev")])
    md = (tmp_path / "ev" / "results.md").read_text()
    (row,) = rows_of(md, "classic", "avgpool", "knn")  # one row: the run's accuracy, and the missing job
    assert (row[5], row[6], row[8], row[11]) == ("1", "0", "synthetic", "1 missing (1_failed)")
    assert "cifar10" not in md


def test_a_missing_job_without_data_in_its_config_keeps_the_evaluations_data(tmp_path):
    """Nothing to read: the evaluation's own data settings, as for a model whose run config names none."""
    good, failed = _sweep(tmp_path / "sweep")
    (failed / "config.yaml").write_text("seed: 1\nloss:\n  taps: []\n")
    cfg = compose_config("evaluate", ["preset=smoke", "data=synthetic", f"pretrained={tmp_path / 'sweep'}",
                                      "eval=knn", "baseline=false", f"outputs_dir={tmp_path / 'outputs'}"], tmp_path)
    evaluate(cfg, tmp_path / "ev")
    missing = json.loads((tmp_path / "ev" / failed.name / "results.json").read_text())
    assert (missing["status"], missing["data"], missing["eval_data"]["num_train"]) == ("missing", "synthetic", 256)


def _results(folder: Path) -> list[dict]:
    return load_results(sorted(folder.rglob("results.json")))


def test_a_running_evaluation_is_neither_failed_nor_in_a_mean(tmp_path):
    """``status: running`` (an evaluation in progress, or killed before it wrote its result) was counted as a
    failed run with "no error recorded"."""
    for seed, t in enumerate([0.50, 0.70]):
        write(tmp_path, f"classic{seed}", "classic", "avgpool", "linear", t, t, seed=seed)
    write(tmp_path, "classic2", "classic", "avgpool", "linear", seed=2, status="running")
    write(tmp_path, "multi0", "multi", "avgpool", "linear", status="running")
    cells = {c.triple: c for c in build_cells(_results(tmp_path))}
    classic, multi = cells[("classic", "avgpool", "linear")], cells[("multi", "avgpool", "linear")]
    assert (classic.runs, classic.failed, classic.status, classic.test) == (2, 0, "ok", [0.50, 0.70])
    assert [r["name"] for r in classic.running_runs] == ["classic2"]
    assert (multi.runs, multi.failed, multi.status) == (0, 0, "missing")
    assert [r["name"] for r in multi.running_runs] == ["multi0"]

    report([tmp_path], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "no error recorded" not in md and "Failed cells" not in md
    (row,) = rows_of(md, "classic", "avgpool")
    assert row[3:7] == ["60.00 ± 14.14", "60.00 ± 14.14", "2", "0"]
    assert row[11] == "1 running or stopped before writing a result (classic2)"
    (row,) = rows_of(md, "multi", "avgpool")
    assert row[3:7] == ["missing", "missing", "0", "0"]
    assert row[11] == "**missing**: 1 running or stopped before writing a result (multi0)"
    assert ("Evaluations running or stopped before writing a result (2, in no mean, not counted as failed):\n"
            f"- classic2 ({tmp_path / 'classic2'})\n- multi0 ({tmp_path / 'multi0'})") in md
    rows = {(r["loss"], r["repr"], r["eval"]): r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert [rows[("classic", "avgpool", "linear")][k] for k in ("runs", "failed", "running", "status")] == \
        ["2", "0", "1", "ok"]
    assert [rows[("multi", "avgpool", "linear")][k] for k in ("runs", "failed", "running", "status")] == \
        ["0", "0", "1", "missing"]


def test_a_running_evaluation_beside_a_missing_job_and_a_failed_one(tmp_path):
    """Each result with no accuracy is named for what it is, in the one row they share."""
    write(tmp_path, "a", "classic", "avgpool", "knn", status="missing", error="training failed: out of memory")
    write(tmp_path, "b", "classic", "avgpool", "knn", status="running")
    write(tmp_path, "c", "classic", "avgpool", "knn", status="failed", error="corrupt file")
    (cell,) = [c for c in build_cells(_results(tmp_path)) if c.triple == ("classic", "avgpool", "knn")]
    assert (cell.failed, cell.errors, len(cell.missing_runs), len(cell.running_runs)) == (1, ["corrupt file"], 1, 1)
    report([tmp_path], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    (row,) = rows_of(md, "classic", "avgpool", "knn")
    assert row[3:7] == ["failed", "failed", "0", "1"]
    assert row[11] == "**failed**: corrupt file; 1 missing (a); 1 running or stopped before writing a result (b)"


def test_a_running_embedding_is_listed_as_not_finished(tmp_path):
    """eval=embed results are listed under the table: a running one says so, with no error to show."""
    write(tmp_path, "map", "classic", "combined", "embed", status="running", label="map")
    write(tmp_path, "knn", "classic", "avgpool", "knn", 0.5)
    report([tmp_path], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"- map (classic, repr=combined): running or stopped before writing a result ({tmp_path / 'map'})" in md
    assert "no error recorded" not in md
