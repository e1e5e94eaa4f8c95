"""Value tests for the jobs layer's recent checks, each written against a mutant the rest of the suite let through
(a hand-made mutation audit of byol/jobs since f5ecc9f): the processes a trainer config asks for at their edges,
what counts as a launcher, the logger's package, the precision kept on GPUs, and the other checks named below."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from byol.core.errors import ConfigError
from byol.jobs import build
from byol.jobs.build import check_devices, check_launcher, check_logger_package, requested_processes

TWO_NODES = {"strategy": "ddp", "accelerator": "cpu", "devices": 1, "num_nodes": 2}


def installed(monkeypatch, **packages: bool) -> None:
    """importlib.util.find_spec answers for ``packages`` as given (found or not), for the others as it does."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (find_spec("json") if packages[name] else None)
                        if name in packages else find_spec(name, *a))


# --------------------------------------------------------------------------- processes and devices


def test_every_gpu_of_a_machine_without_gpus_is_still_one_process(monkeypatch):
    """devices=-1 on accelerator=gpu where torch sees none: one process, never 0 (an epoch of 0 processes divided by
    zero when its steps were planned)."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert requested_processes({"devices": -1, "accelerator": "gpu"}) == 1
    assert requested_processes({"devices": "auto", "accelerator": "gpu", "num_nodes": 2}) == 2


def test_devices_up_to_4096_are_taken_and_no_more():
    check_devices({"devices": 4096})
    check_devices({"devices": list(range(4096))})
    for devices in (4097, "4097", list(range(4097))):
        with pytest.raises(ConfigError, match=r"is not a number of devices \(1 to 4096"):
            check_devices({"devices": devices})


# --------------------------------------------------------------------------- what counts as a launcher


def test_a_slurm_allocation_named_bash_is_no_launcher(no_launcher):
    """salloc's shell (job name bash) sets SLURM_NTASKS too; Lightning ignores it there, and so does the check."""
    no_launcher.setenv("SLURM_NTASKS", "2")
    no_launcher.setenv("SLURM_JOB_NAME", "bash")
    with pytest.raises(ConfigError, match="^trainer.num_nodes=2 needs the same command on every node"):
        check_launcher(TWO_NODES)
    no_launcher.setenv("SLURM_JOB_NAME", "train")  # srun in a batch job
    check_launcher(TWO_NODES)


def test_mpirun_is_a_launcher_only_with_mpi4py(no_launcher):
    """Lightning's MPI environment needs mpi4py: without it mpirun's variables start nothing Lightning joins."""
    no_launcher.setenv("OMPI_COMM_WORLD_SIZE", "2")
    installed(no_launcher, mpi4py=False)
    with pytest.raises(ConfigError, match="needs the same command on every node"):
        check_launcher(TWO_NODES)
    installed(no_launcher, mpi4py=True)
    check_launcher(TWO_NODES)


def test_local_rank_alone_marks_a_launched_process(no_launcher):
    no_launcher.setenv("LOCAL_RANK", "0")
    check_launcher(TWO_NODES)


# --------------------------------------------------------------------------- the logger's package, the precision


def test_tensorboard_needs_either_of_its_packages(monkeypatch):
    """Lightning's TensorBoardLogger takes tensorboard or tensorboardX: one of them is enough."""
    installed(monkeypatch, tensorboard=True, tensorboardX=False)
    check_logger_package({"name": "tensorboard"})
    installed(monkeypatch, tensorboard=False, tensorboardX=True)
    check_logger_package({"name": "tensorboard"})
    installed(monkeypatch, tensorboard=False, tensorboardX=False)
    with pytest.raises(ConfigError, match=r"^TensorBoardLogger cannot start \(No module named 'tensorboard'\)"):
        check_logger_package({"name": "tensorboard"})


def test_float16_mixed_precision_stays_on_gpus(monkeypatch):
    """Only CPUs lack float16 autocast: a GPU run keeps the precision it asked for."""
    monkeypatch.setattr(build, "note_crowded_cpu", lambda trainer, tag: None)
    for asked in ("16-mixed", "16"):
        assert build.trainer_for_this_machine({"precision": asked, "accelerator": "gpu"}, "[t]")["precision"] == asked


# --------------------------------------------------------------------------- configs in files


def test_a_config_of_more_values_than_any_run_writes_is_refused_however_shallow():
    """The depth bound alone let a wide file through: 2**20 values 21 levels deep were walked one by one."""
    from byol.jobs.config_check import check_file_config

    check_file_config({"seed": 0, "zz": list(range(99_990))}, "f")
    with pytest.raises(ConfigError, match="^refusing f: its config holds more than 100000 values or nests deeper"):
        check_file_config({"seed": 0, "zz": list(range(100_001))}, "f")


def test_synthetic_data_takes_its_limits_themselves():
    """100,000 images a split and one training image a class are what data=synthetic offers, not beyond."""
    from byol.jobs.value_ranges import check_synthetic_size

    check_synthetic_size({"name": "synthetic", "num_train": 100_000, "num_test": 100_000, "num_classes": 100_000}, "s")
    check_synthetic_size({"name": "synthetic", "num_train": 10, "num_classes": 10}, "s")
    with pytest.raises(ConfigError, match=r"^data.num_test=100001 is more than synthetic data offers \(100,000"):
        check_synthetic_size({"name": "synthetic", "num_train": 10, "num_test": 100_001}, "s")
    with pytest.raises(ConfigError, match="^data.num_classes=11 is more than data.num_train=10: each class needs a"):
        check_synthetic_size({"name": "synthetic", "num_train": 10, "num_classes": 11}, "s")


# --------------------------------------------------------------------------- run folders


def test_a_run_stopped_before_its_first_checkpoint_is_still_a_pretraining_run(tmp_path):
    """Its config.yaml (with a loss) is all it holds: evaluating into it would overwrite that config."""
    from byol.jobs.run_folder import FolderTakenError, check_job_folder, job_kind

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("loss:\n  name: classic\nseed: 0\n")
    assert job_kind(run) == "train"
    with pytest.raises(FolderTakenError, match="holds a pretraining run"):
        check_job_folder(run, "evaluate")
    check_job_folder(run, "train")


def test_brackets_inside_quoted_text_do_not_count_as_nesting(tmp_path):
    from byol.jobs.run_folder import raw_run_config

    text = "[" * 80 + "{" * 80
    (tmp_path / "config.yaml").write_text(f"data:\n  root: '/data/{text}'\nnote: \"{text}\"\n")
    assert raw_run_config(tmp_path) == {"data": {"root": f"/data/{text}"}, "note": text}


def test_a_config_nested_deeper_than_64_levels_by_indentation_is_refused(tmp_path):
    """Block style nests by indentation, with no bracket to count: 70 levels are refused, 60 are read."""
    from byol.jobs.run_folder import raw_run_config

    for levels, refused in ((60, False), (70, True)):
        nested = "".join(f"{'  ' * i}k{i}:\n" for i in range(levels)) + "  " * levels + "1\n"
        (tmp_path / "config.yaml").write_text(nested)
        if refused:
            with pytest.raises(ConfigError, match="it is nested deeper than 64 levels"):
                raw_run_config(tmp_path)
        else:
            assert "k0" in raw_run_config(tmp_path)


# --------------------------------------------------------------------------- the console


def test_the_job_log_gets_the_console_lines_but_not_a_progress_bars_redraws():
    import io

    from byol.jobs.console import _CopyTo

    console, log = io.StringIO(), io.StringIO()
    copy = _CopyTo(console, log)
    assert copy.write("Epoch 1:  50%|#####     |\r") == 26
    copy.write("[byol] epoch 1/2\n")
    assert console.getvalue() == "Epoch 1:  50%|#####     |\r[byol] epoch 1/2\n"
    assert log.getvalue() == "[byol] epoch 1/2\n"


def test_a_column_no_panel_draws_does_not_stop_the_figure():
    """A metrics.csv column outside the panels (epoch seconds, a logger's own) is never drawn: its size is no reason
    to leave the run out of the curves."""
    from byol.jobs.curves import undrawable

    assert undrawable({"train/epoch_seconds": [(1.0, 1e308)], "train/loss/avgpool": [(1.0, 0.5)]}) is None
    assert undrawable({"train/loss/avgpool": [(1.0, 1e308)]}) == \
        "train/loss/avgpool = 1e+308 at epoch 1, beyond the ±1e+300 a figure can draw"


# --------------------------------------------------------------------------- evaluation settings


def test_the_linear_protocol_is_the_cached_probe_unless_told_otherwise():
    """eval.cached_features absent means the cached probe: eval.lr (the augmented protocol's) does nothing there."""
    from byol.jobs.evaluation_checks import refuse_other_protocol_settings

    with pytest.raises(ConfigError, match="^eval.lr applies to the augmented linear protocol only"):
        refuse_other_protocol_settings(["eval.lr"], {"name": "linear"})
    refuse_other_protocol_settings(["eval.cached_lr"], {"name": "linear"})


def test_a_protocol_run_in_rank_0_alone_needs_no_launcher(no_launcher):
    """kNN and embed run in one process: the nodes a DDP trainer config names are never started, so nothing waits
    for them; fine-tuning, which trains through Lightning on every node, is refused."""
    from byol.jobs.evaluation_checks import check_processes

    check_processes({"trainer": TWO_NODES, "eval": {"name": "knn"}})
    with pytest.raises(ConfigError, match="^trainer.num_nodes=2 needs the same command on every node"):
        check_processes({"trainer": TWO_NODES, "eval": {"name": "finetune", "batch_size": 8}})


def test_the_results_settings_leave_out_how_a_score_is_computed():
    """The kNN's chunk_size changes the memory a score takes, not the score: two chunk sizes are one protocol."""
    from byol.jobs.results_json import result_fields

    cfg = {"eval": {"name": "knn", "k": 20, "epochs": 3, "chunk_size": 512}, "repr": {"name": "avgpool"}, "seed": 0,
           "data": {"name": "cifar10"}, "split": {"name": "holdout", "val_size": 10}}
    assert result_fields("random", None, cfg)["eval_settings"] == {"k": 20}


# --------------------------------------------------------------------------- the command line


def test_a_misspelt_group_is_named_with_the_group_it_resembles():
    from byol.jobs.command_line import misspelt_key

    assert misspelt_key(["expriment=smoke"], "train") == (
        "error: expriment is not a setting; did you mean experiment? (python train.py --cfg job prints every setting, "
        "--help the groups)")


def test_a_trainer_argument_the_jobs_set_themselves_is_not_advised_with_a_plus():
    """+trainer.callbacks=... would be refused in turn: the advice is for arguments the project passes on."""
    from byol.jobs.command_line import _trainer_hint

    assert _trainer_hint("detect_anomaly") == "; another Trainer argument: +trainer.detect_anomaly=VALUE"
    for reserved in ("callbacks", "logger", "default_root_dir"):
        assert "+trainer." not in _trainer_hint(reserved)


def test_ctrl_c_while_starting_is_one_line_and_status_130(monkeypatch, capsys):
    import sys

    from byol.jobs.command_line import run_script

    def main():
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    with pytest.raises(SystemExit) as stop:
        run_script(main, "evaluate")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "[evaluate] interrupted (Ctrl+C) while starting; nothing was evaluated\n"


def test_no_data_setting_or_one_needs_no_tag():
    """No run evaluated leaves no data setting for a baseline: no tags (a max() over none raised before)."""
    from byol.jobs.evaluation_data import data_tags

    assert data_tags([]) == []
    assert data_tags([{"name": "cifar10", "subset": 64}]) == [""]
    two = [{"name": "cifar10", "subset": 64}, {"name": "cifar10", "subset": 128}]
    assert data_tags(two) == ["_subset64", "_subset128"]


# --------------------------------------------------------------------------- the run's trainer and monitors


def test_per_step_rows_are_logged_at_least_once_an_epoch(smoke_config, tmp_path):
    """trainer.log_every_n_steps=50 on an epoch of 3 steps wrote no per-step row (loss, tau, lr) at all."""
    from byol.jobs.pretrain_fit import build_run_trainer

    config = smoke_config("trainer.log_every_n_steps=50", "trainer.enable_progress_bar=false")
    assert build_run_trainer(config, tmp_path, [], [], 3).log_every_n_steps == 3
    assert build_run_trainer(config, tmp_path, [], [], 100).log_every_n_steps == 50


def test_the_first_line_names_a_width_other_than_one(capsys, tmp_path):
    import torch

    from byol.jobs.pretrain import RunStart
    from byol.jobs.pretrain_fit import announce

    trainer = SimpleNamespace(world_size=1, precision="32-true", accumulate_grad_batches=1,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    for width, said in ((0.5, "resnet18 x0.5 width (cifar stem)"), (1.0, "resnet18 (cifar stem)")):
        config = {"backbone": {"name": "resnet18", "stem": "cifar", "width": width}, "loss": {"taps": []},
                  "data": {"batch_size": 16}, "trainer": {"max_epochs": 1, "precision": "32-true"}}
        announce(config, tmp_path, trainer, RunStart(config), SimpleNamespace(data=[0] * 32))
        assert f"[byol] pretraining {said}, loss=classic" in capsys.readouterr().out


class Images:
    """Stands for a loaded split: which one the monitors were handed."""

    def __init__(self, name: str):
        self.name = name

    def by_reference(self):
        return self


@pytest.mark.parametrize("dataset, bank", [("cifar10", "the job's"), ("stl10", "loaded again")])
def test_the_monitors_take_the_jobs_training_images_only_where_they_are_the_evaluations(monkeypatch, dataset, bank):
    """STL-10's pretraining split adds its unlabelled images: the monitors' labelled bank is loaded on its own. A
    monitor config without ``enabled`` (written before the key) is on."""
    from byol.jobs import monitoring

    handed = []
    monkeypatch.setattr(monitoring, "load_split", lambda data, split, unlabelled: Images("loaded again"))
    monkeypatch.setattr(monitoring, "load_eval_data", lambda data, split, seed, train: (
        handed.append(train.name), {"train": train, "test": Images("test")})[1:] + (10,))
    monkeypatch.setattr(monitoring, "seeded_subset", lambda images, size, seed: SimpleNamespace(to=lambda d: images))
    config = {"seed": 0, "data": {"name": dataset},
              "monitor": {"val_size": 0, "bank_size": 8, "query_size": 8}}
    samples = monitoring.monitor_samples(config, Images("the job's"))
    assert handed == [bank] and samples.bank.name == bank and samples.num_classes == 10
