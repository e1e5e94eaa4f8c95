"""``metrics.csv`` continued, not restarted, by a resumed run (Lightning's CSVLogger deletes it)."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from byol.core.checkpoint import atomic_write_bytes
from byol.lightning.internals import install_csv_writer


class _ContinuingWriter(ExperimentWriter):
    """metrics.csv writer that continues an existing file instead of deleting it.

    Rows logged at or after ``keep_before_step`` (steps the resumed run will repeat, written
    before the previous process was killed) are dropped, so the file reads as one run. A file
    it cannot read as metrics (not CSV, a step that is no whole number, more values than its header)
    is kept aside, named in a note, and the run starts a new metrics.csv: never lost, never a stop.
    """

    def __init__(self, log_dir: str, keep_before_step: int | None):
        self.keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_symlink():  # never written through (the job's folder check refuses one before this)
            path.unlink()
        if not path.is_file():
            return
        if self.keep_before_step is None:  # a fresh run: an old file is stale
            path.unlink()
            return
        try:
            header, rows = kept_rows(path, self.keep_before_step)
        except (csv.Error, ValueError) as e:  # UnicodeDecodeError is a ValueError
            aside = set_aside(path)
            print(f"[byol] note: {path} cannot be continued ({' '.join(str(e).split())[:200]}); it is kept as "
                  f"{aside.name} beside it, and this run writes a new {path.name}", flush=True)
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(out.getvalue().encode(), path)
        self.metrics_keys = header


def kept_rows(path: Path, before_step: int) -> tuple[list[str], list[dict]]:
    """The header of the metrics file ``path`` and its rows of steps before ``before_step`` (and rows
    without a step); a ValueError or csv.Error says where it is not such a file."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            if None in row:
                raise ValueError(f"line {reader.line_num} has more values than the header")
            step = row.get("step")
            if step in (None, ""):
                rows.append(row)
                continue
            try:
                number = float(step)
            except ValueError:
                number = math.nan
            if not number.is_integer() or number < 0:
                raise ValueError(f"line {reader.line_num}: step {step[:40]!r} is not a whole number")
            if number < before_step:
                rows.append(row)
    return header, rows


def set_aside(path: Path) -> Path:
    """Move ``path`` to ``<stem>.unreadable-<time><suffix>`` beside it (numbered when taken); the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.stem}.unreadable-{stamp}{path.suffix}"), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.stem}.unreadable-{stamp}-{n}{path.suffix}")
    path.replace(target)
    return target


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
