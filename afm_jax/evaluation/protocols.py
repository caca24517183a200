"""Evaluation protocols on one backbone interface: kNN, linear probe, fine-tuning, low-shot.

What: `run_protocol(...)` evaluates one backbone on one binary task with one protocol, seed and
fraction of training patients, and returns validation and test `Prediction`s (per image: label,
P(positive), patient, study and image ids). `score_predictions` turns them into metrics with
bootstrap CIs over patients, at the level the task names (image, patient or study; image
probabilities are aggregated by mean or max), with the operating point (Youden) chosen on
*validation* — choosing it on the test set would flatter every backbone.

Protocols:
  knn       DINO's weighted cosine kNN (k = 20, T = 0.07) on frozen features.
  linear    logistic regression on frozen features, L2 strength chosen on validation AUROC
            (afm_jax.evaluation.linear).
  finetune  the trainer with `FinetuneTask` (layer-wise lr decay, drop-path, warmup, class weights,
            early stopping on validation AUROC) in a run directory; JAX ViT backbones only.
Low-shot: `fraction` < 1 keeps that fraction of training *patients* (all their images; class balance
kept; `sampling.low_shot_patients`), different per seed. Validation and test are never subsampled.

Frozen features are cached on disk per backbone × dataset × split (`FeatureCache`), so kNN, linear,
every low-shot fraction and every seed reuse one forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Callable

import numpy as np
from flax import nnx

from afm_jax import configuration, errors, io
from afm_jax.data import pipeline, records, synthetic
from afm_jax.data.selection import write_selection
from afm_jax.errors import ConfigError
from afm_jax.evaluation import aggregation, sampling, statistics
from afm_jax.evaluation import metrics as metrics_lib
from afm_jax.evaluation.backbones import Backbone, BackboneSpec, describe_backbone, load_backbone
from afm_jax.evaluation.features import extract_features
from afm_jax.evaluation.knn import knn_predict, knn_regress
from afm_jax.evaluation.linear import (
    DEFAULT_ALPHA_GRID,
    DEFAULT_C_GRID,
    fit_linear_probe,
    fit_multiclass_probe,
    fit_ridge_probe,
)
from afm_jax.evaluation.metrics import binary_metrics
from afm_jax.models.classifier import binary_targets
from afm_jax.train import run as train_run
from afm_jax.train.checkpoint import read_meta, resolve_step_dir
from afm_jax.train.defaults import default_config
from afm_jax.version import code_version

PROTOCOLS = ("knn", "linear", "finetune")
KINDS = ("binary", "multiclass", "ordinal", "regression")
UNITS = ("image", "patient", "study", "side")  # or any string record field (e.g. "laterality", "view")
CLUSTERS = ("patient", "study", "image")
RECORD_FIELDS = ("study_id", "body_part", "laterality", "view")  # travel with every prediction
PRIMARY_METRIC = {"binary": "auroc", "multiclass": "macro_auroc", "ordinal": "qwk", "regression": "mae"}
# Targets derived from record fields, for datasets without a `target` column (documented synthetic targets).
DERIVED_TARGETS: dict[str, Callable[[dict], float]] = {
    # The width of the radiograph's field of view in mm (pixel spacing × columns of the original image):
    # on the synthetic femurs it is 240 mm / magnification, visible as the bone's apparent size.
    "field_of_view_mm": lambda ex: float(np.asarray(ex["pixel_spacing_mm"])[1] * np.asarray(ex["orig_shape"])[1]),
}


@dataclasses.dataclass
class TaskSpec:
    """A downstream task on a record dataset.

    data: dataset path (a version dir or its parent, as `data.path`), or empty with `synthetic` set
    (num_patients, image_size, seed of the embedded synthetic femurs, built under the study folder).
    kind: "binary", "multiclass", "ordinal" (ordered classes, e.g. KL grades) or "regression".
    positive_labels / negative_labels (binary): label ints of each class; other images are left out.
    classes (multiclass, ordinal): label ints of each class in class order, e.g. ((0,), (1,), (2,));
    class_names: their names (reports, confusion matrices; binary: (negative, positive), e.g. ("NFF", "AFF")). Images with other labels are left out.
    target (regression): the record field `target` (float; NaN = none) or a name in DERIVED_TARGETS.
    target_unit: the target's unit in reports (e.g. "months").
    unit: where metrics are computed: "image", "patient", "study", "side" (patient × laterality) or any
    record field (patient × that field). cluster: what the bootstrap resamples ("patient" by default).
    aggregate: "mean" or "max" of image probabilities (or predictions) per unit.
    fixed_thresholds (binary): thresholds fixed in advance (MURA: 0.5) at which kappa, sensitivity,
    specificity and accuracy are also reported — beside the validation-chosen (Youden) one, labelled;
    group_by: a record field (e.g. "body_part") to report those per group as well as overall.
    """

    name: str
    data: str = ""
    positive_labels: tuple[int, ...] = (2,)
    negative_labels: tuple[int, ...] = (1,)
    unit: str = "patient"
    aggregate: str = "mean"
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str = "test"
    synthetic: dict | None = None
    kind: str = "binary"
    classes: tuple[tuple[int, ...], ...] = ()
    class_names: tuple[str, ...] = ()
    target: str = "target"
    target_unit: str = ""
    cluster: str = "patient"
    fixed_thresholds: tuple[float, ...] = ()
    group_by: str = ""

    def __post_init__(self) -> None:
        self.positive_labels = tuple(int(x) for x in self.positive_labels)
        self.negative_labels = tuple(int(x) for x in self.negative_labels)
        self.classes = tuple(tuple(int(x) for x in (c if isinstance(c, (tuple, list)) else (c,))) for c in self.classes)
        self.class_names = tuple(str(c) for c in self.class_names)
        if self.kind not in KINDS:
            raise ConfigError(f"Task {self.name!r}: kind {self.kind!r} is invalid; expected one of {KINDS}.")
        if self.kind == "binary" and (
            not self.positive_labels
            or not self.negative_labels
            or set(self.positive_labels) & set(self.negative_labels)
        ):
            raise ConfigError(
                f"Task {self.name!r}: positive_labels {self.positive_labels} and negative_labels "
                f"{self.negative_labels} must be non-empty and disjoint."
            )
        if self.kind == "binary" and self.class_names and len(self.class_names) != 2:
            raise ConfigError(
                f"Task {self.name!r}: a binary task's class_names are (negative, positive), got {self.class_names}."
            )
        if self.kind in ("multiclass", "ordinal"):
            flat = [x for c in self.classes for x in c]
            if len(self.classes) < 2 or len(flat) != len(set(flat)):
                raise ConfigError(
                    f"Task {self.name!r} ({self.kind}): `classes` must list >= 2 disjoint groups of "
                    f"label ints, e.g. ((0,), (1,), (2,)); got {self.classes}."
                )
            if self.class_names and len(self.class_names) != len(self.classes):
                raise ConfigError(
                    f"Task {self.name!r}: {len(self.class_names)} class_names for {len(self.classes)} classes."
                )
        if self.kind == "regression" and self.target != "target" and self.target not in DERIVED_TARGETS:
            raise ConfigError(
                f"Task {self.name!r}: target {self.target!r} is neither the record field 'target' nor "
                f"one of the derived targets {sorted(DERIVED_TARGETS)}."
            )
        if not isinstance(self.unit, str) or not self.unit:
            raise ConfigError(
                f"Task {self.name!r}: unit {self.unit!r} is invalid; expected one of {UNITS} or a "
                "record field such as 'laterality'."
            )
        if self.unit not in UNITS and self.unit not in records.STRING_KEYS:
            raise ConfigError(
                f"Task {self.name!r}: unit {self.unit!r} is invalid; expected one of {UNITS} or a "
                f"record field ({', '.join(records.STRING_KEYS)})."
            )
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"Task {self.name!r}: cluster {self.cluster!r} is invalid; expected one of {CLUSTERS}.")
        self.fixed_thresholds = tuple(float(t) for t in self.fixed_thresholds)
        if self.group_by and self.group_by not in RECORD_FIELDS:
            raise ConfigError(f"Task {self.name!r}: group_by {self.group_by!r} must be one of {RECORD_FIELDS}.")
        if self.aggregate not in ("mean", "max"):
            raise ConfigError(f"Task {self.name!r}: aggregate {self.aggregate!r} is invalid; use 'mean' or 'max'.")
        if not self.data and not self.synthetic:
            raise ConfigError(
                f"Task {self.name!r} names no dataset: set `data` to a dataset path "
                "(tools/preprocess.py output, a MURA or folder dataset) or `synthetic`."
            )

    @property
    def num_classes(self) -> int:
        return 2 if self.kind == "binary" else len(self.classes) if self.kind != "regression" else 0

    @property
    def names(self) -> tuple[str, ...]:
        """Class names in class order (binary: negative, positive)."""
        if self.kind == "binary":
            return self.class_names if len(self.class_names) == 2 else ("negative", "positive")
        return self.class_names or tuple("+".join(str(x) for x in c) for c in self.classes)

    def targets(self, labels: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """Per-image class index (−1 = not in the task) or, for regression, the float target (NaN = none)."""
        labels = np.asarray(labels)
        if self.kind == "binary":
            return np.asarray(binary_targets(labels, self.positive_labels, self.negative_labels), np.int64)
        if self.kind == "regression":
            return np.asarray(values, np.float64)
        out = np.full(labels.shape, -1, np.int64)
        for k, group in enumerate(self.classes):
            out[np.isin(labels, group)] = k
        return out

    def data_path(self, root: str | os.PathLike = ".") -> str:
        """The dataset path, building the synthetic set under `root`/data on first use."""
        if self.data:
            return os.fspath(self.data)
        s = dict(self.synthetic or {})
        return os.fspath(
            synthetic.ensure_synthetic_dataset(
                pathlib.Path(root) / "data",
                num_patients=int(s.get("num_patients", 300)),
                seed=int(s.get("seed", 0)),
                image_size=int(s.get("image_size", 256)),
            )
        )


@dataclasses.dataclass
class Prediction:
    """Per-image predictions of one split: y_true (class index, or float target), y_score (binary:
    P(positive) (N,); multi-class/ordinal: class probabilities (N, C); regression: the prediction
    (N,)), the ids to aggregate by, and record fields (body part, laterality, view, ...)."""

    y_true: np.ndarray
    y_score: np.ndarray
    patient_id: np.ndarray
    study_id: np.ndarray
    image_id: np.ndarray
    fields: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "fields"}
        np.savez(path, **arrays, **{f"field__{k}": np.asarray(v).astype(str) for k, v in self.fields.items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Prediction":
        with np.load(path, allow_pickle=False) as z:
            fields = {k[len("field__") :]: z[k] for k in z.files if k.startswith("field__")}
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls) if f.name != "fields"}, fields=fields)

    def field(self, name: str) -> np.ndarray:
        if name in ("patient_id", "study_id", "image_id"):
            return getattr(self, name)
        if name not in self.fields:
            raise ConfigError(f"Predictions carry no record field {name!r} (they carry {sorted(self.fields)}).")
        return self.fields[name]

    def units(self, unit: str) -> np.ndarray:
        """The id of each image's unit: image, patient, study, side (patient × laterality) or patient × field."""
        if unit in ("image", "patient", "study"):
            return {"image": self.image_id, "patient": self.patient_id, "study": self.study_id}[unit]
        values = self.field("laterality" if unit == "side" else unit)
        return np.char.add(np.char.add(self.patient_id.astype(str), "|"), values.astype(str))


# ─── Features ────────────────────────────────────────────────────────────────────────────────────


def extract_split(
    backbone: Backbone, data_path: str, split: str, *, batch_size: int = 64, progress: bool = True
) -> dict[str, np.ndarray]:
    """Frozen features of every image of `split` in dataset order, with label and ids."""
    out = pipeline.map_split(
        backbone.features,
        {"path": data_path, "num_workers": 0},
        split=split,
        batch_size=batch_size,
        image_size=backbone.image_size,
        progress=progress,
        desc=f"features[{backbone.name}:{split}]",
    )
    out["features"] = out.pop("output")
    out["patient_id"] = out["patient_id"].astype(str)
    out["image_id"] = out["image_id"].astype(str)
    out["study_id"] = _study_ids(data_path, split, out["image_id"])
    return out


def encoder_split(
    encoder: nnx.Module, data_cfg, split: str, *, image_size: int, pool: str = "avg", batch_size: int = 64
) -> dict[str, np.ndarray]:
    """`extract_split` for an in-memory Flax encoder (a model just trained, or its random init)."""
    out = extract_features(encoder, data_cfg, split=split, image_size=image_size, batch_size=batch_size, pool=pool)
    out["study_id"] = _study_ids(data_cfg.path, split, out["image_id"])
    return out


def _study_ids(data_path: str, split: str, image_ids: np.ndarray) -> np.ndarray:
    """study_id per image (records carry it; the eval iterator does not)."""
    return record_columns(data_path, split, image_ids)["study_id"]


def record_columns(data_path: str, split: str, image_ids: np.ndarray, target: str = "") -> dict[str, np.ndarray]:
    """Record fields of each image (RECORD_FIELDS; study_id falls back to the patient) and, with `target`,
    its float target ("target" or a DERIVED_TARGETS name; NaN where missing). Read once per split:
    records are parsed without decoding the PNG, cheap next to a forward pass."""
    source = records.open_split(data_path, split)
    derive = DERIVED_TARGETS.get(target)
    by_image = {}
    for i in range(len(source)):
        ex = source[i]
        row = {k: str(ex.get(k, "") or "") for k in RECORD_FIELDS}
        row["study_id"] = row["study_id"] or ex["patient_id"]
        if target:
            row["value"] = derive(ex) if derive else float(ex.get("target", np.nan))
        by_image[ex["image_id"]] = row
    empty = {k: "" for k in RECORD_FIELDS} | ({"value": np.nan} if target else {})
    rows = [by_image.get(i, empty) for i in np.asarray(image_ids).astype(str).tolist()]
    out = {k: np.asarray([r[k] for r in rows], dtype=str) for k in RECORD_FIELDS}
    if target:
        out["value"] = np.asarray([r["value"] for r in rows], np.float64)
    return out


def dataset_fingerprint(data_path: str) -> str:
    """A short hash of the dataset's identity (directory, content fingerprint, split sizes)."""
    info = records.read_info(data_path)
    payload = {k: info.get(k) for k in ("path", "content_fingerprint", "source_fingerprint", "splits")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_provenance(data_path: str) -> dict[str, Any]:
    """What identifies the evaluated dataset: path, fingerprints, preprocessing (variant and parameters)
    and the tool version that wrote it, from its dataset info."""
    info = records.read_info(data_path)
    prep = info.get("preprocessing") or {}
    variant = prep.get("variant") or prep.get("name") if isinstance(prep, dict) else None
    if isinstance(variant, dict):
        variant = variant.get("name")
    return {
        "path": info.get("path"),
        "name": info.get("name"),
        "version": info.get("version"),
        "fingerprint": dataset_fingerprint(data_path),
        "content_fingerprint": info.get("content_fingerprint"),
        "source_fingerprint": info.get("source_fingerprint"),
        "preprocessing_variant": variant,
        "preprocessing": prep,
        "dataset_tool_version": info.get("tool_version"),
    }


def provenance(spec: BackboneSpec, data_path: str, *, protocol: str = "", params: dict | None = None) -> dict[str, Any]:
    """The provenance block of every result and feature cache: the backbone as really evaluated
    (architecture and step read from its checkpoint), the dataset, the protocol parameters and the
    code version of this evaluation."""
    return {
        "backbone": describe_backbone(spec),
        "dataset": dataset_provenance(data_path),
        "protocol": protocol,
        "protocol_params": dict(params or {}),
        "code_version": code_version(),
    }


def protocol_params(protocol: str, options: dict | None, info: dict | None = None) -> dict[str, Any]:
    """The parameters a run of `protocol` used: the options given, the protocol's defaults otherwise,
    and what it chose on validation (the probe's C)."""
    info = info or {}
    out = dict(options or {})
    if protocol == "knn":
        out.setdefault("k", info.get("k", 20))
        out.setdefault("temperature", info.get("temperature", 0.07))
    elif protocol == "linear" and "alpha" in info:
        out.update(alpha_grid=list(DEFAULT_ALPHA_GRID), alpha=info.get("alpha"))
    elif protocol == "linear":
        out.update(C_grid=list(DEFAULT_C_GRID), C=info.get("C"))
    return out


class FeatureCache:
    """Frozen features on disk: `<root>/<backbone key>/<dataset key>/<split>.npz`.

    The backbone key hashes its spec and weights (path, size, mtime), the dataset key its content
    fingerprint, so a retrained checkpoint or a rewritten dataset is never served stale features.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)

    def path(self, spec: BackboneSpec, data_path: str, split: str) -> pathlib.Path:
        return self.root / spec.cache_key() / dataset_fingerprint(data_path) / f"{split}.npz"

    def get(
        self, spec: BackboneSpec, data_path: str, split: str, backbone: Callable[[], Backbone], *, batch_size: int = 64
    ) -> dict[str, np.ndarray]:
        path = self.path(spec, data_path, split)
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        feats = extract_split(backbone(), data_path, split, batch_size=batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_with(path, lambda tmp: np.savez(tmp, **feats))
        io.write_json(path.parent.parent / "spec.json", {**describe_backbone(spec), "code_version": code_version()})
        io.write_json(path.parent / "dataset.json", dataset_provenance(data_path))
        return feats


def task_subset(
    feats: dict[str, np.ndarray], task: TaskSpec, data_path: str | None = None, split: str | None = None
) -> dict[str, np.ndarray]:
    """The task's images only, with `y` (class index, or the float target for regression) and the
    record fields (`fields__<name>`) read from the records when `data_path` and `split` are given."""
    feats = dict(feats)
    if data_path is not None and split is not None:
        cols = record_columns(data_path, split, feats["image_id"], task.target if task.kind == "regression" else "")
        if "value" in cols:
            feats["value"] = cols.pop("value")
        feats.update({f"fields__{k}": v for k, v in cols.items() if k != "study_id"})
    y = task.targets(feats["label"], feats.get("value"))
    keep = np.isfinite(y) if task.kind == "regression" else y >= 0
    out = {k: v[keep] for k, v in feats.items()}
    out["y"] = y[keep] if task.kind == "regression" else y[keep].astype(np.int64)
    return out


def binary_subset(feats: dict[str, np.ndarray], task: TaskSpec) -> dict[str, np.ndarray]:
    """The task's images only, with `y` = 1 (positive) / 0 (negative) (a binary task's `task_subset`)."""
    return task_subset(feats, task)


def _prediction(split: dict[str, np.ndarray], scores: np.ndarray) -> Prediction:
    fields = {k[len("fields__") :]: v for k, v in split.items() if k.startswith("fields__")}
    return Prediction(
        y_true=split["y"],
        y_score=np.asarray(scores, np.float64),
        patient_id=split["patient_id"],
        study_id=split["study_id"],
        image_id=split["image_id"],
        fields=fields,
    )


def low_shot_strata(train: dict[str, np.ndarray], kind: str) -> np.ndarray:
    """What low-shot sampling stratifies by: the class, or for regression the target's quartile."""
    if kind != "regression":
        return train["y"]
    edges = np.quantile(train["y"], [0.25, 0.5, 0.75])
    return np.searchsorted(edges, train["y"], side="right")


def low_shot_mask(train: dict[str, np.ndarray], fraction: float, seed: int, kind: str = "binary") -> np.ndarray:
    """Images of a `fraction` of training patients (whole patients, class balance — or the target's
    quartiles — kept)."""
    if fraction >= 1.0:
        return np.ones(len(train["y"]), bool)
    mask = sampling.low_shot_patients(train["patient_id"], low_shot_strata(train, kind), fraction, seed)
    if kind != "regression" and len(np.unique(train["y"][mask])) < 2:
        raise ConfigError(
            f"{fraction:.0%} of the training patients (seed {seed}) holds only one class: use a "
            "larger fraction or dataset."
        )
    return mask


# ─── Protocols on frozen features ────────────────────────────────────────────────────────────────


def knn_protocol(
    train: dict,
    val: dict,
    test: dict,
    *,
    k: int = 20,
    temperature: float = 0.07,
    kind: str = "binary",
    num_classes: int = 2,
) -> tuple[Prediction, Prediction, dict]:
    """DINO's weighted vote (classes: probabilities; binary keeps P(positive)) or, for regression, the
    weighted mean of the neighbours' targets."""
    if kind == "regression":
        preds = [
            knn_regress(train["features"], train["y"], s["features"], k=k, temperature=temperature) for s in (val, test)
        ]
    else:
        preds = [
            knn_predict(
                train["features"], train["y"], s["features"], num_classes=num_classes, k=k, temperature=temperature
            )
            for s in (val, test)
        ]
        if kind == "binary":
            preds = [p[:, 1] for p in preds]
    return _prediction(val, preds[0]), _prediction(test, preds[1]), {"k": k, "temperature": temperature}


def linear_protocol(
    train: dict, val: dict, test: dict, *, seed: int = 0, kind: str = "binary", num_classes: int = 2
) -> tuple[Prediction, Prediction, dict]:
    """Logistic regression (binary), multinomial logistic regression (classes) or ridge regression
    (regression) on frozen features, regularisation chosen on validation."""
    if kind == "regression":
        probe = fit_ridge_probe(train["features"], train["y"], val["features"], val["y"])
        return (
            _prediction(val, probe.predict(val["features"])),
            _prediction(test, probe.predict(test["features"])),
            {"alpha": probe.alpha, "validation_mae": probe.validation_mae},
        )
    if kind != "binary":
        probe = fit_multiclass_probe(
            train["features"], train["y"], val["features"], val["y"], num_classes=num_classes, seed=seed
        )
        return (
            _prediction(val, probe.predict_proba(val["features"])),
            _prediction(test, probe.predict_proba(test["features"])),
            {"C": probe.C, "validation_macro_auroc": probe.validation_macro_auroc},
        )
    probe = fit_linear_probe(train["features"], train["y"], val["features"], val["y"], seed=seed)
    info = {"C": probe.C, "validation_auroc": probe.validation_auroc}
    return (
        _prediction(val, probe.predict_proba(val["features"])),
        _prediction(test, probe.predict_proba(test["features"])),
        info,
    )


@dataclasses.dataclass
class ProbeDirection:
    """The linear probe in raw feature space: logit(f) = weights · (f − mean) + intercept, where
    `mean` is the training features' mean and weights = coef / scale (the probe's standardisation)."""

    weights: np.ndarray
    mean: np.ndarray
    intercept: float


def probe_direction(train: dict, val: dict, *, seed: int = 0) -> ProbeDirection:
    """The fitted linear probe of `train` (C chosen on `val`) as a `ProbeDirection`, for class-activation maps."""
    probe = fit_linear_probe(train["features"], train["y"], val["features"], val["y"], seed=seed)
    scaler, clf = probe.classifier[0], probe.classifier[-1]
    sign = 1.0 if list(clf.classes_).index(1) == 1 else -1.0  # decision_function is for classes_[1]
    return ProbeDirection(
        weights=(sign * clf.coef_[0] / scaler.scale_).astype(np.float32),
        mean=np.asarray(scaler.mean_, np.float32),
        intercept=float(sign * clf.intercept_[0]),
    )


# ─── Fine-tuning through the trainer ─────────────────────────────────────────────────────────────


def finetune_config(
    spec: BackboneSpec, task: TaskSpec, data_path: str, *, seed: int, options: dict[str, Any] | None = None
):
    """The trainer config of fine-tuning `spec` on `task`; `options` are dotted config overrides
    (e.g. {"total_steps": 300, "optim.base_lr": 1e-3})."""
    if spec.kind not in ("checkpoint", "timm_vit", "random_init"):
        raise ConfigError(
            f"Fine-tuning needs a JAX ViT backbone (checkpoint, timm_vit, random_init), not "
            f"{spec.kind!r}; evaluate {spec.kind!r} with the knn or linear protocol."
        )
    config = default_config("finetune", spec.variant)
    if spec.kind == "checkpoint" or (spec.kind == "random_init" and spec.path):
        step_dir, _ = resolve_step_dir(spec.path)
        saved = read_meta(step_dir)["config"]["model"]
        config.model.update({k: v for k, v in saved.items() if k in config.model})
    else:
        config.model.in_chans = spec.in_chans
        config.model.update(dict(spec.model))
    if spec.kind in ("checkpoint", "timm_vit"):
        config.init_from = os.fspath(spec.path)
    config.seed = int(seed)
    config.image_size = int(spec.image_size)
    config.data.path = data_path
    config.data.num_workers = 0
    config.data.train_split, config.data.eval_split = task.train_split, task.val_split
    config.finetune.update(
        positive_labels=task.positive_labels,
        negative_labels=task.negative_labels,
        pool=spec.pool,
        test_split=task.test_split,
        kind=task.kind,
        classes=task.classes,
    )
    config.checkpoint_every = 10**9
    configuration.apply_overrides(config, options or {}, "Fine-tuning options")
    return config


def finetune_protocol(
    spec: BackboneSpec,
    task: TaskSpec,
    data_path: str,
    workdir: str,
    *,
    seed: int,
    fraction: float,
    options: dict[str, Any] | None = None,
) -> tuple[Prediction, Prediction, dict]:
    """Fine-tunes in `workdir` (resumable) and returns the best-on-validation model's predictions."""
    config = finetune_config(spec, task, data_path, seed=seed, options=options)
    os.makedirs(workdir, exist_ok=True)
    regression = task.kind == "regression"
    if regression:  # every split's targets by image (derived targets are computed here, in this layer)
        values = {}
        for split in dict.fromkeys((task.train_split, task.val_split, task.test_split)):
            ids = np.asarray(records.split_index(data_path, split)["image_id"]).astype(str)
            v = record_columns(data_path, split, ids, task.target)["value"]
            values[split] = {i: float(x) for i, x in zip(ids.tolist(), v.tolist()) if np.isfinite(x)}
        config.finetune.targets_file = os.path.join(workdir, "regression_targets.json")
        io.write_json(config.finetune.targets_file, values)
    if fraction < 1.0:
        index = records.split_index(data_path, task.train_split)
        if regression:
            y = np.asarray([values[task.train_split].get(i, np.nan) for i in index["image_id"]], np.float64)
            keep = np.isfinite(y)
        else:
            y = task.targets(np.asarray(index["label"]))
            keep = y >= 0
        ids = np.asarray(index["image_id"])[keep]
        train = {"patient_id": np.asarray(index["patient_id"])[keep].astype(str), "y": y[keep]}
        selection = os.path.join(workdir, "low_shot_selection.json")
        mask = low_shot_mask(train, fraction, seed, task.kind)
        write_selection(selection, ids[mask].tolist())
        config.data.selection = selection  # batches cycle over the chosen images (epochs wrap)
    result = train_run.run(config, workdir)
    if not result.finished:  # a signal (time limit, preemption) stopped it: its predictions are not the result
        raise errors.StoppedBeforeFinishingError(
            f"Fine-tuning in {workdir} stopped at step {result.step} of {config.total_steps} before finishing "
            "(its checkpoint is kept); rerun the same command to resume it."
        )
    preds = []
    for split, dataset_split in (("validation", task.val_split), ("test", task.test_split)):
        z = result.predictions[split]
        cols = record_columns(data_path, dataset_split, z["image_id"].astype(str))
        study = cols.pop("study_id")
        preds.append(
            Prediction(
                y_true=z["y_true"].astype(np.float64 if regression else np.int64),
                y_score=z["y_score"].astype(np.float64),
                patient_id=z["patient_id"].astype(str),
                study_id=study,
                image_id=z["image_id"].astype(str),
                fields=cols,
            )
        )
    best = result.predictions["best"]
    if regression:  # early stopping maximised −MAE
        chosen = {"validation_mae": -float(best["val_auroc"])}
    else:
        selection = {"binary": "auroc", "multiclass": "macro_auroc", "ordinal": "qwk"}[task.kind]
        chosen = {f"validation_{selection}": best["val_auroc"]}
    return preds[0], preds[1], {"best_step": best["step"], **chosen, "steps_run": int(result.step)}


# ─── One run ─────────────────────────────────────────────────────────────────────────────────────


def run_protocol(
    spec: BackboneSpec,
    task: TaskSpec,
    protocol: str,
    *,
    seed: int = 0,
    fraction: float = 1.0,
    cache: FeatureCache,
    data_path: str,
    workdir: str | None = None,
    name: str = "",
    options: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> tuple[Prediction, Prediction, dict]:
    """(validation, test, info) predictions of `protocol` for backbone `spec` on `task`."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"Protocol {protocol!r} is unknown: expected one of {', '.join(PROTOCOLS)}.")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"Low-shot fraction {fraction!r} must be in (0, 1].")
    options = dict(options or {})
    if protocol == "finetune":
        if workdir is None:
            raise ValueError("The finetune protocol needs a workdir.")
        return finetune_protocol(spec, task, data_path, workdir, seed=seed, fraction=fraction, options=options)
    loaded: dict[str, Backbone] = {}

    def backbone() -> Backbone:
        if "b" not in loaded:
            loaded["b"] = load_backbone(spec, name)
        return loaded["b"]

    splits = [
        task_subset(cache.get(spec, data_path, s, backbone, batch_size=batch_size), task, data_path, s)
        for s in (task.train_split, task.val_split, task.test_split)
    ]
    train, val, test = splits
    for split_name, split in zip((task.train_split, task.val_split), (train, val)):
        if task.kind == "regression" and len(split["y"]) < 2:
            raise ConfigError(
                f"Split {split_name!r} of {data_path} has fewer than 2 images with a target "
                f"({task.target!r}) for task {task.name!r}."
            )
        if task.kind != "regression" and len(np.unique(split["y"])) < 2:
            raise ConfigError(
                f"Split {split_name!r} of {data_path} lacks classes of task {task.name!r} ({describe_classes(task)})."
            )
    mask = low_shot_mask(train, fraction, seed, task.kind)
    train = {k: v[mask] for k, v in train.items()}
    if protocol == "knn":
        val_p, test_p, info = knn_protocol(
            train,
            val,
            test,
            k=int(options.get("k", 20)),
            temperature=float(options.get("temperature", 0.07)),
            kind=task.kind,
            num_classes=task.num_classes,
        )
    else:
        val_p, test_p, info = linear_protocol(train, val, test, seed=seed, kind=task.kind, num_classes=task.num_classes)
    info.update(num_train_images=int(mask.sum()), num_train_patients=int(len(np.unique(train["patient_id"]))))
    return val_p, test_p, info


# ─── Metrics with confidence intervals ───────────────────────────────────────────────────────────


def check_task_data(task: TaskSpec, data_path: str, *, min_test_units_per_class: int = 2) -> list[str]:
    """Problems that would stop or void `task` on `data_path`, found from the records alone (no image is
    decoded, nothing is trained): missing splits; units whose images disagree on the label (e.g. a
    patient's left and right knee graded differently with unit="patient": use unit="side"); classes
    missing from a split; too few test units. Returns plain sentences, [] when the task can run."""
    problems: list[str] = []
    info = records.read_info(data_path)
    where = f"task {task.name!r} ({data_path})"
    for split in (task.train_split, task.val_split, task.test_split):
        if split not in info.get("splits", {}):
            problems.append(f"{where}: the dataset has no split {split!r} (it has {sorted(info.get('splits', {}))}).")
    if problems:
        return problems
    for split in (task.train_split, task.val_split, task.test_split):
        index = records.split_index(data_path, split)
        ids = np.asarray(index["image_id"]).astype(str)
        cols = record_columns(data_path, split, ids, task.target if task.kind == "regression" else "")
        y = task.targets(np.asarray(index["label"]), cols.get("value"))
        keep = np.isfinite(y) if task.kind == "regression" else y >= 0
        if not keep.any():
            problems.append(f"{where}: split {split!r} has no image of the task ({describe_classes(task)}).")
            continue
        pred = Prediction(
            y_true=y[keep],
            y_score=np.zeros(int(keep.sum())),
            patient_id=np.asarray(index["patient_id"]).astype(str)[keep],
            study_id=cols["study_id"][keep],
            image_id=ids[keep],
            fields={k: v[keep] for k, v in cols.items() if k not in ("study_id", "value")},
        )
        try:
            units, unit_y, _, _ = unit_level(pred, task)
        except ValueError as e:  # labels that differ within a unit
            problems.append(
                f"{where}, split {split!r}, unit {task.unit!r}: {e} Choose the unit the label belongs to "
                "(e.g. unit='side' for one grade per knee) - the bootstrap still resamples patients."
            )
            continue
        if task.kind == "regression":
            if len(units) < 2:
                problems.append(f"{where}: split {split!r} has {len(units)} {task.unit} with a target; need >= 2.")
            continue
        counts = np.bincount(unit_y.astype(np.int64), minlength=task.num_classes)
        missing = [task.names[k] for k in range(task.num_classes) if counts[k] == 0]
        if split == task.test_split:
            few = [
                f"{task.names[k]} ({counts[k]})"
                for k in range(task.num_classes)
                if counts[k] < min_test_units_per_class
            ]
            if few:
                problems.append(
                    f"{where}: the test split has fewer than {min_test_units_per_class} {task.unit} units of "
                    f"class(es) {', '.join(few)}; no metric of that class can be estimated."
                )
        elif missing:
            problems.append(f"{where}: split {split!r} has no {task.unit} of class(es) {', '.join(missing)}.")
    return problems


def describe_classes(task: TaskSpec) -> str:
    if task.kind == "binary":
        return f"positive labels {task.positive_labels}, negative labels {task.negative_labels}"
    if task.kind == "regression":
        return f"target {task.target!r}"
    return ", ".join(f"{n} = labels {c}" for n, c in zip(task.names, task.classes))


def unit_level(pred: Prediction, task: TaskSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(unit ids, labels, scores, cluster of each unit) at the task's unit (image probabilities or
    predictions aggregated by mean/max); the cluster is the bootstrap's resampling unit (patient by default)."""
    clusters = pred.units(task.cluster)
    if task.unit == "image":
        return pred.image_id, pred.y_true, pred.y_score, clusters
    units = pred.units(task.unit)
    ids, y, s = aggregation.aggregate(units, pred.y_true, pred.y_score, how=task.aggregate)
    cluster_of = dict(zip(units.tolist(), clusters.tolist()))
    return ids, y, s, np.asarray([cluster_of[i] for i in ids.tolist()])


def metric_function(task: TaskSpec) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """The dict-valued metric of a non-binary task's kind (multiclass, ordinal, regression)."""
    if task.kind == "regression":
        return metrics_lib.regression_metrics
    return metrics_lib.ordinal_metrics if task.kind == "ordinal" else metrics_lib.multiclass_metrics


def primary_metric_fn(task: TaskSpec) -> Callable[[np.ndarray, np.ndarray], float]:
    """The scalar metric paired comparisons use: AUROC, macro AUROC, QWK or MAE."""
    key = PRIMARY_METRIC[task.kind]
    if task.kind == "binary":
        return metrics_lib.auroc
    fn = metric_function(task)
    return lambda y, s: fn(y, s)[key]


OPERATING_POINT_METRICS = ("kappa", "sensitivity", "specificity", "accuracy")


def unit_field(pred: Prediction, task: TaskSpec, field: str) -> np.ndarray:
    """The value of a record field for each unit of `unit_level` (its first image's)."""
    units = pred.units(task.unit)
    values = pred.field(field)
    first = {}
    for u, v in zip(units.tolist(), values.tolist()):
        first.setdefault(u, v)
    ids = units if task.unit == "image" else np.unique(units)
    return np.asarray([first[u] for u in ids.tolist()], dtype=str)


def operating_points(
    test: Prediction, task: TaskSpec, points: list[tuple[str, float | None]], *, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Kappa, sensitivity, specificity and accuracy at each (label, threshold) — a unit is called positive
    when its aggregated probability is >= the threshold — overall and per `task.group_by` value
    (MURA: per body part), each with a patient-bootstrap 95% CI."""
    ids, y, s, groups = unit_level(test, task)
    by = unit_field(test, task, task.group_by) if task.group_by else None
    out = []
    for label, t in points:

        def fn(yy, ss, t=t):
            m = binary_metrics(yy, ss, threshold=t)
            return {k: m[k] for k in OPERATING_POINT_METRICS}

        entry = {
            "label": label,
            "threshold": t,
            "overall": statistics.bootstrap_metrics(fn, y, s, groups, n_boot=n_boot, seed=seed),
            "n": int(len(ids)),
            "by_group": {},
        }
        if by is not None:
            for value in sorted(set(by.tolist())):
                keep = by == value
                entry["by_group"][value] = {
                    "n": int(keep.sum()),
                    **statistics.bootstrap_metrics(fn, y[keep], s[keep], groups[keep], n_boot=n_boot, seed=seed),
                }
        out.append(entry)
    return out


def score_predictions(
    val: Prediction, test: Prediction, task: TaskSpec, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Test metrics at the task's unit with 95% bootstrap CIs over the task's clusters (patients). Binary:
    operating point (Youden) fixed on validation; other kinds: their metrics (`metric_function`)."""
    if task.kind != "binary":
        ids, y, s, groups = unit_level(test, task)
        metrics = statistics.bootstrap_metrics(metric_function(task), y, s, groups, n_boot=n_boot, seed=seed)
        return {
            "metrics": metrics,
            "kind": task.kind,
            "primary_metric": PRIMARY_METRIC[task.kind],
            "class_names": list(task.names) if task.kind != "regression" else [],
            "unit": task.unit,
            "cluster": task.cluster,
            "num_units": int(len(ids)),
            "num_clusters": int(len(np.unique(groups))),
            "num_patients": int(len(np.unique(test.patient_id))),
            "threshold_from": "argmax" if task.kind != "regression" else "none",
        }
    _, vy, vs, _ = unit_level(val, task)
    threshold = binary_metrics(vy, vs)["youden_threshold"] if len(np.unique(vy)) == 2 else None
    if threshold is not None and not np.isfinite(threshold):
        threshold = None
    ids, y, s, groups = unit_level(test, task)
    metrics = statistics.bootstrap_all(y, s, groups, n_boot=n_boot, seed=seed, threshold=threshold)
    extra = {}
    if task.fixed_thresholds or task.group_by:
        points = [(f"fixed {t:g}", t) for t in task.fixed_thresholds]
        points.append(("validation Youden" if threshold is not None else "test Youden", threshold))
        extra["operating_points"] = operating_points(test, task, points, n_boot=n_boot, seed=seed)
    return {
        **extra,
        "metrics": metrics,
        "kind": "binary",
        "primary_metric": "auroc",
        "class_names": list(task.names),
        "unit": task.unit,
        "cluster": task.cluster,
        "num_units": int(len(ids)),
        "num_clusters": int(len(np.unique(groups))),
        "num_patients": int(len(np.unique(test.patient_id))),
        "threshold_from": "validation" if threshold is not None else "test (Youden; validation had one class)",
    }
