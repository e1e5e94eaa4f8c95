"""The linear probe on cached features: a classifier trained on features extracted once.

Extracting the features once and training on that cache takes seconds where the standard
protocol (crop + flip through the frozen encoder every epoch) takes an encoder pass per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from byol.core.errors import DataError
from byol.core.optim import param_groups, warmup_cosine

# make_optimizer(param_groups, total_steps, steps_per_epoch) -> (optimizer, per-step scheduler);
# every group carries its own lr and weight_decay
MakeOptimizer = Callable[[list[dict], int, int], tuple]


def nesterov_cosine(param_groups: list[dict], total_steps: int, steps_per_epoch: int) -> tuple:
    """SGD-Nesterov (momentum 0.9) with a cosine decay and no warm-up: the probe's default optimizer."""
    optimizer = torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=0.9, nesterov=True)
    return optimizer, warmup_cosine(optimizer, total_steps=total_steps)


def standardize(train: torch.Tensor, *others: torch.Tensor, order: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, eps: float = 1e-5, chunk: int = 8192):
    """Scale features by the training set's per-dimension mean and std.

    This is what a BatchNorm without affine parameters does in eval mode with training-set
    statistics; combined features mix scales (avgpool vs earlier blocks), so the classifier
    needs it. ``order`` also permutes the rows of ``train`` in the same pass. Returns the
    standardised tensors (``train`` first) and ``(mean, std)``.
    """
    total = torch.zeros(train.shape[1], dtype=torch.float64, device=train.device)
    squares = torch.zeros_like(total)
    for start in range(0, train.shape[0], chunk):  # float32 within a chunk, float64 across chunks
        block = train[start:start + chunk].float()
        total += block.sum(0).double()
        squares += block.square().sum(0).double()
    n = train.shape[0]
    mean = total / n
    mean, std = mean.float(), ((squares / n - mean * mean).clamp_min(0) + eps).sqrt().float()
    inv_std = 1 / std
    out_dtype = out_dtype or train.dtype

    def apply(x, rows=None):
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        for start in range(0, x.shape[0], chunk):
            block = x[start:start + chunk] if rows is None else x[rows[start:start + chunk].to(x.device)]
            y[start:start + chunk] = (block.float() - mean).mul_(inv_std)
        return y

    return [apply(train, order)] + [apply(x) for x in others], (mean, std)


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the cached probe on one CPU thread.

    Its steps are small (a 1024 x D matmul and a few ops on a 10 x D weight), so with more
    threads each op's synchronisation costs more than its work, badly so when other jobs
    share the cores: 0.12 s per epoch on one thread vs 1.3 s on two for 45,000 x 3,584
    features on this project's busy 2-core machine.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _logits(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Logits in float32 from features stored in a lower precision, without copying the features."""
    return F.linear(x, head.weight.to(x.dtype), head.bias.to(x.dtype)).float()


@torch.no_grad()
def linear_accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    """Accuracy of ``head`` on standardised features, in chunks so the logits stay small."""
    correct = 0
    for start in range(0, x.shape[0], chunk):
        logits = _logits(head, x[start:start + chunk])
        correct += int((logits.argmax(1) == y[start:start + chunk].to(x.device)).sum())
    return correct / max(1, x.shape[0])


def scored(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """:func:`linear_accuracy`, or None for a split without images (``split.val_size=0``: no validation)."""
    return linear_accuracy(head, x, y) if x.shape[0] else None


@dataclass
class ProbeResult:
    """The trained classifier (applied to ``(x - mean) / std``) and its accuracies."""

    head: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    val_acc: float | None  # None without validation images
    test_acc: float
    history: list[dict] = field(default_factory=list)


def train_linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    make_optimizer: MakeOptimizer | None = None,
    seed: int = 0,
    storage_dtype: torch.dtype | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> ProbeResult:
    """A linear classifier on cached features, standardised by the training set's statistics.

    The training features are shuffled once while they are standardised (``storage_dtype``,
    e.g. bf16, halves the memory traffic); each epoch then visits the contiguous mini-batches
    of that copy in a new random order. Skipping the per-epoch gather of rows makes an epoch a
    single pass over the cache; shuffle-once SGD converges like reshuffled SGD on this convex
    problem (Mishchenko et al., 2020; here: the same test accuracy to 0.1 point on 45,000 x
    3,584 CIFAR-10 features). Metrics reach the host once per epoch.

    ``make_optimizer(param_groups, total_steps, steps_per_epoch)`` returns the optimizer and its
    per-step scheduler for the head's groups (``lr``, ``weight_decay``; none on the bias, as the classifier of
    the other protocols); by default
    :func:`nesterov_cosine`.
    """
    features, labels = train
    if features.shape[0] == 0:
        raise DataError("the training split is empty")
    with one_cpu_thread(features.device):
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(features.shape[0], generator=generator)
        (features, val_features, test_features), (mean, std) = standardize(
            features, val[0], test[0], order=order, out_dtype=storage_dtype)
        labels = labels.to(features.device)[order.to(features.device)]
        head = _seeded_head(features.shape[1], num_classes, generator).to(features.device)
        batch_size = min(batch_size, features.shape[0])
        steps = -(-features.shape[0] // batch_size)
        groups = [dict(g, lr=lr) for g in param_groups([head], weight_decay)]  # no decay on the bias, as the
        optimizer, scheduler = (make_optimizer or nesterov_cosine)(groups, epochs * steps, steps)  # other probes
        history = []
        for epoch in range(epochs):
            losses = _train_epoch(head, features, labels, batch_size, optimizer, scheduler, generator)
            history.append({"epoch": epoch, **losses, "val/acc": scored(head, val_features, val[1])})
            if on_epoch_end is not None:
                on_epoch_end(history[-1])
        val_acc = history[-1]["val/acc"] if history else scored(head, val_features, val[1])
        return ProbeResult(head, mean, std, val_acc, linear_accuracy(head, test_features, test[1]), history)


def _seeded_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear``'s uniform initialisation drawn from ``generator``, independent of the global RNG."""
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        bound = 1 / math.sqrt(dim)
        head.weight.copy_((torch.rand(num_classes, dim, generator=generator) * 2 - 1) * bound)
        head.bias.zero_()
    return head


def _train_epoch(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 optimizer, scheduler, generator: torch.Generator) -> dict:
    """One pass over the shuffled cache, its contiguous mini-batches in a new random order."""
    n = features.shape[0]
    loss_sum = torch.zeros((), device=features.device)
    correct = torch.zeros((), device=features.device, dtype=torch.long)
    for batch in torch.randperm(-(-n // batch_size), generator=generator).tolist():
        rows = slice(batch * batch_size, (batch + 1) * batch_size)
        logits = _logits(head, features[rows])
        loss = F.cross_entropy(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * labels[rows].shape[0]
        correct += (logits.detach().argmax(1) == labels[rows]).sum()
    return {"train/loss": loss_sum.item() / n, "train/acc": correct.item() / n}
