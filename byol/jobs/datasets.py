"""The datasets a config describes: the ``data`` group picks CIFAR-10, CIFAR-100, STL-10, an image
folder or synthetic data, and the train / val / test splits for evaluation.

The only data code that reads the config; what it calls (``byol.core.data``,
``byol.core.image_folder``) takes plain arguments.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from byol.core.data import (
    ImageTensors,
    holdout,
    image_digests,
    load_cifar10,
    load_cifar100,
    load_stl10,
    make_synthetic,
    seeded_subset,
    split_in_place,
)
from byol.core.disk_images import decoded_bytes
from byol.core.errors import DataError
from byol.core.image_folder import load_image_folder

DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "synthetic")
# data settings of the machine a job runs on, not of the data: where decoded images are cached, how they
# are held, whether a dataset may be downloaded
MACHINE_DATA_KEYS = ("cache_dir", "storage", "mmap_above_gb", "download")


def load_split(cfg, split: str, unlabelled: bool = True) -> ImageTensors:
    """``split`` of the dataset described by ``cfg`` (the ``data`` config group).

    ``train`` and ``test`` are the dataset's own splits; see :func:`eval_splits` for
    the validation split. ``train`` holds every image pretraining may use: for STL-10 its
    100,000 unlabelled images too (label -1), unless ``unlabelled`` is False (evaluation).
    """
    name = cfg["name"]
    download = cfg.get("download", True)
    root = data_root(cfg)
    if name == "cifar10":
        return load_cifar10(root, train=split == "train", download=download)
    if name == "cifar100":
        return load_cifar100(root, train=split == "train", download=download)
    if name == "stl10":
        return load_stl10(root, "train+unlabeled" if split == "train" and unlabelled else split, download)
    if name == "imagefolder":
        if root in (None, "", "???"):  # the config's placeholder: nothing was given
            raise DataError("data=imagefolder needs its folder: data.root=DIR, laid out as DIR/train/<class>/* "
                            "(and DIR/test/<class>/* for evaluation), or a flat folder of images to pretrain on")
        root = Path(root)
        if not root.exists():
            raise DataError(f"data.root '{root}' does not exist; point data.root at a folder laid out as "
                            f"DIR/train/<class>/* (and DIR/test/<class>/* for evaluation)")
        folder = root / split
        if not folder.is_dir():
            if split == "train":
                folder = root  # a plain folder of images or of class folders
            else:
                raise missing_split_folders(root, [split])
        return load_image_folder(folder, cfg["image_size"], cfg.get("cache_dir"), cfg.get("skip_bad_files", False),
                                 storage=cfg.get("storage", "memory"), mmap_above=mmap_limit(cfg))
    if name == "synthetic":
        n = cfg["num_train"] if split == "train" else cfg["num_test"]
        need, room = 16 * decoded_bytes(n, cfg["image_size"]), mmap_limit({})  # float32 while drawn, 4 of them
        if need > room:  # else the kernel ends the process with no message
            raise DataError(f"synthetic data of {n} images of {cfg['image_size']} px needs about {need / 1e9:.1f} GB "
                            f"of memory while it is drawn, more than half of what is free ({2 * room / 1e9:.1f} GB): "
                            f"lower data.image_size or data.num_train / data.num_test")
        return make_synthetic(n, cfg["image_size"], cfg["num_classes"], seed=0 if split == "train" else 1)
    raise DataError(f"unknown data.name '{name}'; choose one of: {', '.join(DATASETS)}")


def data_root(cfg):
    """``data.root`` with ``~`` expanded (a quoted '~/data' reaches us as it is), else as it is (None, '???')."""
    root = cfg.get("root")
    if isinstance(root, int | float) and not isinstance(root, bool):  # data.root: 2024 in a run's config.yaml
        raise DataError(f"data.root is the number {root!r}, not a folder's path; give the path as text (quoted on "
                        f"the command line: \"data.root='{root}'\")")
    return os.path.expanduser(root) if isinstance(root, str) else root


def make_root_absolute(data: dict, source: str | None = None) -> None:
    """``data.root`` made absolute, in place, so that a run's config names the folder it read: a relative root,
    read from another folder by evaluation or resume, was other images without a word. ``source``: the file a
    relative root comes from (a run of an earlier version, which kept it as typed), said in a note; None: the
    command line, relative to this folder."""
    root = data.get("root")
    if not isinstance(root, str) or root in ("", "???") or os.path.isabs(os.path.expanduser(root)):
        return
    data["root"] = os.path.abspath(os.path.expanduser(root))
    if source:
        print(f"[data] note: {source} names data.root '{root}', relative to the folder the run was started "
              f"from: read as '{data['root']}'; if it was started elsewhere, give data.root=ABSOLUTE_PATH", flush=True)


def mmap_limit(cfg) -> float:
    """Bytes of decoded images above which ``data.storage=auto`` memory-maps them: the smaller of
    ``data.mmap_above_gb`` and half of the RAM available now (the run needs the rest)."""
    limit = float(cfg.get("mmap_above_gb") or float("inf")) * 1e9
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return limit
    return min(limit, available / 2)


def _train_folder(cfg) -> str:
    """Where the training images are, for messages about them."""
    if cfg["name"] != "imagefolder":
        return "the training set"
    root = Path(data_root(cfg))
    return f"'{root / 'train' if (root / 'train').is_dir() else root}'"


def check_eval_folders(cfg) -> None:
    """An image folder to evaluate on needs train/ and test/: said before any image is decoded (pretraining
    may take a plain folder as its training set; an evaluation that did would score the wrong images)."""
    if cfg["name"] != "imagefolder":
        return
    root = Path(data_root(cfg))
    missing = [split for split in ("train", "test") if not (root / split).is_dir()]
    if root.exists() and missing:
        raise missing_split_folders(root, missing)


def missing_split_folders(root: Path, missing: Sequence[str]) -> DataError:
    """The refusal of an evaluation folder without train/ or test/; for one that holds the class folders
    themselves (the layout pretraining takes), how to lay it out."""
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        classes = []
    flat = ""
    if len(missing) == 2 and classes:
        shown = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
        flat = (f". It holds {len(classes)} class folder(s) itself ({shown}), the layout pretraining takes: an "
                f"evaluation needs held-out test images, so move part of each class's images (a fifth, say) into "
                f"{root}/test/<class>/ and the rest into {root}/train/<class>/")
    return DataError(f"no {' and no '.join(repr(m) for m in missing)} folder in '{root}'; evaluation needs "
                     f"{root}/train/<class>/* and {root}/test/<class>/* (the same class folders in both){flat}")


def pretraining_split_is_evaluations(cfg) -> bool:
    """Whether pretraining's training split is evaluation's (STL-10's adds its unlabelled images)."""
    return cfg["name"] != "stl10"


def eval_splits(cfg, split_cfg: Mapping, seed: int = 0, train: ImageTensors | None = None) -> dict[str, ImageTensors]:
    """train / val / test for evaluation, without leaking the test set into validation.

    ``split=holdout`` (default): ``split.val_size`` training images (seeded) are held
    out as validation; identical images (same decoded pixels: copies of a file) are kept on
    one side of that split. ``split=seed_original``: the original project's split of the
    test set into two halves with seed 42 (val: first half, test: second half). Test images
    identical to training images are counted in a warning. A dataset's separate unlabelled
    images (STL-10's) are not loaded. ``train``: the training images, loaded already.
    """
    check_eval_folders(cfg)
    ours = train is None  # loaded here: its rows may be reordered in place
    train = train if train is not None else load_split(cfg, "train", unlabelled=False)
    test = load_split(cfg, "test")
    check_same_classes(train, test)
    digests = image_digests(train)
    known = set(digests)
    leaked = sum(d in known for d in image_digests(test))
    if leaked:
        print(f"[data] warning: {leaked} of the {len(test)} test images {'is' if leaked == 1 else 'are'} "
              f"identical to training images (same pixels as images in {_train_folder(cfg)}); test "
              f"accuracy will be optimistic: remove the copies from one of the folders", flush=True)
    split = split_cfg.get("name", "holdout")
    if split == "seed_original":
        perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(42))
        half = len(test) // 2
        return {"train": subset_of(train, cfg, seed, "training images"), "val": test.subset(perm[:half]),
                "test": test.subset(perm[half:])}
    if split != "holdout":
        raise DataError(f"unknown split '{split}'; choose split=holdout or split=seed_original")
    asked = int(split_cfg.get("val_size", 0))
    val_size = min(asked, len(train) // 5)
    if val_size < asked:  # the training split keeps at least four fifths of the images
        print(f"[data] note: {asked} validation images asked, {val_size} held out (at most a fifth of the "
              f"{len(train)} training images)", flush=True)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
    if len(known) < len(train):
        n = len(train) - len(known)
        copies = "image is a copy of another" if n == 1 else "images are copies of others"
        print(f"[data] {n} training {copies} (same pixels); each set of copies stays on one side of the "
              f"train/val split", flush=True)
    held, rest = holdout(perm, digests, val_size)
    val, rest = split_in_place(train, held, rest) if ours else (train.subset(held), train.subset(rest))
    return {"train": subset_of(rest, cfg, seed, "training images left after the validation split"), "val": val,
            "test": test}


def check_same_classes(train: ImageTensors, test: ImageTensors) -> None:
    """Train and test must have the same class folders (a label is a folder's place in the sorted names)."""
    if not (len(train.classes) and len(test.classes)) or train.classes == test.classes:
        return
    only_train = sorted(set(train.classes) - set(test.classes))
    only_test = sorted(set(test.classes) - set(train.classes))
    empty = [name for name in only_train if name in classes_without_images(train)] + \
            [name for name in only_test if name in classes_without_images(test)]
    hint = f" ({', '.join(map(repr, empty))} {'holds' if len(empty) == 1 else 'hold'} no images)" if empty else ""
    nfc = {unicodedata.normalize("NFC", name) for name in only_train} & \
          {unicodedata.normalize("NFC", name) for name in only_test}
    if nfc:  # 'café' in both lists: one split's names were written decomposed (copied from macOS, or a zip)
        hint += (f"; {', '.join(map(repr, sorted(nfc)))} {'is' if len(nfc) == 1 else 'are'} spelt with other Unicode "
                 f"characters in each split (composed and decomposed accents look alike): rename the folders "
                 f"of one split")
    raise DataError(f"train and test class folders differ (only in train: {only_train or 'none'}; "
                    f"only in test: {only_test or 'none'}){hint}; both splits need the same <class> "
                    f"subfolders: add, rename or remove folders")


def subset_of(images: ImageTensors, cfg: Mapping, seed: int, what: str) -> ImageTensors:
    """``data.subset`` images of ``images`` (seeded); all of them, said in a note, when it asks for more."""
    asked = cfg.get("subset")
    if asked and asked > len(images):
        print(f"[data] note: data.subset={asked} is more than the {len(images)} {what}; all of them "
              f"are used", flush=True)
    return seeded_subset(images, asked, seed)


def load_eval_data(data_cfg: Mapping, split_cfg: Mapping, seed: int,
                   train: ImageTensors | None = None) -> tuple[dict[str, ImageTensors], int]:
    """train / val / test splits (:func:`eval_splits`) and the number of classes, refusing
    splits that would make the scores meaningless: empty, unlabelled, or a single class."""
    splits = eval_splits(data_cfg, split_cfg, seed=seed, train=train)
    no_validation = split_cfg.get("name", "holdout") == "holdout" and int(split_cfg.get("val_size", 1)) == 0
    for name, split in splits.items():
        if len(split) == 0 and not (name == "val" and no_validation):  # val_size=0: train on all, no val_acc
            raise DataError(f"the {name} split is empty; use more data or a smaller split.val_size")
        if bool((split.labels < 0).any()):
            raise DataError(f"the {name} split has unlabelled images; evaluation needs class folders "
                            f"(DIR/train/<class>/*, DIR/test/<class>/*)")
    present = torch.unique(splits["train"].labels).tolist()
    if len(present) < 2:  # a one-class classifier scores 100% and measures nothing
        names = splits["train"].classes
        found = ", ".join(f"'{names[k]}'" if k < len(names) else f"label {k}" for k in present)
        raise DataError(f"evaluation needs at least 2 classes, but the training data has {len(present)} "
                        f"({found}), so any encoder would score 100%; add class folders with images "
                        f"(DIR/train/<class>/*, DIR/test/<class>/*, at least 2 classes) or point data.root "
                        f"at a dataset with several classes")
    names = splits["train"].classes
    note_empty_classes(names, splits)
    found = len(names) or max(int(s.labels.max()) for s in splits.values() if len(s)) + 1
    num_classes = int(data_cfg.get("num_classes") or found)
    check_num_classes(num_classes, found, names)
    return splits, num_classes


def classes_without_images(images: ImageTensors) -> set[str]:
    """The class folders of ``images`` that no image is labelled with."""
    present = set(images.labels.tolist())
    return {name for k, name in enumerate(images.classes) if k not in present}


def note_empty_classes(names: Sequence[str], splits: Mapping[str, ImageTensors]) -> None:
    """A note for class folders without images (a leftover or misplaced folder): they stay classes, with a
    classifier output no image has, and a class missing from the test split is never scored."""
    sides = {"training": classes_without_images(splits["train"]) & classes_without_images(splits["val"]),
             "test": classes_without_images(splits["test"])}
    empty = {name: [side for side, missing in sides.items() if name in missing] for name in names}
    empty = {name: where for name, where in empty.items() if where}
    if empty:
        listed = [f"'{name}' ({' and '.join(where)})" for name, where in list(empty.items())[:12]]
        print(f"[data] note: class folders without images: {', '.join(listed)}{', ...' if len(empty) > 12 else ''}; "
              f"they stay classes (all {len(names)} folders count): remove empty folders that are not meant as "
              f"classes", flush=True)


def check_num_classes(num_classes: int, found: int, names: Sequence[str]) -> None:
    """``data.num_classes`` against the labels: fewer would crash the classifier or let kNN score labels
    it cannot name; more only leaves classifier outputs unused (a note)."""
    listed = f" ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})" if names else ""
    if num_classes < found:
        raise DataError(f"data.num_classes={num_classes}, but the data has {found} classes{listed}; set "
                        f"data.num_classes={found}, or data.num_classes=null to count the class folders")
    if num_classes > found:
        print(f"[data] note: data.num_classes={num_classes}, but the data has {found} classes{listed}; "
              f"{num_classes - found} classifier outputs stay unused", flush=True)
