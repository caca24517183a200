"""Where the curation's image embeddings come from — one small entry point, `load_embeddings`.

Sources (the `--embeddings` value of tools/curate.py):

- "thumbnail" (default): a model-free baseline computed during the quality pass — each image
  area-downsampled to 16x16 and standardised (zero mean, unit norm). It groups images by global
  appearance (view, exposure, framing); good enough to balance a demo, no substitute for a backbone.
- a ".npz" file with arrays `embeddings` (N, D) and `image_id` (N,) — e.g. written by
  `save_embeddings` from `encoder_embeddings` (any of our checkpoints or a timm model loaded as an
  nnx encoder), or by any other tool;
- a ".npy" file (N, D) with its ids in a JSON list beside it: "<stem>.ids.json".

Rows are matched to the dataset by image_id; missing ids are an error (a stale file is the usual
cause). To add a source (e.g. a checkpoint read through afm_jax.interop), add a branch here.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import cv2
import numpy as np

from afm_jax.configuration import ConfigError

THUMBNAIL = "thumbnail"
THUMB_SIDE = 16


def thumbnail_embedding(small: np.ndarray) -> np.ndarray:
    """(256,) float32: the image at 16x16 (area), mean removed, unit L2 norm."""
    thumb = cv2.resize(np.asarray(small, np.float32), (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).ravel()
    thumb = thumb - thumb.mean()
    return (thumb / max(float(np.linalg.norm(thumb)), 1e-6)).astype(np.float32)


def load_embeddings(source: str, image_ids: Sequence[str]) -> np.ndarray:
    """(len(image_ids), D) float32 embeddings from a file `source` (.npz or .npy + .ids.json), in
    the order of `image_ids`. ("thumbnail" is computed by the quality pass, not here.)"""
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"Embeddings file {path} does not exist. Pass --embeddings=thumbnail, a .npz with "
                          "`embeddings` and `image_id` arrays, or a .npy with <stem>.ids.json beside it.")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "embeddings" not in data or "image_id" not in data:
                raise ConfigError(f"{path} must hold arrays `embeddings` (N, D) and `image_id` (N,); it has "
                                  f"{sorted(data.files)}.")
            emb, ids = np.asarray(data["embeddings"]), [str(i) for i in data["image_id"]]
    elif path.suffix == ".npy":
        ids_file = path.with_suffix(".ids.json")
        if not ids_file.is_file():
            raise ConfigError(f"{path} needs its image ids as a JSON list in {ids_file}.")
        emb, ids = np.load(path, allow_pickle=False), [str(i) for i in json.loads(ids_file.read_text())]
    else:
        raise ConfigError(f"Embeddings file {path} must be .npz or .npy (got {path.suffix!r}).")
    if emb.ndim != 2 or len(emb) != len(ids):
        raise ConfigError(f"{path}: embeddings of shape {emb.shape} do not match {len(ids)} image ids.")
    row = {image_id: i for i, image_id in enumerate(ids)}
    missing = [i for i in image_ids if i not in row]
    if missing:
        raise ConfigError(f"{path} has no embedding for {len(missing)} of the {len(image_ids)} images being "
                          f"curated (e.g. {missing[0]}); recompute it for this dataset.")
    return np.asarray(emb[[row[i] for i in image_ids]], np.float32)


def save_embeddings(path: str | os.PathLike, embeddings: np.ndarray, image_ids: Sequence[str]) -> pathlib.Path:
    """Writes the .npz that `load_embeddings` reads."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, embeddings=np.asarray(embeddings, np.float32), image_id=np.asarray(list(image_ids), dtype=str))
    return path


def encoder_embeddings(encoder, dataset_path: str | os.PathLike, split: str, *, image_size: int,
                       batch_size: int = 64, pool: str = "avg", num_workers: int = 0) -> tuple[np.ndarray, list[str]]:
    """Frozen-encoder embeddings of every image of `split` (evaluation's `extract_features`: resize,
    no augmentation) and their image ids, in dataset order. `encoder` is any nnx module with
    `pooled_features(images, pool=...)` — our ViT, or a timm backbone converted by afm_jax.interop."""
    from afm_jax.data import pipeline, records  # pylint: disable=g-import-not-at-top
    from afm_jax.evaluation.features import extract_features  # pylint: disable=g-import-not-at-top

    data_cfg = pipeline.default_data_config()
    data_cfg.path, data_cfg.num_workers = os.fspath(dataset_path), num_workers
    feats = extract_features(encoder, data_cfg, split=split, image_size=image_size, batch_size=batch_size,
                             pool=pool)
    ids = records.split_index(dataset_path, split)["image_id"]  # eval order is dataset order
    if len(ids) != len(feats["features"]):
        raise RuntimeError(f"{len(feats['features'])} features for {len(ids)} images of split {split!r}.")
    return feats["features"], list(ids)
