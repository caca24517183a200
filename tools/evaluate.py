"""Evaluate one backbone on one dataset with one protocol; metrics with 95% CIs over patients.

Usage: python tools/evaluate.py --backbone KIND:PATH[,KEY=VALUE...] (--data DATASET | --synthetic PATIENTS)
    [--protocol knn|linear|finetune] [--kind binary|multiclass|ordinal|regression]
    [--positive 2 --negative 1 | --classes 0,1,2 [--class_names A,B,C] | --target target [--target_unit U]]
    [--out FOLDER] [--config.KEY=VALUE ...]

Example:
    python tools/evaluate.py --backbone checkpoint:runs/mae_vitb,image_size=224 \\
        --data DATA/femur/1.0.0 --positive 2 --negative 1 --protocol linear --unit patient
    python tools/evaluate.py --backbone torch_timm:radimagenet_resnet50.pth,arch=resnet50 --data DATA/mura/1.0.0 \\
        --positive 1 --negative 0 --unit study --protocol knn --config.knn.k=10
    python tools/evaluate.py --backbone random_init:,variant=S/16 --synthetic 300 --protocol finetune \\
        --config.finetune.total_steps=300
    python tools/evaluate.py --backbone checkpoint:runs/mae_vitb --data DATA/femur/1.0.0 \\
        --kind multiclass --classes 0,1,2 --class_names normal,NFF,AFF --protocol linear
    python tools/evaluate.py --backbone checkpoint:runs/mae_vitb --data DATA/knees/1.0.0 \\
        --kind ordinal --classes 0,1,2,3,4 --class_names KL0,KL1,KL2,KL3,KL4 --unit side --protocol knn
    python tools/evaluate.py --backbone checkpoint:runs/mae_vitb --data DATA/hands/1.0.0 \\
        --kind regression --target target --target_unit months --protocol linear

--kind is the task: binary (--positive vs --negative label ints; AUROC, sensitivity, ...), multiclass
or ordinal (--classes: the label ints of each class in class order, `+` joining labels of one class,
e.g. 0,1+2,3; ordinal adds quadratic-weighted kappa, MAE in grades, accuracy within ±1 grade) or
regression (--target: the records' float `target` field, e.g. a CSV's bone-age column given to
tools/make_eval_dataset.py --target_column, or a derived target such as field_of_view_mm; MAE, RMSE,
R², Pearson r). The printed block is the kind's headline metrics with 95% CIs.

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
    flags.DEFINE_enum(
        "kind", "binary", list(protocols.KINDS), "Task kind: binary, multiclass, ordinal or regression.", **d
    )
    flags.DEFINE_list(
        "classes", [], "multiclass/ordinal: label ints of each class in order, `+` joins labels (0,1+2,3).", **d
    )
    flags.DEFINE_list("class_names", [], "Names of the classes (reports), e.g. normal,NFF,AFF.", **d)
    flags.DEFINE_string("target", "target", "regression: the record field `target` or a derived target name.", **d)
    flags.DEFINE_string("target_unit", "", "regression: the target's unit in the output, e.g. months.", **d)
    flags.DEFINE_enum(
        "unit", "patient", ["image", "patient", "study", "side"], "Unit the metrics are computed over.", **d
    )
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


def _classes(values: list[str]) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(x) for x in v.split("+")) for v in values)
    except ValueError:
        raise ConfigError(
            f"--classes {','.join(values)} must be comma-separated label ints, `+` joining the labels of one "
            "class, e.g. --classes 0,1,2,3,4 or --classes 0,1+2,3."
        ) from None


def _check_kind_flags(fv: flags.FlagValues) -> None:
    """One message for flags that do not belong to the chosen --kind."""
    given = [name for name in ("positive", "negative", "classes", "target") if fv[name].present]
    wrong = {
        "binary": [n for n in given if n in ("classes", "target")],
        "multiclass": [n for n in given if n in ("positive", "negative", "target")],
        "ordinal": [n for n in given if n in ("positive", "negative", "target")],
        "regression": [n for n in given if n in ("positive", "negative", "classes")],
    }[fv.kind]
    if fv.kind != "regression" and fv["target_unit"].present:
        wrong.append("target_unit")
    if fv.kind == "regression" and fv["class_names"].present:
        wrong.append("class_names")
    uses = {
        "binary": "--positive and --negative",
        "multiclass": "--classes (and --class_names)",
        "ordinal": "--classes (and --class_names)",
        "regression": "--target (and --target_unit)",
    }[fv.kind]
    if wrong:
        raise ConfigError(
            f"{', '.join('--' + n for n in wrong)} do{'es' if len(wrong) == 1 else ''} not apply to --kind "
            f"{fv.kind}, which uses {uses}; drop {'it' if len(wrong) == 1 else 'them'} or change --kind."
        )
    if fv.kind in ("multiclass", "ordinal") and len(fv.classes) < 2:
        raise ConfigError(
            f"--kind {fv.kind} needs --classes: the label ints of each class in class order (at least 2), "
            "e.g. --classes 0,1,2,3,4 for Kellgren-Lawrence grades 0-4."
        )


# The printed headline block of each kind (metric keys of protocols.score_predictions).
HEADLINE = {
    "binary": ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "mcc", "kappa"),
    "multiclass": ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "kappa"),
    "ordinal": ("qwk", "mae_grades", "within_1", "accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"),
    "regression": ("mae", "rmse", "r2", "pearson", "bias"),
}


def _finetune_options(config: ml_collections.ConfigDict) -> dict:
    """The fine-tuning keys the command line changed (dotted), applied over what backbone and task set."""
    given = cli.flatten(config)
    default = cli.flatten(default_config("finetune"))
    return {k: v for k, v in given.items() if v != default.get(k)}


def work(fv: flags.FlagValues, args: list[str]) -> int:
    if (fv.data is None) == (fv.synthetic is None):
        raise ConfigError("Give one of --data (a dataset folder) or --synthetic PATIENTS.")
    _check_kind_flags(fv)
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
        kind=fv.kind,
        classes=_classes(fv.classes),
        class_names=tuple(fv.class_names),
        target=fv.target,
        target_unit=fv.target_unit,
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
    unit = f" {fv.target_unit}" if fv.kind == "regression" and fv.target_unit else ""
    print(f"{fv.kind} task, {scored['num_units']} test {fv.unit} unit(s), 95% CIs over {task.cluster}s:")
    for name in HEADLINE[fv.kind]:
        m = scored["metrics"][name]
        suffix = unit if name in ("mae", "rmse", "bias") else ""
        print(f"{name:>17}: {m['point']:.4f}  [{m['low']:.4f}, {m['high']:.4f}]{suffix}")
    primary = protocols.PRIMARY_METRIC[fv.kind]
    shown = ("auroc", "auprc", "kappa") if fv.kind == "binary" else HEADLINE[fv.kind][:3]
    m = scored["metrics"][primary]
    print(
        json.dumps(
            {
                "protocol": fv.protocol,
                "kind": fv.kind,
                "unit": fv.unit,
                "num_units": scored["num_units"],
                **{k: round(scored["metrics"][k]["point"], 4) for k in shown},
                f"{primary}_ci": [round(m["low"], 4), round(m["high"], 4)],
                "result": str(out / "result.json"),
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, work, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, work)
