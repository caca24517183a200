"""Run a study: every missing backbone × task × protocol × fraction × seed, then its report.

    python tools/study.py configs/studies/demo.py [--out study_out/demo]
    python tools/study.py STUDY.py --slurm [--partition P --account A --gpus 1 --time 04:00:00]
    python tools/study.py STUDY.py --report-only          # rebuild report/ from the results there

Results, cached features, fine-tuning runs and pretraining variants live in --out (default
`study_out/<study name>`); rerunning computes only what is missing. `--slurm` writes array-job
scripts into <out>/launch/ (pretraining, runs, report, and submit.sh chaining them) and submits
nothing. The report is <out>/report/index.html (and index.md). The last line printed is one JSON object.
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
    parser.add_argument("study", help="study file with get_study(), e.g. configs/studies/demo.py")
    parser.add_argument("--out", default=None, help="output folder (default: study_out/<study name>)")
    parser.add_argument("--slurm", action="store_true", help="write SLURM array scripts into <out>/launch/, run nothing")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--time", default="04:00:00", help="SLURM time limit per array task")
    parser.add_argument("--run-index", type=int, default=None, help="run only this run (SLURM array task id)")
    parser.add_argument("--pretrain-index", type=int, default=None, help="train only this pretraining variant")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from existing results")
    parser.add_argument("--no-report", action="store_true", help="do not write the report")
    args = parser.parse_args(argv)

    from afm_jax.evaluation import study as study_lib
    from afm_jax.errors import UserError

    try:
        study = study_lib.load_study(args.study)
        out = args.out or os.path.join("study_out", study.name)
        layout = study_lib.Layout(out)
        summary: dict = {"study": study.name, "out": str(layout.root)}
        if args.slurm:
            submit = study_lib.write_slurm(study, out, args.study, partition=args.partition, account=args.account,
                                           gpus=args.gpus, time_limit=args.time)
            print(f"wrote {submit.parent}/*.sbatch; review, then: bash {submit}")
            summary["submit"] = str(submit)
        elif args.pretrain_index is not None:
            name = list(study.pretrain)[args.pretrain_index]
            summary["pretrained"] = str(study_lib.run_pretraining(study, name, layout))
        elif args.run_index is not None:
            run = study.all_runs()[args.run_index]
            record = study_lib.execute_run(study, run, layout)
            summary.update(run=run.run_id, auroc=record["metrics"]["auroc"]["point"])
        elif args.report_only:
            summary["report"] = str(study_lib.write_study_report(study, layout))
        else:
            index = study_lib.run_study(study, out, report=not args.no_report)
            summary["report"] = str(index) if index else None
            results = [json.loads(p.read_text()) for p in sorted(layout.results.glob("*.json"))]
            summary["auroc"] = {r["run_id"]: round(r["metrics"]["auroc"]["point"], 4) for r in results}
    except (UserError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("report"):
        print(f"report: {summary['report']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
