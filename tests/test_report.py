"""The results table: means, sample standard deviations, counts, missing and failed cells."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from byol.report import build_cells, load_results, main, mean_std, report


def write(folder: Path, name: str, loss: str, repr_name: str, protocol: str, test=None, val=None,
          status="ok", seed=0, error=None) -> None:
    d = folder / name
    d.mkdir(parents=True)
    r = {"pretrained": f"/runs/{name}", "loss": loss, "repr": repr_name, "eval": protocol,
         "backbone": "resnet18", "stem": "imagenet", "pretrain_epochs": 5,
         "eval_epochs": 0 if protocol == "knn" else 100, "seed": seed, "val_acc": val, "test_acc": test,
         "status": status}
    if error:
        r["error"] = error
    (d / "results.json").write_text(json.dumps(r))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for seed, (t, v) in enumerate([(0.50, 0.40), (0.60, 0.50), (0.70, 0.90)]):
        write(root / "job0", f"classic{seed}", "classic", "avgpool", "linear", t, v, seed=seed)
    write(root / "job0", "multi0", "multi", "avgpool", "linear", 0.80, 0.75)
    write(root / "job0", "multi1", "multi", "avgpool", "linear", status="failed", error="corrupt file")
    write(root / "job0", "random-init", "random-init", "avgpool", "linear", 0.30, 0.35)
    write(root / "job1", "classic0", "classic", "combined", "finetune", status="failed", error="NaN loss")
    write(root / "job2", "classic0", "classic", "avgpool", "knn", 0.45, 0.55)
    (root / "job2" / "notes.txt").write_text("not a result")
    return root


def test_mean_and_sample_std():
    m, s = mean_std([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and s == pytest.approx(0.1)  # sample std (n - 1); population: 0.0816
    m, s = mean_std([0.8])
    assert m == 0.8 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_std([]))


def test_cells_group_results_and_count_runs_and_failures(sweep):
    results = load_results(sorted(sweep.rglob("results.json")))
    cells = {(c.loss, c.repr, c.eval): c for c in build_cells(results)}
    c = cells[("classic", "avgpool", "linear")]
    assert (c.runs, c.failed, c.status) == (3, 0, "ok")
    assert mean_std(c.test) == pytest.approx((0.6, 0.1))
    assert mean_std(c.val) == pytest.approx((0.6, math.sqrt(0.07)))  # deviations -.2, -.1, .3
    m = cells[("multi", "avgpool", "linear")]
    assert (m.runs, m.failed, m.status) == (1, 1, "ok")
    assert cells[("classic", "combined", "finetune")].status == "failed"
    assert cells[("multi", "combined", "finetune")].status == "missing"
    assert cells[("random-init", "avgpool", "linear")].runs == 1
    assert cells[("classic", "avgpool", "knn")].runs == 1
    assert sum(c.status == "missing" for c in cells.values()) == 5  # of the 8 expected cells
    assert len(cells) == 8 + 2  # the 8 expected cells, the baseline, the kNN row


def test_report_writes_markdown_csv_and_plot(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    report([sweep], out)
    md = (out / "results.md").read_text()
    assert capsys.readouterr().out.startswith(md)  # the table is printed
    assert "| classic | avgpool | linear | 60.00 ± 10.00 | 60.00 ± 26.46 | 3 | 0 |" in md
    assert "| multi | avgpool | linear | 80.00 | 75.00 | 1 | 1 |" in md
    assert "| random-init | avgpool | linear | 30.00 | 35.00 | 1 | 0 |" in md
    assert "**failed**: NaN loss" in md
    assert "Missing cells (5 of 8 expected)" in md and "multi/combined/finetune" in md
    assert "classic/combined/finetune" in md.split("Failed cells")[1]
    rows = {(r["loss"], r["repr"], r["eval"]): r for r in csv.DictReader(open(out / "results.csv"))}
    r = rows[("classic", "avgpool", "linear")]
    assert float(r["test_acc_mean"]) == pytest.approx(0.6) and float(r["test_acc_std"]) == pytest.approx(0.1)
    assert (r["runs"], r["failed"], r["status"], r["eval_epochs"]) == ("3", "0", "ok", "100")
    assert rows[("multi", "avgpool", "linear")]["test_acc_std"] == ""  # one run: no std
    assert rows[("multi", "combined", "linear")]["status"] == "missing"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_complete_grid_has_no_missing_cells(tmp_path):
    for loss in ("classic", "multi"):
        for r in ("avgpool", "combined"):
            for e in ("linear", "finetune"):
                write(tmp_path, f"{loss}-{r}-{e}", loss, r, e, 0.5, 0.5)
    report([tmp_path], tmp_path)
    assert "All 8 expected cells have results." in (tmp_path / "results.md").read_text()


def test_cli_defaults_to_the_newest_evaluation_sweep(sweep, tmp_path, monkeypatch, capsys):
    evals = tmp_path / "outputs" / "multirun" / "eval"
    old, new = evals / "old", evals / "new"
    write(old, "a", "classic", "avgpool", "linear", 0.1, 0.1)
    write(new, "a", "multi", "combined", "finetune", 0.9, 0.9)
    os.utime(old, (1000, 1000))
    monkeypatch.chdir(tmp_path)
    main([])
    assert "newest evaluation sweep" in capsys.readouterr().out
    assert (new / "results.md").is_file() and not (old / "results.md").exists()
    main([str(sweep), "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "results.csv").is_file()
    with pytest.raises(SystemExit, match="no results.json"):
        main([str(tmp_path / "elsewhere" / "nothing")])
