"""The online monitors of a pretraining run, built from the ``monitor`` config group.

On by default when the training data has labels: the kNN bank is drawn from the training split
that ``evaluate.py`` uses (training images minus ``monitor.val_size`` held out, seeded) and the
queries from the test split, so with the whole bank and all queries the online kNN is the offline
``eval=knn`` of the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from byol.core.backbone import AVGPOOL
from byol.core.data import ImageTensors, seeded_subset
from byol.core.errors import DataError
from byol.core.features import autocast_dtype
from byol.jobs.cli import launched_rank
from byol.jobs.datasets import check_eval_folders, load_eval_data, load_split, pretraining_split_is_evaluations


def representations(taps) -> dict[str, list[str]]:
    """avgpool, each tap alone, and combined (avgpool + all taps)."""
    taps = [t for t in taps if t != AVGPOOL]
    named = {AVGPOOL: [AVGPOOL], **{t: [t] for t in taps}}
    if taps:
        named["combined"] = [AVGPOOL, *taps]
    return named


@dataclass
class MonitorSamples:
    """The kNN bank (training images) and queries (test images) of the online monitors, in memory."""

    bank: ImageTensors
    queries: ImageTensors
    num_classes: int


def monitor_samples(config: Mapping, train_images: ImageTensors | None = None) -> MonitorSamples | None:
    """The monitors' bank and queries (None, with one line saying why, when they are off or the data has no
    labels). ``train_images``: the training images the job has loaded already (the whole split, as
    ``load_split`` gives it), used instead of a second load. The splits are taken by reference and only the
    samples are read: the monitors hold ``monitor.bank_size`` + ``monitor.query_size`` images, never a copy
    of the training set (a folder that fills half the memory would otherwise not fit)."""
    monitor = config.get("monitor") or {}
    if not monitor.get("enabled", True):
        return None
    data, seed = config["data"], config["seed"]
    try:
        check_eval_folders(data)
        if train_images is None or not pretraining_split_is_evaluations(data):
            train_images = load_split(data, "train", unlabelled=False)
        splits, num_classes = load_eval_data(data, {"name": "holdout", "val_size": monitor["val_size"]}, seed,
                                             train=train_images.by_reference())
    except DataError as e:
        print(f"[byol] no online monitors: they need labelled training and test images ({e})", flush=True)
        return None
    return MonitorSamples(seeded_subset(splits["train"], int(monitor["bank_size"]), seed).to("cpu"),
                          seeded_subset(splits["test"], int(monitor["query_size"]), seed + 1).to("cpu"),
                          num_classes)


def build_monitors(config: Mapping, encoder_dims: Mapping[str, int], samples: MonitorSamples | None) -> list:
    """The kNN and probe callbacks on ``samples`` (:func:`monitor_samples`); none when there are none."""
    from byol.lightning.monitors import OnlineKNN, OnlineProbes  # Lightning: the job's checks come before it

    if samples is None:
        return []
    monitor, data = config["monitor"], config["data"]
    named = representations(monitor.get("taps") or [])
    bank, queries = samples.bank, samples.queries
    knn = OnlineKNN(bank, queries, named, data["mean"], data["std"], samples.num_classes, monitor["every_n_epochs"],
                    monitor["k"], monitor["temperature"], monitor.get("batch_size", 512),
                    autocast_dtype(config["trainer"].get("precision", "32-true")))
    probes = OnlineProbes(named, encoder_dims, samples.num_classes, monitor["probe_lr"], config["seed"])
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
