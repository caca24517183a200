"""Selection files: the subset a curation chose, in the one format the input pipeline reads.

A selection is a JSON list of image_id strings (`--config.data.selection=<file>`; read by
`records.open_split(..., selection=...)`, which serves only those records, in dataset order). Ids of
other splits are ignored by a split that lacks them, so one file can cover several splits. The
file holds ids only (salted hashes, no PHI); how it was made is in the report beside it.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np


def write_selection(path: str | os.PathLike, image_ids: Sequence[str]) -> pathlib.Path:
    """Writes `image_ids` (order kept, repeats dropped) as a selection file; returns its path."""
    ids = list(dict.fromkeys(str(i) for i in image_ids))
    if not ids:
        raise ValueError("A selection must name at least one image; the curation kept none — loosen the "
                         "thresholds (see the report's removal counts).")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(ids, indent=0))
    tmp.replace(path)
    return path


def read_selection(path: str | os.PathLike) -> list[str]:
    """The image ids of a selection file (validated like the input pipeline does)."""
    ids = json.loads(pathlib.Path(path).read_text())
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"Selection file {path} must hold a JSON list of image_id strings.")
    return ids


def random_subset(image_ids: Sequence[str], size: int, *, seed: int = 0) -> list[str]:
    """A uniform random subset of `size` ids (the ablation's baseline: same size, no curation), in input order."""
    if not 0 <= size <= len(image_ids):
        raise ValueError(f"Cannot draw {size} of {len(image_ids)} images.")
    keep = np.sort(np.random.default_rng(seed).choice(len(image_ids), size=size, replace=False))
    return [image_ids[i] for i in keep]
