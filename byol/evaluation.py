"""Evaluation of pretrained encoders: representations, kNN, linear probes and fine-tuning.

BYOL keeps only the online encoder; this module rebuilds it from the pretraining run's own
saved config (never from evaluation defaults, so a multi-loss ResNet-50 run is evaluated as
what it is) and measures its representation under three protocols:

* ``knn``: weighted k-nearest neighbours on frozen features (Wu et al., 2018), no training;
* ``linear``: frozen encoder in eval mode, a linear classifier on standardised features.
  By default the features are extracted once and the classifier is trained on that cache
  (seconds); ``cached_features=false`` runs the standard protocol with crop + flip through
  the frozen encoder every epoch;
* ``finetune``: encoder and classifier trained end to end with crop + flip.

The plain functions here import neither Hydra nor the job machinery; :func:`evaluate` is the
job behind ``evaluate.py``.
"""

from __future__ import annotations

import json
import math
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from byol.core.augment import CROP_ONLY, Normalize, ViewAugment
from byol.core.backbone import AVGPOOL, Encoder
from byol.core.checkpoint import (
    ENCODER_FORMAT,
    ONLINE_PREFIX,
    atomic_write_bytes,
    encoder_config,
    load_weights,
    online_encoder_state,
    safe_load,
)
from byol.core.errors import ByolError, CheckpointError, ConfigError, DataError
from byol.core.optim import build_optimizer, build_schedule, param_groups, warmup_cosine
from byol.data import ImageTensors, IndexBatches
from byol.jobs.build import build_trainer, make_loggers
from byol.jobs.cli import FAILED
from byol.jobs.config_check import check_file_config, check_plain

RANDOM = "random"
RANDOM_LOSS = "random-init"
PROTOCOLS = ("linear", "finetune", "knn")

# --------------------------------------------------------------------------- representations


def representation_taps(name: str, taps: Sequence[str] = ()) -> list[str]:
    """Encoder taps concatenated into the representation ``name``.

    ``avgpool``: the global average pool only. ``combined``: avgpool followed by ``taps``
    (by default ``layer2.0`` and ``layer3.0``), whichever loss trained the encoder.
    """
    if name == AVGPOOL:
        return [AVGPOOL]
    if name == "combined":
        extra = [t for t in dict.fromkeys(taps) if t != AVGPOOL]
        if not extra:
            raise ConfigError("repr=combined needs intermediate taps in repr.taps, e.g. [layer2.0, layer3.0]")
        return [AVGPOOL] + extra
    raise ConfigError(f"unknown repr.name '{name}'; choose avgpool or combined")


def feature_dim(encoder: Encoder, taps: Sequence[str]) -> int:
    return sum(encoder.dims[t] for t in taps)


def concat_features(feats: Mapping[str, torch.Tensor], taps: Sequence[str]) -> torch.Tensor:
    return torch.cat([feats[t] for t in taps], dim=1)


# --------------------------------------------------------------------------- devices and precision


def resolve_device(accelerator: str = "auto") -> torch.device:
    """The device Lightning's ``accelerator`` setting would pick, for the work done outside Lightning."""
    accelerator = str(accelerator).lower()
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is available; "
                          f"use trainer.accelerator=cpu")
    return torch.device("cpu")


def autocast_dtype(precision) -> torch.dtype | None:
    """The autocast dtype of a Lightning ``precision`` setting (None: full precision)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p in ("16", "16-mixed", "16-true"):
        return torch.float16
    return None


# --------------------------------------------------------------------------- feature extraction


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    images: torch.Tensor,
    taps: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Features ``(N, D)`` of uint8 ``images`` through the encoder in eval mode, without augmentation.

    Runs under autocast ``dtype`` (bf16 on CPU and GPU) with channels_last inputs; the
    result has that dtype (float32 without autocast) and lives on ``device``.
    """
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    normalize = Normalize(mean, std).to(device)
    was_training = encoder.training
    encoder.eval()
    out = None
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start:start + batch_size].to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                f = concat_features(encoder(x, taps=taps), taps)
            if out is None:
                out = torch.empty(images.shape[0], f.shape[1], dtype=f.dtype, device=device)
            out[start:start + f.shape[0]] = f
    finally:
        encoder.train(was_training)
    if out is None:
        raise DataError("cannot extract features of an empty dataset")
    return out


# --------------------------------------------------------------------------- kNN


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class predictions (Wu et al., 2018): cosine similarity, votes ``exp(sim / T)``.

    The query set is processed in chunks so the similarity matrix never exceeds
    ``chunk_size x N`` on the device.
    """
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start:start + chunk_size].to(train.device).float(), dim=1)
        sim, idx = (q @ train.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_features, train_labels, query_features, query_labels, num_classes: int,
                 **kwargs) -> float:
    pred = knn_predict(train_features, train_labels, query_features, num_classes, **kwargs)
    return int((pred == query_labels.to(pred.device)).sum()) / max(1, pred.shape[0])


# --------------------------------------------------------------------------- linear probe on cached features


def standardize(train: torch.Tensor, *others: torch.Tensor, order: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, eps: float = 1e-5, chunk: int = 8192):
    """Scale features by the training set's per-dimension mean and std.

    This is what a BatchNorm without affine parameters does in eval mode with training-set
    statistics; combined features mix scales (avgpool vs earlier blocks), so the classifier
    needs it. ``order`` also permutes the rows of ``train`` in the same pass. Returns the
    standardised tensors (``train`` first) and ``(mean, std)``.
    """
    total = torch.zeros(train.shape[1], dtype=torch.float64, device=train.device)
    sq = torch.zeros_like(total)
    for s in range(0, train.shape[0], chunk):  # float32 within a chunk, float64 across chunks
        block = train[s:s + chunk].float()
        total += block.sum(0).double()
        sq += block.square().sum(0).double()
    n = train.shape[0]
    mean = total / n
    mean, std = mean.float(), ((sq / n - mean * mean).clamp_min(0) + eps).sqrt().float()
    inv_std = 1 / std
    out_dtype = out_dtype or train.dtype

    def apply(x, rows=None):
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        for s in range(0, x.shape[0], chunk):
            block = x[s:s + chunk] if rows is None else x[rows[s:s + chunk].to(x.device)]
            y[s:s + chunk] = (block.float() - mean).mul_(inv_std)
        return y

    return [apply(train, order)] + [apply(x) for x in others], (mean, std)


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the cached probe on one CPU thread.

    Its steps are small (a 1024 x D matmul and a few ops on a 10 x D weight), so with more
    threads each op's synchronisation costs more than its work, badly so when other jobs
    share the cores: 0.12 s per epoch on one thread vs 1.3 s on two for 45,000 x 3,584
    features on this project's busy 2-core machine.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _logits(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, head.weight.to(x.dtype), head.bias.to(x.dtype)).float()


@torch.no_grad()
def linear_accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    correct = 0
    for s in range(0, x.shape[0], chunk):
        correct += int((_logits(head, x[s:s + chunk]).argmax(1) == y[s:s + chunk].to(x.device)).sum())
    return correct / max(1, x.shape[0])


@dataclass
class ProbeResult:
    """The trained classifier (applied to ``(x - mean) / std``) and its accuracies."""

    head: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    val_acc: float
    test_acc: float
    history: list[dict] = field(default_factory=list)


def train_linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    optimizer: Callable | None = None,
    scheduler: Callable | None = None,
    warmup_epochs: float = 0,
    seed: int = 0,
    storage_dtype: torch.dtype | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> ProbeResult:
    """A linear classifier on cached features, standardised by the training set's statistics.

    The training features are shuffled once while they are standardised (``storage_dtype``,
    e.g. bf16, halves the memory traffic); each epoch then visits the contiguous mini-batches
    of that copy in a new random order. Skipping the per-epoch gather of rows makes an epoch a
    single pass over the cache; shuffle-once SGD converges like reshuffled SGD on this convex
    problem (Mishchenko et al., 2020; here: the same test accuracy to 0.1 point on 45,000 x
    3,584 CIFAR-10 features). Metrics reach the host once per epoch.

    ``optimizer`` and ``scheduler`` are factories (Hydra partials):
    ``optimizer(params, lr=..., weight_decay=...)`` and ``scheduler(optimizer, total_steps=...,
    warmup_steps=...)``; the defaults are SGD-Nesterov (momentum 0.9) and a cosine decay.
    """
    x, y = train
    n, dim = x.shape
    device = x.device
    if n == 0:
        raise DataError("the training split is empty")
    with one_cpu_thread(device):
        return _train_probe(x, y, val, test, num_classes, epochs, batch_size, lr, weight_decay, optimizer,
                            scheduler, warmup_epochs, seed, storage_dtype, on_epoch_end)


def _train_probe(x, y, val, test, num_classes, epochs, batch_size, lr, weight_decay, optimizer, scheduler,
                 warmup_epochs, seed, storage_dtype, on_epoch_end) -> ProbeResult:
    n, dim = x.shape
    device = x.device
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    (x, val_x, test_x), (mean, std) = standardize(x, val[0], test[0], order=order, out_dtype=storage_dtype)
    y = y.to(device)[order.to(device)]
    head = nn.Linear(dim, num_classes).to(device)
    with torch.no_grad():  # seeded initialisation, independent of the global RNG
        bound = 1 / math.sqrt(dim)
        head.weight.copy_((torch.rand(num_classes, dim, generator=gen) * 2 - 1) * bound)
        head.bias.zero_()
    optimizer = optimizer or (lambda params, **kw: torch.optim.SGD(params, momentum=0.9, nesterov=True, **kw))
    opt = optimizer(head.parameters(), lr=lr, weight_decay=weight_decay)
    batch_size = min(batch_size, n)
    steps = -(-n // batch_size)
    sched = (scheduler or warmup_cosine)(opt, total_steps=epochs * steps,
                                         warmup_steps=int(warmup_epochs * steps))
    history = []
    for epoch in range(epochs):
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for b in torch.randperm(steps, generator=gen).tolist():
            xb, yb = x[b * batch_size:(b + 1) * batch_size], y[b * batch_size:(b + 1) * batch_size]
            logits = _logits(head, xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * yb.shape[0]
            correct += (logits.detach().argmax(1) == yb).sum()
        row = {"epoch": epoch, "train/loss": loss_sum.item() / n, "train/acc": correct.item() / n,
               "val/acc": linear_accuracy(head, val_x, val[1])}
        history.append(row)
        if on_epoch_end is not None:
            on_epoch_end(row)
    val_acc = history[-1]["val/acc"] if history else linear_accuracy(head, val_x, val[1])
    return ProbeResult(head, mean, std, val_acc, linear_accuracy(head, test_x, test[1]), history)


# --------------------------------------------------------------------------- Lightning classifier


class ClassifierModule(pl.LightningModule):
    """Encoder + linear classifier for the augmented linear protocol and for fine-tuning.

    The classifier is a BatchNorm without affine parameters (combined features mix scales)
    followed by a linear layer. ``finetune=False``: the encoder is frozen AND kept in eval
    mode, so neither its weights nor its BatchNorm statistics move. ``finetune=True``: both
    are trained, the encoder with its own learning rate. Training images get crop + flip,
    per sample, on the device; validation and test images only the normalisation.
    """

    def __init__(self, encoder: Encoder, taps: Sequence[str], num_classes: int, eval_cfg: Mapping,
                 mean: Sequence[float], std: Sequence[float], finetune: bool, seed: int = 0,
                 channels_last: bool = True):
        super().__init__()
        self.encoder = encoder
        self.taps = list(taps)
        self.finetune = finetune
        self.cfg = dict(eval_cfg)
        self.seed = seed
        dim = feature_dim(encoder, self.taps)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
        self.normalize = Normalize(mean, std)
        self.augment = ViewAugment([CROP_ONLY], mean, std)
        self._generator = None
        self.encoder.requires_grad_(finetune)
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.train()  # a frozen encoder starts in eval mode

    def train(self, mode: bool = True):
        """``module.train()`` switches every submodule to train mode; a frozen encoder stays in eval."""
        super().train(mode)
        if not self.finetune:
            self.encoder.eval()
        return self

    def on_train_epoch_start(self):
        """Lightning keeps the modes it finds (a new module is in train mode): set them each epoch."""
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            feats = concat_features(self.encoder(x, taps=self.taps), self.taps)
        return self.head(feats.float())

    def _generator_for(self, batch_idx: int) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        return self._generator.manual_seed(hash((self.seed, self.current_epoch, batch_idx)) & (2**63 - 1))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        (view,) = self.augment(images, self._generator_for(batch_idx))
        logits = self(view)
        loss = F.cross_entropy(logits, labels)
        n = images.shape[0]
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean(), on_step=False, on_epoch=True,
                 batch_size=n)
        return loss

    def _eval_step(self, batch, split: str):
        images, labels = batch
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        acc = (self(x).argmax(1) == labels).float().mean()
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=images.shape[0])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_train_epoch_end(self):
        m = self.trainer.callback_metrics
        parts = [f"{k} {float(m[k]):.4f}" for k in ("train/loss", "train/acc", "val/acc") if k in m]
        self.print(f"[eval] epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: {', '.join(parts)}")

    def configure_optimizers(self):
        c = self.cfg
        wd = c.get("weight_decay", 0.0)
        groups = [dict(g, lr=c["lr"]) for g in param_groups([self.head], wd)]
        if self.finetune:
            groups += [dict(g, lr=c["encoder_lr"]) for g in param_groups([self.encoder], wd)]
        groups = [g for g in groups if g["params"]]
        opt = dict(c.get("optimizer") or {"name": "sgd", "momentum": 0.9, "nesterov": True})
        optimizer = build_optimizer(opt.pop("name"), groups, c["lr"], opt)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        sched = dict(c.get("scheduler") or {"name": "warmup_cosine"})
        warmup = int(sched.pop("warmup_epochs", 0) * per_epoch)
        scheduler = build_schedule(sched.pop("name"), optimizer, total, warmup, sched)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --------------------------------------------------------------------------- pretrained models


@dataclass
class Pretrained:
    """One encoder to evaluate: its weights (None for a random initialisation) and what built it."""

    label: str
    source: str                     # path of the weights file, or "random"
    backbone: dict                  # name, stem, grids (from the run, never from evaluation defaults)
    loss: str
    seed: int | None = None
    epochs: int = 0
    state_dict: dict | None = None
    data: dict | None = None        # the pretraining data config, when known
    planned_epochs: int | None = None  # the run's trainer.max_epochs (its config.yaml, else the checkpoint's)

    @property
    def is_random(self) -> bool:
        return self.state_dict is None

    @property
    def pretrain_status(self) -> str | None:
        """``complete``, ``incomplete`` (fewer epochs than the run planned: a killed or running run),
        or None for a random initialisation."""
        if self.is_random:
            return None
        return "incomplete" if self.planned_epochs is not None and self.epochs < self.planned_epochs else \
            "complete"

    def build(self, taps: Sequence[str]) -> Encoder:
        """The encoder exposing ``taps``, with the run's architecture and its online weights."""
        b = self.backbone
        # a random encoder is a function of its own seed alone (one baseline per pretraining seed),
        # and drawing it leaves the evaluation's random stream as it was
        with torch.random.fork_rng(devices=[], enabled=self.is_random):
            if self.is_random and self.seed is not None:
                torch.manual_seed(self.seed)
            encoder = Encoder(b["name"], b["stem"], list(taps), b.get("grids") or {})
        if not self.is_random:
            load_weights(encoder, self.state_dict, self.source)
        return encoder


def is_run_dir(path: Path) -> bool:
    return (path / "encoder.pt").is_file() or any((path / "checkpoints").glob("*.ckpt"))


def weights_file(run_dir: Path) -> Path:
    """encoder.pt, else checkpoints/final.ckpt, else last.ckpt, else the newest checkpoint."""
    for candidate in (run_dir / "encoder.pt", run_dir / "checkpoints" / "final.ckpt",
                      run_dir / "checkpoints" / "last.ckpt"):
        if candidate.is_file():
            return candidate
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise CheckpointError(f"'{run_dir}' holds no encoder.pt and no checkpoints/*.ckpt")
    return ckpts[-1]


def find_runs(folder: Path) -> list[Path]:
    """Pretraining run folders at or below ``folder``, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = {p.parent for p in folder.rglob("encoder.pt")}
    candidates |= {p.parent.parent for p in folder.rglob("checkpoints/*.ckpt")}
    return sorted(p for p in candidates if is_run_dir(p))


def sweep_jobs(sweep: Path) -> list[Path]:
    """The job folders of a sweep: its subfolders with a ``.hydra/`` folder or a ``config.yaml``."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        return []
    return sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and ((d / ".hydra").is_dir() or (d / "config.yaml").is_file()))


def failed_jobs(sweep: Path) -> list[tuple[Path, str]]:
    """``(job folder, reason)`` for each job of a sweep with no model to evaluate: a ``FAILED`` file
    (reason: its first line), or no weights at all."""
    missing = []
    for job in sweep_jobs(sweep):
        if (job / FAILED).is_file():
            lines = (job / FAILED).read_text(errors="replace").strip().splitlines()
            missing.append((job, f"training failed: {lines[0].strip() if lines else 'no reason recorded'}"))
        elif not find_runs(job):
            missing.append((job, "no weights: no encoder.pt and no checkpoints/*.ckpt"))
    return missing


def sweep_runs(sweep: Path) -> list[Path]:
    """The run folders of a sweep that can be evaluated: :func:`find_runs` minus the jobs that failed."""
    failed = [job for job, _ in failed_jobs(sweep)]
    return [r for r in find_runs(sweep) if not any(r == job or r.is_relative_to(job) for job in failed)]


def _newest(paths: Sequence[Path]) -> Path:
    return max(paths, key=lambda p: weights_file(p).stat().st_mtime)


def read_pretrained(path: str | Path, label: str | None = None) -> Pretrained:
    """Read an encoder export or a Lightning checkpoint of a pretraining run (``weights_only``)."""
    path = Path(path)
    blob = safe_load(path)
    label = label or path.stem
    run_cfg = _run_config(_run_folder(path))
    run_cfg = run_cfg if run_cfg and run_cfg.get("loss") else None  # a training run's config, not another
    if isinstance(blob, dict) and blob.get("format") == ENCODER_FORMAT:
        meta = blob.get("meta") or {}
        epochs = int(meta.get("epochs") or 0)
        # an export is written when training ends: without a run config, it planned what it did
        planned = _max_epochs(run_cfg) if run_cfg else epochs
        meta = check_plain(meta, f"'{path}'") if isinstance(meta, Mapping) else {}
        backbone = encoder_config(blob.get("backbone"), path)
        return Pretrained(label, str(path), backbone, meta.get("loss", "unknown"),
                          meta.get("seed"), epochs, blob["state_dict"], (run_cfg or {}).get("data"), planned)
    if isinstance(blob, dict) and isinstance(blob.get("byol_config"), dict) and "state_dict" in blob:
        state = online_encoder_state(blob)
        if not state:
            raise CheckpointError(f"'{path}' has no online encoder weights ({ONLINE_PREFIX}*); it is not a "
                                  f"BYOL pretraining checkpoint")
        cfg = check_file_config(blob["byol_config"], f"checkpoint '{path}'")
        progress = blob.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        epochs = progress.get("processed", blob.get("epoch", 0))  # epochs finished, also mid-epoch
        # the run folder's config.yaml is rewritten by a resume with more epochs; the checkpoint's is not
        in_run = path.parent.name == "checkpoints" and run_cfg
        planned = _max_epochs(run_cfg) if in_run else _max_epochs(cfg)
        return Pretrained(label, str(path), dict(cfg["backbone"]), cfg["loss"]["name"], cfg.get("seed"),
                          int(epochs or 0), state, cfg.get("data"), planned)
    raise CheckpointError(f"'{path}' is not a byol checkpoint: expected an encoder export (encoder.pt) or a "
                          f"Lightning checkpoint written by train.py (with 'byol_config')")


def _run_config(folder: Path) -> dict | None:
    cfg = folder / "config.yaml"
    if not cfg.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(cfg), resolve=False)
    except Exception:
        return None
    return check_file_config(raw, f"'{cfg}'")  # data from whoever wrote the folder: refused if unsafe


def _max_epochs(run_cfg: Mapping | None) -> int | None:
    """A run config's ``trainer.max_epochs`` (None when absent or unbounded)."""
    try:
        epochs = int((run_cfg.get("trainer") or {}).get("max_epochs"))
    except (AttributeError, TypeError, ValueError):
        return None
    return epochs if epochs > 0 else None


# the data settings that make two results comparable; the evaluation's split too
DATA_FIELDS = ("name", "root", "subset", "image_size", "num_train", "num_test")
EVAL_DATA_FIELDS = DATA_FIELDS + ("split", "val_size")


def data_fields(data: Mapping | None, keys: Sequence[str] = DATA_FIELDS) -> dict | None:
    """The settings ``keys`` of a data config that it has (``num_train``: synthetic data only)."""
    if not isinstance(data, Mapping):
        return None
    return {k: data[k] for k in keys if k in data}


def _config_fields(run_cfg: Mapping | None) -> dict:
    """loss / backbone / stem / seed / pretraining data and planned epochs from a run's config.yaml, so
    a run whose weights cannot be read still lands in its cell of the results table (as failed)."""
    if not run_cfg:
        return {}
    b = run_cfg.get("backbone") or {}
    fields = {"loss": (run_cfg.get("loss") or {}).get("name"), "backbone": b.get("name"),
              "stem": b.get("stem"), "seed": run_cfg.get("seed"),
              "pretrain_data": data_fields(run_cfg.get("data")),
              "pretrain_epochs_planned": _max_epochs(run_cfg)}
    return {k: v for k, v in fields.items() if v is not None}


def random_model(backbone: Mapping, seed: int, label: str = RANDOM_LOSS) -> Pretrained:
    b = dict(backbone)
    arch = {"name": b["name"], "stem": b["stem"], "grids": dict(b.get("grids") or {})}
    return Pretrained(label, RANDOM, arch, RANDOM_LOSS, seed, 0)


def resolve_pretrained(spec: str, outputs_dir: str | Path = "outputs") -> tuple:
    """What ``pretrained=`` names: ``("random", None)``, ``([weights file], None)`` for one model, or
    ``([weights files...], sweep folder)`` for every run of a sweep."""
    spec = str(spec)
    outputs = Path(outputs_dir)
    if spec == RANDOM:
        return RANDOM, None
    if spec == "latest":
        runs = find_runs(outputs)
        if not runs:
            raise CheckpointError(
                f"no pretraining runs found under '{outputs}' (a run folder holds encoder.pt or "
                f"checkpoints/*.ckpt). Create one with `python train.py` (`python train.py experiment=smoke` "
                f"takes seconds), name one with pretrained=PATH, or evaluate a random-init encoder with "
                f"pretrained=random")
        run = _newest(runs)
        print(f"[eval] pretrained=latest: {run} (newest of {len(runs)} runs under {outputs})", flush=True)
        return [weights_file(run)], None
    if spec == "latest_sweep":
        root = outputs / "multirun" / "train"
        sweeps = [d for d in sorted(root.iterdir()) if d.is_dir() and (find_runs(d) or sweep_jobs(d))] \
            if root.is_dir() else []
        if not sweeps:
            raise CheckpointError(
                f"no pretraining sweep found under '{root}'. Create one with `python train.py -m "
                f"loss=classic,multi seed=0,1,2` or name a folder with pretrained=PATH")
        # the newest by its newest weights or job folder: a sweep whose jobs all failed is still the newest
        sweep = max(sweeps, key=lambda d: max([weights_file(r).stat().st_mtime for r in find_runs(d)]
                                              + [j.stat().st_mtime for j in sweep_jobs(d)]))
        print(f"[eval] pretrained=latest_sweep: {sweep}", flush=True)
        return _sweep_targets(sweep), sweep
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"pretrained='{spec}' does not exist; give a run folder, a sweep folder, a "
                              f".ckpt, an encoder.pt, or pretrained=latest / latest_sweep / random")
    if path.is_file():
        return [path], None
    if is_run_dir(path):
        return [weights_file(path)], None
    if not find_runs(path) and not sweep_jobs(path):
        raise CheckpointError(f"no pretraining run in '{path}' (a run folder holds encoder.pt or "
                              f"checkpoints/*.ckpt); create one with `python train.py` or use "
                              f"pretrained=random")
    return _sweep_targets(path), path


def _sweep_targets(sweep: Path) -> list[Path]:
    """The weights of every run of ``sweep`` that can be evaluated; an error when there is none."""
    runs = sweep_runs(sweep)
    if not runs:
        failed = failed_jobs(sweep)
        detail = "; ".join(f"{job.name}: {reason}" for job, reason in failed[:5])
        raise CheckpointError(f"no run of the sweep '{sweep}' can be evaluated: its {len(failed)} job(s) "
                              f"have no model ({detail}{'; ...' if len(failed) > 5 else ''})")
    return [weights_file(r) for r in runs]


def _run_folder(weights: Path) -> Path:
    return weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent


def _run_label(weights: Path, sweep: Path | None = None) -> str:
    """A run's name in a sweep (its path below the sweep folder), else its folder's name."""
    run = _run_folder(weights)
    if sweep is not None and run != sweep and run.is_relative_to(sweep):
        return str(run.relative_to(sweep))
    return run.name if is_run_dir(run) else weights.stem


# --------------------------------------------------------------------------- the evaluation job


def _plain(cfg) -> dict:
    """The resolved config as plain containers, without the ``hydra`` node."""
    from omegaconf import DictConfig, OmegaConf, open_dict

    if isinstance(cfg, DictConfig):
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in dict(cfg).items() if k != "hydra"}


def load_eval_data(data_cfg: Mapping, seed: int) -> tuple[dict[str, ImageTensors], int]:
    """train / val / test splits (``byol.data.eval_splits``) and the number of classes."""
    from byol.data import eval_splits

    splits = eval_splits(data_cfg, seed=seed)
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(f"the {name} split is empty; use more data or a smaller data.val_size")
        if bool((split.labels < 0).any()):
            raise DataError(f"the {name} split has unlabelled images; evaluation needs class folders "
                            f"(DIR/train/<class>/*, DIR/test/<class>/*)")
    present = torch.unique(splits["train"].labels).tolist()
    if len(present) < 2:  # a one-class classifier scores 100% and measures nothing
        names = splits["train"].classes
        found = ", ".join(f"'{names[k]}'" if k < len(names) else f"label {k}" for k in present)
        raise DataError(f"evaluation needs at least 2 classes, but the training data has {len(present)} "
                        f"({found}), so any encoder would score 100%; add class folders with images "
                        f"(DIR/train/<class>/*, DIR/test/<class>/*, at least 2 classes) or point data.root "
                        f"at a dataset with several classes")
    num_classes = data_cfg.get("num_classes") or len(splits["train"].classes) or \
        int(max(int(s.labels.max()) for s in splits.values())) + 1
    return splits, int(num_classes)


def _write_json(obj: dict, path: Path) -> None:
    atomic_write_bytes((json.dumps(obj, indent=2, default=str) + "\n").encode(), path)


def _close(loggers: Sequence) -> None:
    for logger in loggers:
        logger.save()
        logger.finalize("success")


def _result_fields(pretrained: str, label: str | None, cfg: Mapping) -> dict:
    """The fields of a ``results.json`` known before any model is read: the evaluation's settings."""
    e = cfg["eval"]
    return {"pretrained": pretrained, "label": label, "loss": None, "repr": cfg["repr"]["name"],
            "eval": e["name"], "backbone": None, "stem": None, "grids": None, "pretrain_epochs": None,
            "pretrain_epochs_planned": None, "pretrain_status": None, "pretrain_data": None,
            "eval_epochs": int(e.get("epochs", 0)) if e["name"] != "knn" else 0, "seed": None,
            "eval_seed": cfg["seed"], "data": cfg["data"]["name"],
            "eval_data": data_fields(cfg["data"], EVAL_DATA_FIELDS),
            "allow_incomplete": bool(cfg.get("allow_incomplete", False)), "val_acc": None, "test_acc": None,
            "status": "running"}


def missing_result(job: Path, reason: str, cfg: Mapping, out_dir: Path, label: str) -> dict:
    """Write the ``results.json`` of a training job with no model (failed, or no weights): ``status:
    missing``, so that the report lists it, under the loss / backbone / seed of its config.yaml."""
    result = _result_fields(str(Path(job).resolve()), label, cfg)
    try:
        result.update(_config_fields(_run_config(Path(job)) or _run_config(Path(job) / ".hydra")))
    except ByolError:  # a config refused as unsafe: the job is listed all the same
        pass
    status = "failed" if (Path(job) / FAILED).is_file() else "no weights"
    result.update(status="missing", pretrain_status=status, error=reason)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(result, out_dir / "results.json")
    return result


def evaluate_model(model: Pretrained | Path, cfg: Mapping, splits: Mapping[str, ImageTensors],
                   num_classes: int, out_dir: Path, label: str | None = None) -> dict:
    """Evaluate one encoder (a :class:`Pretrained` or the path of its weights) under ``cfg['eval']``.

    Writes ``results.json`` and ``metrics.csv`` in ``out_dir``. Never raises for a problem of
    this model (unreadable file, other architecture, diverged training...): the failure is
    returned and written with ``status: failed`` and the error, so a sweep can go on.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    known = isinstance(model, Pretrained)
    result = _result_fields(model.source if known else str(Path(model).resolve()),
                            label or (model.label if known else None), cfg)
    if not isinstance(model, Pretrained):  # until the weights are read: what the run folder's config says
        result.update(_config_fields(_run_config(_run_folder(Path(model)))))
    e, r = cfg["eval"], cfg["repr"]
    start = time.perf_counter()
    try:
        if not isinstance(model, Pretrained):
            model = read_pretrained(model, label)
        b = model.backbone
        result.update(label=model.label, loss=model.loss, backbone=b["name"], stem=b["stem"],
                      grids=dict(b.get("grids") or {}), pretrain_epochs=model.epochs, seed=model.seed,
                      pretrain_epochs_planned=model.planned_epochs, pretrain_status=model.pretrain_status,
                      pretrain_data=None if model.is_random else data_fields(model.data))
        if model.pretrain_status == "incomplete":
            counted = ("allow_incomplete=true: the report counts it, in a row of its own" if
                       result["allow_incomplete"] else "the report leaves it out of the means "
                       "(allow_incomplete=true counts it)")
            print(f"[eval] note: {model.label} did not finish pretraining ({model.epochs} of "
                  f"{model.planned_epochs} epochs, {model.source}): results.json says pretrain_status: "
                  f"incomplete; {counted}", flush=True)
        result.update(_run_protocol(model, cfg, splits, num_classes, out_dir))
        result["status"] = "ok"
        print(f"[eval] {model.label}: {e['name']} on {r['name']} -> val {result['val_acc']:.4f}, "
              f"test {result['test_acc']:.4f} ({time.perf_counter() - start:.1f} s)", flush=True)
    except Exception as exc:  # recorded per model; the job decides whether to stop
        message = str(exc) if isinstance(exc, ByolError) else f"{type(exc).__name__}: {exc}"
        result.update(status="failed", error=message)
        result["exception"] = exc
    result["seconds"] = round(time.perf_counter() - start, 2)
    _write_json({k: v for k, v in result.items() if k != "exception"}, out_dir / "results.json")
    return result


def _run_protocol(model: Pretrained, cfg: Mapping, splits, num_classes: int, out_dir: Path) -> dict:
    e, r, data = cfg["eval"], cfg["repr"], cfg["data"]
    if e["name"] not in PROTOCOLS:
        raise ConfigError(f"unknown eval.name '{e['name']}'; choose one of: {', '.join(PROTOCOLS)}")
    pl.seed_everything(cfg["seed"], workers=True, verbose=False)
    taps = representation_taps(r["name"], r.get("taps") or [])
    encoder = model.build(taps)
    dim = feature_dim(encoder, taps)
    device = resolve_device(cfg["trainer"].get("accelerator", "auto"))
    dtype = autocast_dtype(cfg["trainer"].get("precision", "32-true"))
    _warn_normalisation(model, data)
    sizes = "/".join(str(len(splits[k])) for k in ("train", "val", "test"))
    print(f"[eval] {model.label}: {_describe(model)}; repr={r['name']} ({'+'.join(taps)}: {dim}-d), "
          f"eval={e['name']}, {sizes} train/val/test images, {device}", flush=True)
    info = {"feature_dim": dim, "taps": taps, "num_classes": num_classes,
            "split_sizes": {k: len(v) for k, v in splits.items()}}
    if cfg.get("channels_last", True):
        encoder.to(memory_format=torch.channels_last)
    loggers = make_loggers(cfg.get("logger"), out_dir)
    if e["name"] == "knn" or (e["name"] == "linear" and e.get("cached_features", True)):
        encoder.to(device)
        t0 = time.perf_counter()
        batch = cfg.get("feature_batch_size", 512)
        feats = {k: extract_features(encoder, v.images, taps, data["mean"], data["std"], batch, dtype, device)
                 for k, v in splits.items()}
        labels = {k: v.labels.to(device) for k, v in splits.items()}
        info["extract_seconds"] = round(time.perf_counter() - t0, 2)
        if e["name"] == "knn":
            kw = {"k": e.get("k", 200), "temperature": e.get("temperature", 0.1),
                  "chunk_size": e.get("chunk_size", 1024)}
            accs = {s: knn_accuracy(feats["train"], labels["train"], feats[s], labels[s], num_classes, **kw)
                    for s in ("val", "test")}
            for logger in loggers:
                logger.log_metrics({"val/acc": accs["val"], "test/acc": accs["test"]}, step=0)
            _close(loggers)
            return {"val_acc": accs["val"], "test_acc": accs["test"], **info}
        return {**_cached_linear(feats, labels, num_classes, e, cfg["seed"], dtype, loggers), **info}
    return {**_lightning_protocol(encoder, taps, num_classes, cfg, splits, out_dir, loggers), **info}


def _describe(model: Pretrained) -> str:
    arch = f"{model.backbone.get('name')} ({model.backbone.get('stem')} stem)"
    if model.is_random:
        return f"random-init {arch}"
    return f"{arch} pretrained with loss={model.loss} for {model.epochs} epoch(s)"


def _warn_normalisation(model: Pretrained, data: Mapping) -> None:
    d = model.data or {}
    if d.get("mean") is None:
        return
    if list(d["mean"]) != list(data["mean"]) or list(d["std"]) != list(data["std"]):
        print(f"[eval] note: {model.label} was pretrained with data mean/std {d['mean']}/{d['std']}; "
              f"evaluating with {data['mean']}/{data['std']} (data.mean / data.std)", flush=True)


def _cached_linear(feats, labels, num_classes: int, e: Mapping, seed: int, dtype, loggers) -> dict:
    t0 = time.perf_counter()
    epochs = int(e["epochs"])
    every = max(1, epochs // 10)
    sched_cfg = dict(e.get("scheduler") or {"name": "warmup_cosine"})
    warmup_epochs = sched_cfg.pop("warmup_epochs", 0)
    schedule = sched_cfg.pop("name")
    opt_cfg = dict(e.get("optimizer") or {"name": "sgd", "momentum": 0.9, "nesterov": True})
    optimizer = opt_cfg.pop("name")

    def on_epoch_end(row):
        for logger in loggers:
            logger.log_metrics(row, step=row["epoch"])
        if (row["epoch"] + 1) % every == 0 or row["epoch"] + 1 == epochs:
            print(f"[eval] epoch {row['epoch'] + 1}/{epochs}: train/loss {row['train/loss']:.4f}, train/acc "
                  f"{row['train/acc']:.4f}, val/acc {row['val/acc']:.4f}", flush=True)

    result = train_linear_probe(
        (feats["train"], labels["train"]), (feats["val"], labels["val"]), (feats["test"], labels["test"]),
        num_classes, epochs=epochs, batch_size=int(e["cached_batch_size"]), lr=float(e["cached_lr"]),
        weight_decay=float(e.get("weight_decay", 0.0)),
        optimizer=lambda params, lr, weight_decay: build_optimizer(optimizer, params, lr,
                                                                   {**opt_cfg, "weight_decay": weight_decay}),
        scheduler=lambda opt, total_steps, warmup_steps: build_schedule(
            schedule, opt, total_steps, warmup_steps, sched_cfg),
        warmup_epochs=warmup_epochs,
        seed=seed, storage_dtype=dtype, on_epoch_end=on_epoch_end)
    for logger in loggers:
        logger.log_metrics({"test/acc": result.test_acc}, step=epochs)
    _close(loggers)
    return {"val_acc": result.val_acc, "test_acc": result.test_acc, "cached_features": True,
            "probe_seconds": round(time.perf_counter() - t0, 2)}


def _lightning_protocol(encoder, taps, num_classes, cfg, splits, out_dir: Path, loggers) -> dict:
    e, data = cfg["eval"], cfg["data"]
    finetune = e["name"] == "finetune"
    module = ClassifierModule(encoder, taps, num_classes, e, data["mean"], data["std"], finetune,
                              seed=cfg["seed"], channels_last=cfg.get("channels_last", True))
    trainer_cfg = {k: v for k, v in cfg["trainer"].items() if k != "max_epochs"}
    trainer: pl.Trainer = build_trainer(trainer_cfg, max_epochs=int(e["epochs"]), logger=loggers,
                                        callbacks=[], default_root_dir=str(out_dir),
                                        enable_checkpointing=False)
    device = trainer.strategy.root_device
    train = splits["train"]
    batch = min(int(e["batch_size"]), len(train))
    train_batches = IndexBatches(train, batch, seed=cfg["seed"]).to(device)
    val_batches = IndexBatches(splits["val"], batch, shuffle=False, drop_last=False).to(device)
    test_batches = IndexBatches(splits["test"], batch, shuffle=False, drop_last=False).to(device)
    with warnings.catch_warnings():  # the frozen encoder is in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches)
    val_acc = float(trainer.callback_metrics["val/acc"])
    (test,) = trainer.test(module, dataloaders=test_batches, verbose=False)
    _close(loggers)
    return {"val_acc": val_acc, "test_acc": float(test["test/acc"]), "cached_features": False}


def evaluate(cfg, run_dir: str | Path) -> list[dict]:
    """The ``evaluate.py`` job: every model ``pretrained=`` names, under one repr and one protocol.

    One model (a run, a file, ``latest``, ``random``): results in ``run_dir``. A sweep folder
    (or ``latest_sweep``): each run in ``run_dir/<run name>/`` plus, with ``baseline=true``, a
    random-init encoder of the runs' architecture for each of their seeds, in
    ``run_dir/random-init/`` (``random-init_seed<N>/`` when the runs have several seeds). A model that
    fails is recorded as failed and the others still run; the job then ends with an error. A training
    job with no model (a ``FAILED`` file, or no weights) gets a ``results.json`` with ``status:
    missing`` and its reason, so the report lists it; it does not fail the evaluation. A run that did
    not finish its epochs is evaluated and marked ``pretrain_status: incomplete``.
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    c = _plain(cfg)
    # CSVLogger warns when its folder holds other files (config.yaml, .hydra/); it replaces only metrics.csv
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(c), run_dir / "config.yaml")
    if c["eval"]["name"] not in PROTOCOLS:
        raise ConfigError(f"unknown eval.name '{c['eval']['name']}'; choose one of: {', '.join(PROTOCOLS)}")
    representation_taps(c["repr"]["name"], c["repr"].get("taps") or [])
    if c["eval"]["name"] != "knn" and int(c["eval"]["epochs"]) < 1:
        raise ConfigError("eval.epochs must be at least 1")
    targets, sweep = resolve_pretrained(c["pretrained"], c.get("outputs_dir", "outputs"))
    splits, num_classes = load_eval_data(c["data"], c["seed"])

    if sweep is None:  # one model
        model = random_model(c["backbone"], c["seed"]) if targets == RANDOM else targets[0]
        label = None if targets == RANDOM else _run_label(targets[0])
        result = evaluate_model(model, c, splits, num_classes, run_dir, label)
        if result["status"] != "ok":
            raise result["exception"]
        return [result]

    baseline = c.get("baseline", True)
    print(f"[eval] {len(targets)} runs in {sweep}" + (" + a random-init baseline" if baseline else ""),
          flush=True)
    for job, reason in failed_jobs(sweep):  # nothing to evaluate: recorded so that the report lists it
        print(f"[eval] missing: {job.name}: {reason} ({job}); listed as missing in the report", flush=True)
        missing_result(job, reason, c, run_dir / job.name, job.name)
    results, architectures = [], {}
    for i, path in enumerate(targets):
        label = _run_label(path, sweep)
        print(f"[eval] ({i + 1}/{len(targets)}) {label}", flush=True)
        results.append(_report(evaluate_model(path, c, splits, num_classes, run_dir / label, label)))
        if results[-1]["backbone"]:
            r = results[-1]
            architectures.setdefault((r["backbone"], r["stem"]), {"name": r["backbone"], "stem": r["stem"],
                                                                 "grids": r["grids"]})
    if baseline:
        if not architectures:
            print("[eval] no run could be read: no architecture for a random-init baseline", flush=True)
        for (name, stem), backbone in architectures.items():
            # one random encoder per pretraining seed, so the baseline's row has a spread too
            seeds = sorted({r["seed"] for r in results if (r.get("backbone"), r.get("stem")) == (name, stem)
                            and r.get("seed") is not None}) or [c["seed"]]
            for seed in seeds:
                label = RANDOM_LOSS if len(architectures) == 1 else f"{RANDOM_LOSS}_{name}_{stem}"
                label += f"_seed{seed}" if len(seeds) > 1 else ""
                print(f"[eval] baseline: {label} ({name}, {stem} stem, seed {seed})", flush=True)
                model = random_model(backbone, seed, label)
                results.append(_report(evaluate_model(model, c, splits, num_classes, run_dir / label, label)))
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        names = ", ".join(str(r["label"]) for r in failed)
        raise ByolError(f"{len(failed)} of {len(results)} evaluations failed ({names}); see their "
                        f"results.json in {run_dir}")
    return results


def _report(result: dict) -> dict:
    """Print a failed model's error (with the traceback when it is a bug, not a user error)."""
    if result["status"] != "ok":
        import sys

        exc = result.get("exception")
        if exc is not None and not isinstance(exc, ByolError):
            traceback.print_exception(exc)
        print(f"error: {result['label']}: {result['error']}", file=sys.stderr, flush=True)
    return result
