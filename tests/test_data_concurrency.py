"""Runs that decode the same folder at once (a sweep's jobs started together): one decodes, the others wait
and read its cache; none removes a cache another is still writing."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import class_folders

import byol.core.image_folder as image_folder
from byol.core.image_folder import load_image_folder


@pytest.mark.parametrize("storage", ["mmap", "memory"])
def test_a_run_started_while_another_writes_the_cache_waits_and_reads_it(tmp_path, monkeypatch, capsys, storage):
    folder, cache = class_folders(tmp_path / "train", 3), tmp_path / "cache"
    decoded, decode, digest, other = [], image_folder._decode, image_folder.digest_tensor, {}
    monkeypatch.setattr(image_folder, "_decode", lambda p, *a: decoded.append(p) or decode(p, *a))

    def second_run():
        other["data"] = load_image_folder(folder, 8, cache_dir=cache, workers=1, storage=storage)

    def digests_while_another_run_starts(data):  # the first run, its images decoded, its cache not yet whole
        if not other:
            other["thread"] = threading.Thread(target=second_run)
            other["thread"].start()
            other["thread"].join(timeout=1.5)  # before: it removed the .u8.npy "left without labels", decoded again
        return digest(data)

    monkeypatch.setattr(image_folder, "digest_tensor", digests_while_another_run_starts)
    first = load_image_folder(folder, 8, cache_dir=cache, workers=1, storage=storage)
    other["thread"].join(timeout=30)
    assert not other["thread"].is_alive()
    out = capsys.readouterr().out
    assert len(decoded) == 6, f"the folder was decoded {len(decoded) // 6} times"
    assert "removed the unusable cache" not in out and "waiting for another process that is decoding" in out
    assert torch.equal(other["data"].images[:], first.images[:]) and torch.equal(other["data"].labels, first.labels)
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".lock")]  # the lock goes with its holder

