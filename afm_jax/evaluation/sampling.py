"""Low-shot training subsets: a fraction of the training *patients*, stratified by label, seeded.

Why patients and not images: a 1% subset of images would hold a few images of many patients, which
is not the situation low-shot experiments are meant to model (a small cohort), and it would let
images of one patient be both in and out of the subset.

How: patients are grouped by their label (the most frequent label among their images; ties go to
the smaller label), each group is shuffled with `seed`, and the first ⌈fraction·size⌉ patients
of each group are kept (at least one per group, so a 1% subset still has both classes). Because
the same seed gives the same shuffle, the subsets are nested: 1% ⊂ 10% ⊂ 100% for one seed — a
low-shot curve then adds patients instead of swapping them. The result depends only on the set of
(patient, label) pairs and the seed, not on the order of the images.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np


def patient_labels(patient_ids, labels) -> dict[str, int]:
    """patient id -> its label: the most frequent label of its images (ties: the smaller label)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for p, y in zip(np.asarray(patient_ids).tolist(), np.asarray(labels).tolist()):
        counts[str(p)][int(y)] += 1
    out = {}
    for p, c in counts.items():
        top = max(c.values())
        out[p] = min(y for y, v in c.items() if v == top)
    return out


def low_shot_patients(patient_ids, labels, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over images: True for every image of the chosen patients (see module docstring).

    `fraction` in (0, 1]; 1 keeps everything. Raises ValueError for other values or mismatched lengths.
    """
    ids = np.asarray(patient_ids).astype(str)
    y = np.asarray(labels)
    if ids.ndim != 1 or y.shape != ids.shape:
        raise ValueError(f"patient_ids ({ids.shape}) and labels ({y.shape}) must be 1-D of the same length.")
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1] (e.g. 0.01 for 1% of the patients), got {fraction}.")
    if fraction == 1.0:
        return np.ones(ids.shape, bool)
    by_label: dict[int, list[str]] = defaultdict(list)
    for p, label in patient_labels(ids, y).items():
        by_label[label].append(p)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for label in sorted(by_label):
        group = sorted(by_label[label])
        order = rng.permutation(len(group))
        take = max(1, math.ceil(fraction * len(group) - 1e-9))
        chosen.extend(group[i] for i in order[:take])
    return np.isin(ids, np.asarray(chosen, dtype=ids.dtype))
