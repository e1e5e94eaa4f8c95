"""The pretraining job's guards, in this process on one tiny finished run: a finished run is not retrained and
its missing export comes back with all its epochs; an earlier checkpoint is not continued over the run's later
state, a new run does not start over a run's weights, and a checkpoint's config is range-checked like the
command line's. Each refusal leaves the run as it was and is tagged as nothing trained (no FAILED for it)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import compose_config

from byol.core.checkpoint import atomic_torch_save, safe_load
from byol.core.errors import CheckpointError, ConfigError
from byol.jobs.config_check import plain_config
from byol.jobs.pretrain import pretrain
from byol.jobs.resume import find_resume, saved_run_id

EPOCHS = 2
TINY = ["experiment=smoke", "monitor=off", "trainer.precision=32-true", "data.num_train=32", "data.batch_size=16",
        f"trainer.max_epochs={EPOCHS}", "backbone.width=0.125", "head.proj_hidden_dim=16", "head.proj_dim=8",
        "head.pred_hidden_dim=16", f"checkpoint.keep_last={EPOCHS}"]  # 2 steps an epoch; epoch0001/0002.ckpt kept


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    pretrain(compose_config("train", TINY, run), run)
    return run


def copy_of(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to))


def contents(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_tiny_run_is_what_the_tests_below_assume(finished):
    assert safe_load(finished / "checkpoints" / "last.ckpt")["global_step"] == 2 * EPOCHS
    assert safe_load(finished / "checkpoints" / "epoch0001.ckpt")["global_step"] == 2
    assert safe_load(finished / "encoder.pt")["meta"]["epochs"] == EPOCHS


def test_a_finished_run_is_not_retrained_and_its_missing_export_comes_back_whole(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path / "run")
    before = contents(run)
    capsys.readouterr()
    assert pretrain(compose_config("train", TINY, run), run) == run / "encoder.pt"
    out = capsys.readouterr().out
    assert f"{run} already finished its {EPOCHS} epochs" in out and "nothing to do" in out
    assert contents(run) == before  # not even the export is rewritten
    (run / "encoder.pt").unlink()  # killed between its last checkpoint and its export
    pretrain(compose_config("train", TINY, run), run)
    last = run / "checkpoints" / "last.ckpt"
    assert f"[byol] {run / 'encoder.pt'} was missing: written again from {last}" in capsys.readouterr().out
    meta = safe_load(run / "encoder.pt")["meta"]
    assert (meta["epochs"], meta["global_step"]) == (EPOCHS, 2 * EPOCHS)  # all its epochs: "complete"
    assert {k: v for k, v in contents(run).items() if k.name != "encoder.pt"} == \
           {k: v for k, v in before.items() if k.name != "encoder.pt"}


def test_an_earlier_checkpoint_is_not_continued_over_its_runs_later_state(finished, tmp_path):
    """pretrain() itself refuses (a sweep or a launcher's requeue never passes the command-line check)."""
    run = copy_of(finished, tmp_path / "run")
    before = contents(run)
    earlier = run / "checkpoints" / "epoch0001.ckpt"
    cfg = compose_config("train", [*TINY, f"resume={earlier}", "trainer.max_epochs=3"], run)
    with pytest.raises(CheckpointError) as err:
        pretrain(cfg, run, requested=["trainer.max_epochs"])
    assert str(err.value).startswith(f"'{earlier}' (step 2) is behind its run's {run}/checkpoints/last.ckpt "
                                     f"(step 4)")
    assert "hydra.run.dir=NEW" in str(err.value)
    assert err.value.nothing_trained is True  # run_job then writes no FAILED into the finished run
    assert contents(run) == before


def test_a_new_run_never_starts_over_a_runs_weights(finished, tmp_path):
    run = copy_of(finished, tmp_path / "run")
    (run / "checkpoints" / "last.ckpt").unlink()  # deleted to save space
    before = contents(run)
    with pytest.raises(CheckpointError) as err:
        pretrain(compose_config("train", [*TINY, "seed=5"], run), run)
    assert str(err.value).startswith(f"'{run}' holds a run's weights (encoder.pt, epoch0001.ckpt, epoch0002.ckpt)")
    assert str(err.value).endswith(f"resume={run}/checkpoints/epoch0002.ckpt")  # the newest one
    assert err.value.nothing_trained is True
    assert contents(run) == before


def test_a_checkpoints_config_is_range_checked_before_it_is_used(tmp_path):
    """check_file_config checks types only; the ranges of what a resumed run keeps are checked again, naming
    the checkpoint (here a batch of 0 and a negative seed, which a hand-edited file can hold)."""
    for key, value, expected in (("data", {"batch_size": 0}, "data.batch_size must be a positive whole number, not 0"),
                                 ("seed", -1, "seed must be a whole number from 0 to 4294967295, not -1")):
        saved = plain_config(compose_config("train", TINY, tmp_path))
        if isinstance(value, dict):
            saved[key].update(value)
        else:
            saved[key] = value
        run = tmp_path / key
        (run / "checkpoints").mkdir(parents=True)
        last = run / "checkpoints" / "last.ckpt"
        atomic_torch_save({"byol_config": saved, "global_step": 2, "epoch": 0, "state_dict": {}}, last)
        with pytest.raises(ConfigError) as err:
            pretrain(compose_config("train", [*TINY, f"resume={run}"], run), run, requested=[])
        assert str(err.value) == f"{expected} (checkpoint '{last}')"


def test_resume_of_a_sweep_folder_says_how_to_continue_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    for job in ("0_loss=classic", "1_loss=multi"):
        (sweep / job / ".hydra").mkdir(parents=True)
    with pytest.raises(CheckpointError) as err:
        find_resume(str(sweep), tmp_path)
    assert str(err.value) == (f"resume='{sweep}' is a sweep folder; continue a sweep by running its command again "
                              f"with -m hydra.sweep.dir={sweep} (finished jobs are skipped, the others resumed), or "
                              f"resume one of its runs: \"resume='{sweep}/0_loss=classic'\"")  # as Hydra reads it
    (sweep / "1_loss=multi" / "checkpoints").mkdir()  # job 0 failed before its first checkpoint: job 1 is named
    (sweep / "1_loss=multi" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    named = f"resume one of its runs: \"resume='{sweep}/1_loss=multi'\""
    with pytest.raises(CheckpointError, match=re.escape(named)):
        find_resume(str(sweep), tmp_path)
    (tmp_path / "plain").mkdir()  # not a sweep: the other message
    with pytest.raises(CheckpointError, match="no checkpoints/last.ckpt in that folder"):
        find_resume(str(tmp_path / "plain"), tmp_path)


def test_resume_of_a_runs_checkpoints_folder_names_the_run_folder(tmp_path):
    """resume=RUN/checkpoints was told "no checkpoints/last.ckpt in that folder ... start it again without
    resume=", advice that would have trained a finished run again from scratch."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        find_resume(str(checkpoints), tmp_path)
    assert str(err.value) == (f"resume='{checkpoints}' is a run's checkpoints folder; give the run folder itself: "
                              f"resume={tmp_path / 'run'}")
    assert find_resume(str(tmp_path / "run"), tmp_path) == checkpoints / "last.ckpt"
    (checkpoints / "last.ckpt").unlink()
    (checkpoints / "last.ckpt").mkdir()  # not a file: said so, not "start it again without resume="
    with pytest.raises(CheckpointError, match=re.escape(f"its {checkpoints / 'last.ckpt'} is not a checkpoint file")):
        find_resume(str(tmp_path / "run"), tmp_path)


@pytest.mark.parametrize("run_id", ["../../x", "a b", "a\nb", "x" * 65, 7, ["a"]])
def test_a_run_id_read_from_a_file_is_a_short_alphanumeric_word(run_id):
    with pytest.raises(ConfigError, match=r"refusing src: run_id = .* is not a run id"):
        saved_run_id({"run_id": run_id}, "src")


def test_run_ids_that_are_ids_pass():
    assert saved_run_id({"run_id": "0123abcdef89"}, "src") == "0123abcdef89"
    assert saved_run_id({"run_id": "x" * 64}, "src") == "x" * 64
    assert saved_run_id({}, "src") is None  # written before run ids


def test_run_start_keeps_the_id_of_its_own_run(finished, tmp_path):
    """A requeue (the same folder, no resume=) continues under the run's own id."""
    run = copy_of(finished, tmp_path / "run")
    from byol.jobs.pretrain import run_start

    start = run_start(plain_config(compose_config("train", TINY, run)), run, None)
    assert start.finished is True and start.step == 2 * EPOCHS
    assert start.config["run_id"] == safe_load(run / "checkpoints" / "last.ckpt")["byol_config"]["run_id"]


@pytest.mark.parametrize("override", ["data.num_train=48", "seed=5", "optim.base_lr=0.1", "augment.flip_p=0.1",
                                      f"trainer.max_epochs={EPOCHS - 1}"])
def test_a_finished_run_met_with_other_trained_settings_is_refused_not_called_done(finished, tmp_path, capsys,
                                                                                   override):
    run = copy_of(finished, tmp_path / "run")
    before = contents(run)
    key = override.split("=")[0]
    capsys.readouterr()
    with pytest.raises(ConfigError, match=rf"holds a finished run trained with other settings \({key}: .*nothing "
                                          r"was trained.*hydra.sweep.dir=NEW"):
        pretrain(compose_config("train", [*TINY, override], run), run, requested=[key])
    assert contents(run) == before
    assert "resuming with changed settings" not in capsys.readouterr().out  # it resumed nothing


@pytest.mark.parametrize("override", ["trainer.enable_progress_bar=false", "monitor=default", "checkpoint.keep_last=1",
                                      "logger=csv"])
def test_a_finished_run_met_with_other_machine_or_display_settings_is_still_done(finished, tmp_path, capsys,
                                                                                 override):
    run = copy_of(finished, tmp_path / "run")
    capsys.readouterr()
    pretrain(compose_config("train", [*TINY, override], run), run, requested=[override.split("=")[0]])
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize(("before", "after", "requested", "weights"), [
    (["+loss.weights={layer2.0: 0.5}"], ["+loss.weights={layer2.0: 1.0}"], ["loss.weights"], {"layer2.0": 1.0}),
    ([], ["+loss.weights={avgpool: 0.5}"], ["loss.weights"], {"avgpool": 0.5}),
    ([], ["++loss.weights.avgpool=0.5"], ["loss.weights.avgpool"], {"avgpool": 0.5}),
    (["+loss.weights={avgpool: 0.5}"], [], ["loss.weights"], {}),
    (["+loss.weights={layer2.0: 0.5}"], ["+loss.weights={layer2.0: 1.0}"], ["seed"], {"layer2.0": 0.5})])
def test_per_head_loss_weights_are_resumed_whole(tmp_path, before, after, requested, weights):
    """A head's weight is named like its module ("layer2.0"): a changed one was set at loss.weights.layer2."0"
    and a new one dropped without a word."""
    from byol.jobs.resume import resume_config

    saved = plain_config(compose_config("train", ["experiment=smoke", "loss=multi", *before], tmp_path))
    asked = plain_config(compose_config("train", ["experiment=smoke", "loss=multi", *after], tmp_path))
    config, changed = resume_config(saved, asked, requested)
    assert config["loss"]["weights"] == weights
    assert bool(changed) == (weights != saved["loss"]["weights"])


def test_an_earlier_runs_relative_data_root_is_compared_absolute_on_resume(tmp_path, monkeypatch, capsys):
    """A run of an earlier version kept data.root as typed ('imgs'); requeued with the same relative root, it
    read that root as a changed setting (relative against absolute). The saved root is made absolute, from the
    current folder with a note, before the settings are compared."""
    import byol.jobs.pretrain_fit as pretrain_fit
    from byol.jobs.pretrain import run_start

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrain_fit, "check_resumable", lambda *args: None)  # a checkpoint without weights here
    overrides = ["experiment=smoke", "data=imagefolder", "data.root=imgs"]
    saved = plain_config(compose_config("train", overrides, tmp_path))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    atomic_torch_save({"byol_config": saved, "global_step": 2, "epoch": 0, "state_dict": {}},
                      run / "checkpoints" / "last.ckpt")
    container = plain_config(compose_config("train", [*overrides, f"resume={run}"], tmp_path))
    start = run_start(container, run, requested=["data.root", "resume"])
    out = capsys.readouterr().out
    assert start.config["data"]["root"] == str(tmp_path / "imgs")
    assert "resuming with changed settings" not in out
    assert "names data.root 'imgs', relative to the folder the run was started from" in out


@pytest.mark.parametrize("overrides, said, not_said", [
    # the README's longer-run recipe: the schedules span schedule_epochs=4 before and after
    (["trainer.max_epochs=4"], "resuming with trainer.max_epochs: 2 -> 4: the learning-rate and tau schedules still "
                               "span 4 epochs (an exact continuation)", "changed settings"),
    # past schedule_epochs, the schedules stretch: another run from here on
    (["trainer.max_epochs=6"], "resuming with changed settings (no longer an exact continuation): "
                               "trainer.max_epochs: 2 -> 6", "still span"),
    (["monitor.taps=[layer3.0]"], "resuming with changed monitor settings: monitor.taps: ['layer2.0', 'layer3.0'] -> "
                                  "['layer3.0']; training is unchanged, but the monitor/ columns of metrics.csv (and "
                                  "the curves) measure these settings from epoch 2 on", "changed settings"),
    (["trainer.log_every_n_steps=7"], "resuming with changed logging settings (an exact continuation): "
                                      "trainer.log_every_n_steps: 2 -> 7", "changed settings"),
    (["optim.base_lr=0.5"], "resuming with changed settings (no longer an exact continuation): optim.base_lr: ",
     "(an exact continuation)"),
])
def test_a_resume_says_which_changed_settings_break_an_exact_continuation(tmp_path, monkeypatch, capsys, overrides,
                                                                         said, not_said):
    """Every change but a machine's data settings was called "no longer an exact continuation", also a longer
    max_epochs within schedule_epochs (the README's recipe for one) and monitor settings, which train nothing."""
    import byol.jobs.pretrain_fit as pretrain_fit
    from byol.jobs.pretrain import run_start

    monkeypatch.setattr(pretrain_fit, "check_resumable", lambda *args: None)  # a checkpoint without weights here
    base = ["experiment=smoke", "schedule_epochs=4"]
    saved = plain_config(compose_config("train", base, tmp_path))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    atomic_torch_save({"byol_config": saved, "global_step": 4, "epoch": 1, "state_dict": {}},
                      run / "checkpoints" / "last.ckpt")
    container = plain_config(compose_config("train", [*base, *overrides, f"resume={run}"], tmp_path))
    run_start(container, run, requested=[o.split("=")[0] for o in overrides] + ["resume"])
    out = capsys.readouterr().out
    assert f"[byol] {said}" in out and not_said not in out, out


def test_a_checkpoint_continued_in_a_new_folder_says_where_its_earlier_curves_are(tmp_path, monkeypatch, capsys):
    """The new folder's metrics.csv and curves.png begin at the checkpoint's step, silently: they looked like
    the whole run."""
    import byol.jobs.pretrain_fit as pretrain_fit
    from byol.jobs.pretrain import run_start

    monkeypatch.setattr(pretrain_fit, "check_resumable", lambda *args: None)  # a checkpoint without weights here
    saved = plain_config(compose_config("train", ["experiment=smoke"], tmp_path))
    old, new = tmp_path / "run", tmp_path / "branch"
    (old / "checkpoints").mkdir(parents=True)
    (old / "metrics.csv").write_text("epoch,step\n0,3\n")
    checkpoint = old / "checkpoints" / "epoch0001.ckpt"
    atomic_torch_save({"byol_config": saved, "global_step": 4, "epoch": 1, "state_dict": {}}, checkpoint)
    container = plain_config(compose_config("train", ["experiment=smoke", f"resume={checkpoint}"], tmp_path))
    run_start(container, new, requested=["resume"])
    assert (f"[byol] note: continuing {checkpoint} in a new run folder ({new}): its metrics.csv and curves.png "
            f"start at step 4 (after 1 epoch); those of the steps before are in {old / 'metrics.csv'}"
            in capsys.readouterr().out)
