"""The pretraining job: build everything from the composed config, fit, write checkpoints and the export.

A run folder is resumable at any time: ``checkpoints/last.ckpt`` is refreshed every epoch (and
every ``checkpoint.last_every_n_steps`` optimizer steps), written atomically, and holds the
run's config, weights, EMA target, optimizer, scheduler, loop counters and RNG states. It is the
run's one full training state: when training ends it is the final one (no copy is written). The data
order and the augmentation randomness are functions of (seed, epoch, batch), so nothing else is
needed for a resumed run to be the run it would have been.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor

from byol.core.checkpoint import atomic_write_bytes, remove_stale_temp_files, safe_load, save_encoder
from byol.core.data import IndexBatches
from byol.core.disk_images import batches_of
from byol.core.errors import ByolError, CheckpointError, ConfigError
from byol.core.features import resolve_device
from byol.jobs.build import (
    build_augment,
    build_byol,
    build_trainer,
    loss_mode,
    make_loggers,
    optimizer_factory,
    planned_world,
    progress_bar_on,
    trainer_for_this_machine,
)
from byol.jobs.cli import command_arg, launched_rank, resume_hint
from byol.jobs.config_check import check_config, check_file_config, plain_config
from byol.jobs.console import quiet_lightning
from byol.jobs.curves import write_curves
from byol.jobs.datasets import MACHINE_DATA_KEYS, load_split, subset_of
from byol.jobs.monitoring import build_monitors, monitor_taps, representations
from byol.jobs.resume import (
    TRAINED_KEYS,
    epochs_trained,
    export_from_checkpoint,
    export_meta_fields,
    find_resume,
    folder_run_id,
    resume_config,
    saved_run_id,
)
from byol.jobs.run_folder import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    RUN_ID_KEY,
    check_new_run_folder,
    check_not_behind,
    check_resume_target,
    new_run_id,
)
from byol.lightning.callbacks import RunCheckpoints, describe_step, optimizer_steps_per_epoch
from byol.lightning.checkpoint_io import AtomicCheckpointIO
from byol.lightning.data_module import TensorDataModule
from byol.lightning.epoch_output import EpochHook, EpochSummary, OnTrainStart, progress_bar
from byol.lightning.monitors import OnlineKNN, all_taps
from byol.lightning.pretrain_module import BYOLModule


@dataclass
class RunStart:
    """What the job continues from: the config to train with, and the checkpoint (None: a new run)."""

    config: dict
    checkpoint: Path | None = None
    step: int | None = None
    finished: bool = False


def run_start(container: dict, run_dir: Path, requested) -> RunStart:
    """Check the command line's config, then find and check the checkpoint to continue from."""
    check_config(container, "the command line")
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
    config, changed = resume_config(saved, container, requested)
    check_config(config, source)
    config[RUN_ID_KEY] = (saved_id or folder_id) if same_run and (saved_id or folder_id) else new_run_id()
    check_resumable(resumed, config, checkpoint)  # before anything is written into the run folder
    if same_run and launched_rank() == 0:
        check_not_behind(run_dir, checkpoint, int(resumed["global_step"]))
    last = run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT  # at the end of a run: its final state
    finished = last.is_file() and epochs_trained(last) >= int(config["trainer"]["max_epochs"])
    if finished and same_run:
        refuse_other_settings(changed, run_dir)
    if changed and not finished:  # after the refusals: a finished run resumes nothing
        print(f"[byol] resuming with changed settings (no longer an exact continuation): {'; '.join(changed)}",
              flush=True)
    return RunStart(config, checkpoint, int(resumed["global_step"]), finished)


def refuse_other_settings(changed: list[str], run_dir: Path) -> None:
    """One line when the finished run in ``run_dir`` was trained with other
    :data:`~byol.jobs.resume.TRAINED_KEYS` than asked: it trained nothing and said "nothing to do" (a sweep
    re-run into its folder with another data.root per job), and the new settings were never trained."""
    machine = {f"data.{key}" for key in (*MACHINE_DATA_KEYS, "on_device")}
    keys = [(c, c.split(": ", 1)[0]) for c in changed]  # "data.root: 'a' -> 'b'"
    trained = [c for c, key in keys if key not in machine and any(key == k or key.startswith(k + ".")
                                                                  for k in TRAINED_KEYS)]
    if trained:
        raise ConfigError(f"'{run_dir}' holds a finished run trained with other settings ({'; '.join(trained)}); "
                          f"nothing was trained. Train these settings into a folder of their own "
                          f"(hydra.run.dir=NEW; a sweep: hydra.sweep.dir=NEW), or leave these overrides out to "
                          f"keep the finished run as it is")


def check_resumable(checkpoint: dict, config: dict, path: Path) -> None:
    """The checkpoint's whole training state fits what ``config`` builds (weights, optimizer, schedule, loop
    counters, random states: :meth:`BYOLModule.check_checkpoint`), or one line naming the file. The module
    is built on the meta device: no memory, no randomness drawn, in a fraction of a second."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        module = build_module({**config, "compile": False})
    module.check_checkpoint(checkpoint, path)


def report_finished(start: RunStart, run_dir: Path, export: Path) -> Path:
    """A run that already trained its epochs: write a missing export, say so, train nothing."""
    last = run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT
    if not export.is_file():
        export_from_checkpoint(safe_load(last), start.config, export)
    epochs = start.config["trainer"]["max_epochs"]
    epochs_text = f"{epochs} epoch{'s' * (epochs != 1)}"
    print(f"[byol] {run_dir} already finished its {epochs_text} ({last}, {export}); nothing to do. To "
          f"train longer: python train.py {command_arg('resume', run_dir)} trainer.max_epochs=N; to redo part "
          f"of it, resume a checkpoint into another folder (hydra.run.dir=NEW)", flush=True)
    return export


def build_datamodule(config: dict) -> TensorDataModule:
    """The run's training images (decoded once, seeded subset) as device-resident index batches, or
    read from the memory-mapped cache (``data.storage``) a batch at a time."""
    data = config["data"]
    images = subset_of(load_split(data, "train"), data, config["seed"], "training images")
    batches = batches_of(images, data["batch_size"], seed=config["seed"])
    return TensorDataModule(batches, data.get("on_device", True))


def build_module(config: dict, checkpoint_path: Path | None = None) -> BYOLModule:
    """The BYOL model, augmentation and optimizer of ``config``, in the Lightning adapter."""
    model = build_byol(config, extra_taps=monitor_taps(config))
    if config.get("channels_last", True):
        model.to(memory_format=torch.channels_last)
    if config.get("compile"):
        model.compile()
    trainer = config["trainer"]
    make_optimizer = optimizer_factory(config["optim"], config["data"]["batch_size"],
                                       int(trainer.get("accumulate_grad_batches") or 1))
    return BYOLModule(model, build_augment(config), make_optimizer, tau_base=config["ema"]["tau_base"],
                      tau_schedule=config["ema"]["tau_schedule"], seed=config["seed"],
                      skip_nonfinite=config["train"]["on_nonfinite"] == "skip", run_config=config,
                      checkpoint_path=checkpoint_path, schedule_epochs=config.get("schedule_epochs"))


def save_run_config(config: dict, run_dir: Path) -> None:
    """The run's config.yaml, written once training starts (:class:`OnTrainStart`): a resume refused or
    failed before (a checkpoint that does not load, a logger package missing) leaves the run's own as it was,
    so a finished run is never turned into an unfinished one by a command that trained nothing. Called again
    after fitting (a fit with no epoch left never starts training): a file already holding it is left alone."""
    data, path = OmegaConf.to_yaml(OmegaConf.create(config)).encode(), run_dir / CONFIG_FILE
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(data, path)


def build_run_trainer(config: dict, run_dir: Path, loggers: list, monitors: list, steps_per_epoch: int) -> pl.Trainer:
    ckpt = config["checkpoint"]
    trainer = config["trainer"]
    # a signal stops a step midway, except where the layers' hooks would cost (compiled graphs)
    checkpoints = RunCheckpoints(run_dir / CHECKPOINTS_DIR, run_dir, resume_hint(run_dir), ckpt["every_n_epochs"],
                                 ckpt["last_every_n_steps"], ckpt.get("keep_last"),
                                 stop_inside_steps=not config.get("compile"))
    # the monitors first: a checkpoint taken after a batch then holds the probes' step on that batch too
    knn = next((m for m in monitors if isinstance(m, OnlineKNN)), None)
    callbacks = [*monitors, checkpoints, LearningRateMonitor(logging_interval="step"), EpochSummary(knn),
                 EpochHook(lambda: write_curves(run_dir)), OnTrainStart(lambda: save_run_config(config, run_dir))]
    callbacks += progress_bar(progress_bar_on(trainer.get("enable_progress_bar")), trainer.get("log_every_n_steps"),
                              steps_per_epoch)
    # per-step rows (loss, tau, lr) reach metrics.csv at least once per epoch, however short the epoch
    trainer = {**trainer, "log_every_n_steps": min(int(trainer.get("log_every_n_steps") or 1), steps_per_epoch)}
    trainer = trainer_for_this_machine(trainer, "[byol]")
    return build_trainer(trainer, default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks,
                         enable_checkpointing=False, plugins=[AtomicCheckpointIO()])  # RunCheckpoints writes


def pretrain(cfg: DictConfig, run_dir: str | Path, requested=None) -> Path:
    """Run (or continue) BYOL pretraining in ``run_dir``; returns the path of the encoder export.

    ``requested``: the config keys given on the command line (see :func:`byol.jobs.resume.resume_config`);
    ``None`` takes ``cfg`` as it is, also when resuming.
    """
    run_dir = Path(run_dir)
    ckpt_dir, export = run_dir / "checkpoints", run_dir / "encoder.pt"
    with quiet_lightning():
        with before_training():
            start = run_start(plain_config(cfg), run_dir, requested)
            if start.finished:
                return report_finished(start, run_dir, export)
            config = start.config
            pl.seed_everything(config["seed"], workers=True, verbose=False)
            run_dir.mkdir(parents=True, exist_ok=True)
            if launched_rank() == 0:  # under DDP, rank 0 alone writes into the run folder
                remove_stale_temp_files(ckpt_dir)  # left by a process killed while writing
            loggers = make_loggers(config.get("logger"), run_dir, start.step)  # a missing package: before the data
            datamodule = build_datamodule(config)  # data errors before the model is built
            module = build_module(config, ckpt_dir / "last.ckpt")
            monitors = build_monitors(config, module.model.online_encoder.dims)
            module.model.feature_taps = all_taps(representations(monitor_taps(config))) if monitors else []
            accumulate = int(config["trainer"].get("accumulate_grad_batches") or 1)
            steps_per_epoch = optimizer_steps_per_epoch(len(datamodule.batches) // planned_world(config["trainer"]),
                                                        accumulate)
            trainer = build_run_trainer(config, run_dir, loggers, monitors, steps_per_epoch)
            announce(config, run_dir, trainer, start, datamodule.batches)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(start.checkpoint) if start.checkpoint else None)
        if not trainer.is_global_zero:  # the other DDP processes hold the same weights; rank 0 writes
            return export
        save_run_config(config, run_dir)  # again: a fit with no epoch left to train never started training
        draw_curves(run_dir)
    save_encoder(module.model.online_encoder, export, taps=config["loss"]["taps"],
                 meta=export_meta_fields(config, trainer.current_epoch, trainer.global_step))
    print(f"[byol] done: {ckpt_dir / LAST_CHECKPOINT} (the final training state) and encoder export {export}",
          flush=True)
    return export


@contextmanager
def before_training():
    """Tag a :class:`ByolError` raised in the block as ``nothing_trained``: the job stopped before training
    (a refused resume, a missing logger package, bad data), so a run already in the folder is as it was
    and gets no ``FAILED`` file (a sweep's evaluation would then list a finished run as failed)."""
    try:
        yield
    except ByolError as e:
        e.nothing_trained = True
        raise


def draw_curves(run_dir: Path) -> None:
    """The run's final curves.png; a plotting problem is a note, never a failed run."""
    try:
        write_curves(run_dir)
    except Exception as e:
        print(f"[byol] note: curves.png not drawn ({type(e).__name__}: {e})", flush=True)


def announce(config: dict, run_dir: Path, trainer: pl.Trainer, start: RunStart, batches: IndexBatches) -> None:
    """The run's first lines (rank 0's): what trains on what, where it writes, where it resumes."""
    if launched_rank() != 0:  # the trainer knows its rank only once fitting starts
        return
    backbone, trainer_cfg = config["backbone"], config["trainer"]
    width = f" x{backbone['width']:g} width" if backbone.get("width", 1) != 1 else ""
    batch, epochs, horizon = config["data"]["batch_size"], trainer_cfg["max_epochs"], config.get("schedule_epochs")
    of_schedule = f" (of a {horizon}-epoch learning-rate and tau schedule)" if horizon and horizon > epochs else ""
    print(f"[byol] pretraining {backbone['name']}{width} ({backbone['stem']} stem), loss={loss_mode(config['loss'])}, "
          f"{len(batches.data)} images, batch {batch}{processes(trainer, batch)}, "
          f"{epochs} epoch{'s' * (epochs != 1)}{of_schedule}, "
          f"on {trainer.strategy.root_device} ({trainer.precision})",
          flush=True)
    print(f"[byol] run folder: {run_dir}", flush=True)
    if str(trainer.precision).split("-")[0] != str(trainer_cfg["precision"]).split("-")[0]:  # 16 on a CPU: bf16
        print(f"[byol] note: trainer.precision={trainer_cfg['precision']} runs as {trainer.precision} on "
              f"{trainer.strategy.root_device.type}", flush=True)
    if horizon and horizon < epochs:
        print(f"[byol] note: schedule_epochs={horizon} is fewer than the run's {epochs} epochs; the learning-rate "
              f"and tau schedules span the run's {epochs} (schedule_epochs only lengthens them)", flush=True)
    if start.checkpoint is not None:
        steps_per_epoch = optimizer_steps_per_epoch(  # the batches are not sharded yet: each rank's share
            len(batches) // trainer.world_size, int(trainer_cfg.get("accumulate_grad_batches") or 1))
        print(f"[byol] resuming from {start.checkpoint}: {describe_step(start.step, steps_per_epoch)}", flush=True)


def processes(trainer: pl.Trainer, batch: int) -> str:
    """`` per process x 2 processes (global batch 64)`` under DDP; empty on one device."""
    world = trainer.world_size
    if world == 1:
        return ""
    return f" per process x {world} processes (global batch {batch * world * trainer.accumulate_grad_batches})"
