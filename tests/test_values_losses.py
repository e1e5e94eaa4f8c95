"""Values of the collapse monitor, the heads' layers and the features BYOL keeps for the online probes."""

from __future__ import annotations

import copy

import pytest
import torch

from byol.core.backbone import Encoder
from byol.core.heads import mlp
from byol.core.losses import normalized_std
from byol.core.model import BYOL


def test_normalized_std_is_the_spread_over_the_batch_per_dimension():
    """By hand: rows e1, e2, e1 have per-dimension (unbiased) stds sqrt(1/3) each, so the monitor is
    sqrt(1/3) x sqrt(2) = 0.8165; a spread over each row's entries instead would read 1.0."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    assert normalized_std(z).item() == pytest.approx((1 / 3) ** 0.5 * 2 ** 0.5, abs=1e-6)
    # every image on one (non-constant) direction: collapsed, whatever its entries
    same = torch.tensor([[1.0, 2.0, 3.0, -4.0]]).repeat(16, 1) * torch.linspace(0.5, 3.0, 16).view(16, 1)
    assert normalized_std(same).item() == pytest.approx(0.0, abs=1e-6)


def test_mlp_is_linear_batchnorm_relu_linear_with_the_papers_widths():
    torch.manual_seed(0)
    head = mlp(6, 10, 4).train()
    with torch.no_grad():  # BatchNorm's affine parameters away from their identity start
        head[1].weight.uniform_(0.5, 2.0)
        head[1].bias.uniform_(-1.0, 1.0)
    x = torch.randn(8, 6)
    h = x @ head[0].weight.t()  # no bias before a BatchNorm
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + head[1].eps) * head[1].weight + head[1].bias
    expected = torch.relu(h) @ head[3].weight.t() + head[3].bias
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    assert head[0].bias is None and len(head) == 4
    default = mlp(32)  # 4096 hidden, 256 out (Grill et al., 2020, section 3.3)
    assert (default[0].out_features, default[1].num_features, default[3].out_features) == (4096, 4096, 256)


def test_byol_heads_default_to_4096_hidden_and_256_out():
    encoder = Encoder("resnet18", "imagenet", width=0.125)
    model = BYOL(encoder)
    projector, predictor = model.online_projectors["avgpool"], model.predictors["avgpool"]
    assert (projector[0].in_features, projector[0].out_features, projector[3].out_features) == (64, 4096, 256)
    assert (predictor[0].in_features, predictor[0].out_features, predictor[3].out_features) == (256, 4096, 256)


def test_probe_features_are_view_ones_online_features_detached():
    """BYOL.last_features (what the online probes train on): view 1 through the online encoder."""
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "imagenet", ["layer2.0"], {"layer2.0": 2}, width=0.125)
    model = BYOL(encoder, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16).train()
    model.feature_taps = ["avgpool", "layer2.0"]
    with torch.no_grad():  # a target unlike the online encoder: the features must be the online ones
        for p in model.target_encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    model(v1, v2)
    with torch.no_grad():
        expected = reference.online_encoder(v1, taps=["avgpool", "layer2.0"])
        other_view = reference.online_encoder(v2, taps=["avgpool", "layer2.0"])
    assert set(model.last_features) == {"avgpool", "layer2.0"}
    for tap, features in model.last_features.items():
        assert not features.requires_grad
        torch.testing.assert_close(features, expected[tap], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(features, other_view[tap], rtol=1e-3, atol=1e-3)

