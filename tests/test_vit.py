"""Tests for afm_jax.models.vit and afm_jax.models.pos_embed (tiny models, CPU).

Numerical references are independent: plain-numpy ports of the MAE reference code, and (optional)
timm itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from afm_jax.models.pos_embed import get_2d_sincos_pos_embed, resample_abs_pos_embed
from afm_jax.models.vit import (
    FixedPosEmbed,
    VisionTransformer,
    drop_path,
    parse_variant,
    patchify,
    unpatchify,
)

TINY = dict(img_size=32, width=32, depth=2, num_heads=2)


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    args = dict(TINY)
    args.update(kw)
    return VisionTransformer("mu/8", rngs=nnx.Rngs(seed), **args)


@nnx.jit
def forward(model: VisionTransformer, x: jax.Array) -> jax.Array:
    """Deterministic forward, jitted: one compile per config beats many eager op compiles."""
    return model(x)


def images(b: int = 2, h: int = 32, w: int = 32, c: int = 1, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (b, h, w, c))


# -- numpy ports of the MAE reference (facebookresearch/mae util/pos_embed.py, models_mae.py) ----


def ref_get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def ref_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0)
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb_h = ref_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = ref_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def ref_patchify_nchw(imgs, p):
    """MAE reference patchify on NCHW input (its native layout)."""
    n, c, h_img, w_img = imgs.shape
    h, w = h_img // p, w_img // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = np.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


# -- variants ---------------------------------------------------------------------------------


def test_parse_variant_known_sizes():
    assert parse_variant("S/16") == dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16)
    assert parse_variant("L/16")["depth"] == 24
    h14 = parse_variant("H/14")
    assert (h14["width"], h14["depth"], h14["num_heads"], h14["patch_size"]) == (1280, 32, 16, 14)
    assert parse_variant("Ti/16")["num_heads"] == 3
    assert parse_variant("B/7")["patch_size"] == 7


@pytest.mark.parametrize("bad", ["X/16", "S16", "S/", "/16", "S/abc"])
def test_parse_variant_errors_list_valid_sizes(bad):
    with pytest.raises(ValueError, match="Ti, S"):
        parse_variant(bad)


def test_overrides_replace_variant_and_reject_unknown():
    m = VisionTransformer("S/8", img_size=32, width=32, depth=2, num_heads=2, rngs=nnx.Rngs(0))
    assert (m.embed_dim, m.depth, m.num_heads, m.mlp_dim, m.patch_size) == (32, 2, 2, 128, 8)
    assert len(m.blocks) == 2 and m.blocks[0].mlp.fc1.kernel.shape == (32, 128)
    assert m.grid_size == (4, 4) and m.num_patches == 16
    with pytest.raises(TypeError, match="widht"):
        VisionTransformer("S/8", img_size=32, widht=16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer("S/8", img_size=36, width=32, rngs=nnx.Rngs(0))


# -- patches ------------------------------------------------------------------------------------


def test_patchify_matches_mae_reference_ordering():
    x = np.random.RandomState(0).rand(2, 16, 24, 3).astype(np.float32)
    ours = np.asarray(patchify(jnp.asarray(x), 8))
    ref = ref_patchify_nchw(x.transpose(0, 3, 1, 2), 8)
    np.testing.assert_array_equal(ours, ref)
    # first patch, first row: pixels (0, 0..7) with channels innermost
    np.testing.assert_array_equal(ours[0, 0, : 8 * 3], x[0, 0, :8, :].reshape(-1))
    assert ours.shape == (2, 2 * 3, 8 * 8 * 3)


def test_unpatchify_inverts_patchify():
    x = jax.random.normal(jax.random.key(1), (3, 16, 32, 1))
    p = patchify(x, 4)
    np.testing.assert_array_equal(np.asarray(unpatchify(p, 4, (4, 8), 1)), np.asarray(x))
    with pytest.raises(ValueError):
        patchify(x, 5)


# -- position embeddings ------------------------------------------------------------------------


@pytest.mark.parametrize("dim,grid,cls", [(32, 4, True), (64, 7, False), (16, 2, True)])
def test_sincos_matches_mae_reference(dim, grid, cls):
    ours = get_2d_sincos_pos_embed(dim, grid, num_prefix_tokens=int(cls))
    ref = ref_get_2d_sincos_pos_embed(dim, grid, cls_token=cls)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_sincos_rectangular_grid_is_row_major():
    gh, gw, d = 3, 5, 16
    table = get_2d_sincos_pos_embed(d, (gh, gw))
    square = get_2d_sincos_pos_embed(d, 5)  # 5x5, rows 0..2 are the same positions
    np.testing.assert_allclose(table, square[: gh * gw], atol=1e-7)


def test_resample_identity_on_same_grid():
    pe = jax.random.normal(jax.random.key(0), (1, 1 + 16, 8))
    out = resample_abs_pos_embed(pe, (4, 4), num_prefix_tokens=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(pe))


def test_resample_shape_prefix_and_smoothness():
    # A linear ramp over the grid is reproduced by bicubic resampling away from the borders.
    old, new = 6, 12
    i, j = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
    ramp = np.stack([i + 2.0 * j, -3.0 * i + j], axis=-1).reshape(1, old * old, 2)
    prefix = np.array([[[7.0, -7.0]]])
    pe = jnp.asarray(np.concatenate([prefix, ramp], axis=1), jnp.float32)
    out = np.asarray(resample_abs_pos_embed(pe, (new, new), num_prefix_tokens=1))
    assert out.shape == (1, 1 + new * new, 2)
    np.testing.assert_array_equal(out[:, 0], prefix[:, 0])
    grid = out[0, 1:].reshape(new, new, 2)
    src = (np.arange(new) + 0.5) * old / new - 0.5  # half-pixel centres (align_corners=False)
    si, sj = np.meshgrid(src, src, indexing="ij")
    expect = np.stack([si + 2.0 * sj, -3.0 * si + sj], axis=-1)
    inner = slice(3, new - 3)
    np.testing.assert_allclose(grid[inner, inner], expect[inner, inner], atol=1e-4)
    # rectangular target, no prefix
    out2 = resample_abs_pos_embed(pe[:, 1:], (3, 9), old_size=(6, 6), num_prefix_tokens=0)
    assert out2.shape == (1, 27, 2)
    with pytest.raises(ValueError, match="prefix"):
        resample_abs_pos_embed(pe, (3, 3), old_size=(6, 6), num_prefix_tokens=0)


def test_model_runs_at_other_resolution_with_resampled_pos_embed():
    m = tiny_vit()
    x = images(2, 48, 40)
    out = forward(m, x)
    assert out.shape == (2, 1 + 6 * 5, 32)
    pe = m.patch_pos_embed((6, 5))
    expect = resample_abs_pos_embed(m.pos_embed[...][:, 1:], (6, 5), old_size=(4, 4), num_prefix_tokens=0)
    np.testing.assert_allclose(np.asarray(pe), np.asarray(expect), atol=1e-6)
    # stored grid -> the stored table itself
    np.testing.assert_array_equal(np.asarray(m.patch_pos_embed((4, 4))), m.pos_embed[...][:, 1:])


# -- the encoder --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,prefix,pos_rows",
    [
        (dict(), 1, 17),
        (dict(class_token=False), 0, 16),
        (dict(num_reg_tokens=4), 5, 21),
        (dict(num_reg_tokens=4, no_embed_class=True), 5, 16),
        (dict(class_token=False, num_reg_tokens=2, pos_embed="learned"), 2, 18),
    ],
)
def test_forward_shapes_prefix_and_registers(kw, prefix, pos_rows):
    m = tiny_vit(**kw)
    x = images()
    assert m.num_prefix_tokens == prefix
    assert m.pos_embed.shape == (1, pos_rows, 32)

    @nnx.jit  # one compile instead of many eager op compiles: keeps the file fast
    def run(m, x):
        return m(x), m.attention_maps(x)

    out, attn = run(m, x)
    assert out.shape == (2, prefix + 16, 32) and out.dtype == jnp.float32
    assert m.prefix_tokens(3).shape == (3, prefix, 32)
    assert attn.shape == (2, 2, prefix + 16, prefix + 16)
    np.testing.assert_allclose(np.asarray(attn.sum(-1)), 1.0, atol=1e-5)
    if not kw.get("class_token", True):
        with pytest.raises(ValueError, match="avg"):
            m.pooled_features(x)


@pytest.mark.parametrize("num_reg_tokens", [0, 2])
def test_pooled_features(num_reg_tokens):
    m = tiny_vit(num_reg_tokens=num_reg_tokens)
    x = images()

    @nnx.jit
    def run(m, x):
        return m(x), m.pooled_features(x), m.pooled_features(x, pool="avg")

    out, cls, avg = (np.asarray(a) for a in run(m, x))
    np.testing.assert_array_equal(cls, out[:, 0])
    np.testing.assert_allclose(avg, out[:, 1 + num_reg_tokens :].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="'cls' or 'avg'"):
        m.pooled_features(x, pool="max")


def test_prefix_pos_embed_layout():
    m = tiny_vit(num_reg_tokens=2, pos_embed="learned")
    pe = m.pos_embed[...]
    tokens = np.concatenate([m.cls_token[...], m.reg_token[...]], axis=1) + pe[:, :3]
    np.testing.assert_allclose(np.asarray(m.prefix_tokens(1)), tokens, atol=1e-7)
    m2 = tiny_vit(num_reg_tokens=2, no_embed_class=True, pos_embed="learned")
    tokens2 = np.concatenate([m2.cls_token[...], m2.reg_token[...]], axis=1)
    np.testing.assert_array_equal(np.asarray(m2.prefix_tokens(1)), tokens2)


def test_input_normalisation_applied():
    m = tiny_vit(input_mean=0.3, input_std=0.1)
    x = images()
    np.testing.assert_allclose(np.asarray(m.normalize(x)), (np.asarray(x) - 0.3) / 0.1, rtol=1e-6)
    m3 = tiny_vit(in_chans=3)
    assert m3.input_mean == (0.485, 0.456, 0.406)
    assert forward(m3, images(c=3)).shape == (2, 17, 32)
    with pytest.raises(ValueError, match="NHWC"):
        m3(images(c=1))


def test_drop_path_function_per_sample():
    x = jnp.ones((64, 3, 4))
    np.testing.assert_array_equal(np.asarray(drop_path(x, 0.5, None)), np.asarray(x))
    y = np.asarray(drop_path(x, 0.5, jax.random.key(0)))
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) == {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # whole sample kept or dropped
    assert 10 < (per_sample[:, 0] == 0).sum() < 54


def test_drop_path_identity_without_rng_random_with_it():
    m = tiny_vit(drop_path_rate=0.8)
    ref = tiny_vit(drop_path_rate=0.0)  # same seed -> same weights
    assert m.blocks[0].drop_path_rate == 0.0 and m.blocks[1].drop_path_rate == 0.8
    x = images(2)
    det = np.asarray(m(x))
    np.testing.assert_array_equal(det, np.asarray(ref(x)))
    a = np.asarray(m(x, rngs=nnx.Rngs(dropout=1)))
    b = np.asarray(m(x, rngs=nnx.Rngs(dropout=2)))
    c = np.asarray(m(x, rngs=jax.random.key(1)))
    assert not np.allclose(a, det) and not np.allclose(a, b) and not np.allclose(c, det)
    # with rate 0 an rng changes nothing
    np.testing.assert_array_equal(np.asarray(ref(x, rngs=nnx.Rngs(dropout=1))), det)


def test_bf16_compute_keeps_fp32_params_and_is_close():
    x = images(2)
    m32 = tiny_vit(num_reg_tokens=1)
    m16 = tiny_vit(num_reg_tokens=1, dtype=jnp.bfloat16)
    params = nnx.state(m16, nnx.Param)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    y32, y16 = np.asarray(forward(m32, x)), np.asarray(forward(m16, x))
    assert y16.dtype == np.float32
    assert m16.blocks[0].attn.qkv(jnp.ones((1, 1, 32))).dtype == jnp.bfloat16  # really bf16
    assert not np.array_equal(y32, y16)
    np.testing.assert_allclose(y16, y32, atol=0.1)
    assert np.abs(y16 - y32).mean() < 0.02


def test_trainable_params_exclude_fixed_pos_embed():
    m = tiny_vit()
    assert isinstance(m.pos_embed, FixedPosEmbed) and not isinstance(m.pos_embed, nnx.Param)
    _, params, rest = nnx.split(m, nnx.Param, ...)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "pos_embed" not in names and "cls_token" in names
    assert "pos_embed" in {".".join(map(str, p)) for p, _ in nnx.to_flat_state(rest)}
    learned = tiny_vit(pos_embed="learned")
    assert isinstance(learned.pos_embed, nnx.Param)
    assert "pos_embed" in {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(learned, nnx.Param))}


def test_gradients_flow_through_jitted_split_merge():
    m = tiny_vit(num_reg_tokens=1, drop_path_rate=0.1)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    x = images(2)

    @jax.jit
    def grad_fn(params, key):
        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest)(x, rngs=key) ** 2)

        return jax.grad(loss)(params)

    grads = grad_fn(params, jax.random.key(0))
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert all(np.isfinite(g).all() for g in flat.values())
    for name in ("cls_token", "reg_token", "patch_embed.proj.kernel", "blocks.1.mlp.fc2.kernel"):
        assert np.abs(flat[name]).sum() > 0, name


def test_init_follows_mae():
    m = tiny_vit()
    k = np.asarray(m.blocks[0].mlp.fc1.kernel[...])  # (32, 128): xavier bound sqrt(6/(32+128))
    bound = np.sqrt(6.0 / (32 + 128))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    # (8, 8, 1, 32) seen as (64, 32) like MAE: fan_in 64, fan_out 32 (not 32 * 64)
    pk = np.asarray(m.patch_embed.proj.kernel[...])
    pbound = np.sqrt(6.0 / (64 + 32))
    assert np.abs(pk).max() <= pbound and np.abs(pk).max() > 0.9 * pbound
    assert np.all(np.asarray(m.blocks[0].attn.qkv.bias[...]) == 0)
    assert np.all(np.asarray(m.norm.scale[...]) == 1)
    assert 0.01 < np.asarray(m.cls_token[...]).std() < 0.03


# -- pin the one-to-one naming (afm_jax.interop.timm) against timm --------------------------


def _to_timm_state_dict(model: VisionTransformer) -> dict[str, np.ndarray]:
    """The one mapping (afm_jax/interop/timm.py), pinned here against timm and a numpy reference."""
    from afm_jax.interop.timm import encoder_state_dict

    return encoder_state_dict(model)


def _np_layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_gelu(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def ref_vit_forward_numpy(sd, x_nchw, *, heads, patch, embed_class):
    """timm's VisionTransformer.forward_features in float64 numpy, from a timm-named state dict."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    n, c, h, wd = x_nchw.shape
    gh, gw = h // patch, wd // patch
    pt = x_nchw.reshape(n, c, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5)
    x = pt.reshape(n, gh * gw, -1) @ w.reshape(w.shape[0], -1).T + sd["patch_embed.proj.bias"]
    pre = [sd[k] for k in ("cls_token", "reg_token") if k in sd]
    pre = [np.broadcast_to(t, (n,) + t.shape[1:]) for t in pre]
    if embed_class:
        x = np.concatenate(pre + [x], axis=1) + sd["pos_embed"]
    else:
        x = np.concatenate(pre + [x + sd["pos_embed"]], axis=1)
    d = x.shape[-1]
    hd = d // heads
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:

        def b(k, i=i):
            return sd[f"blocks.{i}.{k}"]

        y = _np_layer_norm(x, b("norm1.weight"), b("norm1.bias"))
        qkv = (y @ b("attn.qkv.weight").T + b("attn.qkv.bias")).reshape(n, -1, 3, heads, hd)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, heads, N, hd) each
        a = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(n, -1, d)
        y = y @ b("attn.proj.weight").T + b("attn.proj.bias")
        x = x + (y * b("ls1.gamma") if f"blocks.{i}.ls1.gamma" in sd else y)
        y = _np_layer_norm(x, b("norm2.weight"), b("norm2.bias"))
        y = _np_gelu(y @ b("mlp.fc1.weight").T + b("mlp.fc1.bias"))
        y = y @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        x = x + (y * b("ls2.gamma") if f"blocks.{i}.ls2.gamma" in sd else y)
        i += 1
    return _np_layer_norm(x, sd["norm.weight"], sd["norm.bias"])


def _randomise_norms(model: VisionTransformer) -> None:
    """Non-trivial LayerNorm affine parameters so that a naming mix-up cannot hide."""
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model))):
        if path[-1] in ("scale", "bias") and path[-2] in ("norm", "norm1", "norm2"):
            offset = 1.0 if path[-1] == "scale" else 0.0
            var[...] = jax.random.normal(jax.random.key(100 + i), var.shape) * 0.1 + offset


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_reg_tokens=2, no_embed_class=True, layer_scale_init=0.5, pos_embed="learned"),
        dict(class_token=False, num_reg_tokens=1),
    ],
)
def test_matches_numpy_reference_forward(kw):
    """Pins the maths (qkv order, erf GELU, LN eps, prefix/pos layout) without timm."""
    ours = tiny_vit(seed=4, **kw)
    _randomise_norms(ours)
    x = np.asarray(images(2, seed=9))
    ref = ref_vit_forward_numpy(
        _to_timm_state_dict(ours),
        ((x - 0.5) / 0.25).transpose(0, 3, 1, 2),
        heads=2,
        patch=8,
        embed_class=not kw.get("no_embed_class", False),
    )
    np.testing.assert_allclose(np.asarray(forward(ours, jnp.asarray(x))), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_reg_tokens=2, no_embed_class=True, layer_scale_init=0.5, pos_embed="learned"),
        dict(class_token=False, num_reg_tokens=1),
    ],
)
def test_matches_timm_forward_features(kw):
    pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ours = tiny_vit(seed=3, **kw)
    _randomise_norms(ours)
    tm = TimmViT(
        img_size=32,
        patch_size=8,
        in_chans=1,
        num_classes=0,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        class_token=kw.get("class_token", True),
        reg_tokens=kw.get("num_reg_tokens", 0),
        no_embed_class=kw.get("no_embed_class", False),
        init_values=kw.get("layer_scale_init"),
        global_pool="token" if kw.get("class_token", True) else "avg",
        fc_norm=False,
        dynamic_img_size=True,
    ).eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in _to_timm_state_dict(ours).items()}
    missing, unexpected = tm.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    for h, w in [(32, 32), (48, 40)]:
        x = np.asarray(images(2, h, w, seed=h))
        xt = torch.from_numpy(((x - 0.5) / 0.25).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            ref = tm.forward_features(xt).numpy()
        np.testing.assert_allclose(np.asarray(forward(ours, jnp.asarray(x))), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("new", [(9, 11), (3, 4), (14, 14)])
def test_resample_matches_timm(new):
    pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from timm.layers import resample_abs_pos_embed as timm_resample

    pe = np.random.RandomState(0).randn(1, 1 + 5 * 7, 16).astype(np.float32)
    ref = timm_resample(torch.from_numpy(pe), list(new), old_size=[5, 7], num_prefix_tokens=1)
    ours = resample_abs_pos_embed(jnp.asarray(pe), new, old_size=(5, 7), num_prefix_tokens=1)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5)
