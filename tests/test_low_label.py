"""The low-label comparison behind the demo's headline (evaluation/low_label.py), on crafted features.

`protocols.encoder_split` is replaced by a function returning features we control, so each test pins
one conclusion: a separable encoder scores ~1 and beats a noise encoder with a CI that excludes 0
(and the difference has the right sign), a noise encoder's CI contains 0.5, the point estimate is the
mean over probe seeds of sklearn's AUROC on per-patient mean probabilities, and a 10% fraction trains
on ~10% of the patients.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from afm_jax.evaluation import low_label, protocols

AFF, NFF = 2, 1
TASK = protocols.TaskSpec(
    name="aff_vs_nff", data="unused", positive_labels=(AFF,), negative_labels=(NFF,), unit="patient"
)


def _split(rng, num_patients: int, separable: bool, prefix: str) -> dict[str, np.ndarray]:
    """Two images per patient; label per patient; features carry the label only if `separable`."""
    labels = np.repeat(rng.permutation(np.arange(num_patients) % 2) + 1, 2)  # NFF=1 / AFF=2, balanced
    y = (labels == AFF).astype(np.float32)
    noise = rng.normal(size=(len(labels), 8)).astype(np.float32)
    features = noise + (3.0 * y[:, None] if separable else 0.0)
    pids = np.repeat([f"{prefix}{i:04d}" for i in range(num_patients)], 2)
    return {
        "features": features,
        "label": labels,
        "patient_id": pids,
        "image_id": np.array([f"{p}_{k}" for k, p in enumerate(pids)]),
        "study_id": pids,
    }


@pytest.fixture
def fake_features(monkeypatch):
    rng = np.random.default_rng(0)
    data = {
        name: {
            split: _split(rng, n, name == "good", f"{split}-")
            for split, n in (("train", 200), ("validation", 60), ("test", 80))
        }
        for name in ("good", "noise")
    }
    monkeypatch.setattr(
        protocols,
        "encoder_split",
        lambda encoder, data_cfg, split, **kw: {k: v.copy() for k, v in data[encoder][split].items()},
    )
    return data


def test_separable_beats_noise_with_a_ci_that_excludes_zero(fake_features):
    res = low_label.low_label_comparison(
        {"good": "good", "noise": "noise"}, None, TASK, image_size=32, fractions=(0.1, 1.0), seeds=(0, 1), n_boot=300
    )
    for fraction in ("0.1", "1"):
        row = res[fraction]
        assert row["good"]["auroc"] > 0.95 and row["good"]["low"] > 0.85
        assert row["noise"]["low"] < 0.5 < row["noise"]["high"]
        diff = row["difference"]["good-noise"]
        assert diff["point"] == pytest.approx(row["good"]["auroc"] - row["noise"]["auroc"])
        assert diff["point"] > 0.3 and diff["low"] > 0  # sign: first minus the other
        for name in ("good", "noise"):
            assert row[name]["low"] <= row[name]["auroc"] <= row[name]["high"]
        assert row["num_test_units"] == 80  # patients, not images
    # 10% of 200 training patients (class balance kept), all of them at 100%.
    assert all(15 <= n <= 25 for n in res["0.1"]["good"]["num_train_patients"])
    assert res["1"]["good"]["num_train_patients"] == [200, 200]


def test_point_estimate_is_the_seed_mean_of_patient_level_auroc(fake_features):
    """Recomputed here with sklearn: the probe on all training images (fraction 1, so every seed
    trains on the same images), C chosen on validation AUROC, patient-mean probabilities, roc_auc_score."""
    res = low_label.low_label_comparison(
        {"noise": "noise"}, None, TASK, image_size=32, fractions=(1.0,), seeds=(0,), n_boot=50
    )
    d = fake_features["noise"]
    ytr = (d["train"]["label"] == AFF).astype(int)
    yva = (d["validation"]["label"] == AFF).astype(int)
    yte = (d["test"]["label"] == AFF).astype(int)
    mean, std = d["train"]["features"].mean(0), d["train"]["features"].std(0)
    best = None
    for c in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0):  # linear.DEFAULT_C_GRID
        clf = LogisticRegression(C=c, max_iter=5000).fit((d["train"]["features"] - mean) / std, ytr)
        v = roc_auc_score(yva, clf.predict_proba((d["validation"]["features"] - mean) / std)[:, 1])
        if best is None or v > best[0] + 1e-12:
            best = (v, clf)
    p = best[1].predict_proba((d["test"]["features"] - mean) / std)[:, 1]
    pids = d["test"]["patient_id"]
    order = sorted(set(pids))
    per_patient = np.array([p[pids == u].mean() for u in order])
    y_patient = np.array([yte[pids == u][0] for u in order])
    assert res["1"]["noise"]["auroc"] == pytest.approx(roc_auc_score(y_patient, per_patient), abs=2e-3)
