"""Metrics against sklearn (or a hand computation) on random inputs; aggregation and low-shot sampling."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from afm_jax.evaluation import aggregation, metrics, sampling


def _random_case(seed, n=200, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rng.uniform(0.15, 0.6)).astype(int)
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s, 1)  # many tied scores, across classes too
    return y, 1.0 / (1.0 + np.exp(-s))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_ranking_metrics_match_sklearn(seed, ties):
    y, s = _random_case(seed, ties=ties)
    m = metrics.binary_metrics(y, s)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert metrics.auroc(y, s) == m["auroc"] and metrics.average_precision(y, s) == m["auprc"]
    assert m["prevalence"] == pytest.approx(y.mean()) and m["n"] == len(y)
    fpr, tpr, thr = metrics.roc_curve_points(y, s)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf


@pytest.mark.parametrize("seed", range(6))
def test_operating_point_metrics_match_sklearn(seed):
    y, s = _random_case(seed, ties=seed % 2 == 1)
    m = metrics.binary_metrics(y, s)
    # Youden point by hand from sklearn's ROC curve: argmax of tpr - fpr, highest threshold on ties.
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    best = thr[np.flatnonzero(j == j.max())].max()
    assert m["youden_threshold"] == pytest.approx(best)
    assert m["threshold"] == m["youden_threshold"]
    pred = (s >= best).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(tn / (tn + fn))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["sensitivity"] - (1 - m["specificity"]) == pytest.approx(j.max())


@pytest.mark.parametrize("seed", range(4))
def test_fixed_threshold_and_sensitivity_at_specificity(seed):
    y, s = _random_case(seed, n=150, ties=True)
    t = float(np.median(s))
    m = metrics.binary_metrics(y, s, threshold=t, specificities=(0.8, 0.9, 0.95))
    pred = (s >= t).astype(int)
    assert m["threshold"] == t
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    # Hand computation: try every threshold, keep those with specificity >= target, best sensitivity.
    for spec in (0.8, 0.9, 0.95):
        best = 0.0
        for cut in np.r_[np.inf, np.unique(s)]:
            called = s >= cut
            if np.mean(~called[y == 0]) >= spec:
                best = max(best, np.mean(called[y == 1]))
        assert m[metrics.specificity_key(spec)] == pytest.approx(best), spec


def test_default_keys_are_the_documented_ones():
    y, s = _random_case(0)
    m = metrics.binary_metrics(y, s)
    for key in (
        "auroc",
        "auprc",
        "accuracy",
        "sensitivity",
        "specificity",
        "f1",
        "mcc",
        "kappa",
        "youden_threshold",
        "sensitivity_at_spec_0.90",
        "sensitivity_at_spec_0.95",
        "prevalence",
        "n",
    ):
        assert key in m
    assert all(isinstance(v, float) for v in m.values())


def test_perfect_and_one_class_inputs():
    m = metrics.binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0 and m["accuracy"] == 1.0 and m["kappa"] == 1.0
    assert m["sensitivity_at_spec_0.95"] == 1.0
    one = metrics.binary_metrics([1, 1, 1], [0.2, 0.5, 0.9])
    assert math.isnan(one["auroc"]) and math.isnan(one["specificity"])
    assert one["auprc"] == 1.0  # every call is correct when all are positive
    with pytest.raises(ValueError, match="binary labels"):
        metrics.binary_metrics([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.binary_metrics([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="entries"):
        metrics.binary_metrics([0, 1, 1], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(3))
def test_confusion_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    t, p = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    np.testing.assert_array_equal(metrics.confusion(t, p), skm.confusion_matrix(t, p))
    tb, pb = t % 2, p % 2
    np.testing.assert_array_equal(metrics.confusion(tb, pb), skm.confusion_matrix(tb, pb))
    assert metrics.confusion([1, 1], [1, 1]).tolist() == [[0, 0], [0, 2]]  # 2×2 even with one class


@pytest.mark.parametrize("n_bins", [5, 10])
def test_calibration_bins_match_sklearn(n_bins):
    y, s = _random_case(3, n=300)
    bins = metrics.calibration_bins(y, s, n_bins=n_bins)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=n_bins, strategy="uniform")
    nonempty = bins["counts"] > 0
    np.testing.assert_allclose(bins["observed_fraction"][nonempty], prob_true)
    np.testing.assert_allclose(bins["mean_predicted"][nonempty], prob_pred)
    assert bins["counts"].sum() == len(y)
    ece = sum(
        np.sum(in_bin) / len(y) * abs(y[in_bin].mean() - s[in_bin].mean())
        for in_bin in (np.digitize(s, bins["bin_edges"][1:-1], right=True) == b for b in range(n_bins))
        if np.any(in_bin)
    )
    assert bins["ece"] == pytest.approx(ece)
    with pytest.raises(ValueError, match="probabilities"):
        metrics.calibration_bins([0, 1], [-0.5, 2.0])


# ─── aggregation ─────────────────────────────────────────────────────────────────────────────────


def test_aggregate_mean_and_max_by_hand():
    rng = np.random.default_rng(0)
    ids = rng.choice(["p3", "p1", "p2", "p7"], size=40)
    label_of = {"p1": 0, "p2": 1, "p3": 1, "p7": 0}
    y = np.array([label_of[i] for i in ids])
    s = rng.random(40)
    for how, reduce in (("mean", np.mean), ("max", np.max)):
        u, yl, sl = aggregation.aggregate(ids, y, s, how=how)
        assert u.tolist() == sorted(set(ids))
        for k, pid in enumerate(u):
            assert yl[k] == label_of[pid]
            assert sl[k] == pytest.approx(reduce(s[ids == pid]))
    u2, _, s2 = aggregation.aggregate(ids, y, np.stack([1 - s, s], 1))  # (N, C) scores, column-wise
    np.testing.assert_allclose(s2[:, 1], aggregation.aggregate(ids, y, s)[2])
    assert s2.shape == (len(u2), 2)


def test_aggregate_never_splits_a_unit_and_is_order_free():
    rng = np.random.default_rng(1)
    ids = np.array([f"s{i}" for i in rng.integers(0, 30, 300)])
    y = np.array([int(i[1:]) % 2 for i in ids])
    s = rng.random(300)
    u, yl, sl = aggregation.aggregate(ids, y, s)
    assert len(u) == len(set(ids))  # one row per unit: no unit split across rows
    perm = rng.permutation(300)
    u_p, yl_p, sl_p = aggregation.aggregate(ids[perm], y[perm], s[perm])
    assert u_p.tolist() == u.tolist() and yl_p.tolist() == yl.tolist()
    np.testing.assert_allclose(sl_p, sl)


def test_aggregate_label_conflicts():
    with pytest.raises(ValueError, match="different labels"):
        aggregation.aggregate(["a", "a", "b"], [0, 1, 0], [0.1, 0.9, 0.2])
    u, y, s = aggregation.aggregate(["a", "a", "b"], [0, 1, 0], [0.1, 0.9, 0.2], how="max", on_conflict="max")
    assert y.tolist() == [1, 0] and s.tolist() == [0.9, 0.2]
    with pytest.raises(ValueError, match="how"):
        aggregation.aggregate(["a"], [0], [0.1], how="median")


# ─── low-shot sampling ───────────────────────────────────────────────────────────────────────────


def _cohort(seed, num_patients=300):
    rng = np.random.default_rng(seed)
    patients = [f"pat{i:04d}" for i in range(num_patients)]
    label = {p: int(rng.random() < 0.2) for p in patients}
    images = [p for p in patients for _ in range(rng.integers(1, 6))]
    rng.shuffle(images)
    ids = np.array(images)
    return ids, np.array([label[p] for p in ids]), label


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_low_shot_keeps_whole_patients_stratified(fraction):
    ids, y, label = _cohort(0)
    mask = sampling.low_shot_patients(ids, y, fraction, seed=3)
    chosen = set(ids[mask])
    assert not chosen & set(ids[~mask])  # no patient split between subset and rest
    for cls in (0, 1):
        group = [p for p in label if label[p] == cls]
        kept = [p for p in chosen if label[p] == cls]
        assert len(kept) == max(1, math.ceil(fraction * len(group) - 1e-9))  # stratified, both classes kept


def test_low_shot_is_seeded_nested_and_order_free():
    ids, y, _ = _cohort(1)
    a = sampling.low_shot_patients(ids, y, 0.1, seed=0)
    assert np.array_equal(a, sampling.low_shot_patients(ids, y, 0.1, seed=0))
    assert not np.array_equal(a, sampling.low_shot_patients(ids, y, 0.1, seed=1))
    small = sampling.low_shot_patients(ids, y, 0.01, seed=0)
    assert set(ids[small]) <= set(ids[a])  # 1% ⊂ 10% for one seed
    perm = np.random.default_rng(5).permutation(len(ids))
    assert set(ids[perm][sampling.low_shot_patients(ids[perm], y[perm], 0.1, seed=0)]) == set(ids[a])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            sampling.low_shot_patients(ids, y, bad, seed=0)


def test_low_shot_subset_of_training_has_no_test_patient():
    ids, y, _ = _cohort(2)
    from afm_jax.data.records import split_of_patient

    split = np.array([split_of_patient(p, {"train": 0.8, "test": 0.2}) for p in ids])
    train = split == "train"
    mask = sampling.low_shot_patients(ids[train], y[train], 0.1, seed=0)
    assert not set(ids[train][mask]) & set(ids[split == "test"])


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 250)
    logits = rng.normal(size=(250, 4)) + 1.5 * np.eye(4)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = metrics.multiclass_metrics(y, prob)
    pred = prob.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    for k in range(4):
        assert m[f"auroc_class_{k}"] == pytest.approx(skm.roc_auc_score(y == k, prob[:, k]))
    with pytest.raises(ValueError, match="integer labels"):
        metrics.multiclass_metrics([0, 5], prob[:2])
