"""Selection files: a subset of a dataset's images, in the one format every reader uses.

A selection is a JSON list of image_id strings (`--config.data.selection=<file>`), written by the
curation (tools/curate.py) or a low-shot protocol and read by `records.open_split(..., selection=...)`,
which serves only those records, in dataset order. Ids of other splits are ignored by a split that
lacks them, so one file can cover several splits. The file holds ids only (salted hashes, no PHI).
`read_selection` is the one reader (missing file, wrong content: UserErrors naming the config key).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from afm_jax import io
from afm_jax.errors import ConfigError, DatasetNotFoundError


def write_selection(path: str | os.PathLike, image_ids: Sequence[str]) -> pathlib.Path:
    """Writes `image_ids` (order kept, repeats dropped) as a selection file, atomically; returns its path."""
    ids = list(dict.fromkeys(str(i) for i in image_ids))
    if not ids:
        raise ConfigError(
            "A selection must name at least one image; the curation kept none — loosen the "
            "thresholds (see the report's removal counts)."
        )
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(path, json.dumps(ids, indent=0))
    return path


def read_selection(path: str | os.PathLike, key: str = "data.selection") -> list[str]:
    """The image ids of a selection file. DatasetNotFoundError if it does not exist, ConfigError if it is
    not a JSON list of strings; both name the config `key` the path came from."""
    sel_path = pathlib.Path(path).expanduser()
    if not sel_path.is_file():
        raise DatasetNotFoundError(
            f"Selection file {sel_path} does not exist (config key `{key}`). "
            "Make one with tools/curate.py or unset the key."
        )
    try:
        ids = json.loads(sel_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"Selection file {sel_path} (config key `{key}`) is not JSON ({e}); it must hold a "
            "JSON list of image_id strings."
        ) from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConfigError(f"Selection file {sel_path} must hold a JSON list of image_id strings.")
    return ids


def random_subset(image_ids: Sequence[str], size: int, *, seed: int = 0) -> list[str]:
    """A uniform random subset of `size` ids (the ablation's baseline: same size, no curation), in input order."""
    if not 0 <= size <= len(image_ids):
        raise ValueError(f"Cannot draw {size} of {len(image_ids)} images.")
    keep = np.sort(np.random.default_rng(seed).choice(len(image_ids), size=size, replace=False))
    return [image_ids[i] for i in keep]
