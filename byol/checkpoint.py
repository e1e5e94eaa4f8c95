"""Checkpoint files: atomic writes, safe reads, and the self-describing encoder export.

Every file is read with ``torch.load(weights_only=True)``: a crafted checkpoint cannot run
code while it is unpickled. Every file is written to a temporary file in the same folder,
flushed to disk, then renamed over the old one, so a crash mid-write leaves the previous
file intact.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from byol.errors import CheckpointError

ENCODER_FORMAT = "byol-encoder"
ENCODER_VERSION = 1


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write '{path}' ({e.strerror or e}); the previous file, if any, "
                                  f"is intact. Free disk space or choose another output folder") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def safe_load(path: str | os.PathLike, map_location="cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load '{path}': it contains objects other than tensors and plain containers, "
            f"which could run code when unpickled ({str(e).splitlines()[0][:200]}). Only load checkpoints "
            f"written by this project or re-save the weights as a plain state_dict") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a PyTorch file ({e})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with atomic writes and ``weights_only`` reads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return safe_load(path, map_location=map_location or "cpu")


def save_encoder(encoder, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Export the online encoder with the config that built it; loadable without Lightning."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    atomic_torch_save({"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "backbone": encoder.config,
                       "state_dict": state, "meta": meta or {}}, path)


def load_encoder(path: str | os.PathLike, taps=None):
    """Rebuild an :class:`~byol.backbone.Encoder` from an export written by :func:`save_encoder`.

    ``taps`` overrides the exported taps (e.g. the evaluation's representation); pooling grids
    stay those of the export unless the tap is new.
    """
    from byol.backbone import Encoder

    blob = safe_load(path)
    if not isinstance(blob, dict) or blob.get("format") != ENCODER_FORMAT:
        raise CheckpointError(f"'{path}' is not a byol encoder export (expected format '{ENCODER_FORMAT}')")
    cfg = dict(blob["backbone"])
    if taps is not None:
        cfg["taps"] = list(taps)
    encoder = Encoder(**cfg)
    load_weights(encoder, blob["state_dict"], path)
    return encoder, blob.get("meta", {})


def load_weights(module: torch.nn.Module, state: dict, source) -> None:
    """``load_state_dict`` with an error that says what does not match, instead of a 60-line dump."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} in the "
                          f"checkpoint, {tuple(own[k].shape)} expected)")
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"'{source}' holds weights of another architecture: {'; '.join(detail)}. "
                              f"Evaluate it with the backbone it was trained with (its run folder's config)")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
