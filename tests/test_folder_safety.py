"""What a job writes stays in its own folder, and nothing finished is lost: symbolic links where jobs write
are refused (they would carry writes to any file they name), a crafted config.yaml cannot stall a job, two
jobs started in the same second get two folders, and an evaluation run again keeps the earlier one whole."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from in_process import run_here

from byol.core.errors import ByolError, ConfigError
from byol.jobs.cli import new_folder, new_run_dir_of
from byol.jobs.command_folders import given_run_dir
from byol.jobs.run_folder import FolderLock, FolderTakenError, check_job_folder, links_in, raw_run_config


def _run_folder(folder: Path) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / "config.yaml").write_text("seed: 0\nloss:\n  taps: []\n")
    (folder / "encoder.pt").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("link", [".lock", "train.log", "metrics.csv", ".hydra/overrides.yaml",
                                  "checkpoints/last.ckpt", "checkpoints", ".hydra"])
def test_a_folder_with_a_link_where_jobs_write_is_refused_and_the_linked_file_untouched(tmp_path, link):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("precious data")
    run = _run_folder(tmp_path / "run")
    target = victim if link in ("checkpoints", ".hydra") else victim / "precious.txt"
    path = run / link
    if path.is_dir():
        path.rmdir()
    path.symlink_to(target)
    assert links_in(run) == [path]
    with pytest.raises(FolderTakenError, match=r"holds symbolic links where jobs write .*" + link.split("/")[-1]):
        check_job_folder(run, "train")
    assert (victim / "precious.txt").read_text() == "precious data"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


def test_the_lock_never_truncates_the_file_a_link_names(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("precious data")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    with pytest.raises(FolderTakenError, match=r"\.lock' is a symbolic link"), FolderLock(tmp_path / "run"):
        pass
    assert victim.read_text() == "precious data"


def test_a_whole_run_folder_may_be_a_link(tmp_path):
    """Keeping a run on another disk: link the folder itself, which jobs then write into as usual."""
    real = _run_folder(tmp_path / "disk" / "run")
    (tmp_path / "run").symlink_to(real)
    assert links_in(tmp_path / "run") == []
    check_job_folder(tmp_path / "run", "train")


@pytest.mark.slow
def test_resume_of_a_folder_with_links_stops_before_hydra_writes_through_them(tmp_path):
    """train.py resume=RUN writes Hydra's record and log into RUN: the links there are refused first."""
    victim = tmp_path / "precious.txt"
    victim.write_text("precious data")
    run = _run_folder(tmp_path / "run")
    torch.save({"global_step": 4, "epoch": 0}, run / "checkpoints" / "last.ckpt")  # something to resume
    (run / ".hydra" / "overrides.yaml").symlink_to(victim)
    (run / "train.log").symlink_to(victim)
    result = run_here("train.py", f"resume={run}")
    assert result.returncode == 1 and result.stderr.startswith(f"error: '{run}' holds symbolic links"), result.stderr
    assert "Traceback" not in result.stderr
    assert victim.read_text() == "precious data"
    assert given_run_dir([f"resume={run}/checkpoints/epoch0001.ckpt"], "train") == run
    assert given_run_dir([f"resume={run}"], "evaluate") is None and given_run_dir(["resume=null"], "train") is None


def test_a_config_yaml_with_yaml_aliases_is_refused_at_once(tmp_path):
    """A few hundred bytes of nested aliases took OmegaConf minutes to expand: refused before reading."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\nseed: 0\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="holds YAML anchors or aliases"):
        raw_run_config(tmp_path)
    assert time.perf_counter() - start < 5  # a bound far above the refusal's milliseconds: a hang fails here
    (tmp_path / "config.yaml").write_bytes(b"seed: 0\n" + b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="more than any run's config"):
        raw_run_config(tmp_path)


def test_jobs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr("byol.jobs.cli._CLAIMED", {})
    stamped = str(tmp_path / "outputs" / "train" / "2026-11-29_21-00-00")
    Path(stamped).mkdir(parents=True)  # the other job's
    (Path(stamped).parent / "2026-11-29_21-00-00-2").mkdir()  # and a third's
    mine = new_folder(stamped)
    assert mine == stamped + "-3" and Path(mine).is_dir()
    assert new_folder(stamped) == mine  # the same answer each time Hydra asks
    run = tmp_path / "run"
    run.mkdir()
    assert new_run_dir_of(str(run), stamped + "_b") == str(run)  # resume: the run's folder, nothing claimed
    assert not Path(stamped + "_b").exists()


def test_a_claimed_folder_goes_at_exit_only_while_empty(tmp_path, monkeypatch):
    """A process that resolves ``hydra.run.dir`` and runs no job there (a test composing the config, a
    refused command) leaves no empty time-stamped folder behind."""
    monkeypatch.setattr("byol.jobs.cli._CLAIMED", {})
    at_exit = []
    monkeypatch.setattr("byol.jobs.cli.atexit.register", lambda function, *args: at_exit.append((function, args)))
    used, unused = new_folder(str(tmp_path / "used")), new_folder(str(tmp_path / "unused"))
    (Path(used) / "train.log").write_text("a job ran here")
    (tmp_path / "taken").mkdir()  # another job's, from the same second, still empty
    new_folder(str(tmp_path / "taken"))
    for function, args in at_exit:
        function(*args)
    assert (Path(used) / "train.log").is_file() and not Path(unused).exists()
    assert (tmp_path / "taken").is_dir()  # only folders this process made are removed


@pytest.mark.parametrize("label", ["../elsewhere", "random-init_resnet18_imagenet/../../x", "/abs/olute"])
def test_results_are_never_written_outside_the_evaluation_folder(tmp_path, label):
    from byol.jobs.evaluate import _result_folder

    with pytest.raises(ByolError, match="refusing to write the results of"):
        _result_folder(tmp_path / "ev", label)
    assert _result_folder(tmp_path / "ev", "0_loss=multi/run") == tmp_path / "ev" / "0_loss=multi" / "run"


def _train(*args: str) -> subprocess.CompletedProcess:
    return run_here("train.py", *args)


def _contents(folder: Path) -> dict:
    """Every file below ``folder`` but the logs and Hydra's record of the last command, byte for byte."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".log" and ".hydra" not in p.parts and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-epoch smoke run that kept its epoch checkpoints (trained in this process: the commands
    under test are the later ones)."""
    from byol.jobs.pretrain import pretrain

    run = tmp_path_factory.mktemp("finished") / "run"
    pretrain(compose_config("train", ["experiment=smoke", "monitor=off", "checkpoint.keep_last=2"], run), run)
    return run


def _copy(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to, symlinks=True))


@pytest.mark.slow
def test_a_new_run_never_replaces_a_runs_weights(finished_run, tmp_path):
    """last.ckpt deleted to save space: the same command again started a new run over encoder.pt."""
    run = _copy(finished_run, tmp_path / "run")
    (run / "checkpoints" / "last.ckpt").unlink()
    before = _contents(run)
    result = _train("experiment=smoke", "monitor=off", "seed=5", f"hydra.run.dir={run}")
    assert result.returncode == 1 and result.stderr.startswith(f"error: '{run}' holds a run's weights"), result.stderr
    assert f"resume={run}/checkpoints/epoch0002.ckpt" in result.stderr and "Traceback" not in result.stderr
    assert _contents(run) == before


@pytest.mark.slow
def test_an_earlier_checkpoint_is_not_continued_over_its_runs_later_state(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    before = _contents(run)
    result = _train(f"resume={run}/checkpoints/epoch0001.ckpt", "trainer.max_epochs=3")
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: '{run}/checkpoints/epoch0001.ckpt' (step 4) is behind its run's "
                                    f"{run}/checkpoints/last.ckpt (step 8)"), result.stderr
    assert _contents(run) == before
    branch = tmp_path / "branch"  # the way the message points to: a new folder
    result = _train(f"resume={run}/checkpoints/epoch0001.ckpt", f"hydra.run.dir={branch}")
    assert result.returncode == 0 and (branch / "encoder.pt").is_file(), result.stderr[-2000:]
    assert _contents(run) == before


@pytest.mark.slow
def test_a_refused_resume_leaves_a_finished_run_as_it_was(finished_run, tmp_path):
    """A resume refused before training (another architecture, a logger package missing) marked the finished
    run FAILED and rewrote its config.yaml: a sweep's evaluation then listed it as failed or unfinished."""
    run = _copy(finished_run, tmp_path / "run")
    before = _contents(run)
    result = _train(f"resume={run}", "trainer.max_epochs=3", "loss=multi")
    assert result.returncode == 1 and "cannot resume" in result.stderr, result.stderr[-2000:]
    assert _contents(run) == before and not (run / "FAILED").exists()
    (run / "FAILED").write_text("non-finite loss at step 3\n")  # a run whose training failed stays failed
    result = _train(f"resume={run}", "loss=multi")
    assert result.returncode == 1 and (run / "FAILED").read_text() == "non-finite loss at step 3\n"


@pytest.mark.slow
def test_resume_of_a_sweep_folder_says_how_to_continue_a_sweep(tmp_path):
    """It said "start it again without resume=", and the job wrote FAILED, a lock and a log into the sweep."""
    from byol.core.errors import CheckpointError
    from byol.jobs.resume import find_resume

    sweep = tmp_path / "sweep"
    (sweep / "0_loss=classic" / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")  # a real sweep's record: it was told to
    # write a single run elsewhere (hydra.run.dir=NEW, which the command did not give), not how to continue
    with pytest.raises(CheckpointError, match=rf"is a sweep folder; continue a sweep by running its command "
                                              rf"again with -m hydra.sweep.dir={sweep} .*"
                                              rf"\"resume='{sweep}/0_loss=classic'\""):
        find_resume(str(sweep), tmp_path)
    result = run_here("train.py", f"resume={sweep}")
    assert result.returncode == 1 and result.stderr.startswith(f"error: resume='{sweep}' is a sweep folder; ")
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in sweep.iterdir()) == ["0_loss=classic", "multirun.yaml"]  # nothing written


def test_a_single_job_into_a_sweeps_folder_is_refused_before_anything_is_written(tmp_path):
    """evaluate.py hydra.run.dir=<a training sweep> rewrote the sweep's multirun.yaml and its folder read as one
    of the sweep's jobs (every later evaluation of the sweep listed a missing job); any single job is refused
    there, before Hydra writes its record. Re-evaluating into an evaluation's own folder stays allowed."""
    sweep = tmp_path / "sweep"
    (sweep / "0_loss=classic" / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for job in ("train", "evaluate"):
        with pytest.raises(FolderTakenError, match=rf"'{sweep}' holds a sweep \(multirun.yaml, its jobs' folders\)"):
            check_job_folder(sweep, job)
    result = run_here("evaluate.py", "preset=smoke", "data=synthetic", "pretrained=random", "eval=knn",
                      f"hydra.run.dir={sweep}")
    assert result.returncode == 1 and "holds a sweep" in result.stderr and "Traceback" not in result.stderr
    assert (sweep / "multirun.yaml").read_text() == "hydra:\n  mode: MULTIRUN\n"
    assert sorted(p.name for p in sweep.iterdir()) == ["0_loss=classic", "multirun.yaml"]
    evaluation = tmp_path / "evaluation"  # an evaluation of a sweep: result folders, no multirun.yaml
    (evaluation / "0_loss=classic").mkdir(parents=True)
    (evaluation / "0_loss=classic" / "config.yaml").write_text("eval:\n  name: knn\n")
    check_job_folder(evaluation, "evaluate")


def test_a_sweep_into_a_folder_of_another_kind_of_job_is_refused_before_anything_is_written(tmp_path, capsys):
    """evaluate.py -m hydra.sweep.dir=<a training sweep> replaced the training sweep's multirun.yaml and put
    evaluation jobs among its runs; a sweep into a single job's folder did the same to that job. Both are
    refused in one line before Hydra writes; a sweep into a sweep of its own kind (a resumed or re-evaluated
    sweep) and into a new or empty folder go on."""
    from byol.jobs.command_line import check_command_line

    training = tmp_path / "training"
    _run_folder(training / "0_loss=classic")
    (training / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    evaluations = tmp_path / "evaluations"
    (evaluations / "0_eval=knn").mkdir(parents=True)
    (evaluations / "0_eval=knn" / "config.yaml").write_text("eval:\n  name: knn\n")
    refused = [("evaluate", training, "a pretraining sweep (its job '0_loss=classic'); an evaluation sweep"),
               ("train", evaluations, "an evaluation sweep (its job '0_eval=knn'); a pretraining sweep"),
               ("evaluate", training / "0_loss=classic", "a single pretraining job's output"),
               ("train", evaluations / "0_eval=knn", "a single evaluation job's output")]
    for job, folder, held in refused:
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        with pytest.raises(SystemExit) as stop:
            check_command_line(["-m", f"hydra.sweep.dir='{folder}'"], job)
        error = capsys.readouterr().err
        assert stop.value.code == 1 and error.startswith(f"error: '{folder}' holds {held}"), error
        assert "hydra.sweep.dir=NEW" in error and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    (tmp_path / "empty").mkdir()
    for job, folder in [("train", training), ("evaluate", evaluations), ("train", tmp_path / "empty"),
                        ("evaluate", tmp_path / "new")]:
        check_command_line(["-m", f"hydra.sweep.dir='{folder}'"], job)  # no exit
    assert (training / "multirun.yaml").read_text() == "hydra:\n  mode: MULTIRUN\n"


def test_a_jobs_kind_is_read_from_its_files_before_its_config(tmp_path, monkeypatch):
    """Weights say pretraining and results.json says evaluation without parsing config.yaml (14 ms a job: a
    3,000-job sweep was checked for 41 s); a folder with neither is told by its config's keys."""
    from byol.jobs import run_folder

    kinds = {"train": ("encoder.pt", "eval:\n  name: knn\n"), "evaluate": ("results.json", "loss:\n  name: x\n")}
    for kind, (name, config) in kinds.items():  # the files decide even against the config's keys
        (tmp_path / kind).mkdir()
        (tmp_path / kind / name).write_bytes(b"{}")
        (tmp_path / kind / "config.yaml").write_text(config)
    for kind, config in [("train", "loss:\n  name: multi\n"), ("evaluate", "eval:\n  name: knn\n"), (None, "a: 1\n")]:
        (tmp_path / f"config_{kind}").mkdir()
        (tmp_path / f"config_{kind}" / "config.yaml").write_text(config)
    (tmp_path / "empty").mkdir()
    parsed = []
    read = run_folder.raw_run_config
    monkeypatch.setattr(run_folder, "raw_run_config", lambda folder: parsed.append(folder.name) or read(folder))
    assert [run_folder.job_kind(tmp_path / n) for n in ("train", "evaluate")] == ["train", "evaluate"] and parsed == []
    found = {n: run_folder.job_kind(tmp_path / n) for n in ("config_train", "config_evaluate", "config_None", "empty")}
    assert found == {"config_train": "train", "config_evaluate": "evaluate", "config_None": None, "empty": None}
