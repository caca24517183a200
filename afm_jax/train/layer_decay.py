"""Layer-wise learning-rate decay (BEiT, MAE fine-tuning, DINOv2) as an optax transformation.

Layer ids over a ViT with `num_layers` blocks: the embeddings (patch embedding, class/register tokens,
position embedding) are layer 0, block i is layer i + 1, everything after the blocks (final norm,
heads) is layer num_layers + 1. A parameter of layer l gets its update scaled by
decay ** (num_layers + 1 - l): the head trains at the full rate, early blocks slower.
`patch_embed_scale` multiplies the patch embedding's scale further (DINOv2 uses 0.2).

Scaling the final update (learning rate × (Adam direction + weight decay × param)) by a constant per
parameter is the same as giving that parameter a scaled learning rate, which is what the papers do.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

_EMBEDDING_NAMES = ("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")


def _names(path: tuple) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def layer_id(path_names: list[str], num_layers: int) -> int:
    """The layer id of a parameter from its path (see the module docstring)."""
    joined = "/".join(path_names)
    match = re.search(r"(?:^|/)blocks/(\d+)(?:/|$)", joined)
    if match:
        return int(match.group(1)) + 1
    if any(name in path_names for name in _EMBEDDING_NAMES):
        return 0
    return num_layers + 1


def lr_scale_tree(params: Any, *, num_layers: int, decay: float, patch_embed_scale: float = 1.0) -> Any:
    """A pytree like `params` of float scales decay ** (num_layers + 1 - layer_id)."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"Layer-wise lr decay must be in (0, 1], got {decay}.")

    def scale(path, _leaf):
        names = _names(path)
        s = decay ** (num_layers + 1 - layer_id(names, num_layers))
        if "patch_embed" in names:
            s *= patch_embed_scale
        return float(s)

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_updates_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update leaf by its scale (put it last in the optimiser chain)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)
