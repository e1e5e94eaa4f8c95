"""The warm-up + cosine schedule's floor (final_ratio)."""

from __future__ import annotations

import math

import pytest
import torch

from byol.core.optim import warmup_cosine


def test_warmup_cosine_decays_to_final_ratio_of_the_rate():
    """lr x (r + (1 - r) x (1 + cos(pi t)) / 2) after the warm-up: the full rate, then r x lr at the end."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    scheduler = warmup_cosine(opt, total_steps=12, warmup_steps=2, final_ratio=0.1)
    rates = []
    for _ in range(13):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert rates[:2] == pytest.approx([1.0, 2.0])
    assert rates[2:] == pytest.approx([2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 10))) for k in range(11)])
    assert rates[7] == pytest.approx(2.0 * 0.55) and rates[12] == pytest.approx(0.2)
