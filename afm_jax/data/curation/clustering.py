"""Hierarchical k-means and balanced sampling over it (Vo et al. 2024, the curation behind DINOv2's
successors), retrieval toward a seed set (as LVD-142M retrieved uncurated images near curated
ones), and per-patient caps.

Why balanced: a hospital archive is dominated by a few appearances (routine follow-up views);
sampling uniformly at random keeps that imbalance, while taking the same number from every
cluster — recursively, at every level of a cluster hierarchy — flattens it, so rare appearances
survive. The hierarchy (k-means on the data, then k-means on the centroids, ...) keeps the
balance meaningful when the finest clusters are many.

How: `balanced_order` turns the hierarchy into one priority order of all points such that every
prefix is balanced: inside each leaf cluster points are ranked (at random, or by distance to the
centroid); each parent interleaves its children round-robin (child order shuffled), and so on up
to a root that interleaves the top clusters. Taking the first T points of a round-robin
interleave gives each cluster min(size, fair share) and spreads the rest over the larger ones —
the water-filling allocation of balanced sampling — at every level at once. Caps and retrieval
then act on this order (`take`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from afm_jax.data.curation.duplicates import normalize


def hierarchical_kmeans(
    x: np.ndarray, levels: Sequence[int], *, niter: int = 20, seed: int = 0, min_points_per_cluster: int = 4
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Spherical k-means (faiss) on the unit-normalised rows of `x`, then on the centroids, per level.

    `levels` are cluster counts, finest first, e.g. (32, 8). A level gets at most
    len(points) // min_points_per_cluster clusters (at least 1), so small datasets still work.
    Returns (assignments, centroids): assignments[l] is the level-l cluster of every *point*
    (int64, shape (N,)), centroids[l] the level-l centroids.
    """
    import faiss  # pylint: disable=g-import-not-at-top  (faiss: slow to load, only the search stages need it)

    points = normalize(x)
    assignments: list[np.ndarray] = []
    centroids: list[np.ndarray] = []
    of_point = np.arange(len(points))  # current-level item of every original point
    for level, k_wanted in enumerate(levels):
        k = int(max(1, min(int(k_wanted), len(points) // max(1, min_points_per_cluster))))
        if k == 1:
            labels, cents = np.zeros(len(points), np.int64), normalize(points.mean(0, keepdims=True))
        else:
            km = faiss.Kmeans(
                points.shape[1],
                k,
                niter=niter,
                seed=seed + level,
                spherical=True,
                min_points_per_centroid=1,
                max_points_per_centroid=1 << 30,
                nredo=3,
                verbose=False,
            )
            km.train(points)
            _, labels = km.index.search(points, 1)
            labels, cents = labels[:, 0].astype(np.int64), np.asarray(km.centroids, np.float32)
            labels, cents = _drop_empty(labels, cents)
        of_point = labels[of_point]
        assignments.append(of_point)
        centroids.append(cents)
        points = cents
    return assignments, centroids


def _drop_empty(labels: np.ndarray, cents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumbers clusters 0..k'-1 without empty ones."""
    used, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64), cents[used]


def _interleave(parent: np.ndarray, child: np.ndarray, rank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank of every point inside its parent when the parent takes its children round-robin.

    A point of child c with rank r inside c comes at position r in round r; inside a round the
    children go in a random (seeded) order."""
    child_order = rng.permutation(int(child.max()) + 1 if len(child) else 0)
    order = np.lexsort((child_order[child], rank, parent))
    sorted_parent = parent[order]
    starts = np.flatnonzero(np.r_[True, sorted_parent[1:] != sorted_parent[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    new_rank = np.empty(len(order), np.int64)
    new_rank[order] = np.arange(len(order)) - run_start
    return new_rank


def balanced_order(
    assignments: Sequence[np.ndarray], *, seed: int = 0, within: str = "random", distance: np.ndarray | None = None
) -> np.ndarray:
    """A permutation of the points whose every prefix is balanced across clusters at every level.

    `assignments` as returned by hierarchical_kmeans (finest first). `within` orders each leaf
    cluster: "random", or "centroid" (ascending `distance` to the leaf centroid, then random).
    """
    rng = np.random.default_rng(seed)
    leaf = np.asarray(assignments[0], np.int64)
    n = len(leaf)
    if n == 0:
        return np.zeros(0, np.int64)
    tie = rng.permutation(n)
    if within == "centroid":
        if distance is None:
            raise ValueError("within='centroid' needs the distance of every point to its leaf centroid.")
        keys = (tie, np.asarray(distance, np.float64), leaf)
    elif within == "random":
        keys = (tie, leaf)
    else:
        raise ValueError(f"within must be 'random' or 'centroid', got {within!r}.")
    order = np.lexsort(keys)  # rank inside the leaf
    sorted_leaf = leaf[order]
    starts = np.flatnonzero(np.r_[True, sorted_leaf[1:] != sorted_leaf[:-1]])
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    child = leaf
    for parent in [np.asarray(a, np.int64) for a in assignments[1:]] + [np.zeros(n, np.int64)]:
        rank = _interleave(parent, child, rank, rng)
        child = parent
    return np.argsort(rank, kind="stable")


def distance_to_centroid(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """1 - cosine between each unit-normalised row and its cluster's centroid."""
    return 1.0 - np.sum(normalize(x) * normalize(centroids)[labels], axis=1)


def retrieve(x: np.ndarray, seeds: np.ndarray, *, neighbours: int, min_cosine: float = -1.0) -> np.ndarray:
    """Indices of the rows of `x` among the `neighbours` nearest (cosine, faiss) of any seed vector,
    at least `min_cosine` similar; ordered by their best similarity to a seed (most similar first)."""
    import faiss  # pylint: disable=g-import-not-at-top  (faiss: slow to load, only the search stages need it)

    if len(seeds) == 0 or neighbours <= 0 or len(x) == 0:
        return np.zeros(0, np.int64)
    points = normalize(x)
    index = faiss.IndexFlatIP(points.shape[1])
    index.add(points)
    sims, ids = index.search(normalize(seeds), min(int(neighbours), len(points)))
    keep = (ids >= 0) & (sims >= min_cosine)
    ids, sims = ids[keep], sims[keep]
    best: dict[int, float] = {}
    for i, s in zip(ids.tolist(), sims.tolist()):
        best[i] = max(best.get(i, -np.inf), s)
    return np.asarray(sorted(best, key=lambda i: (-best[i], i)), np.int64)


def take(
    order: np.ndarray,
    target: int,
    *,
    patients: np.ndarray | None = None,
    max_per_patient: int = 0,
    first: np.ndarray | None = None,
) -> np.ndarray:
    """The first `target` points of `first` (e.g. retrieved ones) followed by `order`, skipping
    repeats and any point whose patient already has `max_per_patient` points taken (0 = no cap)."""
    seq = order if first is None or len(first) == 0 else np.concatenate([first, order])
    _, unique_pos = np.unique(seq, return_index=True)
    seq = seq[np.sort(unique_pos)]
    if max_per_patient and patients is not None:
        pats = np.asarray(patients)[seq]
        _, inverse = np.unique(pats, return_inverse=True)
        occurrence = _occurrence_index(inverse)
        seq = seq[occurrence < max_per_patient]
    return seq[:target]


def _occurrence_index(groups: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions have the same group (0 for the first)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    out = np.empty(len(groups), np.int64)
    out[order] = np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
    return out
