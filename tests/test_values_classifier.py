"""ClassifierModule's numbers outside a Trainer: per-epoch crops, the optimizer groups of both protocols,
and accuracy that skips the padding of evaluation shards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from byol.core.backbone import Encoder
from byol.core.data import NOT_COUNTED
from byol.lightning.classifier import ClassifierModule

MEAN, STD = [0.5] * 3, [0.25] * 3


def make(finetune: bool, made: list | None = None, **kwargs) -> ClassifierModule:
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "imagenet", width=0.125)

    def recording(groups, total_steps, steps_per_epoch):
        made.append(groups)
        optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"])
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    return ClassifierModule(encoder, ["avgpool"], 3, MEAN, STD, finetune=finetune, make_optimizer=recording,
                            channels_last=False, **kwargs)


def test_crops_are_drawn_anew_each_epoch_and_batch_and_repeat_for_the_same_ones():
    module = make(False, lr=0.1)
    draws = {}
    for epoch, batch in ((0, 1), (1, 1), (0, 2), (0, 1)):
        module._trainer = SimpleNamespace(current_epoch=epoch, world_size=1, global_rank=0)
        draws.setdefault((epoch, batch), []).append(torch.rand(8, generator=module._generator_for(batch)))
    (a, again), (b,), (c,) = draws[0, 1], draws[1, 1], draws[0, 2]
    assert torch.equal(a, again)
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_each_rank_draws_its_own_crops_and_one_process_draws_as_before():
    """Under DDP each rank's batch holds other images: the same crop for image i of every rank would tie the
    ranks' augmentations together. One process keeps the (seed, epoch, batch) stream."""
    module = make(False, lr=0.1)
    draws = []
    for world, rank in ((2, 0), (2, 1), (1, 0)):
        module._trainer = SimpleNamespace(current_epoch=3, world_size=world, global_rank=rank)
        draws.append(torch.rand(8, generator=module._generator_for(5)))
    expected = torch.Generator().manual_seed(hash((module.seed, 3, 5)) & (2**63 - 1))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[2], torch.rand(8, generator=expected))


def groups_by_parameter(groups) -> dict[int, tuple[float, float]]:
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = (g["lr"], g["weight_decay"])
    return out


@pytest.mark.parametrize("finetune", [False, True])
def test_optimizer_groups_decay_weights_only_and_give_the_encoder_its_rate(finetune):
    made = []
    module = make(finetune, made, lr=0.5, encoder_lr=0.01 if finetune else None, weight_decay=0.3)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=2)
    module.configure_optimizers()
    got = groups_by_parameter(made[0])
    linear = module.head[1]
    assert got[id(linear.weight)] == (0.5, 0.3) and got[id(linear.bias)] == (0.5, 0.0)
    encoder = module.encoder.body
    if finetune:
        assert got[id(encoder.conv1.weight)] == (0.01, 0.3)
        assert got[id(encoder.bn1.weight)] == (0.01, 0.0) and got[id(encoder.bn1.bias)] == (0.01, 0.0)
        assert len(got) == 2 + len(list(module.encoder.parameters()))
    else:
        assert len(got) == 2  # the frozen encoder has nothing to optimise


def test_accuracy_skips_the_padding_labels():
    """Six images, two of them padding (label -1): 3 of the 4 counted are right, so 0.75 over 4 images."""
    module = make(False, lr=0.1).eval()
    module.log = lambda *args, **kwargs: None
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = module(module.normalize(images)).argmax(1)
    labels = predicted.clone()
    labels[2] = (predicted[2] + 1) % 3
    labels[3] = labels[4] = NOT_COUNTED
    module._eval_step((images, labels), "val")
    assert module.accuracy["val"].compute().item() == pytest.approx(0.75)
    assert module.counted["val"].compute().item() == 4
