"""Run-folder guards on tiny files: what counts as a run, which checkpoint may continue where, and that
train.py's command line refuses before Hydra writes its record and log into a run's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from byol.core.errors import CheckpointError, ConfigError
from byol.jobs.command_folders import given_run_dir
from byol.jobs.command_line import check_command_line
from byol.jobs.resume import folder_run_id
from byol.jobs.run_folder import check_new_run_folder, check_not_behind, check_resume_target


def ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "epoch": 0}, path)
    return path


def test_a_folder_holding_only_a_runs_metrics_is_not_a_new_folder(tmp_path):
    """A run stopped before its first checkpoint left metrics.csv: another run's checkpoint continued there would
    overwrite it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    foreign = ckpt(tmp_path / "other" / "checkpoints" / "last.ckpt", 4)
    with pytest.raises(CheckpointError, match="that folder holds another run"):
        check_resume_target(run, foreign, "a1", None)
    (run / "metrics.csv").unlink()
    assert check_resume_target(run, foreign, "a1", None) is False  # empty again: a new folder, a new id


def test_a_new_run_is_refused_over_a_lone_encoder_export(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "encoder.pt").write_bytes(b"finished weights")
    with pytest.raises(CheckpointError) as err:
        check_new_run_folder(run)
    assert str(err.value).startswith(f"'{run}' holds a run's weights (encoder.pt) and no checkpoints/last.ckpt")
    assert "resume=" not in str(err.value)  # no checkpoint to point to
    ckpt(run / "checkpoints" / "last.ckpt", 8)
    check_new_run_folder(run)  # continued from there, not started anew


def test_only_a_later_state_is_protected_from_an_earlier_checkpoint(tmp_path):
    run = tmp_path / "run"
    last = ckpt(run / "checkpoints" / "last.ckpt", 8)
    at_end = ckpt(run / "checkpoints" / "epoch0002.ckpt", 8)
    earlier = ckpt(run / "checkpoints" / "epoch0001.ckpt", 4)
    check_not_behind(run, at_end, 8)  # the same step as last.ckpt: nothing later to lose (longer max_epochs)
    check_not_behind(run, last, 8)
    with pytest.raises(CheckpointError) as err:
        check_not_behind(run, earlier, 4)
    assert str(err.value).startswith(f"'{earlier}' (step 4) is behind its run's {last} (step 8)")
    assert str(err.value).endswith("continue it in a new folder (add hydra.run.dir=NEW)")


def test_train_command_line_refuses_a_new_run_over_a_runs_weights_before_hydra_writes(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt(run / "checkpoints" / "epoch0002.ckpt", 8)
    (run / "encoder.pt").write_bytes(b"finished weights")
    with pytest.raises(SystemExit) as exit_:
        check_command_line(["experiment=smoke", f"hydra.run.dir={run}"], "train")
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith(f"error: '{run}' holds a run's weights (encoder.pt, epoch0002")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "encoder.pt"]  # no .hydra, no train.log


def test_train_command_line_refuses_an_earlier_checkpoint_in_its_own_run_before_hydra_writes(tmp_path, capsys):
    run = tmp_path / "run"
    last = ckpt(run / "checkpoints" / "last.ckpt", 8)
    earlier = ckpt(run / "checkpoints" / "epoch0001.ckpt", 4)
    with pytest.raises(SystemExit) as exit_:
        check_command_line([f"resume={earlier}", "trainer.max_epochs=3"], "train")
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith(f"error: '{earlier}' (step 4) is behind its run's {last} (step 8)")
    check_command_line([f"resume={earlier}", f"hydra.run.dir={tmp_path / 'branch'}"], "train")  # another folder: fine


def test_the_run_folder_a_command_line_gives_is_its_last_word(tmp_path):
    x, y = tmp_path / "x", tmp_path / "y"
    x.mkdir(), y.mkdir()
    assert given_run_dir(["hydra.run.dir=/a", "seed=1", "hydra.run.dir=/c"], "train") == Path("/c")
    assert given_run_dir([f"resume={x}", f"resume={y}"], "train") == y
    assert given_run_dir(["-m", "hydra.run.dir=/c"], "train") is None  # a sweep: its jobs' folders
    assert given_run_dir(["--multirun", f"resume={y}"], "train") is None


def test_a_run_folders_config_of_another_shape_is_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text("- {a: 1}\n- b\n")
    with pytest.raises(ConfigError, match=r"refusing '.*config.yaml': its config is a list, not a mapping"):
        folder_run_id(tmp_path)
