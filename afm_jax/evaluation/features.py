"""Frozen-backbone features for one dataset split (the input of kNN and linear probes)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from afm_jax.data import pipeline


def extract_features(encoder: nnx.Module, data_cfg: ml_collections.ConfigDict, *, split: str, image_size: int,
                     batch_size: int = 64, pool: str = "avg", progress: bool = True) -> dict[str, np.ndarray]:
    """Runs `encoder.pooled_features` over every image of `split` once, in dataset order.

    Returns {"features": (N, D) float32, "label": (N,), "patient_id": (N,) str}.
    """
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def features_of(state, images):
        return nnx.merge(graphdef, state).pooled_features(images, pool=pool)

    feats, labels, patients = [], [], []
    batches = pipeline.build_eval_iterator(data_cfg, split=split, batch_size=batch_size, image_size=image_size)
    for batch in tqdm(batches, desc=f"features[{split}]", disable=not progress, leave=False):
        keep = np.asarray(batch["mask"], bool)
        feats.append(np.asarray(features_of(state, batch["image"]), np.float32)[keep])
        labels.append(np.asarray(batch["label"])[keep])
        patients.append(np.asarray(batch["patient_id"])[keep])
    return {"features": np.concatenate(feats), "label": np.concatenate(labels),
            "patient_id": np.concatenate(patients)}
