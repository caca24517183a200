"""DINO and DINOv2 self-distillation: projection head, losses, centring, and the student model.

What (each piece follows the reference code named beside it):

* :class:`DINOHead` — 3-layer MLP (GELU, 2048 hidden) -> 256-d bottleneck -> L2 normalisation ->
  weight-normalised linear layer without bias to `out_dim` prototypes (DINO `vision_transformer.py`
  `DINOHead`; DINOv2 `dino_head.py`). `norm_last_layer` fixes the weight-norm gains to 1 (stored as
  a non-trainable variable, so the optimiser never sees them).
* :func:`dino_loss` — cross-entropy between the centred, sharpened teacher distribution of each
  global view and the student distribution of every *other* view, averaged over those pairs and the
  batch (DINO `DINOLoss.forward`).
* :func:`update_center` — EMA of the teacher's batch-mean logits (DINO `DINOLoss.update_center`).
* :func:`sinkhorn_knopp` — DINOv2's alternative to centring (3 iterations).
* :func:`koleo_loss` — DINOv2's KoLeo regulariser on the student's class tokens.
* :func:`ibot_patch_loss` — iBOT's masked-patch cross-entropy, counted on masked patches only.
* :class:`DINOModel` — the student: our :class:`VisionTransformer` (or a :class:`ResNet`, DINO's
  ResNet-50 recipe: the head reads the 2048-d pooled feature; no patch tokens, so no iBOT), the DINO
  head, an optional separate iBOT head and the learned `mask_token` for masked patches. The teacher
  is the same module merged with EMA params (see `afm_jax.train.tasks.dino`).

All functions are pure jnp on logits shaped (views, batch, prototypes), so the train step computes
each crop size as one batched array and the batch mean is the global batch mean under SPMD.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from afm_jax.models.resnet import ResNet
from afm_jax.models.vit import VisionTransformer, trunc_normal

__all__ = [
    "DINOHead",
    "DINOModel",
    "FrozenWeight",
    "dino_loss",
    "teacher_softmax",
    "update_center",
    "sinkhorn_knopp",
    "koleo_loss",
    "ibot_patch_loss",
    "entropy",
]

L2_EPS = 1e-12  # F.normalize's default in DINO


class FrozenWeight(nnx.Variable):
    """A weight that is part of the model but not trained (the fixed weight-norm gains)."""


def _trunc_normal() -> nnx.Initializer:
    # DINO/DINOv2 `DINOHead._init_weights`: trunc_normal_(std=.02), cut at +-2 absolute, so its real std is
    # 0.02 (jax's truncated_normal(0.02) cuts at 2 std and has a real std of 0.0176; see vit.trunc_normal).
    return trunc_normal(0.02)


class WeightNormLinear(nnx.Module):
    """y = x @ (g · v / ||v||), norms per output unit, no bias (torch `weight_norm(Linear)`, dim=0).

    Parameter names match the reference's state dict: `weight_v` (stored as a kernel, in × out) and
    `weight_g` (out,). With `freeze_norm` g is a :class:`FrozenWeight` of ones (DINO's
    `norm_last_layer=True`)."""

    def __init__(self, in_dim: int, out_dim: int, *, freeze_norm: bool, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        # The reference creates this layer after its trunc-normal init pass, so v keeps torch's default
        # Linear init, kaiming-uniform(a=√5) = U(-1/√in, 1/√in).
        bound = 1.0 / in_dim**0.5
        v = jax.random.uniform(rngs.params(), (in_dim, out_dim), param_dtype, -bound, bound)
        self.weight_v = nnx.Param(v)
        # torch's weight_norm initialises g = ||v|| (so the initial weight is v); DINO then fills g with 1.
        g = jnp.ones((out_dim,), param_dtype)
        self.weight_g = FrozenWeight(g) if freeze_norm else nnx.Param(g)

    def scale(self) -> jax.Array:
        """g / ||v|| per output unit, (out,) float32."""
        v = self.weight_v[...].astype(jnp.float32)
        return self.weight_g[...].astype(jnp.float32) / jnp.linalg.norm(v, axis=0)

    def kernel(self) -> jax.Array:
        """The effective weight g · v / ||v||, (in, out) float32."""
        return self.weight_v[...].astype(jnp.float32) * self.scale()

    def __call__(self, x: jax.Array) -> jax.Array:
        # x @ (v · s) computed as (x @ v) · s: the same product per output unit, without building the
        # scaled (in, out) kernel. Measured (ViT-S DINO step, 65,536 prototypes, 1 CPU thread): XLA:CPU
        # fused the column norm into the scaled kernel feeding the teacher's matmul and recomputed it
        # per element, ~13 of the step's ~22 CPU-s at batch 4 (bench/README.md).
        v = self.weight_v[...].astype(jnp.float32)
        return jnp.dot(x.astype(jnp.float32), v) * self.scale()


class DINOHead(nnx.Module):
    """MLP (nlayers, GELU) -> bottleneck -> L2 normalise -> weight-normalised prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}.")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        self.mlp = nnx.List(
            [
                nnx.Linear(
                    a,
                    b,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_init=_trunc_normal(),
                    bias_init=nnx.initializers.zeros_init(),
                    rngs=rngs,
                )
                for a, b in zip(dims[:-1], dims[1:])
            ]
        )
        self.last_layer = WeightNormLinear(
            bottleneck_dim, out_dim, freeze_norm=norm_last_layer, param_dtype=param_dtype, rngs=rngs
        )

    def bottleneck(self, x: jax.Array) -> jax.Array:
        """(..., in_dim) -> (..., bottleneck_dim) L2-normalised, float32."""
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:
                x = jax.nn.gelu(x, approximate=False)
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), L2_EPS)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in_dim) features -> (..., out_dim) prototype logits (float32)."""
        return self.last_layer(self.bottleneck(x))


class DINOModel(nnx.Module):
    """Student (and, with EMA params, teacher) of DINO/DINOv2: backbone + head(s) + mask token."""

    def __init__(
        self,
        encoder: VisionTransformer | ResNet,
        *,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        ibot: bool = False,
        ibot_separate_head: bool = False,
        ibot_out_dim: int | None = None,
        ibot_hidden_dim: int | None = None,
        ibot_bottleneck_dim: int | None = None,
        ibot_nlayers: int | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.is_resnet = isinstance(encoder, ResNet)
        if self.is_resnet and ibot:
            raise ValueError("iBOT needs patch tokens; a ResNet backbone has none (set dino.ibot.enabled=False).")
        if not self.is_resnet and not encoder.has_class_token:
            raise ValueError("DINO needs an encoder with a class token (config model.class_token=True).")
        self.encoder = encoder
        kw = dict(
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            nlayers=nlayers,
            norm_last_layer=norm_last_layer,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.dino_head = DINOHead(encoder.embed_dim, out_dim, **kw)
        self.ibot = bool(ibot)
        # A separate iBOT head has its own sizes (DINOv2 `ibot.head_*`; None = the DINO head's).
        ibot_kw = dict(
            kw,
            hidden_dim=ibot_hidden_dim or hidden_dim,
            bottleneck_dim=ibot_bottleneck_dim or bottleneck_dim,
            nlayers=ibot_nlayers or nlayers,
        )
        self.ibot_head = (
            DINOHead(encoder.embed_dim, ibot_out_dim or out_dim, **ibot_kw) if ibot and ibot_separate_head else None
        )
        # DINOv2 initialises the mask token to zeros.
        self.mask_token = nnx.Param(jnp.zeros((1, 1, encoder.embed_dim), param_dtype)) if ibot else None

    def patch_head(self, tokens: jax.Array) -> jax.Array:
        """Prototype logits of patch tokens: the iBOT head, or the DINO head when shared."""
        return (self.ibot_head if self.ibot_head is not None else self.dino_head)(tokens)

    def backbone(
        self, images: jax.Array, *, masks: jax.Array | None = None, rngs: nnx.Rngs | jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """(B, H, W, C) -> (class token (B, D), patch tokens (B, N, D)), after the final norm.

        `masks` (B, N) bool replaces the masked patch embeddings by `mask_token` *before* the
        position embedding is added (DINOv2 `prepare_tokens_with_masks`). A ResNet backbone gives
        (pooled feature (B, 2048), None), its BatchNorm in the mode it was built with."""
        if self.is_resnet:
            if masks is not None:
                raise ValueError("masks given to a DINO model with a ResNet backbone (no patch tokens).")
            return self.encoder.forward_features(images), None
        enc = self.encoder
        x = enc.normalize(images).astype(enc.dtype)
        x = enc.patch_embed(x)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d).astype(jnp.float32)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given to a DINO model built without iBOT (no mask token).")
            x = jnp.where(masks[..., None], self.mask_token[...].astype(jnp.float32), x)
        x = x + enc.patch_pos_embed((gh, gw))
        x = jnp.concatenate([enc.prefix_tokens(b), x], axis=1)
        x = enc.encode_tokens(x, rngs=rngs, grid_hw=(gh, gw))
        return x[:, 0], x[:, enc.num_prefix_tokens :]


# ─── Losses and centring (pure functions) ────────────────────────────────────────────────────────


def teacher_softmax(teacher_logits: jax.Array, center: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """softmax((t - c) / τ_t) over the last axis: DINO's centred, sharpened targets."""
    return jax.nn.softmax((teacher_logits - center) / temperature, axis=-1)


def dino_loss(student_logits: jax.Array, teacher_probs: jax.Array, student_temp: float = 0.1) -> jax.Array:
    """DINO's multi-view cross-entropy.

    student_logits: (V, B, K) logits of all V student views, the global views first (in the order
      of the teacher's); teacher_probs: (G, B, K) target distributions of the G global views.
    Returns the mean over pairs (g, v) with v != g of mean_b [-Σ_k p_t[g,b,k] log p_s[v,b,k]], i.e.
    DINO's `total_loss / n_loss_terms`.
    """
    g, v = teacher_probs.shape[0], student_logits.shape[0]
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    ce = -jnp.einsum("gbk,vbk->gv", teacher_probs.astype(jnp.float32), log_ps) / teacher_probs.shape[1]
    keep = jnp.arange(g)[:, None] != jnp.arange(v)[None, :]
    return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.sum(keep)


def update_center(center: jax.Array, batch_center: jax.Array, momentum: float = 0.9) -> jax.Array:
    """c <- m·c + (1 - m)·mean of the teacher logits over views and batch (DINO `update_center`).

    `batch_center` is that mean (K,) — over the global batch, which under SPMD is what a mean inside
    the jitted step computes."""
    return center * momentum + batch_center * (1.0 - momentum)


def sinkhorn_knopp(
    teacher_logits: jax.Array, temperature: jax.Array | float, num_iters: int = 3, weights: jax.Array | None = None
) -> jax.Array:
    """DINOv2's Sinkhorn-Knopp centring: (N, K) logits -> (N, K) targets, rows summing to 1.

    Q = exp(t / τ) is alternately normalised so every prototype gets mass 1/K and every sample
    mass 1/N (DINOv2 `sinkhorn_knopp_teacher`); the result is multiplied by N so each row is a
    distribution. `weights` (N,) of 0/1 drop rows (iBOT: only masked patches count); the max is
    subtracted first, which the normalisation cancels exactly.
    """
    x = teacher_logits.astype(jnp.float32) / temperature
    q = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x)))
    w = jnp.ones(q.shape[0], jnp.float32) if weights is None else weights.astype(jnp.float32)
    q = q * w[:, None]
    n = jnp.maximum(jnp.sum(w), 1.0)
    k = q.shape[1]
    q = q / jnp.sum(q)
    for _ in range(num_iters):
        q = q / jnp.maximum(jnp.sum(q, axis=0, keepdims=True), 1e-30) / k  # prototypes: 1/K each
        q = q / jnp.maximum(jnp.sum(q, axis=1, keepdims=True), 1e-30) / n  # samples: 1/N each
        q = q * w[:, None]
    return q * n


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """KoLeo (Sablayrolles et al. 2019; DINOv2 `KoLeoLoss`): -mean_i log(||x_i - x_nn(i)|| + eps)
    on L2-normalised rows, nn(i) the nearest other row by cosine similarity."""
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    nn = jax.lax.stop_gradient(jnp.argmax(dots, axis=1))
    dist = jnp.linalg.norm(x - x[nn] + eps, axis=-1)  # torch PairwiseDistance adds eps to the difference
    return -jnp.mean(jnp.log(dist + eps))


def ibot_patch_loss(
    student_logits: jax.Array, teacher_probs: jax.Array, masks: jax.Array, student_temp: float = 0.1
) -> jax.Array:
    """iBOT/DINOv2 masked-patch loss: per image, the mean over its masked patches of
    -Σ_k p_t log p_s, then the mean over all images (those without a mask count as 0).

    student_logits, teacher_probs: (B, N, K); masks: (B, N) bool.
    """
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    ce = -jnp.sum(teacher_probs.astype(jnp.float32) * log_ps, axis=-1)  # (B, N)
    m = masks.astype(jnp.float32)
    per_image = jnp.sum(ce * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return jnp.mean(per_image)


def entropy(probs: jax.Array) -> jax.Array:
    """Mean over rows of -Σ p log p (nats): 0 means collapse to one prototype."""
    p = probs.astype(jnp.float32)
    return -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))
