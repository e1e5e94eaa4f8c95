"""Data-parallel training (trainer=ddp): per-rank shards, per-rank augmentation streams, the learning
rate of the global batch, identical weights on every rank, one writer of the run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, compose_config, epochs_reported, process_of, python, signal_when, wait_for_fine_tuning_epoch
from in_process import run_here
from omegaconf import OmegaConf
from test_resume import saved_step, wait_for_step

from byol.core.data import IndexBatches, make_synthetic
from byol.core.errors import DataError
from byol.core.rng import step_generator
from byol.jobs.build import scaled_lr
from byol.lightning.callbacks import describe_step
from byol.lightning.monitors import OnlineProbes
from byol.lightning.pretrain_module import BYOLModule

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def numbered(n: int):
    """n tiny images, image i holding the value i and labelled i % 10."""
    data = make_synthetic(n, size=4)
    data.images = torch.arange(n).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone()
    data.labels = torch.arange(n) % 10
    return data


def epoch_indices(n: int, batch: int, rank: int, world: int, epoch: int = 0) -> list[list[int]]:
    batches = IndexBatches(numbered(n), batch, seed=5).shard(rank, world)
    batches.progress = lambda: (epoch, 0)
    return [images[:, 0, 0, 0].tolist() for images, _ in batches]


@pytest.mark.parametrize("n, batch, world", [(100, 8, 3), (128, 32, 2), (64, 32, 2), (10, 3, 1)])
def test_shards_are_disjoint_and_cover_the_epoch(n, batch, world):
    shards = [epoch_indices(n, batch, r, world) for r in range(world)]
    steps = n // (batch * world)
    assert all(len(s) == steps and all(len(b) == batch for b in s) for s in shards)  # same count on every rank
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen)) == steps * batch * world  # no image twice; only the uneven tail dropped
    order = IndexBatches(make_synthetic(n, size=4), batch, seed=5).order(0).tolist()
    assert set(seen) == set(order[:steps * batch * world])  # the first global batches of the permutation
    for step in range(steps):  # step b takes the next batch x world images, rank r the r-th share
        chunk = order[step * batch * world:(step + 1) * batch * world]
        assert [shards[r][step] for r in range(world)] == [chunk[r * batch:(r + 1) * batch] for r in range(world)]


def test_one_process_batches_are_unchanged_and_epochs_differ():
    order = IndexBatches(make_synthetic(40, size=4), 8, seed=5).order(1).tolist()
    assert epoch_indices(40, 8, 0, 1, epoch=1) == [order[i:i + 8] for i in range(0, 40, 8)]
    assert epoch_indices(64, 8, 0, 2, epoch=0) != epoch_indices(64, 8, 0, 2, epoch=1)


def test_shard_refusals():
    batches = IndexBatches(make_synthetic(64, size=4), 16)
    with pytest.raises(DataError, match="x 5 processes"):
        batches.shard(0, 5)
    with pytest.raises(DataError, match="rank 2"):
        batches.shard(2, 2)
    # evaluation batches (drop_last=False) lose no image, so they shard even with fewer images than ranks
    assert len(IndexBatches(make_synthetic(3, size=4), 16, drop_last=False).shard(0, 5)) == 1
    assert len(batches.shard(1, 2)) == 2 and len(batches.shard(0, 1)) == 4


def test_learning_rate_scales_with_the_global_batch():
    lars = {"base_lr": 1.0, "scale_lr_with_batch": True}
    assert scaled_lr(lars, 32) == 0.125
    assert scaled_lr(lars, 32, accumulate=2, world_size=4) == 1.0  # 32 x 2 x 4 = 256
    assert scaled_lr({"base_lr": 0.2, "scale_lr_with_batch": False}, 32, 2, 4) == 0.2


def test_each_rank_draws_its_own_views():
    module = BYOLModule(torch.nn.Identity(), None, None, tau_base=0.99, tau_schedule="cosine", seed=7)
    keys = {}
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        module._trainer = SimpleNamespace(world_size=world, global_rank=rank, current_epoch=3)
        keys[world, rank] = module.step_keys(4)
    assert keys[1, 0] == (7, 3, 4)  # one process: the streams of runs before DDP existed
    assert keys[2, 0] == (7, 3, 4, 0) and keys[2, 1] == (7, 3, 4, 1)
    draws = [torch.rand(4, generator=step_generator(None, "cpu", *k)) for k in keys.values()]
    assert not torch.equal(draws[1], draws[2])
    # a function of the keys alone
    assert torch.equal(draws[2], torch.rand(4, generator=step_generator(None, "cpu", 7, 3, 4, 1)))


def test_planned_world_counts_the_processes_of_a_ddp_config():
    from byol.jobs.build import planned_world

    assert planned_world({"strategy": "ddp", "devices": 2, "num_nodes": 2}) == 4
    assert planned_world({"strategy": "ddp_spawn", "devices": [0, 1, 2], "num_nodes": 1}) == 3
    assert planned_world({"strategy": "auto", "devices": 4, "num_nodes": 1}) == 1
    assert planned_world({"strategy": "ddp", "devices": "auto", "num_nodes": 1}) == 1


def launch_ranks(args: list[str], logs: Path, world: int = 2, timeout: float = 600) -> None:
    """``python ARGS`` as ranks 0..world-1 of one run, started here as torchrun or SLURM would start them
    (LOCAL_RANK, MASTER_ADDR/PORT), so Lightning starts no process of its own; a rank that fails ends the others
    at once (they would wait for it in a collective until the timeout)."""
    import time

    port = free_port()
    procs = []
    for rank in range(world):
        env = {**ENV, "LOCAL_RANK": str(rank), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([python(), *args], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    end = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    said = "\n".join((logs / f"rank{r}.log").read_text()[-2000:] for r in range(world))
    assert [p.returncode for p in procs] == [0] * world, said


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> Path:
    """The three two-process trainings of tests/ddp_worker.py, in one launch: their ``*.pt`` files."""
    out = tmp_path_factory.mktemp("ddp_worker")
    launch_ranks([str(ROOT / "tests" / "ddp_worker.py"), str(out)], out)
    return out


@pytest.mark.slow
def test_two_processes_hold_identical_weights(two_rank_runs):
    r0, r1 = (torch.load(two_rank_runs / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r0["steps"], r1["steps"]) == (0, 1, 2, 3, 3)
    assert r0["batches"] == r1["batches"] == 128 // (32 * 2)
    assert not set(r0["first_batch"].tolist()) & set(r1["first_batch"].tolist())  # different images
    assert r0["lr"] == r1["lr"]
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name  # online (all-reduced) and target (EMA on each rank)
    online, target = r0["params"]["online_encoder.body.conv1.weight"], r0["params"]["target_encoder.body.conv1.weight"]
    assert not torch.equal(online, target)  # the target is not a copy of the online network ...
    assert not torch.equal(target, r0["target_start"])  # ... and it moved from its start by EMA
    # the online probes train on the gathered global batch: one probe, the same on both ranks, that saw
    # the 64 images of each global batch (2 steps per epoch), and that moved from its (seeded) start
    assert r0["probe_seen"] == r1["probe_seen"] == [64, 128, 64]
    start = OnlineProbes({"avgpool": ["avgpool"]}, {"avgpool": r0["probes"]["avgpool.1.weight"].shape[1]}, 10)
    assert not torch.equal(r0["probes"]["avgpool.1.weight"], start.heads["avgpool"][1].weight.detach())
    for name, value in r0["probes"].items():
        assert torch.equal(value, r1["probes"][name]), name


DDP_CPU = ["experiment=smoke", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def train_ddp(*overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([python(), "train.py", *DDP_CPU, *overrides],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_ddp_run_resumed_from_an_epoch_checkpoint_equals_the_uninterrupted_one(tmp_path):
    """``python train.py experiment=smoke trainer=ddp trainer.devices=2 trainer.accelerator=cpu`` (keeping its
    epoch checkpoints) trains one run on the global batch, written by rank 0 alone; resumed from its first
    epoch's checkpoint, it ends where the uninterrupted run ended, bit for bit."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # data.subset above the 128 images: all of them, with a note, which rank 0 alone prints (once per process before)
    result = train_ddp("checkpoint.keep_last=2", "data.subset=1000", f"hydra.run.dir={whole}")  # 2 epochs of 2 steps
    assert result.stdout.count("[data] note: data.subset=1000 is more than the 128 training images") == 1
    assert "batch 32 per process x 2 processes (global batch 64)" in result.stdout
    assert result.stdout.count("[byol] done:") == 1  # rank 0 alone reports and writes
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["epoch0001.ckpt", "epoch0002.ckpt",
                                                                         "last.ckpt"]
    assert (whole / "encoder.pt").is_file() and (whole / "config.yaml").is_file()
    checkpoint = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["byol_config"]["trainer"]["strategy"] == "ddp"
    scheduler = checkpoint["lr_schedulers"][0]
    assert scheduler["base_lrs"][0] == pytest.approx(1.0 * 64 / 256)  # LARS base_lr 1.0 x global batch 64 / 256

    result = train_ddp("checkpoint.keep_last=2", "trainer.log_every_n_steps=3",  # a change that trains the same
                       f"resume={whole / 'checkpoints' / 'epoch0001.ckpt'}", f"hydra.run.dir={resumed}")
    assert "step 2 (the end of epoch 1)" in result.stdout
    assert result.stdout.count("resuming with changed logging settings") == 1  # rank 0's line, not one per process
    assert epochs_reported(result.stdout) == [2]  # rank 0 reports the one epoch left, trained once
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
            for run in (whole, resumed))
    assert a["global_step"] == b["global_step"] == 128 // (32 * 2) * 2
    for name, value in a["state_dict"].items():  # online, target (EMA) and BatchNorm buffers, bit for bit
        assert torch.equal(value, b["state_dict"][name]), name


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def signal_rank1_when(proc: subprocess.Popen, ready, sig: int = signal.SIGUSR1) -> tuple[str, str]:
    """Once ``ready()`` returns, ``sig`` to rank 1 alone (Lightning starts it as a child of rank 0);
    the command's (stdout, stderr) when it ends."""
    def rank1() -> int:
        (pid,) = child_pids(process_of(proc.pid))
        return pid

    _, out, err = signal_when(proc, ready, sig, timeout=300, pid=rank1)
    return out, err


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank-1 process through /proc")
def test_a_rank_killed_mid_training_is_one_line_from_the_other_with_what_is_kept(tmp_path):
    """SIGKILL (the out-of-memory killer, a scheduler) to one process of a DDP run: the other's next collective
    failed with a 60-line torch traceback ending in gloo's 'Connection reset by peer'. Now one error line that
    says another process stopped and how to resume from the last checkpoint, status 1."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([python(), "train.py", *DDP_CPU, "trainer.max_epochs=200",
                             f"hydra.run.dir={run}"], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = signal_rank1_when(proc, lambda: wait_for_step(proc, last, 2), signal.SIGKILL)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    said = line.split("stopped (")[1].split(")")[0]  # gloo's words depend on where the other process was
    # or Lightning's watch of the child processes found rank 1 dead before rank 0's next collective did
    assert said in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                    "rank 1 was killed by SIGKILL"), line
    assert line == (
        f"error: another process of this 2-process run stopped ({said}); its own output or the "
        f"scheduler's says why (killed, out of memory, its machine lost), and this one stops too: the last "
        f"checkpoint saved is kept ({last}); resume with: python train.py resume={run}")


def test_a_lost_process_is_told_only_under_ddp_and_only_for_a_lost_connection():
    """The conversion of torch's error for a process gone: other errors, and any on one process, pass unchanged."""
    import torch.distributed as dist

    from byol.core.errors import ByolError
    from byol.jobs.console import other_processes_lost

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:60635: Connection reset by "
                        "peer. This is typically caused by a remote worker hanging")
    with pytest.raises(ByolError) as err, other_processes_lost(2, lambda: "kept: X"):
        raise gloo
    assert str(err.value).startswith("another process of this 2-process run stopped (Connection reset by peer)")
    assert str(err.value).endswith("and this one stops too: kept: X")
    with pytest.raises(ByolError, match=r"stopped \(DistBackendError: NCCL error in: x\)"), \
            other_processes_lost(8, lambda: ""):
        raise dist.DistBackendError("NCCL error in: x\nmore")
    for said in ("Connection closed by peer", "Broken pipe", "NCCL communicator was aborted"):  # gloo, NCCL
        with pytest.raises(ByolError) as err, other_processes_lost(2, lambda: "kept: X"):
            raise RuntimeError(f"[rank0]: {said} on rank 0.\nException raised from recvBytes")
        assert str(err.value).startswith(f"another process of this 2-process run stopped ({said}); ")
        assert err.value.__cause__ is None and err.value.__suppress_context__  # one line: no torch traceback
    for world, error in ((1, gloo), (2, RuntimeError("CUDA out of memory")), (2, ValueError("Broken pipe"))):
        with pytest.raises(type(error)) as passed, other_processes_lost(world, lambda: ""):
            raise error
        assert passed.value is error


def test_lightnings_watch_of_a_dead_child_leaves_rank0_time_then_says_what_is_kept(monkeypatch, capsys):
    """Lightning's launcher SIGKILLed rank 0 within 5 s of finding a child dead: status -9 and not a word, whenever
    rank 0's next collective had not failed first (it happened under load in the 2-process test above). Now the
    children are killed, rank 0 is left time to stop on its own, and is then ended with the one line, status 1."""
    import time

    from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from byol.jobs import console

    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    slept, ended = [], []
    monkeypatch.setattr(console, "LOST_GRACE_S", 7.5)
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(os, "_exit", ended.append)
    try:
        with console.other_processes_lost(3, lambda: "kept: X"):
            observer = _ChildProcessObserver(os.getpid(), [alive, dead])
            assert _ChildProcessObserver._byol_says_what_is_kept  # else _run would SIGKILL this test's process
            assert observer._run() is True  # found rank 2 dead: our _terminate_all, not Lightning's SIGKILL to us
        assert slept == [7.5] and ended == [1]
        monkeypatch.undo()
        assert alive.wait(timeout=10) == -signal.SIGKILL  # the others are stopped as Lightning stops them
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: another process of this 3-process run stopped (rank 2 was killed by SIGKILL); its own output or "
            "the scheduler's says why (killed, out of memory, its machine lost), and this one stops too: kept: X")
    finally:
        alive.kill()
    # outside other_processes_lost there is nothing to say: Lightning's own, SIGKILL to all (here a stand-in main)
    main = subprocess.Popen(["sleep", "60"])
    try:
        assert _ChildProcessObserver(main.pid, [dead])._run() is True
        assert main.wait(timeout=10) == -signal.SIGKILL
    finally:
        main.kill()
    assert console.how_it_ended(1, 3) == "rank 1 ended with status 3"
    assert console.how_it_ended(2, -15) == "rank 2 was killed by SIGTERM"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank-1 process through /proc")
def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes_on_one_process(tmp_path):
    """SLURM signals every task, but not at the same instant, and a terminal's Ctrl+C may reach one
    process first: the ranks agree on the stop step, so neither waits forever for the other.
    The stopped 2-process run then continues on one process (its global batch halves: README)."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([python(), "train.py", *DDP_CPU, "trainer.max_epochs=40",
                             "checkpoint.last_every_n_steps=1",
                             f"hydra.run.dir={run}"], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    out, err = signal_rank1_when(proc, lambda: wait_for_step(proc, last, 2))
    assert proc.returncode == 128 + signal.SIGUSR1, out[-2000:] + err[-3000:]
    step = saved_step(last)
    assert err.strip().splitlines()[-1] == (f"received SIGUSR1: saved checkpoints/last.ckpt at "
                                            f"{describe_step(step, 2)}; resume with: python train.py resume={run}")
    assert not (run / "encoder.pt").exists() and step < 80

    # mid-epoch, on one process with the same global batch (2 x 32): the rest of the epoch is cut the same
    resumed = run_here("train.py", f"resume={run}", "trainer=default", "data.batch_size=64",
                       f"trainer.max_epochs={step // 2 + 1}")  # to the end of the stopped epoch, in this process
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stdout and "1 process" not in resumed.stdout
    assert "batch 64, " in resumed.stdout  # one process: the global batch is the per-device batch
    final = torch.load(last, weights_only=True, map_location="cpu")
    assert final["global_step"] > step and (run / "encoder.pt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank-1 process through /proc")
def test_a_signal_to_one_rank_stops_a_two_process_fine_tuning_with_no_result(tmp_path):
    """As in training, the ranks of a fine-tuning agree on the batch to stop after, whichever got the
    signal: both stop (none waits forever in a collective), the command says so with status 128 + signal,
    and no results.json is written."""
    run_dir = tmp_path / "eval"
    # preset=smoke: the smoke run's small network (an epoch of the full CIFAR-stem one took 117 s on a 2-core AMD
    # EPYC in bf16, past the wait below)
    proc = subprocess.Popen([python(), "evaluate.py", "pretrained=random", "data=synthetic", "preset=smoke",
                             "eval=finetune",
                             "eval.epochs=500", *DDP_CPU[1:], f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = signal_rank1_when(proc, lambda: wait_for_fine_tuning_epoch(proc, run_dir, timeout=300))
    assert proc.returncode == 128 + signal.SIGUSR1, out[-2000:] + err[-3000:]
    assert "received SIGUSR1: fine-tuning stopped in epoch" in err, err[-3000:]
    assert "Traceback" not in err and not (run_dir / "results.json").exists()


def eval_shards(n: int, batch: int, world: int) -> list[list[tuple[int, int]]]:
    """(image, label) of every rank's evaluation batches of :func:`numbered` images."""
    data = numbered(n)
    ranks = []
    for rank in range(world):
        batches = IndexBatches(data, batch, shuffle=False, drop_last=False).shard(rank, world, split_batch=True)
        ranks.append([list(zip(images[:, 0, 0, 0].tolist(), labels.tolist(), strict=True))
                      for images, labels in batches])
    return ranks


@pytest.mark.parametrize("n, batch, world", [(100, 8, 2), (64, 32, 2), (10, 6, 3), (7, 4, 2), (5, 4, 4)])
def test_evaluation_shards_score_every_image_once(n, batch, world):
    ranks = eval_shards(n, batch, world)
    assert len({len(r) for r in ranks}) == 1  # the same number of batches on every rank: none waits alone
    assert {len(b) for r in ranks for b in r} == {batch // world}  # the global batch, split evenly
    counted = [image for r in ranks for b in r for image, label in b if label != -1]
    assert sorted(counted) == list(range(n))  # every image once across ranks, none lost, none twice
    padding = [(image, label) for r in ranks for b in r for image, label in b if label == -1]
    assert len(padding) == len(ranks[0]) * batch - n
    for r in ranks:
        for b in r:
            assert all(label == image % 10 for image, label in b if label != -1)  # images keep their labels


def test_one_process_evaluation_batches_are_unchanged():
    (only,) = eval_shards(10, 4, 1)
    assert [[image for image, _ in b] for b in only] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(DataError, match="cannot be split evenly among 3 processes; choose a batch size divisible by 3"):
        IndexBatches(make_synthetic(20, size=4), 8, drop_last=False).shard(0, 3, split_batch=True)


@pytest.mark.parametrize("overrides, message", [
    (["trainer=ddp", "trainer.strategy=ddp_spawn"], "not trainer.strategy=ddp_spawn"),
    (["trainer.devices=2"], "need the DDP strategy: add trainer=ddp"),
    (["trainer.num_nodes=2"], "need the DDP strategy: add trainer=ddp"),
    (["trainer=ddp", "eval=finetune", "eval.batch_size=33"], "eval.batch_size=33 is the global batch, shared by 2"),
    # BatchNorm (the classifier's, the encoder's when fine-tuned) needs 2 images a batch: a traceback before
    (["data=synthetic", "eval=finetune", "eval.batch_size=1"],
     r"eval.batch_size=1 leaves 1 image per batch on each of 1 process\(es\); BatchNorm needs at least 2: set "
     r"eval.batch_size to at least 2"),
    (["data=synthetic", "eval=linear", "eval.cached_features=false", "eval.batch_size=1"],
     "BatchNorm needs at least 2"),
    (["data=synthetic", "trainer=ddp", "eval=finetune", "eval.batch_size=2"],
     r"leaves 1 image per batch on each of 2 process\(es\)"),
])
def test_evaluation_with_processes_it_cannot_use_is_refused_before_any_result(tmp_path, overrides, message):
    from conftest import compose_config

    from byol.core.errors import ConfigError
    from byol.jobs.evaluate import evaluate

    cfg = compose_config("evaluate", ["preset=smoke", "pretrained=random", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg, tmp_path / "eval", requested=overrides)
    assert not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.slow
def test_evaluation_sweep_on_two_processes_scores_every_image_once_in_one_sweep_folder(tmp_path):
    """evaluate.py -m under trainer=ddp: Lightning re-runs the command, sweep included, in the second
    process; both processes work in rank 0's sweep folder, fine-tuning is scored over both ranks'
    shards (every test image once), kNN runs in rank 0 alone, and rank 0 alone writes and reports."""
    from byol.jobs.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(compose_config("train", ["experiment=smoke", "trainer.max_epochs=1"], run), run)  # in this process
    result = subprocess.run([python(), str(ROOT / "evaluate.py"), "-m", "preset=smoke", f"pretrained={run}",
                             "eval=knn,finetune", *DDP_CPU[1:]], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun" / "eval").iterdir()  # one sweep folder, not one per process
    record = OmegaConf.load(sweep / "multirun.yaml")  # rank 0's, not the second process's re-run of the sweep
    assert list(record.hydra.overrides.task) == ["preset=smoke", f"pretrained={run}", "eval=knn,finetune", *DDP_CPU[1:]]
    assert record.hydra.job.name == "evaluate"
    knn, finetune = (json.loads(next(sweep.glob(f"{job}_eval={name},*/results.json")).read_text())
                     for job, name in ((0, "knn"), (1, "finetune")))
    sizes = finetune["split_sizes"]
    assert (finetune["processes"], finetune["val_images"], finetune["test_images"]) == (2, sizes["val"], sizes["test"])
    assert "processes" not in knn and knn["status"] == finetune["status"] == "ok"
    assert result.stdout.count("finetune on avgpool -> ") == result.stdout.count("knn on avgpool -> ") == 1
    assert "eval=knn trains nothing through Lightning, so it runs in this process alone" in result.stdout


def relative_difference(a: dict, b: dict, prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix) and a[k].is_floating_point() and "running" not in k]
    x, y = (torch.cat([d[k].flatten() for k in keys]) for d in (a, b))
    return float((x - y).norm() / x.norm())


@pytest.mark.slow
def test_two_processes_with_synchronised_batchnorm_match_one_process_on_the_global_batch(tmp_path, monkeypatch,
                                                                                       two_rank_runs):
    """Sharding, gradient averaging, the global-batch learning rate, EMA and BatchNorm over the global
    batch together: two processes of batch 32 end where one process of batch 64 ends, three steps on.
    The views are the images themselves (no augmentation: the ranks' streams differ from one process's
    by design). The first step starts from the same weights, so its loss must agree to float32 rounding
    (1e-5; per-process statistics miss by 3%). Later steps amplify rounding: a different BatchNorm kernel
    and float32 sums in another order move a few ReLUs across zero, so the tolerance there is 5e-3
    (relative, losses and weights), set against the float noise of one process alone: the single run
    on 2 threads instead of 1 ends 1.5e-3 from itself (encoder weights and third loss, AMD EPYC, 2026-11-30).
    Two processes without synchronised statistics end 20-170x further apart than with them (at least
    10x is asserted)."""
    from syncbn_worker import main as syncbn_run

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it: taken back after the test
    syncbn_run(tmp_path, "single")  # one process: this one (the workers run on one thread, as the worker script)
    one = torch.load(tmp_path / "single_rank0.pt", weights_only=True)
    r0, r1, local = (torch.load(two_rank_runs / f"{name}.pt", weights_only=True)
                     for name in ("ddp_rank0", "ddp_rank1", "ddp_local_rank0"))
    assert one["steps"] == r0["steps"] == 3 and one["lr"] == pytest.approx(r0["lr"])
    mean_of_ranks = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"], strict=True)]
    assert mean_of_ranks[0] == pytest.approx(one["losses"][0], rel=1e-5)
    assert mean_of_ranks == pytest.approx(one["losses"], rel=5e-3)
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # every rank holds the same
    for network in ("online_encoder", "target_encoder", "online_projectors", "predictors"):
        synchronised = relative_difference(one["state"], r0["state"], network)
        assert synchronised < 5e-3, network  # measured: 3-7e-4 online encoder, 1-2e-4 heads, 2e-6 target
        assert relative_difference(one["state"], local["state"], network) > 10 * synchronised, network
    local_rank1 = torch.load(two_rank_runs / "ddp_local_rank1.pt", weights_only=True)
    local_losses = [(a + b) / 2 for a, b in zip(local["losses"], local_rank1["losses"], strict=True)]
    assert local_losses[0] != pytest.approx(one["losses"][0], rel=1e-2)  # per-process statistics: another loss


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun_train_one_run(tmp_path):
    """The README's several-node command on one machine: two torchrun launches, node ranks 0 and 1, one
    process each (trainer.num_nodes=2): one run on the global batch, written by the first node alone."""
    run, port = tmp_path / "run", free_port()
    nodes = [subprocess.Popen([python(), "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "train.py", *DDP_CPU[:2], "trainer.devices=1", "trainer.num_nodes=2",
                               "trainer.accelerator=cpu", "trainer.max_epochs=1", f"hydra.run.dir={run}"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-2000:] + err[-2000:] for out, err in outputs)
    first, second = (out for out, _ in outputs)
    assert "batch 32 per process x 2 processes (global batch 64)" in first
    assert first.count("[byol] done:") == 1 and "[byol] done:" not in second
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 128 // 64  # the 128 images shared by the two nodes: 2 global batches
    assert checkpoint["lr_schedulers"][0]["base_lrs"][0] == pytest.approx(1.0 * 64 / 256)


def test_processes_that_loaded_different_data_stop_with_one_line_instead_of_waiting_forever():
    """Each process of a run loads its own data: a folder that grew while rank 1 started gave the ranks epochs of
    different lengths, and the run hung in a collective (SIGTERM could not end it). The ranks compare a
    fingerprint of their data first; any difference (size, labels, sampled pixels) is a DataError on all of them."""
    from types import SimpleNamespace

    from byol.core.data import ImageTensors
    from byol.core.errors import DataError
    from byol.lightning.data_module import check_same_data

    def strategy_seeing(*datasets):
        return SimpleNamespace(root_device=torch.device("cpu"),
                               all_gather=lambda mine: torch.stack([d.fingerprint() for d in datasets]))

    images, labels = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 4
    same = ImageTensors(images, labels)
    check_same_data(strategy_seeing(same, ImageTensors(images.clone(), labels.clone())), same)
    grown = ImageTensors(torch.cat([images, images[:8]]), torch.cat([labels, labels[:8]]))
    with pytest.raises(DataError, match=r"^the 2 processes of this run loaded different training data \(rank 0: 40 "
                                        r"images; rank 1: 48 images\): the folder changed while they started"):
        check_same_data(strategy_seeing(same, grown), same)
    edited = images.clone()
    edited[13, 1, 2, 3] ^= 1
    relabelled = labels.clone()
    relabelled[7] = 0
    for other in (ImageTensors(edited, labels), ImageTensors(images, relabelled)):
        with pytest.raises(DataError, match=r"rank 0: 40 images; rank 1: 40 images \(other content\)"):
            check_same_data(strategy_seeing(same, other), same)
