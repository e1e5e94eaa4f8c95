"""How the results table names its rows where its columns alone cannot tell them apart: the data settings
that differ between rows of one dataset (``cifar10 subset=10000``), and the trained, protocol and
representation settings that differ between rows of one loss, protocol or representation
(``optim.base_lr=5.0``). Works on :class:`~byol.jobs.report_cells.Cell` rows."""

from __future__ import annotations

import json
from collections.abc import Iterable

BASELINE = "random-init"
# the precision an evaluation leaves unrecorded: what trainer.precision=auto is on a GPU (and was the default
# setting before auto); 32-true and others are recorded
DEFAULT_PRECISION = "bf16-mixed"
UNRECORDED_VALUES = {"trainer.precision": DEFAULT_PRECISION}
CORE_DATA = ("name", "root", "subset", "image_size")  # what every results.json of this version records
# data settings that change an evaluation's images or their normalisation: in ``eval_data`` only where they differ
# from the dataset's defaults (conf/data/), so an absent one reads "default" (results of earlier versions too)
EVAL_DATA_SETTINGS = ("mean", "std", "skip_bad_files")


def label_data(cells: Iterable) -> None:
    """``cell.data``: the dataset's name, plus each data setting whose value differs between results
    of that dataset in this report (``cifar10 subset=10000``); ``A → B`` when pretraining and
    evaluation data differ; ``(settings unknown)`` for an older results.json that records only the
    dataset's name, ``?`` when nothing is known."""
    cells = list(cells)
    found = {s for c in cells for s in (c.pretrain_data, c.eval_data) if s is not None}
    evaluated = {c.eval_data for c in cells}
    dicts = {s: {**(dict.fromkeys(EVAL_DATA_SETTINGS, "default") if s in evaluated else {}), **json.loads(s)}
             for s in found}
    values: dict = {}  # (dataset name, setting) -> the values recorded for it
    for d in dicts.values():
        for k, v in d.items():
            values.setdefault((str(d.get("name")), k), set()).add(json.dumps(v))

    def parts(s: str | None) -> list[str]:
        if s is None:
            return ["?"]
        d = dicts[s]
        name = str(d.get("name"))
        out = [f"{k}={'none' if v is None else v}" for k, v in sorted(d.items())
               if k != "name" and len(values[(name, k)]) > 1]
        return [str(d.get("name", "?"))] + out + (["(settings unknown)"] * any(k not in d for k in CORE_DATA))

    for c in cells:
        if not c.n_results:
            continue
        e = parts(c.eval_data)
        if c.loss == BASELINE and c.pretrain_data is None:  # no pretraining
            c.data = " ".join(e)
            continue
        p = parts(c.pretrain_data)
        # the settings only evaluation has (split, val_size) do not make the data differ
        pretrain_keys = {x.split("=")[0] for x in p[1:]}
        comparable = [x for x in e if "=" not in x or x.split("=")[0] in pretrain_keys or
                      x.split("=")[0] in CORE_DATA]
        c.data = " ".join(e) if p == comparable else f"{' '.join(p)} → {' '.join(e)}"


def label_variants(cells: Iterable) -> None:
    """``cell.variant``: the trained settings that differ between rows of one loss, the protocol settings that
    differ between rows of one protocol, and the taps that differ between rows of one representation
    (``optim.base_lr=5.0``), so that rows the columns cannot tell apart are named."""
    cells = [c for c in cells if c.n_results]
    for c in cells:
        c.variant = ""
    for field_name, group, prefix in (("trained", "loss", ""), ("eval_settings", "eval", "eval."),
                                      ("taps", "repr", "taps")):
        groups: dict = {}
        for c in cells:
            groups.setdefault(getattr(c, group), []).append(c)
        for members in groups.values():
            known = [(c, _as_dict(getattr(c, field_name))) for c in members if getattr(c, field_name) is not None]
            keys = {k for _, d in known for k in d}
            varying = sorted(k for k in keys if len({json.dumps(d.get(k)) for _, d in known}) > 1)
            for c, d in known:
                parts = [_setting(prefix, k, d) for k in varying]
                c.variant = " ".join(x for x in (c.variant, *parts) if x)


def _setting(prefix: str, key: str, settings: dict) -> str:
    """``eval.k=20``; a setting named in full (an evaluation's ``trainer.precision``, recorded only where it is not
    bf16-mixed) is not under the group's prefix, and its absence is that value."""
    if "." in key and prefix == "eval.":
        return f"{key}={short_value(settings.get(key, UNRECORDED_VALUES.get(key, 'default')))}"
    return f"{prefix}{key}={short_value(settings.get(key))}"


def _as_dict(canonical: str) -> dict:
    value = json.loads(canonical)
    return value if isinstance(value, dict) else {"": value}


def short_value(value, limit: int = 60) -> str:
    """A setting's value as the command line writes it: lists without quotes (``[layer2.0,layer3.0]``); cut
    at ``limit`` characters (a results.json is anyone's file: a long value would fill the note column)."""
    if isinstance(value, list):
        text = "[" + ",".join(map(str, value)) + "]"
    else:
        text = "none" if value is None else json.dumps(value) if isinstance(value, dict) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def dataset_names(cells: Iterable) -> list[str]:
    """The names of the datasets the rows were pretrained and evaluated on, in order of appearance."""
    names = {}
    for c in cells:
        for s in (c.pretrain_data, c.eval_data):
            name = json.loads(s).get("name") if s is not None else None
            if name:
                names.setdefault(str(name), None)
    return list(names)
