"""Where the curation's image embeddings come from — one small entry point, `load_embeddings`.

Sources (the `--embeddings` value of tools/curate.py):

- "thumbnail" (default): a model-free baseline computed during the quality pass — each image
  area-downsampled to 16x16 and standardised (zero mean, unit norm). It groups images by global
  appearance (view, exposure, framing); good enough to balance a demo, no substitute for a backbone.
- a ".npz" file with arrays `embeddings` (N, D) and `image_id` (N,) — e.g. written by
  `save_embeddings` from `afm_jax.evaluation.curation_embeddings.encoder_embeddings` (any of our
  checkpoints or a timm model loaded as an nnx encoder), or by any other tool;
- a ".npy" file (N, D) with its ids in a JSON list beside it: "<stem>.ids.json";
- "backbone:<spec>": computed now by a model. Models live in higher layers than data, so the caller
  injects the function that computes them (`embed`, an `Embedder`);
  `afm_jax.evaluation.curation_embeddings` passes any evaluation backbone, e.g.
  `backbone:checkpoint:runs/mae_vitb,image_size=224` (one of our runs; a DINO run's teacher),
  `backbone:timm_vit:dinov2_vits14.pth,variant=S/14` or `backbone:resnet50:radimagenet_r50.pth`.

Rows are matched to the dataset by image_id; missing ids are an error (a stale file is the usual
cause). To add a source, add a branch to `load_embeddings`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from afm_jax import io
from afm_jax.errors import ConfigError

THUMBNAIL = "thumbnail"
BACKBONE_PREFIX = "backbone:"
THUMB_SIDE = 16

Embedder = Callable[[str, "str | os.PathLike", Sequence[str]], tuple[np.ndarray, list[str]]]
"""`embed(spec, dataset_dir, splits) -> (embeddings (N, D), image ids (N,))`: computes the embeddings of
every image of `splits` by the model `spec` names (the part of `--embeddings` after "backbone:")."""


def thumbnail_embedding(small: np.ndarray) -> np.ndarray:
    """(256,) float32: the image at 16x16 (area), mean removed, unit L2 norm."""
    thumb = cv2.resize(np.asarray(small, np.float32), (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).ravel()
    thumb = thumb - thumb.mean()
    return (thumb / max(float(np.linalg.norm(thumb)), 1e-6)).astype(np.float32)


def load_embeddings(
    source: str,
    image_ids: Sequence[str],
    *,
    dataset_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = (),
    embed: Embedder | None = None,
) -> np.ndarray:
    """(len(image_ids), D) float32 embeddings in the order of `image_ids`, from a file `source`
    (.npz or .npy + .ids.json) or computed by `embed` ("backbone:<spec>", reading `splits` of
    `dataset_dir`). ("thumbnail" is computed by the quality pass, not here.)"""
    if source.startswith(BACKBONE_PREFIX):
        if dataset_dir is None:
            raise ConfigError(f"--embeddings={source} needs the dataset to compute embeddings from.")
        if embed is None:
            raise ConfigError(
                f"--embeddings={source} needs a model to compute embeddings: run tools/curate.py, or "
                "call afm_jax.evaluation.curation_embeddings.curate, which computes them."
            )
        emb, ids = embed(source[len(BACKBONE_PREFIX) :], dataset_dir, splits)
        return _in_order(emb, ids, image_ids, source)
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"Embeddings file {path} does not exist. Pass --embeddings=thumbnail, a .npz with "
            "`embeddings` and `image_id` arrays, or a .npy with <stem>.ids.json beside it."
        )
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "embeddings" not in data or "image_id" not in data:
                raise ConfigError(
                    f"{path} must hold arrays `embeddings` (N, D) and `image_id` (N,); it has {sorted(data.files)}."
                )
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
        raise ConfigError(
            f"{source} has no embedding for {len(missing)} of the {len(image_ids)} images being "
            f"curated (e.g. {missing[0]}); recompute it for this dataset."
        )
    return np.asarray(emb[[row[i] for i in image_ids]], np.float32)


def save_embeddings(path: str | os.PathLike, embeddings: np.ndarray, image_ids: Sequence[str]) -> pathlib.Path:
    """Writes the .npz that `load_embeddings` reads."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors, ids = np.asarray(embeddings, np.float32), np.asarray(list(image_ids), dtype=str)
    io.write_with(path, lambda tmp: np.savez(tmp, embeddings=vectors, image_id=ids))
    return path
