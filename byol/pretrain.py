"""Pretraining run: build everything from the composed config, fit, write checkpoints and exports.

A run folder is resumable at any time: ``checkpoints/last.ckpt`` is refreshed every epoch (and
every ``checkpoint.last_every_n_steps`` optimizer steps), written atomically, and holds the
run's config, weights, EMA target, optimizer, scheduler, loop counters and RNG states. The data
order and the augmentation randomness are functions of (seed, epoch, batch), so nothing else is
needed for a resumed run to be the run it would have been.
"""

from __future__ import annotations

import copy
import logging
import signal
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar

from byol.core.checkpoint import (
    atomic_write_bytes,
    load_weights,
    online_encoder_state,
    remove_stale_temp_files,
    safe_load,
    save_encoder,
)
from byol.core.errors import CheckpointError, ConfigError, Interrupted
from byol.jobs.build import build_encoder, build_trainer, make_loggers
from byol.jobs.cli import command_arg, resume_hint
from byol.jobs.config_check import check_config, check_file_config
from byol.jobs.run_folder import RUN_ID_KEY, check_resume_target, new_run_id
from byol.lightning.checkpoint_io import AtomicCheckpointIO
from byol.lit import BYOLModule, TensorDataModule

COLLAPSE_STD = 0.1  # std/<head> below this: collapsed (about 0.8 at initialisation, 1 at best)
# Settings that decide the shapes of the saved weights: a checkpoint cannot continue under others.
ARCHITECTURE_KEYS = ("backbone", "loss.name", "loss.taps", "head")
# Never compared between a checkpoint and the command line.
IGNORED_KEYS = ("resume",)
# Signals that stop a run cleanly: cluster preemption (SIGTERM, SLURM's --signal=USR1) and Ctrl+C.
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                 signal.SIGINT) if s is not None)


# --------------------------------------------------------------------------- resuming


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``resume`` (a run folder or a .ckpt), else the run
    folder's own ``checkpoints/last.ckpt`` if it exists (a re-launched or requeued job)."""
    if resume:
        path = Path(resume).expanduser()
        if path.is_dir():
            last = path / "checkpoints" / "last.ckpt"
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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
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


def resume_config(saved: dict, composed: dict, requested=None) -> tuple[dict, list[str]]:
    """The config a resumed run continues with, and the settings that changed.

    ``saved`` is the checkpoint's config, ``composed`` the one of this invocation. With
    ``requested`` (key prefixes set on the command line; ``""`` for all) the run keeps its own
    saved settings except those requested, so ``python train.py resume=RUN_DIR`` needs no
    other argument; with ``requested=None`` the composed config is taken whole. Either way a
    change of architecture (:data:`ARCHITECTURE_KEYS`) is refused: the weights would not fit.
    """
    old, new = _flatten(saved), _flatten(composed)
    result = copy.deepcopy(saved) if requested is not None else copy.deepcopy(composed)
    changed = []
    for key in sorted(set(old) | set(new)):
        if _under(key, IGNORED_KEYS) or old.get(key) == new.get(key):
            continue
        if key not in new:
            continue  # a setting this version no longer has
        if requested is not None and not _under(key, requested):
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


def saved_run_id(raw_config: dict, source: str) -> str | None:
    """The run id a checkpoint's config holds (None for checkpoints written before run ids)."""
    run_id = raw_config.get(RUN_ID_KEY)
    if run_id is not None and not (isinstance(run_id, str) and run_id.isalnum() and len(run_id) <= 64):
        raise ConfigError(f"refusing {source}: {RUN_ID_KEY} = {str(run_id)[:40]!r} is not a run id")
    return run_id


def folder_run_id(run_dir: Path) -> str | None:
    """The id of the run whose config.yaml ``run_dir`` holds, checked as untrusted data."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:
        raise ConfigError(f"'{path}' is not a readable config ({type(e).__name__}: {e}); move it away or "
                          f"use another folder (hydra.run.dir=NEW)") from None
    check_file_config(raw, f"'{path}'")
    return saved_run_id(raw, f"'{path}'")


def describe_step(step: int, steps_per_epoch: int) -> str:
    """``step 6 (epoch 1, batch 2 of 4)``: where training stands, counted from 0."""
    epoch, batch = divmod(int(step), max(1, steps_per_epoch))
    return f"step {step} (epoch {epoch}, batch {batch} of {steps_per_epoch})"


def _checkpoint_epoch(path: Path) -> int:
    return int(safe_load(path, mmap=True).get("epoch", -1))


def export_from_checkpoint(ckpt: dict, cfg: dict, path: Path) -> None:
    """Write ``encoder.pt`` from a Lightning checkpoint's online encoder (a run killed between
    ``final.ckpt`` and its export)."""
    encoder = build_encoder(cfg)
    load_weights(encoder, online_encoder_state(ckpt), path)
    save_encoder(encoder, path, meta={"loss": cfg["loss"]["name"], "epochs": ckpt.get("epoch"),
                                      "global_step": ckpt.get("global_step"), "seed": cfg["seed"]})


# --------------------------------------------------------------------------- logs


# --------------------------------------------------------------------------- checkpoints and signals


class RunCheckpoints(pl.Callback):
    """``last.ckpt`` and ``epochNNNN.ckpt``, and a clean stop on preemption signals.

    ``last.ckpt`` is written at every epoch end and every ``last_every_n_steps`` optimizer steps
    inside an epoch (not on an epoch's last batch: the epoch end follows). Lightning's own
    resume from a checkpoint taken on an epoch's last batch continues correctly once, but the
    checkpoints that run then writes in the next epoch resume that epoch from its first batch
    (measured with Lightning 2.6), so that moment is avoided.

    On SIGTERM, SIGUSR1 or Ctrl+C the run saves ``last.ckpt`` at the next batch boundary (the
    epoch end for an epoch's last batch) and stops with :class:`~byol.core.errors.Interrupted`
    (exit status 128 + signal number) when the next batch starts, after that step's metrics
    reached metrics.csv. A second Ctrl+C stops at once.
    """

    def __init__(self, ckpt_dir: Path, run_dir: Path, every_n_epochs: int | None = None,
                 last_every_n_steps: int | None = None):
        self.ckpt_dir, self.run_dir = Path(ckpt_dir), Path(run_dir)
        self.last = self.ckpt_dir / "last.ckpt"
        self.every_n_epochs, self.last_every_n_steps = every_n_epochs, last_every_n_steps
        self.received: int | None = None
        self.stop_message: str | None = None  # set once last.ckpt holds the state to stop at
        self._previous: dict = {}

    # -- signals
    def _on_signal(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: stop now
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        # Replaces Lightning's SIGTERM handler (installed just before), which would stop after the
        # batch without saving; a SIGTERM it already caught is taken over.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:
            self.received, connector.received_sigterm = signal.SIGTERM, False
        try:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: leave signals to the caller
            self._previous = {}

    def _restore_signals(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signals()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_signals()

    # -- saving
    def _save(self, trainer, path: Path) -> None:
        trainer.save_checkpoint(path, weights_only=False)

    def _save_to_stop(self, trainer) -> None:
        self._save(trainer, self.last)
        steps = max(1, trainer.num_training_batches // max(1, trainer.accumulate_grad_batches))
        where = describe_step(trainer.global_step, steps)
        name = signal.Signals(self.received).name
        self.stop_message = (f"received {name}: saved {self.last.relative_to(self.run_dir)} at {where}; "
                             f"resume with: {resume_hint(self.run_dir)}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stop_message is not None:
            raise Interrupted(self.stop_message, self.received)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch end saves
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # between the micro-batches of one optimizer step
        if self.received is not None:
            self._save_to_stop(trainer)
            return
        n = self.last_every_n_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer, self.last)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.received is not None:
            self._save_to_stop(trainer)  # stops at the next epoch's first batch, if there is one
        else:
            self._save(trainer, self.last)
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer, self.ckpt_dir / f"epoch{epoch:04d}.ckpt")


class EpochSummary(pl.Callback):
    """One console line per epoch (loss per head, tau, lr, images/s): progress that reads well
    in log files too, at the cost of one host synchronisation per epoch."""

    def __init__(self):
        self._start, self._batches = time.perf_counter(), 0  # also right for an epoch resumed midway

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._batches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._start
        images = self._batches * pl_module.cfg["data"]["batch_size"]
        losses = {k: float(v) for k, v in pl_module.epoch_means().items()}
        heads = ", ".join(f"{k[len('loss/'):]} {v:.3f}" for k, v in losses.items() if k.startswith("loss/"))
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        total = losses.get("loss", float("nan"))
        spread = {k[len("std/"):]: v for k, v in losses.items() if k.startswith("std/")}
        print(f"[byol] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: loss {total:.4f} ({heads}), "
              f"std {min(spread.values(), default=float('nan')):.2f}, tau {pl_module.current_tau():.4f}, "
              f"lr {lr:.3g}, {images / max(seconds, 1e-9):.1f} images/s ({seconds:.0f} s)", flush=True)
        collapsed = {h: v for h, v in spread.items() if v < COLLAPSE_STD}
        if collapsed:
            found = ", ".join(f"std/{h} {v:.3f}" for h, v in collapsed.items())
            print(f"[byol] warning: the online projections have collapsed ({found}; "
                  f"about 1 is healthy, 0 means every image maps to the same point), so a low loss "
                  f"means nothing. Usual causes: a learning rate too high for the optimizer (Adam "
                  f"with a LARS-sized optim.base_lr), tau too low, or too little augmentation", flush=True)


def progress_bar(trainer_cfg) -> list:
    """A progress bar that refreshes every ``log_every_n_steps`` batches: each refresh reads the
    logged loss back from the device, and a per-step read would stall a GPU every step."""
    if not trainer_cfg.get("enable_progress_bar", True):
        return []
    return [TQDMProgressBar(refresh_rate=max(1, int(trainer_cfg.get("log_every_n_steps") or 1)))]


# --------------------------------------------------------------------------- the run


def pretrain(cfg: DictConfig, run_dir: str | Path, requested=None) -> Path:
    """Run (or continue) BYOL pretraining in ``run_dir``; returns the path of the encoder export.

    ``requested``: the config keys given on the command line (see :func:`resume_config`);
    ``None`` takes ``cfg`` as it is, also when resuming.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    export = run_dir / "encoder.pt"
    # Lightning-internal deprecation noise on every run (torch >= 2.10), nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # train.on_nonfinite=skip returns None from training_step on purpose, and says so itself
    warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")
    # IndexBatches resumes mid-epoch from the trainer's own counters, which Lightning cannot know
    warnings.filterwarnings("ignore", message=r"You.re resuming from a checkpoint that ended before")
    # Lightning's start-up banner (tips, "GPU available"): the [byol] lines say what matters
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)  # Hydra's own settings: not part of the run's config, not resolvable here
    container = OmegaConf.to_container(cfg, resolve=True)

    check_config(container, "the command line")
    folder_id = folder_run_id(run_dir)
    resume_from = find_resume(container.get("resume"), run_dir)
    resumed_step, run_id = None, None
    if resume_from is not None:
        resumed = safe_load(resume_from, mmap=True)  # refuses unsafe files before Lightning reads it
        if not isinstance(resumed, dict) or not isinstance(resumed.get("byol_config"), dict):
            raise CheckpointError(f"'{resume_from}' is not a train.py checkpoint (no 'byol_config'); resume= "
                                  f"takes a run folder or its checkpoints/*.ckpt, not an encoder export")
        source = f"checkpoint '{resume_from}'"
        saved = check_file_config(resumed["byol_config"], source)
        saved_id = saved_run_id(resumed["byol_config"], source)
        if check_resume_target(run_dir, resume_from, saved_id, folder_id):
            run_id = saved_id or folder_id  # the same run, continued in its own folder
        resumed_step = int(resumed["global_step"])
        container, changed = resume_config(saved, container, requested)
        del resumed
        check_config(container, source)
        if changed:
            print(f"[byol] resuming with changed settings (no longer an exact continuation): "
                  f"{'; '.join(changed)}", flush=True)
        cfg = OmegaConf.create(container)
        final = ckpt_dir / "final.ckpt"
        if final.is_file() and _checkpoint_epoch(final) >= int(cfg.trainer.max_epochs):
            if not export.is_file():
                export_from_checkpoint(safe_load(final), container, export)
            print(f"[byol] {run_dir} already finished its {cfg.trainer.max_epochs} epochs ({final}, "
                  f"{export}); nothing to do. To train longer: python train.py "
                  f"{command_arg('resume', run_dir)} trainer.max_epochs=N; to redo part of it, resume a "
                  f"checkpoint into another folder (hydra.run.dir=NEW)", flush=True)
            return export
    container[RUN_ID_KEY] = run_id or new_run_id()

    if cfg.loss.name == "classic" and cfg.loss.taps:
        raise ConfigError("loss=classic uses only the avgpool head; use loss=multi for loss.taps")
    if cfg.train.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"unknown train.on_nonfinite '{cfg.train.on_nonfinite}'; choose stop or skip")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(OmegaConf.to_yaml(OmegaConf.create(container)).encode(), run_dir / "config.yaml")
    remove_stale_temp_files(ckpt_dir)  # left by a process killed while writing

    # before the data: a missing logger package fails fast
    loggers = make_loggers(container.get("logger"), run_dir, resumed_step)
    datamodule = TensorDataModule(container["data"], cfg.seed, cfg.data.get("on_device", True))
    batches = datamodule.prepare()  # data errors before the model is built
    module = BYOLModule(container)
    module.last_good_checkpoint = ckpt_dir / "last.ckpt"
    checkpoints = RunCheckpoints(ckpt_dir, run_dir, cfg.checkpoint.every_n_epochs,
                                 cfg.checkpoint.last_every_n_steps)
    trainer: pl.Trainer = build_trainer(
        container["trainer"],
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=[checkpoints, LearningRateMonitor(logging_interval="step"), EpochSummary()]
        + progress_bar(cfg.trainer),
        enable_checkpointing=False,  # RunCheckpoints writes them
        plugins=[AtomicCheckpointIO()],
    )
    steps_per_epoch = max(1, len(batches) // int(cfg.trainer.get("accumulate_grad_batches") or 1))
    print(f"[byol] pretraining {cfg.backbone.name} ({cfg.backbone.stem} stem), loss={cfg.loss.name}, "
          f"{len(batches.data)} images, batch {cfg.data.batch_size}, {cfg.trainer.max_epochs} epochs, "
          f"on {trainer.strategy.root_device} ({cfg.trainer.precision})", flush=True)
    print(f"[byol] run folder: {run_dir}", flush=True)
    if resume_from is not None:
        print(f"[byol] resuming from {resume_from}: {describe_step(resumed_step, steps_per_epoch)}",
              flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)

    trainer.save_checkpoint(ckpt_dir / "final.ckpt", weights_only=False)
    save_encoder(module.model.online_encoder, export,
                 meta={"loss": cfg.loss.name, "epochs": trainer.current_epoch,
                       "global_step": trainer.global_step, "seed": cfg.seed})
    print(f"[byol] done: {ckpt_dir / 'final.ckpt'} and encoder export {export}", flush=True)
    return export
