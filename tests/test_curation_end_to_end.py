"""Curation on the synthetic femur set with injected defects: every injected kind is removed for
the right reason and (almost) nothing else is; the selection round-trips into the input pipeline;
embeddings files; the CLI writes the selection, report and contact sheets."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from afm_jax.data import pipeline, records, selection
from afm_jax.data.curation import config as config_lib
from afm_jax.data.curation import curate as run
from afm_jax.data.curation import synthetic_defects
from afm_jax.errors import ConfigError
from afm_jax.evaluation import curation_embeddings as embeddings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUPLICATE_KINDS = ("exact_duplicate", "near_duplicate")


@pytest.fixture(scope="module")
def defective(tmp_path_factory):
    return synthetic_defects.build_defective_dataset(
        tmp_path_factory.mktemp("cur"), num_patients=30, image_size=64, per_kind=2
    )


def _config(**selection_changes):
    cfg = config_lib.default_config()
    cfg.metadata.allow = synthetic_defects.FEMUR_ONLY
    cfg.threads = 1
    cfg.selection.update(selection_changes)
    return cfg


@pytest.fixture(scope="module")
def curated(defective, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run.curate(defective.path, out, _config(target_size=40, max_per_patient=2), progress=False)


def test_each_injected_kind_is_removed_for_its_reason_and_little_else(defective, curated):
    row = {image_id: i for i, image_id in enumerate(curated.scan.image_id)}
    for image_id, reason in defective.truth.items():
        i = row[image_id]
        if reason in DUPLICATE_KINDS:  # either copy may be kept (stated rule); exactly one goes, linked to the other
            j = row[defective.origin[image_id]]
            assert sorted([curated.primary[i], curated.primary[j]]) == ["", reason], (reason, image_id)
            gone, kept = (i, j) if curated.primary[i] else (j, i)
            assert curated.duplicate_of[gone] == curated.scan.image_id[kept]
        else:
            assert curated.primary[i] == reason, (reason, curated.reasons[i])
    originals = {defective.origin[i] for i, r in defective.truth.items() if r in DUPLICATE_KINDS}
    wrongly = [i for i in defective.clean_ids if curated.primary[row[i]] and i not in originals]
    assert len(wrongly) <= 0.02 * len(defective.clean_ids), [curated.primary[row[i]] for i in wrongly]
    removed = curated.summary["removed_by_reason"]
    assert sum(removed.values()) == len(defective.truth) + len(wrongly)
    # the exact duplicate filed under another patient is flagged as crossing patients
    assert curated.summary["duplicate_groups"]["exact_duplicate"]["cross_patient_groups"] == 1
    assert curated.cross_patient.sum() == 1


def test_selection_size_cap_and_balance(curated):
    sel = curated.selected
    assert sel.sum() == 40 and not any(curated.primary[i] for i in np.flatnonzero(sel))
    patients = np.asarray(curated.scan.patient_id)[sel]
    assert np.unique(patients, return_counts=True)[1].max() <= 2
    top = curated.clusters[-1]
    before = np.bincount(top[top >= 0])
    after = np.bincount(top[sel], minlength=len(before))
    assert after.max() / after.sum() <= before.max() / before.sum() + 1e-9


def test_selection_round_trips_into_the_pipeline(defective, curated):
    path = curated.out_dir / run.SELECTION_FILE
    ids = selection.read_selection(path)
    assert set(ids) == set(curated.selected_ids) and len(ids) == 40
    source = records.open_split(defective.path, "train", selection=str(path))
    assert len(source) == 40
    assert sorted(source[i]["image_id"] for i in range(len(source))) == sorted(ids)  # only selected images are read
    data_cfg = pipeline.default_data_config()
    data_cfg.update(path=str(defective.path), selection=str(path), num_workers=0)
    _, facts = pipeline.build_train_dataset(
        data_cfg, global_batch_size=8, seed=0, image_size=32, process_index=0, process_count=1
    )
    assert facts["examples"] == 40
    baseline = selection.read_selection(curated.out_dir / run.RANDOM_SELECTION_FILE)
    assert len(baseline) == 40 and set(baseline) <= set(curated.scan.image_id) and set(baseline) != set(ids)


def test_report_manifest_and_contact_sheets(curated):
    out = curated.out_dir
    summary = json.loads((out / run.REPORT_FILE).read_text())
    assert summary["selected"] == 40 and summary["images_per_s"] > 0
    assert {lvl["level"] for lvl in summary["cluster_levels"]} == {0, 1}
    with open(out / run.MANIFEST_FILE) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(curated.scan) and sum(int(r["selected"]) for r in rows) == 40
    assert {"std", "metal_fraction", "text_fraction", "field_mm", "body_part", "removed_for"} <= set(rows[0])
    sheets = sorted(p.name for p in (out / "contact_sheets").glob("*.png"))
    for reason in ("blank", "metal", "text", "exact_duplicate", "near_duplicate", "metadata_body_part"):
        assert f"removed_{reason}.png" in sheets
    assert any(s.startswith("cluster_") for s in sheets) and "selected_sample.png" in sheets
    sheet = cv2.imread(str(out / "contact_sheets" / "removed_blank.png"))
    assert sheet is not None and sheet.shape[0] > 96
    assert "| blank | 2 |" in (out / "report.md").read_text()


def test_retrieval_toward_seed_label_and_embedding_files(defective, curated, tmp_path):
    ids = curated.scan.image_id
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(ids), 8)).astype(np.float32)
    npz = embeddings.save_embeddings(tmp_path / "emb.npz", vectors[::-1], ids[::-1])
    np.testing.assert_array_equal(embeddings.load_embeddings(str(npz), ids), vectors)
    np.save(tmp_path / "emb.npy", vectors)
    (tmp_path / "emb.ids.json").write_text(json.dumps(ids))
    np.testing.assert_array_equal(embeddings.load_embeddings(str(tmp_path / "emb.npy"), ids), vectors)
    with pytest.raises(ConfigError, match="no embedding for 1"):
        embeddings.load_embeddings(str(npz), ids + ["missing"])
    cfg = _config(target_size=20)
    cfg.retrieval.update(seed_label=2, neighbours=2, max_fraction=1.0)
    cfg.duplicates.embedding_min_cosine = 0.0
    res = run.curate(defective.path, tmp_path / "out", cfg, embeddings=str(npz), progress=False)
    aff = (res.scan.label == 2) & (np.asarray(res.primary) == "")
    assert aff.sum() > 20  # more seeds than the target: seeds (similarity 1 to themselves) fill it
    assert res.retrieved.sum() == 20 and np.all(aff[res.retrieved]) and np.all(res.selected[res.retrieved])
    cfg.retrieval.max_fraction = 0.25  # the default: retrieval fills at most a quarter, balance the rest
    res = run.curate(defective.path, tmp_path / "out2", cfg, embeddings=str(npz), progress=False)
    assert res.retrieved.sum() == 5 and (res.retrieved & res.selected).sum() == 5 and res.selected.sum() == 20


def test_encoder_embeddings_align_with_image_ids(defective):
    from flax import nnx

    from afm_jax.models import factory

    encoder = factory.build_encoder(factory.default_model_config("mu/8"), 32, nnx.Rngs(0))
    vectors, ids = embeddings.encoder_embeddings(encoder, defective.path, "train", image_size=32, batch_size=16)
    assert ids == records.split_index(defective.path, "train")["image_id"]
    assert vectors.shape == (len(ids), 32) and np.isfinite(vectors).all()
    source = records.open_split(defective.path, "train")
    from afm_jax.data import transforms

    i = 5  # recompute one row directly: same resize and pooling as the evaluation features
    image = transforms.apply_chain(transforms.decode_png(source[i]["image"]), transforms.eval_chain(32))
    direct = np.asarray(encoder.pooled_features(image[None], pool="avg"))[0]
    np.testing.assert_allclose(vectors[i], direct, rtol=1e-4, atol=1e-5)


def test_cli_writes_selection_and_report_and_fails_cleanly(defective, tmp_path):
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "curate.py"),
        "--data",
        str(defective.path),
        "--out",
        str(tmp_path / "cli"),
        f"--config.metadata.allow={synthetic_defects.FEMUR_ONLY}",
        "--config.selection.target_fraction=0.5",
        "--config.threads=1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Selected 51 images" in done.stdout
    assert (tmp_path / "cli" / "selection.json").is_file() and (tmp_path / "cli" / "report.md").is_file()
    bad = subprocess.run(
        cmd[:3] + [str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=240
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_embedding_duplicates_from_a_backbone_file(defective, curated, tmp_path):
    ids = curated.scan.image_id
    kept = [i for i in range(len(ids)) if not curated.primary[i]]
    a, b = kept[3], kept[7]
    vectors = np.random.default_rng(1).normal(size=(len(ids), 16)).astype(np.float32)
    vectors[b] = vectors[a] * 2.0 + 0.001  # same direction: cosine ~1
    npz = embeddings.save_embeddings(tmp_path / "emb.npz", vectors, ids)
    res = run.curate(defective.path, tmp_path / "out", _config(), embeddings=str(npz), progress=False)
    flagged = [i for i, p in enumerate(res.primary) if p == "embedding_duplicate"]
    assert len(flagged) == 1 and flagged[0] in (a, b)
    assert res.duplicate_of[flagged[0]] == ids[b if flagged[0] == a else a]
    assert res.summary["removed_by_reason"]["embedding_duplicate"] == 1


def test_embeddings_computed_by_a_backbone_match_a_direct_forward(defective, curated):
    """`backbone:<spec>` embeds every scanned image with an evaluation backbone, rows in scan order."""
    from afm_jax.evaluation import backbones

    ids = list(curated.scan.image_id)
    spec = "random_init:,variant=mu/8,image_size=32"
    vectors = embeddings.load_embeddings(
        embeddings.BACKBONE_PREFIX + spec, ids, dataset_dir=defective.path, splits=("train",)
    )
    assert vectors.shape == (len(ids), 32) and np.isfinite(vectors).all()
    backbone = backbones.load_backbone(backbones.parse_backbone_arg(spec))
    source = records.open_split(defective.path, "train")
    from afm_jax.data import transforms

    row = {source[i]["image_id"]: i for i in range(len(source))}
    for k in (0, len(ids) // 2):
        image = transforms.apply_chain(transforms.decode_png(source[row[ids[k]]]["image"]), transforms.eval_chain(32))
        np.testing.assert_allclose(vectors[k], backbone.features(image[None])[0], rtol=1e-4, atol=1e-5)
