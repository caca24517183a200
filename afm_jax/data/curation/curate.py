"""`curate()`: scan -> quality and metadata filters -> dedup -> clustering and balanced selection
(+ retrieval, caps) -> selection files, manifest and report.

`curate(dataset, out_dir, config, embeddings=...)` is what tools/curate.py calls (through
`afm_jax.evaluation.curation_embeddings.curate`, which adds the model for "backbone:<spec>"
embeddings). Each stage only sees what the previous one kept, so every removed image has exactly one primary reason (the first
that applied, in the order quality, metadata, exact, near, embedding duplicate); the manifest also
lists every quality/metadata reason that fired. Timings are kept per stage so the throughput
excludes the embedding computation, as asked.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import time
from collections import Counter
from typing import Any

import ml_collections
import numpy as np

from afm_jax import io
from afm_jax.data import records
from afm_jax.data import selection as selection_lib
from afm_jax.data.curation import clustering, duplicates, quality
from afm_jax.data.curation import config as config_lib
from afm_jax.data.curation import curation_report as report_lib
from afm_jax.data.curation import embeddings as emb_lib
from afm_jax.data.curation import scan as scan_lib
from afm_jax.errors import ConfigError

SELECTION_FILE = "selection.json"
RANDOM_SELECTION_FILE = "selection_random.json"
MANIFEST_FILE = "manifest.csv"
REPORT_FILE = "report.json"


@dataclasses.dataclass
class Curation:
    """The outcome of a run: per-image columns and the summary written to the report."""

    scan: scan_lib.Scan
    reasons: list[list[str]]  # every quality/metadata reason per image
    primary: list[str]  # "" = kept by the filters and dedup; else the removal reason
    duplicate_of: list[str]  # image_id of the kept representative ("" if not a duplicate)
    cross_patient: np.ndarray  # bool: removed as a duplicate of another patient's image
    clusters: list[np.ndarray]  # per level, cluster of every image (-1 = not clustered)
    retrieved: np.ndarray  # bool
    selected: np.ndarray  # bool
    summary: dict[str, Any]
    out_dir: pathlib.Path

    @property
    def selected_ids(self) -> list[str]:
        return [i for i, s in zip(self.scan.image_id, self.selected) if s]


def _target_size(cfg: ml_collections.ConfigDict, n_total: int, n_candidates: int) -> int:
    if int(cfg.selection.target_size) > 0:
        return min(int(cfg.selection.target_size), n_candidates)
    if float(cfg.selection.target_fraction) > 0:
        return min(int(round(float(cfg.selection.target_fraction) * n_total)), n_candidates)
    return n_candidates


def _seed_vectors(cfg: ml_collections.ConfigDict, scan: scan_lib.Scan, vectors: np.ndarray) -> np.ndarray:
    """Embeddings of the retrieval seeds: the ids of `retrieval.seed_ids` and/or images with `seed_label`."""
    rows = set()
    if cfg.retrieval.seed_ids:
        path = pathlib.Path(cfg.retrieval.seed_ids).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"Config key `retrieval.seed_ids` = {str(path)!r}: no such file (a JSON list of "
                "image_ids). Fix it with --config.retrieval.seed_ids=..."
            )
        wanted = set(selection_lib.read_selection(path, key="retrieval.seed_ids"))
        rows |= {i for i, image_id in enumerate(scan.image_id) if image_id in wanted}
        if not rows:
            raise ConfigError(f"None of the {len(wanted)} seed ids in {path} is among the curated images.")
    if int(cfg.retrieval.seed_label) >= 0:
        rows |= set(np.flatnonzero(scan.label == int(cfg.retrieval.seed_label)).tolist())
    return vectors[sorted(rows)]


def curate(
    dataset_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: ml_collections.ConfigDict,
    *,
    embeddings: str = emb_lib.THUMBNAIL,
    embed: emb_lib.Embedder | None = None,
    progress: bool = True,
) -> Curation:
    """Curates the configured split(s) of a dataset into `out_dir` (selection, manifest, report).

    `embeddings`: "thumbnail", a .npz/.npy file, or "backbone:<spec>" computed by `embed` (see
    afm_jax.data.curation.embeddings). With thumbnails the embedding-duplicate stage is skipped (too
    coarse to tell copies from look-alikes).
    """
    config_lib.validate(cfg)
    dataset_dir = records.resolve_dataset_dir(dataset_path)
    splits = config_lib.csv_items(cfg.splits)
    available = records.read_info(dataset_dir)["splits"]
    missing = [s for s in splits if s not in available]
    if missing:
        raise ConfigError(
            f"Config key `splits` = {cfg.splits!r}: dataset {dataset_dir} has no split "
            f"{', '.join(missing)}; it has {', '.join(sorted(available))}."
        )
    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # ─── Scan ────────────────────────────────────────────────────────────────────────────────
    t = time.perf_counter()
    scan = scan_lib.concat(
        [
            scan_lib.scan_split(
                dataset_dir, s, work_size=int(cfg.work_size), threads=int(cfg.threads), progress=progress
            )
            for s in splits
        ]
    )
    timings["scan_s"] = time.perf_counter() - t
    n = len(scan)

    # ─── Embeddings (timed apart: excluded from the curation throughput) ──────────────────────
    t = time.perf_counter()
    vectors = (
        scan.thumbnail
        if embeddings == emb_lib.THUMBNAIL
        else emb_lib.load_embeddings(embeddings, scan.image_id, dataset_dir=dataset_dir, splits=splits, embed=embed)
    )
    timings["embeddings_s"] = time.perf_counter() - t

    # ─── Quality and metadata filters ────────────────────────────────────────────────────────
    t = time.perf_counter()
    meta_filter = quality.MetadataFilter(cfg.metadata.allow, cfg.metadata.deny)
    reasons = []
    for i in range(n):
        signals = {k: scan.signals[k][i] for k in quality.SIGNAL_NAMES}
        reasons.append(quality.quality_reasons(signals, cfg.quality) + meta_filter.reasons(scan.metadata[i]))
    primary = [r[0] if r else "" for r in reasons]
    timings["filters_s"] = time.perf_counter() - t

    # ─── Duplicates: exact, then perceptual, then embedding, each on the survivors ────────────
    t = time.perf_counter()
    patients = np.asarray(scan.patient_id)
    rank = duplicates.representative_order(
        scan.signals["height"] * scan.signals["width"], scan.signals["dynamic_range"], scan.image_id
    )
    duplicate_of = [""] * n
    cross = np.zeros(n, bool)
    dup_groups: dict[str, list[dict]] = {}
    scope = cfg.duplicates.scope
    stages = [("exact_duplicate", lambda c: duplicates.exact_pairs([scan.pixel_hash[i] for i in c]))]
    if int(cfg.duplicates.phash_max_distance) >= 0:
        stages.append(
            (
                "near_duplicate",
                lambda c: duplicates.hamming_pairs(
                    scan.phash[c], int(cfg.duplicates.phash_max_distance), progress=progress
                ),
            )
        )
    if 0.0 < float(cfg.duplicates.embedding_min_cosine) <= 1.0 and embeddings != emb_lib.THUMBNAIL:
        stages.append(
            (
                "embedding_duplicate",
                lambda c: duplicates.cosine_pairs(
                    vectors[c], float(cfg.duplicates.embedding_min_cosine), progress=progress
                ),
            )
        )
    for reason, find_pairs in stages:
        candidates = np.flatnonzero(np.asarray(primary) == "")
        removed, kept_by, groups = duplicates.dedup(candidates, find_pairs(candidates), patients, rank, scope)
        for i, k in zip(removed, kept_by):
            primary[i], duplicate_of[i] = reason, scan.image_id[k]
            cross[i] = patients[i] != patients[k]
        dup_groups[reason] = groups
    timings["duplicates_s"] = time.perf_counter() - t

    # ─── Clustering, retrieval, balanced selection with caps ─────────────────────────────────
    t = time.perf_counter()
    candidates = np.flatnonzero(np.asarray(primary) == "")
    if len(candidates) == 0:
        raise ConfigError(
            "Every image was removed by the filters or dedup; loosen the thresholds "
            "(see the counts per reason in the log) and run again."
        )
    cl = cfg.clustering
    levels, centroids = clustering.hierarchical_kmeans(
        vectors[candidates],
        tuple(int(k) for k in cl.levels),
        niter=int(cl.niter),
        seed=int(cl.seed),
        min_points_per_cluster=int(cl.min_points_per_cluster),
    )
    distance = clustering.distance_to_centroid(vectors[candidates], levels[0], centroids[0])
    order = clustering.balanced_order(
        levels, seed=int(cfg.selection.seed), within=cfg.selection.within_cluster, distance=distance
    )
    seeds = _seed_vectors(cfg, scan, vectors)
    retrieved_local = clustering.retrieve(
        vectors[candidates], seeds, neighbours=int(cfg.retrieval.neighbours), min_cosine=float(cfg.retrieval.min_cosine)
    )
    target = _target_size(cfg, n, len(candidates))
    retrieved_local = retrieved_local[: int(float(cfg.retrieval.max_fraction) * target)]
    chosen = clustering.take(
        order,
        target,
        patients=patients[candidates],
        max_per_patient=int(cfg.selection.max_per_patient),
        first=retrieved_local,
    )
    selected = np.zeros(n, bool)
    selected[candidates[chosen]] = True
    retrieved = np.zeros(n, bool)
    retrieved[candidates[retrieved_local]] = True
    cluster_columns = []
    for labels in levels:
        column = np.full(n, -1, np.int64)
        column[candidates] = labels
        cluster_columns.append(column)
    timings["selection_s"] = time.perf_counter() - t

    # ─── Outputs ─────────────────────────────────────────────────────────────────────────────
    t = time.perf_counter()
    selected_ids = [scan.image_id[i] for i in np.flatnonzero(selected)]
    selection_lib.write_selection(out / SELECTION_FILE, selected_ids)
    if cfg.selection.random_baseline:
        selection_lib.write_selection(
            out / RANDOM_SELECTION_FILE,
            selection_lib.random_subset(scan.image_id, len(selected_ids), seed=int(cfg.selection.seed)),
        )
    result = Curation(
        scan=scan,
        reasons=reasons,
        primary=primary,
        duplicate_of=duplicate_of,
        cross_patient=cross,
        clusters=cluster_columns,
        retrieved=retrieved,
        selected=selected,
        summary={},
        out_dir=out,
    )
    _write_manifest(out / MANIFEST_FILE, result)
    timings["write_s"] = time.perf_counter() - t
    result.summary = _summary(result, cfg, dataset_dir, splits, embeddings, dup_groups, timings, target)
    t = time.perf_counter()
    report_lib.write_report(result, cfg, dataset_dir, progress=progress)
    timings["report_s"] = time.perf_counter() - t
    curation_s = sum(v for k, v in timings.items() if k != "embeddings_s")
    result.summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    result.summary["images_per_s"] = round(n / max(curation_s, 1e-9), 2)
    io.write_text(out / REPORT_FILE, json.dumps(result.summary, indent=2))
    return result


def _summary(
    result: Curation,
    cfg: ml_collections.ConfigDict,
    dataset_dir: pathlib.Path,
    splits: list[str],
    embeddings: str,
    dup_groups: dict[str, list[dict]],
    timings: dict[str, float],
    target: int,
) -> dict:
    scan, n = result.scan, len(result.scan)
    removed = Counter(p for p in result.primary if p)
    fired = Counter(r for rs in result.reasons for r in rs)
    kept = n - sum(removed.values())

    def sizes(level: int, mask: np.ndarray) -> dict[str, int]:
        labels = result.clusters[level][mask & (result.clusters[level] >= 0)]
        return {str(k): int(v) for k, v in sorted(Counter(labels.tolist()).items())}

    every = np.ones(n, bool)
    levels = [
        {
            "level": lvl,
            "clusters": len(sizes(lvl, every)),
            "before": sizes(lvl, every),
            "after": sizes(lvl, result.selected),
        }
        for lvl in range(len(result.clusters))
    ]
    return {
        "dataset": str(dataset_dir),
        "splits": splits,
        "embeddings": embeddings if embeddings == emb_lib.THUMBNAIL else os.path.basename(embeddings),
        "images": n,
        "patients": len(set(scan.patient_id)),
        "removed_by_reason": dict(sorted(removed.items(), key=lambda kv: -kv[1])),
        "reasons_fired": dict(sorted(fired.items(), key=lambda kv: -kv[1])),
        "kept_after_filters_and_dedup": kept,
        "target_size": target,
        "selected": int(result.selected.sum()),
        "selected_patients": len({p for p, s in zip(scan.patient_id, result.selected) if s}),
        "retrieved": int(result.retrieved.sum()),
        "retrieved_selected": int((result.retrieved & result.selected).sum()),
        "duplicate_groups": {
            reason: {
                "groups": len(g),
                "cross_patient_groups": sum(x["cross_patient"] for x in g),
                "removed": sum(x["size"] - 1 for x in g),
            }
            for reason, g in dup_groups.items()
        },
        "cluster_levels": levels,
        "files": {
            "selection": SELECTION_FILE,
            "random_selection": RANDOM_SELECTION_FILE if cfg.selection.random_baseline else None,
            "manifest": MANIFEST_FILE,
            "report": report_lib.MARKDOWN_FILE,
            "contact_sheets": report_lib.SHEETS_DIR,
        },
        "config": json.loads(cfg.to_json_best_effort()),
    }


def _write_manifest(path: pathlib.Path, result: Curation) -> None:
    """One CSV row per image: ids (hashed), metadata, every signal, reasons, duplicate, clusters, selection."""
    scan = result.scan
    meta_keys = sorted({k for m in scan.metadata for k in m})
    header = (
        [
            "split",
            "index",
            "image_id",
            "patient_id",
            "label",
            *meta_keys,
            *quality.SIGNAL_NAMES,
            "reasons",
            "removed_for",
            "duplicate_of",
            "duplicate_cross_patient",
        ]
        + [f"cluster_l{lvl}" for lvl in range(len(result.clusters))]
        + ["retrieved", "selected"]
    )
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(len(scan)):
            writer.writerow(
                [
                    scan.split[i],
                    int(scan.index[i]),
                    scan.image_id[i],
                    scan.patient_id[i],
                    int(scan.label[i]),
                    *(scan.metadata[i].get(k, "") for k in meta_keys),
                    *(f"{scan.signals[k][i]:.5g}" for k in quality.SIGNAL_NAMES),
                    ";".join(result.reasons[i]),
                    result.primary[i],
                    result.duplicate_of[i],
                    int(result.cross_patient[i]),
                    *(int(c[i]) for c in result.clusters),
                    int(result.retrieved[i]),
                    int(result.selected[i]),
                ]
            )
