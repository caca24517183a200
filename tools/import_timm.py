"""Import a timm / DINO / DINOv2 / RAD-DINO ViT checkpoint as an afm-jax encoder (1 channel, our grid).

Usage: python tools/import_timm.py --input SOURCE --out OUT_DIR [--image_size 224] [--in_chans 1] [--num_heads N]
    [--check] [--overwrite]

Example:
    python tools/import_timm.py --input weights/dinov2_vits14_reg4_pretrain.pth --out imports/dinov2_s14 \\
        --image_size 224 --check

SOURCE (--input) is a local weights file (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
``torch.load(weights_only=True)``; DINO's ``teacher``/``student`` dicts are unwrapped) or a folder
with ``config.json`` + ``model.safetensors`` (a timm Hub snapshot, a Hugging Face Dinov2 snapshot such
as RAD-DINO, or an export of ours). The architecture is read from the weights (width, depth, patch,
registers, LayerScale); the head count is not stored in weights files, so it comes from
``config.json``, ``--num_heads`` or the usual count for the width.

The RGB patch kernel is summed into one channel (as timm's ``in_chans=1``), the position embedding is
resampled to ``--image_size``, DINOv2's LayerScale is folded into the projections (our configs have no
LayerScale); DINOv3 (timm's ``vit_*_dinov3`` or the original hub ``.pth``) keeps its RoPE, LayerScale,
storage tokens and qkv bias (the printed overrides say so), and timm's ``eva.checkpoint_filter_fn`` builds
the parity reference; OUT_DIR gets model.safetensors + config.json + README.md in the export format, so
training starts from it with ``--config.init_from=OUT_DIR`` (the command is printed) and timm loads
it as well.

Parity: timm itself builds the same adapted model from SOURCE (its ``checkpoint_filter_fn`` for the
DINOv2 layout and position resampling, ``adapt_input_conv`` for the channels) and one random batch
runs through both; the max abs difference of ``forward_features`` is printed. ``--check`` makes a
difference above ``--tolerance`` fail the command. An existing output in OUT_DIR is replaced only with
``--overwrite``, and never the source itself. The last line of output is one JSON object.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from flax import nnx

from afm_jax import cli
from afm_jax.errors import InteropError
from afm_jax.interop.timm import load_timm_state_dict, source_pos_layout
from afm_jax.interop.timm_export import (
    DINOV3_NORM_EPS,
    PARITY_TOLERANCE,
    clear_failed_marks,
    create_timm_vit,
    forward_parity,
    mark_failed_export,
    parity_failure,
    require_finite_state_dict,
    require_tolerance,
    timm_architecture,
    timm_model_args,
    usage_snippet,
    write_export,
)
from afm_jax.interop.vit_layouts import (
    _from_hf_dinov2,
    _strip_prefix,
    describe_vit_state_dict,
    normalize_vit_state_dict,
)
from afm_jax.models.vit import VIT_SIZES, VisionTransformer
from afm_jax.train.init_from import normalisation_mismatch, read_vit_source


def _variant(arch: dict[str, Any], num_heads: int) -> tuple[str, dict[str, int]]:
    """Our variant string (+ size overrides when no named size matches) for the source's shapes."""
    size = dict(width=arch["embed_dim"], depth=arch["depth"], num_heads=num_heads, mlp_dim=arch["mlp_dim"])
    p = arch["patch_size"]
    if not isinstance(p, int):
        raise InteropError(f"Non-square patches {p} are not supported by our ViT.")
    for name, known in VIT_SIZES.items():
        if known == size:
            return f"{name}/{p}", {}
    return f"B/{p}", size


def timm_reference(source_sd: dict, model_args: dict[str, Any], architecture: str | None = None):
    """timm's own adaptation of ``source_sd`` to ``model_args`` (independent of our mapping): its
    ``checkpoint_filter_fn`` (vision_transformer's, or eva's for DINOv3, which reads the original hub
    layout itself) and ``adapt_input_conv``."""
    import torch  # optional dependencies (pip install -e '.[torch]'); ImportError skips the parity check
    from timm.models import eva  # optional dependency
    from timm.models._manipulate import adapt_input_conv
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd, _, _ = _strip_prefix(dict(source_sd))
    if "embeddings.patch_embeddings.projection.weight" in sd:  # timm cannot read HF keys itself
        sd = _from_hf_dinov2(sd)
    model = create_timm_vit(model_args, architecture=architecture)
    dinov3 = bool(architecture and "dinov3" in architecture)
    sd = (eva.checkpoint_filter_fn if dinov3 else checkpoint_filter_fn)(
        {k: torch.from_numpy(v.copy()) for k, v in sd.items()}, model
    )
    sd["patch_embed.proj.weight"] = adapt_input_conv(model_args["in_chans"], sd["patch_embed.proj.weight"])
    wanted = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in sd.items() if k in wanted}, strict=True)
    return model


def _check_out(fv: flags.FlagValues) -> None:
    """--out must not be the source (or the folder holding the source file), nor an earlier output unless
    --overwrite."""
    cli.refuse_overwrite(fv.out, "model.safetensors", fv.overwrite)
    source = os.path.abspath(fv.input)
    holder = source if os.path.isdir(source) else os.path.dirname(source)
    if os.path.isdir(fv.out) and os.path.exists(holder) and os.path.samefile(fv.out, holder):
        raise InteropError(
            f"--out {fv.out} holds the source {fv.input}: writing there would replace it; give another folder."
        )


def _no_embed_class(normalized: dict, arch: dict[str, Any], known: bool | None, grid: Any) -> bool:
    """Whether the source's prefix tokens have no position slots: what the layout or config.json says,
    else what the position table's rows tell (timm's DINOv2 ports store only the grid, e.g. 37 x 37)."""
    if known is not None:
        return bool(known)
    num_prefix = int(arch["class_token"]) + arch["reg_tokens"]
    if "pos_embed" not in normalized or not num_prefix:
        return False
    slots, _ = source_pos_layout(arch["pos_rows"], num_prefix, grid, None)
    return slots == 0


def import_weights(fv: flags.FlagValues, args: list[str]) -> int:
    require_tolerance(fv.tolerance)
    cli.require_positive(fv.image_size, "image_size", allow_zero=False)
    cli.require_positive(fv.num_heads, "num_heads", allow_zero=False)
    _check_out(fv)
    source_sd, kwargs, info = read_vit_source(fv.input)
    normalized, layout = normalize_vit_state_dict(source_sd)
    require_finite_state_dict(normalized, f"The weights in {fv.input}")
    arch = describe_vit_state_dict(normalized)
    heads = fv.num_heads or kwargs.get("source_num_heads") or arch["num_heads"]
    kwargs["source_num_heads"] = heads
    variant, overrides = _variant(arch, heads)
    if fv.image_size % arch["patch_size"]:
        raise InteropError(
            f"--image_size {fv.image_size} is not a multiple of the source's patch size "
            f"{arch['patch_size']}; use e.g. "
            f"{fv.image_size // arch['patch_size'] * arch['patch_size']}."
        )
    no_embed_class = _no_embed_class(
        normalized, arch, kwargs.get("source_no_embed_class", layout["no_embed_class"]), kwargs.get("source_grid")
    )
    kwargs["source_no_embed_class"] = no_embed_class
    rope = arch["rope"]  # DINOv3: RoPE, LayerScale kept, qkv bias as the source, LayerNorm eps 1e-5
    rope_kw = (
        dict(
            pos_embed="rope",
            layer_scale_init=1e-5 if arch["layer_scale"] else None,
            qkv_bias=arch["qkv_bias"],
            norm_eps=DINOV3_NORM_EPS,
        )
        if rope
        else dict(pos_embed="learned")
    )
    encoder = VisionTransformer(
        variant,
        img_size=fv.image_size,
        in_chans=int(fv.in_chans),
        class_token=arch["class_token"],
        num_reg_tokens=arch["reg_tokens"],
        no_embed_class=no_embed_class and not rope,
        rngs=nnx.Rngs(0),
        **rope_kw,
        **overrides,
    )
    report = load_timm_state_dict(encoder, source_sd, **kwargs)
    if "source_mean" in info and (note := normalisation_mismatch(info["source_mean"], info["source_std"], encoder)):
        report["warnings"].append(note)

    parity: dict[str, float] = {}
    if not fv.no_parity:
        try:
            ref_args = dict(
                img_size=fv.image_size,
                patch_size=arch["patch_size"],
                embed_dim=arch["embed_dim"],
                depth=arch["depth"],
                num_heads=heads,
                mlp_ratio=arch["mlp_dim"] / arch["embed_dim"],
                in_chans=int(fv.in_chans),
                class_token=arch["class_token"],
                reg_tokens=arch["reg_tokens"],
                no_embed_class=no_embed_class,
                init_values=1e-5 if arch["layer_scale"] else None,
                global_pool="token" if arch["class_token"] else "avg",
                fc_norm=False,
                num_classes=0,
                dynamic_img_size=True,
            )
            architecture = None
            if rope:
                architecture = timm_architecture(encoder)
                ref_args = {k: v for k, v in timm_model_args(encoder).items()}
            reference = timm_reference(source_sd, ref_args, architecture)
            s = fv.image_size
            parity = {f"{s}x{s}": forward_parity(encoder, reference)}
            other = max(arch["patch_size"], (3 * s // 2) // arch["patch_size"] * arch["patch_size"])
            parity[f"{other}x{other}"] = forward_parity(encoder, reference, size=(other, other), seed=1)
        except ImportError as e:
            if fv.check:
                raise InteropError(f"--check needs torch and timm ({e}); pip install -e '.[torch]'.") from e
            print(f"parity check skipped: {e}", file=sys.stderr)

    why = parity_failure(parity, fv.tolerance) if parity else None
    afm_info = dict(
        source=os.path.basename(os.path.normpath(fv.input)),
        source_layout=report["layout"],
        adapted=report["adapted"],
        dropped=report["dropped"],
        warnings=report["warnings"],
        parity_max_abs_diff={k: (v if math.isfinite(v) else None) for k, v in parity.items()},
        parity_passed=None if not parity else why is None,
    )
    if os.path.isdir(fv.out):
        clear_failed_marks(fv.out)
    config_json = write_export(fv.out, encoder, afm_info=afm_info)
    overrides_cli = [
        f"--config.model.variant={variant}",
        f"--config.image_size={fv.image_size}",
        f"--config.model.in_chans={int(fv.in_chans)}",
        f"--config.model.class_token={arch['class_token']}",
        f"--config.model.num_reg_tokens={arch['reg_tokens']}",
        f"--config.model.no_embed_class={no_embed_class and not rope}",
    ]
    if rope:
        overrides_cli += [
            "--config.model.pos_embed=rope",
            f"--config.model.norm_eps={DINOV3_NORM_EPS}",
            f"--config.model.qkv_bias={arch['qkv_bias']}",
        ]
        if arch["layer_scale"]:
            overrides_cli.append("--config.model.layer_scale_init=1e-05")
    else:
        overrides_cli.append("--config.model.pos_embed=learned")
    overrides_cli += [f"--config.model.{k}={v}" for k, v in overrides.items()]
    overrides_cli.append(f"--config.init_from={os.path.abspath(fv.out)}")
    readme = "\n".join(
        [
            f"# ViT-{variant} imported from {afm_info['source']} ({report['layout']} layout)",
            "",
            f"- Adapted: {'; '.join(report['adapted']) or 'nothing'}.",
            f"- Dropped (not backbone): {', '.join(report['dropped']) or 'nothing'}.",
            f"- Warnings: {'; '.join(report['warnings']) or 'none'}.",
            f"- Parity against timm's own adaptation (forward_features, fp32, max abs diff): {json.dumps(parity)}.",
            "",
            "## Continue training from it",
            "",
            "```",
            "python -m afm_jax.main --config configs/X.py --workdir DIR \\",
            "  " + " \\\n  ".join(overrides_cli),
            "```",
            "",
            "## Load in PyTorch",
            "",
            "```python",
            usage_snippet("OUT_DIR", config_json),
            "```",
            "",
        ]
    )
    write_export(fv.out, encoder, afm_info=afm_info, readme=readme)
    worst = max(parity.values()) if parity else None
    worst = None if worst is None or not math.isfinite(worst) else worst
    for size, diff in parity.items():
        print(f"parity {size}: max |timm - afm_jax| = {diff:.3e}")
    for line in report["adapted"]:
        print(f"adapted: {line}")
    for line in report["warnings"]:
        print(f"warning: {line}")
    print("train from it with:\n  " + " ".join(overrides_cli))
    if fv.check and why is not None:
        mark_failed_export(fv.out, why)
        raise InteropError(
            f"Parity check failed: {why}. The output in {fv.out} is marked failed (weights "
            "moved to model.safetensors.FAILED_CHECK, see CHECK_FAILED.txt)."
        )
    if why is not None:
        print(f"warning: parity {why}", file=sys.stderr)
    summary = dict(
        tool="import_timm",
        out_dir=os.path.abspath(fv.out),
        layout=report["layout"],
        variant=variant,
        overrides=overrides,
        num_heads=heads,
        adapted=report["adapted"],
        max_abs_diff=worst,
        tolerance=fv.tolerance,
        config_overrides=overrides_cli,
    )
    print(f"wrote {summary['out_dir']}/model.safetensors, config.json, README.md")
    print(json.dumps(summary))
    return 0


def define_flags(fv: flags.FlagValues) -> None:
    d = dict(flag_values=fv)
    flags.DEFINE_string("input", None, "Weights file (.safetensors/.pth/.pt/.bin) or a folder with config.json.", **d)
    cli.define_output_flags(fv, "model.safetensors, config.json, README.md")
    flags.DEFINE_integer("image_size", 224, "Our training image size (the position-embedding grid).", **d)
    flags.DEFINE_enum("in_chans", "1", ["1", "3"], "Input channels: 1 = grey (RGB kernels summed), 3 = RGB.", **d)
    flags.DEFINE_integer("num_heads", None, "Attention heads (weights files do not store it).", **d)
    cli.define_parity_flags(fv, PARITY_TOLERANCE)


TOOL = cli.Tool(__doc__, define_flags, required=("input", "out"))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, import_weights, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, import_weights)
