"""Image-level predictions -> one prediction per patient or study (mean or max of probabilities).

Why: clinical decisions and MURA's official metric are per study, and patient-level scores are the
independent units that DeLong's test and simple intervals assume. A study is abnormal if any image
shows the abnormality, which is what "max" models; "mean" is steadier when single images are noisy
(MURA's baseline averaged the study's image probabilities).

Labels must agree within a unit (a study has one label); a unit whose images disagree is an error
by default, because silently picking one hides a labelling problem. `on_conflict="max"` labels it
positive if any image is (a patient with a fracture on one side), "error" refuses.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

HOW = ("mean", "max")
ON_CONFLICT = ("error", "max")


def aggregate(
    ids, y_true, y_score, how: Literal["mean", "max"] = "mean", *, on_conflict: Literal["error", "max"] = "error"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique ids (sorted), one label per id, one score per id).

    `y_score` is (N,) probabilities or (N, C) class probabilities (aggregated column-wise). Scores
    should be probabilities, not logits: the mean of logits is a different model. The same ids
    always come out in the same (sorted) order, so two backbones' aggregates line up for paired tests.
    """
    if how not in HOW:
        raise ValueError(f"how={how!r}; use one of {HOW}.")
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"on_conflict={on_conflict!r}; use one of {ON_CONFLICT}.")
    ids_arr = np.asarray(ids)
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    n = ids_arr.shape[0] if ids_arr.ndim else 0
    if y.shape != (n,) or s.shape[:1] != (n,) or s.ndim > 2:
        raise ValueError(
            f"ids ({ids_arr.shape}), y_true ({y.shape}) and y_score ({s.shape}) must have the same "
            "length; y_score (N,) or (N, C)."
        )
    if n == 0:
        raise ValueError("No examples to aggregate.")
    unique, inverse = np.unique(ids_arr, return_inverse=True)
    inverse = inverse.ravel()
    k = unique.size
    if np.issubdtype(y.dtype, np.floating):  # regression targets: one value per unit too
        label_max, label_min = np.full(k, -np.inf), np.full(k, np.inf)
        np.maximum.at(label_max, inverse, y.astype(np.float64))
        np.minimum.at(label_min, inverse, y.astype(np.float64))
        conflicted = ~np.isclose(label_max, label_min, rtol=1e-6, atol=1e-9)
    else:
        label_max = np.full(k, np.iinfo(np.int64).min)
        label_min = np.full(k, np.iinfo(np.int64).max)
        np.maximum.at(label_max, inverse, y.astype(np.int64))
        np.minimum.at(label_min, inverse, y.astype(np.int64))
        conflicted = label_max != label_min
    if conflicted.any() and on_conflict == "error":
        raise ValueError(
            f"{int(conflicted.sum())} of {k} ids have images with different labels "
            f"(e.g. {unique[conflicted][:3].tolist()}); fix the labels, or pass on_conflict='max' "
            "to call a unit positive when any of its images is."
        )
    flat = s.reshape(n, -1)
    if how == "mean":
        sums = np.zeros((k, flat.shape[1]))
        np.add.at(sums, inverse, flat)
        agg = sums / np.bincount(inverse, minlength=k)[:, None]
    else:
        agg = np.full((k, flat.shape[1]), -np.inf)
        np.maximum.at(agg, inverse, flat)
    return unique, label_max, agg.reshape((k,) + s.shape[1:])
