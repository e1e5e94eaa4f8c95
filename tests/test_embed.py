"""eval=embed: the saved test-set features are the encoder's, the maps are images, the report lists the
results without counting them as failed, and a missing scikit-learn stops the job in one line."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_evaluation import _export, _job_config

from byol.core.errors import ConfigError
from byol.core.features import autocast_dtype, extract_features, representation_taps
from byol.jobs.config_check import plain_config
from byol.jobs.datasets import load_eval_data
from byol.jobs.embedding import EMBEDDINGS_FILE, check_embed_settings, map_columns, map_points
from byol.jobs.evaluate import evaluate
from byol.jobs.pretrained import random_model, read_pretrained
from byol.jobs.report import report

NUM_TEST = 40  # synthetic test images: 4 classes of 10, t-SNE in well under a second each


def _embed_config(tmp_path, *overrides):
    return _job_config(tmp_path, "eval=embed", f"data.num_test={NUM_TEST}", *overrides)


def _expected_features(encoder, settings: dict, taps) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set's features by byol.core.features, with the job's data and precision settings (bf16
    autocast by default), as float32; and the test labels."""
    splits, _ = load_eval_data(settings["data"], settings["split"], settings["seed"])
    test, dtype = splits["test"], autocast_dtype(settings["trainer"]["precision"])
    encoder.to(memory_format=torch.channels_last)  # as the job runs it
    features = extract_features(encoder, test.images, taps, settings["data"]["mean"], settings["data"]["std"],
                                dtype=dtype, device="cpu")
    return features.float(), test.labels


def _is_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
    with Image.open(path) as image:
        return image.size


def test_combined_saves_the_encoders_test_features_and_one_map_per_part(tmp_path):
    cfg = _embed_config(tmp_path, "pretrained=random", "repr=combined", "eval.max_points=24")
    (result,) = evaluate(cfg, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / EMBEDDINGS_FILE, weights_only=True)
    settings = plain_config(cfg)
    taps = representation_taps("combined", settings["repr"]["taps"])
    encoder = random_model(settings["backbone"], settings["seed"]).build(taps)
    features, labels = _expected_features(encoder, settings, taps)
    a, b, c = (encoder.dims[t] for t in taps)  # 512, 2048, 1024 for a full-width ResNet-18
    assert saved["features"].shape == (NUM_TEST, a + b + c) == features.shape
    assert torch.equal(saved["features"], features)
    assert torch.equal(saved["labels"], labels) and saved["labels"].bincount().tolist() == [10, 10, 10, 10]
    assert saved["class_names"] == ["class0", "class1", "class2", "class3"]
    assert (saved["repr"], saved["taps"], saved["model"]) == ("combined", taps, "random-init")
    # one seeded subset of 24 distinct test images, drawn in every map
    indices = saved["map_indices"]
    assert len(indices) == 24 and len(set(indices.tolist())) == 24 and 0 <= int(indices.min()) <= int(indices.max())
    assert int(indices.max()) < NUM_TEST and torch.equal(indices, map_points(NUM_TEST, 24, settings["seed"]))
    columns = {"avgpool": [0, a], "layer2.0": [a, a + b], "layer3.0": [a + b, a + b + c], "combined": [0, a + b + c]}
    assert {part: m["columns"] for part, m in saved["maps"].items()} == columns
    for part, m in saved["maps"].items():
        assert m["coords"].shape == (24, 2) and bool(torch.isfinite(m["coords"]).all())
        assert m["perplexity"] == pytest.approx(23 / 3)  # 30 lowered to (points - 1) / 3
        width, height = _is_png(tmp_path / "run" / f"tsne_{part}.png")
        assert width > 400 and height > 300
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["status"], results["eval"], results["val_acc"], results["test_acc"]) == ("ok", "embed",
                                                                                            None, None)
    assert results["eval_epochs"] == 0 and results["map_points"] == 24 and result["feature_dim"] == a + b + c
    assert results["maps"] == {part: f"tsne_{part}.png" for part in columns}


def test_avgpool_of_an_export_saves_its_features_and_one_map(tmp_path):
    run = _export(tmp_path / "outputs" / "train" / "tiny", loss="multi", seed=3).parent
    cfg = _embed_config(tmp_path, f"pretrained={run}", "repr=avgpool")
    evaluate(cfg, tmp_path / "eval")
    saved = torch.load(tmp_path / "eval" / EMBEDDINGS_FILE, weights_only=True)
    settings = plain_config(cfg)
    encoder = read_pretrained(run / "encoder.pt").build(["avgpool"])
    features, labels = _expected_features(encoder, settings, ["avgpool"])
    assert saved["features"].shape == (NUM_TEST, encoder.dims["avgpool"])
    assert torch.equal(saved["features"], features)
    assert torch.equal(saved["labels"], labels) and saved["repr"] == "avgpool"
    assert list(saved["maps"]) == ["avgpool"] and len(saved["map_indices"]) == NUM_TEST  # under max_points
    assert sorted(p.name for p in (tmp_path / "eval").glob("*.png")) == ["tsne_avgpool.png"]
    _is_png(tmp_path / "eval" / "tsne_avgpool.png")


def test_missing_sklearn_stops_the_job_in_one_line_before_any_data_is_read(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the missing package was reported")

    monkeypatch.setattr("byol.jobs.evaluation_data.load_eval_data", no_data)
    with pytest.raises(ConfigError) as error:
        evaluate(_embed_config(tmp_path, "pretrained=random"), tmp_path / "run")
    message = str(error.value)
    assert "\n" not in message and "scikit-learn" in message and 'pip install -e ".[embed]"' in message
    assert not (tmp_path / "run" / "results.json").exists()


def test_embed_settings_are_checked():
    good = {"name": "embed", "max_points": 5000, "perplexity": 30.0, "pca_dim": 50}
    check_embed_settings(good)
    for key, bad in (("max_points", 0), ("max_points", 1), ("max_points", 2.5), ("pca_dim", -1)):
        with pytest.raises(ConfigError, match=f"eval.{key} must be a whole number of at least"):  # a map needs 2
            check_embed_settings({**good, key: bad})
    for bad in (0, "x"):
        with pytest.raises(ConfigError, match="eval.perplexity must be a positive"):
            check_embed_settings({**good, "perplexity": bad})


def test_maps_are_each_tap_and_the_whole_representation():
    dims = {"avgpool": 512, "layer2.0": 2048, "layer3.0": 1024}
    assert map_columns(["avgpool"], dims, "avgpool") == {"avgpool": (0, 512)}
    assert map_columns(["avgpool", "layer2.0", "layer3.0"], dims, "combined") == {
        "avgpool": (0, 512), "layer2.0": (512, 2560), "layer3.0": (2560, 3584), "combined": (0, 3584)}
    first, again, other = map_points(100, 30, seed=0), map_points(100, 30, seed=0), map_points(100, 30, seed=1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.tolist())) == 30 and map_points(10, 30, seed=0).sort().values.tolist() == list(range(10))


def _result(folder: Path, name: str, protocol: str, test=None, status="ok", **fields) -> None:
    (folder / name).mkdir(parents=True)
    r = {"pretrained": f"/runs/{name}", "label": name, "loss": "classic", "repr": "combined", "eval": protocol,
         "backbone": "resnet18", "stem": "imagenet", "pretrain_epochs": 5, "eval_epochs": 0, "seed": 0,
         "val_acc": test, "test_acc": test, "status": status, **fields}
    (folder / name / "results.json").write_text(json.dumps(r))


def test_report_lists_embed_results_under_the_table_and_never_as_failed(tmp_path, capsys):
    root = tmp_path / "sweep"
    _result(root, "knn", "knn", 0.5)
    _result(root, "map", "embed", maps={"avgpool": "tsne_avgpool.png", "combined": "tsne_combined.png"})
    _result(root, "broken", "embed", status="failed", error="ValueError: no points")
    cells = report([root], tmp_path / "out")
    assert [(c.eval, c.runs, c.failed) for c in cells if c.eval in ("knn", "embed")] == [("knn", 1, 0)]
    assert sum(c.failed for c in cells) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    assert "Failed cells" not in text and "Results with no accuracy (2, not in the table" in text
    assert "- map (classic, repr=combined): maps tsne_avgpool.png, tsne_combined.png" in text
    assert "- broken (classic, repr=combined): **failed**: ValueError: no points" in text
    csv_text = (tmp_path / "out" / "results.csv").read_text()
    assert "embed" not in csv_text and ",knn," in csv_text


def test_a_report_of_embed_results_alone_writes_no_empty_figure(tmp_path, capsys):
    """Maps alone: no accuracy, so neither results.png (it was an empty chart, after a raw matplotlib warning
    about identical axis limits) nor a table (it was a header without rows under a paragraph on accuracies);
    the maps are listed and the files written."""
    root = tmp_path / "sweep"
    _result(root, "map", "embed", maps={"avgpool": "tsne_avgpool.png"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a library's warning reaching the user fails here
        assert report([root], tmp_path / "out") == []
    assert not (tmp_path / "out" / "results.png").exists()
    assert "[report] note: results.png not drawn: no accuracy to draw" in capsys.readouterr().err
    text = (tmp_path / "out" / "results.md").read_text()
    assert "- map (classic, repr=combined): maps tsne_avgpool.png" in text
    assert "1 results.json files. None holds an accuracy (no table)." in text  # no header without rows
    assert "| loss |" not in text and "mean ± sample std" not in text
