"""Exact, perceptual and embedding near-duplicates, grouped, with one representative kept per group.

Three detectors, run in this order on the images that passed the quality filters, each on the
survivors of the previous one:

1. exact: the same decoded pixels (BLAKE2b of shape + pixel bytes), whatever the PNG encoding;
2. near (perceptual): 256-bit DCT perceptual hashes (pHash) within a Hamming distance — resized,
   re-windowed, re-compressed or slightly noisy copies of one image. 256 bits, not the classic 64:
   radiographs of one body part share their coarse layout, and at 8x8 frequencies distinct synthetic
   femurs collide (distance 0), while at 16x16 they stay >= 34 bits apart and noisy copies <= 2;
3. embedding: cosine similarity of backbone embeddings at or above a threshold — e.g. a follow-up
   view that shows the same thing.

Pairs are found with faiss (a binary index for the hashes, an inner-product index for the
embeddings, in chunks with a progress bar); pairs become groups by union-find (transitively). With
scope "patient" only pairs of the same patient count; with "all" groups may span patients (which
in a patient-level split also flags a possible identity error) and are marked so in the manifest.

Which image is kept (the stated rule, `representative_order`): the largest image (pixel area of the
original), then the highest dynamic range (p99 - p01), then the smallest image_id — deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import cv2
import numpy as np
from tqdm import tqdm

PHASH_BITS = 256
PHASH_BYTES = PHASH_BITS // 8


def pixel_hash(pixels: np.ndarray) -> str:
    """Hex digest of the shape and raw pixel bytes: equal exactly when the decoded images are equal."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((pixels.shape, pixels.dtype.str)).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def perceptual_hash(small: np.ndarray) -> np.ndarray:
    """256-bit pHash as 32 uint8 bytes: the signs of the 16x16 lowest DCT frequencies of a 32x32
    copy, relative to their median (DC term excluded from the median)."""
    image = cv2.resize(np.asarray(small, np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(image)[:16, :16].ravel()
    bits = low > np.median(low[1:])
    return np.packbits(bits)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[np.ndarray]:
        roots = np.array([self.find(i) for i in range(len(self.parent))])
        order = np.argsort(roots, kind="stable")
        bounds = np.flatnonzero(np.diff(roots[order])) + 1
        return [g for g in np.split(order, bounds) if len(g) > 1]


def _allowed(pairs: np.ndarray, patients: np.ndarray, scope: str) -> np.ndarray:
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    if scope == "patient" and len(pairs):
        pairs = pairs[patients[pairs[:, 0]] == patients[pairs[:, 1]]]
    return pairs


def exact_pairs(hashes: Sequence[str]) -> np.ndarray:
    """(P, 2) index pairs (i < j) of equal hashes (a star per hash value; enough for grouping)."""
    first: dict[str, int] = {}
    pairs = []
    for i, h in enumerate(hashes):
        if h in first:
            pairs.append((first[h], i))
        else:
            first[h] = i
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def hamming_pairs(codes: np.ndarray, max_distance: int, *, chunk: int = 4096, progress: bool = False) -> np.ndarray:
    """(P, 2) pairs (i < j) of 256-bit codes (N, 32) uint8 within `max_distance` bits, with faiss.

    Exact either way: a flat binary index for small N; for large N a multi-index hash with
    max_distance + 1 sub-codes (pigeonhole: a pair within max_distance agrees exactly on one).
    """
    import faiss  # pylint: disable=g-import-not-at-top  (faiss: slow to load, only the search stages need it)

    codes = np.ascontiguousarray(codes, np.uint8)
    n = len(codes)
    if n < 2 or max_distance < 0:
        return np.zeros((0, 2), np.int64)
    if n <= 50_000 or max_distance >= 32:
        index = faiss.IndexBinaryFlat(PHASH_BITS)
    else:
        index = faiss.IndexBinaryMultiHash(PHASH_BITS, max_distance + 1, PHASH_BITS // (max_distance + 1))
    index.add(codes)
    return _range_pairs(lambda q: index.range_search(q, max_distance + 1), codes, chunk, progress, "phash pairs")


IVF_MIN_ROWS = 100_000  # method="auto": exact flat search below, IVF from here on


def cosine_pairs(
    embeddings: np.ndarray,
    min_cosine: float,
    *,
    chunk: int = 4096,
    progress: bool = False,
    method: str = "auto",
    nprobe: int = 8,
) -> np.ndarray:
    """(P, 2) pairs (i < j) whose L2-normalised embeddings have cosine >= min_cosine, with faiss.

    `method`: "flat" is exact and quadratic (N² dot products: ~20 min at 500k × 256 on 2 cores);
    "ivf" is an inverted-file index (2·√N k-means cells, the `nprobe` nearest cells searched per
    query), sub-quadratic and approximate — near-duplicates (cosine ≥ ~0.9) sit in the same or a
    neighbouring cell, so it finds ≥ 0.99 of the exact pairs (tests/test_duplicates_scale.py;
    bench/archive_scale.py measures the recall at 50k); "auto" = "ivf" from IVF_MIN_ROWS rows.
    """
    import faiss  # pylint: disable=g-import-not-at-top  (faiss: slow to load, only the search stages need it)

    if method not in ("auto", "flat", "ivf"):
        raise ValueError(f"method must be 'auto', 'flat' or 'ivf', got {method!r}.")
    x = normalize(embeddings)
    if len(x) < 2:
        return np.zeros((0, 2), np.int64)
    if method == "ivf" or (method == "auto" and len(x) >= IVF_MIN_ROWS):
        # 2·√N cells trained on 40 points per cell (faiss's minimum 39): training ~ 80·N·d·iters and the
        # search ~ N·nprobe·√N/2·d multiply-adds, against N²·d for the flat search.
        nlist = max(1, min(int(2 * np.sqrt(len(x))), len(x) // 40))
        quantizer = faiss.IndexFlatIP(x.shape[1])
        index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        sample = x if len(x) <= 40 * nlist else x[np.random.default_rng(0).choice(len(x), 40 * nlist, replace=False)]
        index.train(sample)
        index.nprobe = min(int(nprobe), nlist)
    else:
        index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    # faiss keeps similarities > radius; step just below the threshold so ">=" holds.
    radius = float(np.nextafter(np.float32(min_cosine), np.float32(-np.inf)))
    return _range_pairs(lambda q: index.range_search(q, radius), x, chunk, progress, "embedding pairs")


def _range_pairs(search, queries: np.ndarray, chunk: int, progress: bool, desc: str) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(queries), chunk), desc=desc, disable=not progress, leave=False):
        lims, _, ids = search(queries[start : start + chunk])
        rows = np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64))) + start
        out.append(np.stack([rows, ids.astype(np.int64)], 1))
    pairs = np.concatenate(out) if out else np.zeros((0, 2), np.int64)
    return pairs[pairs[:, 0] < pairs[:, 1]]


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, contiguous; zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), np.float32)


def group(pairs: np.ndarray, n: int) -> list[np.ndarray]:
    """Connected components (size >= 2) of the pair graph over n items, as index arrays."""
    uf = _UnionFind(n)
    for a, b in pairs:
        uf.union(int(a), int(b))
    return uf.groups()


def representative_order(area: np.ndarray, dynamic_range: np.ndarray, image_ids: Sequence[str]) -> np.ndarray:
    """A rank per item (0 = best to keep): largest area, then highest dynamic range, then smallest id."""
    ids = np.asarray(image_ids, dtype=str)
    order = np.lexsort((ids, -np.asarray(dynamic_range, np.float64), -np.asarray(area, np.float64)))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def dedup(
    candidates: np.ndarray, pairs: np.ndarray, patients: np.ndarray, rank: np.ndarray, scope: str
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Groups `pairs` (indices into the candidate list) and keeps the best-ranked member of each group.

    Returns (removed, kept_by: index of the representative each removed item defers to, groups:
    [{"size", "patients", "cross_patient", "kept", "members"}] in dataset indices).
    """
    pairs = _allowed(pairs, patients[candidates], scope)
    removed, kept_by, groups = [], [], []
    for members in group(pairs, len(candidates)):
        items = candidates[members]
        best = items[np.argmin(rank[items])]
        n_patients = len(set(patients[items].tolist()))
        groups.append(
            {
                "size": int(len(items)),
                "patients": n_patients,
                "cross_patient": n_patients > 1,
                "kept": int(best),
                "members": [int(i) for i in items],
            }
        )
        for i in items:
            if i != best:
                removed.append(int(i))
                kept_by.append(int(best))
    return np.asarray(removed, np.int64), np.asarray(kept_by, np.int64), groups
