"""Exact answers of the checks a checkpoint's state goes through before any of it is loaded
(byol.core.state_check, byol.lightning.checkpoint_io): each names what is wrong, or None."""

from __future__ import annotations

import copy

import torch

from byol.core.state_check import (
    _optimizer_value_problem,
    optimizer_problem,
    tensors_problem,
    value_problem,
    weights_problem,
)
from byol.lightning.checkpoint_io import lightning_fields_problem


def test_weights_of_transposed_shape_are_another_shape_even_with_as_many_numbers():
    own = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    state = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    assert weights_problem(state, own) == "1 tensor of another shape (e.g. w: (3, 2) in the file, (2, 3) expected)"
    assert weights_problem({"w": torch.ones(2, 3), "b": torch.ones(3)}, own) is None


def test_unexpected_weights_are_a_problem_unless_part_of_a_larger_state():
    own = {"w": torch.zeros(2)}
    state = {"w": torch.zeros(2), "extra": torch.zeros(1)}
    assert weights_problem(state, own) == "1 unexpected (e.g. extra)"
    assert weights_problem(state, own, extra_ok=True) is None
    assert weights_problem({}, own, extra_ok=True) == "1 missing (e.g. w)"


def test_a_sparse_tensor_is_not_a_dense_state_dict_entry():
    sparse = torch.zeros(2, 2).to_sparse()
    assert tensors_problem({"w": sparse}, "its state_dict") == \
        "its state_dict['w'] is a torch.sparse_coo tensor, not a dense one"
    assert tensors_problem({"w": torch.zeros(2, 2)}, "its state_dict") is None


def test_counters_are_whole_numbers_of_minus_one_or_more():
    assert value_problem(-1, 0, "loops.x") is None  # a checkpoint taken inside the first step
    assert value_problem(7, 0, "loops.x") is None
    assert value_problem(-2, 0, "loops.x") == "loops.x is -2, not a whole number"
    assert value_problem(True, 0, "loops.x") == "loops.x is True, not a whole number"


def test_numbers_must_be_finite():
    assert value_problem(0.5, 0.1, "lr") is None and value_problem(2, 0.1, "lr") is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert value_problem(bad, 0.1, "lr") == f"lr is {bad!r}, not a number"


def test_a_parameter_numbered_in_two_groups_is_refused():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    saved = copy.deepcopy(optimizer.state_dict())
    assert optimizer_problem(saved, optimizer, "optimizer_states[0]") is None
    saved["param_groups"][1]["params"] = [0]  # both groups claim parameter 0
    assert optimizer_problem(saved, optimizer, "optimizer_states[0]") == "optimizer_states[0] numbers a parameter twice"


def test_a_checkpoint_without_global_step_is_refused():
    fields = {"global_step": 4, "epoch": 1, "pytorch-lightning_version": "2.4.0", "optimizer_states": [],
              "lr_schedulers": []}
    assert lightning_fields_problem(fields) is None
    del fields["global_step"]
    assert lightning_fields_problem(fields) == "global_step is None, not a whole number of 0 or more"


def test_non_finite_weights_are_named_with_how_many():
    """A diverged run's NaN weights evaluated at chance with status ok: any NaN or inf, in any floating dtype
    (or complex), is named; integers and empty tensors have none to find."""
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64):
        assert tensors_problem({"ok": torch.ones(2), "w": bad.to(dtype)}, "its state_dict") == \
            "its state_dict['w'] holds NaN or infinite values (3 of 4)", dtype
    one = torch.zeros(3, 4)
    one[2, 1] = float("nan")
    assert tensors_problem({"w": one}, "s") == "s['w'] holds NaN or infinite values (1 of 12)"
    assert tensors_problem({"w": torch.full((2,), 3.0e38) * 10}, "s") == "s['w'] holds NaN or infinite values (2 of 2)"
    assert tensors_problem({"w": torch.full((2,), 3.0e38), "n": torch.tensor(5), "e": torch.zeros(0)}, "s") is None


def test_a_tensor_that_is_not_stored_in_full_is_refused_before_its_values_are_read():
    """A crafted file's tensor may have no numbers (meta: it failed only when copied into the model, in a
    traceback) or more elements than its storage (stride 0: an 11 MB export read as 2.8 GB while checked). Both
    are refused from their metadata alone: 10^12 elements over one float take no memory here."""
    huge = torch.zeros(1).expand(10**12)
    assert tensors_problem({"ok": torch.ones(2), "x": huge}, "s") == \
        "s['x'] has 1,000,000,000,000 elements over 4 bytes of storage (a stride-0 or overlapping view); it is not " \
        "a saved state"
    assert tensors_problem({"w": torch.zeros(4).as_strided((2, 3), (1, 1))}, "s") is not None  # overlapping rows
    assert tensors_problem({"m": torch.empty(3, device="meta")}, "s") == \
        "s['m'] is a tensor without numbers (on the meta device)"
    assert _optimizer_value_problem(torch.zeros(1).expand(4, 3), torch.zeros(4, 3), "v") == \
        "v has 12 elements over 4 bytes of storage (a stride-0 or overlapping view); it is not a saved state"
    # views of one larger storage (what torch.save writes for tensors that share it) and strided ones are stored
    base = torch.arange(12.0)
    assert tensors_problem({"a": base[:4], "b": base[4:].view(2, 4), "t": base.view(3, 4).t(),
                            "c": torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)}, "s") is None


def test_weights_of_another_kind_of_number_are_named_and_another_precision_is_not():
    """load_state_dict casts integer weights, drops the imaginary part of complex ones and reads bools as 0 and 1,
    without a word: another kind of number than the module's is named. Another precision (float16, bfloat16,
    float64 for float32) is what the cast is for, and BatchNorm's integer counter is integer in both."""
    own = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "num_batches_tracked": torch.tensor(0)}
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        state = {"w": torch.ones(2, 3, dtype=dtype), "b": torch.ones(3, dtype=dtype),
                 "num_batches_tracked": torch.tensor(7, dtype=torch.int32)}
        assert weights_problem(state, own) is None, dtype
    ints = {"w": torch.ones(2, 3, dtype=torch.int64), "b": torch.ones(3, dtype=torch.int64),
            "num_batches_tracked": torch.tensor(7)}
    assert weights_problem(ints, own) == \
        "2 tensors of another kind of number (e.g. w: integer (torch.int64) in the file, floating-point " \
        "(torch.float32) expected)"
    assert weights_problem(ints, own, kinds=False) is None  # the shapes alone fit
    assert weights_problem({"w": torch.ones(2, 3, dtype=torch.complex64), "b": torch.ones(3, dtype=torch.bool),
                            "num_batches_tracked": torch.tensor(1.0)}, own, "the checkpoint") == \
        "3 tensors of another kind of number (e.g. w: complex (torch.complex64) in the checkpoint, floating-point " \
        "(torch.float32) expected)"
    assert weights_problem({**own, "num_batches_tracked": torch.tensor(True)}, own) == \
        "1 tensor of another kind of number (e.g. num_batches_tracked: bool (torch.bool) in the file, integer " \
        "(torch.int64) expected)"
    # a shape that does not fit is named first: it is the bigger difference
    assert weights_problem({**ints, "w": torch.ones(3, 2)}, own).startswith("1 tensor of another shape (e.g. w: ")


def test_an_optimizer_state_of_nan_or_of_another_kind_of_number_is_refused():
    """A momentum buffer of NaN makes the first resumed step NaN; an integer one is cast without a word."""
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    assert optimizer_problem(saved, optimizer, "o") is None
    nan = copy.deepcopy(saved)
    nan["state"][1]["momentum_buffer"][0] = float("nan")
    assert optimizer_problem(nan, optimizer, "o") == "o.state[1].momentum_buffer holds NaN or infinite values (1 of 2)"
    ints = copy.deepcopy(saved)
    ints["state"][0]["momentum_buffer"] = torch.zeros(2, 3, dtype=torch.int64)
    assert optimizer_problem(ints, optimizer, "o") == \
        "o.state[0].momentum_buffer is integer (torch.int64), its parameter floating-point (torch.float32)"
    halves = copy.deepcopy(saved)
    halves["state"][0]["momentum_buffer"] = halves["state"][0]["momentum_buffer"].half()
    assert optimizer_problem(halves, optimizer, "o") is None
