"""Pretraining run: build everything from the composed config, fit, write checkpoints and exports."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from byol.checkpoint import AtomicCheckpointIO, save_encoder
from byol.errors import ConfigError
from byol.lit import BYOLModule, TensorDataModule

CSV_LOGGER = "pytorch_lightning.loggers.CSVLogger"


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """Always a metrics.csv in the run folder, plus the configured logger if it is another one."""
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if cfg.logger is not None and cfg.logger.get("_target_") != CSV_LOGGER:
        loggers.append(instantiate(cfg.logger))
    return loggers


class LastCheckpoint(ModelCheckpoint):
    """Keeps only ``last.ckpt``; its own state key lets it sit beside the periodic checkpointer."""

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"


def checkpoint_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list[ModelCheckpoint]:
    """``last.ckpt`` every epoch (or every N steps) and ``epochNNNN.ckpt`` every N epochs, kept."""
    c = cfg.checkpoint
    if c.last_every_n_steps:
        last = LastCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=c.last_every_n_steps)
    else:
        last = LastCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_epochs=1,
                               save_on_train_epoch_end=True)
    periodic = ModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:04d}", auto_insert_metric_name=False,
                               every_n_epochs=c.every_n_epochs, save_top_k=-1, save_on_train_epoch_end=True)
    return [last, periodic]


def pretrain(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Run BYOL pretraining in ``run_dir``; returns the path of the encoder export."""
    run_dir = Path(run_dir)
    if cfg.loss.name == "classic" and cfg.loss.taps:
        raise ConfigError("loss=classic uses only the avgpool head; use loss=multi for loss.taps")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    OmegaConf.save(OmegaConf.create(container), run_dir / "config.yaml")

    datamodule = TensorDataModule(container["data"], cfg.seed, cfg.data.get("on_device", True))
    batches = datamodule.prepare()  # data errors before the model is built
    module = BYOLModule(container)
    ckpt_dir = run_dir / "checkpoints"
    module.last_good_checkpoint = ckpt_dir / "last.ckpt"
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=make_loggers(cfg, run_dir),
        callbacks=checkpoint_callbacks(cfg, ckpt_dir) + [LearningRateMonitor(logging_interval="step")],
        plugins=[AtomicCheckpointIO()],
    )
    print(f"[byol] pretraining {cfg.backbone.name} ({cfg.backbone.stem} stem), loss={cfg.loss.name}, "
          f"{len(batches.data)} images, batch {cfg.data.batch_size}, {cfg.trainer.max_epochs} epochs, "
          f"on {trainer.strategy.root_device} ({cfg.trainer.precision})", flush=True)
    print(f"[byol] run folder: {run_dir}", flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("resume"))

    trainer.save_checkpoint(ckpt_dir / "final.ckpt")
    export = run_dir / "encoder.pt"
    save_encoder(module.model.online_encoder, export,
                 meta={"loss": cfg.loss.name, "epochs": trainer.current_epoch, "global_step": trainer.global_step,
                       "seed": cfg.seed})
    print(f"[byol] done: {ckpt_dir / 'final.ckpt'} and encoder export {export}", flush=True)
    return export
