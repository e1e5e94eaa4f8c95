"""Everyday mistakes and accidents get one line that names the fix: a precision the jobs cannot train
in, a quoted '~/data', an archive's __MACOSX folder, a second Ctrl+C (while a checkpoint is written,
it waits for the file)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
from conftest import class_folders, compose_config, plain_config
from PIL import Image

from byol.core.errors import ConfigError, DataError
from byol.core.image_folder import load_image_folder
from byol.jobs.config_check import check_config
from byol.jobs.datasets import load_split
from byol.lightning.callbacks import RunCheckpoints, StopEvaluationOnSignal


@pytest.mark.parametrize("precision", ["64", "64-true", "16-true", "bf16-true"])
def test_a_precision_that_casts_the_network_is_refused_in_one_line(tmp_path, precision):
    config = plain_config(compose_config("train", ["experiment=smoke", f"trainer.precision={precision}"], tmp_path))
    with pytest.raises(ConfigError, match=rf"trainer.precision={precision} is not supported.*use 32-true"):
        check_config(config)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "32"])
def test_the_precisions_the_jobs_train_in_pass(tmp_path, precision):
    check_config(plain_config(compose_config("train", ["experiment=smoke", f"trainer.precision={precision}"],
                                             tmp_path)))




def test_a_quoted_home_folder_in_data_root_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    class_folders(tmp_path / "imgs" / "train", 2)
    data = load_split({"name": "imagefolder", "root": "~/imgs", "image_size": 8, "cache_dir": None}, "train")
    assert data.classes == ("cat", "dog") and len(data.images) == 4


def test_a_macos_archive_folder_is_not_a_class(tmp_path):
    root = class_folders(tmp_path / "train", 2)
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "__MACOSX" / "cat" / "._0.png")
    Image.new("RGB", (8, 8)).save(root / "__MACOSX" / "x.png")
    assert load_image_folder(root, 8, workers=1).classes == ("cat", "dog")


def _checkpoints(tmp_path) -> RunCheckpoints:
    cb = RunCheckpoints(tmp_path / "checkpoints", tmp_path, "python train.py resume=RUN")
    cb.last.parent.mkdir()
    return cb


def test_a_second_ctrl_c_says_what_is_kept(tmp_path, capsys):
    cb = _checkpoints(tmp_path)
    cb._on_signal(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        cb._on_signal(signal.SIGINT, None)
    assert "second Ctrl+C: stopped at once; no checkpoint was saved yet" in capsys.readouterr().err
    torch.save({}, cb.last)
    with pytest.raises(KeyboardInterrupt):
        cb._on_signal(signal.SIGINT, None)
    assert f"the last checkpoint saved is kept ({cb.last}); resume with: python train.py resume=RUN" in \
        capsys.readouterr().err
    evaluation = StopEvaluationOnSignal("fine-tuning")
    evaluation._on_signal(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        evaluation._on_signal(signal.SIGINT, None)
    assert "no result written for it" in capsys.readouterr().err


def test_a_second_ctrl_c_while_a_checkpoint_is_written_waits_for_the_file(tmp_path, capsys):
    cb = _checkpoints(tmp_path)
    cb._on_signal(signal.SIGINT, None)

    def save_checkpoint(path, weights_only):
        cb._on_signal(signal.SIGINT, None)  # arrives halfway: must not break the write
        torch.save({"whole": True}, path)

    trainer = SimpleNamespace(save_checkpoint=save_checkpoint, global_step=7)
    with pytest.raises(KeyboardInterrupt):
        cb._save(trainer, cb.last)
    assert torch.load(cb.last)["whole"] and cb._last_step == 7
    assert "second Ctrl+C: stopped at once; the last checkpoint saved is kept" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "refused"), [
    (["data.image_size=8"], "data.image_size=8 is too small for the imagenet stem: at least 16 px"),
    (["data.crop_size=12"], "data.crop_size=12 is too small for the imagenet stem"),
    (["data.image_size=8", "backbone.stem=cifar"], None), (["data.image_size=16"], None),
    (["data.crop_size=4", "backbone.stem=cifar"], "data.crop_size=4 is too small for the cifar stem: at least 8")])
def test_images_too_small_for_the_stem_are_refused_before_a_nan(tmp_path, overrides, refused):
    config = plain_config(compose_config("train", ["experiment=smoke", *overrides], tmp_path))
    if refused is None:
        check_config(config)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_config(config)


def test_synthetic_data_too_large_for_memory_is_one_line(monkeypatch):
    import byol.jobs.datasets as datasets

    cfg = {"name": "synthetic", "num_train": 10, "num_test": 5, "image_size": 100, "num_classes": 2}
    monkeypatch.setattr(datasets, "mmap_limit", lambda _: 16 * 10 * 3 * 100 * 100 - 1)
    with pytest.raises(DataError, match=r"synthetic data of 10 images of 100 px needs about .* lower data.image_size"):
        load_split(cfg, "train")
    assert len(load_split(cfg, "test")) == 5  # 5 images fit


@pytest.mark.parametrize(("last_step", "noted"), [(6, True), (4, False), (None, False)])
def test_an_export_older_than_its_runs_last_checkpoint_is_noted(tmp_path, capsys, last_step, noted):
    from test_evaluation import tiny_encoder

    from byol.core.checkpoint import save_encoder
    from byol.jobs.pretrained import read_pretrained

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_encoder(tiny_encoder([]), run / "encoder.pt", meta={"loss": "classic", "epochs": 2, "global_step": 4})
    if last_step is not None:
        torch.save({"global_step": last_step}, run / "checkpoints" / "last.ckpt")
    assert read_pretrained(run / "encoder.pt").epochs == 2  # the export is what is evaluated
    out = capsys.readouterr().out
    assert ("is further on (optimizer step 6) than encoder.pt (step 4)" in out) is noted
    assert (f"pretrained={run / 'checkpoints' / 'last.ckpt'} evaluates the later state" in out) is noted


def test_the_report_on_a_run_whose_curves_cannot_be_drawn_does_not_say_there_is_no_run(tmp_path, capsys):
    import yaml

    from byol.jobs.report import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "encoder.pt").write_bytes(b"weights")  # a run folder, as the report finds them
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "loss": {"taps": [], "weights": {}},
                                                     "backbone": {"name": "resnet18"}}))
    (run / "metrics.csv").write_bytes(bytes(range(256)) * 4)  # not text
    with pytest.raises(SystemExit, match=r"no results.json under .*, and the learning curves of its 1 training "
                                         r"run\(s\) could not be drawn"):
        report([run], tmp_path / "out")
    err = capsys.readouterr().err
    assert f"[report] note: {run / 'metrics.csv'} left out of curves.png (not UTF-8 text: byte 0x80 at position " \
        "128)" in err
    with pytest.raises(SystemExit, match="no results.json and no training run under"):
        report([tmp_path / "out"], tmp_path / "out2")


def test_an_image_larger_than_pillow_decodes_says_to_save_a_smaller_copy(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    root = class_folders(tmp_path / "train", 2, size=40)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)  # 40x40 is then more than twice the limit
    with pytest.raises(DataError, match=r"is larger than Pillow decodes .*save a smaller copy"):
        load_image_folder(root, 8, workers=1)


@pytest.mark.parametrize(("export_run", "folder_run", "planned", "noted"), [
    ("aaa111", "bbb222", 1, True), ("aaa111", "aaa111", 5, False), (None, "bbb222", 5, False)])
def test_an_export_copied_from_another_run_keeps_its_own_epochs(tmp_path, capsys, export_run, folder_run, planned,
                                                                noted):
    import yaml
    from test_evaluation import tiny_encoder

    from byol.core.checkpoint import save_encoder
    from byol.jobs.pretrained import read_pretrained

    run = tmp_path / "run"
    run.mkdir()
    meta = {"loss": "classic", "epochs": 1, **({"run_id": export_run} if export_run else {})}
    save_encoder(tiny_encoder([]), run / "encoder.pt", meta=meta)
    (run / "config.yaml").write_text(yaml.safe_dump({"run_id": folder_run, "loss": {"taps": [], "weights": {}},
                                                     "backbone": {"name": "resnet18"}, "trainer": {"max_epochs": 5}}))
    source = read_pretrained(run / "encoder.pt")
    assert (source.epochs, source.planned_epochs) == (1, planned)
    assert ("written by run aaa111, not by the run of the config.yaml beside it (bbb222)" in
            capsys.readouterr().out) is noted


def test_an_unreadable_class_folder_is_an_error_unless_bad_files_are_skipped(tmp_path, monkeypatch, capsys):
    """A class folder that cannot be read (permissions) was skipped with a line: its class then had no
    images, and evaluation said "needs at least 2 classes" or scored that class's test images on a
    classifier that never saw one. Now one line naming the folder; data.skip_bad_files=true skips it."""
    import os

    root = class_folders(tmp_path / "imgs", classes=("cat", "dog", "eel"))
    scandir = os.scandir

    def denied(path):  # the tests run as root, whom chmod does not stop
        if str(path).endswith("dog"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DataError) as err:
        load_image_folder(root, size=8)
    assert f"cannot read folder '{root / 'dog'}' (Permission denied)" in str(err.value)
    assert "data.skip_bad_files=true" in str(err.value)
    data = load_image_folder(root, size=8, skip_bad_files=True)
    assert len(data) == 4 and data.classes == ("cat", "dog", "eel")
    assert "warning: skipping unreadable folder" in capsys.readouterr().out


def test_a_tap_the_run_has_no_grid_for_is_said_to_be_pooled_to_one_pixel(capsys):
    """repr.taps=[layer2.1] on a run whose backbone.grids names layer2.0 and layer3.0 was pooled to 1x1
    without a word (the README says taps are pooled to the run's grids)."""
    from byol.jobs.pretrained import EncoderSource
    from byol.jobs.protocols import _describe, _note_taps_without_grid

    model = EncoderSource("run", "/runs/run/encoder.pt", {"name": "resnet18", "stem": "cifar", "width": 0.5,
                                                          "grids": {"layer2.0": 4, "layer3.0": 2}}, "multi")
    _note_taps_without_grid(model, ["avgpool", "layer2.0", "layer2.1"])
    out = capsys.readouterr().out
    assert "note: run: layer2.1 is pooled to 1x1" in out and "layer2.0: 4x4, layer3.0: 2x2" in out
    _note_taps_without_grid(model, ["avgpool", "layer2.0", "layer3.0"])
    assert capsys.readouterr().out == ""
    assert "resnet18 x0.5 (cifar stem)" in _describe(model)  # the width, as the baseline's line


def test_stop_signals_are_held_while_a_checkpoint_is_written_and_delivered_after(tmp_path, capsys):
    """A second Ctrl+C during a checkpoint write waits for the file, then stops the run (status 130 through
    STOPPED_AT_ONCE): held back from the writer's thread, it cannot cut a system call of the write short."""
    import os

    from byol.lightning.callbacks import STOPPED_AT_ONCE

    cb = _checkpoints(tmp_path)
    cb.on_train_start(SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False)), None)
    try:
        cb._on_signal(signal.SIGINT, None)  # the first Ctrl+C: stop at the next boundary

        def save_checkpoint(path, weights_only):
            # held from this thread (a thread of the test runner may still take it: then it is recorded only)
            os.kill(os.getpid(), signal.SIGINT)
            torch.save({"whole": True}, path)

        with pytest.raises(KeyboardInterrupt):  # delivered once the file is whole
            cb._save(SimpleNamespace(save_checkpoint=save_checkpoint, global_step=3), cb.last)
        assert torch.load(cb.last)["whole"] and cb._last_step == 3 and STOPPED_AT_ONCE.is_set()
    finally:
        cb.on_train_end(None, None)
    assert "second Ctrl+C: stopped at once; the last checkpoint saved is kept" in capsys.readouterr().err


def test_a_checkpoint_saved_after_a_stop_inside_a_step_keeps_the_handlers_until_it_is_whole(tmp_path):
    """A signal inside a step ends it with StepStopped, and the checkpoint is saved in on_exception. Python's
    own Ctrl+C handler was put back before that save: a second Ctrl+C then raised KeyboardInterrupt inside the
    writer ("write failed"), and a resumable run was marked FAILED. The handlers now go after the save."""
    from byol.lightning.callbacks import StepStopped

    cb = _checkpoints(tmp_path)
    cb.on_train_start(SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False),
                                      accumulate_grad_batches=1, world_size=1), None)
    ours = signal.getsignal(signal.SIGINT)
    seen = []
    trainer = SimpleNamespace(save_checkpoint=lambda path, weights_only: (seen.append(signal.getsignal(signal.SIGINT)),
                                                                          torch.save({}, path)),
                              global_step=2, num_training_batches=4, accumulate_grad_batches=1, current_epoch=0,
                              world_size=1, is_global_zero=True)
    cb.received = signal.SIGINT
    cb.on_exception(trainer, SimpleNamespace(undo_step=lambda: None), StepStopped("inside a step", signal.SIGINT))
    assert seen == [ours] and signal.getsignal(signal.SIGINT) is not ours  # restored once saved


def test_pretrained_or_resume_of_an_evaluations_output_says_so_and_names_what_to_give(tmp_path):
    """pretrained= of an evaluation's folder said "no pretraining run in it", of its results.json "not a
    PyTorch file" after a line blaming "its run's config.yaml", and of an evaluation sweep listed each job as a
    training run without weights; resume= of one advised starting it again without resume=. Each now says it
    is an evaluation's output and names what to give."""
    from byol.core.errors import CheckpointError
    from byol.jobs.pretrained import resolve_pretrained
    from byol.jobs.resume import find_resume

    single = tmp_path / "eval" / "2026-12-01_10-00-00"
    single.mkdir(parents=True)
    (single / "results.json").write_text('{"repr": "avgpool", "eval": "knn"}')
    (single / "config.yaml").write_text("eval:\n  name: knn\npretrained: latest\n")
    sweep = tmp_path / "multirun" / "eval" / "2026-12-01_10-00-00"
    for job in ("0_eval=knn", "1_eval=linear"):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / "results.json").write_text('{"repr": "avgpool", "eval": "knn"}')
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for given in (single, single / "results.json", sweep / "0_eval=knn"):
        with pytest.raises(CheckpointError) as refused:
            resolve_pretrained(str(given), tmp_path)
        folder = given if given.is_dir() else given.parent
        assert str(refused.value) == (
            f"pretrained='{given}' is an evaluation's output (results.json, no weights), not a pretraining run; "
            f"give the run it evaluated (outputs/train/<time>, its encoder.pt or a .ckpt). Its results: "
            f"python -m byol.report {folder}")
    with pytest.raises(CheckpointError) as refused:
        resolve_pretrained(str(sweep), tmp_path)
    assert str(refused.value) == (
        f"pretrained='{sweep}' is an evaluation sweep (its jobs hold results.json, no weights), not a pretraining "
        f"run; give the training sweep it evaluated (outputs/multirun/train/<time>, or pretrained=latest_sweep). "
        f"Its results: python -m byol.report {sweep}")
    for given, what in ((single, "an evaluation's output (results.json, no weights)"),
                        (sweep, "an evaluation sweep (its jobs hold results.json, no weights)")):
        with pytest.raises(CheckpointError) as refused:
            find_resume(str(given), tmp_path / "new")
        assert str(refused.value) == (f"resume='{given}' is {what}, not a pretraining run; resume= takes a train.py "
                                      f"run folder (outputs/train/<time>) or one of its checkpoints/*.ckpt")


def test_a_training_sweep_with_no_job_folder_yet_is_said_to_be_one(tmp_path):
    """A training sweep just started (multirun.yaml, no job folder yet) given to pretrained= was "no pretraining
    run in it ... create one with python train.py", as if nothing had been trained there: it says it is a sweep
    whose jobs have not run yet. A folder that is no sweep keeps its own line."""
    from byol.core.errors import CheckpointError
    from byol.jobs.pretrained import resolve_pretrained

    started = tmp_path / "multirun" / "train" / "2026-12-01_10-00-00"
    started.mkdir(parents=True)
    (started / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(CheckpointError) as refused:
        resolve_pretrained(str(started), tmp_path)
    assert str(refused.value) == (f"'{started}' is a sweep with no job folder yet (its first job has not started, "
                                  f"or the sweep stopped before it): evaluate it once its jobs have run")
    (started / "multirun.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"^no pretraining run in .*create one with `python train.py`"):
        resolve_pretrained(str(started), tmp_path)


def test_a_data_root_given_for_synthetic_data_is_refused_naming_data_imagefolder(tmp_path):
    """`python train.py experiment=smoke data.root=DIR` (data=imagefolder forgotten) trained on generated stripes
    and never read DIR, without a word: the run looked like one on the user's images. One line names the fix;
    with data=imagefolder the same root is what the run reads."""
    from byol.jobs.pretrain import run_start
    from byol.jobs.value_ranges import check_root_is_read

    smoke = plain_config(compose_config("train", ["experiment=smoke", f"data.root={tmp_path}"], tmp_path / "run"))
    with pytest.raises(ConfigError) as refused:
        run_start(smoke, tmp_path / "run", requested=None)
    assert str(refused.value) == (f"data.root={tmp_path} does nothing with data=synthetic (generated images; "
                                  f"experiment=smoke chooses them): add data=imagefolder to train on that folder, "
                                  f"or leave data.root out")
    assert not (tmp_path / "run").exists()
    check_root_is_read(plain_config(compose_config("train", ["experiment=smoke"], tmp_path))["data"])
    check_root_is_read(plain_config(compose_config("train", ["experiment=smoke", "data=imagefolder",
                                                             f"data.root={tmp_path}"], tmp_path))["data"])


def test_latest_sweep_says_when_a_newer_sweep_has_no_job_folder_yet(tmp_path, capsys):
    """pretrained=latest_sweep right after `train.py -m` started (multirun.yaml, no job folder yet) took the
    sweep before it, and named only that one: the user meant the new sweep. The line now names the newer one
    and why it is not the one evaluated."""
    import os

    from byol.jobs.pretrained import resolve_pretrained

    root = tmp_path / "multirun" / "train"
    done = root / "2026-12-01_09-00-00"
    (done / "0_seed=0" / ".hydra").mkdir(parents=True)
    (done / "0_seed=0" / "encoder.pt").write_bytes(b"weights")
    started = root / "2026-12-01_10-00-00"
    started.mkdir()
    (started / "multirun.yaml").write_text("hydra: {}\n")
    for folder, t in ((done, 1000), (started, 2000)):
        os.utime(folder, (t, t))
    resolve_pretrained("latest_sweep", tmp_path)
    assert capsys.readouterr().out == (
        f"[eval] pretrained=latest_sweep: {done} (newer, with no job folder yet: 2026-12-01_10-00-00; evaluate it "
        f"once its jobs have run)\n")
    os.utime(started, (500, 500))  # an older sweep that never started a job: not mentioned
    resolve_pretrained("latest_sweep", tmp_path)
    assert capsys.readouterr().out == f"[eval] pretrained=latest_sweep: {done}\n"
