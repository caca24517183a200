"""Vision Transformer encoder (Flax NNX) whose parameter tree mirrors timm's ``VisionTransformer``.

What: the ViT backbone shared by MAE, DINO and every evaluation (kNN, linear probe, fine-tune),
selected by a variant string such as ``"S/16"`` or ``"L/16"``.

Why it looks like this:

* **One-to-one with timm.** Every parameter sits at the path of the timm state-dict key it maps to
  (``cls_token``, ``reg_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1``,
  ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.ls1.gamma``, ``blocks.{i}.norm2``,
  ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``blocks.{i}.ls2.gamma``, ``norm``), so
  ``afm_jax/interop/timm.py`` only renames leaves (``kernel``/``scale`` -> ``weight``) and
  transposes; the maths (qkv split order ``(B, N, 3, heads, head_dim)``, exact-erf GELU, LayerNorm
  eps 1e-6, prefix-token/pos-embed layout incl. ``no_embed_class``) equals timm's
  ``forward_features`` (pinned by ``tests/test_vit.py`` against a float64 numpy port of it, and
  against timm itself when timm is installed).
* **Grey-scale first.** One input channel by default; images are float ``(B, H, W, C)`` in [0, 1]
  and are normalised with ``input_mean``/``input_std`` at the model's input (design contract).
* **Fixed or learned position embedding.** MAE-style fixed 2-D sin-cos is stored as
  :class:`FixedPosEmbed`, a non-``Param`` variable, so ``nnx.split(model, nnx.Param, ...)`` leaves
  it out of the optimised parameters; ``pos_embed="learned"`` makes it an ``nnx.Param``. When the
  input grid differs from the stored one the grid part is resampled on the fly (timm's
  ``dynamic_img_size``), so a model trained at 224 px can be evaluated at 448 px.
* **2-D RoPE (DINOv3).** ``pos_embed="rope"`` drops the absolute table and rotates q/k of the patch
  tokens in every block (:func:`rope_sincos`, :func:`apply_rope`; timm's ``RotaryEmbeddingDinoV3``,
  pinned by ``tests/test_dinov3.py`` against timm's ``vit_*_patch16_dinov3``); with ``qkv_bias``,
  ``norm_eps=1e-5``, 4 register ("storage") tokens and LayerScale it is DINOv3's ViT.
* **Mixed precision.** ``param_dtype`` (fp32) for storage, ``dtype`` (e.g. bf16) for matmuls. The
  residual stream stays fp32 (as under torch autocast); LayerNorm statistics and the attention
  softmax are computed in fp32; outputs are fp32.

Patch embedding: ``patch_embed.proj`` is an ``nnx.Conv`` (kernel ``(p, p, C, D)``, stride ``p``,
VALID), applied as a convolution. The same kernel applied as a matmul on :func:`patchify`-ed
pixels was measured on the 2-core CPU box (S/16, 224 px, batch 8, jitted forward+backward): the
whole step was no faster (2.67 s conv vs 2.80 s matmul, best of 5) and the patch embedding alone
was slower (12.0 ms vs 7.8 ms), so the conv is kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afm_jax.models.pos_embed import (
    INTERPOLATIONS,
    get_2d_sincos_pos_embed,
    resample_abs_pos_embed,
    resample_pos_embed_dino,
)

__all__ = [
    "VIT_SIZES",
    "FixedPosEmbed",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "LayerScale",
    "Block",
    "VisionTransformer",
    "parse_variant",
    "patchify",
    "unpatchify",
    "drop_path",
    "INIT_SCHEMES",
    "trunc_normal",
]

# Parameter initialisation (config `model.init`), each the scheme of the paper named:
# "mae":    xavier-uniform Linear kernels and patch embedding (as a matrix), tokens N(0, 0.02) (MAE).
# "dino":   Linear kernels trunc-normal with a real std of 0.02, the patch-embedding conv at torch's
#           default U(+-1/sqrt(fan_in)), class token trunc-normal 0.02 (DINO `vision_transformer.py`).
# "dinov2": as "dino", but class and register tokens N(0, 1e-6) (DINOv2 `DinoVisionTransformer.init_weights`).
# Biases start at zero and a learned position embedding trunc-normal 0.02 in all of them.
INIT_SCHEMES = ("mae", "dino", "dinov2")

# width, depth, num_heads, mlp_dim — as big_vision / timm (mlp ratio 4). "mu" is big_vision's tiny
# debugging size.
VIT_SIZES: dict[str, dict[str, int]] = {
    "mu": dict(width=32, depth=1, num_heads=2, mlp_dim=128),
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "M": dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}

_OVERRIDE_KEYS = ("width", "depth", "num_heads", "mlp_dim")


class FixedPosEmbed(nnx.Variable):
    """A position embedding that is *not* trained (fixed sin-cos table).

    Being a distinct ``nnx.Variable`` type (not ``nnx.Param``) keeps it out of
    ``nnx.split(model, nnx.Param, ...)`` / ``nnx.Optimizer(..., wrt=nnx.Param)`` while it still
    travels with the model state into checkpoints and exports.
    """


def parse_variant(variant: str) -> dict[str, int]:
    """Parse ``"<size>/<patch>"`` (e.g. ``"S/16"``, ``"L/16"``, ``"H/14"``, ``"mu/8"``).

    Returns:
      ``{'width', 'depth', 'num_heads', 'mlp_dim', 'patch_size'}``.

    Raises:
      ValueError: naming the valid sizes when the string is malformed or the size is unknown.
    """
    match = re.fullmatch(r"\s*([A-Za-z]+)\s*/\s*(\d+)\s*", str(variant))
    valid = ", ".join(VIT_SIZES)
    if match is None:
        raise ValueError(
            f"ViT variant {variant!r} is not of the form '<size>/<patch>', e.g. 'S/16' or 'L/16'; valid sizes: {valid}."
        )
    size, patch = match.group(1), int(match.group(2))
    if size not in VIT_SIZES:
        raise ValueError(f"Unknown ViT size {size!r} in variant {variant!r}; valid sizes: {valid}.")
    if patch < 1:
        raise ValueError(f"Patch size must be a positive integer, got {patch} in {variant!r}.")
    return dict(VIT_SIZES[size], patch_size=patch)


# ----------------------------------------------------------------------------------------------
# Patches.
# ----------------------------------------------------------------------------------------------


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, N, p*p*C)``, MAE convention.

    Patches are row-major over the grid; inside a patch the order is ``(p, q, c)`` (row, column,
    channel), i.e. the MAE reference's ``'nchpwq->nhwpqc'`` written for NHWC input.
    """
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
    gh, gw = h // p, w // p
    x = images.reshape(b, gh, p, gw, p, c)
    x = jnp.einsum("nhpwqc->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid_hw: Sequence[int], channels: int) -> jax.Array:
    """Inverse of :func:`patchify`: ``(B, gh*gw, p*p*C)`` -> ``(B, gh*p, gw*p, C)``."""
    b, n, _ = patches.shape
    gh, gw = (int(grid_hw[0]), int(grid_hw[1]))
    p = patch_size
    if n != gh * gw:
        raise ValueError(f"{n} patches do not fill a {gh}x{gw} grid.")
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = jnp.einsum("nhwpqc->nhpwqc", x)
    return x.reshape(b, gh * p, gw * p, channels)


# ----------------------------------------------------------------------------------------------
# Layers (names follow timm).
# ----------------------------------------------------------------------------------------------


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: drop the whole residual branch per sample, scale survivors by 1/keep.

    Identity when ``key`` is None or ``rate == 0`` (timm's ``DropPath`` with ``scale_by_keep``).
    """
    if key is None or rate <= 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(key, keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def trunc_normal(std: float = 0.02, lower: float = -2.0, upper: float = 2.0) -> nnx.Initializer:
    """timm's ``trunc_normal_(std=std)``: N(0, std^2) cut at *absolute* bounds -2, 2, so at std 0.02 the
    cut is 100 std away and the real std is ``std``. (``jax.nn.initializers.truncated_normal(std)``
    cuts at 2 std instead: real std 0.88 x ``std``.) At 100 std a clip and a redraw are the same."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.clip(jax.random.normal(key, shape, jnp.float32) * std, lower, upper).astype(dtype)

    return init


def _torch_default_uniform(fan_in: int) -> nnx.Initializer:
    """torch's default Linear/Conv init, kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _xavier_uniform() -> nnx.Initializer:
    return nnx.initializers.xavier_uniform()


def _linear_init(init: str) -> nnx.Initializer:
    return _xavier_uniform() if init == "mae" else trunc_normal(0.02)


def _zeros() -> nnx.Initializer:
    return nnx.initializers.zeros_init()


def _linear_kwargs(dtype: Any, param_dtype: Any, init: str, rngs: nnx.Rngs) -> dict[str, Any]:
    """``nnx.Linear`` keyword arguments of the blocks' projections: the scheme's kernel init, zero bias."""
    return dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_linear_init(init), bias_init=_zeros(), rngs=rngs)


def _layer_norm(dim: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
    # use_fast_variance=True (var = E[x^2] - mean^2): the two-pass form E[(x-mean)^2] makes XLA:CPU
    # rebuild the residual-stream gradient chain inside every block's backward, so step time grew
    # quadratically with depth (measured ~1.9x slower for ViT-S/16, bench/README.md). In fp32 the
    # difference to torch's two-pass LayerNorm stays far below the 1e-4 timm parity tolerance.
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=True,
        rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """Non-overlapping ``p x p`` patches -> ``D`` channels (timm ``patch_embed.proj``).

    Init (``init``): MAE's xavier-uniform on the kernel viewed as ``(p*p*C, D)`` with zero bias, or
    (``"dino"``/``"dinov2"``) torch's default conv init, which DINO and DINOv2 keep.
    """

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        init: str = "mae",
        rngs: nnx.Rngs,
    ):
        self.patch_size = patch_size
        fan_in = patch_size * patch_size * in_chans
        if init == "mae":  # MAE: xavier on the kernel viewed as a (p*p*C, D) matrix, zero bias
            kernel_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
            bias_init = _zeros()
        else:  # DINO/DINOv2 leave the conv at torch's default init
            kernel_init = bias_init = _torch_default_uniform(fan_in)
        self.proj = nnx.Conv(
            in_chans,
            embed_dim,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        """``(B, H, W, C)`` -> ``(B, H/p, W/p, D)``."""
        _, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"Image size {h}x{w} is not divisible by the patch size {p}; resize or crop the "
                f"input to a multiple of {p}."
            )
        return self.proj(images)


# ----------------------------------------------------------------------------------------------
# 2-D rotary position embedding (DINOv3; timm RotaryEmbeddingDinoV3, rotate-half layout).
# ----------------------------------------------------------------------------------------------


def rope_sincos(grid_hw: Sequence[int], head_dim: int, temperature: float = 100.0) -> tuple[jax.Array, jax.Array]:
    """``(sin, cos)``, each ``(gh*gw, head_dim)`` float32, of DINOv3's 2-D RoPE over a patch grid.

    Patch centres are normalised per axis to [-1, 1] (``(i + 0.5) / n * 2 - 1``, row-major, y then x);
    ``head_dim // 4`` periods ``temperature ** (2 k / (head_dim / 2))``; angles ``2 pi coord / period``
    for y then x, repeated twice (the rotate-half layout). As timm's ``RotaryEmbeddingDinoV3`` and
    DINOv3's ``RopePositionEmbedding`` (eval mode: no coordinate augmentation).
    """
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}.")
    n = head_dim // 4
    periods = jnp.float32(temperature) ** (2.0 * jnp.arange(n, dtype=jnp.float32) / (head_dim // 2))
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    ys = (jnp.arange(gh, dtype=jnp.float32) + 0.5) / gh * 2.0 - 1.0
    xs = (jnp.arange(gw, dtype=jnp.float32) + 0.5) / gw * 2.0 - 1.0
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)  # (N, 2)
    angles = (2.0 * jnp.pi * coords[:, :, None] / periods).reshape(-1, 2 * n)  # (N, head_dim / 2)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates ``x`` ``(B, N, heads, head_dim)`` by ``sin``/``cos`` ``(N or (B, N), head_dim)``, in fp32,
    returned in ``x``'s dtype: ``x cos + rotate_half(x) sin`` with ``rotate_half([a, b]) = [-b, a]``."""
    xf = x.astype(jnp.float32)
    if sin.ndim == 2:
        sin, cos = sin[None], cos[None]
    a, b = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-b, a], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm ``Attention``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        init: str = "mae",
        qkv_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"Width {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.implementation = implementation
        kw = _linear_kwargs(dtype, param_dtype, init, rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
        self.proj = nnx.Linear(dim, dim, **kw)

    def _qkv(self, x: jax.Array, rope: tuple | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v ``(B, N, heads, head_dim)``; ``rope = (sin, cos)`` per token (``(N or (B, N),
        head_dim)``; prefix tokens get sin 0, cos 1: no rotation) rotates q and k."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # timm's order
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def attention_weights(self, x: jax.Array, rope: tuple | None = None) -> jax.Array:
        """Softmax attention probabilities ``(B, heads, N, N)``, float32."""
        q, k, _ = self._qkv(x, rope)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (self.head_dim**-0.5)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def __call__(self, x: jax.Array, rope: tuple | None = None) -> jax.Array:
        b, n, d = x.shape
        q, k, v = self._qkv(x, rope)
        # Softmax in fp32 inside (xla path); implementation="cudnn" gives fused attention on GPUs.
        o = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return self.proj(o.reshape(b, n, d))


class Mlp(nnx.Module):
    """``fc1`` -> exact (erf) GELU -> ``fc2`` (timm ``Mlp``)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        init: str = "mae",
        rngs: nnx.Rngs,
    ):
        kw = _linear_kwargs(dtype, param_dtype, init, rngs)
        self.fc1 = nnx.Linear(dim, hidden_dim, **kw)
        self.fc2 = nnx.Linear(hidden_dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LayerScale(nnx.Module):
    """Per-channel residual scale ``gamma`` (CaiT / DINOv2; timm ``LayerScale``)."""

    def __init__(self, dim: int, init_value: float, *, param_dtype: Any = jnp.float32):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, dtype=param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block (timm ``Block``).

    ``x + drop_path(ls1(attn(norm1(x))))`` then ``x + drop_path(ls2(mlp(norm2(x))))``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        attn_implementation: str | None = None,
        init: str = "mae",
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        rngs: nnx.Rngs,
    ):
        self.drop_path_rate = float(drop_path_rate)
        self.norm1 = _layer_norm(dim, dtype, param_dtype, rngs, norm_eps)
        self.attn = Attention(
            dim,
            num_heads,
            dtype=dtype,
            param_dtype=param_dtype,
            implementation=attn_implementation,
            init=init,
            qkv_bias=qkv_bias,
            rngs=rngs,
        )
        self.ls1 = LayerScale(dim, layer_scale_init, param_dtype=param_dtype) if layer_scale_init is not None else None
        self.norm2 = _layer_norm(dim, dtype, param_dtype, rngs, norm_eps)
        self.mlp = Mlp(dim, mlp_dim, dtype=dtype, param_dtype=param_dtype, init=init, rngs=rngs)
        self.ls2 = LayerScale(dim, layer_scale_init, param_dtype=param_dtype) if layer_scale_init is not None else None

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None, rope: tuple | None = None) -> jax.Array:
        """``key`` enables drop-path (training); without it the block is deterministic. ``rope``:
        ``(sin, cos)`` per token for a RoPE encoder (see :meth:`Attention._qkv`)."""
        k1 = k2 = None
        if key is not None and self.drop_path_rate > 0.0:
            k1, k2 = jax.random.split(key)
        y = self.attn(self.norm1(x), rope)
        if self.ls1 is not None:
            y = self.ls1(y)
        x = x + drop_path(y, self.drop_path_rate, k1).astype(x.dtype)
        y = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = self.ls2(y)
        return x + drop_path(y, self.drop_path_rate, k2).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# The encoder.
# ----------------------------------------------------------------------------------------------


def _default_norm(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans == 1:
        return (0.5,), (0.25,)
    if in_chans == 3:  # ImageNet statistics, for 3-channel models at the PyTorch boundary
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return (0.5,) * in_chans, (0.25,) * in_chans


def _as_channel_tuple(v: float | Sequence[float], in_chans: int, name: str) -> tuple[float, ...]:
    t = (float(v),) * in_chans if np.isscalar(v) else tuple(float(a) for a in v)
    if len(t) == 1 and in_chans > 1:
        t = t * in_chans
    if len(t) != in_chans:
        raise ValueError(f"{name} has {len(t)} values but the model has in_chans={in_chans}.")
    return t


def _dropout_keys(rngs: nnx.Rngs | jax.Array | None, n: int) -> list[jax.Array | None]:
    if rngs is None:
        return [None] * n
    if isinstance(rngs, nnx.Rngs):
        return [rngs.dropout() for _ in range(n)]
    return list(jax.random.split(rngs, n))


# Activation rematerialisation per block (config `model.remat`): what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_call(block: "Block", x: jax.Array, key: jax.Array | None, rope: tuple | None = None) -> jax.Array:
    return block(x, key=key, rope=rope)


class VisionTransformer(nnx.Module):
    """ViT encoder; ``__call__`` equals timm's ``forward_features`` (normalised tokens).

    Args:
      variant: ``"<size>/<patch>"``, see :func:`parse_variant`.
      img_size: training image size, ``s`` or ``(h, w)``; sets the stored position-embedding grid.
      in_chans: input channels (1 for radiographs; 3 at the ImageNet boundary).
      class_token: prepend a learned class token.
      num_reg_tokens: number of register tokens (Darcet et al.), after the class token.
      no_embed_class: prefix tokens get no position embedding (timm's flag; DINOv2-reg, DeiT-3).
        Otherwise ``pos_embed`` has a slot per prefix token (zeros for sin-cos), as in timm/MAE.
      pos_embed: ``"sincos"`` (fixed, :class:`FixedPosEmbed`), ``"learned"`` (``nnx.Param``) or
        ``"rope"``: no absolute table, 2-D rotary embedding of q/k in every block (DINOv3,
        :func:`rope_sincos`); prefix tokens are not rotated.
      rope_temperature: RoPE period base (DINOv3: 100).
      qkv_bias: bias on the fused qkv projection (timm's ``vit_*_dinov3`` has none, ``_qkvb`` has one).
      norm_eps: LayerNorm epsilon (timm ViT / DINOv2: 1e-6; DINOv3: 1e-5).
      drop_path_rate: stochastic depth at the last block; linear from 0 over depth (timm, DINO), or
        on every block with ``drop_path_uniform`` (DINOv2's ``drop_path_uniform: true``).
      init: parameter initialisation, one of :data:`INIT_SCHEMES` ("mae", "dino", "dinov2").
      pos_embed_interpolation: how the stored grid is resampled to another input grid, one of
        ``pos_embed.INTERPOLATIONS``: "timm" (antialiased bicubic) or "dino" (DINO/DINOv2: plain
        bicubic with the +0.1 scale offset).
      layer_scale_init: LayerScale init value (e.g. 1e-5 for DINOv2); None = no LayerScale.
      dtype / param_dtype: compute / storage dtypes.
      input_mean / input_std: per-channel normalisation of [0, 1] images, applied first.
      attn_implementation: passed to ``jax.nn.dot_product_attention`` (None/"xla"/"cudnn").
      remat: activation rematerialisation per block, a key of :data:`REMAT_POLICIES` ("none":
        keep every activation; "full": keep only block inputs; "dots": keep matmul outputs;
        "dots_no_batch": keep matmul outputs without a batch dimension, i.e. weights-only products).
      rngs: parameter initialisation.
      **overrides: ``width``, ``depth``, ``num_heads``, ``mlp_dim`` replace the variant's values
        (``mlp_dim`` follows ``4 * width`` when only ``width`` is given).
    """

    def __init__(
        self,
        variant: str,
        *,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 1,
        class_token: bool = True,
        num_reg_tokens: int = 0,
        no_embed_class: bool = False,
        pos_embed: str = "sincos",
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        layer_scale_init: float | None = None,
        init: str = "mae",
        pos_embed_interpolation: str = "timm",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        input_mean: float | Sequence[float] | None = None,
        input_std: float | Sequence[float] | None = None,
        attn_implementation: str | None = None,
        remat: str = "none",
        rope_temperature: float = 100.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        rngs: nnx.Rngs,
        **overrides: int,
    ):
        unknown = set(overrides) - set(_OVERRIDE_KEYS)
        if unknown:
            raise TypeError(f"Unknown ViT override(s) {sorted(unknown)}; allowed: {', '.join(_OVERRIDE_KEYS)}.")
        cfg = parse_variant(variant)
        if "width" in overrides and "mlp_dim" not in overrides:
            overrides = dict(overrides, mlp_dim=4 * int(overrides["width"]))
        cfg.update({k: int(v) for k, v in overrides.items()})
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}.")
        self.remat = remat
        if pos_embed not in ("sincos", "learned", "rope"):
            raise ValueError(f"pos_embed must be 'sincos', 'learned' or 'rope', got {pos_embed!r}.")
        self.rope_temperature = float(rope_temperature)
        self.qkv_bias = bool(qkv_bias)
        self.norm_eps = float(norm_eps)
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {init!r}.")
        if pos_embed_interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"pos_embed_interpolation must be one of {INTERPOLATIONS}, got {pos_embed_interpolation!r}."
            )
        self.init_scheme = init
        self.pos_embed_interpolation = pos_embed_interpolation

        self.variant = variant
        self.embed_dim = d = cfg["width"]
        self.depth = cfg["depth"]
        self.num_heads = cfg["num_heads"]
        self.mlp_dim = cfg["mlp_dim"]
        self.patch_size = p = cfg["patch_size"]
        self.in_chans = in_chans
        ih, iw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if ih % p or iw % p:
            raise ValueError(f"img_size {ih}x{iw} is not divisible by the patch size {p}.")
        self.img_size = (int(ih), int(iw))
        self.grid_size = (ih // p, iw // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.has_class_token = bool(class_token)
        self.num_reg_tokens = int(num_reg_tokens)
        self.num_prefix_tokens = int(class_token) + self.num_reg_tokens
        self.no_embed_class = bool(no_embed_class)
        self.pos_embed_type = pos_embed
        self.dtype = dtype
        self.param_dtype = param_dtype
        mean_default, std_default = _default_norm(in_chans)
        self.input_mean = _as_channel_tuple(mean_default if input_mean is None else input_mean, in_chans, "input_mean")
        self.input_std = _as_channel_tuple(std_default if input_std is None else input_std, in_chans, "input_std")

        self.patch_embed = PatchEmbed(p, in_chans, d, dtype=dtype, param_dtype=param_dtype, init=init, rngs=rngs)
        token_init = {
            "mae": nnx.initializers.normal(stddev=0.02),
            "dino": trunc_normal(0.02),
            "dinov2": nnx.initializers.normal(stddev=1e-6),
        }[init]
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, d), param_dtype)) if class_token else None
        self.reg_token = (
            nnx.Param(token_init(rngs.params(), (1, self.num_reg_tokens, d), param_dtype))
            if self.num_reg_tokens
            else None
        )
        num_pos_prefix = 0 if no_embed_class else self.num_prefix_tokens
        if pos_embed == "rope":
            self.pos_embed = None
            if (cfg["width"] // cfg["num_heads"]) % 4:
                raise ValueError(
                    f"pos_embed='rope' needs width / num_heads divisible by 4, got {cfg['width']} / {cfg['num_heads']}."
                )
        elif pos_embed == "sincos":
            table = get_2d_sincos_pos_embed(d, self.grid_size, num_pos_prefix)
            self.pos_embed = FixedPosEmbed(jnp.asarray(table[None], dtype=param_dtype))
        else:
            self.pos_embed = nnx.Param(
                trunc_normal(0.02)(rngs.params(), (1, num_pos_prefix + self.num_patches, d), param_dtype)
            )

        if drop_path_uniform:
            rates = [drop_path_rate] * self.depth
        else:
            rates = np.linspace(0.0, drop_path_rate, self.depth) if self.depth else []
        self.blocks = nnx.List(
            [
                Block(
                    d,
                    self.num_heads,
                    self.mlp_dim,
                    drop_path_rate=float(rate),
                    layer_scale_init=layer_scale_init,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    attn_implementation=attn_implementation,
                    init=init,
                    qkv_bias=qkv_bias,
                    norm_eps=norm_eps,
                    rngs=rngs,
                )
                for rate in rates
            ]
        )
        self.norm = _layer_norm(d, dtype, param_dtype, rngs, norm_eps)

    # -- pieces (MAE and DINO assemble these) ----------------------------------------------------

    def normalize(self, images: jax.Array) -> jax.Array:
        """``(images - input_mean) / input_std`` in float32 (the model's input normalisation)."""
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(f"Expected images of shape (B, H, W, {self.in_chans}) (NHWC), got {x.shape}.")
        mean = jnp.asarray(self.input_mean, jnp.float32)
        std = jnp.asarray(self.input_std, jnp.float32)
        return (x - mean) / std

    def _pos_embed_table(self) -> jax.Array:
        return self.pos_embed[...].astype(jnp.float32)

    def patch_pos_embed(self, grid_hw: Sequence[int]) -> jax.Array:
        """Position embedding of the patch tokens for a ``grid_hw`` grid, ``(1, gh*gw, D)`` fp32.

        Resampled when ``grid_hw`` differs from the stored :attr:`grid_size`: bicubically with
        antialias (timm ``resample_abs_pos_embed``), or DINO's way (``pos_embed_interpolation="dino"``).
        Zeros for ``pos_embed="rope"`` (positions enter in the attention).
        """
        if self.pos_embed is None:
            return jnp.zeros((1, int(grid_hw[0]) * int(grid_hw[1]), self.embed_dim), jnp.float32)
        table = self._pos_embed_table()
        if not self.no_embed_class:
            table = table[:, self.num_prefix_tokens :]
        if self.pos_embed_interpolation == "dino":
            return resample_pos_embed_dino(table, tuple(grid_hw), self.grid_size)
        return resample_abs_pos_embed(table, tuple(grid_hw), old_size=self.grid_size, num_prefix_tokens=0)

    def embed_patches(self, images: jax.Array) -> jax.Array:
        """Normalise, patch-embed and add position embeddings: ``(B, N, D)`` float32."""
        x = self.normalize(images).astype(self.dtype)
        x = self.patch_embed(x)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d).astype(jnp.float32)
        return x + self.patch_pos_embed((gh, gw))

    def prefix_tokens(self, batch_size: int) -> jax.Array:
        """Class then register tokens, ``(B, num_prefix_tokens, D)`` float32.

        Includes their position embedding unless ``no_embed_class``.
        """
        d = self.embed_dim
        parts = []
        if self.cls_token is not None:
            parts.append(self.cls_token[...].astype(jnp.float32))
        if self.reg_token is not None:
            parts.append(self.reg_token[...].astype(jnp.float32))
        if not parts:
            return jnp.zeros((batch_size, 0, d), jnp.float32)
        prefix = jnp.concatenate(parts, axis=1)
        if not self.no_embed_class and self.pos_embed is not None:
            prefix = prefix + self._pos_embed_table()[:, : self.num_prefix_tokens]
        return jnp.broadcast_to(prefix, (batch_size, self.num_prefix_tokens, d))

    def rope(
        self, num_tokens: int, grid_hw: Sequence[int] | None = None, patch_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array] | None:
        """Per-token RoPE ``(sin, cos)`` for ``num_tokens`` tokens (prefix first), or None without RoPE.

        ``grid_hw``: the patch grid (default: the stored one, or the square one the count implies).
        ``patch_ids`` ``(B, L)``: the grid positions of the ``L`` patch tokens present (MAE keeps a subset).
        """
        if self.pos_embed_type != "rope":
            return None
        p = self.num_prefix_tokens
        if grid_hw is None:
            n = num_tokens - p if patch_ids is None else self.num_patches
            side = int(round(np.sqrt(n)))
            grid_hw = self.grid_size if n == self.num_patches else (side, side)
            if grid_hw[0] * grid_hw[1] != n:
                raise ValueError(f"{n} patch tokens are not a square grid: pass grid_hw to encode_tokens.")
        sin, cos = rope_sincos(grid_hw, self.embed_dim // self.num_heads, self.rope_temperature)
        if patch_ids is not None:
            sin, cos = sin[patch_ids], cos[patch_ids]  # (B, L, head_dim)
            lead = (patch_ids.shape[0], p)
        else:
            lead = (p,)
        sin = jnp.concatenate([jnp.zeros(lead + sin.shape[-1:], jnp.float32), sin], axis=-2)
        cos = jnp.concatenate([jnp.ones(lead + cos.shape[-1:], jnp.float32), cos], axis=-2)
        return sin, cos

    def encode_tokens(
        self,
        tokens: jax.Array,
        *,
        rngs: nnx.Rngs | jax.Array | None = None,
        grid_hw: Sequence[int] | None = None,
        patch_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Transformer blocks + final norm on ``(B, T, D)`` tokens -> ``(B, T, D)`` float32.

        ``rngs`` (an ``nnx.Rngs`` with a ``dropout`` or default stream, or a raw PRNG key) turns
        on drop-path; without it the pass is deterministic. ``grid_hw`` / ``patch_ids`` place the
        patch tokens for RoPE (see :meth:`rope`); absolute position embeddings ignore them.
        """
        x = tokens.astype(jnp.float32)
        rope = self.rope(x.shape[1], grid_hw, patch_ids)
        keys = _dropout_keys(rngs, len(self.blocks))
        apply = (
            _block_call
            if self.remat == "none"
            else nnx.remat(_block_call, policy=REMAT_POLICIES[self.remat], prevent_cse=True)
        )
        for block, key in zip(self.blocks, keys, strict=True):
            x = apply(block, x, key, rope)
        return self.norm(x).astype(jnp.float32)

    def tokens(self, images: jax.Array) -> jax.Array:
        """Input tokens before the blocks: prefix ⊕ patch tokens, ``(B, P + N, D)``."""
        x = self.embed_patches(images)
        return jnp.concatenate([self.prefix_tokens(x.shape[0]), x], axis=1)

    # -- whole-model entry points --------------------------------------------------------------

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """``(B, H, W, C)`` images in [0, 1] -> ``(B, P + N, D)`` normalised tokens (float32)."""
        grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
        return self.encode_tokens(self.tokens(images), rngs=rngs, grid_hw=grid)

    def pooled_features(self, images: jax.Array, *, pool: str = "cls") -> jax.Array:
        """``(B, D)`` features for probes: the class token (``"cls"``) or the mean of the
        normalised patch tokens (``"avg"``, prefix tokens excluded)."""
        if pool not in ("cls", "avg"):
            raise ValueError(f"pool must be 'cls' or 'avg', got {pool!r}.")
        if pool == "cls" and not self.has_class_token:
            raise ValueError("pool='cls' needs a model with class_token=True; use pool='avg'.")
        x = self(images)
        if pool == "cls":
            return x[:, 0]
        return x[:, self.num_prefix_tokens :].mean(axis=1)

    def attention_maps(self, images: jax.Array) -> jax.Array:
        """Attention probabilities of the last block, ``(B, heads, T, T)`` float32 (T = P + N)."""
        if not len(self.blocks):
            raise ValueError("attention_maps needs at least one block.")
        x = self.tokens(images)
        rope = self.rope(x.shape[1], (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size))
        for block in self.blocks[:-1]:
            x = block(x, rope=rope)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(x), rope)
