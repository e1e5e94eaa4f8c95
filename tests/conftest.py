"""Shared helpers: Hydra composition outside an app, tiny configs and encoders for fast tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Tiny tensors on a small shared machine: one intra-op thread is ~10x faster than two threads
# competing with other jobs (measured: 0.25 s vs 2-5 s for a ResNet-18 step at batch 4).
torch.set_num_threads(1)
# ... and the same for the train.py / evaluate.py / benchmark processes the tests start (they inherit
# this environment): with two test workers on two cores, their default of one thread a core made
# the suite 758 s instead of 619 s here.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def python() -> str:
    """The ``python`` for a test's own processes where the process itself is not the subject: the launcher of
    ``tests/zygote.py``, which forks commands from a server that has imported torch and Lightning once (a
    real start costs ~8 s of imports here). ``BYOL_TEST_REAL_PYTHON=1`` gives real processes throughout."""
    if os.environ.get("BYOL_TEST_REAL_PYTHON") == "1" or not Path("/proc/self/fd").is_dir():  # it lists them there
        return sys.executable
    import zygote

    return zygote.launcher()


def process_of(pid: int) -> int:
    """The process that runs the command of a process started with :func:`python` (its children are its)."""
    import zygote

    return zygote.process_of(pid)


@pytest.fixture(scope="session", autouse=True)
def server_started_early():
    """The server imports while the first tests run, so that it is ready when a test starts a process."""
    python()


def epochs_reported(stdout: str) -> list[int]:
    """The epochs a training run reports finishing (its ``[byol] epoch N/M`` lines): a resumed run must
    list only those after its checkpoint, which tells a real resume from a silent restart at step 0."""
    return [int(n) for n in re.findall(r"^\[byol\] epoch (\d+)/", stdout, flags=re.MULTILINE)]


def class_folders(root: Path, per_class: int = 2, size: int = 8, classes=("cat", "dog")) -> Path:
    """``root/<class>/<i>.png``: small random RGB images, the same for the same arguments."""
    import numpy as np
    from PIL import Image

    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng(10 * k + i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def ended_epoch(batches: int = 4, done: int | None = None) -> dict:
    """A fake trainer's fields that say how far the epoch ending now got (``done`` of ``batches``; all by
    default): the epoch-end hooks leave out an epoch that a stop limit cut (:func:`epoch_cut_short`)."""
    from types import SimpleNamespace

    progress = SimpleNamespace(current=SimpleNamespace(ready=batches if done is None else done))
    return {"num_training_batches": batches,
            "fit_loop": SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))}


def compose_config(config_name: str, overrides=(), output_dir: str | Path = "/tmp/byol-tests") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as ``@hydra.main`` would, with ``${hydra:...}`` resolvable.

    The compose API leaves ``hydra.runtime.output_dir`` unset; the logger configs interpolate it,
    so it is set to ``output_dir`` and registered as the current Hydra config.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config without the ``hydra`` node, as ``byol.jobs.pretrain`` hands it to the module."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)  # its sweep fields stay unset outside a real run
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(autouse=True)
def signal_mask_kept():
    """A test must leave the worker's blocked signals as it found them: every process started afterwards
    inherits the mask, and a sweep or job with SIGTERM / SIGUSR1 blocked cannot be stopped (two signal tests
    failed later in the same worker after a benchmark left them blocked). Restored, then failed on."""
    can = hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, []) if can else set()
    yield
    after = signal.pthread_sigmask(signal.SIG_SETMASK, before) if can else set()
    assert after == before, f"the test left signals blocked: {sorted(s.name for s in after - before)}"


@pytest.fixture
def smoke_config(tmp_path):
    """Factory: the resolved ``experiment=smoke`` train config (plain dict) with extra overrides."""

    def make(*overrides: str) -> dict:
        return plain_config(compose_config("train", ["experiment=smoke", *overrides], tmp_path))

    return make


def signal_when(proc: subprocess.Popen, ready: Callable[[], object], sig: int, timeout: float = 60,
                pid: Callable[[], int] | None = None):
    """Send ``sig`` to ``proc`` (or to the process ``pid()`` names, e.g. one of its children) once ``ready()``
    returns, then wait for ``proc`` to end; whatever fails on the way, no process is left behind. Returns
    ``(ready's result, stdout, stderr)``."""
    try:
        result = ready()
        if pid is None:
            proc.send_signal(sig)
        else:
            os.kill(pid(), sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return result, out, err


def add_run_callback(monkeypatch, callback) -> None:
    """``callback`` joins the callbacks of the trainer that ``byol.jobs.pretrain_fit`` builds for a run."""
    import byol.jobs.pretrain_fit as fit

    build = fit.build_run_trainer
    monkeypatch.setattr(fit, "build_run_trainer",
                        lambda *a, **k: (t := build(*a, **k), t.callbacks.append(callback))[0])


def wait_for_fine_tuning_epoch(proc: subprocess.Popen, run_dir: Path, timeout: float) -> None:
    """Until the first fine-tuning epoch's validation accuracy is in ``run_dir``'s metrics.csv."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.csv"
    while not metrics.is_file() or "val/acc" not in metrics.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "no epoch of fine-tuning ended"
        time.sleep(0.1)


def imported(importtime_stderr: str, package: str) -> bool:
    """Whether a process run with ``python -X importtime`` imported ``package`` (at any depth: a nested import's
    name is indented in that report)."""
    import re

    return re.search(rf"^import time:[^|]*\|[^|]*\|\s*{re.escape(package)}$", importtime_stderr, re.M) is not None


# the variables by which launchers (SLURM, submitit, torchrun, MPI, LSF) tell a process its place
LAUNCHER_PREFIXES = ("SLURM_", "SUBMITIT_", "LSB_", "JSM_", "OMPI_", "PMI_")
LAUNCHER_NAMES = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                  "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_launcher(monkeypatch):
    """The environment of a plain ``python train.py``: none of a launcher's variables (the tests may run
    under SLURM or torchrun themselves)."""
    for key in list(os.environ):
        if key.startswith(LAUNCHER_PREFIXES) or key in LAUNCHER_NAMES:
            monkeypatch.delenv(key)
    return monkeypatch


def write_folder(root: Path, per_class: int = 8, classes=("a", "b"), splits=("train",)) -> Path:
    """``root/<split>/<class>/<i>.jpg``: random 32x32 JPEGs, the same for the same arguments."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg")
    return root
