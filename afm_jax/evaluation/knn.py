"""Weighted k-nearest-neighbour classification on frozen features, as in DINO (Caron et al. 2021).

Features are L2-normalised; for each test image the k most cosine-similar training images vote for
their class with weight exp(similarity / T). DINO evaluates with k = 20 and T = 0.07. The class
scores are normalised to probabilities, so kNN gives a score for ROC analysis as well as a label.
"""

from __future__ import annotations

import numpy as np


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> np.ndarray:
    """(n_test, num_classes) class probabilities from a temperature-weighted cosine kNN vote.

    `train_labels` are ints in [0, num_classes). Test features are processed in chunks, so memory
    stays O(chunk_size × n_train).
    """
    train = _l2_normalise(train_features)
    test = _l2_normalise(test_features)
    labels = np.asarray(train_labels, np.int64)
    if train.shape[0] != labels.shape[0]:
        raise ValueError(f"{train.shape[0]} training features but {labels.shape[0]} labels.")
    if labels.size == 0:
        raise ValueError("kNN needs at least one training example.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"Training labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}.")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}.")
    k = min(k, train.shape[0])
    probs = np.zeros((test.shape[0], num_classes), np.float64)
    for start in range(0, test.shape[0], chunk_size):
        sims = test[start : start + chunk_size] @ train.T  # (c, n_train)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # k nearest, unordered
        top_sims = np.take_along_axis(sims, top, axis=1).astype(np.float64)
        weights = np.exp(top_sims / temperature - (1.0 / temperature))  # shift: exp stays finite
        votes = np.zeros((top.shape[0], num_classes), np.float64)
        np.add.at(votes, (np.arange(top.shape[0])[:, None], labels[top]), weights)
        probs[start : start + chunk_size] = votes / votes.sum(axis=1, keepdims=True)
    return probs


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of `knn_predict` (ties go to the lower class index)."""
    probs = knn_predict(
        train_features, train_labels, test_features, num_classes=num_classes, k=k, temperature=temperature
    )
    return float(np.mean(probs.argmax(axis=1) == np.asarray(test_labels)))


def knn_regress(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    test_features: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> np.ndarray:
    """(n_test,) weighted mean of the k most cosine-similar training targets, weights exp(sim / T):
    DINO's vote with the class one-hot replaced by the neighbour's value (e.g. bone age)."""
    train = _l2_normalise(train_features)
    test = _l2_normalise(test_features)
    targets = np.asarray(train_targets, np.float64)
    if train.shape[0] != targets.shape[0] or targets.size == 0:
        raise ValueError(f"{train.shape[0]} training features but {targets.shape[0]} targets (need >= 1).")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}.")
    k = min(k, train.shape[0])
    out = np.zeros(test.shape[0], np.float64)
    for start in range(0, test.shape[0], chunk_size):
        sims = test[start : start + chunk_size] @ train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, top, axis=1).astype(np.float64) / temperature - 1.0 / temperature)
        out[start : start + chunk_size] = (weights * targets[top]).sum(1) / weights.sum(1)
    return out
