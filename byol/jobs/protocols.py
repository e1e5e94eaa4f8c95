"""The evaluation protocols, run on one encoder rebuilt for the representation being measured.

* ``knn``: weighted k-nearest neighbours on frozen features (Wu et al., 2018), no training;
* ``linear``: frozen encoder in eval mode, a linear classifier on standardised features.
  By default the features are extracted once and the classifier is trained on that cache
  (seconds); ``cached_features=false`` runs the standard protocol with crop + flip through
  the frozen encoder every epoch;
* ``finetune``: encoder and classifier trained end to end with crop + flip;
* ``embed``: no classifier and no accuracy: the test-set features saved and drawn as t-SNE maps
  coloured by class (:mod:`byol.jobs.embedding`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch

from byol.core.backbone import AVGPOOL
from byol.core.data import IndexBatches
from byol.core.disk_images import batches_of
from byol.core.errors import DataError, UnknownTap
from byol.core.features import autocast_dtype, extract_features, feature_dim, representation_taps, resolve_device
from byol.core.knn import knn_accuracy
from byol.core.linear_probe import MakeOptimizer, train_linear_probe
from byol.core.optim import build_optimizer, build_schedule
from byol.jobs.build import build_trainer, make_loggers, planned_world, trainer_for_this_machine
from byol.jobs.console import other_processes_lost
from byol.jobs.embedding import embed_test_set
from byol.jobs.evaluation_checks import checked_protocol, uses_trainer
from byol.jobs.pretrained import EncoderSource
from byol.lightning.callbacks import StopEvaluationOnSignal
from byol.lightning.classifier import ClassifierModule
from byol.lightning.data_module import SplitsDataModule

DEFAULT_OPTIMIZER = {"name": "sgd", "momentum": 0.9, "nesterov": True}
DEFAULT_SCHEDULE = {"name": "warmup_cosine"}


def run_protocol(model: EncoderSource, cfg: Mapping, splits, num_classes: int, out_dir: Path) -> dict:
    """Build the encoder for ``cfg['repr']`` and run ``cfg['eval']``'s protocol on it."""
    eval_cfg, repr_cfg, data_cfg = cfg["eval"], cfg["repr"], cfg["data"]
    protocol = checked_protocol(eval_cfg)
    pl.seed_everything(cfg["seed"], workers=True, verbose=False)
    taps = representation_taps(repr_cfg["name"], repr_cfg.get("taps") or [])
    try:
        encoder = model.build(taps)
    except UnknownTap as e:  # a tap this model's network lacks: the setting that names it, named
        raise UnknownTap(f"repr.taps: {e}") from None
    dim = feature_dim(encoder, taps)
    _note_taps_without_grid(model, taps)
    device = resolve_device(cfg["trainer"].get("accelerator", "auto"))
    _warn_normalisation(model, data_cfg)
    sizes = "/".join(str(len(splits[k])) for k in ("train", "val", "test"))
    print(f"[eval] {model.label}: {_describe(model)}; repr={repr_cfg['name']} ({'+'.join(taps)}: {dim}-d), "
          f"eval={protocol}, {sizes} train/val/test images, {device}", flush=True)
    info = {"feature_dim": dim, "taps": taps, "num_classes": num_classes,
            "split_sizes": {k: len(v) for k, v in splits.items()}}
    if cfg.get("channels_last", True):
        encoder.to(memory_format=torch.channels_last)
    if protocol == "embed":
        return {**embed_test_set(encoder, taps, splits["test"], num_classes, cfg, device, out_dir, model.label,
                                 _describe(model)), **info}
    loggers = make_loggers(cfg.get("logger"), out_dir)
    if not uses_trainer(eval_cfg):  # knn, or the linear probe on cached features
        dtype = autocast_dtype(cfg["trainer"].get("precision", "32-true"))
        start = time.perf_counter()
        encoder.to(device)
        features = {k: extract_features(encoder, v, taps, data_cfg["mean"], data_cfg["std"],
                                        cfg.get("feature_batch_size", 512), dtype, device)
                    for k, v in splits.items() if len(v)}
        features.setdefault("val", features["train"][:0])  # split.val_size=0: no validation images
        labels = {k: v.labels.to(device) for k, v in splits.items()}
        info["extract_seconds"] = round(time.perf_counter() - start, 2)
        if protocol == "knn":
            return {**_knn(features, labels, num_classes, eval_cfg, loggers), **info}
        return {**_cached_linear(features, labels, num_classes, eval_cfg, cfg["seed"], dtype, loggers), **info}
    return {**_lightning_protocol(encoder, taps, num_classes, cfg, splits, out_dir, loggers), **info}


def _describe(model: EncoderSource) -> str:
    """What is being evaluated, for the log: architecture, loss and epochs."""
    width = model.backbone.get("width", 1.0)
    arch = f"{model.backbone.get('name')}{'' if width in (None, 1, 1.0) else f' x{float(width):g}'} " \
           f"({model.backbone.get('stem')} stem)"
    if model.is_random:
        return f"random-init {arch}"
    return f"{arch} pretrained with loss={model.loss} for {model.epochs} epoch(s)"


def _note_taps_without_grid(model: EncoderSource, taps: Sequence[str]) -> None:
    """A note for taps the run's ``backbone.grids`` has no grid for: pooled to 1x1 (a trained encoder's grids
    are its own; evaluation cannot give them others)."""
    grids = model.backbone.get("grids") or {}
    pooled = [t for t in taps if t != AVGPOOL and t not in grids]
    if pooled:
        named = ", ".join(f"{k}: {v}x{v}" for k, v in grids.items()) or "none"
        print(f"[eval] note: {model.label}: {', '.join(pooled)} {'is' if len(pooled) == 1 else 'are'} pooled to 1x1 "
              f"(global average): the run's backbone.grids names a grid for other blocks only ({named})", flush=True)


def _warn_normalisation(model: EncoderSource, data_cfg: Mapping) -> None:
    """A note when the run was pretrained with another normalisation than the one evaluated with."""
    pretrain_data = model.data or {}
    if pretrain_data.get("mean") is None:
        return
    if list(pretrain_data["mean"]) != list(data_cfg["mean"]) or list(pretrain_data["std"]) != list(data_cfg["std"]):
        print(f"[eval] note: {model.label} was pretrained with data mean/std {pretrain_data['mean']}/"
              f"{pretrain_data['std']}; evaluating with {data_cfg['mean']}/{data_cfg['std']} (data.mean / "
              f"data.std)", flush=True)


def _finish_loggers(loggers: Sequence) -> None:
    """Flush the metrics outside Lightning (kNN, cached probe) as a finished Trainer would."""
    for logger in loggers:
        logger.save()
        logger.finalize("success")


def optimizer_maker(eval_cfg: Mapping) -> MakeOptimizer:
    """``make_optimizer(param_groups, total_steps, steps_per_epoch)`` for ``eval.optimizer`` and
    ``eval.scheduler`` (warm-up in epochs), by name from :mod:`byol.core.optim`'s tables."""
    optimizer = dict(eval_cfg.get("optimizer") or DEFAULT_OPTIMIZER)
    schedule = dict(eval_cfg.get("scheduler") or DEFAULT_SCHEDULE)
    warmup_epochs = schedule.pop("warmup_epochs", 0)
    return partial(_optimizer_and_schedule, optimizer.pop("name"), optimizer, schedule.pop("name"), schedule,
                   warmup_epochs)


def _optimizer_and_schedule(optimizer_name: str, optimizer_options: dict, schedule_name: str,
                            schedule_options: dict, warmup_epochs: float, param_groups: list[dict],
                            total_steps: int, steps_per_epoch: int) -> tuple:
    """A module-level function (under :func:`functools.partial`) so the Lightning module stays picklable."""
    optimizer = build_optimizer(optimizer_name, param_groups, param_groups[0]["lr"], optimizer_options)
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    return optimizer, build_schedule(schedule_name, optimizer, total_steps, warmup_steps, schedule_options)


def _knn(features, labels, num_classes: int, eval_cfg: Mapping, loggers) -> dict:
    """kNN accuracies of val and test against the training features: no training at all."""
    options = {"k": eval_cfg.get("k", 200), "temperature": eval_cfg.get("temperature", 0.1),
               "chunk_size": eval_cfg.get("chunk_size", 1024)}
    bank = len(features["train"])
    if options["k"] > bank:  # knn_accuracy votes with the whole bank then: say so, the result is not the asked k
        print(f"[eval] note: eval.k={options['k']} is more than the {bank} training images; kNN votes with "
              f"all {bank}", flush=True)
    accuracy = {split: knn_accuracy(features["train"], labels["train"], features[split], labels[split],
                                    num_classes, **options) for split in ("val", "test") if len(labels[split])}
    for logger in loggers:
        logger.log_metrics({f"{split}/acc": value for split, value in accuracy.items()}, step=0)
    _finish_loggers(loggers)
    return {"val_acc": accuracy.get("val"), "test_acc": accuracy["test"]}


def _cached_linear(features, labels, num_classes: int, eval_cfg: Mapping, seed: int, dtype, loggers) -> dict:
    """The linear probe on the extracted features, logging each epoch and printing ten of them."""
    start = time.perf_counter()
    epochs = int(eval_cfg["epochs"])
    every = max(1, epochs // 10)

    def on_epoch_end(row):
        row = {k: v for k, v in row.items() if v is not None}  # no val/acc without validation images
        for logger in loggers:
            logger.log_metrics(row, step=row["epoch"])
        if (row["epoch"] + 1) % every == 0 or row["epoch"] + 1 == epochs:
            parts = [f"{k} {row[k]:.4f}" for k in ("train/loss", "train/acc", "val/acc") if k in row]
            print(f"[eval] epoch {row['epoch'] + 1}/{epochs}: {', '.join(parts)}", flush=True)

    result = train_linear_probe(
        (features["train"], labels["train"]), (features["val"], labels["val"]),
        (features["test"], labels["test"]), num_classes, epochs=epochs,
        batch_size=int(eval_cfg["cached_batch_size"]), lr=float(eval_cfg["cached_lr"]),
        weight_decay=float(eval_cfg.get("weight_decay", 0.0)), make_optimizer=optimizer_maker(eval_cfg),
        seed=seed, storage_dtype=dtype, on_epoch_end=on_epoch_end)
    for logger in loggers:
        logger.log_metrics({"test/acc": result.test_acc}, step=epochs)
    _finish_loggers(loggers)
    return {"val_acc": result.val_acc, "test_acc": result.test_acc, "cached_features": True,
            "probe_seconds": round(time.perf_counter() - start, 2)}


def _lightning_protocol(encoder, taps, num_classes, cfg, splits, out_dir: Path, loggers) -> dict:
    """Augmented linear protocol or fine-tuning: augmentation needs the encoder every step, so Lightning."""
    eval_cfg, data_cfg = cfg["eval"], cfg["data"]
    finetune = eval_cfg["name"] == "finetune"
    module = ClassifierModule(
        encoder, taps, num_classes, data_cfg["mean"], data_cfg["std"], finetune,
        make_optimizer=optimizer_maker(eval_cfg), lr=float(eval_cfg["lr"]),
        encoder_lr=float(eval_cfg["encoder_lr"]) if finetune else None,
        weight_decay=float(eval_cfg.get("weight_decay", 0.0)), seed=cfg["seed"],
        channels_last=cfg.get("channels_last", True))
    trainer_cfg = trainer_for_this_machine({k: v for k, v in cfg["trainer"].items() if k != "max_epochs"}, "[eval]")
    stop = StopEvaluationOnSignal("fine-tuning" if finetune else "the linear protocol")
    validated = len(splits["val"]) > 0  # split.val_size=0: no validation loop, val_acc None
    train, val, test = _protocol_batches(eval_cfg, splits, cfg["seed"], planned_world(trainer_cfg))
    # a step row at least once per epoch, however few the batches (and no Lightning warning about it)
    trainer_cfg["log_every_n_steps"] = max(1, min(int(trainer_cfg.get("log_every_n_steps") or 50), len(train)))
    trainer: pl.Trainer = build_trainer(trainer_cfg, max_epochs=int(eval_cfg["epochs"]), logger=loggers,
                                        callbacks=[stop], default_root_dir=str(out_dir), enable_checkpointing=False,
                                        **({} if validated else {"limit_val_batches": 0}))
    batches = SplitsDataModule(train, val, test)
    with warnings.catch_warnings():  # the frozen encoder is in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        with other_processes_lost(trainer.world_size, stop.after_second_interrupt):
            trainer.fit(module, datamodule=batches)
    val_acc, val_images = ((float(trainer.callback_metrics[f"val/{key}"]) for key in ("acc", "images"))
                           if validated else (None, 0))
    (test,) = trainer.test(module, datamodule=batches, verbose=False)
    _finish_loggers(loggers)
    return {"val_acc": val_acc, "test_acc": float(test["test/acc"]), "cached_features": False,
            "val_images": int(val_images), "test_images": int(test["test/images"]),
            "processes": trainer.world_size}


def _protocol_batches(eval_cfg: Mapping, splits, seed: int, world: int) -> tuple[IndexBatches, ...]:
    """Train / val / test batches of ``eval.batch_size`` images: the global batch, which the processes of
    a DDP evaluation share (so the protocol is the same on any number of devices)."""
    batch = min(int(eval_cfg["batch_size"]), len(splits["train"]) // world * world)  # a multiple of world
    if batch // world < 2:  # eval.batch_size itself is checked before any model (evaluate.check_processes)
        raise DataError(f"{len(splits['train'])} training images cap eval.batch_size={eval_cfg['batch_size']} at "
                        f"{batch // world} image per batch on each of {world} process(es); BatchNorm needs at "
                        f"least 2: use more training images (data.subset, split.val_size)")
    return (batches_of(splits["train"], batch, seed=seed),
            batches_of(splits["val"], batch, shuffle=False, drop_last=False),
            batches_of(splits["test"], batch, shuffle=False, drop_last=False))
