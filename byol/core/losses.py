"""BYOL regression loss and its symmetric, multi-head sums."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``2 - 2 cos(p, z)`` (eq. 2 of the paper): 0 if aligned, 4 if opposite.

    The target is detached here, so no gradient can ever reach the target network.
    """
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target.detach().float(), dim=-1)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()


def symmetric_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """The paper's symmetrised loss: view 1 predicts view 2's target and vice versa.

    The two directions are *summed*, as in the paper (L + L~), not averaged: averaging halves
    the gradient and so silently halves the effective learning rate. Range [0, 8].
    """
    return regression_loss(p1, z2) + regression_loss(p2, z1)


def weighted_sum(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Sum of per-head losses, each scaled by its configured weight (default 1)."""
    return sum(weights.get(name, 1.0) * loss for name, loss in losses.items())


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: the per-dimension std over the batch of the L2-normalised outputs,
    averaged over dimensions and scaled by sqrt(dim).

    About 1 when the outputs spread over the sphere (isotropic Gaussian vectors give 1), 0 when
    every image maps to the same point: the collapse that BYOL's loss alone cannot reveal, since
    a collapsed network can still predict its target perfectly (Chen & He, 2021, sec. 4.1).
    """
    z = F.normalize(z.detach().float(), dim=-1)
    return z.std(dim=0).mean() * z.shape[-1] ** 0.5
