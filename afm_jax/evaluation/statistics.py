"""Confidence intervals and paired comparisons: cluster bootstrap over patients, and DeLong's test.

Why over patients: the images of one patient are correlated (same bone, same scanner, often both
sides), so resampling images treats them as independent evidence and gives intervals that are too
narrow. Each bootstrap replicate draws *patients* (`groups`) with replacement and keeps all their
images; a patient drawn twice counts twice. With one image per patient this is the ordinary bootstrap.

* `bootstrap_ci` / `bootstrap_all`: percentile intervals [q(α/2), q(1 − α/2)] of the metric over
  the replicates. Replicates where the metric is undefined (e.g. no positive patient drawn) are
  dropped and counted in `n_invalid`.
* `paired_bootstrap`: both backbones are scored on the *same* replicates, so the interval of the
  difference reflects only how the two disagree, not how hard the test patients are. Two-sided
  p-value from the bootstrap distribution of the difference: p = min(1, 2·(1 + #{d* on the far side
  of 0}) / (B + 1)), so p < α exactly when the percentile interval excludes 0 (up to the +1).
* `delong_test`: DeLong, DeLong & Clarke-Pearson (1988) for two correlated AUROCs on the same
  examples, in the fast midrank form of Sun & Xu (2014). It treats examples as independent: call it
  on patient- or study-level scores (`aggregation.aggregate`), not on images of shared patients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats as scipy_stats
from tqdm import tqdm

from afm_jax.evaluation import metrics as metrics_lib

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _inputs(y_true, groups, *scores) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    y = np.asarray(y_true)
    out = [np.asarray(s, dtype=np.float64) for s in scores]
    n = y.shape[0] if y.ndim else 0
    if groups is None:
        groups = np.arange(n)
    g = np.asarray(groups)
    for name, a in (("groups", g), *((f"score {i}", s) for i, s in enumerate(out))):
        if a.shape[:1] != (n,):
            raise ValueError(f"{name} has {a.shape[0] if a.ndim else 0} entries but y_true has {n}.")
    if n == 0:
        raise ValueError("No examples: y_true is empty.")
    return y, g, out


def _metric_fn(metric: str | MetricFn) -> tuple[str, MetricFn]:
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    name = str(metric)
    probe = metrics_lib.binary_metrics([0, 1], [0.0, 1.0])
    if name not in probe:
        raise ValueError(
            f"Unknown metric {name!r}; use one of {sorted(probe)} or pass a function (y_true, y_score) -> float."
        )
    if name in ("auroc", "auprc"):  # fast paths: one sort, no operating point
        return name, metrics_lib.auroc if name == "auroc" else metrics_lib.average_precision
    return name, lambda y, s: metrics_lib.binary_metrics(y, s)[name]


class _PatientResampler:
    """Draws bootstrap replicates as image index arrays: patients with replacement, all their images.

    An image appears as many times as its patient was drawn; replicates list images in dataset order
    (every metric here is invariant to order).
    """

    def __init__(self, groups: np.ndarray, seed: int) -> None:
        _, group_of_image = np.unique(groups, return_inverse=True)
        self.group_of_image = group_of_image.ravel()
        self.num_groups = int(self.group_of_image.max()) + 1
        self.images = np.arange(self.group_of_image.size)
        self.rng = np.random.default_rng(seed)

    def draw(self) -> np.ndarray:
        chosen = self.rng.integers(0, self.num_groups, size=self.num_groups)
        times_drawn = np.bincount(chosen, minlength=self.num_groups)
        return np.repeat(self.images, times_drawn[self.group_of_image])


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _check_alpha(alpha: float, n_boot: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha} (0.05 gives 95% intervals).")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")


def _summary(point: float, replicates: np.ndarray, alpha: float) -> dict[str, float]:
    low, high = _percentile_interval(replicates, alpha)
    valid = replicates[np.isfinite(replicates)]
    return {
        "point": float(point),
        "low": low,
        "high": high,
        "se": float(np.std(valid, ddof=1)) if valid.size > 1 else math.nan,
        "n_boot": int(valid.size),
        "n_invalid": int(replicates.size - valid.size),
    }


def bootstrap_ci(
    y_true,
    y_score,
    groups,
    metric: str | MetricFn,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    progress: bool = False,
) -> dict[str, float]:
    """Point estimate and (1 − alpha) percentile interval of `metric` by bootstrap over `groups`.

    `metric` is a `metrics.binary_metrics` key ("auroc", "kappa", "sensitivity_at_spec_0.90", ...)
    or a function (y_true, y_score) -> float. `groups` holds the patient (or study) id of each
    example; None resamples examples. Returns point, low, high, se (bootstrap standard error),
    n_boot (valid replicates), n_invalid. The same seed gives the same interval.
    """
    _check_alpha(alpha, n_boot)
    y, g, (s,) = _inputs(y_true, groups, y_score)
    _, fn = _metric_fn(metric)
    if not callable(metric):
        metrics_lib.check_binary_inputs(y, s)  # clear errors for bad labels
    resampler = _PatientResampler(g, seed)
    replicates = np.empty(int(n_boot))
    for b in tqdm(range(int(n_boot)), desc="bootstrap", unit="rep", disable=not progress, leave=False):
        idx = resampler.draw()
        replicates[b] = _finite_or_nan(fn, y[idx], s[idx])
    return _summary(fn(y, s), replicates, alpha)


def _finite_or_nan(fn: MetricFn, y: np.ndarray, s: np.ndarray) -> float:
    """fn(y, s), or NaN where it is undefined on this replicate (e.g. one class only)."""
    try:
        value = float(fn(y, s))
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def bootstrap_all(
    y_true,
    y_score,
    groups,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    threshold: float | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Every `metrics.binary_metrics` entry with its bootstrap interval: {metric: {point, low, high, se, ...}}.

    One set of replicates serves all metrics (so they are consistent with each other). With
    `threshold=None` the Youden point is re-chosen in each replicate — the interval then includes
    the uncertainty of choosing the point; pass a threshold fixed on validation to exclude it.
    """
    return bootstrap_metrics(
        lambda y, s: metrics_lib.binary_metrics(y, s, threshold=threshold),
        y_true,
        y_score,
        groups,
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
        progress=progress,
    )


def bootstrap_metrics(
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    y_true,
    y_score,
    groups,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """`bootstrap_all` for any dict-valued metric (multi-class, ordinal, regression): every key of
    `metric_fn(y, s)` with its (1 − alpha) percentile interval over the same patient replicates.
    `y_score` may be (N,) or (N, C). Replicates where the function raises ValueError count as invalid."""
    _check_alpha(alpha, n_boot)
    y, g, (s,) = _inputs(y_true, groups, y_score)
    point = metric_fn(y, s)
    keys = list(point)
    resampler = _PatientResampler(g, seed)
    replicates = np.full((int(n_boot), len(keys)), np.nan)
    for b in tqdm(range(int(n_boot)), desc="bootstrap", unit="rep", disable=not progress, leave=False):
        idx = resampler.draw()
        try:
            m = metric_fn(y[idx], s[idx])
        except ValueError:
            continue
        replicates[b] = [m.get(k, math.nan) for k in keys]
    replicates[~np.isfinite(replicates)] = np.nan
    return {k: _summary(point[k], replicates[:, i], alpha) for i, k in enumerate(keys)}


def paired_bootstrap(
    y_true,
    score_a,
    score_b,
    groups,
    metric: str | MetricFn = "auroc",
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    progress: bool = False,
    return_replicates: bool = False,
) -> dict[str, float]:
    """Difference metric(a) − metric(b) on the same examples, with a paired bootstrap over `groups`.

    Returns metric_a, metric_b, diff, low, high (percentile interval of the difference), se,
    p_value (two-sided, H0: no difference), n_boot (valid replicates), n_invalid; with
    `return_replicates` also `replicates` (the B differences, NaN where undefined), for pooling seeds.
    """
    _check_alpha(alpha, n_boot)
    y, g, (a, b_scores) = _inputs(y_true, groups, score_a, score_b)
    _, fn = _metric_fn(metric)
    if not callable(metric):
        metrics_lib.check_binary_inputs(y, a)
        metrics_lib.check_binary_inputs(y, b_scores)
    metric_a, metric_b = float(fn(y, a)), float(fn(y, b_scores))
    resampler = _PatientResampler(g, seed)
    diffs = np.empty(int(n_boot))
    for r in tqdm(range(int(n_boot)), desc="paired bootstrap", unit="rep", disable=not progress, leave=False):
        idx = resampler.draw()
        diffs[r] = _finite_or_nan(fn, y[idx], a[idx]) - _finite_or_nan(fn, y[idx], b_scores[idx])
    out = _summary(metric_a - metric_b, diffs, alpha)
    valid = diffs[np.isfinite(diffs)]
    if valid.size:
        far_side = min(int(np.sum(valid <= 0)), int(np.sum(valid >= 0)))
        p_value = min(1.0, 2.0 * (1 + far_side) / (valid.size + 1))
    else:
        p_value = math.nan
    diff = out.pop("point")
    extra = {"replicates": diffs} if return_replicates else {}
    return {"metric_a": metric_a, "metric_b": metric_b, "diff": diff, **out, "p_value": p_value, **extra}


def pooled_difference(diffs: list[float], replicates: list[np.ndarray], *, alpha: float = 0.05) -> dict[str, float]:
    """Paired differences of several seeds pooled: the mean of the per-seed differences, with the
    (1 − alpha) percentile interval of all seeds' bootstrap replicates together (seeds × bootstrap:
    the spread between seeds and the test-set uncertainty), and a two-sided p-value as `paired_bootstrap`'s."""
    pooled = np.concatenate([np.asarray(r, np.float64) for r in replicates]) if replicates else np.zeros(0)
    valid = pooled[np.isfinite(pooled)]
    low, high = _percentile_interval(valid, alpha) if valid.size else (math.nan, math.nan)
    far_side = min(int(np.sum(valid <= 0)), int(np.sum(valid >= 0))) if valid.size else 0
    return {
        "diff": float(np.mean(diffs)) if diffs else math.nan,
        "low": low,
        "high": high,
        "p_value": min(1.0, 2.0 * (1 + far_side) / (valid.size + 1)) if valid.size else math.nan,
        "num_seeds": len(diffs),
        "n_boot": int(valid.size),
    }


# ─── DeLong ──────────────────────────────────────────────────────────────────────────────────────


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (Sun & Xu's midrank)."""
    return scipy_stats.rankdata(x, method="average")


def _delong_components(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their covariance (k, k) by the fast DeLong algorithm (Sun & Xu 2014, Alg. 1)."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    aucs, v10, v01 = [], [], []
    for s in scores:
        x, z = s[pos], s[neg]
        tx, tz, tall = _midranks(x), _midranks(z), _midranks(np.r_[x, z])
        auc = (tall[:m].sum() - m * (m + 1) / 2.0) / (m * n)
        v10.append((tall[:m] - tx) / n)  # structural components of positives
        v01.append(1.0 - (tall[m:] - tz) / m)  # ... of negatives
        aucs.append(auc)
    s10 = np.atleast_2d(np.cov(np.asarray(v10))) if m > 1 else np.zeros((len(scores),) * 2)
    s01 = np.atleast_2d(np.cov(np.asarray(v01))) if n > 1 else np.zeros((len(scores),) * 2)
    return np.asarray(aucs), s10 / m + s01 / n


def delong_test(y_true, score_a, score_b, *, alpha: float = 0.05) -> dict[str, float]:
    """DeLong's test of AUROC(a) = AUROC(b) for two scores of the same examples.

    Returns auc_a, auc_b, diff (a − b), se_diff, low/high (normal (1 − alpha) interval of the
    difference), z, p_value (two-sided), se_a, se_b. Examples must be independent: aggregate images
    to patients or studies first.
    """
    y, _, (a, b) = _inputs(y_true, None, score_a, score_b)
    y, _ = metrics_lib.check_binary_inputs(y, a)
    if y.min() == y.max():
        raise ValueError(f"DeLong's test needs both classes among the examples; this set has only label {int(y[0])}.")
    if not np.all(np.isfinite(b)):
        raise ValueError("score_b holds NaN/inf values.")
    aucs, cov = _delong_components(y, [a, b])
    var_diff = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(var_diff, 0.0))
    if se > 0:
        z = diff / se
        p_value = float(2.0 * scipy_stats.norm.sf(abs(z)))
    else:  # identical rankings: no evidence of a difference
        z, p_value = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    q = float(scipy_stats.norm.ppf(1.0 - alpha / 2.0))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se_diff": se,
        "low": diff - q * se,
        "high": diff + q * se,
        "z": float(z),
        "p_value": p_value,
        "se_a": math.sqrt(max(float(cov[0, 0]), 0.0)),
        "se_b": math.sqrt(max(float(cov[1, 1]), 0.0)),
    }


def delong_ci(y_true, y_score, *, alpha: float = 0.05) -> dict[str, float]:
    """AUROC with DeLong's standard error and normal (1 − alpha) interval (clipped to [0, 1]).

    Returns point, low, high, se. Examples must be independent (see `delong_test`).
    """
    y, _, (s,) = _inputs(y_true, None, y_score)
    y, s = metrics_lib.check_binary_inputs(y, s)
    if y.min() == y.max():
        raise ValueError(f"An AUROC needs both classes; this set has only label {int(y[0])}.")
    aucs, cov = _delong_components(y, [s])
    se = math.sqrt(max(float(cov[0, 0]), 0.0))
    q = float(scipy_stats.norm.ppf(1.0 - alpha / 2.0))
    return {
        "point": float(aucs[0]),
        "low": max(0.0, float(aucs[0]) - q * se),
        "high": min(1.0, float(aucs[0]) + q * se),
        "se": se,
    }
