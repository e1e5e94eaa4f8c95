"""What results.json records of the data an evaluation ran on, and the report's rows built from it."""

from __future__ import annotations

from test_report import rows_of, write

from byol.jobs.report import report
from byol.jobs.results_json import result_fields

CIFAR10 = {"name": "cifar10", "root": "/data/cifar10", "subset": None, "image_size": 32,
           "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
HOLDOUT = {"name": "holdout", "val_size": 5000}


def _eval_data(**data) -> dict:
    cfg = {"eval": {"name": "knn", "k": 200}, "repr": {"name": "avgpool"}, "split": HOLDOUT, "seed": 0,
           "data": {**CIFAR10, **data}}
    return result_fields("/runs/r0/encoder.pt", "r0", cfg)["eval_data"]


def test_eval_data_records_a_normalisation_or_skipped_files_other_than_the_datasets():
    """data.mean / data.std / data.skip_bad_files change what is measured but were not recorded."""
    assert _eval_data() == {"name": "cifar10", "root": "/data/cifar10", "subset": None, "image_size": 32,
                            "split": "holdout", "val_size": 5000}  # the defaults: as earlier versions wrote it
    other = _eval_data(mean=[0.5, 0.5, 0.5], skip_bad_files=True)
    assert other["mean"] == "[0.5, 0.5, 0.5]" and other["skip_bad_files"] is True and "std" not in other


def test_evaluations_under_another_normalisation_are_not_averaged_as_one_seed(tmp_path):
    """One run evaluated twice, with its dataset's normalisation and with data.mean=[0.5, ...]: the report
    took the second for the same result evaluated again and averaged 0.40 and 0.20 into 30%."""
    for name, test, data in (("default", 0.40, _eval_data()), ("half", 0.20, _eval_data(mean=[0.5, 0.5, 0.5]))):
        write(tmp_path / "ev", name, "classic", "avgpool", "knn", test, test, pretrained="/runs/r0/encoder.pt",
              eval_data=data, pretrain_data={k: CIFAR10[k] for k in ("name", "root", "subset", "image_size")})
    report([tmp_path / "ev"], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    rows = rows_of(md, "classic", "avgpool", "knn")
    assert sorted(row[3] for row in rows) == ["20.00", "40.00"]
    assert sorted(row[8] for row in rows) == ["cifar10 mean=[0.5, 0.5, 0.5]", "cifar10 mean=default"]


def test_evaluations_at_another_precision_are_not_averaged_as_one_seed(tmp_path):
    """bf16 and 32-bit features of one run score a few tenths of a point apart (0.252 and 0.256, kNN on a smoke
    run's combined features, 2026-12-03): the report averaged them as the same result evaluated twice."""
    import yaml

    from byol.jobs.results_json import DEFAULT_PRECISION

    conf = {**yaml.safe_load(open("conf/trainer/default.yaml")), "precision": DEFAULT_PRECISION}  # auto on a GPU
    cfg = {"eval": {"name": "knn", "k": 200}, "repr": {"name": "avgpool"}, "split": HOLDOUT, "seed": 0,
           "data": CIFAR10}
    default = result_fields("/runs/r0/encoder.pt", "r0", {**cfg, "trainer": conf})["eval_settings"]
    full = result_fields("/runs/r0/encoder.pt", "r0", {**cfg, "trainer": {"precision": "32-true"}})["eval_settings"]
    assert default == {"k": 200} and full == {"k": 200, "trainer.precision": "32-true"}
    for name, test, settings in (("bf16", 0.252, default), ("fp32", 0.256, full)):
        write(tmp_path / "ev", name, "classic", "avgpool", "knn", test, test, pretrained="/runs/r0/encoder.pt",
              eval_settings=settings)
    report([tmp_path / "ev"], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    rows = rows_of(md, "classic", "avgpool", "knn")
    assert sorted(row[3] for row in rows) == ["25.20", "25.60"]
    assert sorted(row[11] for row in rows) == ["settings: trainer.precision=32-true",
                                              "settings: trainer.precision=bf16-mixed"]
