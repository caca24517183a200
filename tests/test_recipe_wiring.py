"""Recipe values reach the maths: each config key the DINO/iBOT/KoLeo/MAE code consumes is set to a
*non-default* value and the result is checked against an independent numpy/torch port of the reference
code, so hard-coding the published value, ignoring the key, reading the wrong key or an off-by-one in a
schedule fails here (each test names the mutations it was shown to catch, see the session report).

References:
  D   = facebookresearch/dino main_dino.py (DINOLoss.forward / update_center, train_one_epoch),
        utils.py (cosine_scheduler, clip_gradients, get_params_groups);
  V2  = facebookresearch/dinov2 dinov2/train/ssl_meta_arch.py, dinov2/loss/{ibot_patch_loss,koleo_loss}.py,
        dinov2/utils/param_groups.py;
  iBOT = bytedance/ibot main_ibot.py (ImageFolderMask: per-image mask probability and ratio);
  MAE = facebookresearch/mae models_mae.py, util/lr_sched.py.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dino_helpers import flat_state, log_softmax, reference_sinkhorn, setup_dino_task, softmax
from flax import nnx
from test_recipes import _get, _load

from afm_jax.data import multicrop
from afm_jax.models import factory
from afm_jax.train import loop, optim
from afm_jax.train import state as state_lib
from afm_jax.train import step as step_lib
from afm_jax.train.defaults import default_config


def _dino_config(path, **dino):
    config = default_config("dino", "mu/8")
    config.data.path = os.fspath(path)
    config.data.num_workers = 0
    config.image_size = 16
    config.batch_size = 4
    config.multicrop.update(num_local=2, local_size=8)
    config.model.update(width=32, depth=1, num_heads=2, drop_path_rate=0.0)
    base = dict(out_dim=32, hidden_dim=32, bottleneck_dim=16, freeze_last_layer_epochs=0.0)
    config.dino.update(**{**base, **dino})
    config.optim.update(grad_clip_norm=0.0)
    return config


def _cosine(base, final, t, total):
    """D utils.cosine_scheduler (no warm-up) at iteration t of `total`."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / total))


# Non-default recipe values: none equals the published one, so a hard-coded published value fails.
NONDEFAULT = dict(
    student_temp=0.2,  # published 0.1
    teacher_temp=0.05,  # published 0.07
    warmup_teacher_temp=0.03,  # published 0.04
    warmup_teacher_temp_epochs=4.0,  # published 30
    center_momentum=0.7,  # published 0.9
    momentum_teacher=0.5,  # published 0.996
    final_momentum_teacher=0.9,  # published 1.0
)


def test_one_step_uses_the_configured_temperatures_centre_momentum_and_teacher_momentum(synthetic_dataset):
    """A real train step with every DINO temperature and momentum set off its published value:
    loss = D `DINOLoss.forward` with τ_s = dino.student_temp and τ_t linear from warmup_teacher_temp
    to teacher_temp over warmup_teacher_temp_epochs·steps_per_epoch iterations; centre <-
    m_c·c + (1 - m_c)·mean(t) with m_c = dino.center_momentum; teacher <- m·teacher + (1 - m)·student
    *after* the optimiser update (D train_one_epoch: `optimizer.step()` then the EMA) with m the cosine
    from momentum_teacher to final_momentum_teacher at this step."""
    config = _dino_config(synthetic_dataset, **NONDEFAULT)
    total, per_epoch, step_no = 20, 2, 3
    task = setup_dino_task(config, total_steps=total, steps_per_epoch=per_epoch)
    model = task.build_model(config, nnx.Rngs(0))
    _, params, _ = state_lib.split_model(model)
    lr = 0.05
    tx = task.make_optimizer(config, optax.constant_schedule(lr), params)
    extra = task.init_extra(model)
    center = np.asarray(jax.random.normal(jax.random.key(1), extra["center"].shape)) * 2.0
    extra["center"] = jnp.asarray(center)
    graphdef, state = state_lib.create_train_state(model, tx, 0, extra)
    state = state.replace(step=jnp.asarray(step_no, state.step.dtype))
    batch = {k: jnp.asarray(v) for k, v in task.example_batch(config, 4, seed=0).items()}

    g = jnp.swapaxes(batch["global"], 0, 1).reshape(-1, 16, 16, 1)
    loc = jnp.swapaxes(batch["local"], 0, 1).reshape(-1, 8, 8, 1)
    t = np.asarray(model.dino_head(model.backbone(g)[0])).reshape(2, 4, -1)  # teacher = student at init
    s = np.concatenate([t, np.asarray(model.dino_head(model.backbone(loc)[0])).reshape(2, 4, -1)])
    warmup_iters = 4.0 * per_epoch
    temp = 0.03 + (0.05 - 0.03) * step_no / warmup_iters
    q = softmax((t - center) / temp)
    logp = log_softmax(s / 0.2)
    want_loss = np.mean([np.mean(np.sum(-q[i] * logp[v], axis=-1)) for i in range(2) for v in range(4) if v != i])

    train_step = jax.jit(
        step_lib.make_train_step(graphdef, task.loss, tx, optax.constant_schedule(lr), update_extra=task.update_extra)
    )
    new_state, metrics = train_step(state, batch)
    np.testing.assert_allclose(float(metrics["teacher_temp"]), temp, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss_dino"]), want_loss, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(new_state.extra["center"]), 0.7 * center + 0.3 * t.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6
    )
    m = _cosine(0.5, 0.9, step_no, total)
    old, new_student = flat_state(state.extra["teacher"]), flat_state(new_state.params)
    new_teacher = flat_state(new_state.extra["teacher"])
    moved = 0.0
    for k in old:
        np.testing.assert_allclose(new_teacher[k], m * old[k] + (1 - m) * new_student[k], rtol=1e-5, atol=1e-7)
        moved = max(moved, float(np.abs(new_student[k] - old[k]).max()))
    assert moved > 1e-3  # the student did move, so the EMA of the pre-update student would differ


def test_ibot_term_uses_its_weight_the_student_temperature_and_the_patch_centre_momentum(synthetic_dataset):
    """iBOT with non-default values: loss_ibot = V2 `iBOTPatchLoss.forward_masked` (per image, the mean
    over its masked patches of -Σ softmax((t - c_p)/τ_t) log softmax(s/τ_s); then the mean over
    images), the total adds ibot.loss_weight × it, and the patch centre moves with
    dino.center_momentum towards the mean teacher logit over the masked patches."""
    config = _dino_config(
        synthetic_dataset,
        **{k: NONDEFAULT[k] for k in ("student_temp", "teacher_temp", "warmup_teacher_temp", "center_momentum")},
        dino_loss_weight=0.6,
        ibot=dict(enabled=True, loss_weight=0.3),
    )
    config.multicrop.num_local = 0
    task = setup_dino_task(config, total_steps=20, steps_per_epoch=2)
    model = task.build_model(config, nnx.Rngs(0))
    model.mask_token[...] = jax.random.normal(jax.random.key(5), model.mask_token.shape)
    extra = task.init_extra(model)
    pc = np.asarray(jax.random.normal(jax.random.key(6), extra["patch_center"].shape))
    extra["patch_center"] = jnp.asarray(pc)
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 2, 4), bool)  # (batch, global crops, patches)
    masks[0, 0, [0, 3]] = masks[1, 1, [1]] = masks[2, 0, [1, 2]] = masks[3, 1, [0]] = True
    batch = {
        "global": jnp.asarray(rng.random((4, 2, 16, 16, 1), dtype=np.float32)),
        "masks": jnp.asarray(masks),
    }
    step_no = 5
    total, (metrics, outputs) = jax.jit(task.loss)(model, batch, jax.random.key(0), extra, jnp.asarray(step_no))

    g = jnp.swapaxes(batch["global"], 0, 1).reshape(-1, 16, 16, 1)
    mk = np.swapaxes(masks, 0, 1).reshape(-1, 4)
    t_patch = np.asarray(model.patch_head(model.backbone(g)[1]))  # teacher = student at init, unmasked input
    s_patch = np.asarray(model.patch_head(model.backbone(g, masks=jnp.asarray(mk))[1]))
    temp = 0.03 + (0.05 - 0.03) * step_no / (30.0 * 2)  # warmup_teacher_temp_epochs: the published 30
    ce = np.sum(-softmax((t_patch - pc) / temp) * log_softmax(s_patch / 0.2), axis=-1)  # (crops, N)
    want_ibot = np.mean([ce[i][mk[i]].mean() if mk[i].any() else 0.0 for i in range(len(mk))])
    np.testing.assert_allclose(float(metrics["loss_ibot"]), want_ibot, rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.6 * float(metrics["loss_dino"]) + 0.3 * want_ibot, rtol=1e-5)

    new = task.update_extra(extra, nnx.state(model, nnx.Param), outputs, jnp.asarray(step_no))
    want_pc = 0.7 * pc + 0.3 * t_patch[mk].mean(axis=0)
    np.testing.assert_allclose(np.asarray(new["patch_center"]), want_pc, rtol=1e-5, atol=1e-6)


def _reference_koleo(x):
    """V2 koleo_loss.py KoLeoLoss: L2-normalise, nearest neighbour by dot product, -mean log(pdist + eps)."""
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
    dots = x @ x.T
    np.fill_diagonal(dots, -1.0)
    nn = dots.argmax(axis=1)
    dist = np.linalg.norm(x - x[nn] + 1e-8, axis=-1)
    return -np.mean(np.log(dist + 1e-8))


def test_koleo_term_is_its_weight_times_the_sum_over_global_views(synthetic_dataset):
    """V2 ssl_meta_arch.py: `koleo_loss_weight * sum(self.koleo_loss(p) for p in
    student_cls_tokens.chunk(2))` — one KoLeo per global view of the student's class tokens (after the
    backbone's final norm), summed, times dino.koleo_weight (0.25 here; published 0.1)."""
    config = _dino_config(synthetic_dataset, koleo_weight=0.25)
    config.multicrop.num_local = 0
    config.batch_size = 5
    task = setup_dino_task(config)
    model = task.build_model(config, nnx.Rngs(0))
    extra = task.init_extra(model)
    rng = np.random.default_rng(1)
    batch = {"global": jnp.asarray(rng.random((5, 2, 16, 16, 1), dtype=np.float32))}
    total, (metrics, _) = jax.jit(task.loss)(model, batch, jax.random.key(0), extra, jnp.asarray(0))
    g = jnp.swapaxes(batch["global"], 0, 1).reshape(-1, 16, 16, 1)
    cls = np.asarray(model.backbone(g)[0]).reshape(2, 5, -1)
    want = _reference_koleo(cls[0].astype(np.float64)) + _reference_koleo(cls[1].astype(np.float64))
    np.testing.assert_allclose(float(metrics["loss_koleo"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(total), float(metrics["loss_dino"]) + 0.25 * want, rtol=1e-5)


# ─── The DINO optimiser against torch ────────────────────────────────────────────────────────────


def _torch_dino_trajectory(init, grads, *, lr, wd, clip, betas, eps=1e-8):
    """D train_one_epoch: set each group's weight decay (regularised group only, D get_params_groups:
    `.bias` and 1-D tensors exempt), `clip_gradients` (per tensor: clip / (norm + 1e-6) where < 1), then
    torch AdamW."""
    torch = pytest.importorskip("torch")
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in init.items()}
    reg = [p for k, p in params.items() if not (k.endswith("bias") or p.ndim == 1)]
    not_reg = [p for k, p in params.items() if k.endswith("bias") or p.ndim == 1]
    opt = torch.optim.AdamW([{"params": reg}, {"params": not_reg, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)
    out = []
    for step, g in enumerate(grads):
        opt.param_groups[0]["weight_decay"] = wd(step)
        for k, p in params.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
            norm = p.grad.data.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
        opt.step()
        out.append({k: p.detach().numpy().copy() for k, p in params.items()})
    return out


def test_dino_optimizer_clips_per_tensor_with_the_configured_norm_betas_and_weight_decay(synthetic_dataset):
    """`make_dino_optimizer` with clip norm 2 (published 3), betas (0.8, 0.95) (published torch
    defaults 0.9, 0.999) and weight decay cosine 0.1 -> 0.2 (published 0.04 -> 0.4) over 5 steps, against
    D's loop in torch. Per-tensor gradient norms straddle 2 and 3 and differ between tensors, so a
    global clip, a hard-coded 3, the wrong betas, decay of the bias or the wrong schedule all differ."""
    config = _dino_config(synthetic_dataset, weight_decay_end=0.2)
    config.optim.update(grad_clip_norm=2.0, b1=0.8, b2=0.95, weight_decay=0.1)
    total = 5
    task = setup_dino_task(config, total_steps=total, steps_per_epoch=1)
    assert task.freeze_steps == 0
    rng = np.random.default_rng(0)
    init = {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4), "cls": rng.standard_normal((1, 4))}
    params = {
        "encoder": {
            "blocks": {"0": {"kernel": jnp.asarray(init["kernel"], jnp.float32)}},
            "cls_token": jnp.asarray(init["cls"], jnp.float32),
        },
        "dino_head": {"mlp": {"0": {"bias": jnp.asarray(init["bias"], jnp.float32)}}},
    }
    norms = [(2.5, 1.0, 6.0), (1.5, 2.8, 0.5), (8.0, 2.2, 2.6), (0.3, 5.0, 1.9), (2.9, 0.2, 4.0)]
    grads = []
    for nk, nb, nc in norms:
        gk, gb, gc = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal((1, 4))
        grads.append(
            {
                "kernel": gk * nk / np.linalg.norm(gk),
                "bias": gb * nb / np.linalg.norm(gb),
                "cls": gc * nc / np.linalg.norm(gc),
            }
        )
    lr = 0.01
    ref = _torch_dino_trajectory(
        init, grads, lr=lr, wd=lambda t: _cosine(0.1, 0.2, t, total), clip=2.0, betas=(0.8, 0.95)
    )
    tx = task.make_optimizer(config, optax.constant_schedule(lr), params)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for step, g in enumerate(grads):
        tree = {
            "encoder": {
                "blocks": {"0": {"kernel": jnp.asarray(g["kernel"], jnp.float32)}},
                "cls_token": jnp.asarray(g["cls"], jnp.float32),
            },
            "dino_head": {"mlp": {"0": {"bias": jnp.asarray(g["bias"], jnp.float32)}}},
        }
        updates, opt_state = update(tree, opt_state, params)
        params = optax.apply_updates(params, updates)
        got = {
            "kernel": params["encoder"]["blocks"]["0"]["kernel"],
            "bias": params["dino_head"]["mlp"]["0"]["bias"],
            "cls": params["encoder"]["cls_token"],
        }
        for k in init:
            np.testing.assert_allclose(
                np.asarray(got[k]), ref[step][k], rtol=1e-5, atol=1e-6, err_msg=f"{k}, step {step}"
            )


def test_patch_embed_multiplier_applies_without_layer_decay(synthetic_dataset):
    """dinov2_vitl14 sets layer_decay 1.0 with patch_embed_lr_mult 0.2 (V2 vitl14.yaml; V2
    param_groups.py get_vit_lr_decay_rate: `if "patch_embed" in name: ... * patch_embed_lr_mult`): the
    patch embedding's update is 0.2 × that of a same-rate parameter even though layer decay is off."""
    config = _dino_config(synthetic_dataset, layer_decay=1.0, patch_embed_lr_mult=0.2)
    config.optim.update(weight_decay=0.0)
    config.dino.weight_decay_end = 0.0
    task = setup_dino_task(config, steps_per_epoch=1)
    model = task.build_model(config, nnx.Rngs(0))
    _, params, _ = state_lib.split_model(model)
    tx = task.make_optimizer(config, optax.constant_schedule(1e-2), params)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(ones, tx.init(params), params)
    u = {k: float(np.abs(v).max()) for k, v in flat_state(updates).items()}
    full = u["encoder/blocks/0/norm1/bias"]  # Adam's first step with unit gradients: lr × 1
    np.testing.assert_allclose(full, 1e-2, rtol=1e-4)
    np.testing.assert_allclose(u["encoder/patch_embed/proj/bias"], 0.2 * full, rtol=1e-4)
    np.testing.assert_allclose(u["dino_head/mlp/0/bias"], full, rtol=1e-4)


# ─── Multi-crop iBOT masks, MAE, schedule lengths, drop path ─────────────────────────────────────


def test_ibot_masks_follow_the_configured_probability_and_ratio_range():
    """iBOT ImageFolderMask: each crop is masked with probability `pred_shape`/`mask_probability`
    (0.3 here, published 0.5), with a ratio drawn uniformly from `mask_ratio` (0.1-0.5), not always
    its maximum."""
    spec = multicrop.MaskSpec(grid=(14, 14), probability=0.3, ratio=(0.1, 0.5))
    rng = np.random.default_rng(0)
    counts = np.array([spec.sample(rng).sum() for _ in range(1500)])
    masked = counts[counts > 0]
    assert 0.26 < len(masked) / len(counts) < 0.34  # binomial(1500, 0.3): sd 0.012
    n = 14 * 14
    assert masked.max() <= int(n * 0.5) and masked.min() >= 4
    frac = masked / n
    assert np.mean(frac < 0.2) > 0.15 and np.mean(frac > 0.4) > 0.15  # spread over the range
    np.testing.assert_allclose(np.mean(frac), 0.3, atol=0.04)  # ~ the mean of U(0.1, 0.5)


def test_mae_model_takes_mask_ratio_and_norm_pix_loss_from_the_config():
    """factory.build_mae with mask_ratio 0.5 and norm_pix_loss False (published 0.75 / True): the encoder
    keeps int(L·(1 - 0.5)) tokens (MAE models_mae.py random_masking) and the loss is the plain MSE on
    the removed patches of the unnormalised target (models_mae.py forward_loss)."""
    config = default_config("mae", "mu/8")
    config.image_size = 32
    config.model.update(width=32, depth=1, num_heads=2)
    config.mae.update(mask_ratio=0.5, norm_pix_loss=False, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    mae = factory.build_mae(config, nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
    latent, mask, _, _ = mae.forward_encoder(images, jax.random.key(1))
    n = (32 // 8) ** 2
    assert latent.shape[1] == mae.encoder.num_prefix_tokens + int(n * 0.5)
    assert np.asarray(mask).sum(axis=1).tolist() == [n - int(n * 0.5)] * 2
    out = mae(images, key=jax.random.key(1))
    x = (np.asarray(images) - np.asarray(mae.encoder.input_mean)) / np.asarray(mae.encoder.input_std)
    target = x.reshape(2, 4, 8, 4, 8, 1).transpose(0, 1, 3, 2, 4, 5).reshape(2, n, 64)
    pred, m = np.asarray(out["pred"]), np.asarray(out["mask"])
    want = (((pred - target) ** 2).mean(-1) * m).sum() / m.sum()
    np.testing.assert_allclose(float(out["loss"]), want, rtol=1e-5)


def test_run_schedule_counts_epochs_in_steps():
    """Warm-up and length in optimiser steps: epochs × (examples // global batch) (MAE util/lr_sched.py
    works in fractional epochs, `epoch < args.warmup_epochs`; DINO: warmup_epochs × niter_per_ep)."""
    config = default_config("mae", "mu/8")
    config.update(batch_size=8, num_epochs=3.0, total_steps=0)
    config.optim.warmup_epochs = 1.5
    assert loop.run_schedule(config, 100) == (36, 18)  # 100 // 8 = 12 steps per epoch
    config.total_steps = 30
    assert loop.run_schedule(config, 100) == (30, 18)


def test_drop_path_rate_reaches_every_block_linearly():
    """D vision_transformer.py: `dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]`,
    from config.model.drop_path_rate (0.3 here, published 0.1)."""
    config = default_config("dino", "mu/8")
    config.model.update(width=32, depth=4, num_heads=2, drop_path_rate=0.3)
    encoder = factory.build_backbone(config.model, 16, nnx.Rngs(0))
    np.testing.assert_allclose([b.drop_path_rate for b in encoder.blocks], np.linspace(0, 0.3, 4), rtol=1e-6)


# ─── MAE pretraining configs (not in test_recipes.EXPECTED) ──────────────────────────────────────
# MAE = facebookresearch/mae: PRETRAIN.md's command (`--mask_ratio 0.75 --epochs 800 --warmup_epochs 40
# --blr 1.5e-4 --weight_decay 0.05 --norm_pix_loss`, effective batch 4096) = paper Table 8; main_pretrain.py
# `torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))`, `--min_lr` default 0, no gradient
# clipping (loss_scaler(..., clip_grad=None) by default); models_mae.py mae_vit_*_dec512d8b: decoder
# 512-d, 8 blocks, 16 heads; its encoder Blocks have no drop path.
MAE_PRETRAIN = {
    "mae.mask_ratio": 0.75,
    "mae.norm_pix_loss": True,
    "mae.decoder_dim": 512,
    "mae.decoder_depth": 8,
    "mae.decoder_heads": 16,
    "optim.base_lr": 1.5e-4,
    "optim.min_lr": 0.0,
    "optim.warmup_epochs": 40.0,
    "optim.weight_decay": 0.05,
    "optim.b1": 0.9,
    "optim.b2": 0.95,
    "optim.eps": 1e-8,  # torch AdamW default
    "optim.grad_clip_norm": 0.0,
    "optim.weight_decay_rule": "rank",  # util/misc / timm optim_factory.add_weight_decay: 1-D and .bias exempt
    "model.drop_path_rate": 0.0,
    "num_epochs": 800.0,
    "task": "mae",
}


@pytest.mark.parametrize(
    "name,variant,batch",
    [("mae_vitb", "B/16", 4096), ("mae_vitl", "L/16", 4096), ("mae_vits", "S/16", 1024)],  # S: 1024, deliberate
)
def test_shipped_mae_configs_carry_the_published_pretraining_recipe(name, variant, batch):
    config = _load(name)
    want = {**MAE_PRETRAIN, "model.variant": variant, "batch_size": batch}
    mismatches = {}
    for key, value in want.items():
        got = _get(config, key)
        same = got == value if isinstance(value, (bool, str)) else got == pytest.approx(value)
        if not same:
            mismatches[key] = (got, value)
    assert not mismatches, f"{name}: (ours, reference) {mismatches}"


def test_mae_optimizer_matches_torch_adamw_with_its_betas_decay_set_and_global_clip():
    """`optim.make_optimizer` (MAE pretraining / fine-tuning) against torch: betas (0.8, 0.97) (published
    0.9, 0.95), weight decay 0.1 on the rank >= 2 tensors only (MAE main_pretrain.py
    `optim_factory.add_weight_decay`: 1-D and `.bias` exempt), global-norm clipping at 1.5
    (`torch.nn.utils.clip_grad_norm_`, MAE util/misc.py NativeScalerWithGradNormCount), 4 steps."""
    torch = pytest.importorskip("torch")
    cfg = optim.default_optim_config()
    cfg.update(b1=0.8, b2=0.97, weight_decay=0.1, grad_clip_norm=1.5, weight_decay_rule="rank")
    lr = 0.02
    tx = optim.make_optimizer(cfg, optax.constant_schedule(lr))
    rng = np.random.default_rng(3)
    init = {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)}
    tp = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in init.items()}
    opt = torch.optim.AdamW(
        [{"params": [tp["kernel"]], "weight_decay": 0.1}, {"params": [tp["bias"]], "weight_decay": 0.0}],
        lr=lr,
        betas=(0.8, 0.97),
        eps=1e-8,
    )
    params = {k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
    state = tx.init(params)
    for scale in (3.0, 0.2, 1.0, 5.0):  # global norms above and below the clip
        g = {k: rng.standard_normal(v.shape) * scale for k, v in init.items()}
        for k, p in tp.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.5)
        opt.step()
        updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k in init:
            np.testing.assert_allclose(np.asarray(params[k]), tp[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_drop_path_is_the_students_only(synthetic_dataset):
    """D main_dino.py builds the student with `drop_path_rate=args.drop_path_rate` and the teacher
    without (rate 0): with drop path 0.5 the teacher's logits (its batch mean feeds the centre) are the
    deterministic forward, while the student's loss is not the deterministic one."""
    config = _dino_config(synthetic_dataset)
    config.model.update(depth=2, drop_path_rate=0.5)
    task = setup_dino_task(config)
    model = task.build_model(config, nnx.Rngs(0))
    extra = task.init_extra(model)
    batch = {k: jnp.asarray(v) for k, v in task.example_batch(config, 4, seed=0).items()}
    _, (metrics, outputs) = jax.jit(task.loss)(model, batch, jax.random.key(0), extra, jnp.asarray(0))
    g = jnp.swapaxes(batch["global"], 0, 1).reshape(-1, 16, 16, 1)
    loc = jnp.swapaxes(batch["local"], 0, 1).reshape(-1, 8, 8, 1)
    t = np.asarray(model.dino_head(model.backbone(g)[0])).reshape(2, 4, -1)
    np.testing.assert_allclose(np.asarray(outputs["teacher_mean"]), t.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
    s = np.concatenate([t, np.asarray(model.dino_head(model.backbone(loc)[0])).reshape(2, 4, -1)])
    q = softmax(t / float(metrics["teacher_temp"]))
    logp = log_softmax(s / 0.1)
    deterministic = np.mean([np.mean(np.sum(-q[i] * logp[v], -1)) for i in range(2) for v in range(4) if v != i])
    assert abs(float(metrics["loss_dino"]) - deterministic) > 1e-4 * abs(deterministic)


def test_sinkhorn_centering_runs_the_configured_number_of_iterations(synthetic_dataset):
    """centering "sinkhorn_knopp" with dino.sinkhorn_iterations = 1 (V2 SSL default 3): the DINO loss's
    targets are V2's `sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=1)` over the
    global batch of both global crops."""
    config = _dino_config(synthetic_dataset, centering="sinkhorn_knopp", sinkhorn_iterations=1)
    task = setup_dino_task(config)
    model = task.build_model(config, nnx.Rngs(0))
    extra = task.init_extra(model)
    batch = {k: jnp.asarray(v) for k, v in task.example_batch(config, 4, seed=0).items()}
    _, (metrics, _) = jax.jit(task.loss)(model, batch, jax.random.key(0), extra, jnp.asarray(0))
    g = jnp.swapaxes(batch["global"], 0, 1).reshape(-1, 16, 16, 1)
    loc = jnp.swapaxes(batch["local"], 0, 1).reshape(-1, 8, 8, 1)
    t = np.asarray(model.dino_head(model.backbone(g)[0])).astype(np.float64)  # (2·4, K)
    s = np.concatenate([t.reshape(2, 4, -1), np.asarray(model.dino_head(model.backbone(loc)[0])).reshape(2, 4, -1)])
    q = reference_sinkhorn(t, 0.04, 1).reshape(2, 4, -1)  # step 0: the warm-up temperature
    logp = log_softmax(s / 0.1)
    want = np.mean([np.mean(np.sum(-q[i] * logp[v], axis=-1)) for i in range(2) for v in range(4) if v != i])
    np.testing.assert_allclose(float(metrics["loss_dino"]), want, rtol=1e-4)
