"""Periodic evaluations that watch a pretraining run from the outside (the trainer calls them).

What: `KnnMonitor` is DINO's weighted k-NN classifier (k = 20, T = 0.07; Caron et al. 2021) on the
frozen features of the encoder the task names for monitoring (DINO: the EMA teacher's backbone):
accuracy on the first `max_eval` images of `eval_split`, voting with the first `max_train` images of
`train_split`, unaugmented at `config.image_size`. It also reports the same network at its random
initialisation once (`knn_acc_random_init`), the baseline a collapsing run falls to.

Why here and not in the task: a monitor is evaluation; the trainer (a lower layer) takes it as a
callable, `train.run(config, workdir, monitor=monitor_for(config))`, and never imports this module.
Config: `config.dino.knn` (see `train/tasks/dino.py` for the keys and defaults).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from afm_jax.data import records
from afm_jax.evaluation.features import extract_features
from afm_jax.evaluation.knn import knn_accuracy
from afm_jax.train.tasks.base import Task


class KnnMonitor:
    """`monitor(task, model, extra, step) -> {"knn_acc": ..., "knn_acc_random_init": ...}`."""

    def __init__(self, config: ml_collections.ConfigDict, knn: ml_collections.ConfigDict):
        self.config = config
        self.knn = knn
        self._random_init: float | None = None

    def __call__(self, task: Task, model: nnx.Module, extra: Any, step: int) -> dict[str, float]:
        results = {"knn_acc": self.accuracy(task.monitored_encoder(model, extra))}
        if self.knn.random_init_baseline:
            if self._random_init is None:  # once per process: the same network at its initialisation
                fresh = task.build_model(self.config, nnx.Rngs(self.config.seed))
                self._random_init = self.accuracy(task.encoder_of(fresh))
            results["knn_acc_random_init"] = self._random_init
        return results

    def accuracy(self, encoder: nnx.Module) -> float:
        """kNN accuracy of `encoder`. Classes are `knn.label_key`: the integer `label` (images with -1
        are left out) or a record string field (e.g. "view"), numbered in sorted order."""
        k = self.knn
        train_x, train_y = self._features(encoder, k.train_split, int(k.max_train))
        test_x, test_y = self._features(encoder, k.eval_split, int(k.max_eval))
        if k.label_key != "label":
            classes = {v: i for i, v in enumerate(sorted(set(train_y.tolist()) | set(test_y.tolist())))}
            train_y = np.array([classes[v] for v in train_y], np.int64)
            test_y = np.array([classes[v] for v in test_y], np.int64)
        train_x, train_y = train_x[train_y >= 0], train_y[train_y >= 0]
        test_x, test_y = test_x[test_y >= 0], test_y[test_y >= 0]
        if len(train_y) == 0 or len(test_y) == 0:
            return float("nan")
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        return knn_accuracy(
            train_x, train_y, test_x, test_y, num_classes=num_classes, k=int(k.k), temperature=float(k.temperature)
        )

    def _features(self, encoder: nnx.Module, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.knn
        out = extract_features(
            encoder,
            self.config.data,
            split=split,
            image_size=self.config.image_size,
            batch_size=int(k.batch_size),
            pool=k.pool,
            progress=False,
            limit=limit,
            keys=("label",),
        )
        feats, labels = out["features"], out["label"]
        if k.label_key != "label":  # eval batches are in dataset order: record i is feature i
            source = records.open_split(self.config.data.path, split)
            labels = np.array([str(source[i].get(k.label_key, "")) for i in range(len(feats))])
        return feats, labels


def monitor_for(config: ml_collections.ConfigDict) -> KnnMonitor | None:
    """The monitor a config asks for: DINO's kNN monitor when `config.dino.knn` exists and
    `eval_every` > 0; None otherwise."""
    if config.get("dino") is None or config.dino.get("knn") is None or int(config.get("eval_every", 0)) <= 0:
        return None
    return KnnMonitor(config, config.dino.knn)
