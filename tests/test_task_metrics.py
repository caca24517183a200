"""Multi-class, ordinal and regression metrics against sklearn/scipy on random data with ties, and
their patient-bootstrap intervals against an independently written bootstrap."""

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn import metrics as skm

from afm_jax.evaluation import aggregation, metrics, statistics


def _classes(seed, n=150, k=4, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    if ties:
        logits = np.round(logits, 0)  # many tied probabilities within a column
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
def test_multiclass_metrics_match_sklearn_with_ties(seed):
    y, p = _classes(seed)
    m = metrics.multiclass_metrics(y, p)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    cm = skm.confusion_matrix(y, pred, labels=range(4))
    for k in range(4):
        tp = cm[k, k]
        fn = cm[k].sum() - tp
        fp = cm[:, k].sum() - tp
        tn = cm.sum() - tp - fn - fp
        assert m[f"sensitivity_class_{k}"] == pytest.approx(tp / (tp + fn), abs=1e-12)
        assert m[f"specificity_class_{k}"] == pytest.approx(tn / (tn + fp), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_ordinal_metrics_match_sklearn(seed):
    y, p = _classes(seed, k=5)  # e.g. Kellgren–Lawrence grades 0–4
    m = metrics.ordinal_metrics(y, p)
    pred = p.argmax(1)
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-12)
    assert m["mae_grades"] == pytest.approx(skm.mean_absolute_error(y, pred), abs=1e-12)
    assert m["within_1"] == pytest.approx(np.mean(np.abs(pred - y) <= 1), abs=1e-12)
    assert m["mae_expected_grade"] == pytest.approx(np.mean(np.abs(p @ np.arange(5) - y)), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)


def test_qwk_weights_the_grade_values_even_when_a_grade_is_missing():
    y = np.array([0, 0, 2, 2, 4, 4, 4, 0])
    pred = np.array([0, 2, 2, 4, 4, 2, 4, 0])
    expected = skm.cohen_kappa_score(y, pred, weights="quadratic", labels=np.arange(5))
    assert metrics.quadratic_weighted_kappa(y, pred, num_classes=5) == pytest.approx(expected, abs=1e-12)
    # a prediction one grade off counts less than one four grades off
    assert metrics.quadratic_weighted_kappa([0, 1, 2, 3, 4], [1, 1, 2, 3, 4], 5) > metrics.quadratic_weighted_kappa(
        [0, 1, 2, 3, 4], [4, 1, 2, 3, 4], 5
    )


@pytest.mark.parametrize("seed", range(5))
def test_regression_metrics_match_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    y = np.round(rng.uniform(20, 200, 120))  # bone age in months, with ties
    pred = np.round(y + rng.normal(3, 12, y.size))
    m = metrics.regression_metrics(y, pred)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)), rel=1e-12)
    assert m["r2"] == pytest.approx(skm.r2_score(y, pred), rel=1e-12)
    assert m["pearson"] == pytest.approx(scipy_stats.pearsonr(y, pred)[0], rel=1e-10)
    d = pred - y
    assert m["bias"] == pytest.approx(d.mean()) and m["loa_high"] == pytest.approx(d.mean() + 1.96 * d.std(ddof=1))
    assert np.isnan(metrics.regression_metrics(np.ones(5), np.arange(5.0))["r2"])


def test_dict_bootstrap_matches_an_independent_patient_bootstrap():
    rng = np.random.default_rng(0)
    patients = 30
    pid = np.repeat([f"p{i:02d}" for i in range(patients)], 3)
    y = np.repeat(rng.uniform(50, 150, patients), 3)
    pred = y + rng.normal(0, 10, y.size)
    got = statistics.bootstrap_metrics(metrics.regression_metrics, y, pred, pid, n_boot=300, seed=3)["mae"]
    ids = sorted(set(pid.tolist()))
    r = np.random.default_rng(3)
    reps = []
    for _ in range(300):
        chosen = r.integers(0, len(ids), len(ids))
        rows = np.concatenate([np.flatnonzero(pid == ids[c]) for c in chosen])
        reps.append(skm.mean_absolute_error(y[rows], pred[rows]))
    low, high = np.percentile(reps, [2.5, 97.5])
    assert got["point"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-12)


def test_aggregate_float_targets_and_their_conflicts():
    ids, y, s = aggregation.aggregate(["a", "a", "b"], np.array([1.5, 1.5, 3.0]), [1.0, 2.0, 5.0])
    np.testing.assert_array_equal(ids, ["a", "b"])
    np.testing.assert_allclose(y, [1.5, 3.0]) and np.testing.assert_allclose(s, [1.5, 5.0])
    with pytest.raises(ValueError, match="different labels"):
        aggregation.aggregate(["a", "a"], np.array([1.0, 2.0]), [0.0, 0.0])


def test_macro_f1_counts_a_class_that_is_predicted_but_never_true():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 80)  # classes 0..2 in truth
    p = rng.random((80, 4))  # class 3 is predicted too
    pred = p.argmax(1)
    assert 3 in pred and 3 not in y
    m = metrics.multiclass_metrics(y, p)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
