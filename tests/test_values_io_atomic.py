"""Atomic writes: the new file is flushed to disk before it is renamed over the old one and the folder
after, and every file users keep (results.json, metrics.csv, the memory-mapped image cache) is written so
that a failure leaves the previous one whole."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

import byol.core.checkpoint as ckpt
from byol.core.checkpoint import atomic_write_bytes
from byol.core.disk_images import open_images, write_images
from byol.core.errors import CheckpointError
from byol.jobs.results_json import write_json
from byol.lightning.csv_logger import ContinuingCSVLogger

needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")


@needs_proc
def test_the_new_file_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_write_bytes(b"old", path)
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), path.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", recording_fsync)
    atomic_write_bytes(b"new", path)
    monkeypatch.undo()
    (temp, before), (folder, after) = synced
    assert Path(temp).parent == tmp_path and Path(temp).name.startswith(".last.ckpt.")
    assert temp.endswith(ckpt.TEMP_SUFFIX) and before == b"old"  # the data reached the disk before the rename
    assert folder == str(tmp_path) and after == b"new"  # the rename itself made durable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def failing_disk(monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ckpt.os, "fsync", fsync)


def test_a_failed_write_of_results_json_keeps_the_earlier_result(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json({"status": "ok", "test_acc": 0.5}, path)
    failing_disk(monkeypatch)
    with pytest.raises(CheckpointError, match="the previous file, if any, is intact"):
        write_json({"status": "ok", "test_acc": 0.9}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "ok", "test_acc": 0.5}


def test_a_failed_rewrite_of_metrics_csv_on_resume_keeps_every_row(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    content = "epoch,step,train/loss\n" + "".join(f"0,{s},{s / 10}\n" for s in range(6))
    path.write_text(content)
    failing_disk(monkeypatch)
    with pytest.raises(CheckpointError):
        ContinuingCSVLogger(tmp_path, keep_before_step=3).experiment  # noqa: B018 (the property opens the file)
    monkeypatch.undo()
    assert path.read_text() == content


def test_a_failed_write_of_the_mapped_image_cache_keeps_the_previous_file(tmp_path):
    path = tmp_path / "images.u8.npy"
    old = [np.full((3, 2, 2), 7, np.uint8) for _ in range(3)]
    assert write_images(iter(old), 3, (3, 2, 2), path) == [0, 1, 2]

    def dies_after_one():
        yield np.full((3, 2, 2), 1, np.uint8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_images(dies_after_one(), 3, (3, 2, 2), path)
    assert open_images(path).tolist() == np.stack(old).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.u8.npy"]  # no dataset-sized temp file left


def test_an_interrupted_shortened_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Skipped images make write_images copy the rows into a shorter second file: an interruption there
    removes both temporary files too."""
    path = tmp_path / "images.u8.npy"

    def skips_then_dies():
        yield None
        yield np.full((3, 2, 2), 1, np.uint8)

    real_open = np.lib.format.open_memmap
    calls = []

    def open_memmap(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # the shortened copy
            raise OSError(28, "No space left on device")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
    with pytest.raises(OSError, match="No space"):
        write_images(skips_then_dies(), 2, (3, 2, 2), path)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
