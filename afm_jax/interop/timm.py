"""The ViT parameter-name mapping between our Flax encoder and timm's ``VisionTransformer``, both ways.

What: this is the single place that knows how a :class:`~afm_jax.models.vit.VisionTransformer`
parameter path maps to a timm state-dict key, and how a timm-layout state dict is loaded into our encoder with its adaptations. Foreign layouts
(DINO, DINOv2, Hugging Face ``Dinov2Model``, MAE) become timm's layout first in
:mod:`afm_jax.interop.vit_layouts`; the export writer and the torch parity check are in
:mod:`afm_jax.interop.timm_export`. No torch is needed here: state dicts are numpy arrays.

Why the adaptations are what they are (each one is exact or follows timm, and is reported):

* **Names.** Our tree already mirrors timm's, so export only renames leaves (``kernel``/``scale`` ->
  ``weight``) and transposes (Linear ``(in, out)`` -> ``(out, in)``; conv ``(p, p, C, D)`` ->
  ``(D, C, p, p)``).
* **RGB -> one channel.** The patch kernel's RGB planes are summed (timm's ``adapt_input_conv`` for
  ``in_chans=1``): a grey image then sees the filter an RGB-replicated copy of it would see. One
  channel -> three divides by three (timm's rule for other channel counts is not needed here).
* **Position embeddings** are resampled to our grid in the encoder's ``pos_embed_interpolation``
  mode: bicubic with antialias (timm's ``resample_abs_pos_embed``), or DINO/DINOv2's plain bicubic
  with the +0.1 offset (``"dino"``, for continuing from DINO/DINOv2 weights); prefix slots are folded into the class/register tokens when the
  target has ``no_embed_class`` (exact: what timm does for DINOv2 with registers) and zero slots are
  added in the opposite case (also exact).
* **LayerScale** (DINOv2) loaded into a model without it is folded into ``attn.proj`` / ``mlp.fc2``
  (exact: ``gamma * (W x + b)``); a source without it loaded into a model with it gets ``gamma = 1``.
* **DINOv3** (RoPE, no position table) maps to timm's ``Eva`` keys (``gamma_1``, ``q_bias``/``v_bias``,
  :func:`to_eva_state_dict`); a zero qkv bias is dropped or added as needed (exact).
* Anything else that does not fit (width, depth, patch size, class token, SwiGLU MLPs) is refused
  with an error naming the key and what to change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from afm_jax.errors import InteropError
from afm_jax.interop.vit_layouts import USUAL_NUM_HEADS, describe_vit_state_dict, normalize_vit_state_dict
from afm_jax.models.pos_embed import resample_abs_pos_embed, resample_pos_embed_dino
from afm_jax.models.vit import VisionTransformer

# ----------------------------------------------------------------------------------------------
# Leaf mapping (ours <-> timm).
# ----------------------------------------------------------------------------------------------


def timm_key(path: str) -> str:
    """timm state-dict key of one of our dotted parameter paths (``blocks.0.attn.qkv.kernel`` ->
    ``blocks.0.attn.qkv.weight``)."""
    if path.endswith(".kernel"):
        return path[: -len("kernel")] + "weight"
    if path.endswith(".scale"):
        return path[: -len("scale")] + "weight"
    return path


def to_timm_array(path: str, value: np.ndarray) -> np.ndarray:
    """Our array at ``path`` in timm's layout (torch Linear/Conv2d weight order)."""
    value = np.asarray(value)
    if path == "patch_embed.proj.kernel":  # (p, p, C, D) -> (D, C, p, p)
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if path.endswith(".kernel"):  # Linear (in, out) -> (out, in)
        return np.ascontiguousarray(value.T)
    return value


def from_timm_array(path: str, value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_timm_array`: timm's array for our ``path`` in our layout."""
    value = np.asarray(value)
    if path == "patch_embed.proj.kernel":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if path.endswith(".kernel"):
        return np.ascontiguousarray(value.T)
    return value


def encoder_flat_state(encoder: nnx.Module) -> dict[str, nnx.Variable]:
    """``{dotted path: variable}`` of every variable of ``encoder`` (params and fixed pos-embeds)."""
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(encoder))}


def flat_to_timm_state_dict(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{our dotted path: array}`` -> timm state dict (keys renamed, arrays transposed, fp32)."""
    return {timm_key(path): to_timm_array(path, np.asarray(v, np.float32)) for path, v in flat.items()}


def to_eva_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our RoPE encoder's timm-like state dict -> timm's ``Eva`` (``vit_*_dinov3``) keys: LayerScale
    ``blocks.i.ls1.gamma`` -> ``blocks.i.gamma_1`` (``ls2`` -> ``gamma_2``), the fused qkv bias -> ``q_bias``
    and ``v_bias``. The k part of the bias is dropped: it adds ``q . b_k`` to every logit of a query
    alike, which the softmax cancels (exact; timm keeps it a fixed zero)."""
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(blocks\.\d+)\.ls([12])\.gamma", k)
        if m:
            out[f"{m.group(1)}.gamma_{m.group(2)}"] = v
        elif k.endswith(".attn.qkv.bias"):
            q, _, vb = np.split(np.asarray(v), 3)
            out[k[: -len("qkv.bias")] + "q_bias"], out[k[: -len("qkv.bias")] + "v_bias"] = q, vb
        else:
            out[k] = v
    return out


def encoder_state_dict(encoder: VisionTransformer) -> dict[str, np.ndarray]:
    """The timm state dict of ``encoder`` (fp32 numpy): timm ``VisionTransformer`` keys, ``pos_embed``
    included even when it is a fixed sin-cos table (timm stores it as a learned parameter); timm
    ``Eva`` (``vit_*_dinov3``) keys for a RoPE encoder (:func:`to_eva_state_dict`)."""
    sd = flat_to_timm_state_dict({k: np.asarray(v[...]) for k, v in encoder_flat_state(encoder).items()})
    return to_eva_state_dict(sd) if encoder.pos_embed_type == "rope" else sd


# ----------------------------------------------------------------------------------------------
# Import: timm-layout state dict -> our encoder, in place.
# ----------------------------------------------------------------------------------------------


def _square_side(n: int) -> int | None:
    side = int(round(np.sqrt(n)))
    return side if side * side == n and n > 0 else None


def source_pos_layout(
    rows: int, num_prefix: int, source_grid: Sequence[int] | None, no_embed_class: bool | None
) -> tuple[int, tuple[int, int]]:
    """(prefix slots, grid) of a source position table with ``rows`` rows."""
    candidates = [num_prefix, 0] if no_embed_class is None else [0 if no_embed_class else num_prefix]
    for slots in candidates:
        if source_grid is not None:
            gh, gw = int(source_grid[0]), int(source_grid[1])
            if gh * gw + slots == rows:
                return slots, (gh, gw)
        elif (side := _square_side(rows - slots)) is not None:
            return slots, (side, side)
    raise InteropError(
        f"Key 'pos_embed' has {rows} rows, which is not {num_prefix} or 0 prefix slots plus a square "
        "grid; pass the source grid (our exports store it in config.json as img_size/patch_size)."
    )


def _adapt_channels(w: np.ndarray, target: int, adapted: list[str]) -> np.ndarray:
    """timm ``(D, C, p, p)`` patch kernel with C input channels -> ``target`` channels."""
    c = w.shape[1]
    if c == target:
        return w
    if target == 1:
        adapted.append(f"patch_embed.proj.weight: {c} input channels summed into 1 (timm adapt_input_conv)")
        return w.sum(axis=1, keepdims=True)
    if c == 1:
        adapted.append(f"patch_embed.proj.weight: 1 input channel repeated to {target}, divided by {target}")
        return np.repeat(w, target, axis=1) / float(target)
    raise InteropError(
        f"Key 'patch_embed.proj.weight' has {c} input channels; cannot adapt them to "
        f"{target}. Set --config.model.in_chans to 1 or {c}."
    )


def _adapt_pos_embed(
    sd: dict[str, np.ndarray],
    encoder: VisionTransformer,
    source_grid: Sequence[int] | None,
    no_embed_class: bool | None,
    adapted: list[str],
) -> None:
    num_prefix = int("cls_token" in sd) + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    pe = sd["pos_embed"]
    slots, grid = source_pos_layout(pe.shape[1], num_prefix, source_grid, no_embed_class)
    target_slots = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
    if slots and not target_slots:  # fold the slots into the tokens: exact
        if "cls_token" in sd:
            sd["cls_token"] = sd["cls_token"] + pe[:, :1]
        if "reg_token" in sd:
            sd["reg_token"] = sd["reg_token"] + pe[:, int("cls_token" in sd) : slots]
        pe = pe[:, slots:]
        adapted.append("pos_embed: prefix-token slots folded into cls_token/reg_token (no_embed_class)")
    elif target_slots and not slots:  # zero slots: exact
        pe = np.concatenate([np.zeros((1, target_slots, pe.shape[2]), pe.dtype), pe], axis=1)
        adapted.append("pos_embed: zero slots added for the prefix tokens (source had no_embed_class)")
    if tuple(grid) != tuple(encoder.grid_size):
        # The encoder's own interpolation mode: "dino" resamples as DINO/DINOv2 do at run time.
        if getattr(encoder, "pos_embed_interpolation", "timm") == "dino":
            prefix, table = pe[:, :target_slots], pe[:, target_slots:]
            table = np.asarray(resample_pos_embed_dino(jnp.asarray(table), encoder.grid_size, grid))
            pe = np.concatenate([prefix, table], axis=1)
            how = "plain bicubic with DINO's +0.1 offset"
        else:
            pe = np.asarray(
                resample_abs_pos_embed(
                    jnp.asarray(pe), encoder.grid_size, old_size=grid, num_prefix_tokens=target_slots
                )
            )
            how = "bicubic, antialias, as timm"
        adapted.append(
            f"pos_embed: grid resampled {grid[0]}x{grid[1]} -> {encoder.grid_size[0]}x{encoder.grid_size[1]} ({how})"
        )
    sd["pos_embed"] = pe


def _adapt_layer_scale(sd: dict[str, np.ndarray], encoder: VisionTransformer, adapted: list[str]) -> None:
    has_src = any(k.endswith(".ls1.gamma") for k in sd)
    has_dst = len(encoder.blocks) > 0 and encoder.blocks[0].ls1 is not None
    if has_src and not has_dst:
        for i in range(len(encoder.blocks)):
            for ls, layer in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
                g = sd.pop(f"blocks.{i}.{ls}.gamma", None)
                if g is None:
                    continue
                sd[f"blocks.{i}.{layer}.weight"] = sd[f"blocks.{i}.{layer}.weight"] * g[:, None]
                sd[f"blocks.{i}.{layer}.bias"] = sd[f"blocks.{i}.{layer}.bias"] * g
        adapted.append("LayerScale gammas folded into attn.proj / mlp.fc2 (exact)")
    elif has_dst and not has_src:
        d = encoder.embed_dim
        for i in range(len(encoder.blocks)):
            sd[f"blocks.{i}.ls1.gamma"] = np.ones((d,), np.float32)
            sd[f"blocks.{i}.ls2.gamma"] = np.ones((d,), np.float32)
        adapted.append("LayerScale gammas set to 1 (source has none; exact)")


def load_timm_state_dict(
    encoder: VisionTransformer,
    state_dict: Mapping[str, Any],
    *,
    source_grid: Sequence[int] | None = None,
    source_no_embed_class: bool | None = None,
    source_num_heads: int | None = None,
) -> dict[str, Any]:
    """Overwrites ``encoder``'s variables in place from a ViT state dict of any supported layout.

    Args:
      encoder: the target; its config decides channels, grid, prefix layout and LayerScale.
      state_dict: timm/DINO/DINOv2/Hugging Face/our-export keys -> arrays (numpy or torch).
      source_grid: the source's patch grid when it is not square (our exports know it).
      source_no_embed_class: whether the source's prefix tokens have position slots, when known.
      source_num_heads: the source's head count when known (checked; a state dict cannot tell).

    Returns:
      A report: ``layout``, ``loaded`` (timm keys), ``adapted`` (what was changed and how),
      ``left_at_init`` (our paths not in the file), ``dropped`` (file keys that are not backbone),
      ``warnings``.

    Raises:
      InteropError: naming the key, on missing/unexpected keys and shape mismatches.
    """
    sd, info = normalize_vit_state_dict(state_dict)
    if source_no_embed_class is None:
        source_no_embed_class = info["no_embed_class"]
    arch = describe_vit_state_dict(sd)
    adapted: list[str] = []
    warnings: list[str] = []
    left_at_init: list[str] = []

    heads = source_num_heads
    if heads is not None and heads != encoder.num_heads:
        raise InteropError(
            f"The source has {heads} attention heads, the model {encoder.num_heads}: "
            f"set --config.model.num_heads={heads} (or the matching variant)."
        )
    if heads is None and arch["embed_dim"] in USUAL_NUM_HEADS and arch["num_heads"] != encoder.num_heads:
        warnings.append(
            f"the file does not store the head count; width {arch['embed_dim']} usually has "
            f"{arch['num_heads']} heads, the model has {encoder.num_heads}"
        )
    p = encoder.patch_size
    if arch["patch_size"] != p:
        raise InteropError(
            f"Key 'patch_embed.proj.weight' has patch size {arch['patch_size']}, the model "
            f"{p}: use a '/{arch['patch_size']}' variant (e.g. --config.model.variant=B/"
            f"{arch['patch_size']})."
        )
    rope = encoder.pos_embed_type == "rope"
    if arch["rope"] != rope:
        raise InteropError(
            "The source has rotary position embeddings (no 'pos_embed'; DINOv3): set --config.model.pos_embed=rope."
            if arch["rope"]
            else "The source has an absolute position table ('pos_embed'), the model RoPE: set "
            "--config.model.pos_embed=learned (or sincos)."
        )
    qkv_bias = encoder.blocks[0].attn.qkv.use_bias if len(encoder.blocks) else arch["qkv_bias"]
    if arch["qkv_bias"] and not qkv_bias:
        biases = [sd[k] for k in sd if k.endswith(".attn.qkv.bias")]
        if any(np.any(b != 0) for b in biases):
            raise InteropError(
                "The source has non-zero qkv biases ('blocks.0.attn.qkv.bias'), the model none: "
                "set --config.model.qkv_bias=True."
            )
        for k in [k for k in sd if k.endswith(".attn.qkv.bias")]:
            del sd[k]
        adapted.append("attn.qkv.bias: all zero in the source, dropped (the model has no qkv bias; exact)")
    elif qkv_bias and not arch["qkv_bias"]:
        for i in range(arch["depth"]):
            sd[f"blocks.{i}.attn.qkv.bias"] = np.zeros((3 * arch["embed_dim"],), np.float32)
        adapted.append("attn.qkv.bias: zeros (the source has no qkv bias; exact)")
    if arch["class_token"] != encoder.has_class_token:
        raise InteropError(
            f"The source {'has' if arch['class_token'] else 'has no'} class token "
            f"('cls_token'); set --config.model.class_token={arch['class_token']}."
        )
    if arch["reg_tokens"] != encoder.num_reg_tokens:
        if arch["reg_tokens"] == 0 and "pos_embed" in sd:
            sd["reg_token"] = np.asarray(encoder.reg_token[...], np.float32)  # keep the init
            left_at_init.append("reg_token")
            pe = sd["pos_embed"]
            slots, grid = source_pos_layout(pe.shape[1], int(arch["class_token"]), source_grid, source_no_embed_class)
            if slots:  # the new registers get zero position slots after the class token's
                zeros = np.zeros((1, encoder.num_reg_tokens, pe.shape[2]), np.float32)
                sd["pos_embed"] = np.concatenate([pe[:, :slots], zeros, pe[:, slots:]], axis=1)
                adapted.append("pos_embed: zero slots added for the new register tokens")
            source_grid, source_no_embed_class = grid, slots == 0
        else:
            raise InteropError(
                f"Key 'reg_token' has {arch['reg_tokens']} register tokens, the model "
                f"{encoder.num_reg_tokens}: set --config.model.num_reg_tokens="
                f"{arch['reg_tokens']}."
            )
    sd["patch_embed.proj.weight"] = _adapt_channels(sd["patch_embed.proj.weight"], encoder.in_chans, adapted)
    if "pos_embed" in sd:
        _adapt_pos_embed(sd, encoder, source_grid, source_no_embed_class, adapted)
    _adapt_layer_scale(sd, encoder, adapted)

    loaded: list[str] = []
    targets = encoder_flat_state(encoder)
    missing = [timm_key(path) for path in targets if timm_key(path) not in sd]
    if missing:
        raise InteropError(
            f"Key {missing[0]!r} is missing from the file ({len(missing)} missing in all: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); the file has "
            f"depth {arch['depth']} and width {arch['embed_dim']}, the model "
            f"{len(encoder.blocks)} and {encoder.embed_dim}."
        )
    unexpected = sorted(set(sd) - {timm_key(path) for path in targets})
    if unexpected:
        raise InteropError(
            f"Key {unexpected[0]!r} in the file has no place in the model ("
            f"{', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}); the file "
            f"has depth {arch['depth']}, the model {len(encoder.blocks)}."
        )
    new_values = {}
    for path, var in targets.items():
        key = timm_key(path)
        value = from_timm_array(path, sd[key])
        if value.shape != tuple(var.shape):
            raise InteropError(
                f"Key {key!r} has shape {tuple(sd[key].shape)} in the file but the model "
                f"needs {tuple(to_timm_array(path, np.zeros(var.shape)).shape)} (timm "
                "layout); check the variant / width / mlp_dim of the config."
            )
        new_values[path] = value.astype(var.dtype)
    for path, var in targets.items():  # assign only once everything fits: no half-loaded model
        var.set_value(jnp.asarray(new_values[path]))  # also fills an nnx.eval_shape (abstract) model
        if path.split(".")[0] not in left_at_init:
            loaded.append(timm_key(path))
    return dict(
        layout=info["layout"],
        loaded=loaded,
        adapted=adapted,
        left_at_init=left_at_init,
        dropped=info["dropped"],
        warnings=warnings,
    )
