"""How long Ctrl+C (or SIGTERM) takes to stop a pretraining run, against the length of one step.

Starts ``train.py`` with the given overrides, waits until some optimizer steps have run, sends the
signal mid-step, and prints the seconds from the signal to the "saved ... resume with" line and to
the process's exit, beside the seconds one step takes in the same run (from its first steps). The
slowest configuration per step is the interesting one: the CIFAR stem on a CPU.

    python benchmarks/stop_latency.py                       # CIFAR stem, batch 256, synthetic data
    python benchmarks/stop_latency.py --signal TERM -- backbone.stem=imagenet data.batch_size=512
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["data=synthetic", "data.num_train=20000", "data.image_size=32", "backbone.stem=cifar",
            "data.batch_size=256", "monitor=off", "trainer.max_epochs=1", "trainer.log_every_n_steps=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signal", default="INT", choices=["INT", "TERM", "USR1"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to let run before the signal (>= 2)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides after the defaults")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the step time is measured between steps)")
    sig = getattr(signal, f"SIG{args.signal}")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        last = run / "checkpoints" / "last.ckpt"
        command = [sys.executable, "train.py", *DEFAULTS, "checkpoint.last_every_n_steps=1", *args.overrides,
                   f"hydra.run.dir={run}"]
        proc = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            times = wait_for_steps(proc, last, args.steps)
            step = (times[-1] - times[0]) / (len(times) - 1)
            time.sleep(step / 2)  # into the middle of the next step
            sent = time.perf_counter()
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=max(600, 10 * step))
            ended = time.perf_counter()
        finally:
            if proc.poll() is None:
                proc.kill()
    line = err.strip().splitlines()[-1] if err.strip() else "(no message)"
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"overrides: {' '.join(DEFAULTS + args.overrides)}")
    print(f"one optimizer step: {step:.2f} s (mean of steps 2 to {args.steps}, checkpoint writes included)")
    print(f"SIG{args.signal} sent mid-step; process ended {ended - sent:.2f} s later with status {proc.returncode}")
    print(f"its last line: {line}")
    print(f"stop time / step time: {(ended - sent) / step:.2f}")


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def wait_for_steps(proc: subprocess.Popen, last: Path, steps: int, timeout: float = 1800) -> list[float]:
    """The times at which ``last.ckpt`` first held steps 1..``steps`` (it is rewritten after every step)."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < steps:
        if proc.poll() is not None:
            raise SystemExit(f"train.py ended early:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no checkpoint of step {steps} after {timeout} s")
        try:
            step = int(torch.load(last, weights_only=True, mmap=True)["global_step"])
            seen.setdefault(step, time.perf_counter())
        except (FileNotFoundError, RuntimeError, KeyError, EOFError):
            pass
        time.sleep(0.02)
    return [seen[s] for s in sorted(seen) if s >= 1]


if __name__ == "__main__":
    main()
