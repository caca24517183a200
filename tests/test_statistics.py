"""Bootstrap over patients, paired bootstrap and DeLong, each checked against an independent computation."""

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from afm_jax.evaluation import metrics, statistics


def _patients(seed, num_patients=120, images_per_patient=(1, 4), effect=1.0):
    """Clustered data: a patient effect shared by its images, so images of one patient correlate."""
    rng = np.random.default_rng(seed)
    groups, y, s = [], [], []
    for p in range(num_patients):
        label = int(rng.random() < 0.4)
        shared = rng.normal() + effect * label
        for _ in range(rng.integers(*images_per_patient, endpoint=True)):
            groups.append(f"p{p:03d}")
            y.append(label)
            s.append(shared + 0.3 * rng.normal())
    return np.array(y), np.array(s), np.array(groups)


def _placement_delong(y, scores):
    """DeLong (1988) written out with the O(m·n) kernel ψ(x, z) = 1[x > z] + ½·1[x = z]."""
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    v10, v01, aucs = [], [], []
    for s in scores:
        x, z = s[pos][:, None], s[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))  # one per positive
        v01.append(psi.mean(axis=0))  # one per negative
    cov = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    return np.array(aucs), np.atleast_2d(cov)


@pytest.mark.parametrize("seed", range(4))
def test_delong_matches_placement_formula(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(150) < 0.35).astype(int)
    a = np.round(rng.normal(size=150) + y, 1)  # ties included
    b = np.round(0.6 * a + rng.normal(size=150) + 0.3 * y, 1)
    aucs, cov = _placement_delong(y, [a, b])
    out = statistics.delong_test(y, a, b)
    assert out["auc_a"] == pytest.approx(roc_auc_score(y, a)) and out["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert out["auc_a"] == pytest.approx(aucs[0]) and out["auc_b"] == pytest.approx(aucs[1])
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert out["se_diff"] == pytest.approx(se)
    assert out["z"] == pytest.approx((aucs[0] - aucs[1]) / se)
    assert out["p_value"] == pytest.approx(math.erfc(abs(out["z"]) / math.sqrt(2)))
    assert out["se_a"] == pytest.approx(math.sqrt(cov[0, 0]))
    ci = statistics.delong_ci(y, a)
    assert ci["point"] == pytest.approx(aucs[0]) and ci["se"] == pytest.approx(math.sqrt(cov[0, 0]))


def test_delong_se_agrees_with_bootstrap_se():
    rng = np.random.default_rng(7)
    y = (rng.random(400) < 0.4).astype(int)
    a = rng.normal(size=400) + 1.0 * y
    b = 0.5 * a + rng.normal(size=400) + 0.5 * y
    d = statistics.delong_test(y, a, b)
    boot = statistics.paired_bootstrap(y, a, b, None, "auroc", n_boot=1000, seed=0)
    assert boot["se"] == pytest.approx(d["se_diff"], rel=0.15)
    single = statistics.bootstrap_ci(y, a, None, "auroc", n_boot=1000, seed=0)
    assert single["se"] == pytest.approx(d["se_a"], rel=0.15)
    assert boot["diff"] == pytest.approx(d["diff"])


def test_delong_null_rejection_rate_is_near_alpha():
    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(400):
        y = (rng.random(80) < 0.5).astype(int)
        shared = rng.normal(size=80) + 0.8 * y
        a, b = shared + rng.normal(size=80), shared + rng.normal(size=80)  # same AUROC in truth
        rejections += statistics.delong_test(y, a, b)["p_value"] < 0.05
    assert 0.02 <= rejections / 400 <= 0.09


def test_delong_edge_cases():
    y = np.array([0, 0, 1, 1])
    same = statistics.delong_test(y, [0.1, 0.4, 0.35, 0.8], [0.1, 0.4, 0.35, 0.8])
    assert same["diff"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="both classes"):
        statistics.delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


def test_bootstrap_is_deterministic_and_covers_the_point():
    y, s, g = _patients(0)
    for metric in ("auroc", "auprc", "accuracy", "kappa", "mcc"):
        first = statistics.bootstrap_ci(y, s, g, metric, n_boot=300, seed=11)
        assert first == statistics.bootstrap_ci(y, s, g, metric, n_boot=300, seed=11)
        assert first["low"] <= first["point"] <= first["high"], metric
        assert first["high"] > first["low"]
        assert first["point"] == pytest.approx(metrics.binary_metrics(y, s)[metric])
    other = statistics.bootstrap_ci(y, s, g, "auroc", n_boot=300, seed=12)
    assert other != statistics.bootstrap_ci(y, s, g, "auroc", n_boot=300, seed=11)


def test_callable_metric_and_bootstrap_all_share_the_replicates():
    y, s, g = _patients(1, num_patients=60)
    by_name = statistics.bootstrap_ci(y, s, g, "auroc", n_boot=200, seed=3)
    by_fn = statistics.bootstrap_ci(y, s, g, roc_auc_score, n_boot=200, seed=3)  # sklearn, independent
    for key in ("point", "low", "high", "se", "n_boot"):
        assert by_fn[key] == pytest.approx(by_name[key])
    every = statistics.bootstrap_all(y, s, g, n_boot=200, seed=3)
    assert set(every) == set(metrics.binary_metrics(y, s))
    for key in ("point", "low", "high"):
        assert every["auroc"][key] == pytest.approx(by_name[key])
    kappa = statistics.bootstrap_ci(y, s, g, "kappa", n_boot=200, seed=3)
    assert every["kappa"]["low"] == pytest.approx(kappa["low"])
    t = float(np.median(s))
    fixed = statistics.bootstrap_all(y, s, g, n_boot=50, seed=3, threshold=t)
    assert fixed["kappa"]["point"] == pytest.approx(cohen_kappa_score(y, (s >= t).astype(int)))
    assert fixed["threshold"]["low"] == fixed["threshold"]["high"] == t


def test_bootstrap_resamples_patients_not_images():
    """Each patient's images are identical copies: resampling patients must give exactly the interval of
    one image per patient, while an image-level bootstrap would be (wrongly) narrower."""
    rng = np.random.default_rng(4)
    y1 = (rng.random(80) < 0.5).astype(int)
    s1 = rng.normal(size=80) + y1
    copies = 5
    y = np.repeat(y1, copies)
    s = np.repeat(s1, copies)
    g = np.repeat(np.arange(80), copies)
    clustered = statistics.bootstrap_ci(y, s, g, "auroc", n_boot=300, seed=0)
    per_patient = statistics.bootstrap_ci(y1, s1, None, "auroc", n_boot=300, seed=0)
    for key in ("point", "low", "high"):
        assert clustered[key] == pytest.approx(per_patient[key])
    naive = statistics.bootstrap_ci(y, s, None, "auroc", n_boot=300, seed=0)
    assert naive["high"] - naive["low"] < 0.7 * (clustered["high"] - clustered["low"])


def test_paired_bootstrap():
    y, s, g = _patients(2)
    rng = np.random.default_rng(0)
    same = statistics.paired_bootstrap(y, s, s, g, n_boot=200, seed=0)
    assert same["diff"] == 0 and same["low"] == same["high"] == 0 and same["p_value"] == 1.0
    noise = rng.normal(size=s.size)
    better = statistics.paired_bootstrap(y, s, noise, g, "auroc", n_boot=500, seed=0)
    assert better["diff"] == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, noise))
    assert better["low"] > 0 and better["p_value"] < 0.01
    assert better["low"] <= better["diff"] <= better["high"]
    assert better == statistics.paired_bootstrap(y, s, noise, g, "auroc", n_boot=500, seed=0)
    reverse = statistics.paired_bootstrap(y, noise, s, g, "auroc", n_boot=500, seed=0)
    assert reverse["diff"] == pytest.approx(-better["diff"]) and reverse["high"] == pytest.approx(-better["low"])
    # Two scores of equal quality: a large p-value, an interval around 0.
    a, b = s + rng.normal(size=s.size), s + rng.normal(size=s.size)
    tie = statistics.paired_bootstrap(y, a, b, g, "kappa", n_boot=300, seed=0)
    assert tie["low"] < 0 < tie["high"] and tie["p_value"] > 0.05


def test_undefined_replicates_are_counted_not_fatal():
    y = np.array([0] * 20 + [1])  # one positive patient: many replicates have no positive
    s = np.linspace(0, 1, 21)
    out = statistics.bootstrap_ci(y, s, None, "auroc", n_boot=200, seed=0)
    assert out["n_invalid"] > 0 and out["n_boot"] + out["n_invalid"] == 200
    assert out["point"] == 1.0


def test_bad_arguments_name_the_problem():
    y, s, g = _patients(3, num_patients=10)
    with pytest.raises(ValueError, match="Unknown metric"):
        statistics.bootstrap_ci(y, s, g, "auc", n_boot=10)
    with pytest.raises(ValueError, match="groups"):
        statistics.bootstrap_ci(y, s, g[:-1], "auroc", n_boot=10)
    with pytest.raises(ValueError, match="alpha"):
        statistics.bootstrap_ci(y, s, g, "auroc", n_boot=10, alpha=5)
