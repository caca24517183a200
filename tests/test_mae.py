"""Tests for afm_jax.models.mae (tiny models, CPU).

References are independent numpy re-implementations of the MAE reference code
(facebookresearch/mae ``models_mae.py``); torch, when installed, pins torch's unbiased ``var``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afm_jax.models.mae import (
    MAE,
    denormalize_patches,
    mae_loss,
    normalize_patches,
    random_masking,
)
from afm_jax.models.pos_embed import get_2d_sincos_pos_embed
from afm_jax.models.vit import FixedPosEmbed, VisionTransformer


def tiny_mae(seed: int = 0, *, norm_pix_loss: bool = True, **enc_kw) -> MAE:
    rngs = nnx.Rngs(seed)
    enc_args = dict(img_size=32, width=32, depth=2, num_heads=2)
    enc_args.update(enc_kw)
    encoder = VisionTransformer("mu/8", rngs=rngs, **enc_args)
    return MAE(
        encoder,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        norm_pix_loss=norm_pix_loss,
        rngs=rngs,
    )


def images(b: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (b, h, w, 1))


@nnx.jit
def mae_forward(model: MAE, x: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    return model(x, key=key)


def ref_patchify_nhwc(x: np.ndarray, p: int) -> np.ndarray:
    n, h, w, c = x.shape
    out = np.zeros((n, (h // p) * (w // p), p * p * c), x.dtype)
    for i in range(h // p):
        for j in range(w // p):
            out[:, i * (w // p) + j] = x[:, i * p : (i + 1) * p, j * p : (j + 1) * p, :].reshape(n, -1)
    return out


def ref_mae_loss(pred, target, mask, norm_pix_loss):
    """numpy port of models_mae.MaskedAutoencoderViT.forward_loss (torch var is unbiased)."""
    pred, target, mask = (np.asarray(a, np.float64) for a in (pred, target, mask))
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(axis=-1)
    return (loss * mask).sum() / mask.sum()


# -- masking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,keep", [(0.75, 4), (0.5, 8), (0.9, 1), (0.0, 16)])
def test_random_masking_counts_and_inverse(ratio, keep):
    b, length, d = 4, 16, 3
    tokens = jnp.asarray(np.arange(b * length * d, dtype=np.float32).reshape(b, length, d))
    kept, mask, ids_restore = random_masking(tokens, ratio, jax.random.key(0))
    kept, mask, ids_restore = map(np.asarray, (kept, mask, ids_restore))
    tok = np.asarray(tokens)
    assert kept.shape == (b, keep, d) and mask.shape == (b, length)
    np.testing.assert_array_equal(mask.sum(1), length - keep)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    for i in range(b):
        kept_ids = sorted(int(t[0]) // d - i * length for t in kept[i])
        assert len(set(kept_ids)) == keep  # no duplicates
        np.testing.assert_array_equal(np.flatnonzero(mask[i] == 0), kept_ids)
        # ids_restore inverts the shuffle: gather(kept ⊕ removed, ids_restore) == tokens
        ids_shuffle = np.argsort(ids_restore[i])
        np.testing.assert_array_equal(tok[i, ids_shuffle[:keep]], kept[i])
        shuffled = np.concatenate([kept[i], tok[i, ids_shuffle[keep:]]], axis=0)
        np.testing.assert_array_equal(shuffled[ids_restore[i]], tok[i])


def test_random_masking_differs_by_key_and_sample():
    tokens = jnp.zeros((4, 64, 2))
    _, m1, _ = random_masking(tokens, 0.75, jax.random.key(1))
    _, m2, _ = random_masking(tokens, 0.75, jax.random.key(2))
    _, m1b, _ = random_masking(tokens, 0.75, jax.random.key(1))
    m1, m2 = np.asarray(m1), np.asarray(m2)
    assert not np.array_equal(m1, m2)
    np.testing.assert_array_equal(m1, np.asarray(m1b))
    assert len({m.tobytes() for m in m1}) == 4  # per-sample masks


# -- loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_numpy_reference(norm_pix):
    rs = np.random.RandomState(0)
    pred = rs.randn(3, 10, 12).astype(np.float32)
    target = rs.rand(3, 10, 12).astype(np.float32) * 2 - 0.5
    mask = (rs.rand(3, 10) < 0.7).astype(np.float32)
    ours = float(mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), norm_pix))
    np.testing.assert_allclose(ours, ref_mae_loss(pred, target, mask, norm_pix), rtol=1e-5)
    if norm_pix:  # the biased variance would be measurably different: ddof matters
        biased = target.var(-1, keepdims=True)
        t_b = (target - target.mean(-1, keepdims=True)) / np.sqrt(biased + 1e-6)
        wrong = ((((pred - t_b) ** 2).mean(-1)) * mask).sum() / mask.sum()
        assert abs(ours - wrong) > 1e-3
    # only removed patches count
    pred2 = pred.copy()
    pred2[mask == 0] += 100.0
    assert float(mae_loss(jnp.asarray(pred2), jnp.asarray(target), jnp.asarray(mask), norm_pix)) == (
        pytest.approx(ours, rel=1e-6)
    )


def test_norm_pix_uses_torch_default_unbiased_var():
    torch = pytest.importorskip("torch")
    target = np.random.RandomState(1).rand(2, 5, 16).astype(np.float32)
    t = torch.from_numpy(target)
    ref = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    np.testing.assert_allclose(np.asarray(normalize_patches(jnp.asarray(target))), ref.numpy(), atol=1e-5)
    back = denormalize_patches(normalize_patches(jnp.asarray(target)), jnp.asarray(target))
    np.testing.assert_allclose(np.asarray(back), target, atol=1e-5)


# -- the model ----------------------------------------------------------------------------------


def test_mae_forward_shapes_and_loss_matches_reference():
    model = tiny_mae()
    x = images()
    out = mae_forward(model, x, jax.random.key(0))
    assert out["pred"].shape == (2, 16, 64) and out["mask"].shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(out["mask"]).sum(1), 12)
    # target = patchify of the encoder's normalised input, as the reference
    target = ref_patchify_nhwc((np.asarray(x) - 0.5) / 0.25, 8)
    expect = ref_mae_loss(out["pred"], target, out["mask"], True)
    np.testing.assert_allclose(float(out["loss"]), expect, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.target_patches(x)), target, atol=1e-6)
    # decoder table: fixed sin-cos with a class slot, excluded from the trainable parameters
    assert isinstance(model.decoder_pos_embed, FixedPosEmbed)
    np.testing.assert_allclose(model.decoder_pos_embed[...][0], get_2d_sincos_pos_embed(32, 4, 1), atol=1e-7)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "decoder_pos_embed" not in names and "encoder.pos_embed" not in names
    assert {
        "mask_token",
        "decoder_embed.kernel",
        "decoder_pred.kernel",
        "decoder_blocks.0.attn.qkv.kernel",
        "encoder.cls_token",
    } <= names
    # different mask keys -> different masks and losses
    out2 = mae_forward(model, x, jax.random.key(1))
    assert not np.array_equal(np.asarray(out["mask"]), np.asarray(out2["mask"]))


def test_encoder_sees_only_visible_patches():
    model = tiny_mae(num_reg_tokens=2)
    x = np.asarray(images())
    key = jax.random.key(3)
    latent, mask, ids_restore, grid = model.forward_encoder(jnp.asarray(x), key)
    assert latent.shape == (2, 1 + 2 + 4, 32) and grid == (4, 4)
    # change every removed patch: the encoder output must not move
    y = x.copy()
    m = np.asarray(mask)
    for b in range(2):
        for idx in np.flatnonzero(m[b]):
            i, j = divmod(int(idx), 4)
            patch = (b, slice(i * 8, (i + 1) * 8), slice(j * 8, (j + 1) * 8))
            y[patch] = 1.0 - y[patch]
    latent2, mask2, _, _ = model.forward_encoder(jnp.asarray(y), key)
    np.testing.assert_array_equal(np.asarray(mask2), m)
    np.testing.assert_allclose(np.asarray(latent2), np.asarray(latent), atol=1e-6)
    # registers are dropped before the decoder: it predicts L patches from cls + patches
    pred = model.forward_decoder(latent, ids_restore, grid)
    assert pred.shape == (2, 16, 64)
    assert model.decoder_pos_embed.shape == (1, 17, 32)


def test_decoder_places_tokens_at_their_patch_positions():
    """Reference decoder input built by explicit numpy scatter (not the module's gather)."""
    model = tiny_mae(num_reg_tokens=2)
    latent, mask, ids_restore, grid = model.forward_encoder(images(), jax.random.key(7))
    pred = np.asarray(model.forward_decoder(latent, ids_restore, grid))
    emb = np.asarray(model.decoder_embed(latent))  # (B, cls + 2 regs + 4 kept, Dd)
    ids_shuffle = np.argsort(np.asarray(ids_restore), axis=1)
    full = np.broadcast_to(np.asarray(model.mask_token[...]), (2, 16, 32)).copy()
    for b in range(2):
        for k in range(4):
            full[b, ids_shuffle[b, k]] = emb[b, 3 + k]
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(mask)[b] == 0), np.sort(ids_shuffle[b, :4]))
    seq = np.concatenate([emb[:, :1], full], axis=1) + np.asarray(model.decoder_pos_embed[...])
    y = jnp.asarray(seq)
    for block in model.decoder_blocks:
        y = block(y)
    ref = np.asarray(model.decoder_pred(model.decoder_norm(y)))[:, 1:]
    np.testing.assert_allclose(pred, ref, atol=1e-5)


def test_mae_without_class_token_and_at_other_resolution():
    model = tiny_mae(class_token=False, num_reg_tokens=1, norm_pix_loss=False)
    assert model.decoder_pos_embed.shape == (1, 16, 32)
    out = mae_forward(model, images(2, 48, 40), jax.random.key(0))
    assert out["pred"].shape == (2, 30, 64)
    np.testing.assert_array_equal(np.asarray(out["mask"]).sum(1), 30 - int(30 * 0.25))
    assert np.isfinite(float(out["loss"]))


def test_reconstruct_pastes_visible_patches():
    model = tiny_mae()
    x = images()

    @nnx.jit
    def run(model, x, key):
        return model.reconstruct(x, key=key), model(x, key=key)["mask"]

    (masked, recon), mask = run(model, x, jax.random.key(5))
    assert masked.shape == x.shape and recon.shape == x.shape
    mask = np.asarray(mask)
    xs, ms, rs = (np.asarray(a) for a in (x, masked, recon))
    for b in range(2):
        for idx in range(16):
            i, j = divmod(idx, 4)
            sl = (b, slice(i * 8, (i + 1) * 8), slice(j * 8, (j + 1) * 8))
            if mask[b, idx]:
                assert np.all(ms[sl] == 0) and not np.allclose(rs[sl], xs[sl])
            else:
                np.testing.assert_array_equal(rs[sl], xs[sl])
                np.testing.assert_array_equal(ms[sl], xs[sl])


def test_training_steps_reduce_loss():
    model = tiny_mae(drop_path_rate=0.1)
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3, b2=0.95), wrt=nnx.Param)
    x = images(4)

    @nnx.jit
    def step(model, optimizer, key):
        mask_key, dp_key = jax.random.split(key)

        def loss_fn(model):
            return model(x, key=mask_key, rngs=dp_key)["loss"]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    pos_before = np.asarray(model.encoder.pos_embed[...])
    key = jax.random.key(0)
    losses = [float(step(model, optimizer, key)) for _ in range(15)]  # same mask: pure fitting
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses
    np.testing.assert_array_equal(np.asarray(model.encoder.pos_embed[...]), pos_before)
