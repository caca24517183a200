"""Tests that pin the numbers a paper would quote, each against an independent reference.

A mistake here flips a conclusion without breaking any plumbing: scores reported as P(negative), a
comparison's sign flipped, 90% instead of 95% intervals, a kNN vote that is not DINO's, a CAM that
shows feature magnitude, provenance that names the wrong architecture. Every reference below is
written from the definition (numpy, sklearn), not by calling the function under test.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from afm_jax.data import pipeline
from afm_jax.evaluation import backbones as bb
from afm_jax.evaluation import protocols as pr
from afm_jax.evaluation import report as report_lib
from afm_jax.evaluation import statistics

# ─── Independent references ──────────────────────────────────────────────────────────────────────


def reference_patient_bootstrap(y, s, patients, *, n_boot, seed, score_b=None):
    """The patient (cluster) bootstrap written from its definition, with sklearn's AUROC.

    The draw contract shared with afm_jax.evaluation.statistics: patients are the sorted unique ids;
    each replicate draws len(patients) patient indices with `np.random.default_rng(seed).integers`
    and keeps every image of a patient as many times as it was drawn. Returns the replicate AUROCs
    (or AUROC(s) − AUROC(score_b) for a paired bootstrap), NaN where one class is missing.
    """
    y, s, patients = np.asarray(y), np.asarray(s, float), np.asarray(patients)
    ids = sorted(set(patients.tolist()))
    rows_of = {p: [i for i in range(len(y)) if patients[i] == p] for p in ids}
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        chosen = rng.integers(0, len(ids), size=len(ids))
        rows = [r for c in chosen for r in rows_of[ids[c]]]
        yb = y[rows]
        if len(set(yb.tolist())) < 2:
            out.append(np.nan)
            continue
        value = roc_auc_score(yb, s[rows])
        if score_b is not None:
            value -= roc_auc_score(yb, np.asarray(score_b, float)[rows])
        out.append(value)
    return np.asarray(out)


def _prediction(y, s, patients, prefix=""):
    n = len(y)
    return pr.Prediction(
        y_true=np.asarray(y, np.int64),
        y_score=np.asarray(s, np.float64),
        patient_id=np.asarray(patients).astype(str),
        study_id=np.asarray(patients).astype(str),
        image_id=np.asarray([f"{prefix}img{i}" for i in range(n)]),
    )


def _clustered_scores(seed=0, patients=40, signal=1.0):
    """Two images per patient, patient-level labels, scores with ties (rounded to 0.1)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, patients)
    y = np.repeat(label, 2)
    pid = np.repeat([f"p{i:03d}" for i in range(patients)], 2)
    s = np.round(np.clip(0.5 + signal * 0.2 * (y - 0.5) + rng.normal(0, 0.2, y.size), 0, 1), 1)
    return y, s, pid


# ─── Scores are P(positive) ──────────────────────────────────────────────────────────────────────


@pytest.fixture
def tiny_ft_config(synthetic_dataset):
    from afm_jax.train.defaults import default_config

    config = default_config("finetune", "mu/8")
    config.data.path = os.fspath(synthetic_dataset)
    config.data.num_workers = 0
    config.image_size = 32
    config.batch_size = 8
    config.total_steps = 4
    config.eval_every = 2
    config.log_every = 2
    config.checkpoint_every = 100
    config.finetune.head_init_std = 1.0  # logits that differ between images
    return config


def test_finetune_scores_are_softmax_of_the_positive_logit(tiny_ft_config, tmp_path):
    """predict_split's y_score == softmax(model(x))[:, 1] (column 1 = positive labels), y_true == 1 exactly
    for positive-label images, recomputed from the eval images with numpy."""
    from afm_jax.train.tasks import get_task

    task = get_task("finetune")
    task.setup(tiny_ft_config, workdir=str(tmp_path), total_steps=4, steps_per_epoch=2)
    model = task.build_model(tiny_ft_config, nnx.Rngs(3))
    got = task.predict_split(model, "test")

    images, labels, ids = [], [], []
    batches = pipeline.build_eval_iterator(
        tiny_ft_config.data, split="test", batch_size=16, image_size=32, process_index=0, process_count=1
    )
    for batch in batches:
        keep = batch["mask"] & np.isin(batch["label"], (1, 2))
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
        ids.append(batch["image_id"][keep])
    batches.close()
    x = np.concatenate(images)
    logits = np.asarray(model(jax.numpy.asarray(x)), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_array_equal(got["image_id"], np.concatenate(ids))
    np.testing.assert_array_equal(got["y_true"], (np.concatenate(labels) == 2).astype(int))  # AFF (2) is positive
    np.testing.assert_allclose(got["y_score"], p[:, 1], rtol=1e-5, atol=1e-6)
    assert np.ptp(p[:, 1]) > 1e-3  # the check is not vacuous (scores vary)
    assert not np.allclose(got["y_score"], p[:, 0], atol=1e-3)


def test_linear_protocol_scores_are_sklearns_probability_of_the_positive_class():
    rng = np.random.default_rng(0)

    def split(n, tag):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 6)) + 1.5 * y[:, None] * np.array([1, -1, 0, 0, 0.5, 0])
        return {
            "features": x.astype(np.float32),
            "y": y,
            "patient_id": np.array([f"{tag}{i}" for i in range(n)]),
            "study_id": np.array([f"{tag}{i}" for i in range(n)]),
            "image_id": np.array([f"{tag}i{i}" for i in range(n)]),
        }

    train, val, test = split(80, "a"), split(40, "b"), split(50, "c")
    _, got, info = pr.linear_protocol(train, val, test, seed=0)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=info["C"], max_iter=5000, random_state=0))
    ref.fit(train["features"], train["y"])
    positive = list(ref.classes_).index(1)
    np.testing.assert_allclose(got.y_score, ref.predict_proba(test["features"])[:, positive], rtol=1e-6, atol=1e-9)
    assert roc_auc_score(test["y"], got.y_score) > 0.85  # separable: the probe really separates


# ─── The report's intervals and comparisons ──────────────────────────────────────────────────────


def _result(run_id, backbone, order, scored, task="t"):
    return {
        "run_id": run_id,
        "task": task,
        "backbone": backbone,
        "protocol": "linear",
        "fraction": 1.0,
        "seed": 0,
        "order": order,
        **scored,
    }


def test_report_interval_is_the_95_percent_patient_bootstrap(tmp_path):
    """The AUROC cell of the report equals point [2.5th, 97.5th percentile] of an independently written
    patient bootstrap; 90% intervals or image-level resampling would not match."""
    task = pr.TaskSpec("t", data="unused", positive_labels=(1,), negative_labels=(0,), unit="image")
    y, s, pid = _clustered_scores(seed=1)
    val = _prediction(*_clustered_scores(seed=2), prefix="v")
    test = _prediction(y, s, pid)
    n_boot, seed = 400, 7
    scored = pr.score_predictions(val, test, task, n_boot=n_boot, seed=seed)
    reps = reference_patient_bootstrap(y, s, pid, n_boot=n_boot, seed=seed)
    low, high = np.nanpercentile(reps, [2.5, 97.5])
    auroc = scored["metrics"]["auroc"]
    assert auroc["point"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc["low"] == pytest.approx(low, abs=1e-12) and auroc["high"] == pytest.approx(high, abs=1e-12)
    assert high - low > 0.05  # a real interval, not a degenerate one
    # The report shows exactly that interval, and says it is a 95% one.
    report_lib.write_report(tmp_path, [_result("r", "a", 0, scored)], {"r": (val, test)}, {"t": task}, n_boot=50)
    md = (tmp_path / "index.md").read_text()
    assert f"{roc_auc_score(y, s):.3f} [{low:.3f}, {high:.3f}]" in md
    assert "95% CIs" in md


def test_default_confidence_level_is_95_percent():
    y, s, pid = _clustered_scores(seed=3)
    reps = reference_patient_bootstrap(y, s, pid, n_boot=300, seed=0)
    ci = statistics.bootstrap_ci(y, s, pid, "auroc", n_boot=300, seed=0)
    assert (ci["low"], ci["high"]) == pytest.approx(tuple(np.nanpercentile(reps, [2.5, 97.5])), abs=1e-12)
    full = statistics.bootstrap_all(y, s, pid, n_boot=300, seed=0)["auroc"]
    assert (full["low"], full["high"]) == pytest.approx((ci["low"], ci["high"]), abs=1e-12)


def test_comparison_difference_is_backbone_minus_reference_with_its_sign(tmp_path):
    """A clearly better backbone gets a positive difference AUROC(backbone) − AUROC(reference), with the
    paired 95% interval of an independent paired patient bootstrap, rendered with its sign."""
    task = pr.TaskSpec("t", data="unused", positive_labels=(1,), negative_labels=(0,), unit="patient")
    rng = np.random.default_rng(4)
    patients = 60
    label = rng.integers(0, 2, patients)
    y = np.repeat(label, 2)
    pid = np.repeat([f"p{i:03d}" for i in range(patients)], 2)
    good = np.clip(0.5 + 0.35 * (y - 0.5) + rng.normal(0, 0.15, y.size), 0, 1)
    weak = np.clip(0.5 + 0.05 * (y - 0.5) + rng.normal(0, 0.15, y.size), 0, 1)
    val = _prediction(*_clustered_scores(seed=5), prefix="v")
    preds = {"ref": (val, _prediction(y, weak, pid)), "new": (val, _prediction(y, good, pid))}
    results = [
        _result("ref", "reference_model", 0, pr.score_predictions(*preds["ref"], task, n_boot=20)),
        _result("new", "better_model", 1, pr.score_predictions(*preds["new"], task, n_boot=20)),
    ]
    n_boot = 300
    comps = report_lib.comparisons(results, preds, {"t": task}, "reference_model", n_boot=n_boot, seed=0)
    assert len(comps) == 1 and comps[0]["backbone"] == "better_model"
    # Patient level: mean of each patient's two image probabilities, then sklearn's AUROC.
    order = np.argsort(pid[::2])
    ids = pid[::2][order]
    yp = label[order]
    good_p, weak_p = good.reshape(-1, 2).mean(1)[order], weak.reshape(-1, 2).mean(1)[order]
    expected = roc_auc_score(yp, good_p) - roc_auc_score(yp, weak_p)
    assert expected > 0.2
    assert comps[0]["diff"] == pytest.approx(expected, abs=1e-12)
    reps = reference_patient_bootstrap(yp, good_p, ids, n_boot=n_boot, seed=0, score_b=weak_p)
    low, high = np.nanpercentile(reps, [2.5, 97.5])
    assert (comps[0]["low"], comps[0]["high"]) == pytest.approx((low, high), abs=1e-12)
    report_lib.write_report(tmp_path, results, preds, {"t": task}, reference="reference_model", n_boot=n_boot)
    md = (tmp_path / "index.md").read_text()
    assert f"| better_model | reference_model | auroc | {expected:+.3f} [{low:+.3f}, {high:+.3f}] |" in md


# ─── kNN is DINO's weighted vote ─────────────────────────────────────────────────────────────────


def test_knn_protocol_equals_sklearn_with_dinos_weights():
    """DINO (eval_knn.py, knn_classifier): top-k cosine similarities, weights exp(sim / T), class votes
    summed and normalised. sklearn with metric='cosine' gives distance d = 1 − sim, so
    weights = exp((1 − d) / T) is the same vote."""
    rng = np.random.default_rng(0)

    def split(n, tag):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 8)) + 0.8 * y[:, None]
        return {
            "features": x.astype(np.float32),
            "y": y,
            "patient_id": np.array([f"{tag}{i}" for i in range(n)]),
            "study_id": np.array([f"{tag}{i}" for i in range(n)]),
            "image_id": np.array([f"{tag}i{i}" for i in range(n)]),
        }

    train, val, test = split(90, "a"), split(20, "b"), split(35, "c")
    for k, t in ((20, 0.07), (7, 0.5)):
        got_val, got_test, info = pr.knn_protocol(train, val, test, k=k, temperature=t)
        ref = KNeighborsClassifier(
            n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d, t=t: np.exp((1.0 - d) / t)
        ).fit(train["features"], train["y"])
        positive = list(ref.classes_).index(1)
        np.testing.assert_allclose(got_test.y_score, ref.predict_proba(test["features"])[:, positive], atol=1e-6)
        np.testing.assert_allclose(got_val.y_score, ref.predict_proba(val["features"])[:, positive], atol=1e-6)
        assert info == {"k": k, "temperature": t}


# ─── CAM ─────────────────────────────────────────────────────────────────────────────────────────


def test_cam_is_centred_on_the_training_mean_and_sums_to_the_probe_logit():
    """For an average-pooled backbone, mean over locations of Σ_k w_k (A_k − μ_k) + b is the probe's
    logit (sklearn's decision_function on the pooled feature): the map splits the evidence over
    locations. Uncentred maps add w·μ everywhere and fail this."""
    rng = np.random.default_rng(0)
    h = w = 3
    d = 5

    def split(n, tag):
        y = rng.integers(0, 2, n)
        spatial = rng.normal(size=(n, h, w, d)) + 4.0 + 1.0 * y[:, None, None, None] * np.array([1, 0, -1, 0, 0])
        return spatial, {
            "features": spatial.mean(axis=(1, 2)).astype(np.float32),
            "y": y,
            "patient_id": np.array([f"{tag}{i}" for i in range(n)]),
        }

    (_, train), (_, val), (spatial, test) = split(80, "a"), split(30, "b"), split(6, "c")
    direction = pr.probe_direction(train, val)
    probe = pr.fit_linear_probe(train["features"], train["y"], val["features"], val["y"])
    logit = probe.classifier.decision_function(test["features"])
    raw = np.einsum("bhwd,d->bhw", spatial - direction.mean, direction.weights)
    np.testing.assert_allclose(raw.mean(axis=(1, 2)) + direction.intercept, logit, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(direction.mean, train["features"].mean(0), rtol=1e-5)
    maps = report_lib.cam_maps(spatial, direction.weights, direction.mean)
    expected = np.maximum(raw, 0)
    expected = expected / np.maximum(expected.reshape(len(raw), -1).max(1), 1e-12)[:, None, None]
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
    uncentred = report_lib.cam_maps(spatial, direction.weights)
    assert np.abs(uncentred - maps).max() > 0.1


# ─── Provenance ──────────────────────────────────────────────────────────────────────────────────


def test_provenance_names_the_checkpoints_real_architecture_and_step(tiny_mae_config, tmp_path):
    """A 2-block mu/8 run with width 48 is recorded as such (not the spec's default B/16), with its step,
    the dataset's fingerprints and preprocessing, the protocol's parameters and the code version."""
    from afm_jax.train import loop
    from afm_jax.train.tasks import get_task
    from afm_jax.version import code_version

    tiny_mae_config.model.update(depth=2, width=48, num_heads=2)
    tiny_mae_config.total_steps = 3
    loop.train(tiny_mae_config, str(tmp_path / "run"), get_task("mae"))
    spec = bb.BackboneSpec("checkpoint", path=str(tmp_path / "run"), image_size=32)
    assert spec.variant == "B/16"  # the unused default
    data = tiny_mae_config.data.path
    prov = pr.provenance(spec, data, protocol="knn", params={"k": 5})
    arch = prov["backbone"]["architecture"]
    assert prov["backbone"]["variant"] == "mu/8" and prov["backbone"]["step"] == 3
    assert (arch["depth"], arch["width"], arch["num_heads"], arch["patch_size"]) == (2, 48, 2, 8)
    assert prov["protocol"] == "knn" and prov["protocol_params"] == {"k": 5}
    assert prov["code_version"] == code_version()
    from afm_jax.data import records

    info = records.read_info(data)
    assert prov["dataset"]["content_fingerprint"] == info["content_fingerprint"]
    assert prov["dataset"]["fingerprint"] == pr.dataset_fingerprint(data)
    assert prov["dataset"]["preprocessing"] == info.get("preprocessing")
    # The feature cache's spec.json says the same.
    cache = pr.FeatureCache(tmp_path / "cache")
    cache.get(spec, data, "validation", lambda: bb.load_backbone(spec))
    written = json.loads((cache.path(spec, data, "validation").parent.parent / "spec.json").read_text())
    assert written["variant"] == "mu/8" and written["architecture"]["depth"] == 2 and written["step"] == 3
    assert written["code_version"] == code_version()


def test_study_results_carry_provenance(synthetic_dataset, tmp_path):
    from afm_jax.evaluation import study as study_lib

    spec = bb.BackboneSpec("random_init", variant="mu/8", image_size=32, model={"depth": 2})
    study = study_lib.Study(
        name="p",
        tasks={"aff": pr.TaskSpec("aff", data=os.fspath(synthetic_dataset), unit="image")},
        backbones={"r": spec},
        protocols=("knn",),
        n_boot=20,
        overlay_images=0,
        options={"knn": {"k": 5}},
    )
    study_lib.run_study(study, tmp_path, report=False)
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    prov = record["provenance"]
    assert prov["backbone"]["architecture"]["depth"] == 2 and prov["backbone"]["variant"] == "mu/8"
    assert prov["protocol_params"] == {"k": 5, "temperature": 0.07}
    assert prov["dataset"]["fingerprint"] == pr.dataset_fingerprint(os.fspath(synthetic_dataset))


# ─── Feature extraction ──────────────────────────────────────────────────────────────────────────


def test_extract_features_are_the_encoders_pooled_features_in_dataset_order(synthetic_dataset):
    from afm_jax.data import records
    from afm_jax.evaluation.features import extract_features
    from afm_jax.models import factory

    cfg = factory.default_model_config("mu/8")
    cfg.depth = 1
    encoder = factory.build_encoder(cfg, 32, nnx.Rngs(0))
    data = {"path": os.fspath(synthetic_dataset), "num_workers": 0}
    got = extract_features(encoder, data, split="validation", image_size=32, batch_size=5, pool="cls", progress=False)
    index = records.split_index(synthetic_dataset, "validation")
    np.testing.assert_array_equal(got["image_id"], index["image_id"])
    np.testing.assert_array_equal(got["label"], index["label"])
    batches = pipeline.build_eval_iterator(
        data, split="validation", batch_size=64, image_size=32, process_index=0, process_count=1
    )
    batch = next(iter(batches))
    batches.close()
    n = int(batch["mask"].sum())
    tokens = np.asarray(encoder(jax.numpy.asarray(batch["image"][:n])))
    np.testing.assert_allclose(got["features"][:n], tokens[:, 0], rtol=1e-4, atol=1e-5)  # the class token


# ─── The summary page ────────────────────────────────────────────────────────────────────────────


def test_summary_pools_seeds_warns_and_writes_hashed_predictions(tmp_path):
    """Two seeds × two backbones: the pooled difference is the mean of the per-seed AUROC differences,
    its interval the 2.5/97.5 percentiles of both seeds' paired bootstrap replicates together
    (independently recomputed); small test sets are flagged; predictions.csv has one row per unit."""
    task = pr.TaskSpec("t", data="unused", positive_labels=(1,), negative_labels=(0,), unit="image")
    results, preds, expected_diffs, reps = [], {}, [], []
    n_boot = 200
    for seed in (0, 1):
        rng = np.random.default_rng(10 + seed)
        y, _, pid = _clustered_scores(seed=20 + seed, patients=30)
        good = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, y.size), 0, 1)
        weak = np.clip(0.5 + 0.05 * (y - 0.5) + rng.normal(0, 0.2, y.size), 0, 1)
        val = _prediction(*_clustered_scores(seed=30 + seed), prefix="v")
        for name, order, score in (("ref", 0, weak), ("new", 1, good)):
            run_id = f"{name}{seed}"
            preds[run_id] = (val, _prediction(y, score, pid))
            r = _result(run_id, name, order, pr.score_predictions(*preds[run_id], task, n_boot=20))
            r["seed"] = seed
            results.append(r)
        expected_diffs.append(roc_auc_score(y, good) - roc_auc_score(y, weak))
        reps.append(reference_patient_bootstrap(y, good, pid, n_boot=n_boot, seed=0, score_b=weak))
    comps = report_lib.comparisons(results, preds, {"t": task}, "ref", n_boot=n_boot, seed=0)
    pooled = report_lib.pooled_comparisons(comps)
    assert len(pooled) == 1 and pooled[0]["num_seeds"] == 2
    assert pooled[0]["diff"] == pytest.approx(np.mean(expected_diffs), abs=1e-12)
    low, high = np.nanpercentile(np.concatenate(reps), [2.5, 97.5])
    assert (pooled[0]["low"], pooled[0]["high"]) == pytest.approx((low, high), abs=1e-12)

    report_lib.write_report(tmp_path, results, preds, {"t": task}, reference="ref", n_boot=n_boot)
    md = (tmp_path / "index.md").read_text()
    assert md.index("## Summary") < md.index("pooled over seeds") < md.index("## Results: binary tasks")
    assert f"{np.mean(expected_diffs):+.3f} [{low:+.3f}, {high:+.3f}]" in md
    assert "only 30 test patients (< 50)" in md
    assert (tmp_path / "forest.png").is_file()
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("run_id,") and len(rows) == 1 + 4 * 60
    assert {r.split(",")[8] for r in rows[1:]} == {f"p{i:03d}" for i in range(30)}  # the cluster ids given


def test_low_shot_curve_points_are_the_mean_and_range_over_seeds():
    results = []
    for seed, (quarter, full) in enumerate(((0.6, 0.8), (0.7, 0.9))):
        for fraction, value, patients in ((0.25, quarter, 10 + seed), (1.0, full, 40)):
            results.append(
                {
                    "task": "t",
                    "protocol": "knn",
                    "backbone": "b",
                    "fraction": fraction,
                    "seed": seed,
                    "kind": "binary",
                    "metrics": {"auroc": {"point": value, "low": 0, "high": 1}},
                    "info": {"num_train_patients": patients},
                }
            )
    curves = report_lib.low_shot_curves(results)
    points = sorted(curves[("t", "knn")]["b"])
    assert points[0] == pytest.approx((10.5, 0.65, 0.6, 0.7)) and points[1] == pytest.approx((40, 0.85, 0.8, 0.9))


def test_overlay_cases_are_the_most_confident_tp_fp_fn_in_turn():
    """Issue 19 item 4: overlays show true positives, false positives and false negatives (at P = 0.5),
    each the most confident of its kind first, taken in turn; true negatives only fill up. Worked out
    by hand on 8 images."""
    from afm_jax.evaluation.study import pick_overlay_cases

    #           0    1    2    3    4    5    6    7
    y = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    s = np.array([0.9, 0.6, 0.8, 0.55, 0.1, 0.2, 0.4, 0.05])
    # TP: 0 (0.9), 1 (0.6); FP: 2 (0.8), 3 (0.55); FN: 4 (0.1, most confidently wrong), 6 (0.4); TN: 7, 5
    ids = np.array(list("abcdefgh"))
    pred = pr.Prediction(y_true=y, y_score=s, patient_id=ids, study_id=ids, image_id=ids)
    assert pick_overlay_cases(pred, 4) == [
        ("true positive", 0),
        ("false positive", 2),
        ("false negative", 4),
        ("true positive", 1),
    ]
    assert pick_overlay_cases(pred, 8) == [
        ("true positive", 0),
        ("false positive", 2),
        ("false negative", 4),
        ("true positive", 1),
        ("false positive", 3),
        ("false negative", 6),
        ("true negative", 7),
        ("true negative", 5),
    ]
