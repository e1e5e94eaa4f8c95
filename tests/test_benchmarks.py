"""benchmarks/throughput.py, augment.py and host_ops.py on tiny image folders (the peers may be absent);
benchmarks/gpu.sh: tests/test_gpu_script.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import python, write_folder

ROOT = Path(__file__).resolve().parents[1]
TINY_HEADS = [arg for kv in ("head.proj_hidden_dim=32", "head.pred_hidden_dim=32", "head.proj_dim=16")
              for arg in ("--set", kv)]


def load_throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    proc = subprocess.run([python(), str(ROOT / "benchmarks" / "augment.py"), "--batch-size", "4",
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
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "backbone.width=0.25",
                 "--set", "trainer.precision=32-true", *TINY_HEADS])  # ours in float32: named in the tables
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
    assert "for all (but ours: trainer.precision=32-true), " in md.read_text()  # also as --markdown-from renders it
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


def test_host_ops_counts_the_operators_of_each_contender_by_part(tmp_path):
    """benchmarks/host_ops.py on a tiny folder: every part counted, the joined views fewer operators than
    one pass per view, nothing read back in a step, the floor without augmentation or Lightning."""
    spec = importlib.util.spec_from_file_location("bench_host_ops", ROOT / "benchmarks" / "host_ops.py")
    host_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_ops)
    data = write_folder(tmp_path / "data", splits=("train", "test"))
    # one counted step: the profiler's Python stacks make each one cost seconds to record and read back
    result = host_ops.main(["--batch-size", "4", "--steps", "1", "--warmup", "1", "--data", str(data),
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


def test_the_precision_line_names_an_override_of_ours():
    """``--set trainer.precision=32-true`` runs ours in float32 while the floor stays in bf16: the tables said
    "bf16 autocast + channels_last for all" all the same."""
    tp = load_throughput()
    args = SimpleNamespace(peer_precision="bf16", overrides=["backbone.width=0.25"])
    assert tp.precision_text(args) == "bf16 autocast + channels_last for all"
    args.overrides += ["trainer.precision=32-true"]
    assert tp.precision_text(args) == "bf16 autocast + channels_last for all (but ours: trainer.precision=32-true)"
    args.overrides += ["trainer.precision=bf16-mixed"]  # the last one counts, as in Hydra
    assert tp.precision_text(args) == "bf16 autocast + channels_last for all"
    args = SimpleNamespace(peer_precision="fp32", overrides=["++trainer.precision=16-mixed"])
    assert tp.precision_text(args).endswith("(as their examples) (but ours: trainer.precision=16-mixed)")
