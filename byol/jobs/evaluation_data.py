"""The data each model is evaluated on: the run's own data settings, the command line's ``data`` keys
over them, and this machine's settings (cache folder, storage, download) over both."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence

from byol.core.data import ImageTensors
from byol.jobs.config_check import check_config
from byol.jobs.datasets import DATASETS, MACHINE_DATA_KEYS, load_eval_data, make_root_absolute


@functools.cache
def data_group_defaults(name) -> dict:
    """The settings of ``conf/data/<name>.yaml`` ({} for a name this project does not have); read once per
    name (a sweep asks for each of its models). Not to be changed by the caller."""
    from omegaconf import OmegaConf

    from byol.jobs.config_check import CONF_DIR

    path = CONF_DIR / "data" / f"{name}.yaml"
    if not isinstance(name, str) or name not in DATASETS or not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path))


def data_tags(settings: Sequence[Mapping]) -> list[str]:
    """A short folder tag for each of several data settings (a sweep's baselines): the values that tell it from
    the others (``_subset64``, ``_cifar100``), else its number (``_data2``); "" for one setting alone."""
    if len(settings) < 2:
        return [""] * len(settings)
    text = [{k: json.dumps(v, sort_keys=True, default=str).strip('"') for k, v in s.items()} for s in settings]
    differing = sorted({k for s in text for k in s if len({t.get(k) for t in text}) > 1})
    tags = ["".join("_" + re.sub(r"[^A-Za-z0-9.]+", "-", ("" if k == "name" else k) + t.get(k, "none")).strip("-")
                    for k in differing) for t in text]
    if len(set(tags)) < len(tags) or max(map(len, tags)) > 40:
        return [f"_data{n}" for n in range(1, len(settings) + 1)]
    return tags


class EvaluationData:
    """The data each model is evaluated on: the settings of the run that trained it (group, root,
    image size, normalisation...), except the ``data`` keys given on the command line and the machine's
    own settings (:data:`~byol.jobs.datasets.MACHINE_DATA_KEYS`); each distinct setting is loaded once."""

    def __init__(self, composed: dict, given: Sequence[str], seed: int, split: Mapping):
        self.composed, self.seed, self.split = composed, seed, split
        self.whole = "data" in given  # data=GROUP: the command line's data settings, whole
        self.keys = [k[len("data."):] for k in given if k.startswith("data.")]
        self._loaded: dict[str, tuple] = {}
        self._noted: set[str] = set()  # machine settings the runs had otherwise, said once each

    def settings(self, run_config: Mapping | None, label: str, no_run_data: str = "no run data",
                 whose: str = "the run's own settings") -> dict:
        """The data settings for the model ``label``; ``no_run_data`` says why there are none of its run's,
        ``whose`` whose settings ``run_config`` holds (a random-init baseline's are those of the runs beside it)."""
        run_data = (run_config or {}).get("data")
        if self.whole or not isinstance(run_data, Mapping):
            source = "the command line" if self.whole else f"this evaluation's config ({no_run_data})"
            chosen = self.composed
        else:
            chosen = {**run_data, **{k: self.composed[k] for k in self.keys if k in self.composed}}
            chosen.update(self._machine_settings(run_data, label))
            given = f"; {', '.join('data.' + k for k in self.keys)} from the command line" if self.keys else ""
            source = f"{whose}{given}"
        chosen = dict(chosen)
        from_run = not self.whole and isinstance(run_data, Mapping) and "root" not in self.keys
        make_root_absolute(chosen, f"{label}'s run config" if from_run else None)
        described = ", ".join(f"{k}={chosen[k]}" for k in ("root", "image_size", "subset") if chosen.get(k))
        print(f"[eval] {label}: data {chosen.get('name')} ({described or 'defaults'}), from {source}", flush=True)
        # a run folder's config.yaml may have been edited by hand: its types were checked, here its ranges
        # (data.batch_size is pretraining's: a run that failed on it is still listed under its own data)
        check_config({"data": {k: v for k, v in chosen.items() if k != "batch_size"}}, f"{label}: data from {source}")
        return chosen

    def _machine_settings(self, run_data: Mapping, label: str) -> dict:
        """Where this machine keeps decoded images and whether it may download: this evaluation's settings
        (the command line, else this installation's defaults for the run's dataset), never the run's. A run
        trained elsewhere names folders of that machine; a handed config.yaml could name any folder, to
        write decoded images (copies of any images this user can read) or a download into."""
        defaults = data_group_defaults(run_data.get("name"))
        given = {k: self.composed[k] for k in self.keys if k in self.composed}
        local = {k: given.get(k, defaults[k]) for k in MACHINE_DATA_KEYS if k in defaults}
        differs = [k for k in local if k in run_data and run_data[k] != local[k]]
        said = ", ".join(f"data.{k}={local[k]}" for k in differs)
        if differs and said not in self._noted:
            self._noted.add(said)
            print(f"[eval] {label}: note: {said} (this machine's setting; the run had "
                  f"{', '.join(str(run_data[k]) for k in differs)}: give ++data.KEY=VALUE to choose)", flush=True)
        return local

    def load(self, data: Mapping) -> tuple[dict[str, ImageTensors], int]:
        key = json.dumps(data, sort_keys=True, default=str)
        if key not in self._loaded:
            self._loaded[key] = load_eval_data(data, self.split, self.seed)
        return self._loaded[key]
