"""The command line checked before Hydra composes the config or writes its ``.hydra/`` folder: a misspelt
setting is named with the one it resembles (Hydra would advise appending it as a new key), a setting of
another option of its group (``eval.epochs`` with ``eval=knn``) is named with the options that have it, and a
``hydra.run.dir`` that holds the other kind of job's output is refused before Hydra rewrites anything in it."""

from __future__ import annotations

import errno
import functools
import itertools
import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

from byol.jobs.command_folders import (
    NO_RESUME,
    given_run_dir,
    given_sweep_folders,
    is_sweep,
    keep_hydra_record,
    last_value,
    other_sweeps_evaluation,
    start_problem,
)
from byol.jobs.command_hydra import hydra_problem
from byol.jobs.command_values import empty_path, removed_setting, unquoted_path
from byol.jobs.console import name_too_long, names_printable


def _trainer_hint(name: str) -> str:
    """For ``trainer.NAME`` not in the config: how to pass it if Lightning's Trainer takes it, else the argument it
    resembles (advising ``+trainer.NAME`` for any name led to a second refusal). Lightning is imported here only."""
    from byol.jobs.config_check import TRAINER_RESERVED, closest_trainer_argument, trainer_parameters

    if name in TRAINER_RESERVED:
        return f"; Lightning's Trainer takes it, but the jobs set it themselves: {TRAINER_RESERVED[name]}"
    if name in trainer_parameters():
        return f"; another Trainer argument: +trainer.{name}=VALUE"
    close = closest_trainer_argument(name)
    return f"; did you mean trainer.{close}?" if close else "; nor is it an argument of Lightning's Trainer"


@functools.cache
def _parse(argv: tuple[str, ...]) -> list | None:
    """Hydra's parse of the command line's overrides, once for all the checks; None when there are none or they
    do not parse (Hydra then reports what is wrong)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    if not overrides:  # --help, --cfg, the defaults: nothing to check (and no schema to load)
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return None


@functools.cache
def _top_config(config_name: str) -> tuple[dict, set[str], set[str]]:
    """``conf/<config_name>.yaml`` without its defaults list, the groups that list names, and those of them
    with no option by default (``experiment: null``)."""
    from byol.jobs.config_check import CONF_DIR

    top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{config_name}.yaml"))
    defaults = [d for d in top.pop("defaults", []) if isinstance(d, dict)]
    return top, {next(iter(d)) for d in defaults}, {next(iter(d)) for d in defaults if next(iter(d.values())) is None}


def _free_prefixes() -> tuple[str, ...]:
    """Key prefixes under which the keys are the user's choosing (per-tap weights and grids, per-view settings)."""
    from byol.jobs.config_check import OPEN_DICTS, VIEW_OVERRIDES

    return tuple(".".join(path) + "." for path in OPEN_DICTS | VIEW_OVERRIDES)


def misspelt_key(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for a command-line key that is no setting of ``conf/<config_name>.yaml`` (``data.bach_size=64``,
    ``expriment=smoke``: with the setting or group it resembles, if any), where Hydra would suggest appending it
    with ``+``, which the project then refuses; None otherwise (Hydra reports what else is wrong)."""
    from byol.jobs.config_check import trainer_parameters  # Lightning's, on this error path only

    parsed = _parse(tuple(argv))
    if parsed is None:
        return None
    import difflib

    from byol.jobs.config_check import CONF_DIR, VIEW_OVERRIDES, config_schema

    top, groups, _ = _top_config(config_name)
    known = {".".join(path) for path in config_schema() if path and path[0] in set(top) | groups}
    free, views = _free_prefixes(), tuple(".".join(path) + "." for path in VIEW_OVERRIDES)
    shared = sorted(k[len("augment."):] for k in known if k.startswith("augment.") and k.count(".") == 1)
    for o in parsed:
        key = o.key_or_group
        view, _, leaf = key.rpartition(".")
        if key.startswith(views) and "." not in leaf and leaf not in shared and not o.is_delete():
            close = difflib.get_close_matches(leaf, shared, n=1, cutoff=0.7)
            mean = f"; did you mean {view}.{close[0]}?" if close else f"; {view} takes the augment.* keys"
            return (f"error: {key} is not a setting{mean}; one view's own value: +{view}.KEY=VALUE "
                    f"(python {config_name}.py --cfg job prints every setting, --help the groups)")
        head = key.split(".")[0]
        if (o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None or key in known
                or (CONF_DIR / key).is_dir() or head == "hydra" or key.startswith(free)
                or ((CONF_DIR / head).is_dir() and head not in groups)):  # the other script's: unknown_option
            continue
        parent, _, last = key.rpartition(".")
        if parent in known:  # a sibling's name, else the whole key
            siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
            close = [f"{parent}.{name}" for name in difflib.get_close_matches(last, siblings, n=2, cutoff=0.7)]
        else:
            close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.85)
        if not close and not parent:  # a misspelt group or top-level key: expriment=smoke
            close = difflib.get_close_matches(key, sorted(set(top) | groups), n=2, cutoff=0.6)
        if parent == "trainer" and (not close or last in trainer_parameters()):  # a real one before a look-alike
            mean = _trainer_hint(last)
        else:
            mean = f"; did you mean {' or '.join(close)}?" if close else ""
        # no close match either: one line, not Hydra's advice to append it with +, which is then refused
        return (f"error: {key} is not a setting{mean} (python {config_name}.py --cfg job prints every setting, "
                f"--help the groups)")
    return None


@functools.cache
def _open_dict_defaults(path: tuple[str, ...]) -> frozenset:
    """The keys any config file gives the open mapping ``path`` (``loss.weights``: none; ``backbone.grids``:
    layer2.0, layer3.0): Hydra adds any other key only with a ``+``."""
    from byol.jobs.config_check import CONF_DIR

    keys = set()
    for file in CONF_DIR.rglob("*.yaml"):
        node = OmegaConf.to_container(OmegaConf.load(file))  # a group's option holds what lies below its group
        for key in path[1:] if file.relative_to(CONF_DIR).parts[0] == path[0] else path:
            node = node.get(key) if isinstance(node, dict) else None
        keys |= set(node) if isinstance(node, dict) else set()
    return frozenset(keys)


def open_dict_without_plus(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for new keys of ``loss.weights`` / ``backbone.grids`` given without ``+`` (Hydra's
    refusal spans five lines); None otherwise."""
    from byol.jobs.config_check import OPEN_DICTS

    top, groups, _ = _top_config(config_name)
    for o in _parse(tuple(argv)) or []:
        key = o.key_or_group
        for path in (p for p in OPEN_DICTS if p[0] in set(top) | groups):
            name = ".".join(path)
            if o.is_add() or o.is_force_add() or o.is_delete() or not (key == name or key.startswith(name + ".")):
                continue
            value = o.value()
            given = set(value) if key == name and isinstance(value, dict) else {key[len(name) + 1:]} - {""}
            new = sorted(str(k) for k in given - _open_dict_defaults(path))
            if new:  # a dotted module name goes inside braces
                fix = o.input_line if key == name else f"{name}={{{key[len(name) + 1:]}: {value}}}"
                return (f"error: {o.input_line} adds {', '.join(new)} to {name}, which holds no such key: add keys "
                        f"with a +: '+{fix}'")
    return None


# group options that were renamed or live in the other script: the line that says where they went
MOVED_OPTIONS = {("train", "experiment", "seed"): "experiment=seed is now experiment=original"}
OTHER_SCRIPTS_GROUPS = {("evaluate", "experiment"): "experiments are pretraining settings (python train.py "
                                                    "experiment=...); evaluate.py takes preset=smoke or "
                                                    "preset=original",
                        ("evaluate", "monitor"): "the online monitors run during pretraining (train.py)",
                        ("evaluate", "loss"): "the loss is a pretraining setting (train.py); the evaluation "
                                              "reads each run's own",
                        ("evaluate", "optim"): "optim is a pretraining setting (train.py); the evaluation's "
                                               "optimizer is eval.optimizer",
                        ("train", "eval"): "evaluation settings belong to evaluate.py",
                        ("train", "repr"): "representations are chosen at evaluation (evaluate.py repr=...)",
                        ("train", "split"): "splits are chosen at evaluation (evaluate.py split=...)",
                        ("train", "preset"): "presets are evaluate.py's; train.py takes experiment=..."}


def unknown_option(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for a group option that does not exist (``loss=mult``), a group of the other script
    (``evaluate.py +experiment=smoke``, which Hydra advises and which would then bring training settings
    into an evaluation), or ``GROUP=null`` for a group that must have an option; None otherwise."""
    parsed = _parse(tuple(argv))
    if parsed is None:
        return None
    import difflib

    from byol.jobs.config_check import CONF_DIR

    _, groups, optional = _top_config(config_name)
    for o in parsed:
        group = o.key_or_group
        head = group.split(".")[0]
        if "." in group and head != "hydra" and (CONF_DIR / head).is_dir() and head not in groups:  # repr.taps
            why = OTHER_SCRIPTS_GROUPS.get((config_name, head), f"{config_name}.py has no {head} group")
            return f"error: {group}=... does not apply here: {why} (python {config_name}.py --help lists its groups)"
        if o.is_delete() or "/" in group or not (CONF_DIR / group).is_dir():
            continue
        if group not in groups:
            why = OTHER_SCRIPTS_GROUPS.get((config_name, group), f"{config_name}.py has no {group} group")
            return f"error: {group}=... does not apply here: {why} (python {config_name}.py --help lists its groups)"
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        try:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        except Exception:  # a range or glob: Hydra checks it
            continue
        for value in (v for item in values for v in (item if isinstance(item, list) else [item])):
            if value is None and group in optional:
                continue
            if isinstance(value, str) and value in options:
                continue
            if value is not None and not isinstance(value, str):
                value = str(value)
            moved = MOVED_OPTIONS.get((config_name, group, value))
            close = difflib.get_close_matches(value.lower(), options, n=1, cutoff=0.6) if value else []
            if group == "backbone" and str(value).startswith("resnet"):
                from byol.core.backbone import RESNETS  # torch: imported for a ResNet's name only

                moved = f"any torchvision ResNet is backbone.name={value}" if value in RESNETS else moved
            hint = f" ({moved})" if moved else f" (did you mean {group}={close[0]}?)" if close else ""
            removal = f" ('~{group}' removes it)" if group == "logger" else ""
            return (f"error: {group}={value if value is not None else 'null'} is not an option of {group}{hint}; "
                    f"choose one of: {', '.join(options)}{removal}")
    return None


@functools.cache
def option_keys(group: str) -> dict[str, set[str]]:
    """``{option: its dotted keys}`` for a packaged group, e.g. ``{"knn": {"eval.k", ...}, ...}``, with the
    keys of the options of the same group it builds on (``trainer=ddp``'s defaults list names ``default``)."""
    from byol.jobs.config_check import CONF_DIR

    def dotted(node, prefix: str):
        for key, value in node.items():
            if key != "defaults":
                yield f"{prefix}.{key}"
                if isinstance(value, dict):
                    yield from dotted(value, f"{prefix}.{key}")

    nodes = {path.stem: OmegaConf.to_container(OmegaConf.load(path)) for path in (CONF_DIR / group).glob("*.yaml")}

    def keys(option: str, seen: frozenset = frozenset()) -> set[str]:
        node = nodes[option]
        own = set(dotted(node, group))
        for base in node.get("defaults") or []:
            if isinstance(base, str) and base in nodes and base not in seen | {option}:
                own |= keys(base, seen | {option})
        return own

    return {option: keys(option) for option in sorted(nodes)}


def setting_of_another_option(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for a setting that only other options of its group have (``eval.epochs`` with
    ``eval=knn``): Hydra would advise appending it with ``+``, and an appended one would be ignored by the
    chosen option. Every combination a sweep makes of the group choices is checked, so a sweep does not stop
    half-way. None when each such setting is one of the chosen option's own (or the command line does not
    parse: Hydra reports that)."""
    parsed = _parse(tuple(argv))
    if parsed is None:
        return None
    from byol.jobs.config_check import CONF_DIR, PACKAGED_GROUPS

    groups = _top_config(config_name)[1] & set(PACKAGED_GROUPS)
    free = _free_prefixes()
    suspects = {}  # key -> the options of its group that have it, where some options do not
    # evaluate.py, and a resumed training run, apply data keys to the run's own data settings, not to the default
    over_runs_data = config_name == "evaluate" or any(o.key_or_group == "resume" for o in parsed)
    for o in parsed:
        key = o.key_or_group
        group = key.split(".")[0]
        if "." not in key or group not in groups or o.is_delete() or o.package is not None or key.startswith(free):
            continue
        if over_runs_data and group == "data" and (o.is_add() or o.is_force_add()):
            continue  # appended on purpose: applied to each run's own data settings
        having = sorted(option for option, keys in option_keys(group).items() if key in keys)
        if having and len(having) < len(option_keys(group)):
            suspects[key] = having
    if not suspects:
        return None
    choices = [o for o in parsed if (CONF_DIR / o.key_or_group).is_dir() and not o.is_delete()]
    try:
        values = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                  else [f"{o.key_or_group}={o.get_value_element_as_str()}"] for o in choices]
    except Exception:  # a range or glob sweep of a group: Hydra checks each job
        return None
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combination in itertools.product(*values):
            try:
                cfg = compose(config_name, overrides=list(combination), return_hydra_config=True)
            except Exception:  # an unknown option and the like: Hydra's own message
                return None
            for key, having in suspects.items():
                group = key.split(".")[0]
                chosen = cfg.hydra.runtime.choices.get(group)
                if not isinstance(chosen, str):  # several options at once (logger=[csv,wandb]): Hydra decides
                    continue
                # the chosen option's own keys: one a preset adds (preset=smoke's eval.epochs) does nothing there
                if key not in option_keys(group).get(chosen, ()):
                    options = " or ".join(f"{group}={option}" for option in having)
                    job = f" (the sweep's job with {' '.join(combination)})" if any(len(v) > 1 for v in values) else ""
                    if over_runs_data and group == "data":  # applied to each run's own data settings
                        whose, runs = ("evaluate.py's", "runs'") if config_name == "evaluate" else \
                            ("train.py's", "resumed run's")
                        return (f"error: {key} is a setting of {options}, not of {whose} default "
                                f"{group}={chosen}{job}; to set it over the {runs} own data settings write "
                                f"++{key}={last_value(argv, (key,)) or 'VALUE'}, or choose {options}")
                    return (f"error: {key} is a setting of {options}, not of {group}={chosen}{job}; choose "
                            f"{options}, or leave {key} out")
    return None


# Hydra's modes of a command line, each of which excludes the others (its ValueError was a traceback)
MODE_FLAGS = {"-m": "-m", "--multirun": "-m", "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info",
              "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def more_than_one_mode(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for two of Hydra's modes at once (``-m ... --cfg job``)."""
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("-")]  # --cfg=job as --cfg job
    modes = list(dict.fromkeys(MODE_FLAGS[f] for f in flags if f in MODE_FLAGS))
    if len(modes) < 2:
        return None
    return (f"error: {' and '.join(modes)} cannot go together (Hydra runs one of -m, --cfg, --info); to see a "
            f"sweep's config, print one job's: python {config_name}.py --cfg job OVERRIDES (without -m)")


def check_command_line(argv: Sequence[str], config_name: str) -> None:
    """Exit with one ``error:`` line for a misspelt key (Hydra's too), a setting of another option, a run folder of the
    other kind of job or one with links where jobs write, before Hydra composes anything (or writes its
    ``.hydra/`` record and log into the folder)."""
    from byol.jobs.run_folder import FolderTakenError, check_job_folder, check_sweep_folder, links_in

    message = (more_than_one_mode(argv, config_name) or unquoted_path(argv)
               or hydra_problem(_parse(tuple(argv)) or [], config_name) or unknown_option(argv, config_name)
               or misspelt_key(argv, config_name) or open_dict_without_plus(argv, config_name)
               or setting_of_another_option(argv, config_name) or removed_setting(argv, config_name)
               or empty_path(argv, config_name))
    run_dir, single_run = given_run_dir(argv, config_name), config_name == "train" and not is_sweep(argv)
    resume = last_value(argv, ("resume", "++resume")) if single_run else None
    resumed = resume not in NO_RESUME
    if not message and resumed:  # first what resume= names (a sweep's folder), then the folder's kind
        message = start_problem(resume, run_dir)
    if not message and run_dir is not None:
        try:
            check_job_folder(run_dir, config_name)  # the job's name is its config's: train, evaluate
        except FolderTakenError as e:
            message = f"error: {e}"
    if not message and single_run and not resumed:  # a new run: not over a run's weights
        message = start_problem(resume, run_dir)
    sweep_folders = given_sweep_folders(argv) if not message else []
    if sweep_folders:
        try:
            check_sweep_folder(sweep_folders[0], config_name)
        except FolderTakenError as e:
            message = f"error: {e}"
        if not message and config_name == "train":
            from byol.jobs.sweep_plan import renumbered_jobs

            message = renumbered_jobs(list(argv), sweep_folders[0])
        if not message and config_name == "evaluate":
            message = other_sweeps_evaluation(argv, sweep_folders[0])
    for folder in sweep_folders if not message else []:
        links = links_in(folder)
        if links:
            message = (f"error: '{links[0]}' is a symbolic link in the sweep folder; jobs never write through "
                       f"links: replace it by the file or folder itself, or sweep into another folder")
            break
    if message:
        print(message, file=sys.stderr, flush=True)
        sys.exit(1)
    keep_hydra_record(run_dir if single_run else None)  # a refused job puts the run's record back


def run_script(main, config_name: str) -> None:
    """An entry script's start (``python train.py`` / ``evaluate.py``): the command line checked
    (:func:`check_command_line`), then Hydra's ``main``. A Ctrl+C while the libraries load, before the job
    (which says what it kept) started, is one line and status 130 instead of a KeyboardInterrupt traceback."""
    names_printable()  # before the first error line, which may name a folder
    try:
        check_command_line(sys.argv[1:], config_name)
        main()
    except OSError as e:  # a path on the command line too long to look at (a job says so itself)
        if e.errno != errno.ENAMETOOLONG:
            raise
        print(f"error: {name_too_long(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        done = "trained" if config_name == "train" else "evaluated"
        print(f"[{config_name}] interrupted (Ctrl+C) while starting; nothing was {done}", file=sys.stderr)
        sys.exit(130)
