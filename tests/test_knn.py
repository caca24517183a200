"""DINO's weighted kNN equals sklearn's KNeighborsClassifier with the same cosine/temperature weights."""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from afm_jax.evaluation.knn import knn_accuracy, knn_predict


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_knn_matches_sklearn_with_exp_cosine_weights(k, temperature):
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    labels = rng.integers(0, 3, 60)
    ours = knn_predict(train, labels, test, num_classes=3, k=k, temperature=temperature, chunk_size=7)
    ref = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1.0 - d) / temperature)
    ).fit(train, labels)
    np.testing.assert_allclose(ours, ref.predict_proba(test), atol=1e-6)


def test_knn_separates_clusters_and_checks_labels():
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:2] * 10
    train = np.concatenate([centres[0] + rng.normal(size=(20, 4)), centres[1] + rng.normal(size=(20, 4))])
    test = np.concatenate([centres[0] + rng.normal(size=(5, 4)), centres[1] + rng.normal(size=(5, 4))])
    labels, test_labels = np.repeat([0, 1], 20), np.repeat([0, 1], 5)
    assert knn_accuracy(train, labels, test, test_labels, num_classes=2) == 1.0
    with pytest.raises(ValueError, match="labels must lie"):
        knn_predict(train, labels + 5, test, num_classes=2)
