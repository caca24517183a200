"""Export a run's ViT encoder as a timm model: model.safetensors + config.json + README.md.

Usage: python tools/export_timm.py --workdir RUN --out OUT_DIR [--step N] [--weights auto|teacher|student] [--check]
    [--overwrite]

Example:
    python tools/export_timm.py --workdir runs/mae_vitb16 --out exports/mae_vitb16 --check

--workdir is a run's folder (as given to afm_jax.main), its checkpoints/ folder or checkpoints/<step>.
OUT_DIR then loads in PyTorch with ``timm.create_model("local-dir:OUT_DIR", pretrained=True)`` or
``model.load_state_dict(safetensors.torch.load_file("OUT_DIR/model.safetensors"), strict=True)``
(docs/export.md). MAE/DINO heads are not exported; for DINO the teacher is exported by default.

After writing, the export is loaded into timm and one random batch runs through both frameworks at
the training resolution and at 1.5x it; the max abs difference of ``forward_features`` is printed
(and written to config.json). ``--check`` makes a difference above ``--tolerance`` (or a missing
torch/timm) fail the command. An existing export in OUT_DIR is replaced only with --overwrite.
The last line of output is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from safetensors.numpy import load_file

from afm_jax import cli
from afm_jax.data import records
from afm_jax.errors import InteropError
from afm_jax.train.checkpoint import read_encoder_checkpoint
from afm_jax.interop.timm_export import PARITY_TOLERANCE, create_timm_vit, forward_parity, timm_model_args, usage_snippet, write_export


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


def _model_card(ck: Any, config_json: dict, parity: dict, dataset: dict, run_config: dict) -> str:
    enc = ck.encoder
    method = str(ck.config.get("task", "unknown")).upper()
    lines = [
        f"# {method} ViT-{enc.variant} radiograph encoder (afm-jax)",
        "",
        f"- **Method**: {method} pretraining, {'teacher (EMA)' if ck.weights == 'teacher' else 'encoder'} "
        f"weights; heads not included.",
        f"- **Steps**: {ck.step} (batch size {ck.config.get('batch_size')}, image size {ck.config.image_size}).",
        f"- **Data**: grey-scale radiographs, {enc.in_chans} channel(s), "
        f"splits {dataset.get('splits', 'n/a')}, preprocessing {json.dumps(dataset.get('preprocessing', {}))}.",
        f"- **Input**: images in [0, 1] (bone bright), normalised with mean {list(enc.input_mean)} "
        f"std {list(enc.input_std)}; any size that is a multiple of {enc.patch_size} "
        "(position embeddings are resampled).",
        f"- **Code version**: {ck.code_version}.",
        f"- **Parity** (timm forward_features vs afm-jax, fp32, max abs diff): {json.dumps(parity)}.",
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


def parity_check(encoder: Any, out_dir: str) -> dict[str, float]:
    """Loads OUT_DIR/model.safetensors into a fresh timm ViT (strict) and compares outputs."""
    model = create_timm_vit(timm_model_args(encoder), load_file(os.path.join(out_dir, "model.safetensors")))
    h, w = encoder.img_size
    p = encoder.patch_size
    other = (max(p, (3 * h // 2) // p * p), max(p, (3 * w // 2) // p * p))
    return {f"{h}x{w}": forward_parity(encoder, model),
            f"{other[0]}x{other[1]}": forward_parity(encoder, model, size=other, seed=1)}


def export(fv: flags.FlagValues, args: list[str]) -> int:
    out_dir = fv.out
    cli.refuse_overwrite(out_dir, "model.safetensors", fv.overwrite)
    if os.path.isdir(out_dir) and os.path.isdir(fv.workdir) and os.path.samefile(out_dir, fv.workdir):
        raise InteropError(f"--out {out_dir} is the run folder itself: give a new folder for the export.")
    ck = read_encoder_checkpoint(fv.workdir, step=fv.step, weights=fv.weights)
    dataset = _dataset_summary(ck.config)
    run_config = _redacted_config(ck.config)
    afm_info = dict(method=ck.config.get("task"), step=ck.step, weights=ck.weights,
                    code_version=ck.code_version, image_size=ck.config.image_size,
                    preprocessing=dataset.get("preprocessing", {}),
                    augment=run_config.get("data", {}).get("augment", {}))
    config_json = write_export(out_dir, ck.encoder, afm_info=afm_info)
    parity: dict[str, Any] = {}
    if not fv.no_parity:
        try:
            parity = parity_check(ck.encoder, out_dir)
        except ImportError as e:
            if fv.check:
                raise InteropError(f"--check needs torch and timm ({e}); pip install -e '.[torch]'.") from e
            print(f"parity check skipped: {e}", file=sys.stderr)
    config_json["afm_jax"]["parity_max_abs_diff"] = parity
    write_export(out_dir, ck.encoder, afm_info=config_json["afm_jax"],
                 readme=_model_card(ck, config_json, parity, dataset, run_config))
    worst = max(parity.values()) if parity else None
    summary = dict(tool="export_timm", out_dir=os.path.abspath(out_dir), step=ck.step,
                   weights=ck.weights, architecture=config_json["architecture"],
                   max_abs_diff=worst, tolerance=fv.tolerance, parity=parity)
    for size, diff in parity.items():
        print(f"parity {size}: max |timm - afm_jax| = {diff:.3e}")
    if fv.check and (worst is None or worst > fv.tolerance):
        raise InteropError(f"Parity check failed: max abs difference {worst} > tolerance {fv.tolerance}.")
    print(f"wrote {summary['out_dir']}/model.safetensors, config.json, README.md")
    print(json.dumps(summary))
    return 0


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "A run's folder, its checkpoints/ folder or checkpoints/<step>.",
                        flag_values=fv)
    cli.define_output_flags(fv, "model.safetensors, config.json, README.md")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_enum("weights", "auto", ["auto", "teacher", "student"],
                      "DINO: teacher (the default via auto) or student; MAE: the encoder.", flag_values=fv)
    cli.define_parity_flags(fv, PARITY_TOLERANCE)


TOOL = cli.Tool(__doc__, define_flags, required=("workdir", "out"))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, export, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, export)
