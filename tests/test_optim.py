"""LARS against hand-computed steps, parameter grouping, and the learning-rate schedules."""

import math

import pytest
import torch
from torch import nn

from byol.core.optim import LARS, constant, param_groups, warmup_cosine

LR, MOMENTUM, ETA, WD = 0.5, 0.9, 0.02, 0.1


def test_lars_matches_hand_computed_steps():
    """trust ratio = eta ||w|| / (||g|| + wd ||w||), applied to g + wd w, then SGD momentum."""
    w = nn.Parameter(torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    g = torch.tensor([[0.3, 0.0], [0.4, 0.0]], dtype=torch.float64)  # ||g|| = 0.5
    opt = LARS([w], lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA, eps=0.0)

    # step 1 by hand: ratio = 0.02 * 5 / (0.5 + 0.1 * 5) = 0.1
    # update = 0.1 * (g + 0.1 w) = [[0.04, 0.02], [0.06, 0.04]]; w -= 0.5 * update
    w.grad = g.clone()
    opt.step()
    expected1 = torch.tensor([[0.98, 1.99], [1.97, 3.98]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expected1, rtol=0, atol=1e-12)

    # step 2: the momentum buffer carries step 1's update
    buf1 = torch.tensor([[0.04, 0.02], [0.06, 0.04]], dtype=torch.float64)
    w_norm = math.sqrt(sum(v * v for v in (0.98, 1.99, 1.97, 3.98)))
    ratio2 = ETA * w_norm / (0.5 + WD * w_norm)
    buf2 = MOMENTUM * buf1 + ratio2 * (g + WD * expected1)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), expected1 - LR * buf2, rtol=0, atol=1e-12)


def test_lars_zero_weight_gets_plain_sgd_step():
    """A zero-norm tensor has no scale to trust: ratio 1 instead of 0 (it would never move)."""
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    w.grad = torch.full((2, 2), 0.5, dtype=torch.float64)
    LARS([w], lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -LR * 0.5, dtype=torch.float64))


def test_excluded_group_is_sgd_with_momentum_without_weight_decay():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    reference = nn.Linear(3, 2)
    reference.load_state_dict(net.state_dict())
    # LARS defaults carry a weight decay; the excluded group's own 0.0 must win
    lars = LARS(param_groups([net], weight_decay=0.5), lr=LR, momentum=MOMENTUM, weight_decay=0.5, eta=ETA)
    sgd = torch.optim.SGD([reference.bias], lr=LR, momentum=MOMENTUM)
    start = net.bias.detach().clone()
    for step in range(3):
        grad = torch.randn(2, generator=torch.Generator().manual_seed(step))
        net.bias.grad, reference.bias.grad = grad.clone(), grad.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(net.bias.detach(), reference.bias.detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(net.bias.detach(), start)  # it moved


def test_param_groups_put_one_dimensional_params_in_the_excluded_group():
    conv, bn, fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    decay, excluded = param_groups([nn.Sequential(conv, bn), fc, frozen], weight_decay=1e-5)
    assert {id(p) for p in decay["params"]} == {id(conv.weight), id(fc.weight)}
    assert {id(p) for p in excluded["params"]} == {id(conv.bias), id(bn.weight), id(bn.bias), id(fc.bias)}
    assert decay["weight_decay"] == 1e-5 and not decay.get("lars_exclude", False)
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True


def learning_rates(make_scheduler, steps: int, lr: float = 2.0) -> list[float]:
    """The learning rate in force at optimizer steps 0..steps (one scheduler step per optimizer step)."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_shape():
    total, warmup, lr = 25, 5, 2.0
    lrs = learning_rates(lambda o: warmup_cosine(o, total_steps=total, warmup_steps=warmup), total, lr)
    # linear warm-up reaching the full rate at its last step
    assert lrs[:warmup] == pytest.approx([lr * (k + 1) / warmup for k in range(warmup)])
    # then half a cosine: full rate, half at the midpoint, 0 at the end
    assert lrs[warmup] == pytest.approx(lr)
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx(lr / 2)
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    for k in range(warmup, total + 1):
        assert lrs[k] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))
    assert all(b < a for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))


def test_warmup_cosine_without_warmup_starts_at_full_rate():
    lrs = learning_rates(lambda o: warmup_cosine(o, total_steps=10), 10)
    assert lrs[0] == pytest.approx(2.0) and lrs[10] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_after_warmup():
    lrs = learning_rates(lambda o: constant(o, total_steps=10, warmup_steps=4), 10)
    assert lrs == pytest.approx([0.5, 1.0, 1.5] + [2.0] * 8)
