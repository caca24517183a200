"""Frozen-encoder features of one dataset split: the input of kNN and linear probes and of monitors.

What: `extract_features` runs `encoder.pooled_features` (jitted once per encoder structure) over a
split through `data.pipeline.map_split`, the one evaluation loop of the project, and returns the
features with labels and ids. Evaluation backbones that are not Flax encoders (timm in PyTorch) go
through `map_split` with their own function (see `protocols.extract_split`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from afm_jax.data import pipeline


def pooled_features_fn(encoder: nnx.Module, pool: str = "avg"):
    """A host function images -> (B, D) float32 features of `encoder` (jitted)."""
    graphdef, state = nnx.split(encoder)
    jitted = jax.jit(lambda st, x: nnx.merge(graphdef, st).pooled_features(x, pool=pool))
    return lambda images: np.asarray(jitted(state, images), np.float32)


def extract_features(
    encoder: nnx.Module,
    data_cfg,
    *,
    split: str,
    image_size: int,
    batch_size: int = 64,
    pool: str = "avg",
    progress: bool = True,
    limit: int | None = None,
    keys: Sequence[str] = ("label", "patient_id", "image_id"),
) -> dict[str, np.ndarray]:
    """`encoder`'s pooled features of every image of `split` (or its first `limit`), in dataset order.

    Returns {"features": (N, D) float32, and one (N,) array per key in `keys`}; ids are str.
    """
    out = pipeline.map_split(
        pooled_features_fn(encoder, pool),
        data_cfg,
        split=split,
        batch_size=batch_size,
        image_size=image_size,
        keys=keys,
        limit=limit,
        progress=progress,
        desc=f"features[{split}]",
    )
    out["features"] = out.pop("output")
    for k in ("patient_id", "image_id"):
        if k in out:
            out[k] = out[k].astype(str)
    return out
