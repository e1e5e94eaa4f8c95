"""Checks of a file handed to us as a checkpoint before and after ``torch.load`` reads it: what would make the read
take far more memory than the file, and torch's reasons for refusing one, in words that never advise the unsafe
way of loading it."""

from __future__ import annotations

import zipfile
from pathlib import Path

from byol.core.errors import CheckpointError


def refuse_inflating(path: Path) -> None:
    """A :class:`CheckpointError` for a file whose reading would inflate (:func:`inflating_entries`)."""
    inflated = inflating_entries(path)
    if inflated:
        raise CheckpointError(f"refusing to load '{path}': {inflated}, which torch.save never writes: reading it "
                              f"could take far more memory than the file's size. Nothing was loaded. Only load "
                              f"checkpoints written by this project")


def inflating_entries(path: Path) -> str | None:
    """What makes a zip archive expand when read (None: nothing): compressed entries, or entries declaring more
    bytes than the file holds. torch.save stores its entries as they are, but torch.load inflates compressed
    ones in memory: a few MB could ask for many GB before any check of what they hold. The central directory
    alone is read."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None  # torch.load's own error says what is wrong with it
    compressed = sum(e.compress_type != zipfile.ZIP_STORED for e in entries)
    if compressed:
        return f"it holds {compressed} compressed entr{'y' if compressed == 1 else 'ies'}"
    declared, size = sum(e.file_size for e in entries), path.stat().st_size
    if declared > size:
        return f"its entries declare {declared:,} bytes, more than the file's {size:,}"
    return None


def torch_detail(error: Exception) -> str:
    """torch's reason for not reading a file, in one line and never with its advice to load the file with
    weights_only=False (which would run whatever code it holds)."""
    text = " ".join(str(error).split())
    if "weights_only" not in text:
        return text
    if "legacy .tar format" in text:
        return "it is in torch's legacy tar format, which cannot be read without running what it holds"
    return "torch cannot read it without the unrestricted loading that would run what it holds"


def empty_file(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def starts_like_torch(path: Path) -> bool:
    """Whether the file begins as torch.save writes: a zip archive, or a pickle (the legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith((b"PK\x03\x04", b"\x80"))
