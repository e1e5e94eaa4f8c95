"""run_job's FAILED file (a re-run job starts clean; a refusal before training leaves a run's own state) and the
sweep record kept through a DDP job, in this process."""

from __future__ import annotations

import pytest
from conftest import compose_config

from byol.core.errors import ByolError, CheckpointError
from byol.jobs.cli import _failed, run_job, sweep_record_kept


def test_a_job_run_again_in_its_folder_drops_the_earlier_failure(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "FAILED").write_text("non-finite loss at step 3\n")
    cfg = compose_config("train", ["experiment=smoke"], run)
    assert run_job(lambda cfg, run_dir: f"trained in {run_dir}", cfg) == f"trained in {run}"
    assert not (run / "FAILED").exists()  # a sweep's evaluation would list the finished run as failed


def test_a_failure_before_training_in_a_run_folder_keeps_the_runs_own_state(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "encoder.pt").write_bytes(b"weights")  # a run's folder
    refused = CheckpointError("cannot resume: another architecture")
    refused.nothing_trained = True
    _failed(run, True, refused)
    assert not (run / "FAILED").exists()  # a finished run stays finished
    _failed(run, True, refused, earlier_failure="non-finite loss at step 3\n")
    assert (run / "FAILED").read_text() == "non-finite loss at step 3\n"  # a failed run stays failed, as it was
    _failed(run, True, ByolError("non-finite loss at step 9"))  # it trained, then failed: recorded
    assert (run / "FAILED").read_text() == "non-finite loss at step 9\n"
    fresh = tmp_path / "fresh"  # nothing there to keep: the refusal is the job's failure
    fresh.mkdir()
    _failed(fresh, True, refused)
    assert (fresh / "FAILED").read_text() == "cannot resume: another architecture\n"
    assert capsys.readouterr().err.count("error: ") == 4
    with pytest.raises(SystemExit) as exit_:  # a single run exits with the error's status
        _failed(fresh, False, refused)
    assert exit_.value.code == refused.exit_code == 1


def test_the_sweep_record_is_kept_through_a_job(tmp_path):
    record = tmp_path / "multirun.yaml"
    record.write_bytes(b"rank 0's record\n")
    with sweep_record_kept(record):
        record.write_bytes(b"another process's copy\n")
    assert record.read_bytes() == b"rank 0's record\n"
    with sweep_record_kept(record):
        record.unlink()
    assert record.read_bytes() == b"rank 0's record\n"
    with sweep_record_kept(None):  # not a DDP sweep: nothing kept or written
        pass
    absent = tmp_path / "none.yaml"
    with sweep_record_kept(absent):
        pass
    assert not absent.exists()


@pytest.mark.parametrize("environment", [{}, {"SLURM_PROCID": "3"}, {"LOCAL_RANK": "1", "SLURM_PROCID": "3"},
                                         {"RANK": "2", "LOCAL_RANK": "1"}, {"JSM_NAMESPACE_RANK": "5"}])
def test_the_rank_before_lightning_is_loaded_is_the_one_lightning_reads(monkeypatch, environment):
    """A job's folder is held before the job loads Lightning: the rank is then read from the environment,
    in Lightning's order (SLURM sets SLURM_PROCID also for processes it does not start)."""
    import sys

    from lightning_fabric.utilities.rank_zero import _get_rank

    from byol.jobs.cli import RANK_VARIABLES, job_named, launched_rank

    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delitem(sys.modules, "pytorch_lightning.utilities.rank_zero", raising=False)
    assert launched_rank() == (_get_rank() or 0) == int(next(iter(environment.values()), 0))
    assert job_named("os.path", "join")("a", "b") == "a/b"  # imported when called
