"""The ViT parameter-name mapping between our Flax encoder and timm's ``VisionTransformer``, both ways.

What: this is the single place that knows how a :class:`~afm_jax.models.vit.VisionTransformer`
parameter path maps to a timm state-dict key, and how foreign layouts (DINO, DINOv2 with or without
registers, Hugging Face ``Dinov2Model`` as RAD-DINO ships it, MAE pretraining checkpoints, timm
ImageNet ViTs) become timm's layout first. No torch is needed here: state dicts are numpy arrays
(``safetensors.numpy`` reads them); only the parity helpers at the end import torch/timm, lazily.

Why the adaptations are what they are (each one is exact or follows timm, and is reported):

* **Names.** Our tree already mirrors timm's, so export only renames leaves (``kernel``/``scale`` ->
  ``weight``) and transposes (Linear ``(in, out)`` -> ``(out, in)``; conv ``(p, p, C, D)`` ->
  ``(D, C, p, p)``).
* **RGB -> one channel.** The patch kernel's RGB planes are summed (timm's ``adapt_input_conv`` for
  ``in_chans=1``): a grey image then sees the filter an RGB-replicated copy of it would see. One
  channel -> three divides by three (timm's rule for other channel counts is not needed here).
* **Position embeddings** are resampled bicubically with antialias to our grid (timm's
  ``resample_abs_pos_embed``); prefix slots are folded into the class/register tokens when the
  target has ``no_embed_class`` (exact: what timm does for DINOv2 with registers) and zero slots are
  added in the opposite case (also exact).
* **LayerScale** (DINOv2) loaded into a model without it is folded into ``attn.proj`` / ``mlp.fc2``
  (exact: ``gamma * (W x + b)``); a source without it loaded into a model with it gets ``gamma = 1``.
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
from afm_jax.errors import ConfigError
from afm_jax.models.pos_embed import resample_abs_pos_embed
from afm_jax.models.vit import VisionTransformer

__all__ = [
    "InteropError",
    "timm_key",
    "to_timm_array",
    "from_timm_array",
    "encoder_flat_state",
    "encoder_state_dict",
    "flat_to_timm_state_dict",
    "normalize_vit_state_dict",
    "describe_vit_state_dict",
    "load_timm_state_dict",
    "timm_model_args",
    "timm_architecture",
    "timm_pretrained_cfg",
    "create_timm_vit",
    "forward_parity",
    "export_config",
    "write_export",
    "usage_snippet",
]


# Width -> the head count every public ViT of that width uses (timm, DINO, DINOv2, MAE).
USUAL_NUM_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1536: 24}

# Keys of state dicts that are not part of the backbone: dropped on import, and reported.
_NON_BACKBONE = re.compile(
    r"^(head\b|head_drop|fc_norm_head|mask_token|decoder|attn_pool|pre_logits|dist_token|head_dist)"
)


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
    return {
        timm_key(path): to_timm_array(path, np.asarray(v, np.float32)) for path, v in flat.items()
    }


def encoder_state_dict(encoder: VisionTransformer) -> dict[str, np.ndarray]:
    """The timm ``VisionTransformer`` state dict of ``encoder`` (fp32 numpy), ``pos_embed`` included
    even when it is a fixed sin-cos table (timm stores it as a learned parameter)."""
    return flat_to_timm_state_dict(
        {k: np.asarray(v[...]) for k, v in encoder_flat_state(encoder).items()}
    )


# ----------------------------------------------------------------------------------------------
# Foreign layouts -> timm layout.
# ----------------------------------------------------------------------------------------------

_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _strip_prefix(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """Finds the backbone inside a wrapped state dict (``module.``, ``backbone.``, ``teacher.``,
    ``dinov2.``, ``encoder.`` ...) by its patch-embedding key; keys outside it are dropped."""
    anchors = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")
    hits = [(k[: -len(a)], a) for k in sd for a in anchors if k.endswith(a)]
    if not hits:
        raise InteropError(
            "No ViT patch embedding found in the file (expected a key ending in "
            "'patch_embed.proj.weight' as timm/DINO/DINOv2 write it, or "
            "'embeddings.patch_embeddings.projection.weight' as Hugging Face Dinov2Model does). "
            "Is this a ViT checkpoint? CNNs (RadImageNet ResNet-50) load with "
            "afm_jax.interop.torchvision_resnet."
        )
    prefix = min((h[0] for h in hits), key=len)
    if prefix and not any(k == prefix + "cls_token" or k.startswith(prefix + "blocks.") or
                          k.startswith(prefix + "encoder.layer.") for k in sd):
        raise InteropError(f"Found a patch embedding under {prefix!r} but no transformer blocks.")
    kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = sorted(k for k in sd if not k.startswith(prefix))
    return kept, prefix, dropped


def _from_hf_dinov2(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face ``Dinov2Model`` keys (RAD-DINO) -> DINOv2 reference keys."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", k)
        if m:
            i, mid, leaf = int(m.group(1)), m.group(2), m.group(3)
            att = re.fullmatch(r"attention\.attention\.(query|key|value)", mid)
            if att:
                qkv.setdefault((i, leaf), {})[att.group(1)] = v
                continue
            name = f"{mid}.{leaf}" if leaf == "lambda1" else mid
            if name not in _HF_BLOCK:
                raise InteropError(f"Unsupported Hugging Face Dinov2 key {k!r} (SwiGLU / giant "
                                   "models are not supported by our ViT).")
            target = _HF_BLOCK[name]
            out[f"blocks.{i}.{target}" + ("" if leaf == "lambda1" else f".{leaf}")] = v
            continue
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.mask_token": "mask_token",
            "embeddings.register_tokens": "register_tokens",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight",
            "layernorm.bias": "norm.bias",
        }
        out[simple.get(k, k)] = v
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise InteropError(f"Layer {i}: attention {leaf} lacks one of query/key/value.")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0)
    return out


def normalize_vit_state_dict(sd: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Any supported ViT state dict -> timm's ``VisionTransformer`` layout (fp32 numpy).

    Supported: timm (ImageNet, augreg, DINOv2 timm ports), DINO (backbone or full teacher/student
    dicts, ``module.``/``backbone.`` prefixes), DINOv2 reference checkpoints (``register_tokens``,
    ``mask_token``, chunked ``blocks.c.i``), Hugging Face ``Dinov2Model`` (RAD-DINO), MAE
    pretraining checkpoints (decoder dropped) and our own exports.

    Returns:
      ``(state_dict, info)`` where ``info`` has ``layout``, ``prefix``, ``dropped`` (keys that are
      not part of the backbone) and ``no_embed_class`` (True/False when the layout fixes it, None
      when it must be inferred from shapes).
    """
    sd = {str(k): np.asarray(v, dtype=np.float32) for k, v in sd.items()}
    sd, prefix, dropped = _strip_prefix(sd)
    layout = "timm"
    no_embed_class: bool | None = None
    if "embeddings.patch_embeddings.projection.weight" in sd:
        sd = _from_hf_dinov2(sd)
        layout = "huggingface-dinov2"
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):  # DINOv2 block chunks
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    if any(re.match(r"blocks\.\d+\.mlp\.w(12|3)\.", k) for k in sd):
        raise InteropError("This checkpoint uses SwiGLU MLPs (DINOv2 giant); our ViT has GELU MLPs "
                           "and cannot load it. Use ViT-S/B/L DINOv2 weights.")
    if "mask_token" in sd or "register_tokens" in sd:
        layout = "dinov2" if layout == "timm" else layout
        sd.pop("mask_token", None)
        dropped.append(prefix + "mask_token")
        if "register_tokens" in sd:  # as timm's _convert_dinov2: prefix tokens leave the pos table
            sd["reg_token"] = sd.pop("register_tokens")
            sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
            sd["pos_embed"] = sd["pos_embed"][:, 1:]
            no_embed_class = True
            layout += "-registers"
    for k in list(sd):
        if _NON_BACKBONE.match(k):
            dropped.append(prefix + k)
            del sd[k]
    if "norm.weight" not in sd and "fc_norm.weight" in sd:
        raise InteropError("This checkpoint has `fc_norm` (pooled-feature norm) instead of the final "
                           "token `norm` (a fine-tuned avg-pool classifier); export its backbone from "
                           "the pretraining checkpoint instead.")
    return sd, dict(layout=layout, prefix=prefix, dropped=sorted(set(dropped)),
                    no_embed_class=no_embed_class)


def describe_vit_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The architecture a timm-layout ViT state dict implies (what shapes can tell).

    Returns ``embed_dim``, ``in_chans``, ``patch_size``, ``depth``, ``mlp_dim``, ``class_token``,
    ``reg_tokens``, ``layer_scale``, ``pos_rows`` and ``num_heads`` (a guess from the width: the
    head count is not stored in a state dict).
    """
    if "patch_embed.proj.weight" not in sd:
        raise InteropError("State dict lacks 'patch_embed.proj.weight'; not a timm-layout ViT.")
    d, c, ph, pw = sd["patch_embed.proj.weight"].shape
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    return dict(
        embed_dim=int(d),
        in_chans=int(c),
        patch_size=int(ph) if ph == pw else (int(ph), int(pw)),
        depth=depth,
        mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]) if depth else 0,
        class_token="cls_token" in sd,
        reg_tokens=int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0,
        layer_scale="blocks.0.ls1.gamma" in sd,
        pos_rows=int(sd["pos_embed"].shape[1]) if "pos_embed" in sd else 0,
        num_heads=USUAL_NUM_HEADS.get(int(d), max(int(d) // 64, 1)),
    )


# ----------------------------------------------------------------------------------------------
# Import: timm-layout state dict -> our encoder, in place.
# ----------------------------------------------------------------------------------------------


def _square_side(n: int) -> int | None:
    side = int(round(np.sqrt(n)))
    return side if side * side == n and n > 0 else None


def _source_pos_layout(
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
        "grid; pass the source grid (our exports store it in config.json as img_size/patch_size).")


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
    raise InteropError(f"Key 'patch_embed.proj.weight' has {c} input channels; cannot adapt them to "
                       f"{target}. Set --config.model.in_chans to 1 or {c}.")


def _adapt_pos_embed(
    sd: dict[str, np.ndarray],
    encoder: VisionTransformer,
    source_grid: Sequence[int] | None,
    no_embed_class: bool | None,
    adapted: list[str],
) -> None:
    num_prefix = int("cls_token" in sd) + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    pe = sd["pos_embed"]
    slots, grid = _source_pos_layout(pe.shape[1], num_prefix, source_grid, no_embed_class)
    target_slots = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
    if slots and not target_slots:  # fold the slots into the tokens: exact
        if "cls_token" in sd:
            sd["cls_token"] = sd["cls_token"] + pe[:, :1]
        if "reg_token" in sd:
            sd["reg_token"] = sd["reg_token"] + pe[:, int("cls_token" in sd):slots]
        pe = pe[:, slots:]
        adapted.append("pos_embed: prefix-token slots folded into cls_token/reg_token (no_embed_class)")
    elif target_slots and not slots:  # zero slots: exact
        pe = np.concatenate([np.zeros((1, target_slots, pe.shape[2]), pe.dtype), pe], axis=1)
        adapted.append("pos_embed: zero slots added for the prefix tokens (source had no_embed_class)")
    if tuple(grid) != tuple(encoder.grid_size):
        pe = np.asarray(resample_abs_pos_embed(jnp.asarray(pe), encoder.grid_size, old_size=grid,
                                               num_prefix_tokens=target_slots))
        adapted.append(f"pos_embed: grid resampled {grid[0]}x{grid[1]} -> "
                       f"{encoder.grid_size[0]}x{encoder.grid_size[1]} (bicubic, antialias, as timm)")
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
        raise InteropError(f"The source has {heads} attention heads, the model {encoder.num_heads}: "
                           f"set --config.model.num_heads={heads} (or the matching variant).")
    if heads is None and arch["embed_dim"] in USUAL_NUM_HEADS and arch["num_heads"] != encoder.num_heads:
        warnings.append(f"the file does not store the head count; width {arch['embed_dim']} usually has "
                        f"{arch['num_heads']} heads, the model has {encoder.num_heads}")
    p = encoder.patch_size
    if arch["patch_size"] != p:
        raise InteropError(f"Key 'patch_embed.proj.weight' has patch size {arch['patch_size']}, the model "
                           f"{p}: use a '/{arch['patch_size']}' variant (e.g. --config.model.variant=B/"
                           f"{arch['patch_size']}).")
    if arch["class_token"] != encoder.has_class_token:
        raise InteropError(f"The source {'has' if arch['class_token'] else 'has no'} class token "
                           f"('cls_token'); set --config.model.class_token={arch['class_token']}.")
    if arch["reg_tokens"] != encoder.num_reg_tokens:
        if arch["reg_tokens"] == 0 and "pos_embed" in sd:
            sd["reg_token"] = np.asarray(encoder.reg_token[...], np.float32)  # keep the init
            left_at_init.append("reg_token")
            pe = sd["pos_embed"]
            slots, grid = _source_pos_layout(pe.shape[1], int(arch["class_token"]), source_grid,
                                             source_no_embed_class)
            if slots:  # the new registers get zero position slots after the class token's
                zeros = np.zeros((1, encoder.num_reg_tokens, pe.shape[2]), np.float32)
                sd["pos_embed"] = np.concatenate([pe[:, :slots], zeros, pe[:, slots:]], axis=1)
                adapted.append("pos_embed: zero slots added for the new register tokens")
            source_grid, source_no_embed_class = grid, slots == 0
        else:
            raise InteropError(f"Key 'reg_token' has {arch['reg_tokens']} register tokens, the model "
                               f"{encoder.num_reg_tokens}: set --config.model.num_reg_tokens="
                               f"{arch['reg_tokens']}.")
    sd["patch_embed.proj.weight"] = _adapt_channels(sd["patch_embed.proj.weight"], encoder.in_chans, adapted)
    if "pos_embed" in sd:
        _adapt_pos_embed(sd, encoder, source_grid, source_no_embed_class, adapted)
    _adapt_layer_scale(sd, encoder, adapted)

    loaded: list[str] = []
    targets = encoder_flat_state(encoder)
    missing = [timm_key(path) for path in targets if timm_key(path) not in sd]
    if missing:
        raise InteropError(f"Key {missing[0]!r} is missing from the file ({len(missing)} missing in all: "
                           f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); the file has "
                           f"depth {arch['depth']} and width {arch['embed_dim']}, the model "
                           f"{len(encoder.blocks)} and {encoder.embed_dim}.")
    unexpected = sorted(set(sd) - {timm_key(path) for path in targets})
    if unexpected:
        raise InteropError(f"Key {unexpected[0]!r} in the file has no place in the model ("
                           f"{', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}); the file "
                           f"has depth {arch['depth']}, the model {len(encoder.blocks)}.")
    new_values = {}
    for path, var in targets.items():
        key = timm_key(path)
        value = from_timm_array(path, sd[key])
        if value.shape != tuple(var.shape):
            raise InteropError(f"Key {key!r} has shape {tuple(sd[key].shape)} in the file but the model "
                               f"needs {tuple(to_timm_array(path, np.zeros(var.shape)).shape)} (timm "
                               "layout); check the variant / width / mlp_dim of the config.")
        new_values[path] = value.astype(var.dtype)
    for path, var in targets.items():  # assign only once everything fits: no half-loaded model
        var.set_value(jnp.asarray(new_values[path]))  # also fills an nnx.eval_shape (abstract) model
        if path.split(".")[0] not in left_at_init:
            loaded.append(timm_key(path))
    return dict(layout=info["layout"], loaded=loaded, adapted=adapted, left_at_init=left_at_init,
                dropped=info["dropped"], warnings=warnings)


# ----------------------------------------------------------------------------------------------
# Export metadata: how timm rebuilds the encoder.
# ----------------------------------------------------------------------------------------------

_TIMM_SIZE = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
_REGISTERED = {
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_small_patch8_224",
    "vit_base_patch16_224", "vit_base_patch32_224", "vit_base_patch8_224", "vit_large_patch16_224",
    "vit_large_patch32_224", "vit_huge_patch14_224", "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2", "vit_large_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2", "vit_large_patch14_reg4_dinov2",
}


def _has_layer_scale(encoder: VisionTransformer) -> bool:
    return len(encoder.blocks) > 0 and encoder.blocks[0].ls1 is not None


def timm_architecture(encoder: VisionTransformer) -> str:
    """A registered timm model name close to ``encoder`` (every size argument is passed explicitly
    anyway, so the name only picks timm's entry point and default pretrained config)."""
    size = _TIMM_SIZE.get(str(encoder.variant).split("/")[0].strip(), "base")
    p = encoder.patch_size
    names = [f"vit_{size}_patch{p}_224"]
    if p == 14:
        names.insert(0, f"vit_{size}_patch14_{'reg4_' if encoder.num_reg_tokens else ''}dinov2")
    return next((n for n in names if n in _REGISTERED), "vit_base_patch16_224")


def timm_model_args(encoder: VisionTransformer, *, global_pool: str | None = None) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild ``encoder`` as a headless timm ViT.

    ``num_classes=0`` (no head: the export is a backbone), ``fc_norm=False`` (so the final ``norm``
    stays the token norm even with ``global_pool='avg'``), ``dynamic_img_size=True`` (any input size
    that is a multiple of the patch, position embeddings resampled as ours are).
    """
    h, w = encoder.img_size
    pool = global_pool or ("token" if encoder.has_class_token else "avg")
    return dict(
        img_size=h if h == w else [h, w],
        patch_size=encoder.patch_size,
        embed_dim=encoder.embed_dim,
        depth=len(encoder.blocks),
        num_heads=encoder.num_heads,
        mlp_ratio=encoder.mlp_dim / encoder.embed_dim,
        in_chans=encoder.in_chans,
        class_token=encoder.has_class_token,
        reg_tokens=encoder.num_reg_tokens,
        no_embed_class=encoder.no_embed_class,
        init_values=1e-5 if _has_layer_scale(encoder) else None,  # only decides that gammas exist
        qkv_bias=True,
        global_pool=pool,
        fc_norm=False,
        num_classes=0,
        dynamic_img_size=True,
    )


def timm_pretrained_cfg(encoder: VisionTransformer) -> dict[str, Any]:
    """timm ``pretrained_cfg`` entries: input size and the normalisation the encoder applies."""
    h, w = encoder.img_size
    return dict(
        input_size=[encoder.in_chans, h, w],
        mean=list(encoder.input_mean),
        std=list(encoder.input_std),
        interpolation="bicubic",
        crop_pct=1.0,
        num_classes=0,
        first_conv="patch_embed.proj",
        classifier="head",
        fixed_input_size=False,
    )


# ----------------------------------------------------------------------------------------------
# Parity (needs torch + timm; imported lazily).
# ----------------------------------------------------------------------------------------------


def create_timm_vit(model_args: Mapping[str, Any], state_dict: Mapping[str, np.ndarray] | None = None):
    """A timm ``VisionTransformer`` (eval mode, random init unless ``state_dict``, loaded strictly)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    args = dict(model_args)
    img = args.pop("img_size")
    model = TimmViT(img_size=tuple(img) if isinstance(img, (list, tuple)) else img, **args).eval()
    if state_dict is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                              strict=True)
    return model


def forward_parity(
    encoder: VisionTransformer, timm_model: Any, *, batch: int = 2, size: Sequence[int] | None = None,
    seed: int = 0,
) -> float:
    """Max |ours(x) - timm.forward_features(normalised x)| on a random batch of [0, 1] images."""
    import torch

    h, w = size or encoder.img_size
    x = np.random.default_rng(seed).random((batch, h, w, encoder.in_chans), dtype=np.float32)
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(encoder, jnp.asarray(x)))
    xn = (x - np.asarray(encoder.input_mean, np.float32)) / np.asarray(encoder.input_std, np.float32)
    with torch.no_grad():
        ref = timm_model.forward_features(torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())).numpy()
    return float(np.max(np.abs(ours - ref)))


# ----------------------------------------------------------------------------------------------
# The export folder: model.safetensors + config.json (timm's local-dir / Hub format) + README.md.
# ----------------------------------------------------------------------------------------------


def export_config(encoder: VisionTransformer, afm_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` content: timm's ``architecture``/``model_args``/``pretrained_cfg`` (what
    ``timm.create_model("local-dir:OUT")`` reads) plus our own ``afm_jax`` section."""
    args = timm_model_args(encoder)
    return dict(
        architecture=timm_architecture(encoder),
        num_classes=0,
        num_features=encoder.embed_dim,
        global_pool=args["global_pool"],
        model_args=args,
        pretrained_cfg=timm_pretrained_cfg(encoder),
        afm_jax={"variant": str(encoder.variant), "pos_embed": encoder.pos_embed_type,
                 **dict(afm_info or {})},
    )


def write_export(
    out_dir: str, encoder: VisionTransformer, *, afm_info: Mapping[str, Any] | None = None,
    readme: str | None = None,
) -> dict[str, Any]:
    """Writes ``OUT/model.safetensors`` (timm keys, fp32), ``OUT/config.json`` and ``OUT/README.md``.

    Returns the config written. The safetensors file carries ``{"format": "pt"}`` metadata, as
    torch-saved safetensors do.
    """
    import json
    import os

    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    sd = encoder_state_dict(encoder)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = export_config(encoder, afm_info)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if readme is not None:
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(readme)
    return config


def usage_snippet(out_dir: str, config: Mapping[str, Any]) -> str:
    """Python that loads an export folder in timm (three equivalent ways)."""
    args = ", ".join(f"{k}={v!r}" for k, v in config["model_args"].items())
    pc = config["pretrained_cfg"]
    return (
        "import timm, torch\n"
        f"# 1. timm reads config.json itself\n"
        f"model = timm.create_model('local-dir:{out_dir}', pretrained=True)\n"
        f"# 2. a named architecture + this file\n"
        f"model = timm.create_model('{config['architecture']}', pretrained=True,\n"
        f"    pretrained_cfg_overlay=dict(file='{out_dir}/model.safetensors', mean={pc['mean']}, "
        f"std={pc['std']}, input_size={tuple(pc['input_size'])}),\n    {args})\n"
        f"# 3. plain PyTorch\n"
        f"from safetensors.torch import load_file\n"
        f"model = timm.create_model('{config['architecture']}', pretrained=False, {args})\n"
        f"model.load_state_dict(load_file('{out_dir}/model.safetensors'), strict=True)\n"
        f"# inputs: (B, {pc['input_size'][0]}, H, W) in [0, 1], normalised with mean {pc['mean']} std "
        f"{pc['std']}; features = model.forward_features(x)\n"
    )


PARITY_TOLERANCE = 1e-4   # max abs difference to timm's forward_features accepted by --check (fp32)


def add_parity_arguments(parser) -> None:
    """The parity-check options both interop tools take (--check, --tolerance, --no-parity)."""
    parser.add_argument("--check", action="store_true", help="fail if the timm parity check fails")
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE)
    parser.add_argument("--no-parity", action="store_true", help="skip the timm parity check")
