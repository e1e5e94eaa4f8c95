"""Hydra's own settings on the command line (``hydra.KEY=...``, ``hydra/GROUP=OPTION``) checked before Hydra
composes anything, as the project's own keys are (:mod:`byol.jobs.command_line`): a misspelt one was Hydra's
multi-line error advising ``+hydra...``, which then adds a key Hydra never reads.

Hydra's fixed keys come from its dataclasses (no composing); the keys of a group's option (a launcher's
``n_jobs``) from the option's file in ``conf/hydra/``, else from composing Hydra's config (seconds: its plugins
load), which only a key or option found in neither needs."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # config_check's, without loading torch for an error line
OPEN = "open"  # a node whose keys Hydra does not fix: a dict, or what a group's option puts there (a launcher)


@functools.cache
def hydra_keys(cls: type | None = None) -> dict:
    """Hydra's own config (``hydra.conf.HydraConf``) as a tree: ``{key: subtree, OPEN, or None for a value}``."""
    from hydra.conf import HydraConf

    cls = cls or HydraConf
    hints = typing.get_type_hints(cls)
    tree = {}
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        open_ = kind is typing.Any or typing.get_origin(kind) is dict
        tree[field.name] = hydra_keys(kind) if dataclasses.is_dataclass(kind) else OPEN if open_ else None
    return tree


def _conf_dirs(group: str = "") -> list[Path]:
    """Where Hydra's groups (``group``: that group's options) are found without loading its plugins: its own
    package's config folder and this project's ``conf/hydra``."""
    import hydra

    return [Path(hydra.__file__).parent / "conf" / "hydra" / group, CONF_DIR / "hydra" / group]


@functools.cache
def _composed(group_choices: tuple[str, ...], config_name: str) -> tuple[list[str], dict, dict]:
    """Hydra's groups, each group's options, and its config composed with ``group_choices`` (plain, unresolved):
    the plugins' launchers and sweepers are known only once Hydra has loaded them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with warnings.catch_warnings(), initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        warnings.simplefilter("ignore")  # Hydra's notes on its plugins' schemas
        loader = GlobalHydra.instance().config_loader()
        groups = sorted(loader.list_groups("hydra"))
        options = {g: sorted(loader.get_group_options(f"hydra/{g}")) for g in groups}
        try:
            cfg = compose(config_name, overrides=list(group_choices), return_hydra_config=True)
        except Exception:  # e.g. an option's own error: Hydra says it when it runs
            return groups, options, {}
        return groups, options, OmegaConf.to_container(cfg.hydra, resolve=False)


def _group_option(o, parsed, config_name: str) -> str | None:
    """The error line for ``hydra/GROUP=OPTION`` naming a group or option Hydra does not have; None otherwise."""
    group, value = o.key_or_group.partition("/")[2], o.value() if not o.is_sweep_override() else None
    if "/" in group or not isinstance(value, str):
        return None  # a nested group or a sweep of options: Hydra checks them
    if any((d / group).is_dir() for d in _conf_dirs()) and \
            any((d / f"{value}.yaml").is_file() for d in _conf_dirs(group)):
        return None
    groups, options, _ = _composed((), config_name)
    if group not in groups:
        close = difflib.get_close_matches(group, groups, n=1, cutoff=0.6)
        mean = f"; did you mean hydra/{close[0]}?" if close else ""
        return f"error: hydra/{group} is not a group of Hydra's{mean} (its groups: {', '.join(groups)})"
    if value in options[group]:
        return None
    close = difflib.get_close_matches(value, options[group], n=1, cutoff=0.6)
    mean = f" (did you mean hydra/{group}={close[0]}?)" if close else ""
    return (f"error: hydra/{group}={value} is not an option of hydra/{group}{mean}; choose one of: "
            f"{', '.join(options[group])} (an option of another Hydra plugin needs that plugin installed)")


def _missing(tree, parts: Sequence[str]) -> tuple[int, list[str]] | None:
    """Where ``parts`` leave ``tree`` (the index of the first key it lacks, and the keys it has there); None when
    the path is there or goes into a node whose keys are not fixed (``(len(parts), [])`` stops at such a node)."""
    node = tree
    for i, part in enumerate(parts):
        if node == OPEN:
            return (i, []) if i < len(parts) else None
        if not isinstance(node, dict):
            return None  # into a value (a list's index): Hydra checks it
        if part not in node:
            return i, sorted(node)
        node = node[part]
    return None


def _option_file_keys(group: str, choice: str | None) -> dict | None:
    """The keys the option ``choice`` of ``hydra/group`` has, from its file in ``conf/hydra`` (None: no file)."""
    path = CONF_DIR / "hydra" / group / f"{choice}.yaml"
    if choice is None or not path.is_file():
        return None
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: v for k, v in node.items() if k != "defaults"} if isinstance(node, dict) else None


def _chosen(parsed) -> dict[str, str]:
    """``{group: option}`` for each ``hydra/GROUP=OPTION`` of the command line (not a sweep of options)."""
    return {o.key_or_group.partition("/")[2]: o.value() for o in parsed
            if o.key_or_group.startswith("hydra/") and not o.is_sweep_override() and isinstance(o.value(), str)}


def _lacking(parts: list[str], chosen: dict[str, str], config_name: str) -> tuple[int, list[str], str] | None:
    """Where the key ``hydra.<parts>`` leaves Hydra's config: (index, the keys there, whose keys they are), with
    the keys a group's option brings (a launcher's) read from its file or from Hydra; None when it is there."""
    where = _missing(hydra_keys(), parts)
    if where is None or where[1]:
        return None if where is None else (*where, "Hydra's")
    group = parts[0]
    own = _option_file_keys(group, chosen.get(group)) if where[0] == 1 else None
    if own is not None and _missing(own, parts[1:]) is None:
        return None  # in the option's file (which may leave out what its plugin's schema adds: Hydra's says)
    _, _, composed = _composed(tuple(f"hydra/{g}={v}" for g, v in chosen.items()), config_name)
    lack = _missing(composed, parts) if composed else None
    option = (composed.get("runtime") or {}).get("choices", {}).get(f"hydra/{group}") if lack else None
    return None if lack is None else (*lack, f"hydra/{group}={option}" if option else "Hydra's")


def _key_problem(o, parsed, config_name: str) -> str | None:
    """The error line for ``hydra.KEY=...`` naming a key Hydra's config lacks (Hydra refuses it in several lines,
    advising ``+``; added with ``+`` to one of its fixed parts, Hydra never reads it); None otherwise."""
    parts, adds = o.key_or_group.split(".")[1:], o.is_add() or o.is_force_add()
    groups = sorted({p.name for d in _conf_dirs() if d.is_dir() for p in d.iterdir() if p.is_dir()})
    if len(parts) == 1 and parts[0] in groups and not o.is_sweep_override() and isinstance(o.value(), str) \
            and not adds:  # hydra.launcher=joblib
        return f"error: {o.input_line} sets a key; an option of Hydra's {parts[0]} is chosen with hydra/{parts[0]}=" \
               f"{o.value()} (a slash, not a dot)"
    if adds:  # Hydra takes a new key anywhere but in its fixed parts (hydra.run), where it never reads it
        fixed = _missing(hydra_keys(), parts)
        lack = (*fixed, "Hydra's") if fixed is not None and fixed[1] else None
    else:
        lack = _lacking(parts, _chosen(parsed), config_name)
    if lack is None:
        return None
    i, there, whose = lack
    close = difflib.get_close_matches(parts[i], there, n=1, cutoff=0.6)
    mean = f"; did you mean {'.'.join(['hydra', *parts[:i], close[0], *parts[i + 1:]])}?" if close else ""
    if whose.startswith("hydra/") and not close:  # another option of the group has it: hydra.launcher.n_jobs
        group = whose[len("hydra/"):].partition("=")[0]
        having = sorted(option.stem for option in (_conf_dirs(group)[1].glob("*.yaml"))
                        if _missing(_option_file_keys(group, option.stem) or {}, parts[1:]) is None)
        mean = f"; it is a setting of {' or '.join(f'hydra/{group}={h}' for h in having)}: add " \
               f"hydra/{group}={having[0]}" if having else ""
    shown = " ".join([*(f"hydra/{g}={v}" for g, v in _chosen(parsed).items()), "--cfg hydra"])
    what = f"{o.input_line.partition('=')[0]} adds a key Hydra never reads" if adds else \
        f"{o.key_or_group} is not a setting of {whose}"
    return f"error: {what}{mean} (python {config_name}.py {shown} prints Hydra's settings)"


def hydra_problem(parsed: Sequence, config_name: str) -> str | None:
    """The error line for the first ``hydra.*`` key or ``hydra/GROUP=OPTION`` of the command line (Hydra's parse,
    ``parsed``) that Hydra's config does not have, with the one it resembles; None when all are Hydra's."""
    for o in parsed:
        if o.key_or_group.startswith("hydra/"):
            problem = _group_option(o, parsed, config_name)
        elif o.key_or_group.startswith("hydra.") and not o.is_delete():
            problem = _key_problem(o, parsed, config_name)
        else:
            continue
        if problem:
            return problem
    return None
