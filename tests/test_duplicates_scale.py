"""The sub-quadratic embedding-duplicate search (faiss IVF) against exact brute force in numpy."""

import numpy as np
import pytest

from afm_jax.data.curation import duplicates


def _planted(n, dim, copies, rng, noise=0.02):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    dup = rng.choice(n, copies, replace=False)
    x[dup] = x[(dup + 1) % n] + noise * rng.normal(size=(copies, dim)).astype(np.float32)
    return x


def _numpy_pairs(x, threshold):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


def test_ivf_recall_of_exact_pairs_is_at_least_099():
    rng = np.random.default_rng(0)
    x = _planted(8000, 64, 400, rng)
    want = _numpy_pairs(x, 0.99)
    assert len(want) >= 350  # most planted copies (cosine ~0.9998; chained ones break), none by chance
    got = set(map(tuple, duplicates.cosine_pairs(x, 0.99, method="ivf").tolist()))
    assert got <= want  # no false pair: the distances IVF reports are exact
    assert len(got & want) / len(want) >= 0.99


def test_flat_and_auto_below_the_ivf_size_are_exact():
    rng = np.random.default_rng(1)
    x = _planted(600, 32, 30, rng, noise=0.2)  # noisier copies: some fall under the threshold
    want = _numpy_pairs(x, 0.95)
    for method in ("flat", "auto"):
        assert set(map(tuple, duplicates.cosine_pairs(x, 0.95, method=method).tolist())) == want


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        duplicates.cosine_pairs(np.eye(3, dtype=np.float32), 0.9, method="hnsw")
