"""Model embeddings for the data curation: the model side of `--embeddings=backbone:<spec>`.

Why here and not in `afm_jax.data.curation`: the curation is part of the data layer, which must not
import models, training or evaluation. It takes the embedding function as an argument (an
`afm_jax.data.curation.embeddings.Embedder`); this module supplies one that runs any evaluation
backbone (`backbone_embeddings`), plus `curate`, the curation with that function plugged in (what
tools/curate.py calls), and `encoder_embeddings` for an nnx encoder already in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from afm_jax.data import pipeline, records
from afm_jax.data.curation import curate as curate_lib
from afm_jax.data.curation import embeddings as emb_lib
from afm_jax.data.curation.embeddings import BACKBONE_PREFIX, THUMBNAIL, save_embeddings  # noqa: F401  (file format)
from afm_jax.evaluation import backbones, protocols
from afm_jax.evaluation.features import extract_features


def backbone_embeddings(
    spec: str, dataset_dir: str | os.PathLike, splits: Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    """Frozen features of every image of `splits` by the backbone `spec` (`kind:path[,key=value]`,
    as tools/evaluate.py's --backbone), and their image ids. An `Embedder`."""
    backbone = backbones.load_backbone(backbones.parse_backbone_arg(spec))
    parts = [protocols.extract_split(backbone, os.fspath(dataset_dir), split) for split in splits]
    return (
        np.concatenate([p["features"] for p in parts]).astype(np.float32),
        [str(i) for p in parts for i in p["image_id"]],
    )


def load_embeddings(
    source: str, image_ids: Sequence[str], *, dataset_dir: str | os.PathLike | None = None, splits: Sequence[str] = ()
) -> np.ndarray:
    """`afm_jax.data.curation.embeddings.load_embeddings` with "backbone:<spec>" computed by
    `backbone_embeddings`."""
    return emb_lib.load_embeddings(source, image_ids, dataset_dir=dataset_dir, splits=splits, embed=backbone_embeddings)


def curate(
    dataset_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: ml_collections.ConfigDict,
    *,
    embeddings: str = THUMBNAIL,
    progress: bool = True,
) -> curate_lib.Curation:
    """`afm_jax.data.curation.curate.curate` with "backbone:<spec>" embeddings computed by
    `backbone_embeddings` (tools/curate.py's --embeddings)."""
    return curate_lib.curate(
        dataset_path, out_dir, cfg, embeddings=embeddings, embed=backbone_embeddings, progress=progress
    )


def encoder_embeddings(
    encoder,
    dataset_path: str | os.PathLike,
    split: str,
    *,
    image_size: int,
    batch_size: int = 64,
    pool: str = "avg",
    num_workers: int = 0,
) -> tuple[np.ndarray, list[str]]:
    """Frozen-encoder embeddings of every image of `split` (evaluation's `extract_features`: resize,
    no augmentation) and their image ids, in dataset order. `encoder` is any nnx module with
    `pooled_features(images, pool=...)` — our ViT, or a timm backbone converted by afm_jax.interop.
    Save them with `save_embeddings` for `--embeddings=<file>.npz`."""
    data_cfg = pipeline.default_data_config()
    data_cfg.path, data_cfg.num_workers = os.fspath(dataset_path), num_workers
    feats = extract_features(encoder, data_cfg, split=split, image_size=image_size, batch_size=batch_size, pool=pool)
    ids = records.split_index(dataset_path, split)["image_id"]  # eval order is dataset order
    if len(ids) != len(feats["features"]):
        raise RuntimeError(f"{len(feats['features'])} features for {len(ids)} images of split {split!r}.")
    return feats["features"], list(ids)
