"""Resume compatibility: a checkpoint continues only the run that made it.

What: `resume_record(config)` is what a checkpoint's meta records about the run — the config values
that must not change on resume (task, model architecture, image size, global batch, seed, split and
selection, the dataset's content fingerprint) — and `check_resume(saved_meta, config)` compares it with
the current run. A difference in one of those stops with a message listing each difference and how to
start a new workdir; any other config difference (more total steps, another learning rate after a
divergence, more workers) is safe, and is returned as notes the trainer logs.

Why: without it a resume on another preprocessing variant is accepted silently (the iterator restarts
in the middle of a different dataset), and a changed architecture ends in orbax's raw shape error.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from afm_jax import configuration
from afm_jax.data import records
from afm_jax.errors import ConfigError

RECORD_VERSION = 1
# Model keys that change nothing the checkpoint holds (regularisation, precision, memory layout).
SAFE_MODEL_KEYS = ("drop_path_rate", "dtype", "remat")


def dataset_fingerprint(path: str) -> str | None:
    """The dataset's content fingerprint (sha256 over its records), None when it has none."""
    try:
        return records.read_info(path).get("content_fingerprint")
    except (OSError, ValueError):
        return None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, (dict, ml_collections.ConfigDict)):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = list(tree) if isinstance(tree, tuple) else tree
    return out


def resume_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted key: value} of what must stay the same for a resume to continue this run."""
    model = {f"model.{k}": v for k, v in _flat(configuration.to_json(config.model)).items() if k not in SAFE_MODEL_KEYS}
    data = config.data
    return {
        "version": RECORD_VERSION,
        "task": config.task,
        **model,
        "image_size": int(config.image_size),
        "batch_size": int(config.batch_size),
        "seed": int(config.seed),
        "data.train_split": data.train_split,
        "data.selection": data.get("selection"),
        "dataset_fingerprint": dataset_fingerprint(data.path),
        "data.path": data.path,
    }


def check_resume(saved_meta: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Raises ConfigError listing every must-not-change difference between the checkpoint and this run;
    returns notes on the safe differences (to log). Checkpoints without a record (older code): a note."""
    saved = saved_meta.get("resume")
    if not isinstance(saved, dict):
        return ["the checkpoint has no resume record (written by older code): config compatibility not checked"]
    now = resume_record(config)
    differences = []
    for key, value in now.items():
        if key in ("version", "data.path"):
            continue
        if key == "dataset_fingerprint" and (value is None or saved.get(key) is None):
            continue
        if saved.get(key) != value:
            differences.append(f"`{key}`: checkpoint {saved.get(key)!r}, now {value!r}")
    notes = []
    same_data = (
        saved.get("dataset_fingerprint") is not None and saved.get("dataset_fingerprint") == now["dataset_fingerprint"]
    )
    if saved.get("data.path") != now["data.path"]:
        if same_data:
            notes.append(f"data.path moved from {saved.get('data.path')!r} to {now['data.path']!r} (same records)")
        elif not any(d.startswith("`dataset_fingerprint`") for d in differences):
            differences.append(f"`data.path`: checkpoint {saved.get('data.path')!r}, now {now['data.path']!r}")
    if differences:
        raise ConfigError(
            "Cannot resume: this run differs from the one that wrote the checkpoint in what must not change: "
            + "; ".join(differences)
            + ". Rerun with the checkpoint's values (its config is in "
            "checkpoints/<step>/meta), or give a new --workdir to start a new run with these settings."
        )
    old = _flat(saved_meta.get("config") or {})
    current = _flat(configuration.to_json(config))
    changed = sorted(k for k, v in current.items() if k in old and old[k] != v and k != "data.path")
    if changed:
        notes.append(
            "config changed since the checkpoint (safe to resume): "
            + ", ".join(f"{k} {old[k]!r} -> {current[k]!r}" for k in changed)
        )
    return notes
