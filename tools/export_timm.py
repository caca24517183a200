"""Export a run's ViT encoder as a timm model: model.safetensors + config.json + README.md.

Usage: python tools/export_timm.py --workdir RUN --out OUT_DIR [--step N] [--weights auto|teacher|student] [--check]
    [--overwrite]
       python tools/export_timm.py --verify OUT_DIR

Example:
    python tools/export_timm.py --workdir runs/mae_vitb16 --out exports/mae_vitb16 --check
    python tools/export_timm.py --verify exports/mae_vitb16

--workdir is a run's folder (as given to afm_jax.main), its checkpoints/ folder or checkpoints/<step>.
OUT_DIR then loads in PyTorch with ``timm.create_model("local-dir:OUT_DIR", pretrained=True)`` or
``model.load_state_dict(safetensors.torch.load_file("OUT_DIR/model.safetensors"), strict=True)``
(docs/export.md). MAE/DINO heads are not exported; for DINO the teacher is exported by default.

After writing, the file is read back, loaded strictly into timm, and one random batch runs through both
frameworks at the training resolution and at 1.5x it, our side in fp32 whatever the run's compute dtype
(a bf16 run's own difference is printed as information); the max abs difference of ``forward_features``
is printed (and written to config.json). ``--check`` makes a difference above ``--tolerance`` (a finite
number > 0), a NaN/Inf anywhere, or a missing torch/timm fail the command; a failed export is marked
(weights moved to model.safetensors.FAILED_CHECK, CHECK_FAILED.txt). Non-finite weights are never
exported. ``--verify OUT_DIR`` re-checks an existing export. An existing export in OUT_DIR is replaced
only with --overwrite.
The last line of output is one JSON object.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from afm_jax import cli
from afm_jax.data import records
from afm_jax.errors import InteropError
from afm_jax.interop.timm import load_timm_state_dict
from afm_jax.interop.timm_export import (
    PARITY_TOLERANCE,
    clear_failed_marks,
    encoder_from_export_config,
    export_parity,
    mark_failed_export,
    parity_failure,
    read_export_config,
    require_finite_state_dict,
    require_tolerance,
    usage_snippet,
    write_export,
)
from afm_jax.interop.weights_file import read_weights_file
from afm_jax.train.checkpoint import read_encoder_checkpoint


def _redacted_config(config: Any) -> dict:
    """The run config without data locations (paths may name sites; never exported)."""
    cfg = json.loads(config.to_json_best_effort())
    for key in ("path", "selection"):
        if key in cfg.get("data", {}):
            cfg["data"][key] = "<not exported>" if cfg["data"][key] else cfg["data"][key]
    return cfg


def _dataset_summary(config: Any) -> dict:
    """Preprocessing parameters and split sizes of the training data, when it is readable here."""
    try:
        info = records.read_info(config.data.path)
    except Exception:  # the data need not be on the exporting machine
        return {}
    return {k: info[k] for k in ("preprocessing", "splits", "content_fingerprint", "version") if k in info}


def _json_safe(value: Any) -> Any:
    """NaN/Inf -> None, so config.json and the summary line stay valid JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _eval_pool(config: Any) -> str:
    """The pooling the run's own evaluations use: "avg" (mean of the normed patch tokens) or "cls"."""
    task = str(config.get("task", ""))
    for section in ((task, "pool"), (task, "knn", "pool"), ("probe", "pool")):
        node = config
        for key in section:
            node = node.get(key) if hasattr(node, "get") else None
            if node is None:
                break
        if isinstance(node, str):
            return node
    return "avg"


def _preprocessing_lines(enc: Any, pool: str, size: int) -> list[str]:
    pooled = (
        'the class token after the final norm (`pool="cls"`; timm `global_pool="token"`)'
        if pool == "cls"
        else 'the mean of the final-normed patch tokens, prefix tokens excluded (`pool="avg"`; timm '
        '`global_pool="avg"`, `fc_norm=False`)'
    )
    return [
        f"- **Resize**: the whole image squashed to {size} x {size} (no crop, aspect ratio not kept), bilinear "
        'with antialiasing when shrinking — our evaluation transform; in timm `crop_mode="squash"`, '
        '`crop_pct=1.0`, `interpolation="bilinear"` (in config.json, so `timm.data.resolve_data_config` + '
        "`create_transform` reproduce it).",
        f"- **Normalisation**: grey-scale pixels scaled to [0, 1] (8-bit / 255, 16-bit / 65535; bone bright), "
        f"then (x - {list(enc.input_mean)}) / {list(enc.input_std)}, {enc.in_chans} channel(s).",
        f"- **Pooling** used for our reported results (kNN / linear probes): {pooled}; "
        "`model.forward_head(model.forward_features(x), pre_logits=True)` gives it.",
    ]


def _model_card(ck: Any, config_json: dict, parity: dict, dataset: dict, run_config: dict, pool: str) -> str:
    enc = ck.encoder
    method = str(ck.config.get("task", "unknown")).upper()
    lines = [
        f"# {method} ViT-{enc.variant} radiograph encoder (afm-jax)",
        "",
        f"- **Method**: {method} pretraining, {'teacher (EMA)' if ck.weights == 'teacher' else 'encoder'} "
        f"weights; heads not included.",
        f"- **Architecture**: width {enc.embed_dim}, depth {len(enc.blocks)}, {enc.num_heads} heads, patch "
        f"{enc.patch_size}, {enc.num_reg_tokens} register tokens; timm `{config_json['architecture']}` with "
        f"explicit model_args ({config_json['architecture_note']}).",
        f"- **Steps**: {ck.step} (batch size {ck.config.get('batch_size')}, image size {ck.config.image_size}).",
        f"- **Data**: grey-scale radiographs, {enc.in_chans} channel(s), "
        f"splits {dataset.get('splits', 'n/a')}, preprocessing {json.dumps(dataset.get('preprocessing', {}))}.",
        *_preprocessing_lines(enc, pool, int(ck.config.image_size)),
        f"- **Input sizes**: any multiple of {enc.patch_size} (position embeddings are resampled).",
        f"- **Code version**: {ck.code_version}.",
        f"- **Parity** (timm forward_features vs afm-jax, max abs diff; checked in fp32, the run's "
        f"compute dtype for information): {json.dumps(parity)}.",
        "",
        "## Load in PyTorch",
        "",
        "```python",
        _usage(config_json),
        "```",
        "",
        "## Training config",
        "",
        "```json",
        json.dumps(run_config, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _usage(config_json: dict) -> str:
    return usage_snippet("OUT_DIR", config_json)


def _measure(encoder: Any, out_dir: str, model_args: dict, check: bool, architecture: str) -> dict[str, Any]:
    """Parity of the written file (read back from disk), or {} when torch/timm are missing and not --check."""
    sd = read_weights_file(os.path.join(out_dir, "model.safetensors"))
    require_finite_state_dict(sd, f"{out_dir}/model.safetensors")
    try:
        return _json_safe(export_parity(encoder, sd, model_args, architecture))
    except ImportError as e:
        if check:
            raise InteropError(f"--check needs torch and timm ({e}); pip install -e '.[torch]'.") from e
        print(f"parity check skipped: {e}", file=sys.stderr)
        return {}


def _failure(parity: dict, tolerance: float) -> str | None:
    fp32 = {k: (float("nan") if v is None else v) for k, v in parity.get("fp32", {}).items()}
    return parity_failure(fp32, tolerance)


def verify(fv: flags.FlagValues) -> int:
    """--verify OUT: loads an existing export in both frameworks and re-runs the parity check."""
    out_dir = fv.verify
    cfg = read_export_config(out_dir)
    sd = read_weights_file(os.path.join(out_dir, "model.safetensors"))
    require_finite_state_dict(sd, f"{out_dir}/model.safetensors")
    encoder = encoder_from_export_config(cfg)
    a = cfg["model_args"]
    load_timm_state_dict(
        encoder,
        sd,
        source_grid=encoder.grid_size,
        source_no_embed_class=encoder.no_embed_class,
        source_num_heads=int(a["num_heads"]),
    )
    parity = _measure(encoder, out_dir, a, check=True, architecture=cfg.get("architecture"))
    worst = max((v for v in parity["fp32"].values() if v is not None), default=None)
    summary = dict(
        tool="export_timm",
        verify=os.path.abspath(out_dir),
        architecture=cfg.get("architecture"),
        parity=parity,
        max_abs_diff=worst,
        tolerance=fv.tolerance,
        recorded=cfg.get("afm_jax", {}).get("parity_max_abs_diff"),
    )
    for size, diff in parity["fp32"].items():
        print(f"parity {size} (fp32): max |timm - afm_jax| = {diff}")
    if (why := _failure(parity, fv.tolerance)) is not None:
        raise InteropError(f"Verification of {out_dir} failed: {why}. Export it again from the run.")
    print(f"verified {summary['verify']}")
    print(json.dumps(summary))
    return 0


def export(fv: flags.FlagValues, args: list[str]) -> int:
    require_tolerance(fv.tolerance)
    if fv.verify:
        if fv.workdir or fv.out:
            raise InteropError("--verify OUT re-checks an existing export; give it without --workdir/--out.")
        return verify(fv)
    if not fv.workdir or not fv.out:
        raise InteropError("Give --workdir RUN and --out OUT_DIR (or --verify OUT_DIR); see --help.")
    out_dir = fv.out
    cli.refuse_overwrite(out_dir, "model.safetensors", fv.overwrite)
    if os.path.isdir(out_dir) and os.path.isdir(fv.workdir) and os.path.samefile(out_dir, fv.workdir):
        raise InteropError(f"--out {out_dir} is the run folder itself: give a new folder for the export.")
    ck = read_encoder_checkpoint(fv.workdir, step=fv.step, weights=fv.weights)
    dataset = _dataset_summary(ck.config)
    run_config = _redacted_config(ck.config)
    pool = _eval_pool(ck.config)
    if pool == "cls" and not ck.encoder.has_class_token:
        pool = "avg"
    afm_info = dict(
        method=ck.config.get("task"),
        step=ck.step,
        weights=ck.weights,
        code_version=ck.code_version,
        image_size=ck.config.image_size,
        eval_pool=pool,
        compute_dtype=str(ck.config.model.dtype),
        preprocessing=dataset.get("preprocessing", {}),
        augment=run_config.get("data", {}).get("augment", {}),
    )
    global_pool = "token" if pool == "cls" else "avg"
    if os.path.isdir(out_dir):
        clear_failed_marks(out_dir)
    config_json = write_export(out_dir, ck.encoder, afm_info=afm_info, global_pool=global_pool)
    parity = (
        {}
        if fv.no_parity
        else _measure(ck.encoder, out_dir, config_json["model_args"], fv.check, config_json["architecture"])
    )
    why = _failure(parity, fv.tolerance) if parity else None
    config_json["afm_jax"]["parity_max_abs_diff"] = parity
    config_json["afm_jax"]["parity_passed"] = None if not parity else why is None
    write_export(
        out_dir,
        ck.encoder,
        afm_info=config_json["afm_jax"],
        global_pool=global_pool,
        readme=_model_card(ck, config_json, parity, dataset, run_config, pool),
    )
    worst = max((v for v in parity.get("fp32", {}).values() if v is not None), default=None)
    summary = dict(
        tool="export_timm",
        out_dir=os.path.abspath(out_dir),
        step=ck.step,
        weights=ck.weights,
        architecture=config_json["architecture"],
        max_abs_diff=worst,
        tolerance=fv.tolerance,
        parity=parity.get("fp32", {}),
        compute_dtype=parity.get("compute_dtype"),
        compute_parity=parity.get("compute"),
    )
    for size, diff in parity.get("fp32", {}).items():
        print(f"parity {size} (fp32): max |timm - afm_jax| = {diff}")
    for size, diff in (parity.get("compute") or {}).items():
        print(f"information {size} ({parity['compute_dtype']} compute vs fp32 timm): max abs diff = {diff}")
    if why is not None:
        if fv.check:
            mark_failed_export(out_dir, why)
            raise InteropError(
                f"Parity check failed: {why}. The export in {out_dir} is marked failed "
                "(weights moved to model.safetensors.FAILED_CHECK, see CHECK_FAILED.txt)."
            )
        print(f"warning: parity {why}; config.json says parity_passed=false", file=sys.stderr)
    print(f"wrote {summary['out_dir']}/model.safetensors, config.json, README.md")
    print(json.dumps(summary))
    return 0


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir", None, "A run's folder, its checkpoints/ folder or checkpoints/<step>.", flag_values=fv
    )
    flags.DEFINE_string(
        "verify",
        None,
        "Re-check an existing export folder (instead of --workdir/--out): "
        "strict timm load, finite weights, fp32 parity.",
        flag_values=fv,
    )
    cli.define_output_flags(fv, "model.safetensors, config.json, README.md")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_enum(
        "weights",
        "auto",
        ["auto", "teacher", "student"],
        "DINO: teacher (the default via auto) or student; MAE: the encoder.",
        flag_values=fv,
    )
    cli.define_parity_flags(fv, PARITY_TOLERANCE)


TOOL = cli.Tool(__doc__, define_flags)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, export, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, export)
