"""The pretraining job: build everything from the composed config, fit, write checkpoints and the export.

A run folder is resumable at any time: ``checkpoints/last.ckpt`` is refreshed every epoch (and
every ``checkpoint.last_every_n_steps`` optimizer steps), written atomically, and holds the
run's config, weights, EMA target, optimizer, scheduler, loop counters and RNG states. It is the
run's one full training state: when training ends it is the final one (no copy is written). The data
order and the augmentation randomness are functions of (seed, epoch, batch), so nothing else is
needed for a resumed run to be the run it would have been.

This module checks the command line's config, the folder, the checkpoint to resume and the training images
before Lightning loads (seconds on a slow day: a refusal is said before it); :mod:`byol.jobs.pretrain_fit`
builds the model and trainer and fits.
"""

from __future__ import annotations

import io
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from byol.core.checkpoint import epochs_done, mid_epoch, safe_load
from byol.core.data import ImageTensors, IndexBatches
from byol.core.disk_images import batches_of
from byol.core.errors import CheckpointError, ConfigError, UnknownTap
from byol.core.features import resolve_device
from byol.jobs.build import (
    build_byol,
    build_encoder,
    check_launcher,
    check_logger_package,
    check_strategy,
    planned_world,
    resolve_precision,
)
from byol.jobs.cli import command_arg, launched_rank
from byol.jobs.command_folders import before_training
from byol.jobs.config_check import check_config, check_file_config, plain_config
from byol.jobs.console import quiet_lightning, script_command
from byol.jobs.datasets import MACHINE_DATA_KEYS, load_split, make_root_absolute, subset_of
from byol.jobs.monitoring import MonitorSamples, monitor_samples, monitor_taps
from byol.jobs.pretrained import planned_epochs
from byol.jobs.resume import (
    TRAINED_KEYS,
    drop_stop_limits,
    epochs_trained,
    export_from_checkpoint,
    find_resume,
    folder_run_id,
    resume_config,
    saved_run_id,
    schedule_horizon,
    sort_changes,
)
from byol.jobs.run_folder import (
    CHECKPOINTS_DIR,
    ENCODER_FILE,
    LAST_CHECKPOINT,
    RUN_ID_KEY,
    check_new_run_folder,
    check_not_behind,
    check_resume_target,
    new_run_id,
)
from byol.jobs.value_ranges import check_root_is_read


@dataclass
class RunStart:
    """What the job continues from: the config to train with, and the checkpoint (None: a new run)."""

    config: dict
    checkpoint: Path | None = None
    step: int | None = None
    finished: bool = False
    layout: dict = field(default_factory=dict)  # the checkpoint's byol_layout (BYOLModule.layout); {} if none


def run_start(container: dict, run_dir: Path, requested) -> RunStart:
    """Check the command line's config, then find and check the checkpoint to continue from."""
    check_config(container, "the command line")
    check_root_is_read(container["data"])
    make_root_absolute(container["data"])  # the run's config names the folder, wherever it is read from
    resolve_device(container["trainer"].get("accelerator", "auto"))  # a GPU asked for where there is none
    folder_id = folder_run_id(run_dir)
    checkpoint = find_resume(container.get("resume"), run_dir)
    if checkpoint is None:
        if launched_rank() == 0:
            check_new_run_folder(run_dir)  # a finished run's weights without its last.ckpt: never overwritten
        container[RUN_ID_KEY] = new_run_id()
        return RunStart(container)
    resumed = safe_load(checkpoint, mmap=True)  # refuses unsafe files before Lightning reads it
    if not isinstance(resumed, dict) or not isinstance(resumed.get("byol_config"), dict):
        raise CheckpointError(f"'{checkpoint}' is not a train.py checkpoint (no 'byol_config'); resume= "
                              f"takes a run folder or its checkpoints/*.ckpt, not an encoder export")
    source = f"checkpoint '{checkpoint}'"
    saved = check_file_config(resumed["byol_config"], source)
    saved_id = saved_run_id(resumed["byol_config"], source)
    # under DDP rank 0 checked the folder and already wrote the resumed run's config.yaml into it
    same_run = check_resume_target(run_dir, checkpoint, saved_id, folder_id) if launched_rank() == 0 else True
    if not same_run and launched_rank() == 0:
        note_a_branch(checkpoint, run_dir, int(resumed["global_step"]), epochs_done(resumed))
    if isinstance(saved.get("data"), dict):  # a run of an earlier version kept it as typed: compared absolute
        make_root_absolute(saved["data"], source)
    config, changed = resume_config(saved, container, requested)
    if (dropped := drop_stop_limits(config, requested)) and launched_rank() == 0:
        print(f"[byol] note: {', '.join(dropped)} stopped the run before and is not carried over: it trains on to "
              f"its {config['trainer']['max_epochs']} epochs (give it again to stop there)", flush=True)
    check_config(config, source)
    config[RUN_ID_KEY] = (saved_id or folder_id) if same_run and (saved_id or folder_id) else new_run_id()
    from byol.jobs.pretrain_fit import check_resumable  # Lightning: a resume needs it anyway

    check_resumable(resumed, config, checkpoint)  # before anything is written into the run folder
    if same_run and launched_rank() == 0:
        check_not_behind(run_dir, checkpoint, int(resumed["global_step"]))
    last = run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT  # at the end of a run: its final state
    # finished: it trained the epochs asked for now and those it planned itself (a run stopped at epoch 9 of
    # 100 and asked for 5 has not finished: it holds more than asked, said by refuse_a_checkpoint_past_the_end)
    trained = epochs_trained(last) if last.is_file() else -1
    finished = trained >= int(config["trainer"]["max_epochs"]) and trained >= (planned_epochs(saved) or 0)
    if finished and same_run:
        refuse_other_settings(changed, run_dir)
    refuse_a_checkpoint_past_the_end(resumed, int(config["trainer"]["max_epochs"]), checkpoint, finished)
    if changed and not finished and launched_rank() == 0:  # after the refusals; once under DDP
        say_changes(sort_changes(changed, saved, config, _machine_key), config, epochs_done(resumed) + 1)
    layout = resumed.get("byol_layout") or {}
    if mid_epoch(resumed):  # an earlier version's checkpoint keeps no layout: its config says the world
        world = layout.get("world_size") or planned_world(saved.get("trainer") or {})
        refuse_another_cut_of_an_epoch(world, saved, config, checkpoint, int(resumed["global_step"]))
    return RunStart(config, checkpoint, int(resumed["global_step"]), finished, layout)


def refuse_another_cut_of_an_epoch(world: int, saved: dict, config: dict, checkpoint: Path, step: int) -> None:
    """One line when a checkpoint saved mid-epoch (on ``world`` processes) would continue with its epoch cut
    otherwise: another global batch (per-process batch x processes: each step takes the next that many images
    of the epoch's order, and the batches done are counted in the old cut, so some images would be skipped
    and others seen twice) or another accumulation (its steps done would not match its batches). An epoch-end
    checkpoint continues under any; the same global batch on another number of processes continues too."""
    old, new = _cut(saved, world), _cut(config, planned_world(config["trainer"]))
    if (old[0] * old[1], old[2]) == (new[0] * new[1], new[2]):
        return
    said = "{} process(es) x batch {}, accumulating {}"
    raise ConfigError(f"'{checkpoint}' was saved in the middle of an epoch (step {step}) on {said.format(*old)}; "
                      f"continued on {said.format(*new)}, the rest of that epoch would skip some images and repeat "
                      f"others. Resume it with the same global batch (data.batch_size x trainer.devices x "
                      f"trainer.num_nodes = {old[0] * old[1]}) and trainer.accumulate_grad_batches={old[2]}, or "
                      f"continue an epoch-end checkpoint of the run (RUN/checkpoints/epochNNNN.ckpt, kept by "
                      f"checkpoint.keep_last) under the new settings")


def _cut(config: dict, world: int) -> tuple:
    return world, config["data"]["batch_size"], int(config["trainer"].get("accumulate_grad_batches") or 1)


def refuse_a_checkpoint_past_the_end(resumed: dict, max_epochs: int, checkpoint: Path, finished: bool) -> None:
    """One line when the checkpoint has trained more epochs than the run asks for: Lightning would train nothing
    and the job end with "done", its folder's config planning fewer epochs than its weights hold."""
    done = epochs_done(resumed)
    if done > max_epochs and not finished:
        raise ConfigError(f"'{checkpoint}' has trained {done} epochs, more than trainer.max_epochs={max_epochs}: "
                          f"nothing would be trained. Ask for more (trainer.max_epochs above {done}), or evaluate "
                          f"that checkpoint as it is: {script_command('evaluate.py')} "
                          f"{command_arg('pretrained', checkpoint)}")


def note_a_branch(checkpoint: Path, run_dir: Path, step: int, epochs: int) -> None:
    """A checkpoint continued in a new folder starts that folder's metrics.csv and curves at its step: say where
    the earlier steps' are, or the new curves seem to be the whole run."""
    if step == 0:
        return
    origin = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint.parent
    earlier = origin / "metrics.csv"
    where = f"; those of the steps before are in {earlier}" if earlier.is_file() and origin != run_dir else ""
    print(f"[byol] note: continuing {checkpoint} in a new run folder ({run_dir}): its metrics.csv and curves.png "
          f"start at step {step} (after {epochs} epoch{'s' * (epochs != 1)}){where}", flush=True)


def say_changes(changes: dict[str, list[str]], config: dict, epoch: int) -> None:
    """A line for each kind of setting a resume changed (:func:`~byol.jobs.resume.sort_changes`): only those
    that change what is trained break an exact continuation."""
    said = {kind: "; ".join(found) for kind, found in changes.items() if found}
    if "trained" in said:
        print(f"[byol] resuming with changed settings (no longer an exact continuation): {said['trained']}",
              flush=True)
    if "same_schedule" in said:
        print(f"[byol] resuming with {said['same_schedule']}: the learning-rate and tau schedules still span "
              f"{schedule_horizon(config)} epochs (an exact continuation)", flush=True)
    if "monitor" in said:
        print(f"[byol] resuming with changed monitor settings: {said['monitor']}; training is unchanged, but the "
              f"monitor/ columns of metrics.csv (and the curves) measure these settings from epoch {epoch} on",
              flush=True)
    if "shown" in said:
        print(f"[byol] resuming with changed logging settings (an exact continuation): {said['shown']}", flush=True)
    if "machine" in said:
        print(f"[byol] resuming with this machine's data settings: {said['machine']} (the same images and "
              f"batches)", flush=True)


def _machine_key(key: str) -> bool:
    """Whether ``key`` says how this machine reads the data (cache, storage), not what is trained on."""
    return key in {f"data.{name}" for name in (*MACHINE_DATA_KEYS, "on_device")}


def refuse_other_settings(changed: list[str], run_dir: Path) -> None:
    """One line when the finished run in ``run_dir`` was trained with other
    :data:`~byol.jobs.resume.TRAINED_KEYS` than asked: it trained nothing and said "nothing to do" (a sweep
    re-run into its folder with another data.root per job), and the new settings were never trained."""
    keys = [(c, c.split(": ", 1)[0]) for c in changed]  # "data.root: 'a' -> 'b'"
    trained = [c for c, key in keys if not _machine_key(key) and any(key == k or key.startswith(k + ".")
                                                                     for k in TRAINED_KEYS)]
    if trained:
        raise ConfigError(f"'{run_dir}' holds a finished run trained with other settings ({'; '.join(trained)}); "
                          f"nothing was trained. Train these settings into a folder of their own "
                          f"(hydra.run.dir=NEW; a sweep: hydra.sweep.dir=NEW), or leave these overrides out to "
                          f"keep the finished run as it is")


def report_finished(start: RunStart, run_dir: Path, export: Path) -> Path:
    """A run that already trained its epochs: write a missing export, say so, train nothing."""
    last = run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT
    if not export.is_file():
        export_from_checkpoint(safe_load(last), start.config, export)
        print(f"[byol] {export} was missing: written again from {last}", flush=True)
    epochs = start.config["trainer"]["max_epochs"]
    epochs_text = f"{epochs} epoch{'s' * (epochs != 1)}"
    print(f"[byol] {run_dir} already finished its {epochs_text} ({last}, {export}); nothing to do. To "
          f"train longer: {script_command('train.py')} {command_arg('resume', run_dir)} trainer.max_epochs=N; to "
          f"redo part of it, resume a checkpoint into another folder (hydra.run.dir=NEW)", flush=True)
    return export


def check_networks(config: dict) -> None:
    """Build the networks ``config`` describes on the meta device (no memory, no randomness, under a second),
    so that an unknown tap, backbone or grid is refused before the training images are decoded (minutes, the
    first time, for a large folder)."""
    with torch.device("meta"):
        for setting, taps in (("loss.taps", config["loss"]["taps"]), ("monitor.taps", monitor_taps(config))):
            try:  # each setting's taps alone first: the error names the setting that holds an unknown one
                build_encoder(config, taps=taps)
            except UnknownTap as e:
                raise UnknownTap(f"{setting}: {e}") from None
        build_byol(config, extra_taps=monitor_taps(config))


def training_batches(config: dict, images: ImageTensors | None = None) -> IndexBatches:
    """The run's training images as index batches: ``images`` (the whole training split, loaded once) or a
    seeded subset of it (``data.subset``), read from the memory-mapped cache a batch at a time when
    ``data.storage`` keeps them there."""
    data = config["data"]
    images = images if images is not None else load_split(data, "train")
    images = subset_of(images, data, config["seed"], "training images")
    return batches_of(images, data["batch_size"], seed=config["seed"])


def training_data(config: dict) -> tuple[IndexBatches, MonitorSamples | None]:
    """The training batches and the online monitors' samples, from one load of the training images: what
    the batches do not use is dropped when this returns. Under DDP every process loads the same images and rank 0
    alone says what it found (each note stood once per process)."""
    quiet = launched_rank() != 0
    with redirect_stdout(io.StringIO()) if quiet else nullcontext():
        images = load_split(config["data"], "train")
        batches = training_batches(config, images)
        batches.check_world(planned_world(config["trainer"]))  # here, once: not by every process after they start
        return batches, monitor_samples(config, images)


def pretrain(cfg: DictConfig, run_dir: str | Path, requested=None) -> Path:
    """Run (or continue) BYOL pretraining in ``run_dir``; returns the path of the encoder export.

    ``requested``: the config keys given on the command line (see :func:`byol.jobs.resume.resume_config`);
    ``None`` takes ``cfg`` as it is, also when resuming.
    """
    run_dir = Path(run_dir)
    with quiet_lightning():
        with before_training():
            container = plain_config(cfg)
            resolve_precision(container, "[byol]")  # before a resume compares it with the run's
            start = run_start(container, run_dir, requested)
            if start.finished:
                return report_finished(start, run_dir, run_dir / ENCODER_FILE)
            check_logger_package(start.config.get("logger"))  # a missing package: before the data
            check_strategy(start.config["trainer"])  # processes that could not start or meet: before it too
            check_launcher(start.config["trainer"])
            check_networks(start.config)  # a misspelt tap or backbone: before the data too
            batches, samples = training_data(start.config)  # data errors: before Lightning loads
        from byol.jobs.pretrain_fit import fit_run

        return fit_run(start, batches, samples, run_dir)
