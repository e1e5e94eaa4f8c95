"""run_job's FAILED file (a re-run job starts clean; a refusal before training leaves a run's own state) and the
sweep record kept through a DDP job, in this process."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_a_single_evaluation_ends_naming_its_results_file(tmp_path, capsys):
    """It ended on the scores ("linear on avgpool -> val 0.8800, test 0.7344"), never saying where they went."""
    from byol.jobs.evaluate import evaluate

    cfg = compose_config("evaluate", ["preset=smoke", "data=synthetic", f"outputs_dir={tmp_path / 'outputs'}",
                                      "pretrained=random", "eval=knn"], tmp_path)
    evaluate(cfg, tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert " -> val " in lines[-2] and lines[-1] == f"[eval] results: {tmp_path / 'run' / 'results.json'}"
    assert (tmp_path / "run" / "results.json").is_file()



def test_a_sweep_evaluated_in_one_job_ends_naming_its_folder_and_report(tmp_path, capsys):
    """`evaluate.py pretrained=SWEEP_DIR` (one job, no -m) ended on the last model's scores, never saying where
    the results went: its last line names the folder and the report command, as one model's names its file."""
    from test_evaluation import _export

    from byol.jobs.evaluate import evaluate

    sweep = tmp_path / "sweep"
    _export(sweep / "0_seed=0"), _export(sweep / "1_seed=1", seed=1)
    cfg = compose_config("evaluate", ["preset=smoke", "data=synthetic", f"pretrained={sweep}", "eval=knn",
                                      "baseline=false"], tmp_path)
    evaluate(cfg, tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert "1_seed=1: knn on avgpool -> val " in lines[-2]
    assert lines[-1] == (f"[eval] results: {tmp_path / 'run'} (a folder per model); its report: python -m "
                         f"byol.report {tmp_path / 'run'}")
    assert sorted(p.parent.name for p in (tmp_path / "run").glob("*/results.json")) == ["0_seed=0", "1_seed=1"]

def _sweep_end(sweep, job_name: str, task: list | None = None) -> None:
    from omegaconf import OmegaConf

    from byol.jobs.hydra_callbacks import SweepSummary

    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "job": {"name": job_name},
                                                               "overrides": {"task": task or []}}}))


def test_a_training_sweep_that_would_train_a_job_again_under_another_number_is_refused(tmp_path):
    """loss=classic,multi seed=0 into a folder, then seed=0,1 into the same one: Hydra numbered multi/seed 0 as
    job 2 the second time, and it was trained again beside its finished self (1_...), without a word. Refused
    before Hydra starts now; the same command again (its finished jobs skipped) and a new folder are not."""
    import yaml

    from byol.jobs.sweep_plan import renumbered_jobs

    sweep = tmp_path / "sweep"
    for number, loss in enumerate(("classic", "multi")):
        hydra = sweep / f"{number}_loss={loss},seed=0" / ".hydra"
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text(yaml.safe_dump([f"loss={loss}", "seed=0"]))
    again = ["-m", "loss=classic,multi", "seed=0", f"hydra.sweep.dir={sweep}"]
    assert renumbered_jobs(again, sweep) is None
    assert renumbered_jobs(["-m", "seed=0", "loss=classic,multi", f"hydra.sweep.dir={sweep}"], sweep) is None
    more = ["-m", "loss=classic,multi", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    assert renumbered_jobs(more, sweep).startswith(
        "error: this sweep would train loss=multi seed=0 again as job 2: it has a folder already (1_loss=multi,seed=0)")
    assert renumbered_jobs(["-m", "loss=multi,classic", "seed=0"], sweep).startswith(
        "error: this sweep would train loss=multi again as job 0")
    assert renumbered_jobs(more, tmp_path / "new") is None


def test_a_sweep_command_counts_only_its_own_failed_jobs(tmp_path, capsys):
    """A job that failed in an earlier command into the same sweep folder, and that this command did not run again
    (another seed list), made every later command end with "1 job(s) of the sweep failed" and status 1. It is a
    note now; a job this command ran and that failed (its FAILED rewritten, even with the same text) still fails it."""
    from omegaconf import OmegaConf

    from byol.jobs.hydra_callbacks import SweepSummary

    sweep = tmp_path / "sweep"
    (sweep / "1_batch=200").mkdir(parents=True)
    old = sweep / "1_batch=200" / "FAILED"
    old.write_text("data.batch_size=200 is larger than the dataset\n")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "job": {"name": "train"}}})
    summary = SweepSummary()
    summary.on_multirun_start(config)
    summary.on_multirun_end(config)  # this command ran another job, which finished
    assert capsys.readouterr().err == ("[train] note: 1 job(s) of an earlier command in this sweep folder failed and "
                                       "were not run again by this one: 1_batch=200\n")
    summary.on_multirun_start(config)
    old.unlink()  # the job run again (cli.run_job removes FAILED first), failing the same way
    old.write_text("data.batch_size=200 is larger than the dataset\n")
    os.utime(old, ns=(old.stat().st_atime_ns, old.stat().st_mtime_ns + 1))  # a later time, as a real job has
    with pytest.raises(SystemExit) as exit_:
        summary.on_multirun_end(config)
    assert exit_.value.code == 1 and "error: 1 of the " in capsys.readouterr().err


def test_an_evaluation_sweep_ends_naming_its_folder_and_the_report_command(tmp_path, capsys):
    """After evaluate.py -m, one line says where the sweep is and how to report it; failures still exit 1 after
    being listed; a training sweep's end says nothing of a report (no job of it holds weights here)."""
    sweep = tmp_path / "eval sweep"
    (sweep / "0_eval=knn" / ".hydra").mkdir(parents=True)
    (sweep / "0_eval=knn" / "results.json").write_text("{}")
    _sweep_end(sweep, "evaluate")
    said = f"[eval] sweep: {sweep}; its report: python -m byol.report '{sweep}'\n"
    assert capsys.readouterr() == (said, "")
    _sweep_end(sweep, "train")
    assert capsys.readouterr() == ("", "")
    (sweep / "1_eval=linear").mkdir()
    (sweep / "1_eval=linear" / "FAILED").write_text("1 of 3 evaluations failed (classic0)\n")
    with pytest.raises(SystemExit) as exit_:
        _sweep_end(sweep, "evaluate")
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert out == said and err == (f"error: 1 of the 2 job(s) of the sweep in {sweep} failed (the others finished):\n"
                                   "  1_eval=linear: 1 of 3 evaluations failed (classic0)\n")


def test_an_evaluation_sweep_without_a_result_does_not_offer_its_report(tmp_path, capsys):
    """An evaluation sweep whose every job failed before evaluating a model (pretrained= named nothing to evaluate)
    ended "its report: python -m byol.report SWEEP", and that report is an error line (no results.json): the
    line says there is nothing to report, and the failures follow."""
    sweep = tmp_path / "eval sweep"
    (sweep / "0_preset=smoke").mkdir(parents=True)
    (sweep / "0_preset=smoke" / "FAILED").write_text("no pretraining run in '/nowhere'\n")
    with pytest.raises(SystemExit) as exit_:
        _sweep_end(sweep, "evaluate")
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert out == f"[eval] sweep: {sweep}; no results.json to report: no job evaluated a model (below)\n"
    assert err == (f"error: 1 of the 1 job(s) of the sweep in {sweep} failed:\n"  # no others to have finished
                   "  0_preset=smoke: no pretraining run in '/nowhere'\n")
    (sweep / "0_preset=smoke" / "run").mkdir()  # a model that failed has a results.json: the report lists it
    (sweep / "0_preset=smoke" / "run" / "results.json").write_text('{"status": "failed"}')
    with pytest.raises(SystemExit):
        _sweep_end(sweep, "evaluate")
    assert capsys.readouterr().out == f"[eval] sweep: {sweep}; its report: python -m byol.report '{sweep}'\n"


@pytest.mark.parametrize("value, hint", [
    ("resnet101", "any torchvision ResNet is backbone.name=resnet101"),  # no group option, but backbone.name takes it
    ("resnet19", "did you mean backbone=resnet18?"),  # no ResNet: backbone.name=resnet19 was refused in turn
    ("resnet5", "did you mean backbone=resnet50?"),
])
def test_backbone_name_is_advised_only_for_a_resnet_it_takes(value, hint):
    from byol.jobs.command_line import unknown_option

    assert unknown_option([f"backbone={value}"], "train") == (
        f"error: backbone={value} is not an option of backbone ({hint}); choose one of: resnet18, resnet50")


def test_a_training_sweep_ends_naming_its_folder_and_the_command_that_evaluates_it(tmp_path, capsys):
    """train.py -m ended on its last job's 'done' line: the sweep's folder and the next command were left to the
    README. Now one line gives both, once a job of the sweep holds weights; failed jobs are still listed after."""
    sweep = tmp_path / "train sweep"
    (sweep / "0_loss=classic").mkdir(parents=True)
    _sweep_end(sweep, "train")
    assert capsys.readouterr() == ("", "")  # no weights yet: nothing to evaluate
    (sweep / "0_loss=classic" / "encoder.pt").write_bytes(b"weights")
    (sweep / "1_loss=multi").mkdir()
    (sweep / "1_loss=multi" / "FAILED").write_text("non-finite loss at step 3\n")
    with pytest.raises(SystemExit):
        _sweep_end(sweep, "train")
    out, err = capsys.readouterr()
    assert out == (f"[train] sweep: {sweep}; evaluate it: python evaluate.py -m pretrained='{sweep}' "
                   f"repr=avgpool,combined eval=linear,finetune (then python -m byol.report on the evaluation's "
                   f"sweep folder)\n")
    assert "1_loss=multi: non-finite loss at step 3" in err
    (sweep / "1_loss=multi" / "FAILED").unlink()
    _sweep_end(sweep, "train", ["experiment=smoke", "loss=classic,multi"])  # at the smoke scale: not 50 epochs
    assert "eval=linear,finetune preset=smoke (then" in capsys.readouterr().out


def test_suggested_commands_name_the_script_by_its_path_outside_the_repository(tmp_path, monkeypatch):
    """The resume, evaluate and train-longer commands the jobs print said `python train.py`, which fails when
    pasted in another folder than the repository's (where the script was started by its path)."""
    from byol.jobs.console import REPO, script_command

    monkeypatch.chdir(REPO)
    assert script_command("train.py") == "python train.py"
    monkeypatch.chdir(tmp_path)
    assert script_command("evaluate.py") == f"python {REPO / 'evaluate.py'}"
    assert script_command("no_such_script.py") == "python no_such_script.py"  # installed without the scripts


def test_an_evaluation_of_a_sweep_stopped_by_a_signal_says_which_runs_have_no_result(tmp_path, capsys):
    """A sweep's evaluation stopped after its first run left the others without a result, and the report (which
    sees results only) said the cells it had were complete. A STOPPED file names them; the report lists it under
    the table; evaluating again removes it."""
    import signal

    from byol.core.errors import Interrupted
    from byol.jobs.evaluate import _evaluate_sweep
    from byol.jobs.report_files import jobs_without_result

    sweep, out = tmp_path / "sweep", tmp_path / "ev" / "0_eval=knn"
    targets = []
    for name in ("0_seed=0", "1_seed=1", "2_seed=2"):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "encoder.pt").write_bytes(b"weights")
        targets.append(sweep / name / "encoder.pt")
    out.mkdir(parents=True)
    (out / "evaluate.log").write_text("")

    def evaluate_one(path, out_dir, label):
        if label != "0_seed=0":
            raise Interrupted("received SIGINT", signal.SIGINT)
        return {"status": "ok", "label": label}

    with pytest.raises(Interrupted):
        _evaluate_sweep(targets, sweep, {"baseline": True, "seed": 0}, evaluate_one, out, data=None)
    said = "stopped with 1 of 3 runs evaluated; no result for 1_seed=1, 2_seed=2 and the random-init baselines"
    assert (out / "STOPPED").read_text() == said + "\n"
    assert jobs_without_result([tmp_path / "ev"]) == [(out, said)]
    assert f"[report] note: {out} was stopped: {said}" in capsys.readouterr().err
    _evaluate_sweep(targets[:1], sweep, {"baseline": False, "seed": 0}, evaluate_one, out, data=None)
    assert not (out / "STOPPED").exists()  # evaluated again: no longer stopped


def test_an_evaluation_of_another_training_sweep_into_an_evaluation_folder_is_refused(tmp_path):
    """Job folders are named by run (0_loss=classic,seed=0), so evaluating sweep B into the folder of sweep A's
    evaluation replaced A's results of the same names, kept its others, and the report averaged both. Refused
    before Hydra writes into the folder; the same sweep evaluated again, or an empty folder, passes."""
    import json

    from byol.jobs.command_folders import other_sweeps_evaluation

    a, b, ev = tmp_path / "a", tmp_path / "b", tmp_path / "ev"
    for sweep in (a, b):
        (sweep / "0_seed=0").mkdir(parents=True)
        (sweep / "multirun.yaml").write_text("hydra: {}\n")
    model = ev / "0_eval=knn" / "0_seed=0"
    model.mkdir(parents=True)
    (ev / "0_eval=knn" / ".hydra").mkdir()
    (model / "results.json").write_text(json.dumps({"pretrained": str(a / "0_seed=0" / "encoder.pt"),  # as written
                                                    "repr": "avgpool", "eval": "knn", "status": "ok", "test_acc": 0.5}))
    argv = [f"pretrained={b}", "eval=knn", f"hydra.sweep.dir={ev}", "-m"]
    assert other_sweeps_evaluation(argv, ev) == (
        f"error: '{ev / '0_eval=knn'}' holds an evaluation of another training sweep ({a}), not of {b}: the runs of "
        f"both would meet in one table; evaluate into another folder (hydra.sweep.dir=NEW), or remove that folder "
        f"first")
    assert other_sweeps_evaluation([f"pretrained={a}", *argv[1:]], ev) is None
    assert other_sweeps_evaluation(argv, tmp_path / "new") is None


@pytest.mark.parametrize("job, overrides, refusal", [
    ("train", ["experiment=smoke", "optim.optimizer.eta=-1"], "error: optim.optimizer.eta must be above 0"),
    ("train", ["experiment=smoke", "+trainer.foo=1"], "error: refusing the command line: trainer.foo = 1 is not a "
                                                      "Trainer argument"),
    ("evaluate", ["preset=smoke", "eval.optimizer.momentum=5"], "error: eval.optimizer.momentum must lie in [0, 1)"),
])
def test_a_refused_job_leaves_no_run_folder_it_made(tmp_path, capsys, job, overrides, refusal):
    """A command refused before any work left outputs/<kind>/<time>/ behind with Hydra's .hydra/, a log and FAILED
    (listed among the runs afterwards): the time-stamped folder it made goes. A folder it did not make, or one
    holding anything else, keeps the refusal in its FAILED."""
    from byol.jobs.cli import command_line_keys, job_named, new_folder

    fn = job_named(*{"train": ("byol.jobs.pretrain", "pretrain"), "evaluate": ("byol.jobs.evaluate", "evaluate")}[job])
    for extra in (None, "notes.txt"):
        folder = Path(new_folder(str(tmp_path / extra if extra else tmp_path / "outputs" / job / "2026-12-03_06-42")))
        (folder / ".hydra").mkdir()  # as Hydra writes it before the job starts
        (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
        if extra:
            (folder / extra).write_text("mine\n")
        cfg = compose_config(job, [*overrides, f"hydra.job.name={job}"], folder)
        with pytest.raises(SystemExit) as exit_:
            run_job(fn, cfg, requested=command_line_keys())
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.count("\n") == 1 and err.startswith(refusal), err
        if extra:  # not only what the refused job wrote: kept, with the reason
            assert (folder / extra).is_file() and (folder / "FAILED").read_text() == err[len("error: "):]
        else:
            assert not folder.exists() and folder.parent.is_dir()


def test_a_refused_sweep_job_keeps_its_failed_file(tmp_path, capsys):
    """A sweep's job folder keeps FAILED: the sweep's summary lists the job's failure from it."""
    from byol.jobs.cli import new_folder

    folder = Path(new_folder(str(tmp_path / "sweep-job")))
    refused = CheckpointError("cannot resume: another architecture")
    refused.nothing_trained = True
    _failed(folder, True, refused, log=folder / "train.log")
    assert (folder / "FAILED").read_text() == "cannot resume: another architecture\n"
