"""The command line checked before Hydra composes the config or writes its ``.hydra/`` folder: a misspelt
setting is named with the one it resembles (Hydra would advise appending it as a new key), and a
``hydra.run.dir`` that holds the other kind of job's output is refused before Hydra rewrites anything in it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf


def misspelt_key(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for a command-line key that is no setting of ``conf/<config_name>.yaml`` but close to
    one (``data.bach_size=64``), where Hydra would suggest appending it with ``+``; None otherwise (Hydra
    reports what else is wrong)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    if not overrides:  # --help, --cfg, the defaults: nothing to check (and no schema to load)
        return None
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from byol.jobs.config_check import CONF_DIR, OPEN_DICTS, VIEW_OVERRIDES, config_schema

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{config_name}.yaml"))
    except Exception:
        return None
    groups = {next(iter(d)) for d in top.pop("defaults", []) if isinstance(d, dict)}
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

    message = misspelt_key(argv, config_name)
    run_dir = given_run_dir(argv)
    if not message and run_dir is not None:
        try:
            check_job_folder(run_dir, config_name)  # the job's name is its config's: train, evaluate
        except FolderTakenError as e:
            message = f"error: {e}"
    if message:
        print(message, file=sys.stderr, flush=True)
        sys.exit(1)
