"""State read from a file, compared with the objects it is about to be loaded into.

A checkpoint is data from whoever wrote it. Before any part of it is loaded, it is compared with
what this code builds: the keys, the kinds of the values, the shapes and kinds of number of the
tensors, and that their numbers are finite (NaN weights evaluate at chance without an error). Each
check returns what is wrong, in words, or None; the caller names the file and the fix in one line
(:class:`~byol.core.errors.CheckpointError`), instead of torch or Lightning failing with a traceback
halfway through loading it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch


def whole(value, minimum: int = 0) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def kind(value) -> str:
    """What a value is, in a message's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "whole number"
    if isinstance(value, float):
        return "number"
    if torch.is_tensor(value):
        return "tensor"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def shown(value) -> str:
    """``value`` for a message: short, whatever it is."""
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr_prefix(value, 40)
    return text if len(text) <= 40 else f"a {kind(value)}"


def repr_prefix(value, limit: int) -> str:
    """``repr(value)``, or its first ``limit + 1`` characters when it is longer: found in time bounded by
    ``limit``, however large the value or however often it holds the same list (a list holding the one
    below it twice, 64 levels deep, is a few hundred bytes in a file and 2**64 items for ``repr``)."""
    out: list[str] = []
    size = 0

    def put(text: str) -> bool:  # True once past the limit: every caller stops
        nonlocal size
        out.append(text[: limit + 1 - size])
        size += len(text)
        return size > limit

    def walk(v) -> bool:
        if isinstance(v, Mapping):
            name = "" if type(v) is dict else f"{type(v).__name__}("
            if put(name + "{"):
                return True
            for i, (key, item) in enumerate(v.items()):
                if (i and put(", ")) or walk(key) or put(": ") or walk(item):
                    return True
            return put("}" + (")" if name else ""))
        if isinstance(v, list | tuple):
            is_list = isinstance(v, list)
            if put("[" if is_list else "("):
                return True
            for i, item in enumerate(v):
                if (i and put(", ")) or walk(item):
                    return True
            return put("]" if is_list else ",)" if len(v) == 1 else ")")
        try:
            return put(repr(v) if not isinstance(v, str | bytes) or len(v) <= limit else repr(v[: limit + 1]))
        except Exception:  # an int of more digits than Python prints, a repr that fails
            return put(f"<{type(v).__name__}>")

    walk(value)
    return "".join(out)


def value_problem(value, like, where: str) -> str | None:
    """Whether ``value`` may stand where this code has ``like``: the same kind (a whole number where a
    whole number is, a finite number where a number is, a bool, a list of as many such values...)."""
    if like is None:  # an option this code leaves at its default (torch's foreach...): any plain value
        plain = value is None or isinstance(value, bool | int | float | str)
        return None if plain else f"{where} is {shown(value)}, not a plain value"
    if isinstance(like, bool):
        ok = isinstance(value, bool)
    elif isinstance(like, int):  # counters: steps, epochs, batches (-1: a checkpoint taken inside the first step)
        ok = whole(value, minimum=-1)
    elif isinstance(like, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(like, str):
        ok = isinstance(value, str)
    elif isinstance(like, list | tuple):
        if not isinstance(value, list | tuple) or len(value) != len(like):
            return f"{where} is {shown(value)}, not a list of {len(like)}"
        return next((p for p in (value_problem(v, lk, f"{where}[{i}]") for i, (v, lk) in
                                 enumerate(zip(value, like, strict=True))) if p), None)
    elif isinstance(like, Mapping):
        return structure_problem(value, like, where)
    else:
        ok = torch.is_tensor(like) and torch.is_tensor(value) and value.shape == like.shape
    return None if ok else f"{where} is {shown(value)}, not a {kind(like)}"


def structure_problem(saved, template: Mapping, where: str) -> str | None:
    """``saved`` holds the keys of ``template``, no other, each with a value of the same kind, nested
    mappings alike (e.g. Lightning's loop counters)."""
    if not isinstance(saved, Mapping):
        return f"{where} is {shown(saved)}, not a mapping"
    extra = [k for k in saved if k not in template]
    if extra:
        return f"{where} holds {extra[0]!r}, which it never holds"
    missing = [k for k in template if k not in saved]
    if missing:
        return f"{where} lacks {missing[0]!r}"
    return next((p for p in (value_problem(saved[k], template[k], f"{where}.{k}") for k in saved) if p), None)


def tensors_problem(state, where: str) -> str | None:
    """Whether ``state`` is a state_dict: names mapped to (dense) tensors of finite numbers."""
    if not isinstance(state, Mapping):
        return f"{where} is {shown(state)}, not a mapping of names to tensors"
    for key, value in state.items():
        if not isinstance(key, str):
            return f"{where} has the key {shown(key)}, not a name"
        if not torch.is_tensor(value):
            return f"{where}[{key!r}] is {shown(value)}, not a tensor"
        if value.layout != torch.strided:
            return f"{where}[{key!r}] is a {value.layout} tensor, not a dense one"
        problem = nonfinite_problem(value, f"{where}[{key!r}]")
        if problem:
            return problem
    return None


def storage_problem(value: torch.Tensor, where: str) -> str | None:
    """Whether ``value`` is not a tensor whose numbers are all in the file: a meta tensor has none (it fails
    only when copied into the model), and one with more elements than its storage holds (a stride-0 view, as
    ``expand`` makes) reads as a huge tensor from a small file: checking or copying its values took memory out
    of all proportion to the file (an 11 MB file, 2.8 GB)."""
    if value.is_meta:
        return f"{where} is a tensor without numbers (on the meta device)"
    try:
        stored = value.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor type without a plain storage: its values are checked
        return None
    if value.numel() * value.element_size() > stored:
        return (f"{where} has {value.numel():,} elements over {stored:,} bytes of storage (a stride-0 or overlapping "
                f"view); it is not a saved state")
    return None


def nonfinite_problem(value: torch.Tensor, where: str) -> str | None:
    """Whether ``value`` holds NaN or inf (the weights of a diverged run, which evaluate at chance and train
    nothing), or is no stored tensor at all (:func:`storage_problem`). ``aminmax`` propagates NaN: one pass
    over the numbers, without a tensor of flags."""
    problem = storage_problem(value, where)
    if problem or value.numel() == 0 or not (value.is_floating_point() or value.is_complex()):
        return problem
    try:
        finite = bool(torch.isfinite(torch.stack(torch.aminmax(value))).all())
    except (RuntimeError, NotImplementedError):  # complex numbers, or a dtype aminmax does not take (float8)
        value = value if value.is_complex() else value.float()
        finite = bool(torch.isfinite(value).all())
    if finite:
        return None
    return f"{where} holds NaN or infinite values ({int((~torch.isfinite(value)).sum())} of {value.numel()})"


def number_kind(tensor: torch.Tensor) -> str:
    """What a tensor's numbers are. ``load_state_dict`` casts within a kind (a float16 or float64 weight into a
    float32 parameter) and, silently, across kinds too: weights truncated to integers, the imaginary part
    dropped, booleans as 0 and 1. Those are damaged weights, not another precision."""
    if tensor.is_quantized:
        return "quantized"
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.is_complex():
        return "complex"
    return "floating-point" if tensor.is_floating_point() else "integer"


def kinds_problem(state: Mapping, own: Mapping, where: str = "the file") -> str | None:
    """The tensors of ``state`` whose :func:`number_kind` differs from that of the module's own (an integer
    buffer such as BatchNorm's ``num_batches_tracked`` is integer in both)."""
    wrong = [k for k in own if k in state and number_kind(state[k]) != number_kind(own[k])]
    if not wrong:
        return None
    k = wrong[0]
    return (f"{len(wrong)} tensor{'s' * (len(wrong) > 1)} of another kind of number (e.g. {k}: "
            f"{number_kind(state[k])} ({state[k].dtype}) in {where}, {number_kind(own[k])} ({own[k].dtype}) "
            f"expected)")


def weights_problem(state: Mapping, own: Mapping, where: str = "the file", extra_ok: bool = False,
                    kinds: bool = True) -> str | None:
    """What differs between the tensors ``state`` (checked by :func:`tensors_problem`) and a module's own
    ``own`` state_dict: tensors of another shape, missing, unexpected (named, but no problem alone, when
    ``extra_ok``: a part of a larger state), then (with ``kinds``) of another kind of number."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or wrong or (unexpected and not extra_ok)):
        return kinds_problem(state, own, where) if kinds else None
    detail = []
    if wrong:
        k = wrong[0]
        detail.append(f"{len(wrong)} tensor{'s' * (len(wrong) > 1)} of another shape (e.g. {k}: "
                      f"{tuple(state[k].shape)} in {where}, {tuple(own[k].shape)} expected)")
    if missing:
        detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return "; ".join(detail)


def _groups_problem(saved_groups, groups: Sequence[Mapping], where: str) -> tuple[str | None, dict]:
    """The saved parameter groups against the optimizer's: as many, as many parameters each, options of
    the same kinds; and which parameter each saved number stands for."""
    if not isinstance(saved_groups, list) or not all(isinstance(g, Mapping) for g in saved_groups):
        return f"{where}.param_groups is {shown(saved_groups)}, not a list of mappings", {}
    if len(saved_groups) != len(groups):
        return (f"{where} has {len(saved_groups)} parameter group{'s' * (len(saved_groups) != 1)}, the optimizer "
                f"{len(groups)}"), {}
    params = {}
    for i, (got, group) in enumerate(zip(saved_groups, groups, strict=True)):
        at, ids = f"{where}.param_groups[{i}]", got.get("params")
        if not isinstance(ids, list) or not all(whole(x) for x in ids):
            return f"{at}.params is {shown(ids)}, not a list of parameter numbers", {}
        if len(ids) != len(group["params"]):
            return f"{at} holds {len(ids)} parameters, the optimizer's {len(group['params'])}", {}
        params.update(zip(ids, group["params"], strict=True))
        for key, value in got.items():
            if not isinstance(key, str):
                return f"{at} has the key {shown(key)}, not an option name", {}
            like = group.get(key)  # an option's number: whole or not, as the optimizer takes either
            like = float(like) if kind(like) == "whole number" else like
            problem = key != "params" and value_problem(value, like, f"{at}.{key}")
            if problem:
                return problem, {}
    if len(params) != sum(len(g["params"]) for g in groups):
        return f"{where} numbers a parameter twice", {}
    return None, params


def optimizer_problem(saved, optimizer: torch.optim.Optimizer, where: str) -> str | None:
    """Whether ``saved`` is a state of ``optimizer`` (as its ``state_dict()`` has it): the groups (see
    :func:`_groups_problem`), per-parameter state of the parameters' shapes, and a trial load into a copy
    of ``optimizer`` (which stays as it was) that leaves no option of its groups unset."""
    if not isinstance(saved, Mapping) or set(saved) != {"state", "param_groups"}:
        return f"{where} is {shown(saved)}, not an optimizer state (a mapping of 'state' and 'param_groups')"
    problem, params = _groups_problem(saved["param_groups"], optimizer.param_groups, where)
    if problem:
        return problem
    if not isinstance(saved["state"], Mapping):
        return f"{where}.state is {shown(saved['state'])}, not a mapping"
    for key, entry in saved["state"].items():
        if key not in params:
            return f"{where}.state holds parameter {shown(key)}, which no parameter group holds"
        if not isinstance(entry, Mapping) or not all(isinstance(name, str) for name in entry):
            return f"{where}.state[{key}] is {shown(entry)}, not a mapping of names to values"
        for name, value in entry.items():
            problem = _optimizer_value_problem(value, params[key], f"{where}.state[{key}].{name}")
            if problem:
                return problem
    trial = copy.copy(optimizer)  # load_state_dict replaces the copy's state and groups, not the optimizer's
    try:
        trial.load_state_dict(saved)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        return f"{where} does not load ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    for i, (loaded, group) in enumerate(zip(trial.param_groups, optimizer.param_groups, strict=True)):
        missing = [k for k in group if k not in loaded]
        if missing:
            return f"{where}.param_groups[{i}] lacks {missing[0]!r}"
    return None


def _optimizer_value_problem(value, param: torch.Tensor, where: str) -> str | None:
    """One value of a parameter's optimizer state (a momentum buffer, a step count): a number, or a finite
    tensor of the parameter's shape and kind of number (``load_state_dict`` would cast it), or a scalar."""
    shape = tuple(param.shape)
    if not torch.is_tensor(value):
        return f"{where} is {shown(value)}, not a tensor or a number" if value_problem(value, 0.0, where) else None
    if tuple(value.shape) not in (shape, ()):
        return f"{where} has shape {tuple(value.shape)}, its parameter {shape}"
    if value.dim() and number_kind(value) != number_kind(param):  # a scalar is a count (step)
        return f"{where} is {number_kind(value)} ({value.dtype}), its parameter {number_kind(param)} ({param.dtype})"
    return nonfinite_problem(value, where)


def scheduler_problem(saved, scheduler, where: str) -> str | None:
    """Whether ``saved`` is a state of the learning-rate ``scheduler``: its ``load_state_dict`` sets each
    key as an attribute, so each must be one of the scheduler's own, of the same kind (a key an earlier
    torch wrote and this one no longer has is let through when it is a plain value and names nothing)."""
    template = scheduler.state_dict()
    if not isinstance(saved, Mapping) or not all(isinstance(k, str) for k in saved):
        return f"{where} is {shown(saved)}, not a mapping of names to values"
    for key, value in saved.items():
        if key in template:
            problem = value_problem(value, template[key], f"{where}.{key}")
        elif key.startswith("__") or hasattr(scheduler, key):
            problem = f"{where} holds {key!r}, which would replace the scheduler's own attribute"
        else:
            problem = value_problem(value, None, f"{where}.{key}")
        if problem:
            return problem
    return None
