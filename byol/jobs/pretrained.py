"""The encoders an evaluation measures (what ``pretrained=`` names): a pretraining run's online encoder, or a
random initialisation.

BYOL keeps only the online encoder; it is rebuilt from the pretraining run's own saved config
(never from evaluation defaults, so a multi-loss ResNet-50 run is evaluated as what it is).
Every file read here is data someone else may have written: configs are checked plain values.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from byol.core.backbone import RESNETS, STEMS, Encoder
from byol.core.checkpoint import (
    ENCODER_FORMAT,
    ONLINE_PREFIX,
    REWRITE_EXPORT,
    built_with_weights,
    checked_state_dict,
    encoder_config,
    epochs_done,
    online_encoder_state,
    safe_load,
)
from byol.core.errors import CheckpointError, ConfigError
from byol.core.state_check import shown, whole
from byol.jobs.build import architecture, encoder_from_backbone, loss_mode
from byol.jobs.config_check import SEED_TEXT, check_file_config, check_plain, valid_seed
from byol.jobs.datasets import MACHINE_DATA_KEYS
from byol.jobs.resume import TRAINED_KEYS, flatten_config, folder_run_id
from byol.jobs.run_folder import (
    CHECKPOINT_GLOB,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    ENCODER_FILE,
    LAST_CHECKPOINT,
    LATEST,
    LATEST_SWEEP,
    RANDOM,
    RUN_ID_KEY,
    SWEEP_RECORD,
    evaluation_output,
    failed_jobs,
    find_runs,
    is_run_dir,
    raw_run_config,
    run_folder_of,
    sweep_jobs,
    sweep_runs,
    weights_file,
)

RANDOM_INIT_LABEL = "random-init"  # the loss column, and the label, of a random-init baseline
# the data settings that make two results comparable; the evaluation's split too
DATA_FIELDS = ("name", "root", "subset", "image_size", "num_train", "num_test")
# Trained settings the results table shows in columns of their own (loss mode, architecture, data, epochs) or
# across its runs (seed), and data settings of the machine: not part of :func:`trained_settings`.
SHOWN_APART = ("seed", "trainer.max_epochs", "backbone.name", "backbone.stem", "backbone.width", "data.on_device",
               "data.skip_bad_files", *(f"data.{k}" for k in (*DATA_FIELDS, *MACHINE_DATA_KEYS)))


@dataclass
class EncoderSource:
    """One encoder to evaluate: its weights (None for a random initialisation) and what built it."""

    label: str
    origin: str                     # the weights file's path, or "random"
    backbone: dict                  # name, stem, width, grids (from the run, never from evaluation defaults)
    loss: str
    seed: int | None = None
    epochs: int = 0
    state_dict: dict | None = None
    data: dict | None = None        # the pretraining data config, when known
    planned_epochs: int | None = None  # the run's trainer.max_epochs (its config.yaml, else the checkpoint's)
    config: dict | None = None      # the training config, when known: :func:`trained_settings`

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
        if not self.is_random:
            return built_with_weights(lambda: encoder_from_backbone(self.backbone, taps), self.state_dict, self.origin)
        # a random encoder is a function of its own seed alone (one baseline per pretraining seed),
        # and drawing it leaves the evaluation's random stream as it was
        with torch.random.fork_rng(devices=[]):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            return encoder_from_backbone(self.backbone, taps)


def random_model(backbone: Mapping, seed: int, label: str = RANDOM_INIT_LABEL) -> EncoderSource:
    """A random-init encoder of ``backbone``'s architecture, drawn from ``seed``: the baseline."""
    return EncoderSource(label, RANDOM, architecture(backbone), RANDOM_INIT_LABEL, seed, 0)


def read_pretrained(path: str | Path, label: str | None = None) -> EncoderSource:
    """Read an encoder export or a Lightning checkpoint of a pretraining run (``weights_only``)."""
    path = Path(path)
    blob = safe_load(path, job="evaluate")  # a corrupt file's error names the pretrained= to take instead
    label = label or path.stem
    run_cfg = read_run_config(run_folder_of(path))
    run_cfg = run_cfg if run_cfg and run_cfg.get("loss") else None  # a training run's config, not another
    if isinstance(blob, dict) and blob.get("format") == ENCODER_FORMAT:
        return _from_export(blob, path, label, run_cfg)
    if isinstance(blob, dict) and isinstance(blob.get("byol_config"), dict) and "state_dict" in blob:
        return _from_checkpoint(blob, path, label, run_cfg)
    raise CheckpointError(f"'{path}' is not a byol checkpoint: expected an encoder export ({ENCODER_FILE}) or a "
                          f"Lightning checkpoint written by train.py (with 'byol_config')")


def _from_export(blob: dict, path: Path, label: str, run_cfg: Mapping | None) -> EncoderSource:
    """An ``encoder.pt``: its backbone, weights and meta (loss, seed, epochs), each checked for what it is."""
    backbone = architecture(encoder_config(blob.get("backbone"), path))
    state = checked_state_dict(blob.get("state_dict"), path)
    meta = export_meta(blob.get("meta"), path)
    note_later_checkpoint(path, meta.get("global_step"), label)
    folder_id = _folder_run_id(path) if run_cfg and meta.get(RUN_ID_KEY) else None
    foreign = folder_id not in (None, meta.get(RUN_ID_KEY))
    if foreign:
        print(f"[eval] note: {label}: {path.name} was written by run {meta[RUN_ID_KEY]}, not by the run of the "
              f"config.yaml beside it ({folder_id}): a copy from another run, whose epochs are its own "
              f"(that config.yaml's trainer.max_epochs does not apply); the data are that config.yaml's", flush=True)
    epochs = meta.get("epochs") or 0
    # an export is written when training ends: without a run config, it planned what it did
    planned = planned_epochs(run_cfg) if run_cfg and not foreign else epochs
    return EncoderSource(label, str(path), backbone, meta.get("loss", "unknown"), meta.get("seed"), epochs,
                         state, (run_cfg or {}).get("data"), planned, None if foreign else run_cfg)


def _folder_run_id(export: Path) -> str | None:
    """The run id in the config.yaml beside an export (None: none, or not one)."""
    try:
        return folder_run_id(export.parent)
    except ConfigError:
        return None


def note_later_checkpoint(export: Path, export_step, label: str) -> None:
    """Say so when the run's ``last.ckpt`` is further on than its ``encoder.pt``: a finished run continued
    with more epochs and stopped before its new export. The export is what is evaluated (it is what
    ``pretrained=RUN`` names); the line says how to evaluate the later state instead."""
    last = export.parent / CHECKPOINTS_DIR / LAST_CHECKPOINT
    if export.name != ENCODER_FILE or not whole(export_step) or not last.is_file():
        return
    try:
        step = safe_load(last, mmap=True, job="evaluate").get("global_step")
    except (CheckpointError, AttributeError):
        return  # a damaged last.ckpt: nothing to compare with
    if whole(step) and step > export_step:
        print(f"[eval] note: {label}: {last} is further on (optimizer step {step}) than {export.name} (step "
              f"{export_step}): the run was continued and stopped before its next export. This evaluates "
              f"{export.name}; pretrained={last} evaluates the later state", flush=True)


# the fields of an export's meta that are read, each with its test and what it must be (any may be absent)
META_FIELDS = {"epochs": (whole, "a whole number of 0 or more"),
               "global_step": (whole, "a whole number of 0 or more"),
               "seed": (valid_seed, SEED_TEXT),
               "loss": (lambda v: v in ("classic", "multi"), "classic or multi"),
               RUN_ID_KEY: (lambda v: isinstance(v, str) and v.isalnum() and len(v) <= 64, "a run id")}


def export_meta(raw, path: Path) -> dict:
    """An export's ``meta`` (what trained it): plain values, each field read of its kind; else one line."""
    if raw is None:
        return {}
    problem = None if isinstance(raw, Mapping) else f"its meta is {shown(raw)}, not a mapping"
    meta = check_plain(raw, f"'{path}'") if problem is None else {}
    for key, (ok, what) in META_FIELDS.items():
        if problem is None and meta.get(key) is not None and not ok(meta[key]):
            problem = f"meta.{key} is {shown(meta[key])}, not {what}"
    if problem:
        raise CheckpointError(f"refusing '{path}': {problem}; the file was edited or not written by this project. "
                              f"For a run's encoder.pt: {REWRITE_EXPORT}")
    return meta


def _from_checkpoint(blob: dict, path: Path, label: str, run_cfg: Mapping | None) -> EncoderSource:
    """A train.py checkpoint: the online encoder (never the EMA target) and the config it holds."""
    fix = "Evaluate the run's encoder.pt or another of its checkpoints"
    checked_state_dict(blob["state_dict"], path, fix)
    state = online_encoder_state(blob)
    if not state:
        raise CheckpointError(f"'{path}' has no online encoder weights ({ONLINE_PREFIX}*); it is not a "
                              f"BYOL pretraining checkpoint")
    cfg = check_file_config(blob["byol_config"], f"checkpoint '{path}'")
    backbone = architecture(encoder_config(cfg.get("backbone"), path, fix))
    loss, seed = cfg.get("loss"), cfg.get("seed")
    if not isinstance(loss, Mapping) or not (seed is None or valid_seed(seed)):
        what = f"loss is {shown(loss)}, not a mapping" if not isinstance(loss, Mapping) else \
            f"seed is {shown(seed)}, not {SEED_TEXT}"
        raise CheckpointError(f"refusing '{path}': its config's {what}; the file was edited or not written by this "
                              f"project. {fix}")
    # the run folder's config.yaml is rewritten by a resume with more epochs; the checkpoint's is not
    in_run = path.parent.name == CHECKPOINTS_DIR and run_cfg
    planned = planned_epochs(run_cfg) if in_run else planned_epochs(cfg)
    return EncoderSource(label, str(path), backbone, loss_mode(loss), seed, max(epochs_done(blob), 0), state,
                         cfg.get("data"), planned, cfg)


def read_run_config(folder: Path) -> dict | None:
    """A run folder's ``config.yaml`` as checked plain data (None when absent). An unreadable or unsafe one is
    refused (ConfigError): ignoring it evaluated the run on this evaluation's data instead of its own."""
    fix = "repair it, or move it away to evaluate the weights beside it on this evaluation's data settings"
    raw = raw_run_config(folder, fix=fix)
    if raw is None:
        return None
    missing = [key for key in RUN_CONFIG_KEYS if not isinstance(raw, dict) or key not in raw]
    if missing:  # empty, cut short or another program's file: read as none, the run was scored on other data
        raise ConfigError(f"'{folder / CONFIG_FILE}' is not a run's config: it lacks {', '.join(missing)}, which "
                          f"every pretraining run's config.yaml holds; {fix}")
    return check_file_config(raw, f"'{folder / CONFIG_FILE}'")  # data from whoever wrote the folder


RUN_CONFIG_KEYS = ("backbone", "loss")  # in every pretraining run's config.yaml, of every version: the architecture


def planned_epochs(run_cfg: Mapping | None) -> int | None:
    """A run config's ``trainer.max_epochs`` (None when absent or unbounded)."""
    try:
        epochs = int((run_cfg.get("trainer") or {}).get("max_epochs"))
    except (AttributeError, TypeError, ValueError):
        return None
    return epochs if epochs > 0 else None


def data_fields(data: Mapping | None, keys: Sequence[str] = DATA_FIELDS) -> dict | None:
    """The settings ``keys`` of a data config that it has; ``num_train`` and ``num_test`` of synthetic data only
    (experiment=smoke sets them for its synthetic data, and they stayed beside an image folder's settings)."""
    if not isinstance(data, Mapping):
        return None
    synthetic = data.get("name") == "synthetic"
    return {k: data[k] for k in keys if k in data and (synthetic or k not in ("num_train", "num_test"))}


def trained_settings(run_cfg: Mapping | None) -> dict | None:
    """What a run learned with beyond what the results table shows apart (:data:`SHOWN_APART`), as dotted keys:
    optimizer, heads, EMA, augmentation, the loss's taps and weights, batch size, precision... Two runs that
    differ in one of these are two models, never two seeds of one. None when the config is not known."""
    if not isinstance(run_cfg, Mapping):
        return None
    chosen = {}
    for key in TRAINED_KEYS:
        group, _, inner = key.partition(".")
        value = run_cfg.get(group)
        if inner:
            value = value.get(inner) if isinstance(value, Mapping) else None
        if value is not None:
            chosen[key] = value
    return {k: v for k, v in sorted(flatten_config(chosen).items()) if k not in SHOWN_APART}


def run_config_fields(run_cfg: Mapping | None) -> dict:
    """loss / backbone / stem / seed / pretraining data and planned epochs from a run's config.yaml, so
    a run whose weights cannot be read still lands in its cell of the results table (as failed)."""
    if not run_cfg:
        return {}
    backbone = run_cfg.get("backbone") or {}
    loss, seed, name, stem = run_cfg.get("loss"), run_cfg.get("seed"), backbone.get("name"), backbone.get("stem")
    # names this project builds, a seed it takes: a crafted file's other values name nothing (nor a folder)
    fields = {"loss": loss_mode(loss) if isinstance(loss, Mapping) else None,
              "backbone": name if isinstance(name, str) and name in RESNETS else None,
              "stem": stem if isinstance(stem, str) and stem in STEMS else None,
              "width": backbone.get("width"), "seed": seed if valid_seed(seed) else None,
              "pretrain_data": data_fields(run_cfg.get("data")),
              "pretrain_epochs_planned": planned_epochs(run_cfg), "trained": trained_settings(run_cfg)}
    return {k: v for k, v in fields.items() if v is not None}


# --------------------------------------------------------------------------- what pretrained= names


def resolve_pretrained(spec: str, outputs_dir: str | Path = "outputs") -> tuple:
    """What ``pretrained=`` names: ``("random", None)``, ``([weights file], None)`` for one model, or
    ``([weights files...], sweep folder)`` for every run of a sweep."""
    spec = str(spec)
    if not spec.strip():  # pretrained=$RUN with RUN unset: never every run under the current folder
        raise CheckpointError("pretrained= is empty; give a run folder, a sweep folder, a .ckpt, an "
                              f"{ENCODER_FILE}, or pretrained=latest / latest_sweep / random")
    if spec == RANDOM:
        return RANDOM, None
    if spec == LATEST:
        return [weights_file(_latest_run(Path(outputs_dir)))], None
    if spec == LATEST_SWEEP:
        sweep = _latest_sweep(Path(outputs_dir))
        return _sweep_targets(sweep), sweep
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"pretrained='{spec}' does not exist; give a run folder, a sweep folder, a "
                              f".ckpt, an {ENCODER_FILE}, or pretrained=latest / latest_sweep / random")
    if path.is_file():
        _refuse_evaluation_output(path, spec)
        return [path], None
    if not path.is_dir():  # a FIFO, a device (a link to /dev/zero): never read as a folder, or at all
        raise CheckpointError(f"pretrained='{spec}' is not a regular file or a folder (a pipe, a device, or a "
                              f"link to one); give a run folder, a sweep folder, a .ckpt or an {ENCODER_FILE}")
    if is_run_dir(path):
        return [weights_file(path)], None
    _refuse_evaluation_output(path, spec)
    if not find_runs(path) and not sweep_jobs(path):
        if (path / SWEEP_RECORD).is_file():
            raise CheckpointError(f"'{path}' is a sweep with no job folder yet (its first job has not started, or "
                                  f"the sweep stopped before it): evaluate it once its jobs have run")
        raise CheckpointError(f"no pretraining run in '{path}' (a run folder holds {ENCODER_FILE} or "
                              f"{CHECKPOINTS_DIR}/{CHECKPOINT_GLOB}); create one with `python train.py` or use "
                              f"pretrained=random")
    return _sweep_targets(path), path


def _refuse_evaluation_output(path: Path, spec: str) -> None:
    """pretrained= of what an evaluation wrote (its folder, its results.json, an evaluation sweep): one line
    that says so and names what to give instead, and how to see its results."""
    what = evaluation_output(path)
    if what is None:
        return
    instead = ("the training sweep it evaluated (outputs/multirun/train/<time>, or pretrained=latest_sweep)"
               if "sweep" in what else f"the run it evaluated (outputs/train/<time>, its {ENCODER_FILE} or a .ckpt)")
    folder = path if path.is_dir() else path.parent
    raise CheckpointError(f"pretrained='{spec}' is {what}, not a pretraining run; give {instead}. Its results: "
                          f"python -m byol.report {shlex.quote(str(folder))}")


def _latest_run(outputs: Path) -> Path:
    """The run under ``outputs`` whose weights were written last."""
    runs = find_runs(outputs)
    if not runs:
        raise CheckpointError(
            f"no pretraining runs found under '{outputs}' (a run folder holds {ENCODER_FILE} or "
            f"{CHECKPOINTS_DIR}/{CHECKPOINT_GLOB}). Create one with `python train.py` (`python train.py "
            f"experiment=smoke` takes seconds), name one with pretrained=PATH, or evaluate a random-init "
            f"encoder with pretrained=random")
    run = max(runs, key=lambda p: weights_file(p).stat().st_mtime)
    print(f"[eval] pretrained=latest: {run} (newest of {len(runs)} runs under {outputs})", flush=True)
    return run


def _latest_sweep(outputs: Path) -> Path:
    """The newest training sweep, by its newest weights or job folder: a sweep whose jobs all failed
    is still the newest (and then an error names them, never an older sweep instead)."""
    root = outputs / "multirun" / "train"
    sweeps = [d for d in sorted(root.iterdir()) if d.is_dir() and (find_runs(d) or sweep_jobs(d))] \
        if root.is_dir() else []
    if not sweeps:
        raise CheckpointError(
            f"no pretraining sweep found under '{root}'. Create one with `python train.py -m "
            f"loss=classic,multi seed=0,1,2` or name a folder with pretrained=PATH")
    sweep = max(sweeps, key=lambda d: max([weights_file(r).stat().st_mtime for r in find_runs(d)]
                                          + [j.stat().st_mtime for j in sweep_jobs(d)]))
    # a sweep started since, whose first job has no folder yet: not the one evaluated, and said so
    waiting = [d.name for d in sorted(root.iterdir()) if d.is_dir() and d not in sweeps
               and (d / SWEEP_RECORD).is_file() and d.stat().st_mtime > sweep.stat().st_mtime]
    later = f" (newer, with no job folder yet: {', '.join(waiting)}; evaluate it once its jobs have run)" \
        if waiting else ""
    print(f"[eval] pretrained=latest_sweep: {sweep}{later}", flush=True)
    return sweep


def _sweep_targets(sweep: Path) -> list[Path]:
    """The weights of every run of ``sweep`` that can be evaluated; an error when there is none."""
    runs = sweep_runs(sweep)
    if not runs:
        failed = failed_jobs(sweep)
        detail = "; ".join(f"{job.name}: {reason}" for job, reason in failed[:5])
        raise CheckpointError(f"no run of the sweep '{sweep}' can be evaluated: its {len(failed)} job(s) "
                              f"have no model ({detail}{'; ...' if len(failed) > 5 else ''})")
    return [weights_file(r) for r in runs]
