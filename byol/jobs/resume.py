"""Continuing a run: which checkpoint, with which settings, into which folder.

A checkpoint's config is data from whoever wrote the file: it is checked
(:func:`byol.jobs.config_check.check_file_config`) before any of it is used, and the run keeps
its own saved settings except those given on the command line. A change of architecture is
refused: the saved weights would not fit.
"""

from __future__ import annotations

import copy
from pathlib import Path

from byol.core.checkpoint import epochs_done, load_weights, online_encoder_state, safe_load, save_encoder
from byol.core.errors import CheckpointError, ConfigError
from byol.jobs.build import build_encoder, loss_mode
from byol.jobs.build_views import crop_side, view_settings
from byol.jobs.config_check import check_file_config
from byol.jobs.run_folder import CONFIG_FILE, RUN_ID_KEY, evaluation_output, raw_run_config, sweep_jobs

# Settings that decide the shapes of the saved weights: a checkpoint cannot continue under others.
ARCHITECTURE_KEYS = ("backbone", "loss.taps", "head")
# Never compared between a checkpoint and the command line.
IGNORED_KEYS = ("resume", "trainer.enable_progress_bar")  # how a run is shown, not how it trains
# Mappings whose keys the user chooses (a weight per head, named like "layer2.0"): compared and set whole. Taken
# apart, a new head's weight was dropped without a word and a changed one was set at loss.weights.layer2."0"
FREE_FORM_KEYS = ("loss.weights",)
# The settings that make a trained model what it is; devices, loggers, monitors, checkpoints and the machine's
# data settings may differ between two runs of one model.
TRAINED_KEYS = ("backbone", "loss", "data", "optim", "head", "ema", "augment", "seed", "schedule_epochs",
                "trainer.max_epochs", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
                "trainer.precision")
# What sets the span of the learning-rate and tau schedules (:func:`schedule_horizon`).
SCHEDULE_KEYS = ("trainer.max_epochs", "schedule_epochs")
# How a run is recorded, not what it trains: changed on a resume, the continuation is still exact.
RECORDING_KEYS = ("logger", "checkpoint", "trainer.log_every_n_steps", "trainer.enable_model_summary")
# Trainer limits that end a fit before its epochs (given as +trainer.KEY=...): kept by a resume, the run stopped
# again at once (max_steps counts the steps already done), so a resume goes past them unless they are given again.
STOP_LIMITS = ("max_time", "max_steps", "fast_dev_run")
# Architecture settings added after checkpoints were written: the value those checkpoints were trained with.
ADDED_KEYS = {"backbone.width": 1.0}


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``resume`` (a run folder or a .ckpt), else the run
    folder's own ``checkpoints/last.ckpt`` if it exists (a re-launched or requeued job)."""
    if resume:
        path = Path(resume).expanduser()
        if path.is_dir():
            last = path / "checkpoints" / "last.ckpt"
            if not last.is_file() and (what := evaluation_output(path)):
                raise CheckpointError(f"resume='{resume}' is {what}, not a pretraining run; resume= takes a "
                                      f"train.py run folder (outputs/train/<time>) or one of its checkpoints/*.ckpt")
            if not last.is_file() and (jobs := sweep_jobs(path)):
                from byol.jobs.cli import command_arg  # a job's folder name (1_loss=multi,seed=0) quoted for Hydra

                # the example: a run that can be resumed (a job that failed before its first checkpoint cannot)
                job = next((j for j in jobs if (Path(j) / "checkpoints" / "last.ckpt").is_file()), jobs[0])
                raise CheckpointError(
                    f"resume='{resume}' is a sweep folder; continue a sweep by running its command again with -m "
                    f"{command_arg('hydra.sweep.dir', path)} (finished jobs are skipped, the others resumed), or "
                    f"resume one of its runs: {command_arg('resume', job)}")
            if not last.is_file() and (last.exists() or last.is_symlink()):
                raise CheckpointError(f"resume='{resume}': its {last} is not a checkpoint file (a folder, a link to "
                                      f"none or a device); move it away and resume from another of its checkpoints "
                                      f"(resume=<one of {last.parent}/*.ckpt>)")
            if not last.is_file() and path.name == "checkpoints" and (path / "last.ckpt").is_file():
                raise CheckpointError(f"resume='{resume}' is a run's checkpoints folder; give the run folder itself: "
                                      f"resume={path.parent}")
            if not last.is_file():
                raise CheckpointError(
                    f"resume='{resume}': no checkpoints/last.ckpt in that folder (the run stopped before its "
                    f"first checkpoint, or it is not a train.py run folder); start it again without resume=")
            return last
        if not path.is_file():
            raise CheckpointError(f"resume='{resume}' does not exist; give a run folder "
                                  f"(outputs/train/<time>) or a .ckpt file")
        return path
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def flatten_config(d: dict, prefix: str = "") -> dict:
    """A config as dotted keys (``optim.base_lr``); the :data:`FREE_FORM_KEYS` mappings and empty ones whole."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in FREE_FORM_KEYS:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def _set(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _under(key: str, prefixes) -> bool:
    return any(p == "" or key == p or key.startswith(p + ".") for p in prefixes)


def _under_any(keys, prefix: str) -> bool:
    """Whether one of ``keys`` lies at or under ``prefix`` (``loss.weights.avgpool`` under ``loss.weights``)."""
    return any(_under(k, [prefix]) for k in keys)


def resume_config(saved: dict, composed: dict, requested=None) -> tuple[dict, list[str]]:
    """The config a resumed run continues with, and the settings that changed.

    ``saved`` is the checkpoint's config, ``composed`` the one of this invocation. With
    ``requested`` (key prefixes set on the command line; ``""`` for all) the run keeps its own
    saved settings except those requested, so ``python train.py resume=RUN_DIR`` needs no
    other argument; with ``requested=None`` the composed config is taken whole. Either way a
    change of architecture (:data:`ARCHITECTURE_KEYS`) is refused: the weights would not fit.
    """
    old, new = {**ADDED_KEYS, **flatten_config(saved)}, flatten_config(composed)
    result = copy.deepcopy(saved) if requested is not None else copy.deepcopy(composed)
    changed = []
    views = _views(saved)
    same_views = views is not None and views == _views(composed)  # blur_p 0.0 -> auto at 32 px: the same views
    for key in sorted(set(old) | set(new)):
        if _under(key, IGNORED_KEYS) or old.get(key) == new.get(key) or (same_views and _under(key, ["augment"])):
            continue
        if key not in new:
            continue  # a setting this version no longer has
        named = any(prefix and _under(key, [prefix]) for prefix in requested or [])  # on the command line by name
        if key not in old and key.split(".")[0] in saved and not named:
            continue  # a key of a section the run has (another option of its group): the run's own section
        if key not in old:  # a section the checkpoint predates (e.g. monitor): this version's, not a change
            if requested is not None:
                _set(result, key, new[key])
            continue
        asked = _under(key, requested or []) or (key in FREE_FORM_KEYS and _under_any(requested or [], key))
        if requested is not None and not asked:
            continue  # not set on the command line: the run keeps its own value
        if requested is not None:
            _set(result, key, new[key])
        changed.append(key)
    arch = [k for k in changed if _under(k, ARCHITECTURE_KEYS)]
    if arch:
        detail = "; ".join(f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in arch)
        raise CheckpointError(
            f"cannot resume: the checkpoint was trained with another architecture ({detail}). Resume with "
            f"the run's own settings (drop these overrides; its config is in the run folder's config.yaml) "
            f"or start a new run")
    result["resume"] = composed.get("resume")
    return result, [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def schedule_horizon(config: dict) -> int | None:
    """The epochs the learning-rate and tau schedules span (as ``schedule_span`` works them out): the longer
    of ``trainer.max_epochs`` and ``schedule_epochs``; None for a run bounded by ``trainer.max_steps`` alone."""
    epochs = (config.get("trainer") or {}).get("max_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        return None
    return max(epochs, config.get("schedule_epochs") or 0)


def sort_changes(changed: list[str], saved: dict, config: dict, machine) -> dict[str, list[str]]:
    """A resume's changed settings (``"key: old -> new"``) by what they mean for the run: ``machine`` (how this
    machine reads the same data; ``machine(key)`` says), ``monitor`` (how the run is measured: its curves
    change meaning, its training does not), ``same_schedule`` (``trainer.max_epochs`` / ``schedule_epochs``
    moved while the schedules span the same epochs: the README's longer-run recipe, an exact continuation),
    ``shown`` (loggers, checkpoints: how the run is recorded) and ``trained`` (the rest: no longer an exact
    continuation)."""
    sorted_ = {"machine": [], "monitor": [], "same_schedule": [], "shown": [], "trained": []}
    same_horizon = schedule_horizon(saved) is not None and schedule_horizon(saved) == schedule_horizon(config)
    for change in changed:
        key = change.split(": ", 1)[0]
        kind = ("machine" if machine(key) else "monitor" if _under(key, ["monitor"])
                else "same_schedule" if same_horizon and key in SCHEDULE_KEYS
                else "shown" if _under(key, RECORDING_KEYS) else "trained")
        sorted_[kind].append(change)
    return sorted_


def drop_stop_limits(config: dict, requested=None) -> list[str]:
    """Remove from a resumed run's ``config`` the :data:`STOP_LIMITS` it was stopped by and this command does
    not give again; what was removed, as ``trainer.KEY=VALUE``."""
    trainer = config.get("trainer") or {}
    dropped = [key for key in STOP_LIMITS
               if trainer.get(key) is not None and not _under(f"trainer.{key}", requested or [])]
    return [f"trainer.{key}={trainer.pop(key)}" for key in dropped]


def _views(config: dict) -> list[dict] | None:
    """The two views' settings a config trains with (what its ``augment`` keys come to at its crop size)."""
    try:
        return view_settings(config["augment"], crop_side(config["data"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def saved_run_id(raw_config: dict, source: str) -> str | None:
    """The run id a checkpoint's config holds (None for checkpoints written before run ids)."""
    run_id = raw_config.get(RUN_ID_KEY)
    if run_id is not None and not (isinstance(run_id, str) and run_id.isalnum() and len(run_id) <= 64):
        raise ConfigError(f"refusing {source}: {RUN_ID_KEY} = {str(run_id)[:40]!r} is not a run id")
    return run_id


def folder_run_id(run_dir: Path) -> str | None:
    """The id of the run whose config.yaml ``run_dir`` holds, checked as untrusted data."""
    raw = raw_run_config(run_dir)
    if raw is None:
        return None
    source = f"'{Path(run_dir) / CONFIG_FILE}'"
    check_file_config(raw, source)
    return saved_run_id(raw, source)


def epochs_trained(path: Path) -> int:
    """The epochs the checkpoint at ``path`` has finished (-1: not a checkpoint dict)."""
    ckpt = safe_load(path, mmap=True)
    return epochs_done(ckpt) if isinstance(ckpt, dict) else -1


def export_from_checkpoint(ckpt: dict, cfg: dict, path: Path) -> None:
    """Write ``encoder.pt`` from a Lightning checkpoint's online encoder (a run killed between its
    last ``last.ckpt`` and its export)."""
    encoder = build_encoder(cfg)
    load_weights(encoder, online_encoder_state(ckpt), path)
    save_encoder(encoder, path, meta=export_meta_fields(cfg, epochs_done(ckpt), ckpt.get("global_step")))


def export_meta_fields(cfg: dict, epochs: int, step) -> dict:
    """What an ``encoder.pt`` says about the run that wrote it (read back, checked, by
    :func:`byol.jobs.pretrained.export_meta`): the run id tells a copy from another run's folder."""
    meta = {"loss": loss_mode(cfg["loss"]), "epochs": epochs, "global_step": step, "seed": cfg["seed"]}
    return {**meta, RUN_ID_KEY: cfg[RUN_ID_KEY]} if cfg.get(RUN_ID_KEY) else meta
