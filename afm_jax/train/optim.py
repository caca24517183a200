"""Optimisers and the learning-rate schedule: MAE-paper AdamW (the default) and DINO's (`make_dino_optimizer`).

lr = base_lr × global_batch / 256 (the linear scaling rule of the MAE paper), linear warmup from 0,
then cosine decay to `min_lr`. AdamW with weight decay masked off biases, norm parameters, position
embeddings and learned tokens, and optional global-norm gradient clipping.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from afm_jax.models import factory
from afm_jax.train import dino_schedules, layer_decay

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


def make_dino_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule, params: Any, *,
                        total_steps: int, freeze_last_layer_steps: int) -> optax.GradientTransformation:
    """DINO's optimiser: AdamW (or LARS for a ResNet) with cosine weight decay (0.04 -> 0.4) off
    biases/norms/tokens, clipping, the head's last layer frozen for the first
    `freeze_last_layer_steps`, and optional layer-wise lr decay and patch-embed lr multiplier (DINOv2)."""
    o, d = config.optim, config.dino
    is_last = jax.tree_util.tree_map_with_path(
        lambda path, _: "last_layer" in [str(getattr(k, "key", k)) for k in path], params)
    parts = []
    if o.grad_clip_norm and o.grad_clip_norm > 0:
        parts.append(dino_schedules.clip_per_tensor(o.grad_clip_norm) if d.clip_per_tensor
                     else optax.clip_by_global_norm(o.grad_clip_norm))
    if freeze_last_layer_steps > 0:
        parts.append(dino_schedules.freeze_for_steps(is_last, freeze_last_layer_steps))
    wd = dino_schedules.weight_decay_schedule(o.weight_decay, d.weight_decay_end, total_steps)
    if d.optimizer == "lars":
        # DINO's LARS (utils.LARS): g + wd·p, then trust ratio eta·||p||/||g + wd·p|| and momentum;
        # both skip 1-D tensors (biases, BatchNorm), as DINO's does.
        not_1d = lambda tree: jax.tree.map(lambda p: getattr(p, "ndim", 0) > 1, tree)
        parts += [optax.add_decayed_weights(wd, mask=weight_decay_mask),
                  optax.masked(optax.scale_by_trust_ratio(trust_coefficient=float(d.lars_trust_coefficient)),
                               not_1d),
                  optax.trace(decay=float(d.lars_momentum)),
                  optax.scale_by_learning_rate(schedule)]
    else:
        parts += [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
                  optax.add_decayed_weights(wd, mask=weight_decay_mask),
                  optax.scale_by_learning_rate(schedule)]
    if d.layer_decay < 1.0 or d.patch_embed_lr_mult != 1.0:
        depth = factory.vit_dims(config.model)["depth"]
        parts.append(layer_decay.scale_updates_by_tree(layer_decay.lr_scale_tree(
            params, num_layers=depth, decay=float(d.layer_decay), patch_embed_scale=float(d.patch_embed_lr_mult))))
    if freeze_last_layer_steps > 0:
        parts.append(dino_schedules.freeze_for_steps(is_last, freeze_last_layer_steps))
    return optax.chain(*parts)
