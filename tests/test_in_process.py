"""The in-process runner the end-to-end tests use (tests/in_process.py) answers as a new process does, and
leaves this one as it found it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from in_process import run_here

pytestmark = pytest.mark.slow


def masked(text: str) -> list[str]:
    """Lines with their numbers masked: timings and throughput differ from run to run."""
    return [re.sub(r"\d+(\.\d+)?", "N", line) for line in text.splitlines()]


def in_a_process(*command: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", [
    ("train.py", "experiment=smoke", "data.bogus=1"),  # refused before Hydra starts
    ("train.py", "experiment=smoke", "loss=multi", "loss.taps=[layer9.0]", "hydra.run.dir={tmp}/run"),  # by the job
    ("evaluate.py", "pretrained=random", "preset=smoke", "data=synthetic", "eval=knn", "hydra.run.dir={tmp}/eval"),
])
def test_a_command_prints_and_ends_as_it_does_in_a_new_process(tmp_path, command):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    here = run_here(*(c.format(tmp=tmp_path / "a") for c in command))
    there = in_a_process(*(c.format(tmp=tmp_path / "b") for c in command))
    assert here.returncode == there.returncode, (here.stderr, there.stderr)
    assert masked(here.stdout.replace("/a/", "/b/")) == masked(there.stdout), (here.stdout, there.stdout)
    assert masked(here.stderr.replace("/a/", "/b/")) == masked(there.stderr), (here.stderr, there.stderr)
    written = [sorted(str(p.relative_to(tmp_path / side)) for p in (tmp_path / side).rglob("*")) for side in "ab"]
    assert written[0] == written[1]


def test_the_run_leaves_this_process_as_it_found_it(tmp_path, monkeypatch):
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setenv("BYOL_IN_PROCESS_TEST", "kept")
    before = (dict(os.environ), os.getcwd(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
              torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state())
    done = run_here(str(ROOT / "train.py"), "experiment=smoke", "trainer.max_epochs=1", "trainer.deterministic=true",
                    "data.num_train=32", "data.batch_size=16", f"hydra.run.dir={tmp_path / 'run'}",
                    env={**os.environ, "PL_GLOBAL_SEED": "7"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[byol] done:" in done.stdout and (tmp_path / "run" / "encoder.pt").is_file()
    after = (dict(os.environ), os.getcwd(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
             torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state())
    assert after[:5] == before[:5] and torch.equal(after[5], before[5])
    assert not GlobalHydra.instance().is_initialized()
    assert not list(tmp_path.glob("outputs"))  # the run folder was the one given, relative to nothing here
