"""Evaluate one backbone on one dataset with one protocol; metrics with 95% CIs over patients.

    python tools/evaluate.py --backbone checkpoint:runs/mae_vitb,image_size=224 \
        --data DATA/femur/1.0.0 --positive 2 --negative 1 --protocol linear [--unit patient]
    python tools/evaluate.py --backbone torch_timm:radimagenet_resnet50.pth,arch=resnet50 --data DATA/mura/1.0.0 \
        --positive 1 --negative 0 --unit study --protocol knn
    python tools/evaluate.py --backbone random_init:,variant=S/16 --synthetic 300 --protocol knn

--backbone is `kind:path[,key=value...]` with kind checkpoint | timm_vit | resnet50 | torch_timm |
random_init (afm_jax/evaluation/backbones.py; keys image_size, pool, variant, arch, seed, in_chans,
depth, width, num_heads, mlp_dim). Features are cached in --out/features (reused by reruns),
predictions written to --out/predictions_{validation,test}.npz, metrics to --out/result.json.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a fresh clone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="kind:path[,key=value...], see above")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="dataset path (tools/preprocess.py output, MURA or folder dataset)")
    data.add_argument("--synthetic", type=int, metavar="PATIENTS", help="use the embedded synthetic femurs")
    parser.add_argument("--positive", type=int, nargs="+", default=[2], help="label ints of the positive class")
    parser.add_argument("--negative", type=int, nargs="+", default=[1], help="label ints of the negative class")
    parser.add_argument("--protocol", choices=("knn", "linear", "finetune"), default="linear")
    parser.add_argument("--unit", choices=("image", "patient", "study"), default="patient")
    parser.add_argument("--aggregate", choices=("mean", "max"), default="mean")
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction of training patients (low-shot)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="protocol option: knn k=20 / temperature=0.07; finetune config keys (total_steps=300)")
    parser.add_argument("--out", default="eval_out", help="folder for cached features, predictions, result.json")
    args = parser.parse_args(argv)

    from afm_jax.evaluation import backbones, protocols
    from afm_jax.errors import UserError

    try:
        spec = backbones.parse_backbone_arg(args.backbone)
        synthetic = dict(num_patients=args.synthetic, image_size=256, seed=0) if args.synthetic else None
        task = protocols.TaskSpec("task", data=args.data or "", synthetic=synthetic, unit=args.unit,
                                  aggregate=args.aggregate, positive_labels=tuple(args.positive),
                                  negative_labels=tuple(args.negative))
        out = pathlib.Path(args.out)
        data_path = task.data_path(out)
        options = {}
        for item in args.option:
            key, eq, value = item.partition("=")
            if not eq:
                raise protocols.ConfigError(f"--option {item!r} is not KEY=VALUE.")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
        val, test, info = protocols.run_protocol(
            spec, task, args.protocol, seed=args.seed, fraction=args.fraction, data_path=data_path,
            cache=protocols.FeatureCache(out / "features"), workdir=os.fspath(out / "finetune"),
            name=spec.kind, options=options)
        scored = protocols.score_predictions(val, test, task, n_boot=args.n_boot, seed=args.seed)
    except (UserError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    val.save(out / "predictions_validation.npz")
    test.save(out / "predictions_test.npz")
    result = {"backbone": spec.to_json(), "protocol": args.protocol, "fraction": args.fraction, "seed": args.seed,
              **scored, "info": info}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=float))
    for name in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "mcc", "kappa"):
        m = scored["metrics"][name]
        print(f"{name:>12}: {m['point']:.4f}  [{m['low']:.4f}, {m['high']:.4f}]")
    print(json.dumps({"protocol": args.protocol, "unit": args.unit, "num_units": scored["num_units"],
                      **{k: round(scored["metrics"][k]["point"], 4) for k in ("auroc", "auprc", "kappa")},
                      "auroc_ci": [round(scored["metrics"]["auroc"]["low"], 4), round(scored["metrics"]["auroc"]["high"], 4)],
                      "result": str(out / "result.json")}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
