"""YAML handed to us (a run folder's ``config.yaml``) checked before any parser builds it: the shapes that make a
few hundred bytes cost minutes or gigabytes to read, which config files the jobs write never have."""

from __future__ import annotations

import re

import yaml

MAX_YAML_DEPTH = 64  # configs the jobs write are a few levels deep


def refuse_unsafe_yaml(text: str) -> None:
    """Configs the jobs write hold no YAML anchors or aliases; a handed file with them could expand a few
    hundred bytes into billions of nodes (an alias bomb) when read, so they are refused before reading; so
    is a file nested deeper than :data:`MAX_YAML_DEPTH` levels (400 kB of brackets kept the parser busy for
    minutes)."""
    depth = deepest = 0
    for char in re.sub(r"'[^'\n]*'|\"[^\"\n]*\"", "", text):  # brackets inside quoted strings do not nest
        depth += (char in "[{") - (char in "]}")
        deepest = max(deepest, depth)
    indent = max((len(line) - len(line.lstrip(" ")) for line in text.splitlines()), default=0)
    nested = ValueError(f"it is nested deeper than {MAX_YAML_DEPTH} levels, which config files written by the jobs "
                        f"never are")
    if deepest > MAX_YAML_DEPTH or indent > 2 * MAX_YAML_DEPTH:  # the parser takes minutes over such nesting
        raise nested
    nesting = 0  # as the parser sees it: block sequences ("- - - x") nest without brackets or indentation
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        nesting += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if nesting > MAX_YAML_DEPTH:
            raise nested
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ValueError("it holds YAML anchors or aliases (&name / *name), which config files written by "
                             "the jobs never hold")
