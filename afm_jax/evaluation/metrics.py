"""Metrics of binary, multi-class, ordinal and regression tasks; binary classification metrics on scores: ROC/PR areas, operating-point metrics, calibration.

Why our own implementation rather than calling sklearn per metric: the bootstrap evaluates every
metric on 1,000 resamples, so `binary_metrics` computes them all from one sort of the scores (the
ROC curve) and one 2×2 confusion matrix. Each formula is the textbook one and the tests check it
against sklearn on random inputs:

* **AUROC**: the Mann-Whitney probability P(score⁺ > score⁻) + ½ P(tie) — the trapezoidal area
  under the full ROC curve (sklearn's `roc_auc_score`).
* **AUPRC**: average precision Σₙ (Rₙ − Rₙ₋₁) Pₙ over distinct thresholds, the step-wise area
  without interpolation (sklearn's `average_precision_score`).
* **Operating point**: predict positive when score ≥ threshold. The default threshold is the
  Youden point, argmax over ROC thresholds of sensitivity + specificity − 1 (ties: the higher
  threshold). At it: accuracy, sensitivity, specificity, precision (PPV), NPV, F1, MCC and Cohen's
  kappa (MURA's study-level metric).
* **Sensitivity at fixed specificity** s: the largest sensitivity over ROC points whose
  specificity is ≥ s (the curve's upper envelope; no interpolation between points).

Metrics undefined on the input (AUROC with one class present; a precision with no positive calls)
are NaN rather than an exception, so that a bootstrap resample without positives is counted and
skipped instead of stopping a study.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_SPECIFICITIES: tuple[float, ...] = (0.90, 0.95)
OPERATING_POINT_KEYS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "mcc", "kappa")


def check_binary_inputs(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """(labels as int64 0/1, scores as float64), 1-D and of equal length; ValueError naming the problem."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"y_true and y_score must be 1-D, got shapes {y.shape} and {s.shape}; for "
            "two-column probabilities pass the positive-class column."
        )
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} entries but y_score has {s.size}.")
    if y.size == 0:
        raise ValueError("No examples: y_true is empty.")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"y_score holds {int(np.sum(~np.isfinite(s)))} NaN/inf values; check the model outputs.")
    values = np.unique(y)
    if not np.all(np.isin(values, (0, 1))):
        raise ValueError(
            f"y_true must hold binary labels 0/1 (1 = positive), got values {values[:10].tolist()}. "
            "Drop unlabelled (-1) examples and map multi-class labels to one-vs-rest first."
        )
    return y.astype(np.int64), s


def roc_curve_points(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold first.

    The first point is (0, 0) at threshold +inf (nothing called positive), the last (1, 1) at the
    lowest score; no intermediate point is dropped (sklearn's `roc_curve(drop_intermediate=False)`).
    With one class present, the rate of the missing class is NaN.
    """
    y, s = check_binary_inputs(y_true, y_score)
    tps, fps, thresholds = _cumulative_counts(y, s)
    pos, neg = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([[0.0], tps / pos]) if pos else np.full(tps.size + 1, np.nan)
        fpr = np.concatenate([[0.0], fps / neg]) if neg else np.full(fps.size + 1, np.nan)
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positives called at each distinct score (descending) when predicting score ≥ t."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), y_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_run].astype(np.float64)
    fps = (last_of_run + 1) - tps
    return tps, fps, s_sorted[last_of_run]


def _auroc(tps: np.ndarray, fps: np.ndarray) -> float:
    pos, neg = tps[-1], fps[-1]
    if pos == 0 or neg == 0:
        return math.nan
    tpr = np.r_[0.0, tps] / pos
    fpr = np.r_[0.0, fps] / neg
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    pos = tps[-1]
    if pos == 0:
        return math.nan
    precision = tps / (tps + fps)
    recall = tps / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve alone (NaN with one class) — what a bootstrap of AUROC needs, one sort."""
    tps, fps, _ = _cumulative_counts(*check_binary_inputs(y_true, y_score))
    return _auroc(tps, fps)


def average_precision(y_true, y_score) -> float:
    """AUPRC (average precision) alone (NaN without positives)."""
    tps, fps, _ = _cumulative_counts(*check_binary_inputs(y_true, y_score))
    return _average_precision(tps, fps)


def confusion(y_true, y_pred, labels: Sequence[int] | None = None) -> np.ndarray:
    """Confusion matrix C[i, j] = number of examples of true class labels[i] predicted as labels[j].

    `labels` defaults to the sorted classes present, and to (0, 1) whenever all values are 0/1 (so a
    binary matrix is 2×2 even if a class is absent). Rows are truth, columns predictions, as in
    sklearn's `confusion_matrix`.
    """
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries but y_pred has {p.size}.")
    if labels is None:
        present = np.unique(np.concatenate([t, p]))
        labels = [0, 1] if np.all(np.isin(present, (0, 1))) else present.tolist()
    labels = np.asarray(labels)
    index = {v.item() if hasattr(v, "item") else v: i for i, v in enumerate(labels)}
    known = np.isin(t, labels) & np.isin(p, labels)
    ti = np.asarray([index[v] for v in t[known].tolist()], np.int64)
    pi = np.asarray([index[v] for v in p[known].tolist()], np.int64)
    k = len(labels)
    return np.bincount(ti * k + pi, minlength=k * k).reshape(k, k)


def _safe_div(a: float, b: float) -> float:
    return a / b if b else math.nan


def operating_point_metrics(tn: float, fp: float, fn: float, tp: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision, NPV, F1, MCC and Cohen's kappa of a 2×2 table.

    Formulas: F1 = 2TP / (2TP + FP + FN); MCC = (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    (0 when a margin is empty, as sklearn does); kappa = (pₒ − pₑ) / (1 − pₑ) with pₑ from the
    margins (NaN when pₑ = 1, i.e. truth and prediction are both constant).
    """
    n = tn + fp + fn + tp
    accuracy = _safe_div(tp + tn, n)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / denom if denom else 0.0
    p_expected = _safe_div((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp), n * n)
    kappa = _safe_div(accuracy - p_expected, 1.0 - p_expected) if not math.isclose(p_expected, 1.0) else math.nan
    return {
        "accuracy": accuracy,
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "precision": _safe_div(tp, tp + fp),
        "npv": _safe_div(tn, tn + fn),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "mcc": mcc,
        "kappa": kappa,
    }


def specificity_key(specificity: float) -> str:
    """The `binary_metrics` key of the sensitivity at fixed `specificity`, e.g. 'sensitivity_at_spec_0.90'."""
    return f"sensitivity_at_spec_{specificity:.2f}"


def binary_metrics(
    y_true, y_score, *, threshold: float | None = None, specificities: Sequence[float] = DEFAULT_SPECIFICITIES
) -> dict[str, float]:
    """Every binary metric of scores `y_score` (higher = more positive) against labels 0/1.

    Keys: auroc, auprc, threshold (the one used), youden_threshold, accuracy, sensitivity,
    specificity, precision, npv, f1, mcc, kappa (at `threshold`, default the Youden point),
    sensitivity_at_spec_0.90 / _0.95 (one per entry of `specificities`), prevalence, n.

    Pass `threshold` to evaluate at a point chosen elsewhere (e.g. the Youden point of the
    validation split) — choosing it on the test set itself is optimistic.
    """
    y, s = check_binary_inputs(y_true, y_score)
    tps, fps, thresholds = _cumulative_counts(y, s)
    pos, neg = float(tps[-1]), float(fps[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / pos if pos else np.full(tps.shape, np.nan)
        fpr = fps / neg if neg else np.full(fps.shape, np.nan)
    # Youden's J over the curve's points, (0, 0) at +inf included; the first maximum is the highest threshold.
    j = np.r_[0.0, tpr - fpr]
    youden = math.inf if not (pos and neg) else float(np.r_[np.inf, thresholds][int(np.nanargmax(j))])
    if threshold is None:
        threshold = youden
    called = s >= threshold
    tp = float(np.sum(called & (y == 1)))
    fp = float(np.sum(called & (y == 0)))
    out: dict[str, float] = {
        "auroc": _auroc(tps, fps),
        "auprc": _average_precision(tps, fps),
        "threshold": float(threshold),
        "youden_threshold": youden,
        **operating_point_metrics(neg - fp, fp, pos - tp, tp),
    }
    for spec in specificities:
        if not 0.0 <= spec <= 1.0:
            raise ValueError(f"specificities must lie in [0, 1], got {spec}.")
        if not (pos and neg):
            out[specificity_key(spec)] = math.nan
            continue
        ok = np.r_[True, (1.0 - fpr) >= spec - 1e-12]  # the (0, 0) point always qualifies
        out[specificity_key(spec)] = float(np.max(np.r_[0.0, tpr][ok]))
    out["prevalence"] = pos / y.size
    out["n"] = float(y.size)
    return out


def calibration_bins(y_true, y_score, n_bins: int = 10) -> dict[str, np.ndarray | float]:
    """Reliability-diagram data for probabilities in [0, 1], in `n_bins` equal-width bins.

    Returns bin_edges (n_bins + 1), mean_predicted, observed_fraction (NaN for empty bins), counts,
    and ece, the expected calibration error Σ_b (n_b / n) |observed_b − predicted_b|. Bins are
    right-closed except the first, which includes 0 (the binning of sklearn's `calibration_curve`
    with strategy="uniform", which returns the non-empty bins only).
    """
    y, s = check_binary_inputs(y_true, y_score)
    if np.any((s < 0) | (s > 1)):
        raise ValueError("calibration_bins needs probabilities in [0, 1]; apply a sigmoid/softmax to logits first.")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    which = np.searchsorted(edges[1:-1], s, side="left")
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(which, weights=s, minlength=n_bins) / counts
        observed = np.bincount(which, weights=y.astype(np.float64), minlength=n_bins) / counts
    nonempty = counts > 0
    ece = float(np.sum(counts[nonempty] / y.size * np.abs(observed[nonempty] - mean_predicted[nonempty])))
    return {
        "bin_edges": edges,
        "mean_predicted": mean_predicted,
        "observed_fraction": observed,
        "counts": counts,
        "ece": ece,
    }


def multiclass_metrics(y_true, y_prob) -> dict[str, float]:
    """Metrics of class probabilities `y_prob` (N, C) against integer labels 0..C-1 (e.g. fracture types).

    Keys: accuracy and balanced_accuracy of the argmax, macro_f1, kappa (unweighted Cohen's kappa of
    the argmax), macro_auroc (mean of the one-vs-rest AUROCs of the classes present with both
    outcomes), auroc_class_<k> for each class, n. Rows need not sum to 1 (argmax and ranks only).
    """
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"y_prob must be (N, C) and y_true (N,); got {p.shape} and {y.shape}.")
    num_classes = p.shape[1]
    if y.size == 0 or np.any((y < 0) | (y >= num_classes)) or not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(f"y_true must hold integer labels 0..{num_classes - 1} (drop unlabelled -1 first).")
    y = y.astype(np.int64)
    pred = np.argmax(p, axis=1)
    table = confusion(y, pred, labels=range(num_classes)).astype(np.float64)
    n = table.sum()
    support, called = table.sum(axis=1), table.sum(axis=0)
    diag = np.diag(table)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = diag / support
        f1 = 2 * diag / (support + called)
    present = support > 0
    p_expected = float(np.sum(support * called)) / (n * n)
    accuracy = float(diag.sum() / n)
    out: dict[str, float] = {
        "accuracy": accuracy,
        "balanced_accuracy": float(np.mean(recall[present])),
        "macro_f1": float(np.mean(np.nan_to_num(f1[present | (called > 0)]))),
        "kappa": (accuracy - p_expected) / (1.0 - p_expected) if not math.isclose(p_expected, 1.0) else math.nan,
    }
    aurocs = []
    for k in range(num_classes):
        tps, fps, _ = _cumulative_counts((y == k).astype(np.int64), p[:, k])
        out[f"auroc_class_{k}"] = _auroc(tps, fps)
        if math.isfinite(out[f"auroc_class_{k}"]):
            aurocs.append(out[f"auroc_class_{k}"])
    out["macro_auroc"] = float(np.mean(aurocs)) if aurocs else math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        true_negatives = n - support - called + diag
        specificity = true_negatives / (n - support)
    for k in range(num_classes):
        out[f"sensitivity_class_{k}"] = float(recall[k])
        out[f"specificity_class_{k}"] = float(specificity[k])
    out["n"] = float(n)
    return out


def quadratic_weighted_kappa(y_true, y_pred, num_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights w_ij = (i − j)² / (K − 1)² over grades 0..K−1:
    κ = 1 − Σ w O / Σ w E, O the confusion matrix, E the outer product of its margins / n (the
    Kellgren–Lawrence grading standard; sklearn's `cohen_kappa_score(weights="quadratic",
    labels=range(K))`: with every grade present this is its default too). NaN when Σ w E = 0 (a single grade everywhere)."""
    t, p = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    k = int(num_classes or (max(t.max(), p.max()) + 1))
    observed = confusion(t, p, labels=range(k)).astype(np.float64)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    i, j = np.indices((k, k))
    weights = (i - j) ** 2
    denom = float(np.sum(weights * expected))
    return 1.0 - float(np.sum(weights * observed)) / denom if denom > 0 else math.nan


def ordinal_metrics(y_true, y_prob) -> dict[str, float]:
    """`multiclass_metrics` of ordered classes (grades 0..C−1) plus qwk (quadratic-weighted kappa of the
    argmax grade), mae_grades (mean |predicted − true| grade), within_1 (fraction within ±1 grade) and
    mae_expected_grade (|Σ_k k·p_k − true|: the expected-grade reading of the probabilities)."""
    out = multiclass_metrics(y_true, y_prob)
    y = np.asarray(y_true, np.int64)
    p = np.asarray(y_prob, np.float64)
    pred = np.argmax(p, axis=1)
    err = np.abs(pred - y)
    out["qwk"] = quadratic_weighted_kappa(y, pred, num_classes=p.shape[1])  # weights on the grade values
    out["mae_grades"] = float(err.mean())
    out["within_1"] = float(np.mean(err <= 1))
    probs = p / np.maximum(p.sum(1, keepdims=True), 1e-12)
    out["mae_expected_grade"] = float(np.mean(np.abs(probs @ np.arange(p.shape[1]) - y)))
    return out


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    """Continuous targets (e.g. bone age in months): mae, rmse, r2 (1 − SS_res / SS_tot, NaN for a
    constant truth), pearson (r, NaN when either side is constant), bias (mean of prediction − truth,
    the Bland–Altman mean difference), loa_low / loa_high (bias ± 1.96 SD of the differences: the
    Bland–Altman limits of agreement), n."""
    y = np.asarray(y_true, np.float64)
    p = np.asarray(y_pred, np.float64)
    if y.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise ValueError(f"y_true and y_pred must be 1-D of the same non-zero length; got {y.shape} and {p.shape}.")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(p))):
        raise ValueError("Regression targets and predictions must be finite (drop examples without a target).")
    diff = p - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    sd_y, sd_p = float(np.std(y)), float(np.std(p))
    pearson = float(np.mean((y - y.mean()) * (p - p.mean())) / (sd_y * sd_p)) if sd_y > 0 and sd_p > 0 else math.nan
    sd_diff = float(np.std(diff, ddof=1)) if y.size > 1 else math.nan
    bias = float(diff.mean())
    return {
        "mae": float(np.mean(np.abs(diff))),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "r2": 1.0 - float(np.sum(diff**2)) / ss_tot if ss_tot > 0 else math.nan,
        "pearson": pearson,
        "bias": bias,
        "loa_low": bias - 1.96 * sd_diff,
        "loa_high": bias + 1.96 * sd_diff,
        "n": float(y.size),
    }
