"""The online monitors of a pretraining run, built from the ``monitor`` config group.

On by default when the training data has labels: the kNN bank is drawn from the training split
that ``evaluate.py`` uses (training images minus ``monitor.val_size`` held out, seeded) and the
queries from the test split, so with the whole bank and all queries the online kNN is the offline
``eval=knn`` of the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from byol.core.backbone import AVGPOOL
from byol.core.data import ImageTensors
from byol.core.errors import DataError
from byol.core.features import autocast_dtype
from byol.jobs.cli import launched_rank
from byol.jobs.datasets import load_eval_data


def representations(taps) -> dict[str, list[str]]:
    """avgpool, each tap alone, and combined (avgpool + all taps)."""
    taps = [t for t in taps if t != AVGPOOL]
    named = {AVGPOOL: [AVGPOOL], **{t: [t] for t in taps}}
    if taps:
        named["combined"] = [AVGPOOL, *taps]
    return named


def _sample(data: ImageTensors, size: int, seed: int) -> ImageTensors:
    if size >= len(data):
        return data
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size])


def build_monitors(config: Mapping, encoder_dims: Mapping[str, int]) -> list:
    """The kNN and probe callbacks, or none (with one line saying why) when the data has no labels."""
    from byol.lightning.monitors import OnlineKNN, OnlineProbes  # Lightning: the job's checks come before it
    monitor = config.get("monitor") or {}
    if not monitor.get("enabled", True):
        return []
    data = config["data"]
    try:
        splits, num_classes = load_eval_data(data, {"name": "holdout", "val_size": monitor["val_size"]},
                                             config["seed"])
    except DataError as e:
        print(f"[byol] no online monitors: they need labelled training and test images ({e})", flush=True)
        return []
    named = representations(monitor.get("taps") or [])
    bank = _sample(splits["train"], int(monitor["bank_size"]), config["seed"])
    queries = _sample(splits["test"], int(monitor["query_size"]), config["seed"] + 1)
    knn = OnlineKNN(bank, queries, named, data["mean"], data["std"], num_classes, monitor["every_n_epochs"],
                    monitor["k"], monitor["temperature"], monitor.get("batch_size", 512),
                    autocast_dtype(config["trainer"].get("precision", "32-true")))
    probes = OnlineProbes(named, encoder_dims, num_classes, monitor["probe_lr"], config["seed"])
    if launched_rank() == 0:
        capped = f" (monitor.k={monitor['k']}: all {len(bank)} vote)" if monitor["k"] > len(bank) else ""
        print(f"[byol] online monitors: kNN of {len(queries)} test images against {len(bank)} training images{capped} "
              f"every {monitor['every_n_epochs']} epoch(s), and a linear probe per representation "
              f"({', '.join(named)})", flush=True)
    return [knn, probes]


def monitor_taps(config: Mapping) -> list[str]:
    """The encoder taps the monitors read, besides the loss's own (empty when monitors are off)."""
    monitor = config.get("monitor") or {}
    return [t for t in monitor.get("taps") or [] if t != AVGPOOL] if monitor.get("enabled", True) else []
