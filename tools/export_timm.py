"""Export a run's ViT encoder as a timm model: model.safetensors + config.json + README.md.

    python tools/export_timm.py WORKDIR_OR_CHECKPOINT_DIR OUT_DIR [--step N] [--weights auto|teacher|student] [--check]

OUT_DIR then loads in PyTorch with ``timm.create_model("local-dir:OUT_DIR", pretrained=True)`` or
``model.load_state_dict(safetensors.torch.load_file("OUT_DIR/model.safetensors"), strict=True)``
(docs/export.md). MAE/DINO heads are not exported; for DINO the teacher is exported by default.

After writing, the export is loaded into timm and one random batch runs through both frameworks at
the training resolution and at 1.5x it; the max abs difference of ``forward_features`` is printed
(and written to config.json). ``--check`` makes a difference above ``--tolerance`` (or a missing
torch/timm) fail the command. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _redacted_config(config: Any) -> dict:
    """The run config without data locations (paths may name sites; never exported)."""
    cfg = json.loads(config.to_json_best_effort())
    for key in ("path", "selection"):
        if key in cfg.get("data", {}):
            cfg["data"][key] = "<not exported>" if cfg["data"][key] else cfg["data"][key]
    return cfg


def _dataset_summary(config: Any) -> dict:
    """Preprocessing parameters and split sizes of the training data, when it is readable here."""
    from afm_jax.data import records

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
    from afm_jax.interop.timm_export import usage_snippet

    return usage_snippet("OUT_DIR", config_json)


def parity_check(encoder: Any, out_dir: str) -> dict[str, float]:
    """Loads OUT_DIR/model.safetensors into a fresh timm ViT (strict) and compares outputs."""
    from safetensors.numpy import load_file

    from afm_jax.interop.timm_export import create_timm_vit, forward_parity, timm_model_args

    model = create_timm_vit(timm_model_args(encoder), load_file(os.path.join(out_dir, "model.safetensors")))
    h, w = encoder.img_size
    p = encoder.patch_size
    other = (max(p, (3 * h // 2) // p * p), max(p, (3 * w // 2) // p * p))
    return {f"{h}x{w}": forward_parity(encoder, model),
            f"{other[0]}x{other[1]}": forward_parity(encoder, model, size=other, seed=1)}


def export(args: argparse.Namespace) -> dict:
    from afm_jax.train.checkpoint import read_encoder_checkpoint
    from afm_jax.errors import InteropError
    from afm_jax.interop.timm_export import write_export

    ck = read_encoder_checkpoint(args.checkpoint, step=args.step, weights=args.weights)
    dataset = _dataset_summary(ck.config)
    run_config = _redacted_config(ck.config)
    afm_info = dict(method=ck.config.get("task"), step=ck.step, weights=ck.weights,
                    code_version=ck.code_version, image_size=ck.config.image_size,
                    preprocessing=dataset.get("preprocessing", {}),
                    augment=run_config.get("data", {}).get("augment", {}))
    config_json = write_export(args.out_dir, ck.encoder, afm_info=afm_info)
    parity: dict[str, Any] = {}
    if not args.no_parity:
        try:
            parity = parity_check(ck.encoder, args.out_dir)
        except ImportError as e:
            if args.check:
                raise InteropError(f"--check needs torch and timm ({e}); pip install -e '.[torch]'.") from e
            print(f"parity check skipped: {e}", file=sys.stderr)
    config_json["afm_jax"]["parity_max_abs_diff"] = parity
    write_export(args.out_dir, ck.encoder, afm_info=config_json["afm_jax"],
                 readme=_model_card(ck, config_json, parity, dataset, run_config))
    worst = max(parity.values()) if parity else None
    summary = dict(tool="export_timm", out_dir=os.path.abspath(args.out_dir), step=ck.step,
                   weights=ck.weights, architecture=config_json["architecture"],
                   max_abs_diff=worst, tolerance=args.tolerance, parity=parity)
    for size, diff in parity.items():
        print(f"parity {size}: max |timm - afm_jax| = {diff:.3e}")
    if args.check and (worst is None or worst > args.tolerance):
        raise InteropError(f"Parity check failed: max abs difference {worst} > tolerance {args.tolerance}.")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run's --workdir, its checkpoints/ folder or checkpoints/<step>")
    parser.add_argument("out_dir", help="folder to write model.safetensors, config.json, README.md into")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--weights", choices=("auto", "teacher", "student"), default="auto",
                        help="DINO: teacher (default via auto) or student; MAE: the encoder")
    from afm_jax.interop.timm_export import add_parity_arguments
    add_parity_arguments(parser)
    args = parser.parse_args(argv)
    from afm_jax.errors import exit_on_user_error

    summary = exit_on_user_error(export, args)
    print(f"wrote {summary['out_dir']}/model.safetensors, config.json, README.md")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # export is host work; no accelerator needed
    sys.exit(main())
