"""Multi-class, ordinal and regression tasks end to end (knee KL grades per side, bone age from a CSV
column), checked against sklearn on the saved predictions; the unit of analysis separate from the
bootstrap cluster; and a study that validates its tasks before any pretraining."""

import csv
import json
import os

import cv2
import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from afm_jax.data import records
from afm_jax.errors import ConfigError
from afm_jax.evaluation import backbones as bb
from afm_jax.evaluation import protocols as pr
from afm_jax.evaluation import study as study_lib

SPLITS = ("train", "validation", "test")


def _knee_image(grade: int, rng) -> np.ndarray:
    """32 px; brightness of a central band rises with the grade (a feature a probe can read)."""
    img = rng.uniform(0.1, 0.2, (32, 32))
    img[12:20, :] += 0.15 * grade
    return (np.clip(img, 0, 1) * 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def knee_dataset(tmp_path_factory):
    """45 patients, one image per knee (two images of the left knee for every third patient), KL grade
    per side: left (i mod 5), right ((i + 1) mod 5), so no patient has one grade."""
    rng = np.random.default_rng(0)
    examples, split_of = [], {}
    for i in range(45):
        pid = f"pat{i:03d}"
        split_of[pid] = SPLITS[0] if i < 25 else SPLITS[1] if i < 35 else SPLITS[2]
        for side, grade in (("L", i % 5), ("R", (i + 1) % 5)):
            for j in range(2 if side == "L" and i % 3 == 0 else 1):
                examples.append(
                    {
                        "image": _knee_image(grade, rng),
                        "patient_id": pid,
                        "image_id": f"{pid}{side}{j}",
                        "study_id": f"{pid}s",
                        "laterality": side,
                        "body_part": "KNEE",
                        "label": grade,
                        "label_name": f"KL{grade}",
                    }
                )
    root = tmp_path_factory.mktemp("knee")
    return os.fspath(
        records.write_dataset(examples, root, name="knee_fake", assign_split=lambda r: split_of[r["patient_id"]])
    )


def _kl_task(data, unit="side", name="kl", **kw):
    return pr.TaskSpec(
        name,
        data=data,
        kind="ordinal",
        classes=tuple((g,) for g in range(5)),
        class_names=tuple(f"KL{g}" for g in range(5)),
        unit=unit,
        **kw,
    )


def test_unit_patient_with_different_grades_per_knee_is_reported_not_raised(knee_dataset):
    problems = pr.check_task_data(_kl_task(knee_dataset, unit="patient"), knee_dataset)
    assert problems and all("different labels" in p for p in problems) and "unit='side'" in problems[0]
    assert pr.check_task_data(_kl_task(knee_dataset, unit="side"), knee_dataset) == []
    assert pr.check_task_data(_kl_task(knee_dataset, unit="laterality"), knee_dataset) == []


def test_study_validates_every_task_before_pretraining(knee_dataset, tmp_path, monkeypatch):
    from afm_jax.train.defaults import default_config  # noqa: F401  (the study would train this)

    tasks = {
        "kl_patient": _kl_task(knee_dataset, unit="patient", name="kl_patient"),
        "missing_class": pr.TaskSpec(
            "missing_class", data=knee_dataset, positive_labels=(7,), negative_labels=(0,), unit="side"
        ),
    }
    study = study_lib.Study(
        name="v",
        tasks=tasks,
        backbones={"mae": bb.BackboneSpec("checkpoint", path="@mae", image_size=32)},
        pretrain={"mae": study_lib.PretrainSpec(config="configs/demo.py")},
        protocols=("knn",),
    )

    def no_pretraining(*a, **k):
        raise AssertionError("pretraining started before the tasks were validated")

    monkeypatch.setattr(study_lib, "run_pretraining", no_pretraining)
    monkeypatch.setattr(study_lib, "run_protocol", no_pretraining)
    with pytest.raises(ConfigError) as e:
        study_lib.run_study(study, tmp_path)
    message = str(e.value)
    assert "kl_patient" in message and "missing_class" in message and "nothing was trained" in message
    assert "different labels" in message and "positive" in message


def _unit_scores(pred: pr.Prediction, task: pr.TaskSpec):
    """Independent side-level aggregation: mean of each side's image scores, sides sorted by id."""
    keys = np.char.add(np.char.add(pred.patient_id, "|"), pred.fields["laterality"])
    ids = sorted(set(keys.tolist()))
    y = np.array([pred.y_true[keys == k][0] for k in ids])
    s = np.stack([pred.y_score[keys == k].mean(axis=0) for k in ids])
    return np.array(ids), y, s


def test_ordinal_study_scores_qwk_per_knee_with_patient_bootstrap(knee_dataset, tmp_path):
    task = _kl_task(knee_dataset)
    spec = bb.BackboneSpec("random_init", variant="mu/8", image_size=32, model={"depth": 1})
    study = study_lib.Study(
        name="o",
        tasks={"kl": task},
        backbones={"r": spec},
        protocols=("knn", "linear"),
        n_boot=100,
        overlay_images=0,
        options={"knn": {"k": 5}},
    )
    study_lib.run_study(study, tmp_path)
    for protocol in ("knn", "linear"):
        run = next(r for r in study.all_runs() if r.protocol == protocol)
        record = json.loads((tmp_path / "results" / f"{run.run_id}.json").read_text())
        test = pr.Prediction.load(tmp_path / "predictions" / f"{run.run_id}.test.npz")
        assert test.y_score.shape[1] == 5 and set(test.fields) >= {"laterality", "body_part"}
        ids, y, s = _unit_scores(test, task)
        m = record["metrics"]
        assert record["kind"] == "ordinal" and record["unit"] == "side" and record["num_units"] == 20
        assert record["num_clusters"] == 10  # 20 knees of 10 patients: patients resampled
        assert m["qwk"]["point"] == pytest.approx(
            skm.cohen_kappa_score(y, s.argmax(1), weights="quadratic", labels=range(5)), abs=1e-12
        )
        assert m["mae_grades"]["point"] == pytest.approx(skm.mean_absolute_error(y, s.argmax(1)), abs=1e-12)
        assert m["qwk"]["low"] <= m["qwk"]["point"] <= m["qwk"]["high"]
    report = tmp_path / "report"
    md = (report / "index.md").read_text()
    assert "## Results: ordinal tasks" in md and "qwk" in md and md.index("## Summary") < md.index("## Results")
    assert (report / "forest.png").is_file() and list(report.glob("confusion_kl_*.png"))
    rows = list(csv.DictReader(open(report / "predictions.csv")))
    assert len(rows) == 40 and {r["unit"] for r in rows} == {"side"}
    assert all(r["cluster_id"].startswith("pat") and r["unit_id"].startswith(r["cluster_id"] + "|") for r in rows)


def test_multiclass_linear_probe_is_sklearns_multinomial_probability():
    rng = np.random.default_rng(0)

    def split(n, tag):
        y = rng.integers(0, 3, n)
        x = rng.normal(size=(n, 6)) + 1.2 * np.eye(6)[y]
        return {
            "features": x,
            "y": y,
            "patient_id": np.array([f"{tag}{i}" for i in range(n)]),
            "study_id": np.array([f"{tag}{i}" for i in range(n)]),
            "image_id": np.array([f"{tag}i{i}" for i in range(n)]),
        }

    train, val, test = split(90, "a"), split(45, "b"), split(60, "c")
    _, got, info = pr.linear_protocol(train, val, test, kind="multiclass", num_classes=3)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=info["C"], max_iter=5000, random_state=0))
    ref.fit(train["features"], train["y"])
    np.testing.assert_allclose(got.y_score, ref.predict_proba(test["features"]), rtol=1e-6, atol=1e-9)
    assert skm.roc_auc_score(test["y"], got.y_score, multi_class="ovr") > 0.8


def test_knn_regression_is_dinos_weighted_mean_of_neighbour_targets():
    rng = np.random.default_rng(1)
    x_train, x_test = rng.normal(size=(70, 5)), rng.normal(size=(20, 5))
    t = rng.uniform(10, 200, 70)
    split = lambda x, y, tag: {
        "features": x,
        "y": y,
        "patient_id": np.array([f"{tag}{i}" for i in range(len(y))]),  # noqa: E731
        "study_id": np.array([f"{tag}{i}" for i in range(len(y))]),
        "image_id": np.array([f"{tag}i{i}" for i in range(len(y))]),
    }
    _, got, _ = pr.knn_protocol(
        split(x_train, t, "a"),
        split(x_test, np.zeros(20), "b"),
        split(x_test, np.zeros(20), "c"),
        k=7,
        temperature=0.1,
        kind="regression",
    )
    ref = KNeighborsRegressor(
        n_neighbors=7, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1.0 - d) / 0.1)
    ).fit(x_train, t)
    np.testing.assert_allclose(got.y_score, ref.predict(x_test), rtol=1e-6)


@pytest.fixture(scope="module")
def bone_age_csv_dataset(tmp_path_factory):
    """A CSV of 40 hand radiographs (one per patient) with a numeric bone_age_months column; the hand's
    brightness grows with the age, so a probe can read it."""
    from afm_jax.data import folder_dataset

    root = tmp_path_factory.mktemp("hands")
    rng = np.random.default_rng(2)
    rows = []
    for i in range(40):
        age = float(rng.integers(24, 216))
        img = (np.clip(rng.uniform(0.05, 0.1, (32, 32)) + age / 300.0, 0, 1) * 255).astype(np.uint8)
        cv2.imwrite(str(root / f"h{i}.png"), img)
        rows.append((f"h{i}.png", f"child{i}", "" if i == 3 else f"{age:g}", "LR"[i % 2]))
    with open(root / "hands.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "bone_age_months", "laterality"])
        w.writerows(rows)
    return os.fspath(
        folder_dataset.build_folder_dataset(
            root / "hands.csv", root / "out", name="hands", salt=b"test salt", target_column="bone_age_months"
        )
    )


def test_csv_target_column_becomes_the_records_float_target(bone_age_csv_dataset):
    values, sides = [], []
    for split in SPLITS:
        source = records.open_split(bone_age_csv_dataset, split)
        values += [source[i]["target"] for i in range(len(source))]
        sides += [source[i]["laterality"] for i in range(len(source))]
    assert sorted(set(sides)) == ["L", "R"]  # a CSV laterality column is kept
    assert len(values) == 40 and sum(np.isnan(values)) == 1  # the empty cell is NaN
    finite = np.asarray(values)[np.isfinite(values)]
    assert finite.min() >= 24 and finite.max() < 216 and np.all(finite == np.round(finite))
    assert records.read_info(bone_age_csv_dataset)["target_column"] == "bone_age_months"


def test_bone_age_regression_reports_mae_in_months_with_a_ci(bone_age_csv_dataset, tmp_path):
    task = pr.TaskSpec(
        "bone_age", data=bone_age_csv_dataset, kind="regression", target="target", target_unit="months", unit="patient"
    )
    assert pr.check_task_data(task, bone_age_csv_dataset) == []
    spec = bb.BackboneSpec("random_init", variant="mu/8", image_size=32, model={"depth": 1})
    cache = pr.FeatureCache(tmp_path / "f")
    val, test, info = pr.run_protocol(spec, task, "linear", cache=cache, data_path=bone_age_csv_dataset)
    scored = pr.score_predictions(val, test, task, n_boot=200)
    m = scored["metrics"]
    assert m["mae"]["point"] == pytest.approx(skm.mean_absolute_error(test.y_true, test.y_score), abs=1e-9)
    assert m["r2"]["point"] == pytest.approx(skm.r2_score(test.y_true, test.y_score), abs=1e-9)
    assert m["mae"]["low"] <= m["mae"]["point"] <= m["mae"]["high"] and "alpha" in info
    assert not np.any(np.isnan(test.y_true))  # the image without age is left out


def test_fracture_types_study_file_has_every_task_kind():
    import pathlib

    study = study_lib.load_study(
        pathlib.Path(__file__).resolve().parents[1] / "configs" / "studies" / "fracture_types.py"
    )
    kinds = {t.kind for t in study.tasks.values()}
    assert kinds == {"binary", "multiclass", "regression"}
    assert study.tasks["fracture_type"].classes == ((0,), (1,), (2,))
    assert study.tasks["field_of_view"].target in pr.DERIVED_TARGETS
    runs = study.all_runs()
    assert {r.fraction for r in runs} == {0.25, 1.0} and {r.seed for r in runs if r.fraction < 1} == {0, 1}
