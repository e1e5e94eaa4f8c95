"""MLP projector and predictor heads (Grill et al., 2020, section 3.3)."""

from torch import nn


def mlp(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Linear, the shape of both BYOL heads.

    The paper uses 4096 hidden and 256 output units for the projector and the predictor.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
