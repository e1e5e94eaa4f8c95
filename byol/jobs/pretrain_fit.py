"""The pretraining job's Lightning half: the model, monitors and trainer that :func:`byol.jobs.pretrain.pretrain`
fits once the config, folder, checkpoint and training images have passed its checks (before Lightning loads)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Timer

from byol.core.checkpoint import atomic_write_bytes, remove_stale_temp_files, save_encoder
from byol.core.data import IndexBatches
from byol.jobs.build import (
    build_byol,
    build_trainer,
    loss_mode,
    make_loggers,
    optimizer_factory,
    planned_world,
    progress_bar_on,
    trainer_for_this_machine,
)
from byol.jobs.build_views import build_augment
from byol.jobs.cli import command_arg, evaluate_hint, launched_rank, resume_hint
from byol.jobs.console import other_processes_lost, script_command
from byol.jobs.curves import write_curves
from byol.jobs.monitoring import MonitorSamples, build_monitors, monitor_taps, representations
from byol.jobs.pretrain import RunStart, before_training, training_batches
from byol.jobs.resume import export_meta_fields
from byol.jobs.run_folder import CHECKPOINTS_DIR, CONFIG_FILE, ENCODER_FILE, LAST_CHECKPOINT
from byol.lightning.callbacks import (
    RunCheckpoints,
    describe_step,
    optimizer_steps_per_epoch,
    release_stop_signals,
)
from byol.lightning.checkpoint_io import AtomicCheckpointIO
from byol.lightning.data_module import TensorDataModule
from byol.lightning.epoch_output import EpochHook, EpochSummary, OnTrainStart, StepRates, progress_bar
from byol.lightning.monitors import OnlineKNN, all_taps
from byol.lightning.pretrain_module import BYOLModule

# seconds between lines inside an epoch where no progress bar is drawn (a log file: a CPU epoch takes minutes)
HEARTBEAT_SECONDS = 120.0


def fit_run(start: RunStart, batches: IndexBatches, samples: MonitorSamples | None, run_dir: Path) -> Path:
    """Build the model, monitors (on ``samples``) and trainer for ``start`` and fit on ``batches``; write the
    export."""
    config, ckpt_dir, export = start.config, run_dir / CHECKPOINTS_DIR, run_dir / ENCODER_FILE
    with before_training():
        pl.seed_everything(config["seed"], workers=True, verbose=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        if launched_rank() == 0:  # under DDP, rank 0 alone writes into the run folder
            remove_stale_temp_files(ckpt_dir)  # left by a process killed while writing
        loggers = make_loggers(config.get("logger"), run_dir, start.step)
        datamodule = build_datamodule(config, batches)
        module = build_module(config, ckpt_dir / LAST_CHECKPOINT)
        monitors = build_monitors(config, module.model.online_encoder.dims, samples)
        module.model.feature_taps = all_taps(representations(monitor_taps(config))) if monitors else []
        accumulate = int(config["trainer"].get("accumulate_grad_batches") or 1)
        steps_per_epoch = optimizer_steps_per_epoch(len(datamodule.batches) // planned_world(config["trainer"]),
                                                    accumulate)
        trainer = build_run_trainer(config, run_dir, loggers, monitors, steps_per_epoch, hold_signals_at_end=True)
        announce(config, run_dir, trainer, start, datamodule.batches)
    done = f"training had finished ({ckpt_dir / LAST_CHECKPOINT} holds its final state); stopping"
    checkpoints = next(c for c in trainer.callbacks if isinstance(c, RunCheckpoints))
    try:  # a stop signal from the end of training on waits for the export (RunCheckpoints holds it)
        with other_processes_lost(trainer.world_size, checkpoints.after_second_interrupt):
            try:
                trainer.fit(module, datamodule=datamodule,
                            ckpt_path=str(start.checkpoint) if start.checkpoint else None)
            except Exception:
                if trainer.is_global_zero and (run_dir / "metrics.csv").is_file():
                    draw_curves(run_dir)  # up to where it stopped (a NaN loss, a signal): where it went wrong
                raise
        if not trainer.is_global_zero:  # the other DDP processes hold the same weights; rank 0 writes
            return export
        save_run_config(config, run_dir)  # again: a fit with no epoch left to train never started training
        draw_curves(run_dir)
        # whole epochs: Lightning counts one that max_steps or max_time cut as done
        epochs = min(trainer.current_epoch, (trainer.global_step - module.step_offset()) // steps_per_epoch)
        save_encoder(module.model.online_encoder, export, taps=config["loss"]["taps"],
                     meta=export_meta_fields(config, epochs, trainer.global_step))
        short = stopped_short(config, epochs, trainer.global_step)
        print(f"[byol] {short}: {ckpt_dir / LAST_CHECKPOINT} holds its state and {export} its encoder (evaluations "
              f"mark it unfinished); {script_command('train.py')} {command_arg('resume', run_dir)} continues it"
              if short else
              f"[byol] done: {ckpt_dir / LAST_CHECKPOINT} (the final training state) and encoder export {export}"
              f"{evaluate_hint(run_dir, config)}",
              flush=True)
        return export
    finally:
        release_stop_signals(done)


def stopped_short(config: dict, epochs: int, step: int) -> str | None:
    """What stopped a fit that returned before its planned epochs: a Trainer limit given on the command line
    (max_time, max_steps, limit_train_batches=0, fast_dev_run) ends the fit quietly, and the run had been called
    done (with fast_dev_run, without even a metrics.csv); None for a run that trained all its epochs."""
    planned = int(config["trainer"]["max_epochs"])
    if epochs >= planned:
        return None
    limits = [f"trainer.{k}={v}" for k, v in config["trainer"].items()
              if k in ("max_time", "max_steps", "limit_train_batches", "fast_dev_run", "overfit_batches")
              and v is not None]  # none of them is set by conf/: given on the command line
    return (f"stopped short of its plan after {epochs} of {planned} epochs and {step} optimizer steps"
            f"{' (' + ', '.join(limits) + ')' if limits else ''}")


def check_resumable(checkpoint: dict, config: dict, path: Path) -> None:
    """The checkpoint's whole training state fits what ``config`` builds (weights, optimizer, schedule, loop
    counters, random states: :meth:`BYOLModule.check_checkpoint`), or one line naming the file. The module
    is built on the meta device: no memory, no randomness drawn, in a fraction of a second."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        module = build_module({**config, "compile": False})
    module.check_checkpoint(checkpoint, path)


def build_datamodule(config: dict, batches: IndexBatches | None = None) -> TensorDataModule:
    """The run's training batches (:func:`byol.jobs.pretrain.training_batches`, made here when not given)
    for Lightning, moved to the device when ``data.on_device``."""
    return TensorDataModule(batches or training_batches(config), config["data"].get("on_device", True))


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


def build_run_trainer(config: dict, run_dir: Path, loggers: list, monitors: list, steps_per_epoch: int,
                      hold_signals_at_end: bool = False) -> pl.Trainer:
    """The run's Trainer. ``hold_signals_at_end`` only for a caller that releases the stop signals itself
    (:func:`fit_run`, once the export is written): they stay blocked in this thread until then, and in every
    process it starts meanwhile (a child inherits the mask: a sweep launched later could not be stopped)."""
    ckpt = config["checkpoint"]
    trainer = config["trainer"]
    # a signal stops a step midway, except where the layers' hooks would cost (compiled graphs)
    checkpoints = RunCheckpoints(run_dir / CHECKPOINTS_DIR, run_dir, resume_hint(run_dir), ckpt["every_n_epochs"],
                                 ckpt["last_every_n_steps"], ckpt.get("keep_last"),
                                 stop_inside_steps=not config.get("compile"),
                                 hold_signals_at_end=hold_signals_at_end)
    # the monitors first: a checkpoint taken after a batch then holds the probes' step on that batch too
    knn = next((m for m in monitors if isinstance(m, OnlineKNN)), None)
    bar = progress_bar_on(trainer.get("enable_progress_bar"))
    callbacks = [*monitors, checkpoints, StepRates(),
                 EpochSummary(knn, heartbeat=None if bar else HEARTBEAT_SECONDS),
                 EpochHook(lambda: write_curves(run_dir)), OnTrainStart(lambda: save_run_config(config, run_dir))]
    callbacks += progress_bar(bar, trainer.get("log_every_n_steps"), steps_per_epoch)
    # per-step rows (loss, tau, lr) reach metrics.csv at least once per epoch, however short the epoch
    trainer = {**trainer, "log_every_n_steps": min(int(trainer.get("log_every_n_steps") or 1), steps_per_epoch)}
    trainer = trainer_for_this_machine(trainer, "[byol]")
    built = build_trainer(trainer, default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks,
                          enable_checkpointing=False, plugins=[AtomicCheckpointIO()])  # RunCheckpoints writes
    # max_time's Timer (appended by Lightning) first: at the batch it stops, RunCheckpoints then sees should_stop
    # and saves that mid-epoch state (saved at the epoch end, the cut epoch counted as done and a resume skipped it)
    built.callbacks.sort(key=lambda callback: not isinstance(callback, Timer))
    return built


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
    if start.checkpoint is not None:  # where the checkpoint stands in its own epochs (its layout, if it says)
        steps_per_epoch = start.layout.get("epoch_steps") or optimizer_steps_per_epoch(  # else each rank's share
            len(batches) // trainer.world_size, int(trainer_cfg.get("accumulate_grad_batches") or 1))
        where = describe_step(start.step, steps_per_epoch, start.layout.get("step_offset", 0))
        print(f"[byol] resuming from {start.checkpoint}: {where}", flush=True)


def processes(trainer: pl.Trainer, batch: int) -> str:
    """`` per process x 2 processes (global batch 64)`` under DDP; empty on one device."""
    world = trainer.world_size
    if world == 1:
        return ""
    return f" per process x {world} processes (global batch {batch * world * trainer.accumulate_grad_batches})"
