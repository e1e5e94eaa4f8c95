"""Bad input gives a short message that names the problem and the fix, never a stack trace,
and loses nothing: data, configs, non-finite losses, full disks, failing sweep jobs."""

from __future__ import annotations

import csv
import errno
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config, ended_epoch, imported
from in_process import run_here
from PIL import Image

import byol.core.checkpoint as ckpt
from byol.core.backbone import Encoder
from byol.core.checkpoint import safe_load
from byol.core.data import IndexBatches, load_cifar10, make_synthetic
from byol.core.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from byol.core.image_folder import load_image_folder
from byol.core.model import BYOL
from byol.jobs.cli import command_line_keys, run_job
from byol.jobs.datasets import eval_splits, load_split
from byol.jobs.pretrain import pretrain

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def rgb(h: int, w: int, color=(200, 30, 60)) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (h, w, 3)).copy()


def image_tree(root: Path, classes=("cat", "dog"), n=2, split="train") -> Path:
    for c in classes:
        for i in range(n):
            save_png(root / split / c / f"{i}.png", rgb(32, 32, (i * 50, 100, 150)))
    return root


def folder_cfg(root: Path, **kw) -> dict:
    return {"name": "imagefolder", "root": str(root), "image_size": 32, "cache_dir": None, **kw}


def cli(*args: str, script: str = "train.py") -> subprocess.CompletedProcess:
    """The command's status and output: in this process, but a new one where it is asked what it imports."""
    if "-X" not in args:
        return run_here(*([script] if script else []), *args, env=ENV)
    return subprocess.run([sys.executable, *([script] if script else []), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def checked_line(argv: list[str], config_name: str) -> str:
    """The one line and status 1 of the command-line check the scripts make before Hydra starts, in this process."""
    import contextlib
    import io

    from byol.jobs.command_line import check_command_line

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        check_command_line(argv, config_name)
    assert exit_.value.code == 1 and stderr.getvalue().count("\n") == 1, stderr.getvalue()
    return stderr.getvalue().strip()


def error_line(result: subprocess.CompletedProcess) -> str:
    """The process failed with status 1 and one ``error:`` line on stderr, without a traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


# --------------------------------------------------------------------------- data


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError) as err:
        load_split(folder_cfg(tmp_path / "nope"), "train")
    assert f"data.root '{tmp_path / 'nope'}' does not exist" in str(err.value)
    assert "DIR/train/<class>/*" in str(err.value)


@pytest.mark.parametrize("root", ["???", None, ""])
def test_imagefolder_without_a_root_asks_for_one(root):
    """data=imagefolder's root is the placeholder ??? until given: say what to give, not that '???' is missing."""
    with pytest.raises(DataError, match=r"^data=imagefolder needs its folder: data.root=DIR, laid out as "):
        load_split({"name": "imagefolder", "root": root}, "train")


def test_empty_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=f"no images found in '{tmp_path}'"):
        load_split(folder_cfg(tmp_path), "train")
    (tmp_path / "train" / "cat").mkdir(parents=True)  # class folders without images
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images found in .*train"):
        load_split(folder_cfg(tmp_path), "train")
    with pytest.raises(DataError, match="no 'test' folder"):
        load_split(folder_cfg(image_tree(tmp_path)), "test")


@pytest.mark.parametrize("present", [(), ("test",), ("train",)])
def test_evaluation_folder_without_train_or_test_is_refused_before_decoding(tmp_path, present, capsys):
    """Pretraining takes a plain folder of class folders as its training set; evaluation must not (test/
    would become a class), and says so before decoding the images it will not use."""
    for split in present:
        image_tree(tmp_path, split=split)
    if not present:  # class folders at the top: a training set for pretraining
        image_tree(tmp_path, split=".")
    missing = [s for s in ("train", "test") if s not in present]
    with pytest.raises(DataError) as err:
        eval_splits(folder_cfg(tmp_path), {"name": "holdout", "val_size": 2})
    assert str(err.value).startswith(f"no {' and no '.join(repr(m) for m in missing)} folder in '{tmp_path}'")
    assert "decoding" not in capsys.readouterr().out
    flat = (f"It holds 2 class folder(s) itself (cat, dog), the layout pretraining takes: an evaluation needs "
            f"held-out test images, so move part of each class's images (a fifth, say) into {tmp_path}/test/<class>/")
    assert (flat in str(err.value)) == (not present)  # the flat layout is told how to split; a half-split one not
    assert ("class folder(s) itself" in str(err.value)) == (not present)  # its test/ or train/ is not a class


def test_a_flat_evaluation_folder_is_told_how_to_split_its_class_folders(tmp_path):
    """The hint counts and names the class folders only: not a file or a hidden folder beside them (a notebook's
    checkpoints, a cache), four names at most; a data.root that is a file gets the refusal without a hint."""
    from byol.jobs.datasets import missing_split_folders

    for name in ("bird", "cat", "cow", "dog", "eel", ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.txt").write_text("not a class")
    assert str(missing_split_folders(tmp_path, ["train", "test"])) == (
        f"no 'train' and no 'test' folder in '{tmp_path}'; evaluation needs {tmp_path}/train/<class>/* and "
        f"{tmp_path}/test/<class>/* (the same class folders in both). It holds 5 class folder(s) itself (bird, cat, "
        f"cow, dog, ...), the layout pretraining takes: an evaluation needs held-out test images, so move part of "
        f"each class's images (a fifth, say) into {tmp_path}/test/<class>/ and the rest into "
        f"{tmp_path}/train/<class>/")
    assert str(missing_split_folders(tmp_path / "README.txt", ["train", "test"])).endswith("(the same class "
                                                                                             "folders in both)")


def test_corrupt_image_is_named_or_skipped(tmp_path):
    image_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    truncated = tmp_path / "train" / "cat" / "cut.png"
    whole = save_png(tmp_path / "whole.png", rgb(32, 32)).read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "train")
    message = str(err.value)
    assert ("broken.png" in message or "cut.png" in message) and "data.skip_bad_files=true" in message
    with pytest.warns(UserWarning) as caught:
        data = load_image_folder(tmp_path / "train", skip_bad_files=True)
    assert len(data) == 4 and data.labels.tolist() == [0, 0, 1, 1]
    skipped = sorted(str(w.message).split(":")[0] for w in caught if "skipping unreadable" in str(w.message))
    assert skipped == [f"skipping unreadable image {truncated}", f"skipping unreadable image {bad}"]
    bad.unlink(), truncated.unlink()  # the images kept are those of the folder without the two files
    assert torch.equal(data.images, load_image_folder(tmp_path / "train").images) and data.images.shape[0] == 4


def test_odd_images_are_converted(tmp_path):
    """Grayscale, 16-bit grayscale, RGBA, palette and non-square images become (3, 32, 32) uint8."""
    folder = tmp_path / "train" / "x"
    save_png(folder / "gray.png", np.full((32, 32), 77, np.uint8), "L")
    save_png(folder / "gray16.png", np.full((20, 20), 65535 // 2, np.uint16))  # mid-gray, not white
    rgba = np.dstack([rgb(32, 32, (10, 200, 30)), np.full((32, 32), 0, np.uint8)])
    save_png(folder / "rgba.png", rgba, "RGBA")
    palette = Image.new("P", (32, 32), 1)  # every pixel: palette entry 1
    palette.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    palette.save(folder / "palette.png")
    # 64x48, left half red, right half blue: resized (short side 32) and centre-cropped
    wide = np.concatenate([rgb(48, 32, (255, 0, 0)), rgb(48, 32, (0, 0, 255))], axis=1)
    save_png(folder / "wide.png", wide)
    data = load_image_folder(tmp_path / "train")
    assert data.images.shape == (5, 3, 32, 32) and data.images.dtype == torch.uint8
    by_name = dict(zip(["gray", "gray16", "palette", "rgba", "wide"], data.images, strict=True))
    assert (by_name["gray"] == 77).all()
    assert (by_name["gray16"] - 127).abs().max() <= 1
    assert by_name["rgba"][:, 0, 0].tolist() == [10, 200, 30]  # colour kept, alpha dropped
    assert by_name["palette"][:, 5, 5].tolist() == [12, 34, 56]
    w = by_name["wide"].int()
    assert w[0, :, :8].min() > 200 and w[2, :, :8].max() < 50  # left stays red
    assert w[2, :, -8:].min() > 200 and w[0, :, -8:].max() < 50  # right stays blue


def test_32_bit_integer_images_keep_their_8_bit_values(tmp_path):
    """Pillow's mode "I" holds 16-bit PNGs and also 8-bit values a program stored as 32-bit integers (a TIFF):
    those were divided by 257 as if 16-bit, nearly black (values 6-215 read as 0-1), silently."""
    folder = tmp_path / "train" / "x"
    folder.mkdir(parents=True)
    ramp = np.tile(np.linspace(6, 215, 32).astype(np.uint8), (32, 1))
    Image.fromarray(ramp, "L").convert("I").save(folder / "i32.tif")
    Image.fromarray(ramp.astype(np.int32) * 257, "I").save(folder / "i32_16bit.tif")  # 16-bit values in "I"
    data = load_image_folder(tmp_path / "train")
    for image in data.images:
        assert (image.int() - torch.from_numpy(ramp).int()).abs().max() <= 1


def test_16_bit_values_map_to_8_bits_as_exactly_as_in_float64_and_a_float_image_of_nan_is_named(tmp_path):
    """The 16-bit conversion works in float32 now (float64 and a copy per step took 3.3x an RGB image's memory):
    every one of the 65,536 values maps as the float64 division did. A float TIFF of NaN decoded as black with an
    anonymous numpy warning; it is refused naming the file."""
    from byol.core.image_folder import _to_rgb

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    rgb8 = np.asarray(_to_rgb(Image.fromarray(values)))
    assert rgb8.shape == (256, 256, 3) and (rgb8 == rgb8[..., :1]).all()
    assert np.array_equal(rgb8[..., 0], np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    folder = tmp_path / "train" / "x"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 0.5, np.float32), "F").save(folder / "half.tif")
    nan = np.full((32, 32), 0.5, np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan, "F").save(folder / "nan.tif")
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "train")
    assert f"{folder / 'nan.tif'}" in str(err.value) and "its F pixels hold NaN or infinite values" in str(err.value)


def test_train_and_test_classes_differ(tmp_path):
    image_tree(tmp_path, ("cat", "dog"), split="train")
    image_tree(tmp_path, ("cat", "fox"), split="test")
    with pytest.raises(DataError) as err:
        eval_splits(folder_cfg(tmp_path), {"name": "holdout", "val_size": 0})
    assert "only in train: ['dog']; only in test: ['fox']" in str(err.value)


def test_cifar10_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    root = tmp_path / "cifar"
    with pytest.raises(DataError) as err:
        load_cifar10(str(root), train=True, download=True)
    message = str(err.value)
    assert f"could not load CIFAR-10 from '{root}'" in message
    assert "internet access" in message and "data=imagefolder data.root=DIR" in message
    assert not list(root.rglob("*.tar.gz"))  # no half-downloaded archive left to trip the next run
    with pytest.raises(DataError, match="set data.download=true"):
        load_cifar10(str(root), train=True, download=False)


def test_batch_larger_than_dataset():
    with pytest.raises(DataError) as err:
        IndexBatches(make_synthetic(10), 16)
    assert "data.batch_size=16 is larger than the dataset (10 images)" in str(err.value)
    assert "at most 10" in str(err.value)


def test_unknown_tap_and_backbone():
    with pytest.raises(ConfigError) as err:
        Encoder("resnet18", "cifar", taps=["layer9.0"])
    assert "unknown tap 'layer9.0' for resnet18" in str(err.value) and "layer2.0" in str(err.value)
    with pytest.raises(ConfigError, match="unknown backbone.name 'resnet9'; choose one of: resnet18"):
        Encoder("resnet9")
    with pytest.raises(ConfigError, match="unknown backbone.stem"):
        Encoder("resnet18", "tiny")


class _Missing:
    """Lightning's availability flag for a package that is not installed."""

    def __bool__(self):
        return False

    def __str__(self):
        return "Requirement 'wandb>=0.12.10' not met."


def test_an_evaluation_with_a_logger_without_its_package_is_refused_before_its_folder_changes(tmp_path, monkeypatch):
    """evaluate.py logger=wandb without wandb failed only once the data and the models were loaded, after an earlier
    result in the folder had been set aside (train.py refused it first): now before either."""
    import importlib.util

    from byol.jobs import evaluate as job

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    run = tmp_path / "ev"
    run.mkdir()
    (run / "results.json").write_text('{"test_acc": 0.5}')
    cfg = compose_config("evaluate", ["pretrained=random", "preset=smoke", "eval=knn", "logger=wandb"], run)
    with pytest.raises(ConfigError, match=re.escape("WandbLogger cannot start (No module named 'wandb')")):
        job.evaluate(cfg, run)
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]


def test_logger_without_its_package_names_the_extra_and_the_fallback(tmp_path, monkeypatch):
    """A package not installed is found before the data is decoded (looked for, not imported); one Lightning
    finds too old when it starts the logger, before training."""
    import importlib.util

    import pytorch_lightning.loggers.wandb as lightning_wandb

    from byol.jobs import pretrain as job

    find_spec = importlib.util.find_spec
    installed = {"wandb": None}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: installed.get(name, find_spec(name, *a)))
    monkeypatch.setattr(job, "training_data", lambda config: pytest.fail("the data was read"))
    cfg = compose_config("train", ["experiment=smoke", "logger=wandb"], tmp_path)
    with pytest.raises(ConfigError) as err:
        pretrain(cfg, tmp_path / "run")
    assert str(err.value) == ("WandbLogger cannot start (No module named 'wandb'); "
                              'pip install -e ".[wandb]", or log to metrics.csv only with logger=csv')
    monkeypatch.undo()
    installed = {"wandb": find_spec("json")}  # there, but not the version Lightning asks for
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: installed.get(name, find_spec(name, *a)))
    monkeypatch.setattr(lightning_wandb, "_WANDB_AVAILABLE", _Missing())
    with pytest.raises(ConfigError) as err:
        pretrain(cfg, tmp_path / "run")
    assert str(err.value) == ("WandbLogger cannot start (Requirement 'wandb>=0.12.10' not met.); "
                              'pip install -e ".[wandb]", or log to metrics.csv only with logger=csv')
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training


@pytest.mark.parametrize("overrides, expected", [
    (["loss=multi", "loss.taps=[layer9.0]"], "loss.taps: unknown tap 'layer9.0' for resnet18"),
    (["monitor.taps=[layer2.9]"], "monitor.taps: unknown tap 'layer2.9' for resnet18"),  # the setting named
    (["backbone.name=resnet9"], "unknown backbone.name 'resnet9'"),
    (["+backbone.grids={layer9: 2}"], "backbone.grids names 'layer9', which is no module of resnet18")])
def test_a_misspelt_network_setting_is_refused_before_the_training_images_are_read(tmp_path, monkeypatch,
                                                                                  overrides, expected):
    """The first decode of a large folder takes minutes: a typo in a tap or the backbone is said before it
    (the networks are built on the meta device first), not after."""
    from byol.jobs import pretrain as job

    monkeypatch.setattr(job, "training_data", lambda config: pytest.fail("the data was read"))
    cfg = compose_config("train", ["experiment=smoke", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        pretrain(cfg, tmp_path / "run")


# --------------------------------------------------------------------------- errors inside a run


def smoke_cfg(tmp_path, *overrides):
    base = ["experiment=smoke", "trainer.precision=32-true", "data.num_train=64", "data.batch_size=16",
            "trainer.max_epochs=2", "checkpoint.last_every_n_steps=1", "trainer.log_every_n_steps=1"]
    return compose_config("train", [*base, *overrides], tmp_path)


def finite(path: Path) -> bool:
    state = safe_load(path)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.fixture
def nan_at(monkeypatch):
    """Make the loss NaN from the ``first``-th forward pass on (``only``: that pass alone)."""

    def install(first: int, only: bool = False):
        calls = {"n": 0}
        forward = BYOL.forward

        def poisoned(self, view1, view2):
            out = forward(self, view1, view2)
            calls["n"] += 1
            if calls["n"] - 1 == first or (calls["n"] - 1 > first and not only):
                out = {k: v * float("nan") for k, v in out.items()}
            return out

        monkeypatch.setattr(BYOL, "forward", poisoned)

    return install


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_last_good_checkpoint(tmp_path, nan_at):
    nan_at(5)  # steps 0-4 are fine
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(smoke_cfg(tmp_path), run)
    last = run / "checkpoints" / "last.ckpt"
    assert str(err.value).startswith(f"loss became NaN/inf at optimizer step 5 (counted from 0); the last "
                                     f"good checkpoint is {last}, saved after 5 steps.")
    assert "train.on_nonfinite=skip" in str(err.value)
    assert safe_load(last)["global_step"] == 5 and finite(last)  # NaN weights never replaced it
    assert not (run / "encoder.pt").exists()  # stopped: nothing claims to be the end of the run
    assert (run / "curves.png").is_file()  # the curves up to the failure, where it went wrong


@pytest.mark.slow
def test_nan_loss_skip_leaves_the_step_out(tmp_path, nan_at, monkeypatch, capsys):
    nan_at(5, only=True)
    seen = {}
    step = BYOL.forward

    def watch(self, view1, view2):  # state of every network before each forward pass
        seen.setdefault("states", []).append({k: v.clone() for k, v in self.state_dict().items()})
        return step(self, view1, view2)

    monkeypatch.setattr(BYOL, "forward", watch)
    run = tmp_path / "run"
    pretrain(smoke_cfg(tmp_path, "train.on_nonfinite=skip"), run)
    out = capsys.readouterr().out
    assert "non-finite loss at step 5; skipping this step (1 skipped so far)" in out
    assert re.search(r"^\[byol\] epoch 2/2: loss [0-9.]+ \(avgpool [0-9.]+\), 1 non-finite step skipped, std ", out,
                     flags=re.MULTILINE), out
    with open(run / "metrics.csv", newline="") as f:  # the epochs whose points stand on fewer steps
        skipped = [r["train/skipped_steps_epoch"] for r in csv.DictReader(f) if r["train/loss_epoch"]]
    assert skipped == ["0.0", "1.0"]
    before, after = seen["states"][5], seen["states"][6]
    # no optimizer step, no EMA step, BatchNorm statistics restored: the skipped batch left no trace
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(seen["states"][4][k], before[k]) for k in before)  # other steps do train
    final = run / "checkpoints" / "last.ckpt"  # the final state
    assert finite(final) and safe_load(final)["global_step"] == 8


@pytest.mark.parametrize("skip", [False, True])
def test_nan_weights_advise_skipping_only_where_it_is_not_already_on(tmp_path, skip):
    """With train.on_nonfinite=skip set, the error still said "or set train.on_nonfinite=skip": skipping looks
    at the loss, which was finite; the update was not."""
    from byol.jobs.config_check import plain_config
    from byol.jobs.pretrain_fit import build_module

    overrides = ["train.on_nonfinite=skip"] if skip else []
    module = build_module(plain_config(smoke_cfg(tmp_path, *overrides)))
    with torch.no_grad():
        next(module.model.online_encoder.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError) as err:
        module.on_save_checkpoint({})
    assert str(err.value).startswith("weights became NaN/inf by optimizer step 0; nothing was saved")
    assert ("or set train.on_nonfinite=skip" in str(err.value)) is not skip
    assert ("these losses were finite, an update was not" in str(err.value)) is skip


@pytest.mark.slow
def test_an_epoch_whose_every_step_was_skipped_says_so(tmp_path, nan_at, capsys):
    """Its epoch line read "loss nan (), std nan": no mean to show, and no word of why."""
    nan_at(4)  # every step of the second epoch
    pretrain(smoke_cfg(tmp_path, "train.on_nonfinite=skip"), tmp_path / "run")
    out = capsys.readouterr().out
    assert "[byol] epoch 2/2: loss n/a (all 4 steps non-finite, skipped), std nan" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("bad", [2, 3])  # the first or the last micro-batch of the second window
def test_nan_loss_skip_with_accumulation_leaves_the_whole_window_out(tmp_path, nan_at, monkeypatch, capsys, bad):
    """With trainer.accumulate_grad_batches=2, a skipped micro-batch skips its window's optimizer step and
    EMA: stepping on the other micro-batch's gradient alone was half a step (its loss is halved)."""
    nan_at(bad, only=True)
    seen = []
    step = BYOL.forward

    def watch(self, view1, view2):  # the weights (online and target) before each forward pass
        seen.append({k: v.detach().clone() for k, v in self.named_parameters()})
        return step(self, view1, view2)

    monkeypatch.setattr(BYOL, "forward", watch)
    run = tmp_path / "run"
    pretrain(smoke_cfg(tmp_path, "train.on_nonfinite=skip", "trainer.accumulate_grad_batches=2"), run)
    assert "skipping this step (1 skipped so far)" in capsys.readouterr().out
    unchanged = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen, seen[1:], strict=False)]
    # within a window nothing changes; at the end of windows 1, 3 and 4 the weights change; window 2 applied nothing
    assert unchanged == [True, False, True, True, True, False, True]
    assert safe_load(run / "checkpoints" / "last.ckpt")["global_step"] == 4


@pytest.mark.slow
def test_disk_full_during_training_keeps_last_checkpoint(tmp_path, monkeypatch):
    write, saves = ckpt.atomic_write, []

    def fills_up(path, writer):  # the third last.ckpt finds the disk full halfway through
        saves.append(Path(path).name)
        if saves.count("last.ckpt") < 3 or Path(path).name != "last.ckpt":
            return write(path, writer)

        def half(f):
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return write(path, half)

    monkeypatch.setattr(ckpt, "atomic_write", fills_up)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:  # raised inside Lightning's fit, not wrapped
        pretrain(smoke_cfg(tmp_path), run)
    last = run / "checkpoints" / "last.ckpt"
    assert str(err.value).startswith(f"could not write '{last}' (No space left on device); the previous file")
    monkeypatch.undo()
    assert safe_load(last)["global_step"] == 2 and finite(last)
    assert not [p for p in last.parent.iterdir() if p.name != "last.ckpt"]  # no temporary files


# --------------------------------------------------------------------------- the command line


CLI_CASES = {
    "missing folder": (["data=imagefolder", "data.root={tmp}/nope"],
                       "error: data.root '{tmp}/nope' does not exist"),
    "empty folder": (["data=imagefolder", "data.root={tmp}/empty"],
                     "error: no images found in '{tmp}/empty'"),
    "corrupt image": (["data=imagefolder", "data.root={tmp}/bad", "data.cache_dir=null"],
                      "error: cannot read image '{tmp}/bad/train/dog/broken.png'"),
    "cifar10 not there": (["data=cifar10", "data.root={tmp}/cifar", "data.download=false"],
                          "error: could not load CIFAR-10 from '{tmp}/cifar'"),
    "batch too large": (["data.batch_size=1000"], "error: data.batch_size=1000 is larger than the dataset"),
    "unknown tap": (["loss=multi", "loss.taps=[layer9.0]"], "error: loss.taps: unknown tap 'layer9.0' for resnet18"),
    "unknown backbone": (["backbone.name=resnet9"], "error: unknown backbone.name 'resnet9'"),
    # names that would otherwise be ignored without a word (a misspelt head keeps weight 1.0, a grid
    # for no module pools nothing); braces doubled: these strings are str.format-ted
    "misspelt loss weight": (["loss=multi", "+loss.weights={{layer2: 0.5}}"],
                             "error: loss.weights names 'layer2', which is not a head of this run (heads: "
                             "avgpool, layer2.0, layer3.0)"),
    "weight of a head not trained": (["loss=classic", "+loss.weights={{layer2.0: 0.5}}"],
                                     "error: loss.weights names 'layer2.0', which is not a head"),
    "negative loss weight": (["loss=multi", "+loss.weights={{layer2.0: -0.5}}"],
                             "error: loss.weights {{'layer2.0': -0.5}}: each weight must be a finite number >= 0"),
    "grid of no module": (["+backbone.grids={{layer9: 2}}"],
                          "error: backbone.grids names 'layer9', which is no module of resnet18"),
    "dotted name split": (["+backbone.grids.layer4.0=2"],
                          "error: refusing the command line: backbone.grids.layer4 = {{'0': 2}} must be a "
                          "number; a dotted module name goes inside braces: '+backbone.grids={{layer4.0: ...}}'"),
    # lr 1e30: huge (finite) weights after step 0, a NaN loss at step 1 (or NaN weights, when they overflow)
    "nan loss": (["optim.base_lr=1e30", "trainer.precision=32-true", "checkpoint.last_every_n_steps=1"],
                 ("error: loss became NaN/inf at optimizer step 1 (counted from 0); the last good checkpoint "
                  "is {tmp}/run/checkpoints/last.ckpt, saved after 1 step.",
                  "error: weights became NaN/inf")),
}


def make_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    image_tree(tmp_path / "bad")
    (tmp_path / "bad" / "train" / "dog" / "broken.png").write_bytes(b"not a png")


@pytest.mark.parametrize("case", [c for c in CLI_CASES if c != "nan loss"])
def test_job_errors_are_one_line(tmp_path, case, capsys):
    """What train.py's job does with each bad input, in this process (the subprocess tests
    below check the same path through Hydra, status and stderr included)."""
    make_inputs(tmp_path)
    overrides, expected = CLI_CASES[case]
    run = tmp_path / "run"
    run.mkdir()  # Hydra creates it before the job starts
    cfg = compose_config("train", ["experiment=smoke", *(o.format(tmp=tmp_path) for o in overrides)], run)
    with pytest.raises(SystemExit) as exit_:
        run_job(pretrain, cfg, requested=command_line_keys())
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert err.startswith(expected.format(tmp=tmp_path))
    assert (run / "FAILED").read_text().strip() == err.strip()[len("error: "):]


@pytest.mark.parametrize("skip", [False, True])
def test_a_file_name_that_is_not_utf8_is_named_escaped_on_a_strict_console(tmp_path, monkeypatch, skip):
    """A file whose name's bytes are not UTF-8 (Python holds them as lone surrogates) is named with its bytes
    escaped, on the console, in the log and in FAILED: on a console with strict errors (a UTF-8 locale) the
    error line itself, and with data.skip_bad_files the skip warning, raised UnicodeEncodeError."""
    import io

    image_tree(tmp_path / "bad")
    bad = tmp_path / "bad" / "train" / "dog" / os.fsdecode(b"broken\xff.png")
    bad.write_bytes(b"not a png")
    consoles = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict") for _ in range(2)]
    monkeypatch.setattr(sys, "stdout", consoles[0])
    monkeypatch.setattr(sys, "stderr", consoles[1])
    run = tmp_path / "run"
    run.mkdir()
    overrides = ["experiment=smoke", "data=imagefolder", f"data.root={tmp_path / 'bad'}", "data.cache_dir=null",
                 f"data.skip_bad_files={str(skip).lower()}", "data.batch_size=2", "trainer.max_epochs=1",
                 "monitor=off"]
    cfg = compose_config("train", overrides, run)
    if skip:  # the warning printed as outside pytest, which records warnings instead
        monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None,
                            line=None: sys.stderr.write(warnings.formatwarning(message, category, filename, lineno)))
        run_job(pretrain, cfg, requested=command_line_keys())
        consoles[1].flush()
        assert "warning: skipping unreadable image " in consoles[1].buffer.getvalue().decode()
        assert "broken\\xff.png" in consoles[1].buffer.getvalue().decode()  # as `ls -b` and the report
        assert (run / "encoder.pt").is_file()
        return
    with pytest.raises(SystemExit) as exit_:
        run_job(pretrain, cfg, requested=command_line_keys())
    assert exit_.value.code == 1
    consoles[1].flush()
    err = consoles[1].buffer.getvalue().decode()
    line = f"error: cannot read image '{tmp_path}/bad/train/dog/broken\\xff.png'"
    assert line in err and "Traceback" not in err
    assert [line in log.read_text() for log in run.glob("*.log")] == [True]  # the job's log
    assert (run / "FAILED").read_text().startswith(line[len("error: "):])


def test_control_characters_of_a_name_reach_the_console_and_the_log_escaped(tmp_path, monkeypatch):
    """A class folder named with escape sequences set the terminal's title and cleared its screen when the note
    naming it was printed (a terminal may also let such a sequence write the clipboard); a bidirectional override
    shows a name reversed. Both consoles and the job's log now show them escaped; what progress bars and plain
    text need (tab, newline, carriage return, tqdm's cursor-up, any letters) passes as it is."""
    import io

    from byol.jobs.console import console_copied_to, neutralized

    name = "x\x1b]0;PWNED\x07\x1b[2J\u202egpj.exe\x9b"
    assert neutralized(name) == "x\\x1b]0;PWNED\\x07\\x1b[2J\\u202egpj.exe\\x9b"
    plain = "tab\there\nnext line, a bar\r\x1b[A, été 日本"
    assert neutralized(plain) == plain
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with console_copied_to(tmp_path / "job.log"):
        print(f"[data] note: class folders without images: '{name}'")
    print(f"error: '{name}'", file=sys.stderr)  # a job's last line, printed after its console is closed
    out.flush()
    err.flush()
    shown = out.buffer.getvalue().decode() + err.buffer.getvalue().decode() + (tmp_path / "job.log").read_text()
    assert not {"\x1b", "\x07", "\u202e", "\x9b"} & set(shown)
    assert shown.count("'x\\x1b]0;PWNED\\x07\\x1b[2J\\u202egpj.exe\\x9b'") == 3


@pytest.mark.parametrize("errors", ["strict", "backslashreplace"])
def test_a_folder_name_that_is_not_utf8_is_escaped_in_the_first_error_line(tmp_path, monkeypatch, errors):
    """The command line's own refusal (before Hydra or the job's console) names a folder with its bytes escaped:
    under LANG=C stderr's backslashreplace wrote e\\udcff1, and a strict console raised UnicodeEncodeError."""
    import io

    from byol.jobs.command_line import run_script

    console = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stderr", console)
    odd = os.fsdecode(b"/tmp/e\xff1")
    monkeypatch.setattr(sys, "argv", ["train.py", f"hydra.run.dir={odd}"])
    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: pytest.fail("Hydra's main ran"), "train")
    console.flush()
    assert exit_.value.code != 0
    assert "hydra.run.dir=/tmp/e\\xff1 " in console.buffer.getvalue().decode(), console.buffer.getvalue()


def test_a_path_too_long_for_the_system_is_one_line_from_the_command_line_and_from_the_job(tmp_path, monkeypatch,
                                                                                            capsys):
    """A path the system refuses to look at (ENAMETOOLONG: a name over 255 bytes), on the command line (resume=,
    checked before Hydra) or reaching the job (data.root, or the one in a handed-in run's config.yaml), ended in
    an OSError traceback. One line now, the path shortened, FAILED written as for any refusal."""
    from byol.jobs.command_line import run_script

    long = str(tmp_path / ("b" * 300))
    monkeypatch.setattr(sys, "argv", ["train.py", "experiment=smoke", f"resume={long}"])
    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: pytest.fail("Hydra's main ran"), "train")
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: a path is longer than this system allows (File name too long: '")
    assert f"...{'b' * 30}', {len(long):,} characters; a name may have 255 bytes" in err and long not in err
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_config("train", ["experiment=smoke", "data=imagefolder", f"data.root={long}"], run)
    with pytest.raises(SystemExit) as exit_:
        run_job(pretrain, cfg, requested=command_line_keys())
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "error: a path is longer than this system allows" in err
    assert (run / "FAILED").read_text().startswith("a path is longer than this system allows")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["corrupt image", "nan loss"])
def test_command_line_errors_are_one_line(tmp_path, case):
    make_inputs(tmp_path)
    overrides, expected = CLI_CASES[case]
    run = tmp_path / "run"
    result = cli("-X", "importtime", "train.py", "experiment=smoke", *(o.format(tmp=tmp_path) for o in overrides),
                 f"hydra.run.dir={run}", script="")
    # the training images are checked before Lightning loads (seconds on a slow day); a NaN needs training
    assert imported(result.stderr, "pytorch_lightning") == (case == "nan loss")
    expected = (expected,) if isinstance(expected, str) else expected
    assert error_line(result).startswith(tuple(e.format(tmp=tmp_path) for e in expected))
    assert (run / "FAILED").read_text().strip() == error_line(result)[len("error: "):]
    assert not list(run.rglob("*.ckpt")) or all(finite(p) for p in run.rglob("*.ckpt"))


def test_an_empty_resume_and_a_folder_named_by_a_number_are_one_line_before_hydra(tmp_path):
    """``resume=`` (an unset shell variable) started a new run without a word, the 200-epoch CIFAR-10 one without
    an experiment; ``data.root=2024`` (a folder named by a year) reached Path() as an int, a TypeError traceback,
    and so did a run's config.yaml with ``root: 2024``."""
    from byol.jobs.datasets import data_root

    assert checked_line(["experiment=smoke", "resume="], "train") == (
        "error: resume= is empty (an unset shell variable?); give a run folder or a checkpoint to continue, or "
        "leave resume= out to start a new run")
    assert checked_line(["experiment=smoke", "data=imagefolder", "data.root=2024"], "train") == (
        "error: data.root=2024 reads as a number, not a folder's name; quote it: \"data.root='2024'\"")
    assert checked_line(["experiment=smoke", "data.cache_dir=77"], "train").startswith("error: data.cache_dir=77 ")
    assert checked_line(["pretrained=random", "outputs_dir=5"], "evaluate").startswith("error: outputs_dir=5 ")
    with pytest.raises(DataError, match=re.escape("data.root is the number 2024, not a folder's path")):
        data_root({"name": "imagefolder", "root": 2024})
    assert data_root({"name": "imagefolder", "root": "2024"}) == "2024"


def test_removing_a_setting_the_job_reads_is_one_line_and_removing_what_it_does_without_is_let_through():
    """``~seed``, ``~data``, ``~trainer.max_epochs`` (train.py) or ``~repr`` (evaluate.py) ended in a KeyError
    traceback once the job read the setting; refused before Hydra starts now. An optional group (``~logger``), an
    optimizer's keyword argument, a view's own augmentation setting and a key no config defines are not refused."""
    from byol.jobs.command_values import removed_setting

    assert checked_line(["experiment=smoke", "~seed"], "train") == (
        "error: ~seed removes seed, which the job needs; change it instead (seed=VALUE), or leave it out to keep "
        "its default")
    for arg in ("~data", "~trainer.max_epochs", "~optim.scheduler", "~ema.tau_base", "~head", "~data.batch_size"):
        assert removed_setting(["experiment=smoke", arg], "train").startswith(f"error: {arg} removes "), arg
    for arg in ("~repr", "~eval", "~split", "~pretrained"):
        assert removed_setting(["pretrained=random", arg], "evaluate").startswith(f"error: {arg} removes "), arg
    for arg in ("~logger", "~optim.optimizer.momentum", "~augment.view2.solarize_p", "~loss.weights.layer2",
                "~trainer.detect_anomaly", "~experiment"):
        assert removed_setting(["experiment=smoke", arg], "train") is None, arg
    assert removed_setting(["pretrained=random", "~eval.optimizer.nesterov"], "evaluate") is None


@pytest.mark.slow
def test_an_unknown_config_key_is_one_line_and_a_misspelt_one_gets_the_setting_it_resembles():
    """Hydra's message for an unknown key advises appending it ("+data.bogus=1"), which the job then refuses:
    one line instead, naming what it resembles where something does (a key, or a group: expriment)."""
    result = cli("experiment=smoke", "data.bogus=1")
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Could not override" not in result.stderr
    assert error_line(result) == ("error: data.bogus is not a setting (python train.py --cfg job prints every "
                                  "setting, --help the groups)")
    # the same check as the scripts make it before Hydra starts (two of them end to end, above and below)
    assert checked_line(["experiment=smoke", "data.bach_size=64"], "train") == (
        "error: data.bach_size is not a setting; did you mean data.batch_size? (python train.py --cfg job prints "
        "every setting, --help the groups)")
    assert checked_line(["expriment=smoke"], "train").startswith(
        "error: expriment is not a setting; did you mean experiment?")
    assert "another Trainer argument: +trainer.detect_anomaly=VALUE" in checked_line(["trainer.detect_anomaly=true"],
                                                                                      "train")
    # a name Lightning's Trainer does not take: not advised with + (a second refusal followed), its likeness named
    assert checked_line(["trainer.foo=1"], "train").startswith(
        "error: trainer.foo is not a setting; nor is it an argument of Lightning's Trainer")
    # a Trainer argument named exactly is told as one, not as the config's look-alike (gradient_clip_val)
    assert "another Trainer argument: +trainer.gradient_clip_algorithm=VALUE" in checked_line(
        ["trainer.gradient_clip_algorithm=norm"], "train")
    assert "Trainer takes it, but the jobs set it themselves: choose loggers with the logger group" in checked_line(
        ["trainer.logger=false"], "train")
    assert checked_line(["trainer.detect_anomly=true"], "train").startswith(
        "error: trainer.detect_anomly is not a setting; did you mean trainer.detect_anomaly?")
    assert checked_line(["-m", "pretrained=random", "split.val_sise=0"], "evaluate").startswith(
        "error: split.val_sise is not a setting; did you mean split.val_size?")
    # a setting of another option of its group: Hydra would advise appending it, and the job would ignore it
    assert error_line(cli("-m", "pretrained=random", "eval=linear,knn", "eval.epochs=5", script="evaluate.py")) == (
        "error: eval.epochs is a setting of eval=finetune or eval=linear, not of eval=knn (the sweep's job with "
        "eval=knn); choose eval=finetune or eval=linear, or leave eval.epochs out")


def test_a_data_setting_of_another_data_option_on_evaluate_says_how_to_set_it_over_the_runs_data(tmp_path):
    """evaluate.py composes data=cifar10 (for pretrained=random) and applies data.* keys to each run's own data
    settings: data.cache_dir (an image folder's) was Hydra's multi-line 'Could not override' error. One line,
    naming the ++ form that works; the ++ and + forms themselves, and data=imagefolder, pass."""
    from byol.jobs.command_line import check_command_line

    run = str(tmp_path / "run")
    assert checked_line([f"pretrained={run}", f"data.cache_dir={tmp_path}"], "evaluate") == (
        f"error: data.cache_dir is a setting of data=imagefolder, not of evaluate.py's default data=cifar10; to set "
        f"it over the runs' own data settings write ++data.cache_dir={tmp_path}, or choose data=imagefolder")
    for argv in ([f"pretrained={run}", f"++data.cache_dir={tmp_path}"],
                 [f"pretrained={run}", f"+data.cache_dir={tmp_path}"],
                 ["pretrained=random", "data=imagefolder", f"data.root={tmp_path}", f"data.cache_dir={tmp_path}"]):
        check_command_line(argv, "evaluate")  # no exit
    assert checked_line([f"data.cache_dir={tmp_path}"], "train").startswith(  # train.py: choose the option
        "error: data.cache_dir is a setting of data=imagefolder, not of data=cifar10; choose data=imagefolder")
    # a resumed run keeps its own data settings (data=imagefolder): the key goes over them, as in evaluate.py; the
    # message told to choose data=imagefolder, which replaced the run's whole data section
    assert checked_line([f"resume={run}", "data.storage=mmap"], "train") == (
        "error: data.storage is a setting of data=imagefolder, not of train.py's default data=cifar10; to set it over "
        "the resumed run's own data settings write ++data.storage=mmap, or choose data=imagefolder")
    from byol.jobs.command_line import setting_of_another_option

    assert setting_of_another_option([f"resume={run}", "++data.storage=mmap"], "train") is None


@pytest.mark.parametrize("argv, config_name, suggested", [
    (["data.bach_size=64"], "train", "data.batch_size"),
    (["seed=1", "optim.optimizer.momentun=0.9"], "train", "optim.optimizer.momentum"),
    (["dat.batch_size=3"], "train", "data.batch_size"),
    (["-m", "eval.lrr=0.1,0.2"], "evaluate", "eval.lr"),
    (["eval.lrr=0.1"], "train", None),  # train.py has no eval settings: Hydra's message
    (["data.bogus=1"], "train", ""),  # nothing close: the line names no setting
    (["+data.bach_size=1"], "train", None),  # appended on purpose: the job's own check names it
    (["++head.proj_dimm=1", "~ema.tau_bas"], "train", None),
    (["data.batch_size=64", "loss=multi", "hydra/launcher=joblib", "hydra.run.dir=/tmp/x"], "train", None),
    (["+loss.weights={layer2.0: 0.5}", "+augment.view1.saturation=0.2"],
     "train", None),  # keys under the per-view and per-tap dicts are the user's (Hydra advises +)
    (["augment.view2.solarise_p=0.3"], "train", "augment.view2.solarize_p"),  # a view takes the augment keys
    (["+augment.view1.saturaton=0.2"], "train", "augment.view1.saturation"),
    (["data.batch_size=[unclosed"], "train", None),  # a syntax error: Hydra's message
])
def test_a_misspelt_setting_is_named_with_the_one_it_resembles(argv, config_name, suggested):
    from byol.jobs.command_line import misspelt_key

    message = misspelt_key(argv, config_name)
    if suggested is None:
        assert message is None, message
    else:
        assert message is not None and (f"did you mean {suggested}?" in message if suggested else "mean" not in message)
        assert f"(python {config_name}.py --cfg job prints every setting, --help the groups)" in message


@pytest.mark.parametrize("argv", [["-m", "loss=classic,multi", "--cfg", "hydra"], ["--multirun", "--cfg=job"],
                                  ["--cfg", "job", "--info"], ["-m", "-c", "job"]])
def test_two_of_hydras_modes_at_once_are_one_line(argv, capsys):
    """-m with --cfg (to see a sweep's config) was Hydra's ValueError with its whole traceback."""
    from byol.jobs.command_line import check_command_line

    with pytest.raises(SystemExit) as exit_:
        check_command_line(argv, "train")
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and " cannot go together (Hydra runs one of " in err


def test_new_keys_of_an_open_mapping_without_a_plus_are_one_line():
    """loss.weights is empty in every config and backbone.grids holds layer2.0 and layer3.0: Hydra adds other keys
    only with a +, and said so in five lines. Keys the mapping holds, a + and an empty mapping go on."""
    from byol.jobs.command_line import open_dict_without_plus

    assert open_dict_without_plus(["loss=multi", "loss.weights={layer2.0: 0.5}"], "train") == (
        "error: loss.weights={layer2.0: 0.5} adds layer2.0 to loss.weights, which holds no such key: add keys with a "
        "+: '+loss.weights={layer2.0: 0.5}'")
    assert open_dict_without_plus(["loss.weights.layer2.0=0.5"], "train") == (  # braces: a dotted module name
        "error: loss.weights.layer2.0=0.5 adds layer2.0 to loss.weights, which holds no such key: add keys with a "
        "+: '+loss.weights={layer2.0: 0.5}'")
    assert open_dict_without_plus(["backbone.grids={layer1.0: 2, layer2.0: 2}"], "train").startswith(
        "error: backbone.grids={layer1.0: 2, layer2.0: 2} adds layer1.0 to backbone.grids")
    for fine in (["backbone.grids={layer2.0: 2}"], ["+loss.weights={avgpool: 2.0}"], ["loss.weights={}"],
                 ["++backbone.grids={layer1.0: 2}"], ["loss=multi"]):
        assert open_dict_without_plus(fine, "train") is None, fine


def test_one_of_hydras_modes_goes_on():
    from byol.jobs.command_line import more_than_one_mode

    for argv in (["-m", "seed=0,1"], ["--cfg", "job", "seed=1"], ["--info"], ["--help"], ["-m", "--help"]):
        assert more_than_one_mode(argv, "train") is None, argv


def test_a_sweep_jobs_folder_given_unquoted_gets_the_quoted_word():
    """Hydra read the '=' and ',' of ``0_loss=multi,seed=0`` as its own syntax: "mismatched input '='"."""
    from byol.jobs.command_values import unquoted_path

    job = "/o/multirun/train/t/0_loss=multi,seed=0"
    assert unquoted_path([f"resume={job}"]) == (
        f"error: Hydra cannot read resume={job} as written (a sweep job's folder holds '=' and ',', its own "
        f"syntax); quote it: \"resume='{job}'\"")
    assert unquoted_path([f"pretrained={job}", "eval=knn"]).endswith(f"quote it: \"pretrained='{job}'\"")
    assert unquoted_path([f"resume='{job}'"]) is None  # quoted: fine
    assert unquoted_path(["-m", "pretrained=/o/a,/o/b", "seed=0"]) is None  # a sweep over two folders


def test_an_empty_pretrained_stops_before_any_folder_is_made(tmp_path, capsys):
    """pretrained=$RUN with RUN unset evaluated every run below the current folder."""
    from byol.jobs.command_line import check_command_line

    with pytest.raises(SystemExit) as stop:
        check_command_line(["preset=smoke", "pretrained=", f"hydra.run.dir={tmp_path / 'ev'}"], "evaluate")
    assert stop.value.code == 1 and not (tmp_path / "ev").exists()
    assert capsys.readouterr().err.startswith("error: pretrained= is empty (an unset shell variable?)")


@pytest.mark.parametrize("argv, config_name, expected", [
    (["loss=mult"], "train", "error: loss=mult is not an option of loss (did you mean loss=multi?); choose one of: "
                             "classic, multi"),
    # options typed in capitals (difflib compares case-sensitively: no 'did you mean' was offered)
    (["eval=KNN"], "evaluate", "error: eval=KNN is not an option of eval (did you mean eval=knn?); choose one of: "
                               "embed, finetune, knn, linear"),
    (["data=CIFAR10"], "train", "error: data=CIFAR10 is not an option of data (did you mean data=cifar10?); choose "
                                "one of: cifar10, cifar100, imagefolder, stl10, synthetic"),
    (["loss=Multi"], "train", "error: loss=Multi is not an option of loss (did you mean loss=multi?); choose one of: "
                              "classic, multi"),
    (["-m", "loss=classic,mult", "seed=0,1"], "train", "error: loss=mult is not an option of loss"),
    (["logger=null"], "train", "error: logger=null is not an option of logger; choose one of: csv, tensorboard, "
                               "wandb ('~logger' removes it)"),
    (["experiment=seed"], "train", "error: experiment=seed is not an option of experiment (experiment=seed is now "
                                   "experiment=original)"),
    (["backbone=resnet34"], "train", "error: backbone=resnet34 is not an option of backbone (any torchvision "
                                     "ResNet is backbone.name=resnet34)"),
    # Hydra's own advice for experiment= in evaluate.py; it brought training settings into the evaluation
    (["+experiment=smoke"], "evaluate", "error: experiment=... does not apply here: experiments are pretraining "
                                        "settings"),
    (["eval=knn"], "train", "error: eval=... does not apply here: evaluation settings belong to evaluate.py"),
    # a key of the other script's group: Hydra's "Key 'repr' is not in struct" and its advice to append it
    (["repr.taps=[layer1.0]"], "train", "error: repr.taps=... does not apply here: representations are chosen at "
                                        "evaluation"),
    (["+optim.base_lr=3"], "evaluate", "error: optim.base_lr=... does not apply here: optim is a pretraining"),
    (["loss.taps=[]"], "evaluate", "error: loss.taps=... does not apply here: the loss is a pretraining setting"),
    (["hydra.run.dir=/tmp/x", "hydra.job.chdir=false", "data.root=/d", "eval.epochs=2"], "evaluate", None),
    (["experiment=null", "logger=[csv,tensorboard]", "'~logger'", "hydra/launcher=joblib", "loss=multi"], "train",
     None),
    (["-m", "eval=linear,finetune", "repr=avgpool,combined", "preset=smoke"], "evaluate", None),
])
def test_an_unknown_option_or_a_group_of_the_other_script_is_one_line(argv, config_name, expected):
    from byol.jobs.command_line import unknown_option

    check_line(unknown_option(argv, config_name), expected)


def check_line(message: str | None, expected: str | None) -> None:
    """``message`` is None where nothing is expected, else starts with ``expected``."""
    if expected is None:
        assert message is None, message
    else:
        assert message is not None and message.startswith(expected), message


@pytest.mark.parametrize("argv, config_name, expected", [
    (["eval=knn", "eval.epochs=5"], "evaluate",
     "error: eval.epochs is a setting of eval=finetune or eval=linear, not of eval=knn; choose eval=finetune or "
     "eval=linear, or leave eval.epochs out"),
    (["eval.k=3"], "evaluate", "error: eval.k is a setting of eval=knn, not of eval=linear;"),
    # appended, it would be accepted and ignored (or handed to an optimizer that has no such argument)
    (["optim=adam", "+optim.optimizer.eta=0.1"], "train",
     "error: optim.optimizer.eta is a setting of optim=lars, not of optim=adam;"),
    # a sweep is checked job by job before the first one runs
    (["-m", "eval=linear,knn", "repr=avgpool,combined", "eval.epochs=5"], "evaluate",
     "error: eval.epochs is a setting of eval=finetune or eval=linear, not of eval=knn (the sweep's job with "
     "eval=knn repr=avgpool);"),
    (["monitor=off", "monitor.k=50"], "train", "error: monitor.k is a setting of monitor=default, not of monitor=off;"),
    (["data.cache_dir=/c"], "train", "error: data.cache_dir is a setting of data=imagefolder, not of data=cifar10;"),
    # a preset adding eval.epochs does not make it a setting of knn
    (["preset=smoke", "eval=knn", "eval.epochs=3"], "evaluate", "error: eval.epochs is a setting of eval=finetune or "
                                                                "eval=linear, not of eval=knn;"),
    (["logger=[csv,wandb]", "logger.project=x"], "train", None),
    (["trainer=ddp", "trainer.accelerator=cpu"], "train", None),  # ddp builds on trainer=default's keys
    (["eval=knn", "eval.k=3"], "evaluate", None),
    (["data=imagefolder", "data.cache_dir=/c"], "train", None),
    (["experiment=smoke", "data.num_train=64"], "train", None),  # the experiment chose data=synthetic
    # evaluate.py's data.* keys apply to each run's own data settings, but Hydra composes data=cifar10 first
    (["data.cache_dir=/c"], "evaluate", "error: data.cache_dir is a setting of data=imagefolder, not of evaluate.py's "
                                        "default data=cifar10; to set it over the runs' own data settings write "
                                        "++data.cache_dir=/c, or choose data=imagefolder"),
    (["++data.cache_dir=/c"], "evaluate", None),
    (["monitor.k=3"], "evaluate", None),  # no monitor group there: Hydra's message
    (["eval=bogus", "eval.k=3"], "evaluate", None),  # an unknown option: Hydra's message
    (["-m", "eval=linear,finetune", "eval.epochs=5", "seed=range(0,3)"], "evaluate", None),
])
def test_a_setting_of_another_option_is_named_with_the_options_that_have_it(argv, config_name, expected):
    from byol.jobs.command_line import setting_of_another_option

    check_line(setting_of_another_option(argv, config_name), expected)


@pytest.mark.slow
def test_resume_of_a_crafted_checkpoint_runs_no_code(tmp_path):
    from test_checkpoint_io import malicious_checkpoint

    run, target = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    malicious_checkpoint(run / "checkpoints" / "last.ckpt", target, global_step=3)
    result = cli(f"resume={run}")
    assert error_line(result).startswith(f"error: refusing to load '{run}/checkpoints/last.ckpt'")
    assert not target.exists()


@pytest.mark.slow
def test_sweep_with_a_failing_job_finishes_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("-m", "experiment=smoke", "trainer.max_epochs=1", "loss=multi",
                 "loss.taps=[layer9.0],[layer2.0]", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    bad, good = sorted(sweep.glob("*_*"))
    assert bad.name.startswith("0_") and "layer9.0" in bad.name
    assert (bad / "FAILED").read_text().startswith("loss.taps: unknown tap 'layer9.0'")
    assert (good / "encoder.pt").is_file() and (good / "checkpoints" / "last.ckpt").is_file()
    assert not (good / "FAILED").exists()
    assert f"error: 1 of the 2 job(s) of the sweep in {sweep} failed (the others finished):" in result.stderr
    assert f"  {bad.name}: loss.taps: unknown tap 'layer9.0'" in result.stderr


# --------------------------------------------------------------------------- evaluation side


@pytest.mark.slow
def test_evaluate_without_pretraining_runs(tmp_path):
    result = cli("-X", "importtime", "evaluate.py", f"outputs_dir={tmp_path}", "data=synthetic",
                 f"hydra.run.dir={tmp_path / 'eval'}", script="")
    assert not imported(result.stderr, "pytorch_lightning")  # said before Lightning loads, as every settings check
    result.stderr = "\n".join(x for x in result.stderr.splitlines() if not x.startswith("import time:"))
    line = error_line(result)
    assert f"no pretraining runs found under '{tmp_path}'" in line and "python train.py" in line
    assert "pretrained=random" in line  # the way to evaluate without one


@pytest.mark.slow
def test_evaluate_a_checkpoint_of_another_architecture(tmp_path):
    from byol.core.checkpoint import save_encoder

    path = tmp_path / "encoder.pt"
    save_encoder(Encoder("resnet18", "cifar"), path)
    blob = torch.load(path, weights_only=True)
    blob["backbone"]["stem"] = "imagenet"  # header and weights disagree
    torch.save(blob, path)
    result = cli(f"pretrained={path}", "data=synthetic", "eval=knn", "baseline=false",
                 f"hydra.run.dir={tmp_path / 'eval'}", script="evaluate.py")
    line = error_line(result)
    assert f"'{path}' holds weights of another architecture" in line and "body.conv1.weight" in line


def epoch_line(capsys, means: dict) -> str:
    from types import SimpleNamespace

    from byol.lightning.epoch_output import EpochSummary

    module = SimpleNamespace(last_tau=lambda: 0.99,
                             epoch_means=lambda: {k: torch.tensor(v) for k, v in means.items()})
    trainer = SimpleNamespace(current_epoch=2, max_epochs=10, optimizers=[], callback_metrics={},
                              is_global_zero=True, world_size=1, **ended_epoch())
    summary = EpochSummary()
    summary.on_train_batch_end(trainer, module, None, (torch.zeros(8, 3, 4, 4), torch.zeros(8)), 0)
    summary.on_train_epoch_end(trainer, module)
    return capsys.readouterr().out


def test_collapse_is_reported_beside_a_low_loss(capsys):
    healthy = epoch_line(capsys, {"loss": 0.9, "loss/avgpool": 0.9, "std/avgpool": 0.8})
    assert "loss 0.9000 (avgpool 0.900), std 0.80" in healthy and "collapsed" not in healthy
    out = epoch_line(capsys, {"loss": 0.5, "loss/avgpool": 0.01, "loss/layer2.0": 0.49,
                              "std/avgpool": 0.004, "std/layer2.0": 0.7})
    assert "std 0.00" in out  # the smallest head's
    warning = next(line for line in out.splitlines() if "warning" in line)
    assert "collapsed (std/avgpool 0.004;" in warning and "layer2.0" not in warning
    assert "Adam" in warning and "optim.base_lr" in warning


def test_an_epoch_says_how_far_it_is_every_two_minutes_where_no_bar_is_drawn(capsys):
    """In a log file (a sweep, SLURM, a pipe) no progress bar is drawn, and a CPU epoch of the recipe took
    minutes without a line: a line every heartbeat seconds inside an epoch, none with a bar (heartbeat=None)."""
    from types import SimpleNamespace

    from byol.lightning.epoch_output import EpochSummary

    batch = (torch.zeros(8, 3, 4, 4), torch.zeros(8))
    trainer = SimpleNamespace(current_epoch=2, max_epochs=10, is_global_zero=True, world_size=2,
                              num_training_batches=100)
    times = iter([0.0, 0.0, 50.0, 130.0, 200.0, 260.0])  # start, epoch start, then one read per batch
    summary = EpochSummary(heartbeat=120.0, clock=lambda: next(times))
    summary.on_train_epoch_start(trainer, None)
    for idx in range(4):  # batches at 50, 130, 200 and 260 s
        summary.on_train_batch_end(trainer, None, None, batch, idx)
    assert capsys.readouterr().out.splitlines() == [
        "[byol] epoch 3/10: step 2 of 100 (2%), 0.2 images/s, about 1.8 h left in the epoch",
        "[byol] epoch 3/10: step 4 of 100 (4%), 0.2 images/s, about 1.7 h left in the epoch"]
    quiet = EpochSummary(clock=lambda: 1e6)  # a bar is drawn: the summary adds nothing inside the epoch
    quiet.on_train_batch_end(trainer, None, None, batch, 0)
    assert capsys.readouterr().out == ""


def test_a_precision_lightning_changes_is_said_in_one_line(tmp_path, capsys):
    """trainer.precision=16 on a CPU runs as bf16-mixed: the run's first lines said "(16)"."""
    from types import SimpleNamespace

    import torch

    from byol.jobs.pretrain import RunStart
    from byol.jobs.pretrain_fit import announce

    config = {"backbone": {"name": "resnet18", "stem": "imagenet", "width": 1.0}, "loss": {"taps": []},
              "data": {"batch_size": 32}, "trainer": {"max_epochs": 1, "precision": 16}}
    trainer = SimpleNamespace(world_size=1, precision="bf16-mixed", accumulate_grad_batches=1,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    batches = SimpleNamespace(data=[0] * 64)
    announce(config, tmp_path, trainer, RunStart(config), batches)
    out = capsys.readouterr().out
    assert "on cpu (bf16-mixed)" in out
    assert "[byol] note: trainer.precision=16 runs as bf16-mixed on cpu" in out
    announce({**config, "trainer": {"max_epochs": 1, "precision": "bf16-mixed"}}, tmp_path, trainer,
             RunStart(config), batches)
    assert "note: trainer.precision" not in capsys.readouterr().out


def test_an_unknown_representation_tap_names_repr_taps(tmp_path):
    """loss.taps, monitor.taps and repr.taps all reach the encoder; its refusal now names the setting."""
    from byol.jobs.pretrained import random_model
    from byol.jobs.protocols import run_protocol

    model = random_model({"name": "resnet18", "stem": "cifar", "width": 0.25}, seed=0)
    cfg = {"eval": {"name": "knn"}, "repr": {"name": "combined", "taps": ["layer2.0", "layer9"]}, "data": {},
           "seed": 0, "trainer": {}}
    with pytest.raises(ConfigError, match=r"^repr\.taps: unknown tap 'layer9' for resnet18"):
        run_protocol(model, cfg, splits=None, num_classes=2, out_dir=tmp_path)


def test_an_empty_image_file_is_said_to_be_empty(tmp_path):
    """A zero-byte image (a copy that never finished) read "cannot identify image file"."""
    folder = tmp_path / "train" / "x"
    save_png(folder / "good.png", np.full((8, 8), 77, np.uint8), "L")
    (folder / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read image '.*empty\.png' \(it is empty \(0 bytes\): a copy or "):
        load_image_folder(tmp_path / "train", 8)
