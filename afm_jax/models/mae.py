"""Masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

What: wraps a :class:`~afm_jax.models.vit.VisionTransformer` encoder with the MAE decoder and the
masked-patch reconstruction loss, following the official reference code
(facebookresearch/mae ``models_mae.py``) line by line:

* per-sample random masking by ``argsort`` of uniform noise, keeping ``int(L * (1 - mask_ratio))``
  patches; ``mask`` is 1 for removed patches; ``ids_restore`` undoes the shuffle;
* the encoder sees only the visible patches (position embedding added *before* masking), with its
  prefix tokens prepended;
* decoder: ``decoder_embed`` (D -> Dd), learned ``mask_token``, unshuffle, fixed 2-D sin-cos
  ``decoder_pos_embed`` (with a class slot), ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``
  (Dd -> p*p*C);
* loss: mean squared error on the *removed* patches only, against per-patch normalised pixels
  (``norm_pix_loss``), see :func:`mae_loss`.

Why the choices that the paper leaves open are made this way:

* **Target image.** The reference computes the target from the images *as fed to the encoder*
  (ImageNet-normalised by its data loader). We do the same: the target is ``patchify`` of the
  encoder's normalised input ``(x - input_mean) / input_std``. With ``norm_pix_loss`` the per-patch
  normalisation makes this almost the same as using the [0, 1] image (only the 1e-6 in the
  denominator scales differently); without it, the loss is on the reference's scale.
* **Registers** (``num_reg_tokens > 0``) exist only in the encoder: they are dropped before the
  decoder, which sees the class token (when there is one) and the patch tokens, as in the
  reference. The decoder position table has a class slot only if the encoder has a class token.
* **Other resolutions.** The decoder's sin-cos table is rebuilt for the input grid when it differs
  from the training grid (the encoder resamples its own table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from afm_jax.models.pos_embed import get_2d_sincos_pos_embed
from afm_jax.models.vit import (
    Block,
    FixedPosEmbed,
    VisionTransformer,
    _layer_norm,
    patchify,
    unpatchify,
)

__all__ = ["MAE", "random_masking", "mae_loss", "normalize_patches", "denormalize_patches"]

NORM_PIX_EPS = 1e-6


def random_masking(tokens: jax.Array, mask_ratio: float, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample random masking by argsort of uniform noise (MAE reference ``random_masking``).

    Args:
      tokens: ``(B, L, D)`` patch tokens.
      mask_ratio: fraction of tokens removed; ``int(L * (1 - mask_ratio))`` are kept.
      key: PRNG key.

    Returns:
      ``kept`` ``(B, L_keep, D)``, ``mask`` ``(B, L)`` float32 with 1 = removed, and
      ``ids_restore`` ``(B, L)`` int32 such that
      ``take_along_axis(concat(kept, removed), ids_restore) == tokens``.
    """
    b, length, _ = tokens.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = jax.random.uniform(key, (b, length))
    ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: small noise is kept
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = jnp.take_along_axis(tokens, ids_keep[:, :, None], axis=1)
    mask = jnp.ones((b, length), jnp.float32).at[:, :len_keep].set(0.0)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return kept, mask, ids_restore.astype(jnp.int32)


def _patch_stats(target: jax.Array) -> tuple[jax.Array, jax.Array]:
    # torch's ``Tensor.var`` is *unbiased* by default (divides by n - 1); the reference calls
    # ``target.var(dim=-1, keepdim=True)``, so we use ddof=1 to reproduce it exactly.
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    return mean, var


def normalize_patches(target: jax.Array) -> jax.Array:
    """Per-patch normalisation of the MAE target: ``(t - mean) / sqrt(var + 1e-6)``.

    ``var`` is the unbiased variance, as torch's default in the reference.
    """
    mean, var = _patch_stats(target)
    return (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)


def denormalize_patches(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Inverse of :func:`normalize_patches` using the statistics of ``target`` (for pictures)."""
    mean, var = _patch_stats(target)
    return pred * jnp.sqrt(var + NORM_PIX_EPS) + mean


def mae_loss(pred: jax.Array, target_patches: jax.Array, mask: jax.Array, norm_pix_loss: bool) -> jax.Array:
    """MAE loss: per-patch MSE averaged over the removed patches (reference ``forward_loss``).

    Args:
      pred: ``(B, L, p*p*C)`` decoder predictions.
      target_patches: ``(B, L, p*p*C)`` patchified target image.
      mask: ``(B, L)``, 1 = removed (the only patches that count).
      norm_pix_loss: normalise each target patch by its mean and unbiased variance first.

    Returns:
      Scalar float32 loss.
    """
    pred = pred.astype(jnp.float32)
    target = target_patches.astype(jnp.float32)
    if norm_pix_loss:
        target = normalize_patches(target)
    loss = ((pred - target) ** 2).mean(axis=-1)
    mask = mask.astype(jnp.float32)
    return (loss * mask).sum() / mask.sum()


class MAE(nnx.Module):
    """Masked autoencoder around a ViT encoder (parameters under ``encoder.*`` and ``decoder_*``).

    Args:
      encoder: the :class:`VisionTransformer` being pretrained.
      mask_ratio: fraction of patches removed (paper: 0.75).
      decoder_dim / decoder_depth / decoder_heads: decoder size (paper: 512 x 8 blocks x 16 heads).
      decoder_mlp_ratio: decoder MLP expansion (4 as the reference).
      norm_pix_loss: per-patch normalised pixel targets (paper default: True).
      dtype / param_dtype: compute / storage dtypes of the decoder; default: the encoder's.
      rngs: parameter initialisation.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        dtype: Any = None,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        if int(encoder.num_patches * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of the {encoder.num_patches}; lower it.")
        dtype = encoder.dtype if dtype is None else dtype
        param_dtype = encoder.param_dtype if param_dtype is None else param_dtype
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.decoder_dim = decoder_dim
        self.dtype = dtype
        p, c = encoder.patch_size, encoder.in_chans
        self._dec_prefix = int(encoder.has_class_token)

        linear = dict(
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.xavier_uniform(),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )
        self.decoder_embed = nnx.Linear(encoder.embed_dim, decoder_dim, **linear)
        self.mask_token = nnx.Param(
            nnx.initializers.normal(stddev=0.02)(rngs.params(), (1, 1, decoder_dim), param_dtype)
        )
        table = get_2d_sincos_pos_embed(decoder_dim, encoder.grid_size, self._dec_prefix)
        self.decoder_pos_embed = FixedPosEmbed(jnp.asarray(table[None], dtype=param_dtype))
        self.decoder_blocks = nnx.List(
            [
                Block(
                    decoder_dim,
                    decoder_heads,
                    int(decoder_dim * decoder_mlp_ratio),
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = _layer_norm(decoder_dim, dtype, param_dtype, rngs)
        self.decoder_pred = nnx.Linear(decoder_dim, p * p * c, **linear)

    # -- pieces ------------------------------------------------------------------------------

    def random_masking(
        self, tokens: jax.Array, mask_ratio: float, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """See :func:`random_masking`."""
        return random_masking(tokens, mask_ratio, key)

    def target_patches(self, images: jax.Array) -> jax.Array:
        """The reconstruction target before norm-pix: patchified normalised encoder input."""
        return patchify(self.encoder.normalize(images), self.encoder.patch_size)

    def forward_encoder(
        self,
        images: jax.Array,
        key: jax.Array,
        *,
        mask_ratio: float | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[int, int]]:
        """Encode the visible patches: ``(latent (B, P + L_keep, D), mask, ids_restore, grid)``."""
        enc = self.encoder
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        x = enc.embed_patches(images)
        grid = (images.shape[1] // enc.patch_size, images.shape[2] // enc.patch_size)
        x, mask, ids_restore = random_masking(x, ratio, key)
        ids_keep = jnp.argsort(ids_restore, axis=1)[:, : x.shape[1]]  # grid positions of the kept patches (RoPE)
        x = jnp.concatenate([enc.prefix_tokens(x.shape[0]), x], axis=1)
        return enc.encode_tokens(x, rngs=rngs, grid_hw=grid, patch_ids=ids_keep), mask, ids_restore, grid

    def _decoder_pos_embed(self, grid: Sequence[int]) -> jax.Array:
        if tuple(grid) == tuple(self.encoder.grid_size):
            return self.decoder_pos_embed[...].astype(jnp.float32)
        table = get_2d_sincos_pos_embed(self.decoder_dim, tuple(grid), self._dec_prefix)
        return jnp.asarray(table[None])

    def forward_decoder(
        self,
        latent: jax.Array,
        ids_restore: jax.Array,
        grid: Sequence[int],
    ) -> jax.Array:
        """Predict all patches, ``(B, L, p*p*C)`` float32, from the encoder output.

        Register tokens are dropped here; the class token (if any) is kept, as in the reference.
        The decoder has no drop-path (as the reference).
        """
        enc = self.encoder
        x = self.decoder_embed(latent).astype(jnp.float32)
        b = x.shape[0]
        length = ids_restore.shape[1]
        patches = x[:, enc.num_prefix_tokens :]
        mask_tokens = jnp.broadcast_to(
            self.mask_token[...].astype(jnp.float32),
            (b, length - patches.shape[1], self.decoder_dim),
        )
        x_ = jnp.concatenate([patches, mask_tokens], axis=1)
        x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)  # unshuffle
        if self._dec_prefix:
            x_ = jnp.concatenate([x[:, :1], x_], axis=1)  # class token (registers dropped)
        x = x_ + self._decoder_pos_embed(grid)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, self._dec_prefix :].astype(jnp.float32)

    # -- entry points ------------------------------------------------------------------------

    def __call__(
        self,
        images: jax.Array,
        *,
        key: jax.Array,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """One MAE forward pass.

        Args:
          images: ``(B, H, W, C)`` in [0, 1].
          key: PRNG key for the random mask.
          rngs: enables the encoder's drop-path (training); None = deterministic.

        Returns:
          ``{'loss': scalar, 'pred': (B, L, p*p*C), 'mask': (B, L)}``.
        """
        latent, mask, ids_restore, grid = self.forward_encoder(images, key, rngs=rngs)
        pred = self.forward_decoder(latent, ids_restore, grid)
        loss = mae_loss(pred, self.target_patches(images), mask, self.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}

    def reconstruct(self, images: jax.Array, *, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Pictures for reconstruction panels, both ``(B, H, W, C)`` in the input's [0, 1] scale.

        Returns:
          ``masked_images``: the input with removed patches set to 0;
          ``reconstructed_images``: visible patches from the input, removed ones from the
          prediction (un-normalised with each target patch's mean/variance when
          ``norm_pix_loss``, then with the encoder's input mean/std). Not clipped.
        """
        enc = self.encoder
        out = self(images, key=key)
        pred, mask = out["pred"], out["mask"]
        target = self.target_patches(images)
        if self.norm_pix_loss:
            pred = denormalize_patches(pred, target)
        grid = (images.shape[1] // enc.patch_size, images.shape[2] // enc.patch_size)
        pred_img = unpatchify(pred, enc.patch_size, grid, enc.in_chans)
        pred_img = pred_img * jnp.asarray(enc.input_std) + jnp.asarray(enc.input_mean)
        mask_img = unpatchify(jnp.broadcast_to(mask[:, :, None], pred.shape), enc.patch_size, grid, enc.in_chans)
        images = jnp.asarray(images, jnp.float32)
        masked = images * (1.0 - mask_img)
        return masked, masked + pred_img * mask_img
