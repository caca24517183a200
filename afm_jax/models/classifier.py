"""The fine-tuning model (ViT encoder + linear head) and its class-imbalance-weighted loss.

What: `Classifier` pools the encoder's tokens (mean of patch tokens, or the class token) and applies
one linear layer; `class_weights` gives "balanced" weights n / (C · n_c) so a rare class (AFF is
rarer than NFF in real data) counts as much as a common one; `weighted_cross_entropy` is softmax
cross-entropy with those weights, normalised by the summed weight of the batch (so the loss scale
does not depend on the batch's class mix). `binary_targets` maps dataset label ints to the task's
class index (negative labels -> 0, positive labels -> 1). For regression the head has one output that
predicts the standardised target (`standardised_regression_loss`, MSE or L1); `destandardise` maps it
back to the target's units.

Why a separate head with a small init: the MAE fine-tuning recipe (He et al. 2021, appendix A.2)
initialises the head with std 2e-5 (trunc-normal), so at step 0 the pretrained features are not
disturbed by large random logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Classifier(nnx.Module):
    """encoder -> pooled features -> linear head with `num_classes` logits."""

    def __init__(
        self,
        encoder: nnx.Module,
        num_classes: int,
        *,
        pool: str = "avg",
        head_init_std: float = 2e-5,
        freeze_encoder: bool = False,
        rngs: nnx.Rngs,
    ):
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool must be 'avg' or 'cls', got {pool!r}.")
        self.encoder = encoder
        self.pool = pool
        self.freeze_encoder = bool(freeze_encoder)
        self.head = nnx.Linear(
            encoder.embed_dim,
            num_classes,
            kernel_init=nnx.initializers.truncated_normal(stddev=head_init_std),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def features(self, images: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        tokens = self.encoder(images, rngs=None if self.freeze_encoder else rngs)
        if self.pool == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, self.encoder.num_prefix_tokens :].mean(axis=1)
        return jax.lax.stop_gradient(pooled) if self.freeze_encoder else pooled

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) images -> (B, num_classes) logits (float32)."""
        return self.head(self.features(images, rngs=rngs)).astype(jnp.float32)


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int, how: str = "balanced") -> np.ndarray:
    """Per-class loss weights: "balanced" = n / (num_classes · n_c) (sklearn's formula), "none" = 1."""
    if how == "none":
        return np.ones(num_classes, np.float32)
    if how != "balanced":
        raise ValueError(f"class weighting must be 'balanced' or 'none', got {how!r}.")
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(
            f"Class(es) {np.flatnonzero(counts == 0).tolist()} have no training examples; "
            "balanced weighting needs every class present."
        )
    return (labels.size / (num_classes * counts)).astype(np.float32)


def weighted_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    valid: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Σ_i w_{y_i} CE_i / Σ_i w_{y_i} over valid examples (targets < 0 are ignored)."""
    num_classes = logits.shape[-1]
    valid = (targets >= 0) if valid is None else valid & (targets >= 0)
    safe = jnp.where(valid, targets, 0)
    onehot = jax.nn.one_hot(safe, num_classes)
    if label_smoothing:
        onehot = onehot * (1 - label_smoothing) + label_smoothing / num_classes
    ce = -(onehot * jax.nn.log_softmax(logits.astype(jnp.float32))).sum(-1)
    w = jnp.asarray(weights, jnp.float32)[safe] * valid
    return (w * ce).sum() / jnp.maximum(w.sum(), 1e-12)


def binary_targets(labels: jax.Array | np.ndarray, positive: Sequence[int], negative: Sequence[int]):
    """Dataset label ints -> 1 (positive), 0 (negative), -1 (neither: ignored by the loss)."""
    xp = jnp if isinstance(labels, jax.Array) else np
    pos = xp.isin(labels, xp.asarray(list(positive)))
    neg = xp.isin(labels, xp.asarray(list(negative)))
    return xp.where(pos, 1, xp.where(neg, 0, -1)).astype(xp.int32)


def class_targets(labels: jax.Array | np.ndarray, classes: Sequence[Sequence[int]]):
    """Dataset label ints -> class index k when the label is in classes[k], else -1 (ignored)."""
    xp = jnp if isinstance(labels, jax.Array) else np
    out = xp.full(labels.shape, -1, xp.int32)
    for k, group in enumerate(classes):
        out = xp.where(xp.isin(labels, xp.asarray(list(group))), k, out)
    return out.astype(xp.int32)


def cumulative_probabilities(logits: jax.Array) -> jax.Array:
    """Ordinal (cumulative-link, CORAL/CORN-style) head: K − 1 logits of P(grade > k), k = 0..K−2, ->
    (B, K) grade probabilities p_0 = 1 − P(>0), p_k = P(>k−1) − P(>k), p_{K−1} = P(>K−2). The
    exceedance probabilities are made non-increasing (running minimum) so no probability is negative."""
    exceed = jax.nn.sigmoid(logits.astype(jnp.float32))
    exceed = jax.lax.cummin(exceed, axis=exceed.ndim - 1)
    ones = jnp.ones(exceed.shape[:-1] + (1,), exceed.dtype)
    zeros = jnp.zeros_like(ones)
    upper = jnp.concatenate([ones, exceed], axis=-1)
    lower = jnp.concatenate([exceed, zeros], axis=-1)
    return upper - lower


def cumulative_loss(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """Σ_i w_{y_i} Σ_k BCE(logit_ik, [y_i > k]) / Σ_i w_{y_i}: the ordinal head's loss (targets < 0 ignored)."""
    valid = (targets >= 0) if valid is None else valid & (targets >= 0)
    safe = jnp.where(valid, targets, 0)
    k = jnp.arange(logits.shape[-1])
    above = (safe[:, None] > k[None, :]).astype(jnp.float32)
    x = logits.astype(jnp.float32)
    bce = jnp.maximum(x, 0) - x * above + jnp.log1p(jnp.exp(-jnp.abs(x)))
    w = jnp.asarray(weights, jnp.float32)[safe] * valid
    return (w * bce.sum(-1)).sum() / jnp.maximum(w.sum(), 1e-12)


def destandardise(z: jax.Array, mean: float, std: float) -> jax.Array:
    """The regression head's standardised output -> the target's units: z · std + mean."""
    return z.astype(jnp.float32) * std + mean


def standardised_regression_loss(
    outputs: jax.Array, targets: jax.Array, mean: float, std: float, *, l1: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(loss, MAE in the target's units) of the regression head's (B,) outputs against (B,) float targets:
    the mean squared (l1: absolute) error between the outputs and (target − mean) / std over the images
    with a finite target (NaN = none, ignored)."""
    targets = jnp.asarray(targets, jnp.float32)
    valid = jnp.isfinite(targets)
    z = jnp.where(valid, (targets - mean) / std, 0.0)
    err = outputs.astype(jnp.float32) - z
    per = jnp.abs(err) if l1 else jnp.square(err)
    n = jnp.maximum(valid.sum(), 1)
    loss = jnp.where(valid, per, 0.0).sum() / n
    mae = jnp.where(valid, jnp.abs(err), 0.0).sum() / n * std
    return loss, mae
