"""Lightning's checkpoint I/O with this project's atomic writes and ``weights_only`` reads, and the check
of the fields Lightning itself reads back from a checkpoint (its loop counters, version, precision state)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from packaging.version import InvalidVersion, Version
from pytorch_lightning.plugins.io import TorchCheckpointIO

from byol.core.checkpoint import alternatives, atomic_torch_save, epochs_done, mid_epoch, safe_load
from byol.core.errors import CheckpointError
from byol.core.state_check import shown, structure_problem, tensors_problem, value_problem, whole
from byol.lightning.internals import fit_loop_state_template

# torch's GradScaler state (16-mixed precision), under the precision plugin's name or Lightning 1.x's
SCALER_STATE = {"scale": 0.0, "growth_factor": 0.0, "backoff_factor": 0.0, "growth_interval": 0,
                "_growth_tracker": 0}
SCALER_KEYS = ("MixedPrecision", "native_amp_scaling_state")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with atomic writes and ``weights_only`` reads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return safe_load(path, map_location=map_location or "cpu")


def damaged_checkpoint(path, problem: str) -> CheckpointError:
    """The one-line error for a training checkpoint whose contents cannot be resumed, with what to do."""
    others = alternatives(Path(path))
    if others.startswith(" No other"):
        others += (": move it away to train the run again from its start, or train into another folder "
                   "(hydra.run.dir=NEW)")
    return CheckpointError(f"checkpoint '{path}' is damaged or was edited, and cannot be resumed: {problem}."
                           f"{others}")


def _fit_loop_problem(saved) -> str | None:
    """The fit loop's counters against this Lightning's layout: each part it reads (a part of an older
    layout that it skips may be missing), nothing more inside a part, whole numbers and bools in place."""
    template = fit_loop_state_template()
    if not isinstance(saved, Mapping):
        return f"loops.fit_loop is {shown(saved)}, not a mapping"
    return next((p for p in (value_problem(saved[k], template[k], f"loops.fit_loop.{k}")
                             for k in template if k in saved) if p), None) or _counters_problem(saved)


def _counters_problem(saved: Mapping) -> str | None:
    """The epoch and batch counters in the order Lightning keeps them (ready >= started >= processed >=
    completed >= 0, at most one epoch under way): edited ones made a resumed run train nothing and say done,
    or skip half an epoch."""
    for part in ("epoch_progress", "epoch_loop.batch_progress"):
        for scope in ("current", "total"):
            counts = (saved.get(part) or {}).get(scope)
            if not isinstance(counts, Mapping):
                continue
            values = [counts.get(k) for k in ("ready", "started", "processed", "completed")]
            if None in values:
                continue
            if not all(whole(v) for v in values) or values != sorted(values, reverse=True) or \
                    (part == "epoch_progress" and values[0] > values[2] + 1):
                return f"loops.fit_loop.{part}.{scope} is {shown(dict(counts))}, not counters Lightning keeps"
    return None


def lightning_fields_problem(checkpoint: Mapping) -> str | None:
    """What is wrong with the parts of a training checkpoint that Lightning and the jobs read besides the
    model's own state (None: nothing): step and epoch, the version, the loop counters, the callbacks'
    states, the optimizer and scheduler lists, a gradient scaler's state."""
    for key in ("global_step", "epoch"):
        if (key in checkpoint or key == "global_step") and not whole(checkpoint.get(key)):
            return f"{key} is {shown(checkpoint.get(key))}, not a whole number of 0 or more"
    version = checkpoint.get("pytorch-lightning_version")
    try:
        Version(version)
    except (InvalidVersion, TypeError):
        return f"pytorch-lightning_version is {shown(version)}, not a version number"
    loops = checkpoint.get("loops")
    if loops is not None:
        if not isinstance(loops, Mapping) or "fit_loop" not in loops:
            return f"loops is {shown(loops)}, not a mapping that holds 'fit_loop'"
        problem = _fit_loop_problem(loops["fit_loop"])
        if problem:
            return problem
    callbacks = checkpoint.get("callbacks")
    if callbacks is not None and not (isinstance(callbacks, Mapping) and all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in callbacks.items())):
        return f"callbacks is {shown(callbacks)}, not a mapping of callback names to their states"
    for key in ("optimizer_states", "lr_schedulers"):
        if not isinstance(checkpoint.get(key), list):
            return f"{key} is {shown(checkpoint.get(key))}, not a list"
    for key in SCALER_KEYS:
        if key in checkpoint:
            problem = structure_problem(checkpoint[key], SCALER_STATE, key)
            if problem:
                return problem
    return None


MAX_LAYOUT = {"epoch_steps": 10**9, "world_size": 10**6}  # beyond any run


def layout_problem(checkpoint: Mapping) -> str | None:
    """Whether the checkpoint's ``byol_layout`` is one :meth:`BYOLModule.layout` writes (absent from files written
    before it existed): whole numbers in range, and an offset that puts the run where its own step count and
    epochs say, within its epochs done (and the one under way, for a file taken inside an epoch). An edited
    offset moved the schedules anywhere: lr 0 and tau 1 for the rest of the run, or an overflow."""
    layout = checkpoint.get("byol_layout")
    if layout is None:
        return None
    fields = ("epoch_steps", "world_size", "step_offset")
    if not isinstance(layout, Mapping) or set(layout) != set(fields):
        return f"byol_layout is {shown(layout)}, not a mapping of {', '.join(repr(k) for k in fields)}"
    if not all(isinstance(layout[k], int) and not isinstance(layout[k], bool) for k in fields) or \
            not all(1 <= layout[k] <= top for k, top in MAX_LAYOUT.items()):
        return (f"byol_layout's fields must be whole numbers, epoch_steps from 1 to {MAX_LAYOUT['epoch_steps']} and "
                f"world_size from 1 to {MAX_LAYOUT['world_size']}")
    step, epochs = checkpoint.get("global_step"), epochs_done(checkpoint)
    if whole(step) and epochs >= 0:
        position, end = step - layout["step_offset"], (epochs + mid_epoch(checkpoint)) * layout["epoch_steps"]
        if not 0 <= position <= end:
            return (f"byol_layout.step_offset={layout['step_offset']} puts its step {step} at step {position} of its "
                    f"epochs, outside the {end} steps of the epochs it has trained")
    return None


def loss_sums_problem(sums) -> str | None:
    """Whether ``sums`` is an ``epoch_loss_sums`` as :meth:`BYOLModule.on_save_checkpoint` writes it
    (``{"sums": {}}`` before the run's first step; absent from files written before it existed)."""
    if sums is None or (isinstance(sums, Mapping) and set(sums) <= {"sums"} and sums.get("sums", {}) == {}):
        return None
    if not isinstance(sums, Mapping) or not {"epoch", "images", "sums"} <= set(sums) <= {"epoch", "images", "sums",
                                                                                        "skipped"}:
        return (f"epoch_loss_sums is {shown(sums)}, not a mapping of 'epoch', 'images', 'sums' (and 'skipped', "
                f"steps skipped as non-finite)")
    if not all(whole(sums.get(k, 0)) for k in ("epoch", "images", "skipped")):
        return "epoch_loss_sums.epoch, .images and .skipped must be whole numbers of 0 or more"
    problem = tensors_problem(sums["sums"], "epoch_loss_sums.sums")
    if problem or any(v.numel() != 1 for v in sums["sums"].values()):
        return problem or "epoch_loss_sums.sums must hold one number per loss"
    return None
