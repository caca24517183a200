"""Absolute position embeddings for ViTs: fixed 2-D sin-cos tables and grid resampling.

Why this module exists:

* MAE (He et al. 2021) and our MAE/DINO pretraining use a *fixed* 2-D sin-cos position embedding.
  :func:`get_2d_sincos_pos_embed` reproduces the MAE reference ``util/pos_embed.py`` exactly for
  square grids (including its quirk that the first half of the channels encodes the *column*
  index, because it calls ``np.meshgrid(grid_w, grid_h)``), and extends it to rectangular grids.
* Checkpoints trained at one resolution are used at another (DINOv2 at 518 px -> 224 px, eval at
  higher resolution). :func:`resample_abs_pos_embed` reproduces timm's function of the same name
  (bicubic, prefix tokens left untouched).  ``jax.image.resize(..., "bicubic", antialias=True)``
  equals torch's ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` — timm's
  default — to float32 rounding, for up- and down-sampling (checked in ``tests/test_vit.py``);
  with ``antialias=False`` the two libraries use different cubic kernels and no longer agree.

Everything here is pure: numpy for the tables (computed once, at construction), jax for resampling
(traceable, used inside jitted forward passes when the input grid differs from the stored one).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "resample_abs_pos_embed",
    "resample_pos_embed_dino",
    "INTERPOLATIONS",
]

# How a position-embedding grid is resampled to another grid (config `model.pos_embed_interpolation`):
# "timm": antialiased bicubic to the exact target size (timm's `resample_abs_pos_embed`);
# "dino": plain bicubic (torch's kernel, A = -0.75) with the scale factor (target + 0.1) / source, as
#         DINO's and DINOv2's `interpolate_pos_encoding` (`interpolate_offset=0.1`, `interpolate_antialias=False`).
INTERPOLATIONS = ("timm", "dino")


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Sin-cos embedding of positions ``pos`` (any shape, flattened) -> ``(M, embed_dim)`` float64.

    As in the MAE reference: frequencies ``1 / 10000 ** (k / (embed_dim / 2))``, sines first, then
    cosines.
    """
    if embed_dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dimension, got {embed_dim}.")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = np.asarray(pos, dtype=np.float64).reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int], num_prefix_tokens: int = 0) -> np.ndarray:
    """Fixed 2-D sin-cos position table ``(num_prefix_tokens + gh * gw, embed_dim)``, float32.

    Tokens are in row-major (h, w) order, the order of :func:`afm_jax.models.vit.patchify` and of a
    flattened conv patch embedding. ``num_prefix_tokens`` zero rows are prepended (the MAE
    reference's ``cls_token=True`` is ``num_prefix_tokens=1``).

    Args:
      embed_dim: channels; must be divisible by 4 (half per axis, sin and cos per half).
      grid_size: ``g`` for a square grid or ``(gh, gw)``.
      num_prefix_tokens: zero rows for class/register tokens that share the table.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}.")
    gh, gw = _as_hw(grid_size)
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # as the reference: w first, so grid[0] is the column index
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_a, emb_b], axis=1)
    if num_prefix_tokens:
        emb = np.concatenate([np.zeros((num_prefix_tokens, embed_dim)), emb], axis=0)
    return emb.astype(np.float32)


def resample_abs_pos_embed(
    posemb: jax.Array,
    new_size: Sequence[int],
    old_size: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    *,
    method: str = "bicubic",
    antialias: bool = True,
) -> jax.Array:
    """Resample a ``(1, P + gh*gw, D)`` position embedding to a ``new_size`` grid (timm semantics).

    The first ``num_prefix_tokens`` rows (class/register slots) are kept as they are; the grid part
    is resized with ``jax.image.resize`` in float32 and cast back to the input dtype. Returns the
    input unchanged when the grid already matches.

    Args:
      posemb: ``(1, num_prefix_tokens + old_h * old_w, D)``.
      new_size: target ``(h, w)`` grid.
      old_size: source ``(h, w)`` grid; inferred as square when omitted.
      num_prefix_tokens: leading rows that are not part of the grid.
      method: ``jax.image.resize`` method; ``"bicubic"`` as timm.
      antialias: ``True`` (default) matches timm's default (torch ``antialias=True``); it only
        changes the result when downsampling.
    """
    new_h, new_w = _as_hw(new_size)
    num_pos = posemb.shape[1]
    if old_size is None:
        side = int(round(np.sqrt(num_pos - num_prefix_tokens)))
        if side * side != num_pos - num_prefix_tokens:
            raise ValueError(
                f"Cannot infer a square grid from {num_pos - num_prefix_tokens} grid positions; pass old_size=(h, w)."
            )
        old_size = (side, side)
    old_h, old_w = _as_hw(old_size)
    if old_h * old_w + num_prefix_tokens != num_pos:
        raise ValueError(
            f"pos_embed has {num_pos} rows but old_size {old_h}x{old_w} plus {num_prefix_tokens} "
            "prefix rows was given; check num_prefix_tokens (0 for no_embed_class models)."
        )
    if (old_h, old_w) == (new_h, new_w):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.astype(jnp.float32).reshape(1, old_h, old_w, dim)
    grid = jax.image.resize(grid, (1, new_h, new_w, dim), method=method, antialias=antialias)
    grid = grid.reshape(1, new_h * new_w, dim).astype(posemb.dtype)
    return jnp.concatenate([prefix, grid], axis=1) if num_prefix_tokens else grid


def _torch_cubic_weights(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out, in) matrix of torch's non-antialiased bicubic (``align_corners=False``, A = -0.75) when
    ``F.interpolate`` is given ``scale_factor=scale``: the source of output pixel i is
    (i + 0.5) / scale - 0.5, the four taps around it are clamped to the border."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = (i + 0.5) / scale - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            weights[i, min(max(x0 + offset, 0), in_size - 1)] += w
    return weights


def resample_pos_embed_dino(
    grid: jax.Array, new_size: Sequence[int], old_size: Sequence[int], *, offset: float = 0.1
) -> jax.Array:
    """DINO/DINOv2's ``interpolate_pos_encoding`` on the grid part ``(1, old_h*old_w, D)``.

    Plain (not antialiased) bicubic with torch's cubic kernel, and the scale factor
    ``(new + offset) / old`` per axis — the output size is ``floor(old · scale)`` = ``new``, but the
    sample positions follow the slightly larger scale, which is what makes DINO's offset matter.
    Unchanged when the grids agree (the reference returns the stored table then). Computed as two
    small matmuls (the weights are numpy constants of the static shapes), in float32.
    """
    new_h, new_w = _as_hw(new_size)
    old_h, old_w = _as_hw(old_size)
    if (old_h, old_w) == (new_h, new_w):
        return grid
    wh = _torch_cubic_weights(old_h, new_h, (new_h + offset) / old_h)
    ww = _torch_cubic_weights(old_w, new_w, (new_w + offset) / old_w)
    x = grid.astype(jnp.float32).reshape(old_h, old_w, grid.shape[-1])
    x = jnp.einsum("ih,hwd->iwd", jnp.asarray(wh, jnp.float32), x)
    x = jnp.einsum("jw,iwd->ijd", jnp.asarray(ww, jnp.float32), x)
    return x.reshape(1, new_h * new_w, grid.shape[-1]).astype(grid.dtype)
