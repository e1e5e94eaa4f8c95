"""The whole study in two commands on tiny data: a training sweep, an evaluation sweep, then the report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from in_process import run_here

from byol.jobs.report import main as report_main


def _run(script: str, args, cwd: Path, expected_rc: int = 0) -> subprocess.CompletedProcess:
    proc = run_here(str(ROOT / script), *args, cwd=cwd)
    assert proc.returncode == expected_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_smoke_sweep_of_all_eight_cells(tmp_path, capsys):
    tiny = ["experiment=smoke", "data.num_train=64"]
    _run("train.py", ["-m", *tiny, "loss=classic,multi", "trainer.max_epochs=1"], tmp_path)
    (sweep,) = (tmp_path / "outputs" / "multirun" / "train").iterdir()
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["0_data.num_train=64,experiment=smoke,loss=classic",
                    "1_data.num_train=64,experiment=smoke,loss=multi"]
    # a third run whose export is damaged: it must fail alone, in its own cell (multi, from its config.yaml)
    broken = sweep / "2_broken"
    broken.mkdir()
    shutil.copy(sweep / runs[1] / "config.yaml", broken / "config.yaml")
    (broken / "encoder.pt").write_bytes((sweep / runs[1] / "encoder.pt").read_bytes()[:5000])  # truncated

    # every job evaluates all models; the sweep then exits 1 because one model failed in each job
    # evaluate.py takes each run's own data settings: its smoke preset is only the short protocol
    ev = _run("evaluate.py", ["-m", "preset=smoke", "pretrained=latest_sweep", "repr=avgpool,combined",
                              "eval=linear,finetune"], tmp_path, expected_rc=1)
    assert "error: 2_broken:" in ev.stderr and "encoder.pt" in ev.stderr
    assert "4 job(s) of the sweep" in ev.stderr
    (eval_sweep,) = (tmp_path / "outputs" / "multirun" / "eval").iterdir()
    results = [json.loads(p.read_text()) for p in eval_sweep.rglob("results.json")]
    assert len(results) == 4 * 4  # 4 jobs x (2 runs + the broken one + the random-init baseline)
    failed = [r for r in results if r["status"] != "ok"]
    assert len(failed) == 4 and all(r["label"] == "2_broken" and r["loss"] == "multi" for r in failed)
    ok = [r for r in results if r["status"] == "ok"]
    assert all(0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1 and r["eval_epochs"] == 1 for r in ok)
    assert {r["seed"] for r in ok if r["loss"] != "random-init"} == {0}

    capsys.readouterr()
    report_main([str(eval_sweep)])
    table = capsys.readouterr().out
    for loss in ("classic", "multi", "random-init"):
        for repr_name in ("avgpool", "combined"):
            for protocol in ("linear", "finetune"):
                (row,) = [line for line in table.splitlines() if line.startswith(f"| {loss} | {repr_name} | "
                                                                               f"{protocol} |")]
                cells = [c.strip() for c in row.strip("|").split("|")]
                assert cells[5] == "1", row  # one successful run per cell
                assert cells[6] == ("1" if loss == "multi" else "0"), row  # the broken run, counted as failed
    assert "All 8 expected cells have results." in table
    assert {"results.md", "results.csv", "results.png"} <= {p.name for p in eval_sweep.iterdir()}
