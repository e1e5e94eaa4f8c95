"""LARS and the warm-up + cosine learning-rate schedule used for BYOL.

torch has no LARS and the maintained implementations live inside SSL frameworks (lightly,
solo-learn) that we do not want as a dependency, so it is written here, small and tested.

Optimizers and schedules are chosen by name from fixed tables (:data:`OPTIMIZERS`,
:data:`SCHEDULES`): a config, which may come from a checkpoint someone else wrote, names
an entry and gives plain keyword values; it never names code to import.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from byol.core.errors import ConfigError


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weights, and biases + normalisation parameters (no decay, no LARS adaptation).

    Excluding 1-d parameters follows the paper (appendix C) and solo-learn/lightly practice.
    """
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor is scaled by a trust ratio
    ``eta * ||w|| / (||g|| + wd * ||w||)`` (You et al., 2017). Groups with ``lars_exclude``
    are plain SGD with momentum. A tensor whose gradient is exactly zero (the heads of a tap whose
    ``loss.weights`` entry is 0) is not decayed either, as in solo-learn's LARS: it stays as it is.

    ``clip_lr=True``: the scale is ``min(ratio / lr, 1)`` with ``lr`` the group's (scheduled) rate,
    so a tensor's step is ``min(ratio, lr) x (g + wd w)``: the ratio is its own rate, never above
    ``lr`` (without the option: ``lr x ratio``). This is the ``clip_lr`` option of solo-learn's LARS
    (``solo/utils/lars.py``: ``lars_lr = min(lars_lr / lr, 1)``), which its CIFAR BYOL recipe sets.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = 1e-8, clip_lr: bool = False):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        for key, value in (("momentum", momentum), ("weight_decay", weight_decay), ("eta", eta), ("eps", eps)):
            problem = option_range_problem(key, value)  # as torch's own optimizers refuse theirs
            if problem:
                raise ValueError(f"LARS {key} {problem}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      eps=eps, clip_lr=bool(clip_lr), lars_exclude=False))

    @staticmethod
    def _trust_ratios(group: dict, params: list, grads: list) -> tuple[list, list]:
        """Per tensor: the trust ratio, clipped to ``min(ratio / lr, 1)`` with ``clip_lr``, 1 where a norm
        is 0; and 1 where the gradient is non-zero, else 0 (weight decay's factor). All tensors at once."""
        w = torch.stack(torch._foreach_norm(params))
        g = torch.stack(torch._foreach_norm(grads))
        lr, clip = group["lr"], group.get("clip_lr", False)  # states saved before the option lack it
        if clip and lr <= 0:  # lr 0 (the end of a cosine): the limit of min(ratio / lr, 1), no 0/0
            ratio = torch.ones_like(w)
        else:
            ratio = (group["eta"] / lr if clip else group["eta"]) * w / (g + group["weight_decay"] * w + group["eps"])
            if clip:
                ratio = ratio.clamp(max=1.0)
        ratios = torch.where((w > 0) & (g > 0), ratio, torch.ones_like(w))
        return list(ratios.unbind()), list((g > 0).to(w.dtype).unbind())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = group["weight_decay"]
            if not group["lars_exclude"]:  # trust ratio from the raw gradient's norm, as You et al. (2017)
                ratios, has_grad = self._trust_ratios(group, params, grads)
                if wd:
                    grads = torch._foreach_add(grads, torch._foreach_mul(params, has_grad), alpha=wd)
                grads = torch._foreach_mul(grads, ratios)
            elif wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``final_ratio`` x lr."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant(optimizer, total_steps: int = 0, warmup_steps: int = 0) -> LambdaLR:
    """Constant learning rate after an optional linear warm-up (the original implementation: none)."""
    return LambdaLR(optimizer, lambda step: (step + 1) / warmup_steps if step < warmup_steps else 1.0)


def read_schedule_at_offset(scheduler: LambdaLR, offset: int) -> None:
    """Make ``scheduler`` give at step ``s`` what it gave at ``s - offset``: a run resumed with its epochs cut into
    another number of steps continues its schedule from where it stands in its epochs
    (:meth:`byol.lightning.pretrain_module.BYOLModule.step_offset`)."""
    if offset:
        scheduler.lr_lambdas = [lambda step, f=f: f(step - offset) for f in scheduler.lr_lambdas]


# Where the optimizers' and schedules' numeric options mean something: (low, high, low included, high
# included, why). torch checks some of SGD's and Adam's (not an infinite eps, nor dampening), LARS none:
# eta=-1 trained to the end with a rising loss.
OPTION_RANGES = {
    "momentum": (0, 1, True, False, "1 never forgets a gradient, more diverges"),
    "dampening": (0, 1, True, True, "the fraction of each gradient left out of the momentum"),
    "weight_decay": (0, math.inf, True, False, "below 0 it grows the weights"),
    "eps": (0, math.inf, True, False, "a small number that keeps a division finite"),
    "eta": (0, math.inf, False, False, "LARS's trust coefficient; 0 freezes the weights, below 0 climbs the loss"),
    "betas": (0, 1, True, False, "Adam's averaging factors, each"),
    "final_ratio": (0, 1, True, True, "the fraction of the peak rate the cosine ends at"),
}


def option_range_problem(key: str, value) -> str | None:
    """What is wrong with ``value`` for the option ``key`` (``must lie in [0, 1) (why), not 5``), None when it is
    in :data:`OPTION_RANGES`' range or the option has none (its kind is checked elsewhere); NaN and infinity
    are refused too (a NaN momentum passed torch's check and made every weight NaN)."""
    if key not in OPTION_RANGES or value is None or isinstance(value, bool | str):
        return None
    low, high, low_in, high_in, why = OPTION_RANGES[key]
    values = list(value) if isinstance(value, list | tuple) else [value]
    if all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
           and (v >= low if low_in else v > low) and (v <= high if high_in else v < high) for v in values):
        return None
    if high == math.inf:
        bound = "be zero or more" if low_in else f"be above {low}"
    else:
        bound = f"lie in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
    return f"must {bound}, not {value!r}: {why}"


OPTIMIZERS = {"lars": LARS, "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = {"warmup_cosine": warmup_cosine, "constant": constant}


class OptionError(ConfigError):
    """A value of an optimizer's or schedule's keyword argument that is refused: ``option`` and ``problem`` let
    the config's check name the key as the config spells it (``optim.optimizer.eta must ...``)."""

    def __init__(self, option: str, problem: str, what: str):
        super().__init__(f"{what} option {option!r} {problem}")
        self.option, self.problem = option, problem


def _checked_options(factory, options: Mapping, fixed: set[str], what: str) -> dict:
    """``options`` as keyword arguments of ``factory``; unknown names and non-plain values refused."""
    accepted = set(inspect.signature(factory).parameters) - fixed
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"{what} takes no option {', '.join(map(repr, unknown))}; it takes: "
                          f"{', '.join(sorted(accepted))}")
    defaults = {k: v.default for k, v in inspect.signature(factory).parameters.items()}
    for key, value in options.items():
        plain = value is None or isinstance(value, bool | int | float | str) or (
            isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value))
        if not plain:
            raise ConfigError(f"{what} option {key!r} must be a plain value, not {type(value).__name__}")
        expected = _kind_of_default(defaults[key], value)
        if expected:
            raise OptionError(key, f"must be {expected}, not {value!r}", what)
        problem = option_range_problem(key, value)
        if problem:
            raise OptionError(key, problem, what)
        if key == "maximize" and value:  # torch's optimizers climb the loss with it
            raise OptionError(key, "must be false: it climbs the loss, which BYOL and the classifiers minimise",
                              what)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _kind_of_default(default, value) -> str | None:
    """What ``value`` must be for a parameter whose default is ``default`` (None: it is that, or the default
    says nothing): a flag stays a flag (``clip_lr="abc"`` was True), a number a number (``eta="abc"`` failed
    inside the first step), a pair of numbers a pair."""
    def number(v):
        return isinstance(v, int | float) and not isinstance(v, bool)

    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if number(default):
        return None if number(value) else "a number"
    if isinstance(default, tuple) and all(number(v) for v in default):
        fits = isinstance(value, list | tuple) and len(value) == len(default) and all(number(v) for v in value)
        return None if fits else f"a list of {len(default)} numbers"
    return None


def check_optimizer_options(name: str, options: Mapping | None) -> None:
    """What :func:`build_optimizer` checks of its config, before anything is built (the config's check); then the
    optimizer built over one number, so that a value it refuses (nesterov without momentum, a negative eps, betas
    past 1) is said here, not in a traceback after the data and the model were loaded."""
    if name in OPTIMIZERS:
        kwargs = _checked_options(OPTIMIZERS[name], dict(options or {}), {"self", "params", "lr"},
                                  f"optimizer '{name}'")
        try:
            OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)], lr=0.1, **kwargs)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(f"optimizer '{name}' refuses its settings {kwargs}: {' '.join(str(e).split())}") from None


def check_schedule_options(name: str, options: Mapping | None) -> None:
    """What :func:`build_schedule` checks of its keyword arguments, before anything is built."""
    if name in SCHEDULES:
        _checked_options(SCHEDULES[name], dict(options or {}), {"optimizer", "total_steps", "warmup_steps"},
                         f"schedule '{name}'")


def build_optimizer(name: str, param_groups: list[dict], lr: float, options: Mapping | None = None):
    """The optimizer ``name`` (a key of :data:`OPTIMIZERS`) over ``param_groups`` at ``lr``."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    kwargs = _checked_options(cls, dict(options or {}), {"self", "params", "lr"}, f"optimizer '{name}'")
    return cls(param_groups, lr=lr, **kwargs)


def build_schedule(name: str, optimizer, total_steps: int, warmup_steps: int = 0,
                   options: Mapping | None = None) -> LambdaLR:
    """The per-step learning-rate schedule ``name`` (a key of :data:`SCHEDULES`)."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")
    fn = SCHEDULES[name]
    kwargs = _checked_options(fn, dict(options or {}), {"optimizer", "total_steps", "warmup_steps"},
                              f"schedule '{name}'")
    return fn(optimizer, total_steps=total_steps, warmup_steps=warmup_steps, **kwargs)
