"""The advice an error gives fits the situation: a corrupt weights file names the checkpoints that can stand in
for it and how the job that read it takes one (train.py: resume=, evaluate.py: pretrained=); a storage error
on a path outside the job's output folder (an input) is not answered with output-folder advice."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from byol.core.checkpoint import atomic_torch_save, safe_load
from byol.core.errors import CheckpointError
from byol.jobs.cli import run_job
from byol.jobs.pretrained import read_pretrained, resolve_pretrained


def _run_folder(root: Path, names=("epoch0001.ckpt", "epoch0002.ckpt", "last.ckpt")) -> Path:
    """A run folder's layout: encoder.pt and checkpoints/ (the files' contents do not matter here)."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    atomic_torch_save({"w": torch.ones(1)}, run / "encoder.pt")
    for name in names:
        atomic_torch_save({"w": torch.ones(1000)}, run / "checkpoints" / name)
    return run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:2000])


def _error(read, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        read(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_an_empty_encoder_export_names_its_runs_checkpoints_for_evaluation(tmp_path):
    run = _run_folder(tmp_path)
    (run / "encoder.pt").write_bytes(b"")  # `: > RUN/encoder.pt`
    checkpoints = run / "checkpoints"
    message = _error(read_pretrained, run / "encoder.pt")
    assert message.startswith(f"checkpoint '{run / 'encoder.pt'}' is empty (0 bytes), e.g. a copy or download that "
                              f"never finished. Other checkpoints")  # not "corrupt ... (EOFError: )"
    assert message.endswith(
        f"Other checkpoints beside it or in checkpoints/ beside it, latest first: {checkpoints / 'last.ckpt'}, "
        f"{checkpoints / 'epoch0002.ckpt'}, {checkpoints / 'epoch0001.ckpt'}; evaluate one instead: "
        f"pretrained={checkpoints / 'last.ckpt'}")
    assert "No other checkpoint" not in message and "resume=" not in message


def test_an_empty_encoder_export_with_no_checkpoints_says_where_none_was_found(tmp_path):
    run = _run_folder(tmp_path, names=())
    (run / "encoder.pt").write_bytes(b"")
    assert _error(read_pretrained, run / "encoder.pt").endswith(
        " No other readable checkpoint lies beside it or in checkpoints/ beside it")


def test_a_truncated_checkpoint_read_by_an_evaluation_suggests_pretrained_not_resume(tmp_path):
    run = _run_folder(tmp_path)
    last, epoch2 = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "epoch0002.ckpt"
    _truncate(last)
    message = _error(read_pretrained, last)
    assert message.endswith(f"Other checkpoints beside it, latest first: {epoch2}, "
                            f"{run / 'checkpoints' / 'epoch0001.ckpt'}; evaluate one instead: pretrained={epoch2}")
    assert "resume=" not in message and "train.py" not in message


def test_a_truncated_checkpoint_read_by_training_still_suggests_resume(tmp_path):
    run = _run_folder(tmp_path)
    last, epoch2 = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "epoch0002.ckpt"
    _truncate(last)
    for kwargs in ({}, {"mmap": True}, {"job": "train"}):  # run_start reads with mmap=True
        message = _error(safe_load, last, **kwargs)
        assert message.endswith(f"; e.g. python train.py resume={epoch2}"), kwargs
        assert "pretrained=" not in message


def _job_error(tmp_path, capsys, job: str, fail) -> str:
    """The one line run_job prints when ``fail(run_dir)`` raises, for a train or evaluate job."""
    run = tmp_path / "out"
    run.mkdir()
    compose_config(job, ["experiment=smoke"] if job == "train" else ["preset=smoke"], run)
    with pytest.raises(SystemExit) as exit_:
        run_job(lambda cfg, run_dir: fail(run_dir), None)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    return err.strip()


def _denied(path) -> PermissionError:
    return PermissionError(errno.EACCES, "Permission denied", str(path))


def test_an_unreadable_input_is_named_as_such_not_as_an_output_folder_problem(tmp_path, capsys, monkeypatch):
    """evaluate.py pretrained=DIR where DIR holds a subfolder that cannot be read (mode 000, as another user)."""
    given = tmp_path / "given"
    locked = given / "locked" / ".hydra"
    locked.mkdir(parents=True)
    is_dir = Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: (_ for _ in ()).throw(_denied(self)) if self == locked
                        else is_dir(self))
    line = _job_error(tmp_path, capsys, "evaluate", lambda run_dir: resolve_pretrained(str(given)))
    assert line == (f"error: Permission denied ('{locked}'), outside this job's output folder: this job cannot "
                    f"read or access that path; check its permissions and those of the folders above it")
    assert "writable output folder" not in line and "free space" not in line


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_another_storage_error_outside_the_output_folder_points_at_that_paths_disk(tmp_path, capsys, error):
    elsewhere = tmp_path / "cache" / "images.bin"

    def fail(run_dir):
        raise OSError(error, "storage error", str(elsewhere))

    line = _job_error(tmp_path, capsys, "train", fail)
    assert line == (f"error: storage error ('{elsewhere}'), outside this job's output folder: check that path's "
                    f"disk (full, read-only or failing)")


@pytest.mark.parametrize("job", ["train", "evaluate"])
def test_a_permission_error_inside_the_output_folder_keeps_the_output_advice(tmp_path, capsys, job):
    def fail(run_dir):
        raise _denied(run_dir / "checkpoints" / "last.ckpt")

    line = _job_error(tmp_path, capsys, job, fail)
    assert line == (f"error: Permission denied ('{tmp_path / 'out' / 'checkpoints' / 'last.ckpt'}'); free space "
                    f"or choose a writable output folder (hydra.run.dir=DIR). Checkpoints already written are intact")


def test_the_output_folder_is_recognised_through_a_link_and_by_a_relative_path(tmp_path, capsys, monkeypatch):
    real = tmp_path / "disk" / "out"
    real.mkdir(parents=True)
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    compose_config("evaluate", ["preset=smoke"], tmp_path / "linked")
    monkeypatch.chdir(tmp_path)
    for path in (real / "results.json", Path("linked") / "results.json"):
        with pytest.raises(SystemExit):
            run_job(lambda cfg, run_dir, path=path: (_ for _ in ()).throw(_denied(path)), None)
        assert "choose a writable output folder" in capsys.readouterr().err, path


def test_a_checkpoint_cut_short_is_not_offered_in_place_of_another(tmp_path):
    """A full disk that cut last.ckpt and epoch0002.ckpt short: each error named the other as the one to take,
    leading from one unreadable file to the next. Only whole archives are offered."""
    run = _run_folder(tmp_path)
    checkpoints = run / "checkpoints"
    for name in ("last.ckpt", "epoch0002.ckpt"):
        _truncate(checkpoints / name)
    (checkpoints / "junk.ckpt").write_bytes(b"junk")
    message = _error(safe_load, checkpoints / "last.ckpt")
    assert message.endswith(f"Other checkpoints beside it, latest first: {checkpoints / 'epoch0001.ckpt'}; e.g. "
                            f"python train.py resume={checkpoints / 'epoch0001.ckpt'}"), message
    _truncate(checkpoints / "epoch0001.ckpt")
    assert _error(safe_load, checkpoints / "last.ckpt").endswith(" No other readable checkpoint lies beside it")


def test_a_text_file_named_as_weights_is_called_damaged_not_dangerous(tmp_path):
    """A few bytes of text are no pickle at all: they were answered with 'unpickling it could run code'; torch's
    own text (which advises weights_only=False) is never quoted."""
    junk = tmp_path / "encoder.pt"
    junk.write_text("garbage\n")
    message = _error(safe_load, junk, job="evaluate")
    assert message.startswith(f"checkpoint '{junk}' is corrupt, truncated or not a PyTorch file (UnpicklingError: "
                              "it begins as neither a zip archive nor a pickle).")
    assert "could run code" not in message and "weights_only" not in message
