"""The ``results.json`` of each evaluated model (read by the report): its fields, the file of a training
job with no model (``status: missing``), and the earlier evaluation of a folder kept before a new one."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from byol.core.checkpoint import atomic_write_bytes
from byol.core.errors import ByolError
from byol.jobs.cli import launched_rank
from byol.jobs.evaluation_checks import UNTRAINED
from byol.jobs.pretrained import EncoderSource, data_fields, read_run_config, run_config_fields, trained_settings
from byol.jobs.replaced import evaluation_replaced, keep_earlier_evaluation, undo_unfinished_evaluation
from byol.jobs.report_labels import DEFAULT_PRECISION, EVAL_DATA_SETTINGS
from byol.jobs.run_folder import FAILED, HYDRA_DIR, lock_holder

RESULTS_FILE = "results.json"  # one per evaluated model, read by the report
# eval settings that are not in ``eval_settings``: shown apart (the protocol's name, its epochs) or deciding how
# a score is computed, not what it is (the kNN's similarity block)
APART_FROM_SETTINGS = ("name", "epochs", "chunk_size")


def keep_earlier_result(folder: Path) -> None:
    """An evaluation already in ``folder`` is kept under names the report skips, and the user told (rank 0)."""
    kept = keep_earlier_evaluation(folder, RESULTS_FILE) if launched_rank() == 0 else []
    if kept:
        print(f"[eval] note: {folder} already held an evaluation; kept as {', '.join(kept)}", flush=True)


def undo_stopped_result(folder: Path) -> None:
    """An evaluation stopped before its result: the earlier one in ``folder`` (if any) is put back (rank 0). A
    folder that cannot be written now (a full or read-only disk) is left for the next evaluation to undo: the
    stop stays a stop, said as such."""
    if launched_rank() == 0:
        try:
            undo_unfinished_evaluation(folder, RESULTS_FILE)
        except OSError as e:
            print(f"[eval] note: {folder}: the earlier evaluation's files could not be put back now "
                  f"({e.strerror or e}); the next evaluation of this folder does it", flush=True)


def write_json(obj: dict, path: Path) -> None:
    """Written atomically: the report never reads half a results.json of a killed job. Under DDP by
    rank 0 alone (every rank holds the same, gathered, results). The earlier evaluation kept aside for
    this one stays kept from then on."""
    if launched_rank() != 0:
        return
    atomic_write_bytes((json.dumps(obj, indent=2, default=str) + "\n").encode(), path)
    evaluation_replaced(path.parent)


def precision_setting(trainer: Mapping) -> dict:
    """``{"trainer.precision": ...}`` for an evaluation at another precision than the default (bf16 features
    score a few tenths of a point off 32-bit ones: two such evaluations of a run are not one result evaluated
    twice); empty at the default, as earlier versions wrote it."""
    precision = trainer.get("precision")
    return {} if precision in (None, DEFAULT_PRECISION) else {"trainer.precision": str(precision)}


def result_fields(pretrained: str, label: str | None, cfg: Mapping) -> dict:
    """The fields of a ``results.json`` known before any model is read: the evaluation's settings."""
    eval_cfg = cfg["eval"]
    return {"pretrained": pretrained, "label": label, "loss": None, "repr": cfg["repr"]["name"],
            "eval": eval_cfg["name"], "backbone": None, "stem": None, "width": None, "grids": None,
            "pretrain_epochs": None,
            "pretrain_epochs_planned": None, "pretrain_status": None, "pretrain_data": None,
            "eval_epochs": int(eval_cfg.get("epochs", 0)) if eval_cfg["name"] not in UNTRAINED else 0,
            "eval_settings": {**{k: v for k, v in eval_cfg.items() if k not in APART_FROM_SETTINGS},
                              **precision_setting(cfg.get("trainer") or {})},
            "seed": None, "eval_seed": cfg["seed"], "data": cfg["data"]["name"],
            "eval_data": eval_data_fields(cfg["data"], cfg["split"]),
            "allow_incomplete": bool(cfg.get("allow_incomplete", False)), "val_acc": None, "test_acc": None,
            "status": "running"}


def eval_data_fields(data: Mapping, split: Mapping) -> dict:
    """``eval_data``: what the report tells evaluations apart by; the normalisation (and skipped files) only where
    they are not the dataset's defaults, else two evaluations of one run under other ``data.mean`` were averaged
    as the same result evaluated twice."""
    from byol.jobs.evaluation_data import data_group_defaults

    defaults = {"skip_bad_files": False, **data_group_defaults(data.get("name"))}
    other = {k: data[k] if isinstance(data[k], bool) else json.dumps(data[k]) for k in EVAL_DATA_SETTINGS
             if k in data and json.dumps(data[k]) != json.dumps(defaults.get(k))}  # a list as text: plain values
    return {**data_fields(data), **other, "split": split["name"], "val_size": split.get("val_size")}


def model_fields(model: EncoderSource) -> dict:
    """The fields of a ``results.json`` that describe the model, once its weights are read."""
    return {"label": model.label, "loss": model.loss, "backbone": model.backbone["name"],
            "stem": model.backbone["stem"], "width": model.backbone.get("width", 1.0),
            "grids": dict(model.backbone.get("grids") or {}),
            "pretrain_epochs": model.epochs, "seed": model.seed, "pretrain_epochs_planned": model.planned_epochs,
            "pretrain_status": model.pretrain_status,
            "pretrain_data": None if model.is_random else data_fields(model.data),
            "trained": None if model.is_random else trained_settings(model.config)}


def missing_result(job: Path, reason: str, cfg: Mapping, out_dir: Path, label: str,
                   choose_data: Callable[[Mapping | None, str], Mapping] | None = None) -> dict:
    """Write the ``results.json`` of a training job with no model (failed, or no weights): ``status:
    missing``, so that the report lists it, under the loss / backbone / seed of its config.yaml.

    ``choose_data`` (the evaluation's :meth:`EvaluationData.settings`): the data the evaluation would have
    used for this run, from its config; without it the report would put the job under ``cfg``'s data (the
    evaluation's default, not what the sweep's other runs are evaluated on) in a row of its own."""
    try:
        run_config = read_run_config(Path(job)) or read_run_config(Path(job) / HYDRA_DIR)
    except ByolError:  # a config refused as unsafe: the job is listed all the same
        run_config = None
    data = cfg["data"]
    if choose_data is not None:
        try:
            data = choose_data(run_config, label)
        except ByolError as e:  # e.g. a hand-edited normalisation: listed, under the evaluation's own data
            print(f"[eval] note: {label}: {e}; listed under this evaluation's data settings", flush=True)
    result = result_fields(str(Path(job).resolve()), label, {**cfg, "data": data})
    try:
        result.update(run_config_fields(run_config))
    except ByolError:
        pass
    status = "failed" if (Path(job) / FAILED).is_file() else "running" if lock_holder(job) else "no weights"
    result.update(status="missing", pretrain_status=status, error=reason)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep_earlier_result(out_dir)
    write_json(result, out_dir / RESULTS_FILE)
    return result
