"""The ``evaluate.py`` job: pretrained encoders measured under one representation and one protocol
(:mod:`byol.jobs.protocols`).

Each model's outcome, failures included, is written to its ``results.json``, so that the report
lists every model of a sweep, and a model that fails never stops the others.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext, redirect_stdout
from functools import partial
from pathlib import Path

from byol.core.backbone import AVGPOOL
from byol.core.data import ImageTensors
from byol.core.errors import ByolError, ConfigError, Interrupted
from byol.core.features import representation_taps
from byol.jobs.build import check_logger_package, planned_world, resolve_precision
from byol.jobs.cli import launched_rank
from byol.jobs.command_folders import before_training
from byol.jobs.config_check import check_config, plain_config
from byol.jobs.console import ESCAPED_NAMES, OtherProcessLost, quiet_lightning
from byol.jobs.evaluation_checks import (
    UNTRAINED,
    check_processes,
    checked_protocol,
    note_preset_training,
    refuse_another_sweeps_evaluation,
    refuse_architecture_settings,
    refuse_other_protocol_settings,
    refuse_training_settings,
    uses_trainer,
)
from byol.jobs.evaluation_data import EvaluationData, data_tags
from byol.jobs.job_signals import stop_signals_raise
from byol.jobs.pretrained import (
    RANDOM_INIT_LABEL,
    EncoderSource,
    random_model,
    read_pretrained,
    read_run_config,
    resolve_pretrained,
    run_config_fields,
)
from byol.jobs.replaced import set_aside_evaluation
from byol.jobs.results_json import (
    RESULTS_FILE,
    keep_earlier_result,
    missing_result,
    model_fields,
    result_fields,
    undo_stopped_result,
    write_json,
)
from byol.jobs.run_folder import (
    CONFIG_FILE,
    RANDOM,
    STOPPED,
    failed_jobs,
    lock_holder,
    run_folder_of,
    run_label,
    sweep_jobs,
)
from byol.jobs.sweep_plan import unstarted_note

STOP_MESSAGE = ("the evaluation stopped before it finished; what it had not finished has no result (an earlier "
                "result in its folder is put back as it was). Run the same command again to finish it")


def takes_part(settings: Mapping) -> bool:
    """Whether this process runs the job. Under DDP fine-tuning and the augmented linear protocol run on
    every process, each on its share of every split, with the metrics summed over all of them; rank 0
    alone prints and writes. kNN, the cached linear probe and embed train nothing through Lightning:
    rank 0 runs them alone on one device (one line says so), and other ranks a launcher started
    have nothing to do."""
    world = planned_world(settings["trainer"])
    if uses_trainer(settings["eval"]) or world == 1:
        return True
    if launched_rank() == 0:
        print(f"[eval] note: eval={settings['eval']['name']} trains nothing through Lightning, so it runs in "
              f"this process alone, on one device ({world} processes were asked for): every split is scored "
              f"whole here", flush=True)
    return launched_rank() == 0


def evaluate(cfg, run_dir: str | Path, requested: Sequence[str] = ()) -> list[dict]:
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
    # under DDP the other processes print nothing (their errors still reach stderr): rank 0 speaks for all
    with quiet_lightning(), (open(os.devnull, "w") if launched_rank() else nullcontext()) as silent, \
            redirect_stdout(silent) if silent else nullcontext(), stop_signals_raise(STOP_MESSAGE):
        return _evaluate(cfg, Path(run_dir), requested)


def _evaluate(cfg, run_dir: Path, requested: Sequence[str]) -> list[dict]:
    with before_training():  # refused before any model is read: a folder made for it is removed
        refuse_training_settings(requested)
        refuse_other_protocol_settings(requested, cfg["eval"])
        settings = _start_job(cfg, run_dir)
        if not takes_part(settings):
            return []
        try:
            targets, sweep = resolve_pretrained(settings["pretrained"], settings.get("outputs_dir", "outputs"))
            if targets != RANDOM:
                refuse_architecture_settings(requested)
            if sweep is not None:
                refuse_another_sweeps_evaluation(run_dir, sweep)
            data = EvaluationData(settings["data"], requested, settings["seed"], settings["split"])
        except (ByolError, KeyboardInterrupt):  # nothing evaluated: an earlier evaluation here stays as it was
            undo_stopped_result(run_dir)
            raise
    evaluate_one = partial(_evaluate_on_its_data, settings=settings, data=data)
    if sweep is None:  # one model
        model = random_model(settings["backbone"], settings["seed"]) if targets == RANDOM else targets[0]
        result = evaluate_one(model, out_dir=run_dir, label=None if targets == RANDOM else run_label(targets[0]),
                              keep_earlier=False)  # kept by _start_job
        if result["status"] != "ok":
            raise result["exception"]
        print(f"[eval] results: {run_dir / RESULTS_FILE}", flush=True)  # the last line: where to look
        return [result]
    results = _evaluate_sweep(targets, sweep, settings, evaluate_one, run_dir, data)
    print(f"[eval] results: {run_dir} (a folder per model); its report: python -m byol.report "
          f"{shlex.quote(str(run_dir))}", flush=True)  # the last line, as for one model: where to look
    return results


def _evaluate_on_its_data(model: EncoderSource | Path, settings: dict, data: EvaluationData, out_dir: Path,
                          label: str | None = None, keep_earlier: bool = True, runs_data: Mapping | None = None
                          ) -> dict:
    """:func:`evaluate_model` on the data of the run that trained ``model`` (see :class:`EvaluationData`);
    a random-init baseline of a sweep uses ``runs_data``, that of the runs it stands beside. The weights are
    read first: a corrupt, unsafe or foreign file is recorded as failed before any image is loaded. The result
    carries the data settings used (``data_settings``, not in results.json): the baselines are built on them."""
    if not isinstance(model, EncoderSource):
        try:
            model = read_pretrained(model, label)
        except Interrupted:
            raise
        except Exception:  # evaluate_model reads it again and records the failure, under the run's data
            why = "no run data"
            try:
                run_config = read_run_config(run_folder_of(Path(model)))
            except ByolError:
                run_config, why = None, "its run's config.yaml is refused: see the error below"
            chosen = data.settings(run_config, label or Path(model).name, why)
            return {**evaluate_model(model, dict(settings, data=chosen), {}, 0, out_dir, label, keep_earlier),
                    "data_settings": chosen}
    whose = "the settings of the runs it stands beside" if model.is_random else "the run's own settings"
    chosen = data.settings({"data": runs_data if model.is_random else model.data}, label or model.label, whose=whose)
    # loaded inside evaluate_model: data this run names that cannot be loaded is this model's failure (recorded;
    # the sweep goes on), not the job's
    return {**evaluate_model(model, dict(settings, data=chosen), {}, 0, out_dir, label, keep_earlier,
                             load_data=lambda: data.load(chosen)), "data_settings": chosen}


def _evaluate_sweep(targets: Sequence[Path], sweep: Path, settings: dict, evaluate_one: Callable,
                    run_dir: Path, data: EvaluationData) -> list[dict]:
    """Every run of ``sweep`` (and the random-init baselines), each in its own folder; then one error
    that names the models that failed. A job with no model is recorded under the data ``data`` chooses
    for its run, as its weights would have been: the report counts it in the row of the others."""
    baseline = settings.get("baseline", True)
    print(f"[eval] {len(targets)} run{'s' * (len(targets) != 1)} in {sweep}"
          + (" + random-init baselines (one per pretraining seed and data setting)" if baseline else ""), flush=True)
    for job, reason in failed_jobs(sweep):  # nothing to evaluate: recorded so that the report lists it
        print(f"[eval] missing: {job.name}: {reason} ({job}); listed as missing in the report", flush=True)
        missing_result(job, reason, settings, _result_folder(run_dir, job.name), job.name, data.settings)
    if any(lock_holder(job) for job in sweep_jobs(sweep)):
        print("[eval] note: the sweep is still running; the jobs it has not started yet have no folder and are not "
              "evaluated: evaluate it again once it has finished", flush=True)
    elif note := unstarted_note(sweep, "they have no run to evaluate"):  # the sweep's command was stopped
        print(f"[eval] note: {note}", flush=True)
    results, stopped = [], run_dir / STOPPED
    stopped.unlink(missing_ok=True)  # this evaluation starts again
    try:
        for number, path in enumerate(targets, 1):
            label = run_label(path, sweep)
            print(f"[eval] ({number}/{len(targets)}) {label}", flush=True)
            results.append(_print_failure(evaluate_one(path, out_dir=_result_folder(run_dir, label), label=label)))
        if baseline:
            results += _evaluate_baselines(results, settings["seed"], evaluate_one, run_dir)
    except (Interrupted, KeyboardInterrupt):  # the report would see the evaluated models only, and no gap
        left = [run_label(p, sweep) for p in targets[len(results):]]
        shown = ", ".join(left[:6]) + (", ..." if len(left) > 6 else "")
        none = [*([shown] if left else []), *(["the random-init baselines"] if baseline else [])]
        evaluated = min(len(results), len(targets))  # results holds the baselines too once they have started
        stopped.write_text(f"stopped with {evaluated} of {len(targets)} runs evaluated; no result for "
                           f"{' and '.join(none) or 'nothing else'}\n", "utf-8", ESCAPED_NAMES)
        raise
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        names = ", ".join(str(r["label"]) for r in failed)
        raise ByolError(f"{len(failed)} of {len(results)} evaluations failed ({names}); see their "
                        f"{RESULTS_FILE} in {run_dir}")
    return results


def _result_folder(run_dir: Path, label: str) -> Path:
    """The folder of one model's results, ``run_dir/<label>``; a label (built from names read in the models'
    files) that would lead out of ``run_dir`` is refused."""
    folder = run_dir / label
    if Path(label).is_absolute() or ".." in Path(label).parts or not folder.resolve().is_relative_to(run_dir.resolve()):
        raise ByolError(f"refusing to write the results of '{label}' outside '{run_dir}': the name comes from a "
                        f"model's files and leads elsewhere (a crafted or corrupt file?)")
    return folder


def _start_job(cfg, run_dir: Path) -> dict:
    """The job's plain config, saved in ``run_dir`` and checked before any data or model is read."""
    from omegaconf import OmegaConf

    settings = plain_config(cfg)
    check_config(settings, "the command line")
    resolve_precision(settings, "[eval]")  # what ran is what config.yaml and results.json record
    check_processes(settings)
    check_logger_package(settings.get("logger"))  # a missing package: before the data, the models and the folder
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_earlier_result(run_dir)  # before its config.yaml is rewritten
    if launched_rank() == 0:
        OmegaConf.save(OmegaConf.create(settings), run_dir / CONFIG_FILE)
    protocol = checked_protocol(settings["eval"])
    repr_name, repr_taps = settings["repr"]["name"], settings["repr"].get("taps") or []
    if representation_taps(repr_name, repr_taps) == [AVGPOOL] and set(repr_taps) - {AVGPOOL}:
        print(f"[eval] note: repr=avgpool is the global average pool alone; repr.taps={list(repr_taps)} "
              f"applies to repr=combined only", flush=True)
    if protocol in UNTRAINED:
        note_preset_training(settings["eval"])
    if protocol not in UNTRAINED and int(settings["eval"]["epochs"]) < 1:
        raise ConfigError("eval.epochs must be at least 1")
    return settings


def _evaluate_baselines(results: Sequence[dict], default_seed: int, evaluate_one: Callable,
                        run_dir: Path) -> list[dict]:
    """A random-init encoder per architecture of the runs, per data they are evaluated on (each row of runs
    has its baseline beside it) and per pretraining seed, so the baseline's row has a spread too."""
    groups = {}  # (architecture, data) -> (backbone, data settings)
    for result in results:  # only an architecture whose weights were read and fit: a file's description alone
        if result["backbone"] and result.get("status") == "ok":  # (config.yaml, export) could name any network
            groups.setdefault(_baseline_key(result), ({
                "name": result["backbone"], "stem": result["stem"], "width": _architecture_key(result)[2],
                "grids": result["grids"]}, result.get("data_settings")))
    if not groups:
        print("[eval] no run was evaluated: no architecture for a random-init baseline", flush=True)
    architectures = {arch for arch, _ in groups}
    data = {data_key: runs_data or {} for (_, data_key), (_, runs_data) in groups.items()}
    tags = dict(zip(data, data_tags(list(data.values())), strict=True))  # "" for the runs' one data setting
    planned = []  # (label, backbone, seed, data, what)
    for key, (backbone, runs_data) in groups.items():
        (name, stem, width), _ = key
        seeds = sorted({r["seed"] for r in results if _baseline_key(r) == key and r.get("seed") is not None}) \
            or [default_seed]
        scaled = f"_x{width:g}" if width != 1 else ""
        for seed in seeds:
            label = RANDOM_INIT_LABEL if len(architectures) == 1 else f"{RANDOM_INIT_LABEL}_{name}{scaled}_{stem}"
            label += tags[key[1]] + (f"_seed{seed}" if len(seeds) > 1 else "")
            planned.append((label, backbone, seed, runs_data, f"{name}{scaled.replace('_', ' ')}, {stem} stem"))
    _set_aside_other_baselines(run_dir, {label for label, *_ in planned})
    baselines = []
    for label, backbone, seed, runs_data, what in planned:
        print(f"[eval] baseline: {label} ({what}, seed {seed})", flush=True)
        model = random_model(backbone, seed, label)
        baselines.append(_print_failure(evaluate_one(model, out_dir=_result_folder(run_dir, label), label=label,
                                                     runs_data=runs_data)))
    return baselines


def _set_aside_other_baselines(run_dir: Path, labels: set[str]) -> None:
    """An earlier evaluation's baselines that this one does not rewrite (other seeds or data: ``random-init``
    of one seed, then ``random-init_seed0`` and ``_seed1`` of two) are kept aside, out of the report: it
    counted them again as repeated seeds."""
    if launched_rank() != 0 or not run_dir.is_dir():
        return
    for folder in sorted(run_dir.glob(f"{RANDOM_INIT_LABEL}*")):
        if folder.name not in labels and folder.is_dir() and not folder.is_symlink():
            kept = set_aside_evaluation(folder, RESULTS_FILE)
            if kept:
                print(f"[eval] note: {folder.name}, a baseline of an earlier evaluation here that this one does not "
                      f"make, is kept as {folder.name}/{kept[0]}, out of the report", flush=True)


def _architecture_key(result: Mapping) -> tuple:
    """A result's backbone name, stem and width (1.0 where not recorded: results and runs of earlier versions)."""
    return result.get("backbone"), result.get("stem"), float(result.get("width") or 1.0)


def _baseline_key(result: Mapping) -> tuple:
    """A result's architecture and the data it was evaluated on: one baseline (per seed) for each."""
    return _architecture_key(result), json.dumps(result.get("data_settings"), sort_keys=True, default=str)


def _print_failure(result: dict) -> dict:
    """Print a failed model's error (with the traceback when it is a bug, not a user error)."""
    if result["status"] != "ok":
        exc = result.get("exception")
        if exc is not None and not isinstance(exc, ByolError):
            traceback.print_exception(exc)
        print(f"error: {result['label']}: {result['error']}", file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------- one model


def evaluate_model(model: EncoderSource | Path, cfg: Mapping, splits: Mapping[str, ImageTensors],
                   num_classes: int, out_dir: Path, label: str | None = None, keep_earlier: bool = True,
                   load_data: Callable[[], tuple] | None = None) -> dict:
    """Evaluate one encoder (an :class:`EncoderSource` or the path of its weights) under ``cfg['eval']``.

    Writes ``results.json`` and ``metrics.csv`` in ``out_dir`` (an earlier evaluation there is kept first,
    unless ``keep_earlier`` is false: the job already kept it). Never raises for a problem of
    this model (unreadable file, other architecture, diverged training...): the failure is
    returned and written with ``status: failed`` and the error, so a sweep can go on. ``load_data``
    gives ``(splits, num_classes)`` once the weights are read: data that a run names and that cannot be
    loaded (a folder since moved) is that model's failure too.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if keep_earlier:
        keep_earlier_result(out_dir)
    known = isinstance(model, EncoderSource)
    origin = model.origin if known else str(model)
    # a weights file as an absolute path, whether it comes as a path or already read (the report finds runs by it)
    pretrained = origin if known and model.is_random else str(Path(origin).resolve())
    result = result_fields(pretrained, label or (model.label if known else None), cfg)
    if not known:  # until the weights are read: what the run folder's config says, when it is safe to read
        try:
            result.update(run_config_fields(read_run_config(run_folder_of(Path(model)))))
        except ByolError:
            pass  # a refused config.yaml: reading the weights fails too, and says why, below
    start = time.perf_counter()
    try:
        if not known:
            model = read_pretrained(model, label)
        result.update(model_fields(model))
        if model.pretrain_status == "incomplete":
            _note_incomplete(model, result["allow_incomplete"])
        if load_data is not None:  # (splits, num_classes), after the weights: a bad file fails before any image
            splits, num_classes = load_data()
        from byol.jobs.protocols import run_protocol  # Lightning: once the settings and the weights are checked

        result.update(run_protocol(model, cfg, splits, num_classes, out_dir))
        result["status"] = "ok"
        val = "no val split" if result["val_acc"] is None else f"val {result['val_acc']:.4f}"
        scores = "no accuracy (eval=embed)" if result["test_acc"] is None else \
            f"{val}, test {result['test_acc']:.4f}"
        print(f"[eval] {model.label}: {cfg['eval']['name']} on {cfg['repr']['name']} -> {scores} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    except (Interrupted, KeyboardInterrupt, OtherProcessLost):  # a stop signal, or a DDP process gone: not this
        # model's failure (no result is written), and the sweep stops too
        undo_stopped_result(out_dir)  # the earlier evaluation there, if any, is whole again
        raise
    except Exception as exc:  # recorded per model; the job decides whether to stop
        message = str(exc) if isinstance(exc, ByolError) else f"{type(exc).__name__}: {exc}"
        result.update(status="failed", error=message)
        result["exception"] = exc
    result["seconds"] = round(time.perf_counter() - start, 2)
    write_json({k: v for k, v in result.items() if k != "exception"}, out_dir / RESULTS_FILE)
    return result


def _note_incomplete(model: EncoderSource, allow_incomplete: bool) -> None:
    """Say that a run did not finish and how the report will treat it, so no mean hides it."""
    counted = ("allow_incomplete=true: the report counts it, in a row of its own" if allow_incomplete
               else "the report leaves it out of the means (allow_incomplete=true counts it)")
    print(f"[eval] note: {model.label} did not finish pretraining ({model.epochs} of {model.planned_epochs} "
          f"epochs, {model.origin}): results.json says pretrain_status: incomplete; {counted}", flush=True)
