"""Weighted kNN values that need k and the normalisation of both sides."""

from __future__ import annotations

import math

import torch

from byol.core.knn import knn_predict


def unit(degrees) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


def test_k_bounds_the_neighbours_that_vote():
    """One class-1 point on the query, four class-0 points 100-130 degrees away; at T=10 the votes are
    nearly equal, so k=1 says 1 (its one neighbour) and k=5 says 0 (four votes to one)."""
    bank = unit([0.0, 100.0, 110.0, 120.0, 130.0])
    labels = torch.tensor([1, 0, 0, 0, 0])
    query = unit([0.0])
    assert knn_predict(bank, labels, query, 2, k=1, temperature=10.0).tolist() == [1]
    assert knn_predict(bank, labels, query, 2, k=5, temperature=10.0).tolist() == [0]


def test_bank_features_are_compared_by_angle_not_length():
    """A short bank vector 11 degrees from the query and a long one 49 degrees away: cosine picks the short."""
    bank = torch.stack([torch.tensor([1.0, 0.0]), 10 * unit([60.0])[0]])
    query = torch.tensor([[1.0, 0.2]])
    assert knn_predict(bank, torch.tensor([0, 1]), query, 2, k=1, temperature=0.1).tolist() == [0]


def test_a_query_s_length_does_not_flatten_its_votes():
    """At 0 degrees, k=3, T=0.1: e^10 for class 1 against 2 e^8.66 for class 0, at any query length
    (an unnormalised query of length 0.1 would vote e^1 against 2 e^0.87, for class 0)."""
    bank = unit([0.0, 30.0, -30.0])
    labels = torch.tensor([1, 0, 0])
    for length in (0.1, 1.0, 7.0):
        assert knn_predict(bank, labels, unit([0.0]) * length, 2, k=3, temperature=0.1).tolist() == [1], length
