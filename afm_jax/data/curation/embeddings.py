"""Where the curation's image embeddings come from — one small entry point, `load_embeddings`.

Sources (the `--embeddings` value of tools/curate.py):

- "thumbnail" (default): a model-free baseline computed during the quality pass — each image
  area-downsampled to 16x16 and standardised (zero mean, unit norm). It groups images by global
  appearance (view, exposure, framing); good enough to balance a demo, no substitute for a backbone.
- a ".npz" file with arrays `embeddings` (N, D) and `image_id` (N,) — e.g. written by
  `save_embeddings` from `encoder_embeddings` (any of our checkpoints or a timm model loaded as an
  nnx encoder), or by any other tool;
- a ".npy" file (N, D) with its ids in a JSON list beside it: "<stem>.ids.json";
- "backbone:<spec>": computed now by any evaluation backbone (afm_jax.evaluation.backbones), e.g.
  `backbone:checkpoint:runs/mae_vitb,image_size=224` (one of our runs; a DINO run's teacher),
  `backbone:timm_vit:dinov2_vits14.pth,variant=S/14` or `backbone:resnet50:radimagenet_r50.pth`.

Rows are matched to the dataset by image_id; missing ids are an error (a stale file is the usual
cause). To add a source, add a branch to `load_embeddings`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import cv2
import numpy as np

from afm_jax.errors import ConfigError

THUMBNAIL = "thumbnail"
BACKBONE_PREFIX = "backbone:"
THUMB_SIDE = 16


def thumbnail_embedding(small: np.ndarray) -> np.ndarray:
    """(256,) float32: the image at 16x16 (area), mean removed, unit L2 norm."""
    thumb = cv2.resize(np.asarray(small, np.float32), (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).ravel()
    thumb = thumb - thumb.mean()
    return (thumb / max(float(np.linalg.norm(thumb)), 1e-6)).astype(np.float32)


def load_embeddings(source: str, image_ids: Sequence[str], *, dataset_dir: str | os.PathLike | None = None,
                    splits: Sequence[str] = ()) -> np.ndarray:
    """(len(image_ids), D) float32 embeddings in the order of `image_ids`, from a file `source`
    (.npz or .npy + .ids.json) or computed by a backbone ("backbone:<spec>", reading `splits` of
    `dataset_dir`). ("thumbnail" is computed by the quality pass, not here.)"""
    if source.startswith(BACKBONE_PREFIX):
        if dataset_dir is None:
            raise ConfigError(f"--embeddings={source} needs the dataset to compute embeddings from.")
        emb, ids = backbone_embeddings(source[len(BACKBONE_PREFIX):], dataset_dir, splits)
        return _in_order(emb, ids, image_ids, source)
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
    return _in_order(emb, ids, image_ids, str(path))


def _in_order(emb: np.ndarray, ids: Sequence[str], image_ids: Sequence[str], source: str) -> np.ndarray:
    row = {image_id: i for i, image_id in enumerate(ids)}
    missing = [i for i in image_ids if i not in row]
    if missing:
        raise ConfigError(f"{source} has no embedding for {len(missing)} of the {len(image_ids)} images being "
                          f"curated (e.g. {missing[0]}); recompute it for this dataset.")
    return np.asarray(emb[[row[i] for i in image_ids]], np.float32)


def backbone_embeddings(spec: str, dataset_dir: str | os.PathLike, splits: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Frozen features of every image of `splits` by the backbone `spec` (`kind:path[,key=value]`,
    as tools/evaluate.py's --backbone), and their image ids."""
    from afm_jax.evaluation import backbones, protocols  # pylint: disable=g-import-not-at-top  (jax; only here)

    backbone = backbones.load_backbone(backbones.parse_backbone_arg(spec))
    parts = [protocols.extract_split(backbone, os.fspath(dataset_dir), split) for split in splits]
    return (np.concatenate([p["features"] for p in parts]).astype(np.float32),
            [str(i) for p in parts for i in p["image_id"]])


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
