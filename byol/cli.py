"""Glue for the Hydra entry points: run folder, short user-facing errors."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from byol.errors import ByolError


def run_job(fn, cfg):
    """Call ``fn(cfg, run_dir)``; a :class:`ByolError` prints one line instead of a stack trace.

    In a multirun the error is reported and the sweep goes on with its other jobs; a single
    run exits with status 1.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        return fn(cfg, run_dir)
    except ByolError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        (run_dir / "FAILED").write_text(f"{e}\n")
        if hc.mode != RunMode.MULTIRUN:
            sys.exit(1)
        return None
