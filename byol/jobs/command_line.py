"""The command line checked before Hydra composes the config or writes its ``.hydra/`` folder: a misspelt
setting is named with the one it resembles (Hydra would advise appending it as a new key), a setting of
another option of its group (``eval.epochs`` with ``eval=knn``) is named with the options that have it, and a
``hydra.run.dir`` that holds the other kind of job's output is refused before Hydra rewrites anything in it."""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf


def _parsed_overrides(argv: Sequence[str]) -> list | None:
    """Hydra's parse of the command line's overrides; None when there are none or they do not parse (Hydra
    then reports what is wrong)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    if not overrides:  # --help, --cfg, the defaults: nothing to check (and no schema to load)
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return None


def _top_config(config_name: str) -> tuple[dict, set[str]]:
    """``conf/<config_name>.yaml`` without its defaults list, and the groups that list names."""
    from byol.jobs.config_check import CONF_DIR

    top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{config_name}.yaml"))
    return top, {next(iter(d)) for d in top.pop("defaults", []) if isinstance(d, dict)}


def misspelt_key(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for a command-line key that is no setting of ``conf/<config_name>.yaml`` but close to
    one (``data.bach_size=64``), where Hydra would suggest appending it with ``+``; None otherwise (Hydra
    reports what else is wrong)."""
    parsed = _parsed_overrides(argv)
    if parsed is None:
        return None
    import difflib

    from byol.jobs.config_check import CONF_DIR, OPEN_DICTS, VIEW_OVERRIDES, config_schema

    top, groups = _top_config(config_name)
    known = {".".join(path) for path in config_schema() if path and path[0] in set(top) | groups}
    free = tuple(".".join(path) + "." for path in OPEN_DICTS | VIEW_OVERRIDES)  # keys of the user's choosing
    for o in parsed:
        key = o.key_or_group
        if (o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None or key in known
                or (CONF_DIR / key).is_dir() or key.split(".")[0] == "hydra" or key.startswith(free)):
            continue
        parent, _, last = key.rpartition(".")
        if parent in known:  # a sibling's name, else the whole key
            siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
            close = [f"{parent}.{name}" for name in difflib.get_close_matches(last, siblings, n=2, cutoff=0.7)]
        else:
            close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.85)
        if close:
            return (f"error: {key} is not a setting; did you mean {' or '.join(close)}? (python {config_name}.py "
                    f"--cfg job prints every setting)")
    return None


@functools.cache
def option_keys(group: str) -> dict[str, set[str]]:
    """``{option: its dotted keys}`` for a packaged group, e.g. ``{"knn": {"eval.k", ...}, ...}``."""
    from byol.jobs.config_check import CONF_DIR

    def dotted(node, prefix: str):
        for key, value in node.items():
            if key != "defaults":
                yield f"{prefix}.{key}"
                if isinstance(value, dict):
                    yield from dotted(value, f"{prefix}.{key}")

    return {path.stem: set(dotted(OmegaConf.to_container(OmegaConf.load(path)), group))
            for path in sorted((CONF_DIR / group).glob("*.yaml"))}


def setting_of_another_option(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for a setting that only other options of its group have (``eval.epochs`` with
    ``eval=knn``): Hydra would advise appending it with ``+``, and an appended one would be ignored by the
    chosen option. Every combination a sweep makes of the group choices is checked, so a sweep does not stop
    half-way. None when each such setting exists in the composed config (or the command line does not parse:
    Hydra reports that)."""
    parsed = _parsed_overrides(argv)
    if parsed is None:
        return None
    from byol.jobs.config_check import CONF_DIR, OPEN_DICTS, PACKAGED_GROUPS, VIEW_OVERRIDES

    # evaluate.py applies data.* keys to each run's own data settings, whatever their group: not checked there
    groups = _top_config(config_name)[1] & set(PACKAGED_GROUPS) - ({"data"} if config_name == "evaluate" else set())
    free = tuple(".".join(path) + "." for path in OPEN_DICTS | VIEW_OVERRIDES)
    suspects = {}  # key -> the options of its group that have it, where some options do not
    for o in parsed:
        key = o.key_or_group
        group = key.split(".")[0]
        if "." not in key or group not in groups or o.is_delete() or o.package is not None or key.startswith(free):
            continue
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
                if not _has(cfg, key):
                    group = key.split(".")[0]
                    options = " or ".join(f"{group}={option}" for option in having)
                    job = f" (the sweep's job with {' '.join(combination)})" if any(len(v) > 1 for v in values) else ""
                    return (f"error: {key} is a setting of {options}, not of {group}="
                            f"{cfg.hydra.runtime.choices.get(group)}{job}; choose {options}, or leave {key} out")
    return None


def _has(cfg, key: str) -> bool:
    """Whether the dotted ``key`` exists in ``cfg`` (its value may be null or missing)."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False) if parent else cfg
    return node is not None and OmegaConf.is_dict(node) and last in node


def given_run_dir(argv: Sequence[str]) -> Path | None:
    """The folder ``hydra.run.dir=DIR`` names for a single run (None for a sweep, an interpolation or none)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in ("hydra.run.dir", "++hydra.run.dir")]
    return Path(values[-1].strip("'\"")) if values and "${" not in values[-1] else None


def check_command_line(argv: Sequence[str], config_name: str) -> None:
    """Exit with one ``error:`` line for a misspelt key or a run folder of the other kind of job, before Hydra
    composes anything."""
    from byol.jobs.run_folder import FolderTakenError, check_job_folder

    message = misspelt_key(argv, config_name) or setting_of_another_option(argv, config_name)
    run_dir = given_run_dir(argv)
    if not message and run_dir is not None:
        try:
            check_job_folder(run_dir, config_name)  # the job's name is its config's: train, evaluate
        except FolderTakenError as e:
            message = f"error: {e}"
    if message:
        print(message, file=sys.stderr, flush=True)
        sys.exit(1)
