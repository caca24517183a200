"""Evaluate one backbone on one dataset with one protocol; metrics with 95% CIs over patients.

Usage: python tools/evaluate.py --backbone KIND:PATH[,KEY=VALUE...] (--data DATASET | --synthetic PATIENTS)
    [--protocol knn|linear|finetune] [--positive 2 --negative 1] [--out FOLDER] [--config.KEY=VALUE ...]

Example:
    python tools/evaluate.py --backbone checkpoint:runs/mae_vitb,image_size=224 \\
        --data DATA/femur/1.0.0 --positive 2 --negative 1 --protocol linear --unit patient
    python tools/evaluate.py --backbone torch_timm:radimagenet_resnet50.pth,arch=resnet50 --data DATA/mura/1.0.0 \\
        --positive 1 --negative 0 --unit study --protocol knn --config.knn.k=10
    python tools/evaluate.py --backbone random_init:,variant=S/16 --synthetic 300 --protocol finetune \\
        --config.finetune.total_steps=300

--backbone names the backbone as `kind:path[,key=value...]`: kind is checkpoint (one of our run
folders) | timm_vit (a timm / DINO / DINOv2 weights file or export folder) | resnet50 (a
torchvision-layout state dict, e.g. RadImageNet) | torch_timm (any timm model in PyTorch; arch=NAME)
| random_init (our ViT at initialisation; path optional); keys image_size, pool, variant, arch,
seed, in_chans, depth, width, num_heads, mlp_dim (afm_jax/evaluation/backbones.py).

Settings: --config.knn.k and --config.knn.temperature (the kNN protocol); --config.finetune.<key> is
any key of the fine-tuning trainer config (afm_jax/train/defaults.py, e.g. total_steps, optim.base_lr),
applied over what the backbone and task set. Features are cached in --out/features (reused by
reruns), predictions written to --out/predictions_{validation,test}.npz, metrics to --out/result.json.
The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import ml_collections
from absl import flags

from afm_jax import cli
from afm_jax.errors import ConfigError
from afm_jax.evaluation import backbones, protocols
from afm_jax.train import defaults as train_defaults


def define_flags(fv: flags.FlagValues) -> None:
    d = dict(flag_values=fv)
    flags.DEFINE_string("backbone", None, "The backbone, kind:path[,key=value...] (see above).", **d)
    flags.DEFINE_string("data", None, "Dataset path (tools/preprocess.py output, MURA or folder dataset).", **d)
    flags.DEFINE_integer(
        "synthetic", None, "Use the embedded synthetic femurs with this many patients (instead of --data).", **d
    )
    flags.DEFINE_list("positive", ["2"], "Comma-separated label ints of the positive class.", **d)
    flags.DEFINE_list("negative", ["1"], "Comma-separated label ints of the negative class.", **d)
    flags.DEFINE_enum("protocol", "linear", ["knn", "linear", "finetune"], "Evaluation protocol.", **d)
    flags.DEFINE_enum("unit", "patient", ["image", "patient", "study"], "Unit the metrics are computed over.", **d)
    flags.DEFINE_enum("aggregate", "mean", ["mean", "max"], "How image scores combine into a unit's score.", **d)
    flags.DEFINE_float("fraction", 1.0, "Fraction of training patients (low-shot).", **d)
    flags.DEFINE_integer("seed", 0, "Seed of the protocol and the bootstrap.", **d)
    flags.DEFINE_integer("n_boot", 1000, "Bootstrap resamples of the confidence intervals.", **d)
    flags.DEFINE_string("out", "eval_out", "Folder for cached features, predictions, result.json.", **d)


def default_config(argv: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Protocol settings: the kNN classifier's, and the fine-tuning trainer config (its keys, for overrides)."""
    return ml_collections.ConfigDict(
        dict(knn=dict(k=20, temperature=0.07), finetune=train_defaults.default_config("finetune"))
    )


TOOL = cli.Tool(
    __doc__,
    define_flags,
    default_config=default_config,
    config_keys_in="tools/evaluate.py (knn) and afm_jax/train/defaults.py (finetune)",
    required=("backbone",),
)


def _labels(values: list[str], flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(
            f"--{flag} {','.join(values)} must be comma-separated label ints, e.g. --{flag} 1,2."
        ) from None


def _finetune_options(config: ml_collections.ConfigDict) -> dict:
    """The fine-tuning keys the command line changed (dotted), applied over what backbone and task set."""
    given = cli.flatten(config)
    default = cli.flatten(default_config("finetune"))
    return {k: v for k, v in given.items() if v != default.get(k)}


def work(fv: flags.FlagValues, args: list[str]) -> int:
    if (fv.data is None) == (fv.synthetic is None):
        raise ConfigError("Give one of --data (a dataset folder) or --synthetic PATIENTS.")
    cli.require_positive(fv.n_boot, "n_boot", allow_zero=False)
    cli.check_output_dir(fv.out)
    spec = backbones.parse_backbone_arg(fv.backbone)
    synthetic = dict(num_patients=fv.synthetic, image_size=256, seed=0) if fv.synthetic else None
    task = protocols.TaskSpec(
        "task",
        data=fv.data or "",
        synthetic=synthetic,
        unit=fv.unit,
        aggregate=fv.aggregate,
        positive_labels=_labels(fv.positive, "positive"),
        negative_labels=_labels(fv.negative, "negative"),
    )
    out = pathlib.Path(fv.out)
    data_path = task.data_path(out)
    if fv.protocol == "finetune":
        options = _finetune_options(fv.config.finetune)
    else:
        options = dict(k=fv.config.knn.k, temperature=fv.config.knn.temperature)
    val, test, info = protocols.run_protocol(
        spec,
        task,
        fv.protocol,
        seed=fv.seed,
        fraction=fv.fraction,
        data_path=data_path,
        cache=protocols.FeatureCache(out / "features"),
        workdir=os.fspath(out / "finetune"),
        name=spec.kind,
        options=options,
    )
    scored = protocols.score_predictions(val, test, task, n_boot=fv.n_boot, seed=fv.seed)
    out.mkdir(parents=True, exist_ok=True)
    val.save(out / "predictions_validation.npz")
    test.save(out / "predictions_test.npz")
    result = {
        "backbone": spec.to_json(),
        "protocol": fv.protocol,
        "fraction": fv.fraction,
        "seed": fv.seed,
        **scored,
        "info": info,
        "provenance": protocols.provenance(
            spec, data_path, protocol=fv.protocol, params=protocols.protocol_params(fv.protocol, options, info)
        ),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=float))
    for name in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "mcc", "kappa"):
        m = scored["metrics"][name]
        print(f"{name:>12}: {m['point']:.4f}  [{m['low']:.4f}, {m['high']:.4f}]")
    print(
        json.dumps(
            {
                "protocol": fv.protocol,
                "unit": fv.unit,
                "num_units": scored["num_units"],
                **{k: round(scored["metrics"][k]["point"], 4) for k in ("auroc", "auprc", "kappa")},
                "auroc_ci": [round(scored["metrics"]["auroc"]["low"], 4), round(scored["metrics"]["auroc"]["high"], 4)],
                "result": str(out / "result.json"),
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, work, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, work)
