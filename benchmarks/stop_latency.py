"""How long Ctrl+C (or SIGTERM) takes to stop a pretraining run, against the length of one step.

Starts ``train.py`` with the given overrides, waits until some optimizer steps have run, sends the
signal mid-step, and prints the seconds from the signal to the "saved ... resume with" line and to
the process's exit, beside the seconds one step takes in the same run (from its first steps). The
slowest configuration per step is the interesting one: the CIFAR stem on a CPU.

The steps are seen by polling ``last.ckpt``'s size and modification time (a ``stat``, nearly free);
the checkpoint is loaded only when it changed, to read its step: loading it at every poll would take
a good part of a core from the run being measured.

    python benchmarks/stop_latency.py                       # CIFAR stem, batch 256, synthetic data
    python benchmarks/stop_latency.py --signal TERM -- backbone.stem=imagenet data.batch_size=512
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_name  # noqa: E402  (the machine's name, as every benchmark prints it)

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
        output = Lines(proc)
        try:
            times = wait_for_steps(proc, last, args.steps, output)
            step = (times[-1] - times[0]) / (len(times) - 1)
            time.sleep(step / 2)  # into the middle of the next step
            sent = time.perf_counter()
            proc.send_signal(sig)
            proc.wait(timeout=max(600, 10 * step))
            ended = time.perf_counter()
            output.join()
        finally:
            if proc.poll() is None:
                proc.kill()
    saved = output.first("resume with", after=sent)
    last_line = output.lines[-1][1] if output.lines else "(no message)"
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"overrides: {' '.join(DEFAULTS + args.overrides)}")
    print(f"one optimizer step: {step:.2f} s (mean of steps 2 to {args.steps}, checkpoint writes included)")
    if saved is None:
        print(f"SIG{args.signal} sent mid-step; no 'resume with' line came")
    else:
        print(f"SIG{args.signal} sent mid-step; the 'saved ... resume with' line came {saved[0] - sent:.2f} s later")
    print(f"the process ended {ended - sent:.2f} s after the signal, with status {proc.returncode}")
    print(f"its last line: {last_line}")
    if saved is not None:
        print(f"line time / step time: {(saved[0] - sent) / step:.2f}")
    print(f"exit time / step time: {(ended - sent) / step:.2f}")


class Lines:
    """Every line of the child's stdout and stderr with the time it arrived, read as it comes (so that the
    time of the "resume with" line is known, and a full pipe never holds the child up)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (proc.stdout, proc.stderr)]
        for thread in self._threads:
            thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._lock:
                self.lines.append((time.perf_counter(), line.rstrip("\n")))

    def join(self, timeout: float = 30) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def first(self, text: str, after: float) -> tuple[float, str] | None:
        with self._lock:
            return next(((t, line) for t, line in self.lines if t >= after and text in line), None)

    def tail(self, n: int = 40) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines[-n:])


def file_version(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of ``path``, None if it does not exist: changes when the file is rewritten
    (checkpoints are written beside it and renamed over it, so a new version is a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def wait_for_steps(proc: subprocess.Popen, last: Path, steps: int, output: Lines,
                   timeout: float = 1800) -> list[float]:
    """The times at which ``last.ckpt`` first held steps 1..``steps`` (it is rewritten after every step).
    Polled by ``stat`` every 20 ms; loaded (to read its step) only when it changed."""
    seen: dict[int, float] = {}
    loaded = None  # the version of the file last read
    deadline = time.monotonic() + timeout
    while len(seen) < steps:
        if proc.poll() is not None:
            output.join()
            raise SystemExit(f"train.py ended early:\n{output.tail()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no checkpoint of step {steps} after {timeout} s")
        version = file_version(last)
        if version is not None and version != loaded:
            changed = time.perf_counter()  # when the new version was seen, not when its load ended
            try:
                step = int(torch.load(last, weights_only=True, mmap=True)["global_step"])
                seen.setdefault(step, changed)
                loaded = version
            except (FileNotFoundError, RuntimeError, KeyError, EOFError):
                pass  # replaced while read: read again at the next poll
        time.sleep(0.02)
    return [seen[s] for s in sorted(seen) if s >= 1]


if __name__ == "__main__":
    main()
