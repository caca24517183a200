"""Optimiser and learning-rate schedule (MAE-paper defaults; DINO adds its own schedules later).

lr = base_lr × global_batch / 256 (the linear scaling rule of the MAE paper), linear warmup from 0,
then cosine decay to `min_lr`. AdamW with weight decay masked off biases, norm parameters, position
embeddings and learned tokens, and optional global-norm gradient clipping.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# Parameters whose *name* excludes them from weight decay whatever their rank.
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed"})


def peak_learning_rate(optim: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """base_lr scaled linearly by global batch / 256."""
    return optim.base_lr * global_batch_size / 256


def learning_rate_schedule(optim: ml_collections.ConfigDict, global_batch_size: int,
                           total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak lr over `warmup_steps`, then cosine to `optim.min_lr`."""
    peak = peak_learning_rate(optim, global_batch_size)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=optim.min_lr)


def _path_names(path: tuple) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: weight matrices/kernels, not biases, norms, tokens or pos embeds."""
    def decays(path: tuple, leaf: Any) -> bool:
        names = _path_names(path)
        if any(n in NO_DECAY_NAMES for n in names):
            return False
        return getattr(leaf, "ndim", 0) >= 2
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW(b1, b2, wd masked) with optional gradient clipping (`optim.grad_clip_norm` > 0)."""
    parts = []
    if optim.grad_clip_norm and optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts)


def default_optim_config() -> ml_collections.ConfigDict:
    """MAE pretraining defaults (He et al. 2021, Table 8): AdamW(0.9, 0.95), wd 0.05, base lr 1.5e-4."""
    return ml_collections.ConfigDict(dict(
        base_lr=1.5e-4, min_lr=0.0, warmup_epochs=40.0, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.05, grad_clip_norm=0.0))
