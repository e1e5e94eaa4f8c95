"""The names of a folder's decoded-image cache files (``<parent>-<folder>-<key>``), and the lock that lets
one process at a time look for a cache and decode into it. Split from :mod:`byol.core.image_folder`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from byol.core.folder_scan import FolderScan


def _cache_key(folder: Path, scan: FolderScan, size: int, skip_bad: bool) -> str:
    """What the decoded tensors depend on: the class list (an empty class folder shifts the labels), and per
    file its path, label, real path (where a symlink leads), size, mtime, ctime and inode: a file replaced by
    one of the same size with its mtime restored (``cp -p``, ``rsync -t``, ``tar x``, ``touch -r``) has
    another ctime, which nobody can set. v3: decoded with JPEG's reduced scales and the square read by
    ``box`` (pixels differ slightly from v2's)."""
    def raw(text: str) -> bytes:  # a name's own bytes, also where they are not UTF-8
        return text.encode("utf-8", "surrogateescape")

    h = hashlib.sha256(raw(f"{folder.resolve()}|{size}|{skip_bad}|v3|{list(scan.classes)}\n"))
    for f, label, real in zip(scan.files, scan.labels, scan.real, strict=True):
        st = os.stat(real)
        h.update(raw(f"{f.relative_to(folder)}|{label}|{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|"
                     f"{st.st_ino}\n"))
    return h.hexdigest()[:CACHE_KEY_LENGTH]


CACHE_KEY_LENGTH = 20  # hex digits of the key in a cache file's name
CACHE_SUFFIXES = {"pt": ".pt", "npy": ".u8.npy", "meta": ".labels.pt"}  # the kinds of cache file, by suffix


def _cache_prefix(folder: Path) -> str:
    """``<parent>-<folder>`` of the folder's real path, each part at most 40 characters safe in a file name:
    the folder's name alone ('train', 'test') named every dataset's caches alike."""
    real = folder.resolve()
    parts = (re.sub(r"[^\w.-]", "_", name, flags=re.ASCII).lstrip(".")[:40] for name in (real.parent.name, real.name))
    return "-".join(p for p in parts if p) or "root"


def _cache_files(cache_dir, folder: Path, scan: FolderScan, size: int, skip_bad: bool) -> dict[str, Path]:
    """The folder's cache files in ``cache_dir``, all named ``<parent>-<folder>-<key>``: ``pt`` (the in-memory
    path's images), ``npy`` and ``meta`` (the memory-mapped images and their labels)."""
    base = Path(cache_dir).expanduser() / f"{_cache_prefix(folder)}-{_cache_key(folder, scan, size, skip_bad)}"
    return {kind: base.with_name(base.name + suffix) for kind, suffix in CACHE_SUFFIXES.items()}


def _meta_of(cache: Path) -> Path:
    """The file holding a cache file's labels and metadata: a ``.u8.npy``'s ``.labels.pt``, else itself."""
    npy, meta = CACHE_SUFFIXES["npy"], CACHE_SUFFIXES["meta"]
    return cache.with_name(cache.name.removesuffix(npy) + meta) if cache.name.endswith(npy) else cache


def _cache_name(prefix: str) -> str:
    """The pattern of the cache files' names ``<prefix>-<key><suffix>`` (see :func:`_cache_files`)."""
    suffixes = "|".join(map(re.escape, CACHE_SUFFIXES.values()))
    return rf"{re.escape(prefix)}-[0-9a-f]{{{CACHE_KEY_LENGTH}}}(?:{suffixes})"


def _temp_files_cache(name: str, prefix: str) -> str | None:
    """The cache file of the folder named ``prefix`` (:func:`_cache_prefix`) whose temporary file
    (:func:`byol.core.checkpoint.new_temp_file`) is named ``name``; None for any other file."""
    found = re.fullmatch(rf"\.({_cache_name(prefix)})\..+-\d+\.[^.]+\.tmp", name)
    return found.group(1) if found else None


@contextmanager
def decode_lock(cache: Path, folder: Path) -> Iterator[None]:
    """Held while a process looks for the cache ``cache`` (any of its kinds) of ``folder`` and decodes into it:
    runs started together (a sweep's jobs) decoded a new folder once each, and one that looked while another
    was between writing the ``.u8.npy`` and its labels (the minutes its digests take) removed that ``.u8.npy``
    as left without them and decoded again. The others now wait, then read the cache. Advisory (``flock``),
    released by the system when a process dies; the hidden lock file is removed by its holder. No lock where
    the cache folder cannot hold one (its problem is said before the decode)."""
    path = cache.with_name(f".{cache.name}.lock")
    fd = _held_lock(path, folder)
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # before the lock is let go: a waiter then finds the name gone, and retries
            os.close(fd)


def _held_lock(path: Path, folder: Path) -> int | None:
    """A descriptor holding the exclusive lock of the file ``path`` (waiting said in one line), or None."""
    said = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError:  # a cache folder that cannot be written, or a link planted under the lock's name
            return None
        try:
            if not _try_lock(fd):
                if not said:
                    print(f"[data] waiting for another process that is decoding {folder} into {path.parent}; "
                          f"its cache is read when it is done", flush=True)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
                return fd  # still the file of that name: its last holder had not removed it
        except FileNotFoundError:  # removed by its holder while this one waited: lock the next one
            pass
        except OSError:  # no locks on this file system
            os.close(fd)
            return None
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Whether the lock of ``fd`` was free (and is now held)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
