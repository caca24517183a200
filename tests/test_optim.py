"""Learning-rate schedule against the plain formula; weight-decay mask on a real model tree."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afm_jax.train import optim


def _optim_cfg(**kw):
    cfg = optim.default_optim_config()
    cfg.update(kw)
    return cfg


def _reference_lr(step, peak, warmup, total, end):
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("batch", [256, 4096])
def test_schedule_is_linear_warmup_then_cosine_with_linear_scaling(batch):
    cfg = _optim_cfg(base_lr=1.5e-4, min_lr=1e-6)
    schedule = optim.learning_rate_schedule(cfg, batch, total_steps=100, warmup_steps=10)
    peak = 1.5e-4 * batch / 256
    for step in (0, 1, 5, 10, 11, 50, 99, 100):
        np.testing.assert_allclose(float(schedule(step)), _reference_lr(step, peak, 10, 100, 1e-6), rtol=1e-5)


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.cls_token = nnx.Param(jnp.ones((1, 1, 4)))
        self.pos_embed = nnx.Param(jnp.ones((1, 3, 4)))


def test_weight_decay_mask_excludes_biases_norms_tokens_and_pos_embed():
    params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(optim.weight_decay_mask(params))
    assert mask["proj"]["kernel"] is True
    assert mask["proj"]["bias"] is False
    assert mask["norm"]["scale"] is False and mask["norm"]["bias"] is False
    assert mask["cls_token"] is False and mask["pos_embed"] is False


def test_adamw_decays_only_masked_in_parameters():
    model = _Tiny(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = optim.make_optimizer(
        _optim_cfg(weight_decay=0.5, grad_clip_norm=1.0, weight_decay_rule="no_tokens"), lambda _: 0.1
    )
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = nnx.to_pure_dict(optax.apply_updates(params, updates))
    old = nnx.to_pure_dict(params)
    # With zero gradients only decoupled weight decay moves a parameter: p <- p - lr*wd*p.
    np.testing.assert_allclose(new["proj"]["kernel"], old["proj"]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new["cls_token"], old["cls_token"])
    np.testing.assert_array_equal(new["norm"]["scale"], old["norm"]["scale"])


def test_mae_default_rule_decays_tokens_as_the_mae_reference():
    """MAE pretraining decays every tensor of rank >= 2, cls/mask tokens included (facebookresearch/mae
    main_pretrain.py: `optim_factory.add_weight_decay(model, args.weight_decay)` with no skip list; timm's
    rule exempts only 1-D tensors and `.bias`)."""
    model = _Tiny(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert optim.default_optim_config().weight_decay_rule == "rank"
    tx = optim.make_optimizer(_optim_cfg(weight_decay=0.5), lambda _: 0.1)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new, old = nnx.to_pure_dict(optax.apply_updates(params, updates)), nnx.to_pure_dict(params)
    np.testing.assert_allclose(new["cls_token"], old["cls_token"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new["norm"]["scale"], old["norm"]["scale"])
    np.testing.assert_array_equal(new["proj"]["bias"], old["proj"]["bias"])


@pytest.mark.parametrize(
    "rule,decayed",
    [
        # rank >= 2: MAE add_weight_decay / DINO utils.get_params_groups (`.bias` or 1-D exempt)
        ("rank", {"proj.kernel", "cls_token", "pos_embed"}),
        # DINOv2 dinov2/utils/param_groups.py L79: exempt `.bias`, "norm" or "gamma" in the name
        ("dinov2", {"proj.kernel", "cls_token", "pos_embed", "last.weight_g"}),
        ("no_tokens", {"proj.kernel"}),
    ],
)
def test_weight_decay_rules_pick_each_papers_set(rule, decayed):
    params = {
        "proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
        "norm1": {"scale": jnp.ones(4)},
        "cls_token": jnp.ones((1, 1, 4)),
        "pos_embed": jnp.ones((1, 3, 4)),
        "ls": {"gamma": jnp.ones(4)},
        "last": {"weight_g": jnp.ones(4)},
    }
    mask = optim.weight_decay_mask(params, rule)
    flat = {
        ".".join(str(getattr(k, "key", k)) for k in path): bool(v)
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert {k for k, v in flat.items() if v} == decayed
