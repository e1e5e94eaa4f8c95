"""What the job builds from the config, value by value: the learning rate of the global batch (accumulation
included), the crop side blur=auto looks at, the trainer settings adjusted for the hardware, the wandb
default, and the numbers of the run's first lines (global batch, schedule, where a resume starts)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config, plain_config

from byol.jobs.build import _logger_kwargs, scaled_lr, trainer_for_this_machine
from byol.jobs.build_views import crop_side, view_settings
from byol.jobs.pretrain import RunStart
from byol.jobs.pretrain_fit import announce, build_module


def test_lr_is_not_scaled_where_the_optimizer_says_so():
    adam = {"base_lr": 1e-3, "scale_lr_with_batch": False}
    assert scaled_lr(adam, 512, accumulate=2, world_size=4) == 1e-3
    assert scaled_lr({**adam, "scale_lr_with_batch": True}, 512, accumulate=2, world_size=4) == pytest.approx(16e-3)


def test_the_built_module_scales_lr_by_the_accumulated_batch(tmp_path):
    """trainer.accumulate_grad_batches=2 at batch 32 on one device: a global batch of 64, lr = base x 64 / 256."""
    config = plain_config(compose_config("train", ["experiment=smoke", "backbone.width=0.125",
                                                   "trainer.accumulate_grad_batches=2", "optim.base_lr=2.0",
                                                   "monitor=off"], tmp_path))
    torch.manual_seed(0)
    module = build_module(config)
    module._trainer = SimpleNamespace(estimated_stepping_batches=4, num_training_batches=8, accumulate_grad_batches=2,
                                      max_epochs=2, world_size=1)
    optimizer = module.configure_optimizers()["optimizer"]
    rates = [g["lr"] for g in optimizer.param_groups]
    assert len(rates) == 2 and rates == pytest.approx([2.0 * 32 * 2 / 256] * 2)


def test_blur_auto_looks_at_the_crop_not_the_image():
    """96-px images cropped to 32: CIFAR-sized views, no blur (and 32-px images cropped to 64: the paper's)."""
    assert crop_side({"image_size": 96, "crop_size": 32}) == 32
    assert crop_side({"image_size": 96}) == 96 and crop_side({}) == 32
    views = view_settings({"blur_p": "auto", "view1": {}, "view2": {}}, crop_side({"image_size": 96, "crop_size": 32}))
    assert [v["blur_p"] for v in views] == [0.0, 0.0]
    views = view_settings({"blur_p": "auto", "view1": {}, "view2": {}}, crop_side({"image_size": 32, "crop_size": 64}))
    assert [v["blur_p"] for v in views] == [1.0, 0.1]


def test_wandb_stays_offline_unless_told_otherwise(tmp_path):
    """A logger config without `offline` (written before the key) must not send a run over the network."""
    assert _logger_kwargs("wandb", {"name": "wandb"}, tmp_path)["offline"] is True
    assert _logger_kwargs("wandb", {"name": "wandb", "offline": False}, tmp_path)["offline"] is False


def test_sync_batchnorm_is_turned_off_on_cpu_only(capsys):
    ddp = {"sync_batchnorm": True, "accelerator": "cpu", "strategy": "ddp", "devices": 2}
    assert trainer_for_this_machine(ddp, "[t]") == {**ddp, "sync_batchnorm": False}
    assert capsys.readouterr().out.startswith("[t] note: trainer.sync_batchnorm needs GPUs")
    alone = trainer_for_this_machine({"sync_batchnorm": True, "accelerator": "cpu"}, "[t]")  # a DDP run resumed on one
    assert alone == {"sync_batchnorm": False, "accelerator": "cpu"} and capsys.readouterr().out == ""  # nothing to say
    gpu = {"sync_batchnorm": True, "accelerator": "gpu"}
    assert trainer_for_this_machine(gpu, "[t]") == gpu and capsys.readouterr().out == ""


class Batches(list):
    @property
    def data(self):
        return [0] * (16 * len(self))


def announced(capsys, tmp_path: Path, *, world=1, accumulate=1, epochs=4, horizon=None, start=None,
              batches=8) -> str:
    config = {"backbone": {"name": "resnet18", "stem": "cifar", "width": 1.0}, "loss": {"taps": []},
              "data": {"batch_size": 16}, "schedule_epochs": horizon,
              "trainer": {"max_epochs": epochs, "precision": "32-true", "accumulate_grad_batches": accumulate}}
    trainer = SimpleNamespace(world_size=world, precision="32-true", accumulate_grad_batches=accumulate,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    capsys.readouterr()
    announce(config, tmp_path, trainer, start or RunStart(config), Batches(range(batches)))
    return capsys.readouterr().out


def test_the_first_line_gives_the_global_batch_of_every_process_and_accumulation(capsys, tmp_path):
    out = announced(capsys, tmp_path, world=2, accumulate=2)
    assert "128 images, batch 16 per process x 2 processes (global batch 64), 4 epochs" in out
    assert "128 images, batch 16, 4 epochs" in announced(capsys, tmp_path)


def test_a_schedule_as_long_as_the_run_is_said_nowhere(capsys, tmp_path):
    out = announced(capsys, tmp_path, epochs=4, horizon=4)
    assert "4 epochs, on cpu" in out and "tau schedule" not in out and "note:" not in out
    assert "4 epochs (of a 6-epoch learning-rate and tau schedule)" in announced(capsys, tmp_path, horizon=6)
    assert "[byol] note: schedule_epochs=3 is fewer than the run's 4 epochs" in announced(capsys, tmp_path, horizon=3)


def test_where_a_resume_starts_counts_the_steps_of_one_process(capsys, tmp_path):
    """8 batches of the whole epoch over 2 processes: 4 steps an epoch, so step 6 is 2 batches into epoch 2."""
    start = RunStart({}, Path("ck/last.ckpt"), 6)
    assert "resuming from ck/last.ckpt: step 6 (epoch 2, 2 of 4 batches done)" in \
        announced(capsys, tmp_path, world=2, start=start)
    assert "resuming from ck/last.ckpt: step 6 (epoch 2, 2 of 4 batches done)" in \
        announced(capsys, tmp_path, accumulate=2, start=start)


def test_a_resume_counts_the_last_incomplete_accumulation_as_a_step(capsys, tmp_path):
    """5 batches accumulating 2: Lightning steps on the epoch's last, incomplete accumulation too, so an epoch
    is 3 optimizer steps and step 3 is the end of epoch 1 (it said "epoch 2, 1 of 2 batches done")."""
    from byol.lightning.callbacks import optimizer_steps_per_epoch

    assert [optimizer_steps_per_epoch(b, 2) for b in (1, 4, 5, 6)] == [1, 2, 3, 3]
    start = RunStart({}, Path("ck/last.ckpt"), 3)
    out = announced(capsys, tmp_path, accumulate=2, start=start, batches=5)
    assert "resuming from ck/last.ckpt: step 3 (the end of epoch 1)" in out


def test_more_cpu_processes_than_cores_get_one_note(monkeypatch, capsys):
    """A run trained on 8 GPUs and resumed on a 2-core machine started 8 DDP processes there without a word."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    trainer_for_this_machine({"strategy": "ddp", "devices": 8, "num_nodes": 2, "accelerator": "cpu"}, "[byol]")
    assert "[byol] note: trainer.devices=8 starts 8 processes on the 2 cores of this machine" in capsys.readouterr().out
    for fits in ({"strategy": "ddp", "devices": 2, "num_nodes": 4, "accelerator": "cpu"},  # 2 per node
                 {"strategy": "auto", "devices": 1, "accelerator": "cpu"}):
        trainer_for_this_machine(fits, "[byol]")
        assert "cores" not in capsys.readouterr().out


def test_float16_mixed_precision_on_cpu_is_bf16_without_lightnings_warning(capsys):
    """Lightning fell back to bf16-mixed itself, with a warning of several lines naming its own source file
    (training's announcement already said so in one line)."""
    for asked in ("16-mixed", "16"):
        assert trainer_for_this_machine({"precision": asked, "accelerator": "cpu"}, "[byol]")["precision"] == \
            "bf16-mixed"
    assert trainer_for_this_machine({"precision": "32-true", "accelerator": "cpu"}, "[byol]")["precision"] == \
        "32-true"


CPUINFO = "processor\t: 0\nmodel name\t: {name}\nflags\t\t: fpu sse2 avx2 {extra}\n"


def test_precision_auto_is_bf16_only_where_the_hardware_has_it():
    """bf16 autocast on a CPU without bf16 instructions took 5x as long as float32 per step (2-core AMD EPYC,
    AVX2 only: 23 against 110-126 images/s for experiment=smoke); the old default ran it there."""
    from byol.core.features import cpu_has_bf16_instructions, machine_precision

    assert not cpu_has_bf16_instructions(CPUINFO.format(name="AMD EPYC", extra="avx512f"))
    assert cpu_has_bf16_instructions(CPUINFO.format(name="Intel Xeon", extra="amx_tile amx_bf16"))
    assert cpu_has_bf16_instructions(CPUINFO.format(name="AMD EPYC 9654", extra="avx512f avx512_bf16"))
    assert not cpu_has_bf16_instructions("model name : amx_bf16 in a name, not a flag\n")
    assert machine_precision("auto", on_gpu=False, cpu_bf16=False) == "32-true"
    assert machine_precision("auto", on_gpu=False, cpu_bf16=True) == "bf16-mixed"
    assert machine_precision("auto", on_gpu=True, gpu_bf16=True, cpu_bf16=False) == "bf16-mixed"
    assert machine_precision("auto", on_gpu=True, gpu_bf16=False) == "16-mixed"  # a V100
    for asked in ("bf16-mixed", "32-true", "16-mixed"):  # a precision asked for is kept, even where it is slow
        assert machine_precision(asked, on_gpu=False, cpu_bf16=False) == asked


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_precision_auto_is_recorded_as_chosen_and_said_once(monkeypatch, capsys, bf16_cpu):
    """The run's config.yaml and results.json hold the precision that ran (a resume keeps it; the report tells a
    32-bit evaluation from a bf16 one); a CPU that takes float32 says why in one line."""
    import byol.core.features as features
    from byol.jobs.build import build_trainer, resolve_precision

    monkeypatch.setattr(features, "cpu_has_bf16_instructions", lambda: bf16_cpu)
    config = {"trainer": {"precision": "auto", "accelerator": "cpu"}}
    resolve_precision(config, "[byol]")
    chosen = "bf16-mixed" if bf16_cpu else "32-true"
    assert config["trainer"]["precision"] == chosen
    out = capsys.readouterr().out
    assert out.count("trainer.precision=auto is 32-true on this CPU") == (0 if bf16_cpu else 1)
    asked = {"trainer": {"precision": "bf16-mixed", "accelerator": "cpu"}}
    resolve_precision(asked, "[byol]")
    assert asked["trainer"]["precision"] == "bf16-mixed" and not capsys.readouterr().out
    # a trainer built from a config that never went through a job resolves it too (Lightning knows no "auto")
    trainer = build_trainer({"precision": "auto", "accelerator": "cpu", "max_epochs": 1}, logger=False,
                            enable_checkpointing=False)
    assert trainer.precision == chosen
