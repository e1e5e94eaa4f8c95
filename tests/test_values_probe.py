"""The cached linear probe's optimizer: SGD-Nesterov, cosine from the full rate without warm-up, stepped
once per mini-batch."""

from __future__ import annotations

import math

import pytest
import torch

from byol.core.linear_probe import nesterov_cosine, train_linear_probe


def test_nesterov_cosine_steps_are_nesterov_and_the_rate_a_cosine_without_warm_up():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = nesterov_cosine([{"params": [p], "lr": 0.2, "weight_decay": 0.0}], 10, 5)
    rates = []
    for step in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        if step == 0:
            p.grad = torch.tensor([1.0, -2.0])
            optimizer.step()
            # Nesterov, momentum 0.9: buffer g, step g + 0.9 g = 1.9 g (plain momentum: g)
            torch.testing.assert_close(p.detach(), -0.2 * 1.9 * torch.tensor([1.0, -2.0]))
        scheduler.step()
    assert rates == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)])


def test_probe_schedule_runs_to_its_end_over_training():
    """3 epochs of 2 mini-batches: 6 scheduler steps, ending the cosine at lr 0."""
    made = []

    def recording(groups, total_steps, steps_per_epoch):
        made.append((total_steps, steps_per_epoch, *nesterov_cosine(groups, total_steps, steps_per_epoch)))
        return made[-1][2:]

    g = torch.Generator().manual_seed(0)
    split = (torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))
    train_linear_probe(split, split, split, 3, epochs=3, batch_size=16, lr=0.1, make_optimizer=recording)
    ((total, per_epoch, optimizer, scheduler),) = made
    assert (total, per_epoch) == (6, 2)
    assert scheduler.last_epoch == 6
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0, 0.0], abs=1e-12)
