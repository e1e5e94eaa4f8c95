"""BYOLModule's numbers outside a Trainer: the tau it logs, what it optimises, the learning rate of the world."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from byol.core.backbone import Encoder
from byol.core.ema import cosine_tau
from byol.core.model import BYOL
from byol.jobs.build import optimizer_factory
from byol.lightning.pretrain_module import BYOLModule


def tiny_module(make_optimizer=None) -> BYOLModule:
    torch.manual_seed(0)
    model = BYOL(Encoder("resnet18", "imagenet", width=0.125), proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16)
    return BYOLModule(model, None, make_optimizer, tau_base=0.9, tau_schedule="cosine", seed=0)


def test_logged_tau_is_the_tau_of_the_step_just_taken():
    """Steps 0..10 of an 11-step schedule: step k uses cosine_tau(k, 10). After step k Lightning's
    global_step is k + 1, and the logged tau is step k's (not step k + 1's)."""
    module = BYOLModule(torch.nn.Identity(), None, None, tau_base=0.9, tau_schedule="cosine", seed=0)
    module.schedule_steps = lambda: 11
    for step in range(11):
        module._trainer = SimpleNamespace(global_step=step)
        assert module.current_tau() == pytest.approx(cosine_tau(step, 10, 0.9), abs=1e-12)
        module._trainer = SimpleNamespace(global_step=step + 1)  # the step has been counted
        assert module.last_tau() == pytest.approx(cosine_tau(step, 10, 0.9), abs=1e-12)
    assert module.last_tau() == 1.0
    module._trainer = SimpleNamespace(global_step=0)
    assert module.last_tau() == 0.9  # before any step: tau_base


def test_optimizer_gets_every_trainable_parameter_and_the_lr_of_the_global_batch():
    """The online encoder, projectors AND predictors, nothing of the target; under 4 processes of 64 images,
    LARS's lr is base_lr x 64 x 4 / 256."""
    optim = {"name": "lars", "base_lr": 0.3, "scale_lr_with_batch": True, "weight_decay": 1e-5,
             "optimizer": {"momentum": 0.9, "eta": 0.02}, "scheduler": {"name": "warmup_cosine", "warmup_epochs": 0}}
    module = tiny_module(optimizer_factory(optim, batch_size=64))
    module._trainer = SimpleNamespace(estimated_stepping_batches=20, num_training_batches=10, accumulate_grad_batches=1,
                                      max_epochs=2, world_size=4)
    optimizer = module.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.3 * 64 * 4 / 256] * 2)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.model.parameters() if p.requires_grad}
    assert optimized == trainable
    assert {id(p) for p in module.model.predictors.parameters()} <= optimized
    assert not {id(p) for p in module.model.target_encoder.parameters()} & optimized
