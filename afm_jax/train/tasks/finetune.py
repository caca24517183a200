"""Fine-tuning and linear probing as trainer tasks: `config.task = "finetune"` / `"linprobe"`.

What: a `Classifier` (our ViT + linear head, afm_jax.models.classifier) trained on a binary task
given by label ints (`finetune.positive_labels` vs `finetune.negative_labels`, e.g. AFF=2 vs NFF=1;
images with other labels are left out of training through a selection file in the workdir), or
with `finetune.kind` = "multiclass" / "ordinal" on `finetune.classes` (softmax cross-entropy with
balanced class weights; for ordinal grades optionally the cumulative head, `finetune.ordinal_head`
= "cumulative": K − 1 logits of P(grade > k) with a summed binary cross-entropy; early stopping on
validation macro AUROC / quadratic-weighted kappa), or `finetune.kind = "regression"`: one output
trained with MSE (`finetune.regression_loss = "l1"`: mean absolute error) on the float target
standardised with the training images' mean and standard deviation, predictions de-standardised back
to the target's units, early stopping on validation MAE. The target of an image is the record field
`target` (NaN = none, left out), or the value in `finetune.targets_file` (JSON {split: {image_id:
value}}, e.g. a target derived from other record fields by the evaluation layer). The
trainer brings checkpointing, resume, logging and SIGTERM handling; this task adds

- start weights from `config.init_from` (our workdir, a timm/DINO/DINOv2 file or an export);
- layer-wise lr decay (`finetune.layer_decay`, BEiT/MAE), drop-path (`model.drop_path_rate`),
  warmup (`optim.warmup_epochs`), balanced class weights (`finetune.class_weighting`);
- every `eval_every` steps the validation AUROC; when it improves the test-split predictions of that
  model are written to `<workdir>/predictions/test.npz` (so the reported model is the best on
  validation, as if its checkpoint were restored), and after `finetune.patience` evaluations without
  improvement `should_stop` ends training (early stopping). The best-so-far record lives in
  `<workdir>/finetune_best.json`, so a resumed run continues the same bookkeeping.

`LinearProbeTask` is the same with the encoder frozen (no gradient, no optimiser state, no
drop-path): the linear protocol trained by SGD with augmentation, as in the MAE paper (AdamW here
instead of LARS, a named deviation for small batches).

Evaluation runs the whole validation/test split in every process (single-host runs; a multi-host
run evaluates redundantly but correctly on each host's addressable copy only when params are
replicated, i.e. `mesh.fsdp = 1`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from afm_jax import configuration, errors, io
from afm_jax.data import pipeline, records, selection, transforms
from afm_jax.models import classifier as ft
from afm_jax.models import factory
from afm_jax.train import optim
from afm_jax.train.layer_decay import lr_scale_tree, scale_updates_by_tree
from afm_jax.train.tasks.base import Task

BEST_FILE = "finetune_best.json"
SELECTION_FILE = "finetune_selection.json"
PREDICTIONS_DIR = "predictions"


def default_finetune_config() -> ml_collections.ConfigDict:
    """The `config.finetune` block (MAE fine-tuning recipe where it applies)."""
    return ml_collections.ConfigDict(
        dict(
            positive_labels=(2,),  # label ints of the positive class (synthetic femur: aff=2)
            negative_labels=(1,),  # label ints of the negative class (nff=1); other labels are left out
            pool="avg",  # "avg" (mean of patch tokens, MAE's fine-tuning choice) or "cls"
            head_init_std=2e-5,  # MAE: trunc-normal(2e-5) head init
            layer_decay=0.75,  # layer-wise lr decay (MAE ViT-B: 0.75; 1.0 = off)
            class_weighting="balanced",  # "balanced" (n / (C·n_c)) or "none"
            label_smoothing=0.0,
            patience=5,  # evaluations without validation-AUROC gain before stopping (0 = never)
            eval_batch_size=64,
            eval_image_size=0,  # 0 = config.image_size
            test_split="test",
            kind="binary",  # binary | multiclass | ordinal | regression
            classes=(),  # multiclass/ordinal: label ints of each class in order, e.g. ((0,), (1,), (2,))
            ordinal_head="softmax",  # ordinal: "softmax" (cross-entropy) or "cumulative" (K−1 logits of P(grade > k))
            regression_loss="mse",  # regression: "mse" or "l1", on the target standardised with the train split's mean/std
            targets_file="",  # regression: JSON {split: {image_id: value}}; "" = the records' `target` field
        )
    )


class FinetuneTask(Task):
    """Full fine-tuning of a ViT encoder with a linear head on a binary label task."""

    name = "finetune"
    freeze_encoder = False

    # ─── Config ──────────────────────────────────────────────────────────────────────────────
    @classmethod
    def extend_config(cls, config: ml_collections.ConfigDict) -> None:
        config.finetune = default_finetune_config()
        # MAE fine-tuning (He et al. 2021, Table 9): AdamW(0.9, 0.999), wd 0.05, base lr 5e-4 (B),
        # 5 warmup epochs, drop-path 0.1, 100 epochs; evaluation drives early stopping.
        # No decay on tokens/pos embeds: MAE `main_finetune.py` exempts timm's `no_weight_decay()` set.
        config.optim.update(base_lr=5e-4, b2=0.999, weight_decay=0.05, warmup_epochs=5.0, weight_decay_rule="no_tokens")
        config.model.drop_path_rate = 0.1
        config.num_epochs = 100.0
        config.batch_size = 1024
        config.eval_every = 100
        config.image_every = 0

    def validate(self, config: ml_collections.ConfigDict) -> None:
        factory.validate_model_config(config)
        f = config.finetune
        configuration.require(
            config, "finetune.positive_labels", lambda v: len(v) > 0, "a non-empty tuple of label ints"
        )
        configuration.require(
            config,
            "finetune.negative_labels",
            lambda v: len(v) > 0 and not set(v) & set(f.positive_labels),
            "a non-empty tuple of label ints disjoint from finetune.positive_labels",
        )
        configuration.require_choice(config, "finetune.pool", ("avg", "cls"))
        configuration.require_choice(config, "finetune.class_weighting", ("balanced", "none"))
        configuration.require(config, "finetune.layer_decay", lambda v: 0.0 < v <= 1.0, "a factor in (0, 1]")
        configuration.require(config, "finetune.label_smoothing", lambda v: 0.0 <= v < 1.0, "a value in [0, 1)")
        configuration.require(config, "finetune.patience", lambda v: int(v) >= 0, "an evaluation count >= 0")
        configuration.require(
            config,
            "eval_every",
            lambda v: int(v) > 0,
            "a positive step interval (fine-tuning evaluates on validation to pick the model)",
        )
        configuration.require_choice(config, "finetune.kind", ("binary", "multiclass", "ordinal", "regression"))
        configuration.require_choice(config, "finetune.ordinal_head", ("softmax", "cumulative"))
        configuration.require_choice(config, "finetune.regression_loss", ("mse", "l1"))
        if f.targets_file and not os.path.isfile(os.path.expanduser(f.targets_file)):
            raise errors.ConfigError(f"Config key `finetune.targets_file` = {f.targets_file!r} is not a file.")
        if f.kind in ("multiclass", "ordinal"):
            flat = [int(x) for c in f.classes for x in c]
            configuration.require(
                config,
                "finetune.classes",
                lambda v: len(v) >= 2 and len(flat) == len(set(flat)),
                ">= 2 disjoint tuples of label ints, e.g. ((0,), (1,), (2,))",
            )
        if f.pool == "cls" and not config.model.class_token:
            raise errors.ConfigError(
                "Config key `finetune.pool` = 'cls' needs model.class_token=True; use --config.finetune.pool=avg."
            )

    def _training_examples(self, config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image ids, binary targets with -1 for left-out labels, mask of the examples trained on)."""
        f = config.finetune
        self.positive, self.negative = (
            tuple(int(x) for x in f.positive_labels),
            tuple(int(x) for x in f.negative_labels),
        )
        self.kind = str(f.get("kind", "binary"))
        self.classes = tuple(tuple(int(x) for x in c) for c in f.get("classes", ()))
        self.num_classes = {"binary": 2, "regression": 1}.get(self.kind, len(self.classes))
        index = records.split_index(config.data.path, config.data.train_split)
        ids = np.asarray(index["image_id"])
        if self.kind == "regression":
            targets = self.target_values(config, config.data.train_split, ids)
            keep = np.isfinite(targets)
        else:
            targets = self.targets(np.asarray(index["label"]))
            keep = targets >= 0
        if config.data.get("selection"):
            keep &= np.isin(ids, np.asarray(selection.read_selection(config.data.selection)))
        return ids, targets, keep

    @staticmethod
    def target_values(config: ml_collections.ConfigDict, split: str, image_ids) -> np.ndarray:
        """The float regression target of each image of `split` (NaN = none): from
        `finetune.targets_file`, or the records' `target` field."""
        path = str(config.finetune.get("targets_file", "") or "")
        if path:
            with open(os.path.expanduser(path)) as fh:
                by_image = {str(k): float(v) for k, v in json.load(fh).get(split, {}).items()}
        else:
            source = records.open_split(config.data.path, split)
            by_image = {}
            for i in range(len(source)):
                ex = source[i]
                by_image[ex["image_id"]] = float(ex["target"])
        return np.asarray([by_image.get(str(i), np.nan) for i in np.asarray(image_ids).tolist()], np.float64)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("image", "label", "target") if getattr(self, "kind", "") == "regression" else ("image", "label")

    def targets(self, labels):
        """Label ints -> class index (binary: 0 negative, 1 positive), −1 for labels outside the task."""
        if self.kind == "binary":
            return ft.binary_targets(labels, self.positive, self.negative)
        return ft.class_targets(labels, self.classes)

    @property
    def cumulative(self) -> bool:
        return self.kind == "ordinal" and str(self.config.finetune.get("ordinal_head", "softmax")) == "cumulative"

    def probabilities(self, logits):
        """Class probabilities of the head's logits (softmax, or the ordinal cumulative head's)."""
        return ft.cumulative_probabilities(logits) if self.cumulative else jax.nn.softmax(logits, axis=-1)

    def num_train_examples(self, config: ml_collections.ConfigDict) -> int:
        return int(self._training_examples(config)[2].sum())

    def setup(self, config: ml_collections.ConfigDict, *, workdir: str, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(config, workdir=workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        f = config.finetune
        ids, targets, keep = self._training_examples(config)
        if self.kind == "regression":
            values = targets[keep]
            if values.size < 2 or not np.std(values) > 0:
                raise errors.ConfigError(
                    f"The training split `{config.data.train_split}` of {config.data.path} has "
                    f"{values.size} image(s) with a regression target and {np.unique(values).size} distinct "
                    "value(s); standardising the target needs >= 2 images with different targets."
                )
            # The head predicts (target − mean) / std of the training images (the images trained on).
            self.target_mean, self.target_std = float(np.mean(values)), float(np.std(values))
            self.class_weights = np.ones(1, np.float32)
            self.train_targets = dict(zip(ids[keep].tolist(), values.tolist()))
        elif self.kind != "binary":
            missing = sorted(set(range(self.num_classes)) - set(np.unique(targets[keep]).tolist()))
            if missing:
                raise errors.ConfigError(
                    f"The training split `{config.data.train_split}` of {config.data.path} has no "
                    f"examples of class(es) {missing} of finetune.classes {self.classes}."
                )
        elif len(np.unique(targets[keep])) < 2:
            raise errors.ConfigError(
                f"The training split `{config.data.train_split}` of {config.data.path} has no examples of "
                f"{'positive' if not (targets[keep] == 1).any() else 'negative'} labels "
                f"{self.positive if not (targets[keep] == 1).any() else self.negative}: check "
                "finetune.positive_labels / finetune.negative_labels against the dataset's labels."
            )
        if self.kind != "regression":
            self.class_weights = ft.class_weights(targets[keep], self.num_classes, f.class_weighting)
        os.makedirs(workdir, exist_ok=True)
        self.selection_path = os.path.join(workdir, SELECTION_FILE)
        if jax.process_index() == 0 or not os.path.exists(self.selection_path):
            selection.write_selection(self.selection_path, ids[keep].tolist())
        self.best_path = os.path.join(workdir, BEST_FILE)
        self.best = {"step": -1, "val_auroc": -np.inf, "evals_since_best": 0}
        if os.path.exists(self.best_path):
            with open(self.best_path) as fh:
                self.best = json.load(fh)
        self._score_fn = None

    # ─── Model, optimiser, input ─────────────────────────────────────────────────────────────
    def build_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> ft.Classifier:
        encoder = factory.build_encoder(config.model, config.image_size, rngs)
        kind = str(config.finetune.get("kind", "binary"))
        outputs = {"binary": 2, "regression": 1}.get(kind, len(config.finetune.classes))
        if kind == "ordinal" and str(config.finetune.get("ordinal_head", "softmax")) == "cumulative":
            outputs -= 1
        return ft.Classifier(
            encoder,
            outputs,
            pool=config.finetune.pool,
            head_init_std=config.finetune.head_init_std,
            freeze_encoder=self.freeze_encoder,
            rngs=rngs,
        )

    def make_optimizer(
        self, config: ml_collections.ConfigDict, schedule: optax.Schedule, params: Any
    ) -> optax.GradientTransformation:
        base = optim.make_optimizer(config.optim, schedule)
        if self.freeze_encoder:

            def labels(p):
                return jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if _is_encoder(path) else "train", p)

            return optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, labels)
        decay = float(config.finetune.layer_decay)
        if decay >= 1.0:
            return base
        depth = factory.vit_dims(config.model)["depth"]
        scales = lr_scale_tree(params, num_layers=int(depth), decay=decay)
        return optax.chain(base, scale_updates_by_tree(scales))

    def build_train_iterator(self, config: ml_collections.ConfigDict):
        data = config.data.copy_and_resolve_references()
        with data.unlocked():
            data.selection = self.selection_path
        if self.kind != "regression":
            return pipeline.build_train_iterator(
                data, global_batch_size=config.batch_size, seed=config.seed, image_size=config.image_size
            )
        augment = transforms.TrainTransform(transforms.train_chain(data.get("augment", None), config.image_size))
        dataset, facts = pipeline.build_train_dataset(
            data,
            global_batch_size=config.batch_size,
            seed=config.seed,
            image_size=config.image_size,
            transform=WithTarget(augment, self.train_targets),
        )
        return pipeline.TrainIterator(dataset, facts, data)

    def example_batch(self, config: ml_collections.ConfigDict, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        batch = super().example_batch(config, batch_size, seed)
        if str(config.finetune.get("kind", "binary")) == "binary":
            pool = list(config.finetune.negative_labels) + list(config.finetune.positive_labels)
        else:
            pool = [int(c[0]) for c in config.finetune.classes]
        labels = np.asarray(pool * batch_size)
        out = {**batch, "label": labels[:batch_size].astype(np.int32)}
        if str(config.finetune.get("kind", "binary")) == "regression":
            out["target"] = np.random.default_rng(seed).normal(size=batch_size).astype(np.float32)
        return out

    # ─── Loss ────────────────────────────────────────────────────────────────────────────────
    def loss(
        self, model: ft.Classifier, batch: dict, key: jax.Array, extra: Any = None, step: jax.Array = None
    ) -> tuple[jax.Array, tuple[dict, dict]]:
        logits = model(batch["image"], rngs=key)
        if self.kind == "regression":
            loss, mae = ft.standardised_regression_loss(
                logits[:, 0],
                batch["target"],
                self.target_mean,
                self.target_std,
                l1=str(self.config.finetune.regression_loss) == "l1",
            )
            return loss, ({"train_mae": mae}, {})
        targets = self.targets(batch["label"])
        if self.cumulative:
            loss = ft.cumulative_loss(logits, targets, jnp.asarray(self.class_weights))
        else:
            loss = ft.weighted_cross_entropy(
                logits,
                targets,
                jnp.asarray(self.class_weights),
                label_smoothing=float(self.config.finetune.label_smoothing),
            )
        valid = targets >= 0
        correct = (self.probabilities(logits).argmax(-1) == targets) & valid
        accuracy = correct.sum() / jnp.maximum(valid.sum(), 1)
        return loss, ({"train_accuracy": accuracy}, {})

    # ─── Evaluation: validation AUROC, best-model test predictions, early stopping ───────────
    def predict_split(self, model: ft.Classifier, split: str) -> dict[str, np.ndarray]:
        """P(positive) for the positive/negative images of `split` (other kinds: (N, C) class
        probabilities of the task's images), with labels and ids."""
        if self._score_fn is None:
            binary = self.kind == "binary"
            regression = self.kind == "regression"
            probabilities = self.probabilities
            mean, std = getattr(self, "target_mean", 0.0), getattr(self, "target_std", 1.0)

            @nnx.jit
            def score(m, images):
                if regression:  # back to the target's units
                    return ft.destandardise(m(images)[:, 0], mean, std)
                p = probabilities(m(images))
                return p[:, 1] if binary else p

            self._score_fn = score
        f = self.config.finetune
        out = pipeline.map_split(
            lambda images: self._score_fn(model, images),
            self.config.data,
            split=split,
            batch_size=int(f.eval_batch_size),
            image_size=int(f.eval_image_size or self.config.image_size),
            progress=jax.process_index() == 0,
            desc=f"eval[{split}]",
        )
        out["y_score"] = out.pop("output")
        if self.kind == "regression":
            targets = self.target_values(self.config, split, out["image_id"].astype(str))
            keep = np.isfinite(targets)
        else:
            targets = np.asarray(self.targets(np.asarray(out["label"])))
            keep = targets >= 0
        out = {k: v[keep] for k, v in out.items()}
        out["y_true"] = targets[keep]
        return out

    def predictions(self) -> dict[str, Any]:
        """{"validation": ..., "test": ... (per-image y_true, y_score, label, patient_id, image_id of the
        best-on-validation model), "best": {"step", "val_auroc", ...}}."""
        out: dict[str, Any] = {"best": dict(self.best)}
        for split in ("validation", "test"):
            path = os.path.join(self.workdir, PREDICTIONS_DIR, f"{split}.npz")
            if os.path.isfile(path):
                with np.load(path, allow_pickle=False) as z:
                    out[split] = {k: z[k] for k in z.files}
        return out

    def evaluate(self, model: ft.Classifier, extra: Any, step: int) -> dict[str, float]:
        val = self.predict_split(model, self.config.data.eval_split)
        if self.kind == "regression" and len(val["y_true"]) < 1:
            raise errors.ConfigError(
                f"The validation split `{self.config.data.eval_split}` has no image with a regression target "
                "for early stopping on MAE; set --config.data.eval_split to a split that has some."
            )
        if self.kind != "regression" and len(np.unique(val["y_true"])) < 2:
            raise errors.ConfigError(
                f"The validation split `{self.config.data.eval_split}` needs positive and negative images for "
                "early stopping on AUROC; set --config.data.eval_split to a split that has both."
            )
        auroc = float(self.selection_metric(val["y_true"], val["y_score"]))
        improved = auroc > float(self.best["val_auroc"])
        if improved:
            self.best = {"step": int(step), "val_auroc": auroc, "evals_since_best": 0}
            test = self.predict_split(model, self.config.finetune.test_split)
            if jax.process_index() == 0:
                out_dir = os.path.join(self.workdir, PREDICTIONS_DIR)
                os.makedirs(out_dir, exist_ok=True)
                for name, pred in (("validation", val), ("test", test)):
                    np.savez(os.path.join(out_dir, f"{name}.npz"), **pred)
        else:
            self.best["evals_since_best"] = int(self.best["evals_since_best"]) + 1
        if jax.process_index() == 0:
            io.write_json(self.best_path, self.best)
        patience = int(self.config.finetune.patience)
        stop = patience > 0 and self.best["evals_since_best"] >= patience
        return {"val_auroc": auroc, "best_val_auroc": float(self.best["val_auroc"]), "should_stop": stop}

    @property
    def selection_metric_name(self) -> str:
        return {"binary": "auroc", "multiclass": "macro_auroc", "ordinal": "qwk", "regression": "neg_mae"}[self.kind]

    def selection_metric(self, y: np.ndarray, s: np.ndarray) -> float:
        """What early stopping maximises on validation: AUROC (binary), macro one-vs-rest AUROC
        (multiclass), quadratic-weighted kappa of the argmax grade (ordinal), minus the mean absolute
        error (regression). The `val_auroc` keys of the bookkeeping hold this metric for every kind."""
        if self.kind == "regression":
            return -float(np.mean(np.abs(np.asarray(y, np.float64) - np.asarray(s, np.float64))))
        if self.kind == "binary":
            return roc_auc_score(y, s)
        if self.kind == "multiclass":
            present = [k for k in range(s.shape[1]) if 0 < np.sum(y == k) < y.size]
            return float(np.mean([roc_auc_score(y == k, s[:, k]) for k in present]))
        return float(cohen_kappa_score(y, s.argmax(1), weights="quadratic", labels=np.arange(s.shape[1])))


class WithTarget(grain.transforms.RandomMap):
    """A training transform plus the image's float regression target (`target`, NaN when it has none)."""

    def __init__(self, inner: grain.transforms.RandomMap, targets: dict[str, float]) -> None:
        self.inner, self.targets = inner, dict(targets)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        out = dict(self.inner.random_map(element, rng))
        out["target"] = np.float32(self.targets.get(str(element["image_id"]), np.nan))
        return out


def _is_encoder(path: tuple) -> bool:
    first = path[0] if path else None
    return str(getattr(first, "key", getattr(first, "name", first))) == "encoder"


class LinearProbeTask(FinetuneTask):
    """A linear head on frozen encoder features, trained with the trainer (SGD + augmentation)."""

    name = "linprobe"
    freeze_encoder = True

    @classmethod
    def extend_config(cls, config: ml_collections.ConfigDict) -> None:
        super().extend_config(config)
        # MAE linear probing (Table 10): no weight decay, 10 warmup epochs, 90 epochs; AdamW instead of
        # LARS (named deviation: LARS needs its 16k batch). Frozen encoder: no drop-path, no layer decay.
        config.finetune.update(layer_decay=1.0, head_init_std=0.01)
        config.optim.update(base_lr=1e-3, b2=0.999, weight_decay=0.0, warmup_epochs=10.0)
        config.model.drop_path_rate = 0.0
        config.num_epochs = 90.0
