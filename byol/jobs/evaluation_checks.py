"""The evaluation's settings checked before any model is read (and before Lightning loads): the protocol,
training settings that do nothing there, the linear protocol's settings for the protocol that does not run,
architecture settings for a trained encoder, and how its processes are started. Each is refused in one line
naming what applies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from byol.core.errors import ConfigError
from byol.jobs.build import check_launcher, check_strategy, planned_world
from byol.jobs.embedding import check_embed_settings
from byol.jobs.evaluation_help import NOT_FOR_EVALUATION

PROTOCOLS = ("linear", "finetune", "knn", "embed")
UNTRAINED = ("knn", "embed")  # protocols that train nothing: no eval.epochs


def checked_protocol(eval_cfg: Mapping) -> str:
    """``eval.name``, refused unless it is one of :data:`PROTOCOLS`; for ``embed``, also refused before any
    data is loaded when its optional packages are missing."""
    if eval_cfg["name"] not in PROTOCOLS:
        raise ConfigError(f"unknown eval.name '{eval_cfg['name']}'; choose one of: {', '.join(PROTOCOLS)}")
    if eval_cfg["name"] == "embed":
        check_embed_settings(eval_cfg)
    return eval_cfg["name"]


def uses_trainer(eval_cfg: Mapping) -> bool:
    """Whether the protocol trains through a Lightning Trainer (and so runs on every DDP process):
    fine-tuning and the augmented linear protocol. kNN, the cached linear probe and embed run in one
    process: extracting features once and fitting a small classifier on them is seconds of work."""
    return eval_cfg["name"] == "finetune" or (eval_cfg["name"] == "linear" and
                                              not eval_cfg.get("cached_features", True))


def refuse_training_settings(given: Sequence[str]) -> None:
    """A training setting given to evaluate.py would be accepted and ignored: refuse it, naming the key
    that does the job in an evaluation."""
    for key in given:
        if key in NOT_FOR_EVALUATION:
            raise ConfigError(f"{key} does not apply to evaluation; use {NOT_FOR_EVALUATION[key]}")


# eval=linear's two protocols each have their own learning rate and batch: {augmented protocol's: cached probe's}
AUGMENTED_TO_CACHED = {"eval.lr": "eval.cached_lr", "eval.batch_size": "eval.cached_batch_size"}


def refuse_other_protocol_settings(given: Sequence[str], eval_cfg: Mapping) -> None:
    """eval=linear reads the cached probe's lr and batch or the augmented protocol's, never both: one given
    on the command line for the protocol not run would be accepted and ignored (a preset may set both)."""
    if eval_cfg.get("name") != "linear":
        return
    cached = bool(eval_cfg.get("cached_features", True))
    pairs = AUGMENTED_TO_CACHED.items() if cached else [(c, a) for a, c in AUGMENTED_TO_CACHED.items()]
    unused = {key: used for key, used in pairs if key in given}
    if not unused:
        return
    keys, used, verb = " and ".join(unused), " and ".join(unused.values()), "applies" if len(unused) == 1 else "apply"
    if cached:
        raise ConfigError(f"{keys} {verb} to the augmented linear protocol only (eval.cached_features=false); the "
                          f"cached probe run here (eval.cached_features=true) uses {used}: set {used}, or add "
                          f"eval.cached_features=false")
    raise ConfigError(f"{keys} {verb} to the cached linear probe only (eval.cached_features=true); the augmented "
                      f"protocol run here (eval.cached_features=false) uses {used}: set {used}, or leave "
                      f"eval.cached_features at true")


def refuse_architecture_settings(given: Sequence[str]) -> None:
    """A trained encoder is rebuilt from its own architecture: a ``backbone`` setting on the command line
    would be ignored (and the user would believe they measured another network), so it is refused."""
    keys = [k for k in given if k == "backbone" or k.startswith("backbone.")]
    if keys:
        raise ConfigError(f"{', '.join(keys)} on the command line does not apply to a trained encoder: it is "
                          f"evaluated with the architecture it was trained with (its run's config.yaml); "
                          f"backbone settings choose the network of pretrained=random only")


def check_processes(settings: Mapping) -> None:
    """Several processes only as training takes them (:func:`check_strategy`: the DDP strategy that re-runs
    the command, ``trainer=ddp``), started where they can meet when a protocol trains through Lightning
    (:func:`check_launcher`), and with a global ``eval.batch_size`` they can share evenly."""
    trainer = settings["trainer"]
    check_strategy(trainer)
    if uses_trainer(settings["eval"]):  # the others run in rank 0 alone
        check_launcher(trainer)
    world, batch = planned_world(trainer), settings["eval"].get("batch_size")
    if uses_trainer(settings["eval"]) and batch and int(batch) % world:
        raise ConfigError(f"eval.batch_size={batch} is the global batch, shared by {world} processes: choose a "
                          f"multiple of {world}")
    if uses_trainer(settings["eval"]) and batch and int(batch) // world < 2:  # else a BatchNorm traceback
        raise ConfigError(f"eval.batch_size={batch} leaves {int(batch) // world} image per batch on each of "
                          f"{world} process(es); BatchNorm needs at least 2: set eval.batch_size to at least "
                          f"{2 * world}")


def note_preset_training(eval_cfg: Mapping) -> None:
    """A preset's training settings (preset=original's 300 epochs) land in eval=knn's settings too, where
    nothing reads them: said, so that no one takes the result for the preset's protocol."""
    from byol.jobs.command_line import option_keys

    own = option_keys("eval").get(eval_cfg["name"], set())
    foreign = [f"eval.{key}={value}" for key, value in eval_cfg.items() if f"eval.{key}" not in own]
    if foreign:
        print(f"[eval] note: eval={eval_cfg['name']} trains nothing; the preset's {', '.join(foreign)} "
              f"{'does' if len(foreign) == 1 else 'do'} not apply", flush=True)


def refuse_another_sweeps_evaluation(run_dir: Path, sweep: Path) -> None:
    """An evaluation of ``sweep`` into a folder that holds the evaluation of another training sweep is refused: its
    jobs' folders are named by run (``0_loss=classic,seed=0``), so the runs of both met in one table, some replaced
    and some not, with the report calling the cells complete."""
    from byol.jobs.report_files import read_result  # checked as the report checks it (a FIFO, a huge file)
    from byol.jobs.results_json import RESULTS_FILE  # it reads UNTRAINED from here
    from byol.jobs.run_folder import run_folder_of

    others = set()
    for found in sorted(Path(run_dir).glob(f"*/{RESULTS_FILE}")):
        result = read_result(found)
        pretrained = result.get("pretrained") if isinstance(result, dict) else None  # unusable: the report says so
        if isinstance(pretrained, str) and Path(pretrained).is_absolute():
            origin = run_folder_of(Path(pretrained)).parent
            if origin.resolve() != Path(sweep).resolve():
                others.add(origin)
    if others:
        shown = ", ".join(map(str, sorted(others)[:2])) + (" ..." if len(others) > 2 else "")
        raise ConfigError(f"'{run_dir}' holds an evaluation of another training sweep ({shown}), not of {sweep}: "
                          f"the runs of both would meet in one table; evaluate into another folder (hydra.sweep.dir="
                          f"NEW), or remove that folder first")
