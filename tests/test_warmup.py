"""The warm-up cap: a configured warm-up longer than 10% of the run (byol.jobs.build.MAX_WARMUP_FRACTION)
is shortened to 10%, so the schedule still reaches its peak and decays, and one line says so."""

from __future__ import annotations

import math

import pytest
import torch

from byol.jobs.build import optimizer_factory, warmup_steps
from byol.lightning.pretrain_module import schedule_span

SGD = {"name": "sgd", "base_lr": 0.4, "scale_lr_with_batch": False, "weight_decay": 0.0,
       "optimizer": {"momentum": 0.9}, "scheduler": {"name": "warmup_cosine", "warmup_epochs": 10}}


def learning_rates(optim: dict, total_steps: int, epochs: int) -> list[float]:
    """The rate of every optimizer step of a run of ``total_steps`` over ``epochs``."""
    optimizer, scheduler = optimizer_factory(optim, batch_size=256)([torch.nn.Linear(2, 2)], total_steps, epochs)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_a_warm_up_longer_than_the_run_is_capped_and_the_schedule_decays(capsys):
    # 1 epoch of 100 steps with 10 warm-up epochs: without the cap, the rate would climb for 1,000
    # steps and the run would end at a tenth of the peak, never decaying
    rates = learning_rates(SGD, total_steps=100, epochs=1)
    peak = 0.4
    assert rates[:10] == pytest.approx([peak * (k + 1) / 10 for k in range(10)])  # 10% of 100 steps
    assert rates[10] == pytest.approx(peak)
    assert rates[10:] == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * (k - 10) / 90)) for k in range(10, 100)])
    assert rates[-1] < 0.001 * peak
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[byol] optim.scheduler.warmup_epochs=10 (1000 steps) is more than 10% of this run (1 epoch, "
                     "100 steps), so the schedule cannot run as written: using a warm-up of 10 steps instead, then "
                     "warmup_cosine over the other 90 steps"]


def test_a_warm_up_within_the_cap_runs_as_written(capsys):
    # 10 warm-up epochs of 100 (exactly 10%), and of 200 (the default LARS run: 5%)
    for epochs in (100, 200):
        rates = learning_rates(SGD, total_steps=2 * epochs, epochs=epochs)
        assert rates[:20] == pytest.approx([0.4 * (k + 1) / 20 for k in range(20)])
        assert rates[20] == pytest.approx(0.4)
    assert capsys.readouterr().out == ""


def test_warmup_steps_values():
    assert warmup_steps(10, 400 * 200, 200, "warmup_cosine") == (4000, None)  # 5%: as written
    steps, line = warmup_steps(2, 300, 3, "constant")  # 200 of 300 steps: capped at 30
    assert steps == 30 and "using a warm-up of 30 steps instead, then constant over the other 270 steps" in line
    steps, line = warmup_steps(10, 8, 1, "warmup_cosine")  # too short a run for any warm-up
    assert steps == 0 and "using no warm-up instead" in line
    assert warmup_steps(0, 8, 1, "warmup_cosine") == (0, None)


def test_a_capped_constant_schedule_warms_up_then_holds(capsys):
    optim = {**SGD, "scheduler": {"name": "constant", "warmup_epochs": 5}}
    rates = learning_rates(optim, total_steps=40, epochs=2)  # 100 configured steps, 4 used
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4] + [0.4] * 36)
    assert capsys.readouterr().out.count("[byol] optim.scheduler.warmup_epochs=5 (100 steps)") == 1


def test_schedule_epochs_stretch_an_epoch_bounded_run_and_leave_a_step_bounded_one_alone():
    # 30 epochs of 196 steps on a 40-epoch schedule (experiment=cpu trains 25 of 40)
    assert schedule_span(30 * 196, 30, 196, 40) == (40, 40 * 196)
    assert schedule_span(30 * 196, 30, 196, None) == (30, 30 * 196)
    assert schedule_span(30 * 196, 30, 196, 30) == (30, 30 * 196)  # not longer: the run's own
    assert schedule_span(30 * 196, 30, 196, 20) == (30, 30 * 196)
    # trainer.max_steps cuts the run short: the schedule still spans 40 whole epochs
    assert schedule_span(100, 30, 196, 40) == (40, 40 * 196)
    # and without schedule_epochs it spans the run's 30 planned epochs, not its 100 capped steps: max_steps beside
    # max_epochs is a stop, and resume= continues the cut run to the plan's end
    assert schedule_span(100, 30, 196, None) == (30, 30 * 196)
    # max_epochs=-1 (a run of max_steps alone, as benchmarks/throughput.py runs it): its own 20 steps,
    # never a negative count
    assert schedule_span(20, -1, 196, 40) == (1, 20)
    assert schedule_span(20, None, 196, None) == (1, 20)


def test_a_schedule_shorter_than_the_run_is_said_and_the_run_keeps_its_own(tmp_path, capsys):
    """schedule_epochs only lengthens the schedules; a smaller value was ignored without a word."""
    from conftest import compose_config

    from byol.jobs.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(compose_config("train", ["experiment=smoke", "trainer.max_epochs=2", "schedule_epochs=1",
                                      "monitor=off", "data.num_train=64"], run), run)
    out = capsys.readouterr().out
    assert ("[byol] note: schedule_epochs=1 is fewer than the run's 2 epochs; the learning-rate and tau "
            "schedules span the run's 2 (schedule_epochs only lengthens them)") in out
    # the epoch line shows the last step's rate: still above 0 on the run's own cosine (a 1-epoch one had ended)
    last = out.split("epoch 2/2:")[1]
    assert ", lr 0, " not in last and float(last.split(", lr ")[1].split(",")[0]) > 0
