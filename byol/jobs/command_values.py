"""Command-line values refused before Hydra composes anything: paths Hydra would misread (a sweep job's folder,
an unquoted ~, a folder named by a number), an empty path, and ``~KEY`` removing a setting the job needs."""

from __future__ import annotations

from collections.abc import Sequence

from byol.jobs.command_folders import last_value

PATH_KEYS = ("resume", "pretrained", "hydra.run.dir", "hydra.sweep.dir", "data.root", "data.cache_dir", "outputs_dir")
FOLDER_KEYS = ("data.root", "data.cache_dir", "outputs_dir")  # a number there (2024) reached Path() as an int


def unquoted_path(argv: Sequence[str]) -> str | None:
    """The error line for a path that Hydra cannot read as written: a sweep job's folder
    (``0_loss=multi,seed=0``) holds ``=`` and ``,``, Hydra's own syntax; the line gives the quoted word."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from byol.jobs.cli import command_arg

    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") not in PATH_KEYS or not value:
            continue
        try:
            parsed = OverridesParser.create().parse_override(arg)
            if key.lstrip("+") in FOLDER_KEYS and not parsed.is_sweep_override() and \
                    isinstance(parsed.value(), int | float) and not isinstance(parsed.value(), bool):
                return (f"error: {key}={value} reads as a number, not a folder's name; quote it: "
                        f"{command_arg(key.lstrip('+'), value)}")
        except Exception:
            why = ("a sweep job's folder holds '=' and ',', its own syntax" if "=" in value or "," in value
                   else "the shell leaves a '~' after '=' as it is, and Hydra cannot read it; quoted, it is your "
                        "home folder" if "~" in value else "it holds characters of Hydra's own syntax")
            return f"error: Hydra cannot read {key}={value} as written ({why}); quote it: " \
                   f"{command_arg(key.lstrip('+'), value)}"
    return None


def empty_path(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for ``pretrained=`` or ``resume=`` given empty (an unset shell variable): an empty resume=
    started a new run without a word (the 200-epoch CIFAR-10 one, without an experiment)."""
    if config_name == "evaluate" and last_value(argv, ("pretrained", "++pretrained")) == "":
        return ("error: pretrained= is empty (an unset shell variable?); give a run folder, a sweep folder, a .ckpt, "
                "an encoder.pt, or pretrained=latest / latest_sweep / random")
    if config_name == "train" and last_value(argv, ("resume", "++resume")) == "":
        return ("error: resume= is empty (an unset shell variable?); give a run folder or a checkpoint to continue, "
                "or leave resume= out to start a new run")
    return None


REMOVABLE_GROUPS = ("logger",)  # ~logger: no loggers besides metrics.csv


def removed_setting(argv: Sequence[str], config_name: str) -> str | None:
    """The error line for ``~KEY`` that removes a setting the job reads (``~seed``, ``~data``): Hydra removes it, and
    the job failed later in a KeyError traceback. What the job does without may go: an optional group (``~logger``),
    a keyword argument of an optimizer (the library's default then), a key of an open mapping (``loss.weights``,
    ``backbone.grids``), a view's own augmentation setting (the shared one then), and any key the config does not
    define (one added with +)."""
    from byol.jobs.command_line import _top_config  # at call time: command_line imports this module
    from byol.jobs.config_check import OPEN_DICTS, VIEW_OVERRIDES, config_schema

    _, groups, optional = _top_config(config_name)
    free = OPEN_DICTS | VIEW_OVERRIDES | {("optim", "optimizer"), ("eval", "optimizer")}
    for arg in argv:
        if not arg.startswith("~"):
            continue
        key = arg[1:].split("=", 1)[0]
        path = tuple(key.split("."))
        if key in optional or key in REMOVABLE_GROUPS or path[0] == "hydra" or \
                any(len(path) > len(p) and path[:len(p)] == p for p in free):
            continue
        if key in groups or path in config_schema():
            return (f"error: {arg} removes {key}, which the job needs; change it instead ({key}=VALUE), or leave it "
                    f"out to keep its default")
    return None
