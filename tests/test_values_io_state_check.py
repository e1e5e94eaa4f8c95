"""Exact answers of the checks a checkpoint's state goes through before any of it is loaded
(byol.core.state_check, byol.lightning.checkpoint_io): each names what is wrong, or None."""

from __future__ import annotations

import copy

import torch

from byol.core.state_check import optimizer_problem, tensors_problem, value_problem, weights_problem
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
