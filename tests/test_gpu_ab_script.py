"""benchmarks/gpu_ab.sh (MODE=ab gpu.sh) in SMOKE mode on the CPU. A file of its own: the test processes take a
file each, and with the grid's smoke test in tests/test_gpu_script.py the two longest tests ran one after the
other on one process while the other core idled, at the end of the suite."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from tests.conftest import python, write_folder
from tests.test_gpu_script import ROOT


@pytest.mark.slow
def test_gpu_ab_smoke_mode_trains_both_loops_and_appends_their_knn_side_by_side(tmp_path):
    """benchmarks/gpu_ab.sh (= MODE=ab gpu.sh) with SMOKE=1 on a tiny folder: our pretraining and the textbook
    loop with the same settings (experiment=cifar10, seed 0, CIFAR-10's mean/std, 10% warm-up), then the kNN of
    both encoders on avgpool and combined, as one table in the section; no throughput step."""
    data = write_folder(tmp_path / "data", per_class=8, splits=("train", "test"))
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, SMOKE="1", DATA=str(data), OUT=str(out), WORK=str(work), BATCHES="", AB_EPOCHS="2",
               AB_WORKERS="0", HOME=str(tmp_path / "home"), PYTHON=python(), DEADLINE_S="900")
    env.pop("MODE", None)
    repo_results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_ab.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = (out / "RESULTS.md").read_text()[len(repo_results):]
    assert "SMOKE test (benchmarks/gpu.sh, MODE=ab)" in section and "| cifar | ours |" not in section
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in section.splitlines() if line.startswith(("| avgpool |", "| combined |"))}
    for repr_ in ("avgpool", "combined"):
        ours, reference, diff = rows[repr_]
        assert 0 <= float(ours) <= 100 and 0 <= float(reference) <= 100
        assert float(diff) == pytest.approx(float(ours) - float(reference), abs=0.011)
    assert "Epochs: ours 2 of 2, the reference 2 of 2" in section
    # the same settings reached both loops: the run's config, and the reference's start line
    config = yaml.safe_load((work / "ab" / "ours" / "config.yaml").read_text())
    assert config["data"]["mean"] == [0.4914, 0.4822, 0.4465] and config["optim"]["name"] == "lars"
    assert config["optim"]["scheduler"]["warmup_epochs"] == 0.2 and config["seed"] == 0
    assert "[reference] 16 images, batch 8, 2 steps an epoch, 2 epochs of a 4-step schedule, lars lr 0.03125" \
        in proc.stdout
    files = {p.name for p in out.iterdir()}
    assert {"RESULTS.md", "gpu.log", "ab_ours_metrics.csv", "ab_reference_log.csv"} <= files
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == repo_results  # smoke runs leave it alone
