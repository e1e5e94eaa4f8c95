"""benchmarks/throughput.py and benchmarks/gpu.sh on tiny image folders (the peers may be absent)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY_HEADS = [arg for kv in ("head.proj_hidden_dim=32", "head.pred_hidden_dim=32", "head.proj_dim=16")
              for arg in ("--set", kv)]


def load_throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_folder(root: Path, per_class: int = 8, classes=("a", "b"), splits=("train",)) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg")
    return root


def test_archive_is_extracted_once_and_partial_extractions_are_redone(tmp_path):
    tp = load_throughput()
    src = write_folder(tmp_path / "src", per_class=2)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
    dest = tmp_path / "cache" / "cifar"

    assert tp.extract_archive(archive, dest) == dest
    assert sorted(p.name for p in (dest / "train").iterdir()) == ["a", "b"]
    assert tp.count_images(dest / "train") == 4
    marker = dest / "train" / "a" / "0.jpg"
    marker.write_bytes(b"changed")
    tp.extract_archive(archive, dest)  # complete: left alone
    assert marker.read_bytes() == b"changed"

    (dest / ".complete").unlink()  # as if a run had been killed mid-extraction
    tp.extract_archive(archive, dest)
    assert marker.read_bytes() != b"changed" and (dest / ".complete").exists()
    assert not list(dest.parent.glob("*.partial-*"))


def test_missing_and_broken_peers_are_reported_not_raised(tmp_path, monkeypatch):
    tp = load_throughput()
    (tmp_path / "broken_peer_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(tp.PEER_MODULES, "lightly", "no_such_peer_module_xyz")
    monkeypatch.setitem(tp.PEER_MODULES, "byol_pytorch", "broken_peer_mod")
    assert tp.peer_missing("lightly") == "not installed"
    assert tp.peer_missing("byol_pytorch").startswith("not importable (ModuleNotFoundError")
    assert tp.peer_missing("ours") is None and tp.peer_missing("floor") is None


def test_augmentation_benchmark_prints_every_part_against_torchvision():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "augment.py"), "--batch-size", "4",
                           "--size", "16", "--repeats", "1", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "equal work: colour jitter on every image for both" in proc.stdout  # --jitter-p 1 by default
    header = next(i for i, line in enumerate(lines) if line.startswith("part"))
    rows = {line[:24].strip(): line[24:].split() for line in lines[header + 1:]}
    assert set(rows) == {"draw the parameters", "crop + flip", "hue", "colour jitter (4 ops)", "whole view"}
    for part, (ours, torchvision, ratio) in rows.items():
        assert float(ours) > 0, part
        if part != "draw the parameters":  # no torchvision counterpart: per-batch transforms draw one set
            # the ratio of the unrounded times: equal to the printed ones' up to their rounding
            assert float(ratio.removesuffix("x")) == pytest.approx(float(ours) / float(torchvision), rel=0.3), part


def test_unknown_peer_is_refused():
    tp = load_throughput()
    with pytest.raises(SystemExit):
        tp.parse_args(["--peers", "ours,simclr"])


def test_threads_default_to_torchs_own_and_must_be_positive():
    tp = load_throughput()
    assert tp.parse_args([]).threads is None and tp.parse_args(["--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        tp.parse_args(["--threads", "0"])


@pytest.mark.parametrize(("name", "stem", "width", "dim"), [
    ("resnet18", "cifar", 0.25, 128), ("resnet18", "imagenet", 1.0, 512), ("resnet50", "cifar", 0.25, 512)])
def test_peer_projection_input_is_the_backbones_feature_size(name, stem, width, dim):
    """lightly's projection head is sized from the peer backbone's output (was 512 whatever the network)."""
    tp = load_throughput()
    backbone = tp.peer_backbone({"backbone": {"name": name, "stem": stem, "width": width}})
    assert tp.feature_dim(backbone, 16) == dim
    assert backbone.training  # left as it was found


@pytest.mark.slow
def test_benchmark_measures_every_available_contender_and_writes_consistent_json(
    tmp_path, monkeypatch, capsys
):
    tp = load_throughput()
    data = write_folder(tmp_path / "data")
    out, md = tmp_path / "bench.json", tmp_path / "results.md"
    monkeypatch.setattr(tp, "count_images", lambda folder: 16)  # fixed, to check the epoch arithmetic
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # --threads sets it: restored after
    threads = tp.torch.get_num_threads()
    try:
        tp.main(["--stem", "imagenet", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--repeats", "2",
                 "--data", str(data), "--peers", "ours,lightly,byol_pytorch,floor,floor_fp32,ours_ddp",
                 "--workers", "0", "--device", "cpu", "--json", str(out), "--markdown", str(md), "--threads", "1",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", *TINY_HEADS])
    finally:
        tp.torch.set_num_threads(threads)

    report = json.loads(out.read_text())
    ips = report["imagenet"]
    assert set(ips) == {"ours", "lightly", "byol_pytorch", "floor", "floor_fp32", "ours_ddp"} and "cifar" not in report
    for peer, value in ips.items():
        if peer in report["skipped"]:  # e.g. in CI, where the bench extra is not installed
            assert value is None and report["skipped"][peer] == "not installed"
        else:  # two interleaved samples, the best one reported
            samples = report["samples"]["imagenet"][peer]
            assert len(samples) == 2 and min(samples) > 0 and value == max(samples), peer
    assert report["ratios"]["imagenet"]["ours/floor"] == pytest.approx(ips["ours"] / ips["floor"])
    assert report["ratios"]["imagenet"]["ours/floor_fp32"] == pytest.approx(ips["ours"] / ips["floor_fp32"])
    assert report["seconds_per_epoch"]["imagenet"]["ours"] == pytest.approx(16 / ips["ours"])
    assert report["settings"]["batch_size"] == 4 and report["settings"]["repeats"] == 2
    assert report["settings"]["threads"] == 1 and report["settings"]["threads_set"] == 1
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    rows = [line for line in md.read_text().splitlines() if line.startswith("| imagenet |")]
    assert [r.split("|")[2].strip() for r in rows] == [*tp.DEFAULT_PEERS, "floor_fp32", "ours_ddp"]
    assert report["ratios"]["imagenet"]["ours/ours_ddp"] == pytest.approx(ips["ours"] / ips["ours_ddp"])
    # --markdown-from renders the saved JSON as the run appended it (on any machine, any thread count)
    tp.torch.set_num_threads(2)
    try:
        assert tp.markdown_from_json(str(out)) == md.read_text().splitlines()
    finally:
        tp.torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "(floor/floor_fp32)" in printed and "(1 torch thread (--threads))" in printed
    # interleaved: every contender's first sample before any contender's second
    order = [line.split(", ")[1].split(":")[0] for line in printed.splitlines() if "(repeat " in line]
    assert order.index("ours", 1) > max(order.index(p) for p in set(order))


def test_markdown_from_renders_a_json_written_before_the_threads_option_with_its_machines_threads():
    """The 2026-11-28 H200 files have no threads settings (--threads came later): their tables render with the
    thread count the machine recorded and torch's default, and their rows are the ones RESULTS.md holds."""
    tp = load_throughput()
    lines = tp.markdown_from_json(str(ROOT / "benchmarks" / "results" / "gpu_grid_2026-11-28" / "bench_b256.json"))
    assert "NVIDIA H200 (Intel(R) Xeon(R) Processor, 16 cores, 16 torch threads (torch's default))" in lines[1]
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    rows = [line for line in lines if line.startswith("| cifar |")]
    assert rows == ["| cifar | ours | 5110.6 | 9.8 |  | 1.76/1.81 |",
                    "| cifar | floor | 10507.8 | 4.8 | 0.49x | 1.59/1.64 |",
                    "| cifar | ours_ddp | 5225.3 | 9.6 | 0.98x | 1.88/1.99 |"]
    assert all(row in results for row in rows)


def test_markdown_from_renders_saved_gpu_jsons_as_their_own_command_and_appends_them(tmp_path, capsys):
    """--markdown-from measures nothing: the tables of JSON files saved on the lent H200 (three peers of six,
    peak GPU memory, the command as run there, not this process's) appended after what --markdown held; as
    benchmarks/RESULTS.md shows them. Without --markdown they are printed."""
    tp = load_throughput()
    saved = ROOT / "benchmarks" / "results" / "gpu_classic100_2026-11-30"
    files = [str(saved / "bench_b256.json"), str(saved / "bench_b512_compile.json")]
    md = tmp_path / "section.md"
    md.write_text("## earlier\n")
    assert tp.main([arg for f in files for arg in ("--markdown-from", f)] + ["--markdown", str(md)]) == {}
    text = md.read_text()
    assert text.startswith("## earlier\n\nBatch 256, 30 timed steps")
    tables = text[len("## earlier\n"):]
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for table in tables.split("\n\nBatch "):
        assert table.strip("\n") in results
    assert "| cifar | ours_ddp | 7371.4 | 6.8 | 1.06x | 1.88/1.98 |" in tables
    assert "`python benchmarks/throughput.py --stem cifar --batch-size 512 --steps 30 --warmup 10 --data " \
           "/tmp/cifar10 --peers ours,floor --compile --json /root/out/bench_b512_compile.json" in tables
    assert [line.split("|")[2].strip() for line in tables.splitlines() if line.startswith("| cifar |")] == \
        ["ours", "floor", "ours_ddp", "ours", "floor"]
    capsys.readouterr()
    assert tp.main(["--markdown-from", files[0]]) == {}
    assert capsys.readouterr().out == "\n".join(tp.markdown_from_json(files[0])) + "\n"
    assert md.read_text() == text


@pytest.mark.slow
def test_gpu_script_smoke_mode_runs_every_step_on_cpu(tmp_path):
    data = write_folder(tmp_path / "data", splits=("train", "test"))
    out = tmp_path / "out"
    # a fixed number of epochs with extra overrides and no throughput (BATCHES empty; the grid test below
    # measures it): how the GPU recipe's 100-epoch target is run
    env = dict(os.environ, SMOKE="1", DATA=str(data), OUT=str(out), WORK=str(tmp_path / "work"),
               BATCHES="", PRETRAIN_BATCH="4", HOME=str(tmp_path / "home"), PYTHON=sys.executable,
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
               HOME=str(tmp_path / "home"), PYTHON=sys.executable, EPOCHS="100000", DEADLINE_S="45", PROBE_S="10",
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
# any other call of python after DELAY seconds (gpu.sh's two before the pretraining: >= 2 DELAY s elapsed there)
STAND_IN_PYTHON = """#!/bin/bash
case "$1" in
  train.py|evaluate.py)
    for a in "$@"; do case "$a" in hydra.run.dir=*) dir=${a#hydra.run.dir=} ;; esac; done
    mkdir -p "$dir"
    if [ "$1" = train.py ]; then head -c "$ENCODER_BYTES" /dev/urandom >"$dir/encoder.pt"
    else echo '{"test_acc": 0.5, "val_acc": null, "repr": "avgpool"}' >"$dir/results.json"; fi ;;
  *) sleep "${DELAY:-0}"; exec "$REAL_PYTHON" "$@" ;;
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
               REAL_PYTHON=sys.executable, REAL_TIMEOUT=shutil.which("timeout"), CALLS=str(calls),
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
               PEERS="ours,floor", HOME=str(tmp_path / "home"), PYTHON=sys.executable)
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


def test_host_ops_counts_the_operators_of_each_contender_by_part(tmp_path):
    """benchmarks/host_ops.py on a tiny folder: every part counted, the joined views fewer operators than
    one pass per view, nothing read back in a step, the floor without augmentation or Lightning."""
    spec = importlib.util.spec_from_file_location("bench_host_ops", ROOT / "benchmarks" / "host_ops.py")
    host_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_ops)
    data = write_folder(tmp_path / "data", splits=("train", "test"))
    result = host_ops.main(["--batch-size", "4", "--steps", "2", "--warmup", "1", "--data", str(data),
                            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "backbone.width=0.25",
                            "--set", "monitor.val_size=4", *TINY_HEADS])
    totals, parts = result["totals"], result["parts"]
    assert set(totals) == {"run", "ours", "ours_per_view", "floor"}
    assert totals["ours"] < totals["ours_per_view"] and totals["floor"] < totals["ours"]
    assert parts["ours"]["augmentation"] < parts["ours_per_view"]["augmentation"]
    assert parts["ours"]["network forward"] == parts["floor"]["network forward"] > 0
    assert parts["run"]["online monitors"] > 0 and "online monitors" not in parts["ours"]
    assert "augmentation" not in parts["floor"] and "Lightning" not in parts["floor"]
    assert all(sum(s.values()) == 0 for s in result["syncs"].values())
    assert totals["ours"] == pytest.approx(sum(parts["ours"].values()))
    from byol.core import augment
    assert augment._hue_where.__defaults__ == (None,)  # the CPU's own path back for what runs next


def test_gpu_ab_smoke_mode_trains_both_loops_and_appends_their_knn_side_by_side(tmp_path):
    """benchmarks/gpu_ab.sh (= MODE=ab gpu.sh) with SMOKE=1 on a tiny folder: our pretraining and the textbook
    loop with the same settings (experiment=cifar10, seed 0, CIFAR-10's mean/std, 10% warm-up), then the kNN of
    both encoders on avgpool and combined, as one table in the section; no throughput step."""
    data = write_folder(tmp_path / "data", per_class=8, splits=("train", "test"))
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, SMOKE="1", DATA=str(data), OUT=str(out), WORK=str(work), BATCHES="", AB_EPOCHS="2",
               AB_WORKERS="0", HOME=str(tmp_path / "home"), PYTHON=sys.executable, DEADLINE_S="900")
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
