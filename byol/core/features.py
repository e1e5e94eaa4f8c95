"""Representations of a frozen encoder: which taps make one, and its features for a set of images.

Evaluation measures what the encoder learnt, so features come from the encoder in eval mode
and without augmentation. The device and precision helpers translate Lightning's settings for
the work done outside Lightning (extraction, kNN, the cached probe), so both parts run alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from byol.core.augment import Normalize
from byol.core.backbone import AVGPOOL, Encoder, tap_list
from byol.core.data import ImageTensors
from byol.core.errors import ConfigError, DataError
from byol.core.progress import Progress

COMBINED = "combined"


def representation_taps(name: str, taps: str | Sequence[str] = ()) -> list[str]:
    """Encoder taps concatenated into the representation ``name``.

    ``avgpool``: the global average pool only. ``combined``: avgpool followed by ``taps``
    (by default ``layer2.0`` and ``layer3.0``), whichever loss trained the encoder.
    """
    if name == AVGPOOL:
        return [AVGPOOL]
    if name == COMBINED:
        extra = [t for t in dict.fromkeys(tap_list(taps)) if t != AVGPOOL]
        if not extra:
            raise ConfigError("repr=combined needs intermediate taps in repr.taps, e.g. [layer2.0, layer3.0]")
        return [AVGPOOL] + extra
    raise ConfigError(f"unknown repr.name '{name}'; choose avgpool or combined")


def feature_dim(encoder: Encoder, taps: str | Sequence[str]) -> int:
    """Width of the concatenated representation, which sizes the classifier."""
    return sum(encoder.dims[t] for t in tap_list(taps))


def concat_features(features: Mapping[str, torch.Tensor], taps: str | Sequence[str]) -> torch.Tensor:
    """One ``(N, D)`` representation from the encoder's per-tap outputs, in the order of ``taps``."""
    return torch.cat([features[t] for t in tap_list(taps)], dim=1)


def resolve_device(accelerator: str = "auto") -> torch.device:
    """The device Lightning's ``accelerator`` setting would pick, for the work done outside Lightning."""
    accelerator = str(accelerator).lower()
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is available; "
                          f"use trainer.accelerator=cpu")
    return torch.device("cpu")


# CPU flags of bf16 matrix instructions (Intel AMX, AVX512-BF16 on Intel and AMD Zen 4); without them bf16
# autocast emulates the matrix products and a ResNet step took 5x as long as in float32 (2-core AMD EPYC, AVX2)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16_instructions(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Linux's /proc/cpuinfo flags; False elsewhere)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def machine_precision(setting, on_gpu: bool, gpu_bf16: bool = True, cpu_bf16: bool | None = None) -> str:
    """A Lightning precision for ``trainer.precision=auto``: bf16 autocast where the hardware has bf16 (a GPU
    from Ampere on, a CPU with AMX or AVX512-BF16), float16 autocast on older GPUs, float32 on other CPUs,
    where bf16 is the slowest choice. Any other setting is returned as it is."""
    if str(setting) != "auto":
        return str(setting)
    if on_gpu:
        return "bf16-mixed" if gpu_bf16 else "16-mixed"
    return "bf16-mixed" if (cpu_has_bf16_instructions() if cpu_bf16 is None else cpu_bf16) else "32-true"


def autocast_dtype(precision) -> torch.dtype | None:
    """The autocast dtype of a Lightning ``precision`` setting (None: full precision)."""
    setting = str(precision)
    if setting.startswith("bf16"):
        return torch.bfloat16
    if setting in ("16", "16-mixed", "16-true"):
        return torch.float16
    return None


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    images: torch.Tensor | ImageTensors,
    taps: str | Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Features ``(N, D)`` of uint8 ``images`` through the encoder in eval mode, without augmentation.
    A dataset (``ImageTensors``) is read a batch at a time, so a memory-mapped one stays on disk. Work longer
    than 30 s says how far it is every 30 s (:class:`byol.core.progress.Progress`).

    Runs under autocast ``dtype`` (bf16 on CPU and GPU) with channels_last inputs; the
    result has that dtype (float32 without autocast) and lives on ``device``.
    """
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    normalize = Normalize(mean, std).to(device)
    was_training = encoder.training
    encoder.eval()
    out = None
    try:
        read = images.pixels if isinstance(images, ImageTensors) else images.__getitem__
        progress = Progress(len(images), "embedding", tag="features")  # minutes for a large set on a CPU
        for start in range(0, len(images), batch_size):
            batch = normalize(read(slice(start, start + batch_size)).to(device, non_blocking=True))
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                features = concat_features(encoder(batch, taps=taps), taps)
            if out is None:
                out = torch.empty(len(images), features.shape[1], dtype=features.dtype, device=device)
            out[start:start + features.shape[0]] = features
            progress.update(start + features.shape[0])
    finally:
        encoder.train(was_training)
    if out is None:
        raise DataError("cannot extract features of an empty dataset")
    return out
