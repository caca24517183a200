"""AFF vs NFF linear probe on frozen features: the demo's (and the users' first) downstream check.

Images of fractured femurs only (label nff=1 or aff=2; normals are left out); AFF is the positive
class. The probe is fitted on the train split, its strength chosen on validation, and AUROC reported
on the held-out test patients (splits are by patient).
"""

from __future__ import annotations

import ml_collections
import numpy as np
from flax import nnx
from sklearn.metrics import roc_auc_score

from afm_jax.evaluation.features import extract_features
from afm_jax.evaluation.linear import fit_linear_probe

NFF_LABEL, AFF_LABEL = 1, 2


def _fracture_subset(split: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(split["label"], (NFF_LABEL, AFF_LABEL))
    return split["features"][keep], (split["label"][keep] == AFF_LABEL).astype(np.int64)


def aff_vs_nff_probe(encoder: nnx.Module, data_cfg: ml_collections.ConfigDict, *, image_size: int,
                     pool: str = "avg", batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Test-split AUROC of a linear probe for AFF vs NFF on `encoder`'s frozen features."""
    splits = {name: _fracture_subset(extract_features(encoder, data_cfg, split=name, image_size=image_size,
                                                      batch_size=batch_size, pool=pool))
              for name in ("train", "validation", "test")}
    probe = fit_linear_probe(*splits["train"], *splits["validation"], seed=seed)
    test_x, test_y = splits["test"]
    return {"auroc": float(roc_auc_score(test_y, probe.predict_proba(test_x))), "C": probe.C,
            "validation_auroc": probe.validation_auroc, "num_test_images": int(len(test_y))}
