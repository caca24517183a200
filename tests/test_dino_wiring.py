"""How DINO's pieces are wired in training, each against an independent reference: the centre used by
the loss and its update, the iBOT mask inside the ViT backbone, the last-layer freeze against
PyTorch's AdamW, and DINOv2's per-module clipping against torch's `clip_grad_norm_`.

Each test fails on the wiring mistake named in its docstring (tried by hand, see the issue 13 note).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dino_helpers import log_softmax, setup_dino_task, softmax
from flax import nnx

from afm_jax.train import dino_schedules
from afm_jax.train import state as state_lib
from afm_jax.train import step as step_lib
from afm_jax.train.defaults import default_config


def _config(path, **dino):
    config = default_config("dino", "mu/8")
    config.data.path = os.fspath(path)
    config.data.num_workers = 0
    config.image_size = 16
    config.batch_size = 4
    config.multicrop.update(num_local=2, local_size=8)
    config.model.update(width=32, depth=1, num_heads=2, drop_path_rate=0.0)
    config.dino.update(**{**dict(out_dim=32, hidden_dim=32, bottleneck_dim=16, warmup_teacher_temp_epochs=5.0), **dino})
    config.optim.update(grad_clip_norm=0.0)
    return config


def test_step_loss_uses_the_centre_before_its_update_and_the_centre_keeps_momentum(synthetic_dataset):
    """One real train step from a *non-zero* centre c: the logged DINO loss equals DINO's
    `DINOLoss.forward` (numpy: teacher softmax((t - c)/τ_t(step)), student log-softmax(s/0.1), mean over
    pairs of different views), and the centre afterwards is 0.9·c + 0.1·mean(t) (`update_center`).
    Fails when the centre is updated before the loss, or when its momentum is dropped."""
    config = _config(synthetic_dataset)
    task = setup_dino_task(config, total_steps=20, steps_per_epoch=2)  # teacher temp ramps over 10 steps
    model = task.build_model(config, nnx.Rngs(0))
    _, params, _ = state_lib.split_model(model)
    tx = task.make_optimizer(config, optax.constant_schedule(1e-3), params)
    extra = task.init_extra(model)
    center = jax.random.normal(jax.random.key(1), extra["center"].shape) * 2.0
    extra["center"] = center
    graphdef, state = state_lib.create_train_state(model, tx, 0, extra)
    step_no = 3
    state = state.replace(step=jnp.asarray(step_no, state.step.dtype))
    batch = {k: jnp.asarray(v) for k, v in task.example_batch(config, 4, seed=0).items()}

    # Reference inputs: the teacher's and student's logits of this batch (drop-path is 0, so the
    # student's forward in the step is this deterministic one).
    g = jnp.swapaxes(batch["global"], 0, 1).reshape(-1, 16, 16, 1)
    loc = jnp.swapaxes(batch["local"], 0, 1).reshape(-1, 8, 8, 1)
    t = np.asarray(model.dino_head(model.backbone(g)[0])).reshape(2, 4, -1)  # teacher = student at init
    s = np.concatenate(
        [
            np.asarray(model.dino_head(model.backbone(g)[0])).reshape(2, 4, -1),
            np.asarray(model.dino_head(model.backbone(loc)[0])).reshape(2, 4, -1),
        ]
    )
    temp = 0.04 + (0.07 - 0.04) * step_no / 10  # linear warm-up, per step
    q = softmax((t - np.asarray(center)) / temp)
    logp = log_softmax(s / 0.1)
    terms = [np.mean(np.sum(-q[i] * logp[v], axis=-1)) for i in range(2) for v in range(4) if v != i]
    want_loss = np.mean(terms)

    train_step = jax.jit(
        step_lib.make_train_step(graphdef, task.loss, tx, optax.constant_schedule(1e-3), update_extra=task.update_extra)
    )
    new_state, metrics = train_step(state, batch)
    np.testing.assert_allclose(float(metrics["loss_dino"]), want_loss, rtol=1e-5)
    want_center = 0.9 * np.asarray(center) + 0.1 * t.mean(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(new_state.extra["center"]), want_center, rtol=1e-5, atol=1e-6)


def test_vit_backbone_puts_the_mask_token_at_the_masked_patches_before_the_position_embedding(synthetic_dataset):
    """The tokens `DINOModel.backbone(x, masks)` feeds to the blocks, against numpy: patch i is
    mask_token + pos_i where masked, patch_embed(x)_i + pos_i elsewhere (DINOv2
    `prepare_tokens_with_masks`). Fails when the mask is inverted or applied after the position
    embedding."""
    config = _config(synthetic_dataset, ibot=dict(enabled=True))
    task = setup_dino_task(config)
    model = task.build_model(config, nnx.Rngs(0))
    model.mask_token[...] = jax.random.normal(jax.random.key(2), model.mask_token.shape)
    enc = model.encoder
    images = jax.random.uniform(jax.random.key(3), (2, 16, 16, 1))
    masks = np.zeros((2, 4), bool)
    masks[0, [1, 2]] = True
    masks[1, [0]] = True
    seen = {}
    original = enc.encode_tokens

    def capture(tokens, *, rngs=None, **kwargs):  # kwargs: grid_hw / kept ids (RoPE positions)
        seen["tokens"] = np.asarray(tokens)
        return original(tokens, rngs=rngs, **kwargs)

    enc.encode_tokens = capture
    model.backbone(images, masks=jnp.asarray(masks))
    del enc.encode_tokens

    # numpy patch embedding: (x - 0.5) / 0.25, 8x8 patches row-major, kernel (p, p, C, D)
    x = (np.asarray(images) - 0.5) / 0.25
    patches = x.reshape(2, 2, 8, 2, 8, 1).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 64)
    kernel = np.asarray(enc.patch_embed.proj.kernel[...]).reshape(64, -1)
    emb = patches @ kernel + np.asarray(enc.patch_embed.proj.bias[...])
    pos = np.asarray(enc.pos_embed[...])[0]  # learned, with the class-token slot first
    want = np.where(masks[..., None], np.asarray(model.mask_token[...])[0], emb) + pos[1:]
    np.testing.assert_allclose(seen["tokens"][:, 1:], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        seen["tokens"][:, 0],
        np.broadcast_to(np.asarray(enc.cls_token[...])[0, 0] + pos[0], (2, pos.shape[1])),
        rtol=1e-6,
    )


def test_vit_backbone_without_masked_patches_is_the_plain_encoder(synthetic_dataset):
    """Nothing masked (an all-False mask, or none): the class and patch tokens of `backbone` are the
    encoder's own forward (`VisionTransformer.__call__`, timm's forward_features)."""
    config = _config(synthetic_dataset, ibot=dict(enabled=True))
    config.model.update(depth=2, num_reg_tokens=2)
    task = setup_dino_task(config)
    model = task.build_model(config, nnx.Rngs(0))
    model.mask_token[...] = jnp.ones(model.mask_token.shape) * 3.0
    images = jax.random.uniform(jax.random.key(4), (3, 16, 16, 1))
    plain = np.asarray(model.encoder(images))
    for masks in (None, jnp.zeros((3, 4), bool)):
        cls, patch = model.backbone(images, masks=masks)
        np.testing.assert_allclose(np.asarray(cls), plain[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(patch), plain[:, 3:], rtol=1e-5, atol=1e-6)


# ─── Last-layer freeze against PyTorch's AdamW ───────────────────────────────────────────────────


def _torch_adamw_trajectory(init, grads, *, lr, wd, freeze, mode, betas=(0.9, 0.999), eps=1e-8):
    """The reference loops: DINO v1 (`cancel_gradients_last_layer`: p.grad = None while frozen, so
    torch's AdamW skips the parameter) or DINOv2 (the last layer's param group has lr 0 while frozen,
    its gradients still reach AdamW). Weight decay per step as DINO sets `param_group["weight_decay"]`."""
    torch = pytest.importorskip("torch")
    last = torch.nn.Parameter(torch.tensor(init["last_layer"], dtype=torch.float64))
    other = torch.nn.Parameter(torch.tensor(init["other"], dtype=torch.float64))
    opt = torch.optim.AdamW([{"params": [other]}, {"params": [last], "is_last": True}], lr=lr, betas=betas, eps=eps)
    out = []
    for step, g in enumerate(grads):
        for group in opt.param_groups:
            group["weight_decay"] = wd(step)
            group["lr"] = 0.0 if (mode == "lr_zero" and group.get("is_last") and step < freeze) else lr
        other.grad = torch.tensor(g["other"], dtype=torch.float64)
        last.grad = (
            None if (mode == "fresh_adam" and step < freeze) else torch.tensor(g["last_layer"], dtype=torch.float64)
        )
        opt.step()
        out.append({"last_layer": last.detach().numpy().copy(), "other": other.detach().numpy().copy()})
    return out


@pytest.mark.parametrize("mode", ["fresh_adam", "lr_zero"])
def test_last_layer_freeze_matches_torch_adamw(synthetic_dataset, mode):
    """`make_dino_optimizer`'s freeze against torch: frozen for 3 steps, then 4 steps of training with
    random gradients. Fails for the old behaviour (gradients zeroed before a shared-count Adam: the
    first unfrozen updates are several times the reference's) and for the other mode's semantics."""
    config = _config(synthetic_dataset, freeze_last_layer_mode=mode)
    task = setup_dino_task(config, total_steps=7, steps_per_epoch=3)
    assert task.freeze_steps == 3
    rng = np.random.default_rng(0)
    params = {
        "dino_head": {"last_layer": {"weight_v": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}},
        "encoder": {"blocks": {"0": {"kernel": jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)}}},
    }
    lr = 0.01
    tx = task.make_optimizer(config, optax.constant_schedule(lr), params)
    wd = dino_schedules.weight_decay_schedule(0.04, 0.4, 7)
    grads = [{"last_layer": rng.standard_normal((4, 5)), "other": rng.standard_normal((3, 3))} for _ in range(7)]
    ref = _torch_adamw_trajectory(
        {
            "last_layer": np.asarray(params["dino_head"]["last_layer"]["weight_v"]),
            "other": np.asarray(params["encoder"]["blocks"]["0"]["kernel"]),
        },
        grads,
        lr=lr,
        wd=lambda t: float(wd(t)),
        freeze=3,
        mode=mode,
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step, g in enumerate(grads):
        tree = {
            "dino_head": {"last_layer": {"weight_v": jnp.asarray(g["last_layer"], jnp.float32)}},
            "encoder": {"blocks": {"0": {"kernel": jnp.asarray(g["other"], jnp.float32)}}},
        }
        updates, state = update(tree, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(
            np.asarray(params["dino_head"]["last_layer"]["weight_v"]),
            ref[step]["last_layer"],
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"last layer, step {step}",
        )
        np.testing.assert_allclose(
            np.asarray(params["encoder"]["blocks"]["0"]["kernel"]),
            ref[step]["other"],
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"other, step {step}",
        )


def test_per_module_clipping_matches_torch_clip_grad_norm_per_student_module():
    """DINOv2 train.py: `for v in model.student.values(): v.clip_grad_norm_(3.0)` — backbone (with the
    mask token), DINO head and iBOT head each by their own norm."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    grads = {
        "encoder": {"a": rng.standard_normal((3, 4)) * 5, "b": rng.standard_normal(4)},
        "mask_token": rng.standard_normal((1, 1, 4)) * 5,
        "dino_head": {"w": rng.standard_normal((4, 4)) * 0.1},
        "ibot_head": {"w": rng.standard_normal((4, 4)) * 9},
    }
    from afm_jax.train.optim import _module_of

    module_of = jax.tree_util.tree_map_with_path(lambda path, _: _module_of(path), grads)
    tx = dino_schedules.clip_per_module(3.0, module_of)
    ours, _ = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads), tx.init(grads))
    groups = {
        "backbone": [("encoder", "a"), ("encoder", "b"), ("mask_token",)],
        "dino_head": [("dino_head", "w")],
        "ibot_head": [("ibot_head", "w")],
    }
    for keys in groups.values():
        tensors = []
        for k in keys:
            node = grads
            for part in k:
                node = node[part]
            p = torch.nn.Parameter(torch.zeros(node.shape, dtype=torch.float64))
            p.grad = torch.tensor(node, dtype=torch.float64)
            tensors.append((k, p))
        torch.nn.utils.clip_grad_norm_([p for _, p in tensors], 3.0)
        for k, p in tensors:
            node = ours
            for part in k:
                node = node[part]
            np.testing.assert_allclose(np.asarray(node), p.grad.numpy(), rtol=1e-5, err_msg=str(k))
