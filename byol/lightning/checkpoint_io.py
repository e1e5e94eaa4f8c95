"""Lightning's checkpoint I/O with this project's atomic writes and ``weights_only`` reads."""

from __future__ import annotations

from pytorch_lightning.plugins.io import TorchCheckpointIO

from byol.core.checkpoint import atomic_torch_save, safe_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with atomic writes and ``weights_only`` reads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return safe_load(path, map_location=map_location or "cpu")
