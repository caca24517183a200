"""Optimisers and the learning-rate schedule: MAE-paper AdamW (the default) and DINO's (`make_dino_optimizer`).

lr = base_lr × global_batch / 256 (the linear scaling rule of the MAE paper), linear warmup from 0,
then cosine decay to `min_lr`. AdamW with weight decay on the tensors `optim.weight_decay_rule` names
(each paper's set, see `WEIGHT_DECAY_RULES`), and optional global-norm gradient clipping.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import optax

from afm_jax.models import factory
from afm_jax.train import dino_schedules, layer_decay

# Parameters whose *name* excludes them from weight decay whatever their rank (rule "no_tokens").
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed"})

# Which parameters weight decay applies to (config `optim.weight_decay_rule`):
# "rank":      every tensor of rank >= 2, so class/mask/register tokens and learned position embeddings
#              decay; biases, norms, LayerScale gammas and weight-norm gains do not (MAE pretraining
#              `optim_factory.add_weight_decay`; DINO `utils.get_params_groups`: `.bias` or 1-D exempt);
# "dinov2":    everything except biases and parameters whose name has "norm" or "gamma" (DINOv2
#              `param_groups.py`), so the tokens decay and so does the weight-norm gain `weight_g`;
# "no_tokens": "rank" minus tokens and position embeddings (timm's `no_weight_decay()` set, used by MAE's
#              fine-tuning; this repository's earlier rule for every method).
WEIGHT_DECAY_RULES = ("rank", "dinov2", "no_tokens")


def peak_learning_rate(optim: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """base_lr scaled linearly by global batch / 256."""
    return optim.base_lr * global_batch_size / 256


def learning_rate_schedule(
    optim: ml_collections.ConfigDict, global_batch_size: int, total_steps: int, warmup_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 to the peak lr over `warmup_steps`, then cosine to `optim.min_lr`."""
    peak = peak_learning_rate(optim, global_batch_size)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=optim.min_lr,
    )


def _path_names(path: tuple) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def weight_decay_mask(params: Any, rule: str = "no_tokens") -> Any:
    """True where weight decay applies under `rule` (see `WEIGHT_DECAY_RULES`); the default "no_tokens":
    weight matrices/kernels, not biases, norms, tokens or pos embeds."""
    if rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"weight decay rule must be one of {WEIGHT_DECAY_RULES}, got {rule!r}.")

    def decays(path: tuple, leaf: Any) -> bool:
        names = _path_names(path)
        if rule == "dinov2":
            return names[-1] != "bias" and not any("norm" in n or "gamma" in n for n in names)
        if rule == "no_tokens" and any(n in NO_DECAY_NAMES for n in names):
            return False
        return getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def decay_mask_fn(optim: ml_collections.ConfigDict):
    """The weight-decay mask function of `optim.weight_decay_rule` (default "no_tokens")."""
    return functools.partial(weight_decay_mask, rule=optim.get("weight_decay_rule", "no_tokens"))


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW(b1, b2, wd masked) with optional gradient clipping (`optim.grad_clip_norm` > 0)."""
    parts = []
    if optim.grad_clip_norm and optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask_fn(optim),
        )
    )
    return optax.chain(*parts)


def default_optim_config() -> ml_collections.ConfigDict:
    """MAE pretraining defaults (He et al. 2021, Table 8): AdamW(0.9, 0.95), wd 0.05, base lr 1.5e-4."""
    return ml_collections.ConfigDict(
        dict(
            base_lr=1.5e-4,
            min_lr=0.0,
            warmup_epochs=40.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.05,
            grad_clip_norm=0.0,
            weight_decay_rule="rank",
        )
    )  # MAE decays cls/mask tokens (see WEIGHT_DECAY_RULES)


CLIP_MODES = ("per_tensor", "global", "per_module")
FREEZE_MODES = ("fresh_adam", "lr_zero")


def _module_of(path: tuple) -> str:
    """The student module a DINO parameter belongs to, for per-module clipping (the mask token is part
    of DINOv2's backbone)."""
    top = _path_names(path)[0]
    return "encoder" if top == "mask_token" else top


def make_dino_optimizer(
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    params: Any,
    *,
    total_steps: int,
    freeze_last_layer_steps: int,
) -> optax.GradientTransformation:
    """DINO's optimiser: AdamW (or LARS for a ResNet) with cosine weight decay (0.04 -> 0.4) on the
    tensors of `optim.weight_decay_rule`, gradient clipping (`dino.clip_mode`), the head's last layer
    frozen for the first `freeze_last_layer_steps` (`dino.freeze_last_layer_mode`), and optional
    layer-wise lr decay and patch-embed lr multiplier (DINOv2).

    Freeze modes: "fresh_adam" (DINO v1: the last layer's gradients are dropped, so AdamW neither
    updates nor decays it and its Adam state starts fresh at the unfreeze) and "lr_zero" (DINOv2: its
    gradients reach Adam, whose moments accumulate, but its learning rate is 0 during the freeze)."""
    o, d = config.optim, config.dino
    is_last = jax.tree_util.tree_map_with_path(lambda path, _: "last_layer" in _path_names(path), params)
    decay_mask = decay_mask_fn(o)
    freeze = freeze_last_layer_steps > 0
    fresh = freeze and d.freeze_last_layer_mode == "fresh_adam"
    parts = []
    if o.grad_clip_norm and o.grad_clip_norm > 0:
        if d.clip_mode == "per_tensor":
            parts.append(dino_schedules.clip_per_tensor(o.grad_clip_norm))
        elif d.clip_mode == "per_module":
            module_of = jax.tree_util.tree_map_with_path(lambda path, _: _module_of(path), params)
            parts.append(dino_schedules.clip_per_module(o.grad_clip_norm, module_of))
        else:
            parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    wd = dino_schedules.weight_decay_schedule(o.weight_decay, d.weight_decay_end, total_steps)
    if d.optimizer == "lars":
        # DINO's LARS (utils.LARS): g + wd·p, then trust ratio eta·||p||/||g + wd·p|| and momentum;
        # both skip 1-D tensors (biases, BatchNorm), as DINO's does. Zeroing the last layer's g + wd·p
        # keeps its momentum at 0 during the freeze: its buffer starts fresh at the unfreeze (DINO).
        not_1d = lambda tree: jax.tree.map(lambda p: getattr(p, "ndim", 0) > 1, tree)
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
        if fresh:
            parts.append(dino_schedules.freeze_for_steps(is_last, freeze_last_layer_steps))
        parts += [
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=float(d.lars_trust_coefficient)), not_1d),
            optax.trace(decay=float(d.lars_momentum)),
            optax.scale_by_learning_rate(schedule),
        ]
    else:
        start = jax.tree.map(lambda last: freeze_last_layer_steps if (fresh and last) else 0, is_last)
        parts += [
            dino_schedules.scale_by_adam_from(o.b1, o.b2, o.eps, start),
            optax.add_decayed_weights(wd, mask=decay_mask),
            optax.scale_by_learning_rate(schedule),
        ]
    if d.layer_decay < 1.0 or d.patch_embed_lr_mult != 1.0:
        depth = factory.vit_dims(config.model)["depth"]
        parts.append(
            layer_decay.scale_updates_by_tree(
                layer_decay.lr_scale_tree(
                    params, num_layers=depth, decay=float(d.layer_decay), patch_embed_scale=float(d.patch_embed_lr_mult)
                )
            )
        )
    if freeze:  # no update (and so no weight decay) of the last layer during the freeze: lr 0
        parts.append(dino_schedules.freeze_for_steps(is_last, freeze_last_layer_steps))
    return optax.chain(*parts)
