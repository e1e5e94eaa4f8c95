"""BYOL regression loss, its symmetric and multi-head sums, the EMA update and the tau schedule."""

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from byol.core.backbone import Encoder
from byol.core.ema import cosine_tau, ema_update, tau_at
from byol.core.errors import ConfigError
from byol.core.losses import normalized_std, regression_loss, symmetric_loss, weighted_sum
from byol.core.model import BYOL
from byol.jobs.pretrain_fit import build_datamodule, build_module

# ----------------------------------------------------------------------------- loss


def test_regression_loss_values():
    v = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.0, 4.0]])
    orthogonal = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.0, 0.0]])
    assert regression_loss(v, v).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(v, -v).item() == pytest.approx(4.0, abs=1e-6)
    assert regression_loss(v, orthogonal).item() == pytest.approx(2.0, abs=1e-6)
    # invariant to the (per-sample, positive) scale of either argument
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.rand(5, 1) * 10 + 0.1
    torch.testing.assert_close(regression_loss(a * scale, b), regression_loss(a, b))
    torch.testing.assert_close(regression_loss(a, b * 7.0), regression_loss(a, b))
    # the batch mean of 2 - 2 cos, computed another way
    expected = (2 - 2 * nn.functional.cosine_similarity(a, b, dim=1)).mean()
    torch.testing.assert_close(regression_loss(a, b), expected)


def test_symmetric_loss_is_the_sum_of_both_directions():
    """Documented choice: L + L~ summed (as the paper), not averaged (which halves the gradient)."""
    p1, p2, z1, z2 = (torch.randn(6, 4) for _ in range(4))
    total = symmetric_loss(p1, p2, z1, z2)
    torch.testing.assert_close(total, regression_loss(p1, z2) + regression_loss(p2, z1))
    assert symmetric_loss(z2, z1, z1, z2).item() == pytest.approx(0.0, abs=1e-6)
    assert symmetric_loss(-z2, -z1, z1, z2).item() == pytest.approx(8.0, abs=1e-5)


def test_weighted_sum_uses_default_weight_one():
    losses = {"avgpool": torch.tensor(1.5), "layer2.0": torch.tensor(2.0)}
    assert weighted_sum(losses, {"layer2.0": 0.25}).item() == pytest.approx(1.5 + 0.5)


def tiny_byol(taps=(), heads=("avgpool",), weights=None) -> BYOL:
    encoder = Encoder("resnet18", "imagenet", taps, {"layer2.0": 4, "layer3.0": 2})
    return BYOL(encoder, heads, weights, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16)


def test_no_gradient_reaches_the_target():
    torch.manual_seed(0)
    model = tiny_byol(["layer3.0"], ["avgpool", "layer3.0"]).train()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model(x1, x2)["loss"].backward()
    target = list(model.target_encoder.parameters()) + list(model.target_projectors.parameters())
    assert target and all(p.grad is None and not p.requires_grad for p in target)
    for part in (model.online_encoder, model.online_projectors, model.predictors):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0


def test_loss_detaches_a_target_that_requires_grad():
    p = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    regression_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


# ----------------------------------------------------------------------------- EMA update


def small_net(seed: int) -> nn.Module:
    """Parameters, float buffers (BatchNorm running stats) and an integer buffer, all set to known values."""
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(net.parameters()) + [net[1].running_mean, net[1].running_var]:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        net[1].num_batches_tracked.fill_(seed + 3)
    return net


def snapshot(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_ema_tau_zero_copies_online():
    target, online = small_net(1), small_net(2)
    ema_update(target, online, 0.0)
    for k, v in online.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_ema_tau_one_leaves_target_unchanged():
    target, online = small_net(1), small_net(2)
    before = snapshot(target)
    ema_update(target, online, 1.0)
    after = target.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(after[k], before[k]), k
    assert after["1.num_batches_tracked"].item() == 5  # integer buffers are copied, whatever tau


def test_ema_one_step_matches_formula():
    target, online = small_net(1), small_net(2)
    t, o = snapshot(target), snapshot(online)
    tau = 0.9
    ema_update(target, online, tau)
    after = target.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(after[k], tau * t[k] + (1 - tau) * o[k], rtol=0, atol=1e-6)
        assert not torch.equal(after[k], t[k])
    assert after["1.num_batches_tracked"].item() == 5 and after["1.num_batches_tracked"].dtype == torch.long
    for k, v in o.items():  # the online network is only read
        assert torch.equal(online.state_dict()[k], v)


def test_ema_rejects_different_structures():
    with pytest.raises(ValueError):
        ema_update(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), 0.5)


# ----------------------------------------------------------------------------- tau schedule


def test_cosine_schedule_end_points_and_monotonic():
    total, base = 37, 0.99
    taus = [cosine_tau(k, total, base) for k in range(total + 1)]
    assert taus[0] == base
    assert taus[-1] == 1.0  # exactly
    assert all(b > a for a, b in zip(taus, taus[1:], strict=False))
    mid = total // 2
    assert taus[mid] == pytest.approx(1 - (1 - base) * (math.cos(math.pi * mid / total) + 1) / 2)
    assert cosine_tau(2 * total, total, base) == 1.0  # clamped past the end
    assert tau_at(5, total, base, "cosine") == cosine_tau(5, total, base)


def test_constant_schedule_stays_fixed():
    assert {tau_at(k, 100, 0.99, "constant") for k in range(101)} == {0.99}
    with pytest.raises(ConfigError):
        tau_at(0, 10, 0.99, "linear")


# ----------------------------------------------------------------------------- EMA in the training loop


def test_ema_runs_once_per_optimizer_step_under_accumulation(smoke_config, monkeypatch):
    """6 micro-batches with accumulate_grad_batches=2: 3 optimizer steps, 3 EMA updates, tau from
    tau_base at step 0 to exactly 1.0 at the last step."""
    cfg = smoke_config("optim=sgd", "data.num_train=24", "data.batch_size=4")
    cfg["head"] = {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16}
    calls = []
    original = BYOL.update_target

    def counting_update(model, tau):
        online_now = [p.detach().clone() for p in model.online_encoder.parameters()][:3]
        target_before = [p.detach().clone() for p in model.target_encoder.parameters()][:3]
        calls.append((tau, online_now))
        original(model, tau)
        for t, before, online in zip(list(model.target_encoder.parameters())[:3], target_before, online_now,
                                     strict=True):
            torch.testing.assert_close(t, tau * before + (1 - tau) * online)

    monkeypatch.setattr(BYOL, "update_target", counting_update)
    torch.manual_seed(0)
    module = build_module(cfg)
    initial = [p.detach().clone() for p in module.model.online_encoder.parameters()][:3]
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                         precision="32-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=build_datamodule(cfg))
    assert trainer.global_step == 3
    assert len(calls) == 3
    base = cfg["ema"]["tau_base"]
    assert [tau for tau, _ in calls] == pytest.approx([cosine_tau(k, 2, base) for k in range(3)], abs=1e-12)
    assert calls[0][0] == base and calls[-1][0] == 1.0
    # each EMA call sees online weights changed by a new optimizer step, the first one included (after, not before it)
    for (_, before), (_, after) in zip([(None, initial), *calls], calls, strict=False):
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_normalized_std_is_one_for_spread_outputs_and_zero_for_collapsed_ones():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, 64, generator=g) * 5.0  # the scale does not matter: vectors are normalised
    assert normalized_std(spread).item() == pytest.approx(1.0, abs=0.02)
    collapsed = torch.full((4096, 64), 3.0) + 1e-4 * torch.randn(4096, 64, generator=g)
    assert normalized_std(collapsed).item() < 1e-3
    # by hand: two opposite unit vectors in 2-d: per-dimension stds (sqrt(2), 0), mean sqrt(2)/2, x sqrt(2)
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert normalized_std(two).item() == pytest.approx(2 ** 0.5 / 2 * 2 ** 0.5)


def test_no_ema_on_a_step_that_the_16_mixed_gradient_scaler_skips(smoke_config, monkeypatch):
    """16-mixed's GradScaler skips the optimizer step when the scaled gradients overflow (the first steps of a
    run, typically), yet Lightning counts the step: the target then moved towards unchanged online weights.
    An EMA follows exactly the steps that changed the online weights; tau still follows the step count."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    cfg = smoke_config("optim=sgd", "data.num_train=24", "data.batch_size=4")
    cfg["head"] = {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16}
    updates, original = [], BYOL.update_target

    def recorded_update(model, tau):
        updates.append(model.step_seen)
        original(model, tau)

    monkeypatch.setattr(BYOL, "update_target", recorded_update)
    torch.manual_seed(0)
    module = build_module(cfg)
    model = module.model
    model.step_seen = None
    steps = []  # whether each optimizer step changed the online weights
    step = module.optimizer_step

    def watched_step(*args, **kwargs):
        before = [p.detach().clone() for p in model.online_encoder.parameters()]
        model.step_seen = len(steps)
        step(*args, **kwargs)
        steps.append(any(not torch.equal(a, b) for a, b in zip(before, model.online_encoder.parameters(),
                                                                strict=True)))

    module.optimizer_step = watched_step
    # a first scale large enough to overflow float16 gradients, dropping by 2**-16 at each skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -16)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=build_datamodule(cfg))
    assert trainer.global_step == len(steps) == 6
    assert False in steps and True in steps, steps  # some skipped, some taken
    assert updates == [i for i, changed in enumerate(steps) if changed]
