"""Linear probe: L2-regularised logistic regression on frozen features, strength chosen on validation."""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

DEFAULT_C_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclasses.dataclass
class LinearProbe:
    classifier: object
    C: float
    validation_auroc: float

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of the positive class (binary)."""
        return self.classifier.predict_proba(features)[:, 1]


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                     c_grid: tuple[float, ...] = DEFAULT_C_GRID, seed: int = 0) -> LinearProbe:
    """Fits standardise + logistic regression for each C, keeps the best validation AUROC (binary labels)."""
    for name, y in (("training", train_y), ("validation", val_y)):
        if len(np.unique(y)) < 2:
            raise ValueError(f"The {name} split has only one class ({np.unique(y)}); a probe needs both. "
                             "Use more patients or another split.")
    best: LinearProbe | None = None
    for c in c_grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
        clf.fit(train_x, train_y)
        auroc = roc_auc_score(val_y, clf.predict_proba(val_x)[:, 1])
        if best is None or auroc > best.validation_auroc:
            best = LinearProbe(clf, c, float(auroc))
    return best
