"""``metrics.csv`` continued, not restarted, by a resumed run (Lightning's CSVLogger deletes it)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from byol.core.checkpoint import atomic_write_bytes
from byol.lightning.internals import install_csv_writer


class _ContinuingWriter(ExperimentWriter):
    """metrics.csv writer that continues an existing file instead of deleting it.

    Rows logged at or after ``keep_before_step`` (steps the resumed run will repeat, written
    before the previous process was killed) are dropped, so the file reads as one run.
    """

    def __init__(self, log_dir: str, keep_before_step: int | None):
        self.keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.keep_before_step is None:  # a fresh run: an old file is stale
            path.unlink()
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader
                    if r.get("step") in (None, "") or int(float(r["step"])) < self.keep_before_step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(out.getvalue().encode(), path)
        self.metrics_keys = header


class ContinuingCSVLogger(CSVLogger):
    """``metrics.csv`` in the run folder, continued (not restarted) by a resumed run."""

    def __init__(self, save_dir, keep_before_step: int | None = None):
        # rows reach the file every step, so a killed run loses at most the step it was in
        super().__init__(save_dir=save_dir, name="", version="", flush_logs_every_n_steps=1)
        self.keep_before_step = keep_before_step
        self._writer: _ContinuingWriter | None = None

    @property
    def experiment(self) -> ExperimentWriter:
        if self._writer is None:
            self._writer = _ContinuingWriter(self.log_dir, self.keep_before_step)
            install_csv_writer(self, self._writer)
        return self._writer
