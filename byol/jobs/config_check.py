"""Check configs before anything uses them: types, ranges, and configs read from files.

A checkpoint, an ``encoder.pt`` and a run folder's ``config.yaml`` are data from whoever wrote
the file. Nothing read from them is passed to ``instantiate`` or imported by name (the jobs
build optimizers, schedules, loggers and the trainer from fixed tables of names), and
:func:`check_file_config` refuses, naming the key, what a plain-value config cannot hold:
Hydra's ``_target_`` family, interpolations, and a container where the project's own config
tree has a plain value. :func:`check_config` then checks every value of the final config
against the types of ``conf/`` and the ranges below, so a bad value is one line, not a
traceback from deep inside a run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from byol.core.disk_images import STORAGES
from byol.core.errors import ConfigError
from byol.core.optim import OPTIMIZERS, SCHEDULES, OptionError, check_optimizer_options, check_schedule_options
from byol.core.state_check import repr_prefix, whole
from byol.jobs.value_ranges import (
    AUGMENT_PAIRS,
    augment_paths,
    check_augment_ranges,
    check_image_side,
    check_normalization,
    check_synthetic_size,
    is_number,
    number_at,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Keys by which Hydra's instantiate imports and calls code.
INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})
# What this project itself wrote into configs before it built objects from names (checkpoints of
# that version stay loadable): path -> {value: the name it means now, or None}.
# (the module paths of that version: byol.optim, before byol/core/ existed)
_OPTIMS = ("byol.optim.LARS", "torch.optim.SGD", "torch.optim.Adam")
_SCHEDULES = {"byol.optim.warmup_cosine": "warmup_cosine", "byol.optim.constant": "constant"}
_LOGGERS = {f"pytorch_lightning.loggers.{c}Logger": n for c, n in
            (("CSV", "csv"), ("TensorBoard", "tensorboard"), ("Wandb", "wandb"))}
LEGACY_TARGETS = {
    ("optim", "optimizer"): dict.fromkeys(_OPTIMS),
    ("optim", "scheduler"): _SCHEDULES,
    ("eval", "optimizer"): {"torch.optim.SGD": "sgd"},
    ("eval", "scheduler"): _SCHEDULES,
    ("trainer",): {"pytorch_lightning.Trainer": None},
    ("logger",): _LOGGERS,
}
# Lightning-logger keys of the old logger configs, now fixed by the job.
LEGACY_LOGGER_KEYS = ("save_dir", "version")
# Dicts whose keys are the user's (tap names): values must be numbers.
OPEN_DICTS = {("backbone", "grids"), ("loss", "weights")}
# Per-view augmentation: any key of `augment` itself.
VIEW_OVERRIDES = {("augment", "view1"), ("augment", "view2")}
# Keyword arguments of a named optimizer, schedule or the Lightning Trainer: any plain value (the
# builders check the names against the signature).
KWARGS_DICTS = {("optim", "optimizer"), ("optim", "scheduler"), ("eval", "optimizer"), ("eval", "scheduler"),
                ("trainer",), ("logger",)}
# Groups whose options sit under their own key (``optim=sgd`` changes ``optim.*`` only); `experiment*` options
# are global.
PACKAGED_GROUPS = ("backbone", "loss", "data", "optim", "trainer", "logger", "repr", "eval", "split", "monitor")
# The trainer settings of the machine a run continues on: what ``trainer=GROUP`` changes on resume (the others,
# epochs, precision, accumulation, clipping, logging interval, stay the run's unless given as trainer.KEY=VALUE)
TRAINER_MACHINE_KEYS = ("strategy", "devices", "num_nodes", "accelerator", "sync_batchnorm")
# Trainer arguments the jobs set themselves, and what a user sets instead
TRAINER_RESERVED = {
    "logger": "choose loggers with the logger group (logger=tensorboard, logger=wandb; metrics.csv is always written)",
    "callbacks": "the jobs add their own (checkpoints, progress, monitors); they take no others from the config",
    "plugins": "the jobs take none from the config; precision is trainer.precision",
    "default_root_dir": "a run's folder is hydra.run.dir=DIR (a sweep's: hydra.sweep.dir=DIR)",
    "enable_checkpointing": "checkpoints are set by checkpoint.keep_last, checkpoint.every_n_epochs and "
                            "checkpoint.last_every_n_steps",
}

POSITIVE_INT = (
    "data.batch_size", "data.subset", "data.image_size", "data.crop_size", "data.num_train", "data.num_test",
    "data.num_classes", "trainer.max_epochs", "trainer.accumulate_grad_batches", "trainer.log_every_n_steps",
    "trainer.num_nodes", "head.proj_hidden_dim", "head.proj_dim", "head.pred_hidden_dim",
    "checkpoint.every_n_epochs", "checkpoint.last_every_n_steps", "checkpoint.keep_last", "eval.epochs",
    "eval.batch_size", "eval.cached_batch_size", "eval.k", "eval.chunk_size", "feature_batch_size",
    "monitor.every_n_epochs", "monitor.bank_size", "monitor.query_size", "monitor.k", "monitor.batch_size",
    "schedule_epochs",
)
NON_NEGATIVE = ("optim.weight_decay", "eval.weight_decay", "optim.scheduler.warmup_epochs",
                "eval.scheduler.warmup_epochs", "split.val_size", "monitor.val_size", "trainer.gradient_clip_val")
POSITIVE = ("backbone.width", "optim.base_lr", "eval.lr", "eval.encoder_lr", "eval.cached_lr", "eval.temperature",
            "monitor.temperature", "monitor.probe_lr", "data.mmap_above_gb")
UNIT_INTERVAL = ("ema.tau_base", "flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")
# augmentation settings (shared and per view): closed range of each number, and of each [min, max] pair
LOGGER_NAMES = ("csv", "tensorboard", "wandb")
# Lightning's precision settings that the jobs' own feature extraction also follows (features.autocast_dtype).
# Not the "-true" half and double ones: they cast the networks, while the images the augmentation makes on the
# device, the monitors' and the features' inputs stay float32 (a dtype-mismatch traceback at the first step);
# BYOL's EMA in half precision would also lose the target's small updates.
PRECISIONS = ("auto", "bf16-mixed", "16-mixed", "32-true", "bf16", "16", "32")
UNSUPPORTED_PRECISIONS = ("bf16-true", "16-true", "64-true", "64")
NAMED = {"backbone.stem": ("cifar", "imagenet"), "ema.tau_schedule": ("cosine", "constant"),
         "train.on_nonfinite": ("stop", "skip"), "split.name": ("holdout", "seed_original"),
         "logger.name": LOGGER_NAMES, "optim.name": tuple(OPTIMIZERS),
         "eval.optimizer.name": tuple(OPTIMIZERS), "optim.scheduler.name": tuple(SCHEDULES),
         "eval.scheduler.name": tuple(SCHEDULES), "data.storage": STORAGES}


def _kind(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "dict"
    return type(value).__name__


def _record(schema: dict, node, path: tuple) -> None:
    schema.setdefault(path, set()).add(_kind(node))
    if isinstance(node, Mapping) and path not in OPEN_DICTS:
        for key, value in node.items():
            if key not in ("defaults", "hydra"):
                _record(schema, value, (*path, str(key)))


@functools.cache
def config_schema(conf_dir: Path = CONF_DIR) -> dict[tuple, frozenset]:
    """``{key path: kinds of value}`` over every option of every group of the project's config tree."""
    schema: dict[tuple, set] = {}
    for top in ("train.yaml", "evaluate.yaml"):
        _record(schema, OmegaConf.to_container(OmegaConf.load(conf_dir / top)), ())
    for path in sorted(conf_dir.glob("*/*.yaml")):
        group = path.parent.name
        node = OmegaConf.to_container(OmegaConf.load(path))
        _record(schema, node, (group,) if group in PACKAGED_GROUPS else ())
    return {k: frozenset(v) for k, v in schema.items()}


def _dotted(path: tuple) -> str:
    return ".".join(path)


# A saved config has a few hundred values. A crafted file can hold one list inside itself over and over
# (x = [x, x] sixty times: a few bytes, 2**60 values to walk), or nest without end: refused at these.
MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH = 100_000, 32


def _refuse(source: str, path: tuple, value, why: str) -> ConfigError:
    shown = repr_prefix(value, 80)  # bounded, however large or nested the value
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ConfigError(f"refusing {source}: {_dotted(path) or 'the config'} = {shown} {why}")


def _strip_instantiate_keys(node, path: tuple, source: str, walked: list | None = None):
    """A copy of ``node`` without the ``_target_`` keys the project itself used to write; any other
    ``_target_``-like key, an interpolation or a non-plain value is refused, and so is a config too
    large or too deep to be one."""
    walked = [0] if walked is None else walked
    walked[0] += 1
    if walked[0] > MAX_CONFIG_VALUES or len(path) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"refusing {source}: its config holds more than {MAX_CONFIG_VALUES} values or "
                          f"nests deeper than {MAX_CONFIG_DEPTH} levels (at {_dotted(path[:8])}...); a config "
                          f"this project wrote holds a few hundred. Nothing was read from it")
    if isinstance(node, Mapping):
        out = {}
        legacy = LEGACY_TARGETS.get(path)
        for key, value in node.items():
            if not isinstance(key, str):
                raise _refuse(source, path, key, "has a key that is not a string")
            if key in INSTANTIATE_KEYS:
                if legacy is not None and key == "_target_" and value in legacy:
                    if legacy[value] is not None:
                        out["name"] = legacy[value]
                    continue
                if legacy is not None and key == "_partial_" and value is True:
                    continue
                raise _refuse(source, (*path, key), value,
                              "names code to run; a config read from a file may only hold plain values. "
                              "Nothing was executed. Use only checkpoints and run folders you trust, "
                              "written by this project")
            if path == ("logger",) and "_target_" in node and key in LEGACY_LOGGER_KEYS + ("name",):
                continue  # the old Lightning-logger arguments; `name` now comes from `_target_`
            out[key] = _strip_instantiate_keys(value, (*path, key), source, walked)
        return out
    if isinstance(node, list | tuple):
        return [_strip_instantiate_keys(v, (*path, str(i)), source, walked) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        raise _refuse(source, path, node, "is an interpolation; a saved config holds resolved values only. "
                                          "Nothing was resolved")
    if node is not None and not isinstance(node, bool | int | float | str):
        raise _refuse(source, path, node, f"is a {type(node).__name__}, not a plain value")
    return node


def check_plain(node: Mapping, source: str) -> dict:
    """``node`` (e.g. an export's metadata) if it holds only plain values; else a one-line ConfigError."""
    return _strip_instantiate_keys(node, (), source)


def _type_error(path: tuple, value, kinds: frozenset) -> str | None:
    kind = _kind(value)
    if kind in kinds or ("none" in kinds and kind != "dict") or (kind == "none" and "str" in kinds):
        if kind == "list" and not all(_kind(v) in ("number", "str", "bool", "list") for v in value):
            return "must be a list of plain values"
        return None
    if kinds <= {"number", "none"} and kind == "str":
        try:
            float(value)
        except ValueError:
            return "must be a number"
        return f"must be a number (got the string {value!r}; give it without quotes)"
    if "str" in kinds and kind in ("number", "bool"):
        return None  # e.g. trainer.precision=32
    if kinds == frozenset({"list"}) and kind in ("str", "number"):
        shape = "[min, max]" if path[-1] in AUGMENT_PAIRS else f"[{value}]"
        return f"must be a list, in brackets: {_dotted(path)}={shape} (got the {kind} {value!r})"
    wanted = " or ".join(sorted(k if k != "none" else "null" for k in kinds))
    return f"must be a {wanted}, not a {kind}"


def _check_types(node, path: tuple, schema: Mapping, source: str, strict: bool) -> dict | None:
    """Check ``node`` against ``schema``; unknown keys: refused if ``strict``, else dropped."""
    out = {}
    for key, value in node.items():
        sub = (*path, key)
        if path in OPEN_DICTS:
            if _kind(value) == "dict":  # the command line split a module name such as layer4.0 at its dot
                name = f"{key}.{next(iter(value), '0')}"
                raise _refuse(source, sub, value, "must be a number; a dotted module name goes inside braces: "
                              f"'+{_dotted(path)}={{{name}: ...}}'")
            if _kind(value) != "number":
                raise _refuse(source, sub, value, "must be a number")
            out[key] = value
            continue
        kinds = schema.get(sub)
        if kinds is None and path in VIEW_OVERRIDES:  # a view may change any shared augment key
            kinds = schema.get(("augment", key))
        if path == ("trainer",):  # a key of conf/trainer/ is one by construction: Lightning loads for the others
            _trainer_argument(key, value, source, sub, known=kinds is not None)
        if path in KWARGS_DICTS:
            kinds = frozenset({"none"})  # any plain value
        if kinds is None:
            if strict:
                raise _refuse(source, sub, value, "is not a setting of this project (see conf/)")
            continue  # a setting this version no longer has
        problem = _type_error(sub, value, kinds)
        if problem:
            raise ConfigError(f"{_dotted(sub)} {problem} ({source})")
        out[key] = _check_types(value, sub, schema, source, strict) if isinstance(value, Mapping) else value
    return out


def _trainer_argument(key: str, value, source: str, path: tuple, known: bool) -> None:
    if key in TRAINER_RESERVED:
        raise _refuse(source, path, value, f"is a Trainer argument the jobs set themselves: {TRAINER_RESERVED[key]}")
    if not (known or key in trainer_parameters()):
        close = closest_trainer_argument(key)
        mean = f" (did you mean trainer.{close}?)" if close else ""
        raise _refuse(source, path, value, f"is not a Trainer argument this project passes on{mean}")


def closest_trainer_argument(name: str) -> str | None:
    """The Trainer argument this project passes on that ``name`` resembles (a typo's fix), if any."""
    import difflib

    close = difflib.get_close_matches(name, sorted(trainer_parameters() - set(TRAINER_RESERVED)), n=1, cutoff=0.7)
    return close[0] if close else None


@functools.cache
def trainer_parameters() -> frozenset:
    """The argument names of ``pytorch_lightning.Trainer`` (empty where Lightning is not installed)."""
    import importlib.util
    import inspect

    if importlib.util.find_spec("pytorch_lightning") is None:
        return frozenset()
    from pytorch_lightning import Trainer

    return frozenset(inspect.signature(Trainer).parameters)


def plain_config(cfg) -> dict:
    """A composed config (DictConfig or dict) as resolved plain containers, without Hydra's own node."""
    from omegaconf import DictConfig, open_dict

    if isinstance(cfg, DictConfig):
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in dict(cfg).items() if k != "hydra"}


def check_file_config(raw, source: str) -> dict:
    """The plain config held by a file (checkpoint, encoder export, config.yaml), or a one-line
    :class:`~byol.core.errors.ConfigError` naming the key that holds anything else.

    Settings this version no longer has are dropped; the ``_target_`` keys this project wrote
    before it built objects from names become those names.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"refusing {source}: its config is a {type(raw).__name__}, not a mapping")
    clean = _strip_instantiate_keys(raw, (), source)
    return _check_types(clean, (), config_schema(), source, strict=False)


SEED_RANGE = 2 ** 32  # torch, numpy and Lightning take seeds 0 ... 2**32 - 1
SEED_TEXT = f"a whole number from 0 to {SEED_RANGE - 1}"


def valid_seed(value) -> bool:
    return whole(value) and value < SEED_RANGE


# what each named table's entry in a config holds besides its keyword arguments
_NOT_KWARGS = {"optimizer": ("name",), "scheduler": ("name", "warmup_epochs")}


def _check_optimizers(container: Mapping, source: str) -> None:
    """The optimizers' and schedules' keyword arguments (names, kinds and ranges of value), before the run folder
    is made: ``optim.optimizer.eta=-1`` trained to the end with a rising loss."""
    optim = container.get("optim") if isinstance(container.get("optim"), Mapping) else {}
    chosen = [(check_optimizer_options, optim.get("name"), optim.get("optimizer"), "optim.optimizer")] if optim else []
    for key in ("optim.scheduler", "eval.optimizer", "eval.scheduler"):
        node = number_at(container, key)
        if isinstance(node, Mapping):
            kind = key.split(".")[1]
            check = check_optimizer_options if kind == "optimizer" else check_schedule_options
            chosen.append((check, node.get("name"), {k: v for k, v in node.items() if k not in _NOT_KWARGS[kind]},
                           key))
    for check, name, options, key in chosen:
        try:
            check(name, options)
        except OptionError as e:
            raise ConfigError(f"{key}.{e.option} {e.problem} ({source})") from None
        except ConfigError as e:
            raise ConfigError(f"{key}: {e} ({source})") from None


def check_config(container: Mapping, source: str = "the config") -> None:
    """Every value of a composed config has its type and range, or a one-line ConfigError."""
    _check_types(container, (), config_schema(), source, strict=True)
    for key in POSITIVE_INT:
        value = number_at(container, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{key} must be a positive whole number, not {value!r} ({source})")
    if number_at(container, "data.batch_size") == 1:  # a BatchNorm traceback at the first step
        raise ConfigError(f"data.batch_size must be at least 2, not 1: BatchNorm normalises over the images of a "
                          f"batch (of each process under DDP), and one image has no spread ({source})")
    seed = container.get("seed")
    if seed is not None and not valid_seed(seed):
        raise ConfigError(f"seed must be {SEED_TEXT}, not {seed!r} ({source})")
    for key in NON_NEGATIVE + POSITIVE:
        value = number_at(container, key)
        if value is None:
            continue
        if not is_number(value) or not math.isfinite(value) or value < 0 or (key in POSITIVE and value == 0):
            bound = "positive" if key in POSITIVE else "zero or more"
            bound = bound if is_number(value) else f"a number, {bound}"
            raise ConfigError(f"{key} must be {bound}, not {value!r} ({source})")
    for leaf in UNIT_INTERVAL:
        for key in augment_paths(container, leaf) if "." not in leaf else [leaf]:
            value = number_at(container, key)
            if leaf == "blur_p" and value == "auto":  # the paper's per view on crops above 32 px, else none
                continue
            if value is not None and (isinstance(value, str) or not 0 <= value <= 1):
                auto = " (or auto: BYOL's blur on crops above 32 px)" if leaf == "blur_p" else ""
                raise ConfigError(f"{key} must lie between 0 and 1{auto}, not {value!r} ({source})")
    check_augment_ranges(container, source)
    for key, names in NAMED.items():
        value = number_at(container, key)
        if value is not None and value not in names:
            raise ConfigError(f"unknown {key} '{value}'; choose one of: {', '.join(names)} ({source})")
    _check_optimizers(container, source)
    precision = number_at(container, "trainer.precision")
    if precision is not None and str(precision) in UNSUPPORTED_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported: it casts the whole network, and BYOL "
                          f"trains it with float32 inputs and a float32 EMA; use 32-true (full precision), "
                          f"bf16-mixed or 16-mixed ({source})")
    if precision is not None and str(precision) not in PRECISIONS:
        raise ConfigError(f"unknown trainer.precision '{precision}'; choose one of: {', '.join(PRECISIONS)} "
                          f"({source})")
    if isinstance(container.get("data"), Mapping):
        check_normalization(container["data"], source)
        check_image_side(container, source)
        check_synthetic_size(container["data"], source)
