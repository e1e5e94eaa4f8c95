"""The BYOL network: target initialisation, heads per tap, weighted multi-head loss, separate views."""

import copy

import pytest
import torch

from byol.core.backbone import Encoder, _key
from byol.core.losses import normalized_std, regression_loss
from byol.core.model import BYOL
from byol.jobs.build import build_byol

HEADS = ["avgpool", "layer2.0", "layer3.0"]
WEIGHTS = {"avgpool": 0.5, "layer2.0": 2.0, "layer3.0": 0.25}


def tiny_multi(weights=None) -> BYOL:
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "imagenet", ["layer2.0", "layer3.0"], {"layer2.0": 4, "layer3.0": 2})
    return BYOL(encoder, HEADS, weights, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16)


def views(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)


def test_target_is_an_untrainable_copy_of_the_online_network():
    model = tiny_multi()
    pairs = [(model.target_encoder, model.online_encoder), (model.target_projectors, model.online_projectors)]
    for target, online in pairs:
        t_state, o_state = target.state_dict(), online.state_dict()
        assert t_state.keys() == o_state.keys()
        for k in o_state:
            assert torch.equal(t_state[k], o_state[k]), k  # copied, not freshly initialised
            assert t_state[k].data_ptr() != o_state[k].data_ptr(), k  # a copy, not shared storage
        assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in model.online_encoder.parameters())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"online_encoder", "online_projectors", "predictors"}


# experiment=smoke is half width: half of ResNet-18's 512 / 2048 / 1024 and ResNet-50's 2048 / 8192 / 4096
@pytest.mark.parametrize(("name", "dims"), [("resnet18", (256, 1024, 512)),
                                            ("resnet50", (1024, 4096, 2048))])
def test_multi_loss_has_one_head_pair_per_tap(smoke_config, name, dims):
    cfg = smoke_config("loss=multi", f"backbone={name}")
    cfg["head"] = {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16}
    model = build_byol(cfg)
    assert model.heads == HEADS
    for head, dim in zip(HEADS, dims, strict=True):
        key = _key(head)
        assert model.online_projectors[key][0].in_features == dim
        assert model.target_projectors[key][0].in_features == dim
        assert model.predictors[key][0].in_features == 8 and model.predictors[key][-1].out_features == 8
    expected_keys = {_key(h) for h in HEADS}
    for pairs in (model.online_projectors, model.target_projectors, model.predictors):
        assert set(pairs) == expected_keys


def test_classic_loss_has_only_the_avgpool_head(smoke_config):
    cfg = smoke_config("loss=classic")
    cfg["head"] = {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16}
    model = build_byol(cfg)
    assert model.heads == ["avgpool"] and set(model.predictors) == {"avgpool"}
    out = model(*views())
    assert set(out) == {"loss", "loss/avgpool", "std/avgpool"}
    torch.testing.assert_close(out["loss"], out["loss/avgpool"])


def reference_head_losses(model: BYOL, v1, v2) -> dict:
    """Per-head symmetric losses computed step by step, each view through the networks alone."""
    losses = {}
    for h in model.heads:
        k = _key(h)
        z1 = model.online_projectors[k](model.online_encoder(v1)[h])
        z2 = model.online_projectors[k](model.online_encoder(v2)[h])
        with torch.no_grad():
            t1 = model.target_projectors[k](model.target_encoder(v1)[h])
            t2 = model.target_projectors[k](model.target_encoder(v2)[h])
        p1, p2 = model.predictors[k](z1), model.predictors[k](z2)
        losses[h] = regression_loss(p1, t2) + regression_loss(p2, t1)
    return losses


def test_loss_is_the_weighted_sum_of_head_losses():
    model = tiny_multi(WEIGHTS).train()
    with torch.no_grad():  # a target unlike the online network: the targets must come from the target side
        for p in [*model.target_encoder.parameters(), *model.target_projectors.parameters()]:
            p.add_(0.5 * torch.randn_like(p))
    reference, online_targets = copy.deepcopy(model), copy.deepcopy(model)
    online_targets.update_target(0.0)  # its target a copy of its online network
    v1, v2 = views()
    out = model(v1, v2)
    assert not torch.allclose(out["loss"], online_targets(v1, v2)["loss"])  # the check below is sensitive
    assert set(out) == {"loss"} | {f"{kind}/{h}" for h in HEADS for kind in ("loss", "std")}
    expected = reference_head_losses(reference, v1, v2)
    for h in HEADS:
        torch.testing.assert_close(out[f"loss/{h}"], expected[h], rtol=1e-5, atol=1e-6)
    weighted = sum(WEIGHTS[h] * out[f"loss/{h}"] for h in HEADS)
    torch.testing.assert_close(out["loss"], weighted)
    unweighted = sum(out[f"loss/{h}"] for h in HEADS)
    assert not torch.allclose(out["loss"], unweighted)  # the weights matter


def test_views_pass_separately_in_train_mode():
    model = tiny_multi().train()
    reference = copy.deepcopy(model)
    seen = []
    model.online_projectors["avgpool"].register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    v1, v2 = views()
    model(v1, v2)
    assert len(seen) == 2  # one online projection per view
    with torch.no_grad():
        alone = reference.online_projectors["avgpool"](reference.online_encoder(v1)["avgpool"])
        joint = reference.online_projectors["avgpool"](
            reference.online_encoder(torch.cat([v1, v2]))["avgpool"])[: len(v1)]
    torch.testing.assert_close(seen[0], alone, rtol=1e-5, atol=1e-5)
    # with BatchNorm in train mode, a joint batch would give other values: the check above is sensitive
    assert not torch.allclose(joint, alone, rtol=1e-3, atol=1e-3)


def test_update_target_moves_target_towards_online():
    """Encoder and projectors, weights and float buffers: target = tau x target + (1 - tau) x online."""
    model = tiny_multi()
    with torch.no_grad():
        for p in [*model.online_encoder.parameters(), *model.online_projectors.parameters()]:
            p.add_(1.0)
        for b in [*model.online_encoder.buffers(), *model.online_projectors.buffers()]:
            if b.is_floating_point():
                b.add_(0.5)  # BatchNorm running statistics follow the EMA too
    pairs = {"encoder": (model.target_encoder, model.online_encoder),
             "projectors": (model.target_projectors, model.online_projectors)}
    before = {name: {k: v.clone() for k, v in target.state_dict().items()} for name, (target, _) in pairs.items()}
    model.update_target(0.75)
    for name, (target, online) in pairs.items():
        online_state = online.state_dict()
        for k, v in target.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, 0.75 * before[name][k] + 0.25 * online_state[k], msg=f"{name} {k}")
                assert not torch.equal(v, before[name][k]), f"{name} {k} did not move"
            else:  # BatchNorm's batch counter: copied
                assert torch.equal(v, online_state[k])


def test_heads_must_be_encoder_taps():
    encoder = Encoder("resnet18", "imagenet")
    with pytest.raises(ValueError, match="layer2.0"):
        BYOL(encoder, ["avgpool", "layer2.0"], proj_hidden_dim=8, proj_dim=4, pred_hidden_dim=8)


def test_collapse_monitor_reads_the_online_projections_of_view_one():
    model = tiny_multi(WEIGHTS).train()
    reference = copy.deepcopy(model)
    v1, v2 = views()
    out = model(v1, v2)
    for h in HEADS:
        z1 = reference.online_projectors[_key(h)](reference.online_encoder(v1)[h])
        torch.testing.assert_close(out[f"std/{h}"], normalized_std(z1), rtol=1e-5, atol=1e-6)
        assert not out[f"std/{h}"].requires_grad  # a monitor, never part of the loss
