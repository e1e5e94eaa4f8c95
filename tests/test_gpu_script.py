"""benchmarks/gpu.sh (MODE single, grid and ab) on tiny image folders: SMOKE runs on the CPU, and its time
limits with stand-ins for python and timeout. Apart from tests/test_benchmarks.py so that the two test
processes can share these long tests."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import python, write_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_smoke_mode_runs_every_step_on_cpu(tmp_path):
    data = write_folder(tmp_path / "data", splits=("train", "test"))
    out = tmp_path / "out"
    # a fixed number of epochs with extra overrides and no throughput (BATCHES empty; the grid test below
    # measures it): how the GPU recipe's 100-epoch target is run
    env = dict(os.environ, SMOKE="1", DATA=str(data), OUT=str(out), WORK=str(tmp_path / "work"),
               BATCHES="", PRETRAIN_BATCH="4", HOME=str(tmp_path / "home"), PYTHON=python(),
               EPOCHS="2", TRAIN_EXTRA="monitor=off ema.tau_base=0.95 data.mean=[0.5,0.4,0.3]",
               EVAL_EXTRA="split.val_size=0", KEEP_ENCODER="1")
    repo_results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(out.glob("bench_*.json"))
    results = (out / "RESULTS.md").read_text()
    assert "SMOKE test (benchmarks/gpu.sh)" in results and "| cifar | ours |" not in results.split("SMOKE test")[-1]
    assert "data.batch_size=4 trainer.max_epochs=2" in results
    assert "data.mean=[0.5,0.4,0.3]`): exit 0, 2 epochs" in results  # the pretraining ran, as asked
    encoder = (tmp_path / "work" / "pretrain" / "encoder.pt").read_bytes()
    # KEEP_ENCODER=1: the encoder comes back in parts that make the file again
    assert b"".join(p.read_bytes() for p in sorted(out.glob("encoder.pt.part*"))) == encoder
    # the probe on the run's own data and normalisation (data=imagefolder there would reset the mean to ImageNet's)
    assert "pretrained with data mean/std" not in proc.stdout and "from the run's own settings" in proc.stdout
    # the probe as the published protocols fit it: on every training image, so no validation accuracy
    assert "split.val_size=0`): test accuracy " in results and "% (no val split), repr avgpool." in results
    probe = json.loads((out / "linear_results.json").read_text())
    assert probe["val_acc"] is None and probe["split_sizes"]["val"] == 0 and probe["eval_data"]["val_size"] == 0
    config = yaml.safe_load((tmp_path / "work" / "pretrain" / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["monitor"]["enabled"] is False
    assert config["ema"]["tau_base"] == 0.95
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == repo_results  # smoke runs leave it alone


def test_gpu_script_deadline_stops_the_pretraining_resumably_and_ends_in_time(tmp_path):
    """DEADLINE_S: a pretraining that would outlast it is stopped PROBE_S before it, with its last.ckpt and
    the command that resumes it in the section, and the script ends by the deadline."""
    data = write_folder(tmp_path / "data", splits=("train", "test"))
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, SMOKE="1", DATA=str(data), OUT=str(out), WORK=str(work), BATCHES="", PRETRAIN_BATCH="4",
               HOME=str(tmp_path / "home"), PYTHON=python(), EPOCHS="100000", DEADLINE_S="45", PROBE_S="10",
               TRAIN_EXTRA="monitor=off")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - start < 45 + 15  # the deadline, and the script's own exit
    results = (out / "RESULTS.md").read_text()
    assert "exit 124, stopped by its time limit (resumable) after" in results
    assert f"`python train.py resume={work / 'pretrain'}` continues it" in results
    run = work / "pretrain"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "encoder.pt").exists()


STAND_IN_TIMEOUT = """#!/bin/bash
echo "$*" >>"$CALLS"
exec "$REAL_TIMEOUT" "$@"
"""
# train.py and evaluate.py as gpu.sh calls them, doing no work: an encoder.pt of ENCODER_BYTES, a results.json;
# any other call of python after DELAY seconds (gpu.sh's two before the pretraining: >= 2 DELAY s elapsed there),
# the one that prints torch's version answered here (importing torch took 4 s of each run)
STAND_IN_PYTHON = """#!/bin/bash
case "$1" in
  train.py|evaluate.py)
    for a in "$@"; do case "$a" in hydra.run.dir=*) dir=${a#hydra.run.dir=} ;; esac; done
    mkdir -p "$dir"
    if [ "$1" = train.py ]; then head -c "$ENCODER_BYTES" /dev/urandom >"$dir/encoder.pt"
    else echo '{"test_acc": 0.5, "val_acc": null, "repr": "avgpool"}' >"$dir/results.json"; fi ;;
  *) sleep "${DELAY:-0}"
     case "$*" in *torch.__version__*) echo "3.x torch stand-in"; exit 0 ;; esac
     exec "$REAL_PYTHON" "$@" ;;
esac
"""


def run_gpu_script_with_stand_ins(tmp_path, **env_vars) -> tuple[dict, Path]:
    """gpu.sh (single mode, SMOKE) with train.py and evaluate.py stood in for: {script: the `timeout`
    command line it ran under}, and $OUT."""
    import shutil

    bin_dir, out, calls = tmp_path / "bin", tmp_path / "out", tmp_path / "calls.txt"
    bin_dir.mkdir(parents=True)
    for name, text in (("timeout", STAND_IN_TIMEOUT), ("python", STAND_IN_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "data" / "train").mkdir(parents=True)  # no extraction
    env = dict(os.environ, SMOKE="1", DATA=str(tmp_path / "data"), OUT=str(out), WORK=str(tmp_path / "work"),
               BATCHES="", PRETRAIN_BATCH="4", EPOCHS="1", HOME=str(tmp_path / "home"),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
               REAL_PYTHON=python(), REAL_TIMEOUT=shutil.which("timeout"), CALLS=str(calls),
               **{"ENCODER_BYTES": "1000", **env_vars})
    for unset in ("DEADLINE_S", "PROBE_S", "KEEP_ENCODER"):
        if unset not in env_vars:
            env.pop(unset, None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = {}
    for line in calls.read_text().splitlines():
        limit, _, script, *args = line.split(" ")
        if script in ("train.py", "evaluate.py"):
            ran[script] = [int(limit), *args]
    return ran, out


def test_gpu_script_limits_of_the_pretraining_and_the_probe_without_and_with_a_deadline(tmp_path):
    """No DEADLINE_S: PRETRAIN_S + 120 s (SMOKE: 60 + 120) and 240 s. DEADLINE_S: the pretraining ends PROBE_S
    (60 unless set) before it, the probe gets the rest; neither gets under 30 s. The probe is on the run's own
    data (no data= override); KEEP_ENCODER unset: no encoder parts in $OUT."""
    ran, out = run_gpu_script_with_stand_ins(tmp_path / "plain")
    assert ran["train.py"][0] == 180 and ran["evaluate.py"][0] == 240
    assert not [a for a in ran["evaluate.py"][1:] if a.startswith(("data=", "data.root="))]
    assert not list(out.glob("encoder.pt.part*"))
    start = time.monotonic()
    ran, _ = run_gpu_script_with_stand_ins(tmp_path / "deadline", DEADLINE_S="1000", DELAY="2")
    took = time.monotonic() - start + 1  # elapsed() counts whole seconds
    # the time already spent counts: at least the 2 x 2 s before the pretraining
    assert 1000 - 60 - took <= ran["train.py"][0] <= 1000 - 60 - 4
    assert 1000 - took <= ran["evaluate.py"][0] <= 1000 - 4
    ran, _ = run_gpu_script_with_stand_ins(tmp_path / "probe_s", DEADLINE_S="1000", PROBE_S="200")
    assert 1000 - 200 - took - 5 <= ran["train.py"][0] <= 1000 - 200
    ran, _ = run_gpu_script_with_stand_ins(tmp_path / "short", DEADLINE_S="20", PROBE_S="10")
    assert ran["train.py"][0] == 30 and ran["evaluate.py"][0] == 30  # the floors


def test_gpu_script_keep_encoder_writes_15_mib_parts_that_make_the_file_again(tmp_path):
    """KEEP_ENCODER=1: a file coming back from the lent machine holds 16 MiB at most, so a 31 MiB encoder.pt
    comes back as three encoder.pt.part* of 15, 15 and 1 MiB, in that order; KEEP_ENCODER=0: none."""
    mib = 1 << 20
    _, out = run_gpu_script_with_stand_ins(tmp_path / "keep", KEEP_ENCODER="1", ENCODER_BYTES=str(31 * mib))
    parts = sorted(out.glob("encoder.pt.part*"))
    assert [p.stat().st_size for p in parts] == [15 * mib, 15 * mib, mib]
    encoder = (tmp_path / "keep" / "work" / "pretrain" / "encoder.pt").read_bytes()
    assert b"".join(p.read_bytes() for p in parts) == encoder
    _, out = run_gpu_script_with_stand_ins(tmp_path / "off", KEEP_ENCODER="0", ENCODER_BYTES=str(mib))
    assert not list(out.glob("encoder.pt.part*"))
    # parts that would take $OUT past the 8 files that come back (with RESULTS.md and linear_results.json,
    # still to come) are not written, and the log says why: a part silently lost would make no file
    full = tmp_path / "full" / "out"
    full.mkdir(parents=True)
    for name in ("bench_b256.json", "bench_b512.json", "a.png", "b.png"):
        (full / name).write_text("x")
    _, out = run_gpu_script_with_stand_ins(tmp_path / "full", KEEP_ENCODER="1", ENCODER_BYTES=str(31 * mib))
    assert not list(out.glob("encoder.pt.part*")) and len(list(out.iterdir())) <= 8
    said = (out / "gpu.log").read_text()
    assert "encoder.pt not kept: its 3 parts would make 10 files in $OUT, and 8 come back" in said


def test_gpu_script_refuses_an_unknown_mode(tmp_path):
    env = dict(os.environ, MODE="sweep", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "MODE must be single, grid or ab, not 'sweep'" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_grid_smoke_mode_appends_the_grid_table_for_both_losses_and_the_baseline(tmp_path):
    """benchmarks/gpu_grid.sh (= MODE=grid gpu.sh) with SMOKE=1 on a tiny folder: throughput, the
    classic + multi pretraining sweep with experiment=cifar10, kNN/linear/fine-tune on avgpool and
    combined with the random-init baseline, the report's table appended after the throughput table."""
    data = write_folder(tmp_path / "data", splits=("train", "test"))
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, SMOKE="1", DATA=str(data), OUT=str(out), WORK=str(work), BATCHES="4",
               PEERS="ours,floor", HOME=str(tmp_path / "home"), PYTHON=python())
    env.pop("MODE", None)
    repo_results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_grid.sh")], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = (out / "RESULTS.md").read_text()
    assert results.startswith(repo_results)  # the repository's file, then the new section
    section = results[len(repo_results):]
    assert "SMOKE test (benchmarks/gpu.sh, MODE=grid)" in section
    assert section.index("| cifar | ours |") < section.index("| loss | repr | eval | test acc |")
    assert "python train.py -m experiment=cifar10 loss=classic,multi" in section
    assert "exit 0, 1 epochs per run" in section
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line.split("|")[4].strip()
            for line in section.splitlines() if line.startswith(("| classic |", "| multi |", "| random-init |"))}
    for loss in ("classic", "multi", "random-init"):
        for repr_ in ("avgpool", "combined"):
            for protocol in ("linear", "finetune", "knn"):
                accuracy = rows[(loss, repr_, protocol)]
                assert 0 <= float(accuracy) <= 100, (loss, repr_, protocol, accuracy)
    assert "All 12 expected cells have results." in section  # 2 losses x 2 reprs x linear, finetune, knn
    bench = json.loads((out / "bench_b4.json").read_text())
    assert bench["cifar"]["ours"] > 0 and bench["cifar"]["floor"] > 0

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"RESULTS.md", "gpu.log", "bench_b4.json", "results.png"} <= set(files)
    assert "results.png (" in section
    assert (work / "grid" / "report" / "curves.png").exists()  # the report overlays the runs' curves
    assert "curves_overlay.png" in files and "curves_overlay.png, classic and multi overlaid (" in section
    for loss in ("classic", "multi"):
        run = work / "grid" / "train" / loss
        assert (run / "encoder.pt").exists()
        if (run / "curves.png").exists():  # written by the pretraining job when it plots its curves
            assert f"curves_{loss}.png" in files and f"curves_{loss}.png (" in section
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == repo_results  # smoke runs leave it alone
