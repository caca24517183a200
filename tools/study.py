"""Run a study: every missing backbone × task × protocol × fraction × seed, then its report.

Usage: python tools/study.py STUDY_FILE [--out FOLDER] [--slurm [--config.slurm.KEY=VALUE ...]]
    [--run_index I | --pretrain_index I | --report_only] [--no_report]

Example:
    python tools/study.py configs/studies/demo.py --out study_out/demo
    python tools/study.py configs/studies/demo.py --slurm --config.slurm.partition=gpu --config.slurm.gpus=1
    python tools/study.py configs/studies/demo.py --report_only     # rebuild report/ from the results there

STUDY_FILE is a Python file with get_study() (configs/studies/*.py). Results, cached features,
fine-tuning runs and pretraining variants live in --out (default `study_out/<study name>`);
rerunning computes only what is missing. `--slurm` writes array-job scripts into <out>/launch/
(pretraining, runs, report, and submit.sh chaining them) and submits nothing; the settings
`--config.slurm.{partition,account,gpus,time}` go into their #SBATCH lines. The report is
<out>/report/index.html (and index.md). The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import ml_collections
from absl import flags

from afm_jax import cli
from afm_jax.errors import ConfigError
from afm_jax.evaluation import study as study_lib


def define_flags(fv: flags.FlagValues) -> None:
    d = dict(flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder (default: study_out/<study name>).", **d)
    flags.DEFINE_bool("slurm", False, "Write SLURM array scripts into <out>/launch/, run nothing.", **d)
    flags.DEFINE_integer("run_index", None, "Run only this run (the SLURM array task id).", **d)
    flags.DEFINE_integer("pretrain_index", None, "Train only this pretraining variant.", **d)
    flags.DEFINE_bool("report_only", False, "Rebuild the report from existing results.", **d)
    flags.DEFINE_bool("no_report", False, "Do not write the report.", **d)


def default_config(argv: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """SLURM settings of the scripts `--slurm` writes (time limit per array task)."""
    return ml_collections.ConfigDict(dict(slurm=dict(partition="", account="", gpus=1, time="04:00:00")))


TOOL = cli.Tool(
    __doc__, define_flags, default_config=default_config, config_keys_in="tools/study.py", positional="STUDY_FILE"
)


def _load(path: str) -> study_lib.Study:
    try:
        return study_lib.load_study(path)
    except SyntaxError as e:
        raise ConfigError(f"Study file {path} has a syntax error at line {e.lineno}: {e.msg}.") from None


def _pick(items: Sequence, index: int, flag: str, what: str):
    if not 0 <= index < len(items):
        raise ConfigError(
            f"--{flag} {index} is out of range: the study has {len(items)} {what} (0 to {len(items) - 1})."
        )
    return items[index]


def work(fv: flags.FlagValues, args: list[str]) -> int:
    if len(args) != 1:
        raise ConfigError(f"Give one study file (e.g. configs/studies/demo.py), got {args or 'none'}.")
    study_file = args[0]
    study = _load(study_file)
    out = fv.out or os.path.join("study_out", study.name)
    cli.check_output_dir(out)
    layout = study_lib.Layout(out)
    summary: dict = {"study": study.name, "out": str(layout.root)}
    slurm = fv.config.slurm
    if fv.slurm:
        if slurm.gpus < 0:
            raise ConfigError(f"--config.slurm.gpus must be >= 0, got {slurm.gpus}.")
        study_lib.check_study_data(study, layout)  # before any job is queued: one message for all tasks
        submit = study_lib.write_slurm(
            study,
            out,
            study_file,
            partition=slurm.partition,
            account=slurm.account,
            gpus=slurm.gpus,
            time_limit=slurm.time,
        )
        print(f"wrote {submit.parent}/*.sbatch; review, then: bash {submit}")
        summary["submit"] = str(submit)
    elif fv.pretrain_index is not None:
        name = _pick(list(study.pretrain), fv.pretrain_index, "pretrain_index", "pretraining variants")
        summary["pretrained"] = str(study_lib.run_pretraining(study, name, layout))
    elif fv.run_index is not None:
        run = _pick(study.all_runs(), fv.run_index, "run_index", "runs")
        record = study_lib.execute_run(study, run, layout)
        key = record.get("primary_metric", "auroc")
        summary.update(run=run.run_id, metric=key, value=record["metrics"][key]["point"])
    elif fv.report_only:
        summary["report"] = str(study_lib.write_study_report(study, layout))
    else:
        index = study_lib.run_study(study, out, report=not fv.no_report)
        summary["report"] = str(index) if index else None
        results = [json.loads(p.read_text()) for p in sorted(layout.results.glob("*.json"))]
        summary["auroc"] = {
            r["run_id"]: round(r["metrics"]["auroc"]["point"], 4) for r in results if "auroc" in r["metrics"]
        }
        summary["primary"] = {
            r["run_id"]: [
                r.get("primary_metric", "auroc"),
                round(r["metrics"][r.get("primary_metric", "auroc")]["point"], 4),
            ]
            for r in results
        }
    if summary.get("report"):
        print(f"report: {summary['report']}")
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, work, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, work)
