"""Exponential moving average of the online network and its tau schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from byol.core.errors import ConfigError


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target = tau * target + (1 - tau) * online`` for every parameter and float buffer.

    One fused ``torch._foreach_lerp_`` call per tensor list instead of a Python loop.
    Integer buffers (BatchNorm's batch counter) are copied.
    """
    t_params = [p for p in target.parameters()]
    o_params = [p for p in online.parameters()]
    t_float = t_params + [b for b in target.buffers() if b.is_floating_point()]
    o_float = o_params + [b for b in online.buffers() if b.is_floating_point()]
    if len(t_float) != len(o_float):
        raise ValueError("target and online networks differ in structure")
    if t_float:
        torch._foreach_lerp_(t_float, o_float, 1.0 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        if not t.is_floating_point():
            t.copy_(o)


def cosine_tau(step: int, total_steps: int, tau_base: float) -> float:
    """BYOL's schedule: ``1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2``; tau_base at 0, 1 at K."""
    if total_steps <= 0:
        return tau_base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def tau_at(step: int, total_steps: int, tau_base: float, schedule: str = "cosine") -> float:
    """tau for optimizer step ``step``; ``constant`` reproduces the original fixed tau."""
    if schedule == "constant":
        return tau_base
    if schedule == "cosine":
        return cosine_tau(step, total_steps, tau_base)
    raise ConfigError(f"unknown ema.tau_schedule '{schedule}'; choose 'cosine' or 'constant'")
