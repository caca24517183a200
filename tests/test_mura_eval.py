"""MURA evaluated as published: body part travels with predictions, study-level Cohen's kappa at 0.5
per body part and overall (and at the validation threshold, labelled), against sklearn on a fake
MURA-v1.1 tree; the validation carve-out always yields a validation set."""

import csv
import os

import cv2
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from afm_jax.data import mura, records
from afm_jax.evaluation import backbones as bb
from afm_jax.evaluation import protocols as pr
from afm_jax.evaluation import report as report_lib

SALT = b"mura eval test salt"


def _make_tree(root):
    """MURA-v1.1 layout: train 24 patients, valid 16 patients, ELBOW and WRIST, 1-3 images per study,
    abnormal studies a little brighter."""
    rng = np.random.default_rng(0)
    rows = {"train": ([], []), "valid": ([], [])}
    for split, first, count in (("train", 0, 24), ("valid", 11000, 16)):
        for i in range(count):
            patient = f"patient{first + i:05d}"
            part = ("ELBOW", "WRIST")[i % 2]
            positive = (i // 2) % 2 == 1
            rel = f"MURA-v1.1/{split}/XR_{part}/{patient}/study1_{'positive' if positive else 'negative'}/"
            (root / rel).mkdir(parents=True, exist_ok=True)
            rows[split][1].append([rel, str(int(positive))])
            for j in range(1, 2 + i % 3):
                img = np.clip(rng.normal(90 + 40 * positive, 30, (24, 24)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / f"{rel}image{j}.png"), img)
                rows[split][0].append([f"{rel}image{j}.png"])
    for split, (paths, studies) in rows.items():
        with open(root / "MURA-v1.1" / f"{split}_image_paths.csv", "w", newline="") as f:
            csv.writer(f).writerows(paths)
        with open(root / "MURA-v1.1" / f"{split}_labeled_studies.csv", "w", newline="") as f:
            csv.writer(f).writerows(studies)


@pytest.fixture(scope="module")
def mura_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mura_raw")
    _make_tree(root)
    return os.fspath(
        mura.build_mura_dataset(
            root, tmp_path_factory.mktemp("mura_out"), validation_fraction=0.1, salt=SALT, workers=1
        )
    )


def test_small_subset_carve_out_always_has_a_validation_set():
    # strata of 2-5 patients: the (k + 1/2)/n < 0.1 rule alone picks nobody
    images = [
        {"mura_split": "train", "patient": f"patient{i:05d}", "body_part": part, "label": label}
        for i, (part, label) in enumerate([("ELBOW", 0)] * 5 + [("ELBOW", 1)] * 2 + [("WRIST", 0)] * 3 + [("HAND", 1)])
    ]
    chosen = mura.carve_validation(images, 0.1)
    for stratum in (("ELBOW", 0), ("ELBOW", 1), ("WRIST", 0)):
        members = {im["patient"] for im in images if (im["body_part"], im["label"]) == stratum}
        assert 1 <= len(members & chosen) < len(members)  # one to validation, the rest still trains
    assert "patient00010" not in chosen  # a stratum of one stays in train
    singletons = [
        {"mura_split": "train", "patient": f"patient{i:05d}", "body_part": p, "label": 0}
        for i, p in enumerate(("ELBOW", "WRIST", "HAND"))
    ]
    assert len(mura.carve_validation(singletons, 0.1)) == 1  # unstratified fallback
    assert mura.carve_validation(images, 0.0) == set()  # asked for none: none


def test_mura_dataset_has_validation_and_official_valid_as_test(mura_data):
    info = records.read_info(mura_data)
    assert set(info["splits"]) == {"train", "validation", "test"}
    assert info["split_patients"]["test"] == 16 and info["split_patients"]["validation"] >= 4


def test_study_kappa_at_half_per_body_part_matches_sklearn(mura_data, tmp_path):
    task = pr.TaskSpec(
        "mura",
        data=mura_data,
        positive_labels=(1,),
        negative_labels=(0,),
        unit="study",
        fixed_thresholds=(0.5,),
        group_by="body_part",
    )
    assert pr.check_task_data(task, mura_data) == []
    spec = bb.BackboneSpec("random_init", variant="mu/8", image_size=32, model={"depth": 1})
    val, test, _ = pr.run_protocol(
        spec, task, "knn", cache=pr.FeatureCache(tmp_path / "f"), data_path=mura_data, options={"k": 5}
    )
    assert set(test.fields["body_part"]) == {"ELBOW", "WRIST"}  # body part travels with every prediction
    scored = pr.score_predictions(val, test, task, n_boot=200)

    # Independently: the records' study ids and body parts, mean image probability per study.
    source = records.open_split(mura_data, "test")
    meta = {
        source[i]["image_id"]: (source[i]["study_id"], source[i]["body_part"], source[i]["label"])
        for i in range(len(source))
    }
    studies = {}
    for image_id, p in zip(test.image_id.tolist(), test.y_score.tolist()):
        study, part, label = meta[image_id]
        studies.setdefault(study, [part, label, []])[2].append(p)
    parts = np.array([v[0] for v in studies.values()])
    y = np.array([v[1] for v in studies.values()])
    prob = np.array([np.mean(v[2]) for v in studies.values()])
    assert len(studies) == 16 and set(y) == {0, 1}

    fixed, validation = scored["operating_points"]
    assert fixed["label"] == "fixed 0.5" and fixed["threshold"] == 0.5 and fixed["n"] == 16
    assert fixed["overall"]["kappa"]["point"] == pytest.approx(cohen_kappa_score(y, prob >= 0.5), abs=1e-12)
    for part in ("ELBOW", "WRIST"):
        keep = parts == part
        expected = cohen_kappa_score(y[keep], prob[keep] >= 0.5)
        assert fixed["by_group"][part]["kappa"]["point"] == pytest.approx(expected, abs=1e-12), part
        assert fixed["by_group"][part]["n"] == int(keep.sum())
        ci = fixed["by_group"][part]["kappa"]
        assert ci["low"] <= ci["point"] <= ci["high"] or not np.isfinite(ci["low"])
    t = scored["metrics"]["threshold"]["point"]
    assert validation["label"] == "validation Youden" and validation["threshold"] == pytest.approx(t)
    assert validation["overall"]["kappa"]["point"] == pytest.approx(cohen_kappa_score(y, prob >= t), abs=1e-12)

    result = {
        "run_id": "m",
        "task": "mura",
        "backbone": "r",
        "protocol": "knn",
        "fraction": 1.0,
        "seed": 0,
        "order": 0,
        **scored,
    }
    report_lib.write_report(tmp_path / "report", [result], {"m": (val, test)}, {"mura": task}, n_boot=20)
    md = (tmp_path / "report" / "index.md").read_text()
    assert "| mura | knn | 1 | 0 | r | fixed 0.5 | ELBOW |" in md and "validation Youden" in md
