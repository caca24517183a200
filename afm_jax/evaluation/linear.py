"""Linear probes on frozen features, regularisation chosen on validation: logistic regression for
two classes (validation AUROC), multinomial logistic regression for several (validation macro
one-vs-rest AUROC), ridge regression on a standardised target for continuous targets (validation MAE)."""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
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


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    c_grid: tuple[float, ...] = DEFAULT_C_GRID,
    seed: int = 0,
) -> LinearProbe:
    """Fits standardise + logistic regression for each C, keeps the best validation AUROC (binary labels)."""
    for name, y in (("training", train_y), ("validation", val_y)):
        if len(np.unique(y)) < 2:
            raise ValueError(
                f"The {name} split has only one class ({np.unique(y)}); a probe needs both. "
                "Use more patients or another split."
            )
    best: LinearProbe | None = None
    for c in c_grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
        clf.fit(train_x, train_y)
        auroc = roc_auc_score(val_y, clf.predict_proba(val_x)[:, 1])
        if best is None or auroc > best.validation_auroc:
            best = LinearProbe(clf, c, float(auroc))
    return best


@dataclasses.dataclass
class MulticlassProbe:
    classifier: object
    C: float
    validation_macro_auroc: float
    num_classes: int

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, num_classes) probabilities, column k = class k (classes absent from training get 0)."""
        p = self.classifier.predict_proba(features)
        out = np.zeros((p.shape[0], self.num_classes))
        out[:, np.asarray(self.classifier.classes_, int)] = p
        return out


def _macro_auroc(y: np.ndarray, p: np.ndarray) -> float:
    scores = [roc_auc_score(y == k, p[:, k]) for k in range(p.shape[1]) if 0 < np.sum(y == k) < y.size]
    return float(np.mean(scores)) if scores else float("nan")


def fit_multiclass_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    num_classes: int,
    c_grid: tuple[float, ...] = DEFAULT_C_GRID,
    seed: int = 0,
) -> MulticlassProbe:
    """Standardise + multinomial logistic regression for each C; keeps the best validation macro AUROC."""
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"The training split has only class {np.unique(train_y)}; a probe needs two or more.")
    best: MulticlassProbe | None = None
    for c in c_grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
        clf.fit(train_x, train_y)
        probe = MulticlassProbe(clf, c, float("nan"), num_classes)
        score = _macro_auroc(np.asarray(val_y), probe.predict_proba(val_x))
        probe.validation_macro_auroc = score
        if best is None or score > best.validation_macro_auroc:
            best = probe
    return best


DEFAULT_ALPHA_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0, 1e4)


@dataclasses.dataclass
class RidgeProbe:
    regressor: object
    alpha: float
    validation_mae: float
    target_mean: float
    target_std: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predictions in the target's own unit (e.g. months)."""
        return self.regressor.predict(features) * self.target_std + self.target_mean


def fit_ridge_probe(
    train_x: np.ndarray,
    train_t: np.ndarray,
    val_x: np.ndarray,
    val_t: np.ndarray,
    *,
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
) -> RidgeProbe:
    """Standardise features + ridge regression on the standardised target for each alpha; keeps the
    lowest validation mean absolute error."""
    t = np.asarray(train_t, np.float64)
    mean, std = float(t.mean()), float(t.std()) or 1.0
    best: RidgeProbe | None = None
    for a in alpha_grid:
        reg = make_pipeline(StandardScaler(), Ridge(alpha=a))
        reg.fit(train_x, (t - mean) / std)
        probe = RidgeProbe(reg, a, float("nan"), mean, std)
        probe.validation_mae = float(np.mean(np.abs(probe.predict(val_x) - np.asarray(val_t, np.float64))))
        if best is None or probe.validation_mae < best.validation_mae:
            best = probe
    return best
