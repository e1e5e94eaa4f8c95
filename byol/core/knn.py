"""Weighted k-nearest-neighbour classification of frozen features: a representation check without training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class predictions (Wu et al., 2018): cosine similarity, votes ``exp(sim / T)``.

    The query set is processed in chunks so the similarity matrix never exceeds
    ``chunk_size x N`` on the device.
    """
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(bank.device)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, query_features.shape[0], chunk_size):
        queries = F.normalize(query_features[start:start + chunk_size].to(bank.device).float(), dim=1)
        similarity, neighbours = (queries @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(queries.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, query_features, query_labels, num_classes: int,
                 **kwargs) -> float:
    """Share of ``query_labels`` that :func:`knn_predict` gets right (``kwargs``: k, temperature, chunk_size)."""
    predictions = knn_predict(train_features, train_labels, query_features, num_classes, **kwargs)
    return int((predictions == query_labels.to(predictions.device)).sum()) / max(1, predictions.shape[0])
