"""Studies: many runs (backbone × task × protocol × low-shot fraction × seed), run once, one report.

What: a study file (`configs/studies/*.py`, a Python file the user chose) has `get_study()`
returning a `Study`. `run_study(study, out_dir)`:

1. trains the pretraining variants it names (`Study.pretrain`: a config file + overrides; each in
   `<out>/pretrain/<name>`, resumed if interrupted) — a backbone refers to one by path "@<name>";
2. runs every run whose result is missing (`<out>/results/<run_id>.json`; predictions beside it in
   `<out>/predictions/`), reusing frozen features cached per backbone × dataset × split in
   `<out>/features/`; fine-tuning runs train in `<out>/finetune/<run_id>`;
3. writes `<out>/report/` (afm_jax.evaluation.report): tables with CIs, ROC/calibration/confusion
   PNGs per task, attention and CAM overlays on a few test images per backbone.

`write_slurm(study, out_dir, study_file)` writes SLURM array scripts into `<out>/launch/` instead
(one array task per missing run, pretraining first, the report after) without submitting them.

Why results are files: a study of dozens of runs is interrupted, extended (a new backbone, a new
seed) and rerun; each run is computed once and the report is always rebuilt from what exists.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import re
import shlex
import sys
import time
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from afm_jax import configuration, errors, io
from afm_jax.data import pipeline, records
from afm_jax.errors import ConfigError
from afm_jax.evaluation import monitors
from afm_jax.evaluation import report as report_lib
from afm_jax.evaluation.backbones import BackboneSpec, load_backbone
from afm_jax.evaluation.protocols import (
    PROTOCOLS,
    FeatureCache,
    Prediction,
    TaskSpec,
    binary_subset,
    check_task_data,
    probe_direction,
    protocol_params,
    provenance,
    run_protocol,
    score_predictions,
)
from afm_jax.train import run as train_run


@dataclasses.dataclass
class PretrainSpec:
    """A pretraining variant trained by the study: `config` file (+ `arg`) with dotted `overrides`;
    `data_task` names the task whose dataset it trains on (when the config sets no data.path)."""

    config: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_task: str = ""
    arg: str | None = None


def small_mae_overrides(image_size: int, total_steps: int) -> dict[str, Any]:
    """The CPU-sized MAE pretraining the shipped studies share (over configs/demo.py): a 4-block ViT-Ti/8
    with a 2-block 64-wide decoder, batch 32, one checkpoint at the end, no in-run probe or images,
    on the study task's dataset. A study adds or replaces keys (e.g. `data.path`) in its own file."""
    return {
        "model.variant": "Ti/8",
        "model.depth": 4,
        "image_size": image_size,
        "batch_size": 32,
        "total_steps": total_steps,
        "optim.base_lr": 4e-3,
        "optim.warmup_epochs": 2.0,
        "mae.decoder_dim": 64,
        "mae.decoder_depth": 2,
        "mae.decoder_heads": 4,
        "data.num_workers": 0,
        "probe.enabled": False,
        "image_every": 0,
        "checkpoint_every": total_steps,
        "log_every": 50,
        "data.synthetic.enabled": False,
    }


@dataclasses.dataclass(frozen=True)
class Run:
    backbone: str
    task: str
    protocol: str
    seed: int = 0
    fraction: float = 1.0

    @property
    def run_id(self) -> str:
        return re.sub(
            r"[^A-Za-z0-9_.-]+", "_", f"{self.task}__{self.backbone}__{self.protocol}__f{self.fraction:g}__s{self.seed}"
        )


@dataclasses.dataclass
class Study:
    """What to compare. `runs` defaults to every backbone × task × protocol × fraction × seed.

    reference: the backbone every other one is compared with (default: the first).
    options: per-protocol settings, e.g. {"knn": {"k": 20}, "finetune": {"total_steps": 300}}.
    overlay_images: test images per task shown with attention/CAM overlays (0 = none).
    """

    name: str
    tasks: dict[str, TaskSpec]
    backbones: dict[str, BackboneSpec]
    protocols: tuple[str, ...] = ("knn", "linear")
    seeds: tuple[int, ...] = (0,)
    fractions: tuple[float, ...] = (1.0,)
    pretrain: dict[str, PretrainSpec] = dataclasses.field(default_factory=dict)
    runs: list[Run] | None = None
    reference: str | None = None
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    n_boot: int = 1000
    overlay_images: int = 4
    feature_batch_size: int = 64

    def all_runs(self) -> list[Run]:
        if self.runs is not None:
            return list(self.runs)
        return [
            Run(b, t, p, int(s), float(f))
            for t, p, f, s, b in itertools.product(
                self.tasks, self.protocols, self.fractions, self.seeds, self.backbones
            )
        ]

    def validate(self) -> None:
        for run in self.all_runs():
            if run.backbone not in self.backbones:
                raise ConfigError(
                    f"Study {self.name!r}: run {run.run_id} names backbone {run.backbone!r}, not one of "
                    f"{sorted(self.backbones)}."
                )
            if run.task not in self.tasks:
                raise ConfigError(
                    f"Study {self.name!r}: run {run.run_id} names task {run.task!r}, not one of {sorted(self.tasks)}."
                )
            if run.protocol not in PROTOCOLS:
                raise ConfigError(f"Study {self.name!r}: protocol {run.protocol!r} is not one of {PROTOCOLS}.")
        for name, spec in self.backbones.items():
            ref = spec.path[1:] if spec.path.startswith("@") else None
            if ref is not None and ref not in self.pretrain:
                raise ConfigError(
                    f"Study {self.name!r}: backbone {name!r} refers to pretraining {spec.path!r}, but "
                    f"the study's `pretrain` has only {sorted(self.pretrain)}."
                )
        for name, p in self.pretrain.items():
            if p.data_task and p.data_task not in self.tasks:
                raise ConfigError(
                    f"Study {self.name!r}: pretraining {name!r} names data_task {p.data_task!r}, not "
                    f"one of {sorted(self.tasks)}."
                )


def check_study_data(study: Study, layout: "Layout") -> None:
    """Validates every task's data (labels per unit, classes in each split, enough test units) before
    any pretraining or feature extraction; all problems of all tasks in one ConfigError."""
    problems = []
    for name in sorted({r.task for r in study.all_runs()}):
        task = study.tasks[name]
        problems += check_task_data(task, task.data_path(layout.root))
    if problems:
        raise ConfigError(
            f"Study {study.name!r} cannot run as configured ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}; nothing was trained or extracted):\n- " + "\n- ".join(problems)
        )


def load_study(path: str | os.PathLike) -> Study:
    """`get_study()` of a study file (a Python file the user chose; nothing else is executed)."""
    study = configuration.load_python_file(path, "get_study", what="Study file (see configs/studies/demo.py)")
    if not isinstance(study, Study):
        raise ConfigError(f"get_study() in {path} returned {type(study).__name__}, not a Study.")
    study.validate()
    return study


# ─── Paths ───────────────────────────────────────────────────────────────────────────────────────


class Layout:
    """Where a study keeps its parts, under one output folder."""

    def __init__(self, out_dir: str | os.PathLike):
        self.root = pathlib.Path(out_dir).absolute()
        self.results = self.root / "results"
        self.predictions = self.root / "predictions"
        self.features = self.root / "features"
        self.finetune = self.root / "finetune"
        self.pretrain = self.root / "pretrain"
        self.report = self.root / "report"
        self.launch = self.root / "launch"

    def result(self, run: Run) -> pathlib.Path:
        return self.results / f"{run.run_id}.json"

    def prediction(self, run: Run, split: str) -> pathlib.Path:
        return self.predictions / f"{run.run_id}.{split}.npz"


def resolve_backbone(spec: BackboneSpec, layout: Layout) -> BackboneSpec:
    """`@name` paths -> that pretraining's workdir in the study folder."""
    if spec.path.startswith("@"):
        return dataclasses.replace(spec, path=os.fspath(layout.pretrain / spec.path[1:]))
    return spec


# ─── Pretraining variants ────────────────────────────────────────────────────────────────────────


def pretraining_config(study: Study, name: str, layout: Layout):
    """The trainer config of pretraining variant `name` (overrides applied, data path resolved)."""
    p = study.pretrain[name]
    config = configuration.load_python_file(p.config, "get_config", p.arg, what="Pretraining config")
    configuration.apply_overrides(config, p.overrides, f"Pretraining {name!r} ({p.config})")
    if p.data_task and not config.data.path:
        with config.unlocked():
            config.data.path = study.tasks[p.data_task].data_path(layout.root)
    return config


def run_pretraining(study: Study, name: str, layout: Layout) -> pathlib.Path:
    """Trains pretraining variant `name` into `<out>/pretrain/<name>` unless it has finished."""
    workdir = layout.pretrain / name
    done = workdir / "done.json"
    if done.is_file():
        return workdir
    config = pretraining_config(study, name, layout)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[study] pretraining {name!r} in {workdir}", flush=True)
    result = train_run.run(config, os.fspath(workdir), monitor=monitors.monitor_for(config))
    if result.finished:
        io.write_json(done, {"step": result.step})
    else:
        raise errors.StoppedBeforeFinishingError(
            f"Pretraining {name!r} stopped at step {result.step} of {config.total_steps} before finishing "
            f"(its checkpoint is in {workdir}); rerun the same command to resume it."
        )
    return workdir


# ─── Runs ────────────────────────────────────────────────────────────────────────────────────────


def execute_run(study: Study, run: Run, layout: Layout) -> dict:
    """Computes one run (if its result is missing) and returns its result record."""
    path = layout.result(run)
    if path.is_file():
        return json.loads(path.read_text())
    task = study.tasks[run.task]
    spec = resolve_backbone(study.backbones[run.backbone], layout)
    ref = study.backbones[run.backbone].path
    if ref.startswith("@"):
        run_pretraining(study, ref[1:], layout)
    data_path = task.data_path(layout.root)
    print(f"[study] {run.run_id}", flush=True)
    start = time.perf_counter()
    val, test, info = run_protocol(
        spec,
        task,
        run.protocol,
        seed=run.seed,
        fraction=run.fraction,
        cache=FeatureCache(layout.features),
        data_path=data_path,
        workdir=os.fspath(layout.finetune / run.run_id),
        name=run.backbone,
        options=study.options.get(run.protocol),
        batch_size=study.feature_batch_size,
    )
    scored = score_predictions(val, test, task, n_boot=study.n_boot, seed=run.seed)
    layout.predictions.mkdir(parents=True, exist_ok=True)
    val.save(layout.prediction(run, "validation"))
    test.save(layout.prediction(run, "test"))
    record = {
        "run_id": run.run_id,
        **dataclasses.asdict(run),
        **scored,
        "info": info,
        "backbone_spec": spec.to_json(),
        "provenance": provenance(
            spec,
            data_path,
            protocol=run.protocol,
            params=protocol_params(run.protocol, study.options.get(run.protocol), info),
        ),
        "seconds": time.perf_counter() - start,
    }
    layout.results.mkdir(parents=True, exist_ok=True)
    io.write_json(path, record, default=float)
    key = scored.get("primary_metric", "auroc")
    m = scored["metrics"][key]
    print(
        f"[study] {run.run_id}: {key} {m['point']:.3f} [{m['low']:.3f}, {m['high']:.3f}] "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return record


def pick_overlay_cases(pred: Prediction, n: int) -> list[tuple[str, int]]:
    """(image index, case) of up to `n` test images: the most confident true positives, false positives
    and false negatives (and true negatives if those run out), at P = 0.5, taken in turn."""
    y, s = np.asarray(pred.y_true), np.asarray(pred.y_score)
    called = s >= 0.5
    cases = {
        "true positive": np.flatnonzero((y == 1) & called)[np.argsort(-s[(y == 1) & called])],
        "false positive": np.flatnonzero((y == 0) & called)[np.argsort(-s[(y == 0) & called])],
        "false negative": np.flatnonzero((y == 1) & ~called)[np.argsort(s[(y == 1) & ~called])],
        "true negative": np.flatnonzero((y == 0) & ~called)[np.argsort(s[(y == 0) & ~called])],
    }
    out, rank = [], 0
    main = ("true positive", "false positive", "false negative")
    while len(out) < n and any(rank < len(cases[c]) for c in main):
        out += [(c, int(cases[c][rank])) for c in main if rank < len(cases[c])]
        rank += 1
    out = out[:n]
    out += [("true negative", int(i)) for i in cases["true negative"][: n - len(out)]]
    return out


def _stored_image(data_path: str, split: str, image_id: str) -> np.ndarray:
    """The image at its stored resolution, float32 [0, 1] (H, W)."""
    source = records.open_split(data_path, split)
    for i in range(len(source)):
        ex = source[i]
        if ex["image_id"] == image_id:
            return cv2.imdecode(np.frombuffer(ex["image"], np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float32) / 65535.0
    raise KeyError(image_id)


def _overlays(study: Study, layout: Layout, records_: list[dict]) -> dict[tuple[str, str], dict]:
    """Attention and CAM maps of each backbone on its linear probe's most confident true positives, false
    positives and false negatives (binary tasks), shown over the images at their stored resolution."""
    n = int(study.overlay_images)
    if n <= 0:
        return {}
    out = {}
    cache = FeatureCache(layout.features)
    names = [b for b in study.backbones if any(r["backbone"] == b for r in records_)]
    for task_name in sorted({r["task"] for r in records_}):
        task = study.tasks[task_name]
        if task.kind != "binary":  # attention / CAM overlays of a binary probe only
            continue
        data_path = task.data_path(layout.root)
        for name in names:
            runs = [r for r in records_ if r["task"] == task_name and r["backbone"] == name]
            run = min(runs, key=lambda r: (r["protocol"] != "linear", -float(r["fraction"]), int(r["seed"])))
            pred = Prediction.load(layout.predictions / f"{run['run_id']}.test.npz")
            picks = pick_overlay_cases(pred, n)
            if not picks:
                continue
            spec = resolve_backbone(study.backbones[name], layout)
            backbone = load_backbone(spec, name)
            wanted = {pred.image_id[i]: k for k, (_, i) in enumerate(picks)}
            model_images = [None] * len(picks)
            batches = pipeline.build_eval_iterator(
                {"path": data_path, "num_workers": 0},
                split=task.test_split,
                batch_size=64,
                image_size=spec.image_size,
                process_index=0,
                process_count=1,
            )
            for batch in batches:
                for img, image_id, ok in zip(batch["image"], batch["image_id"], batch["mask"]):
                    if ok and str(image_id) in wanted:
                        model_images[wanted[str(image_id)]] = img
                if all(m is not None for m in model_images):
                    break
            batches.close()
            images = np.stack(model_images)
            display = [_stored_image(data_path, task.test_split, pred.image_id[i])[..., None] for _, i in picks]
            captions = [
                f"{case}\n{task.names[int(pred.y_true[i])]}, P({task.names[1]}) = {pred.y_score[i]:.2f}\n"
                f"patient {pred.patient_id[i][:8]} ({run['protocol']})"
                for case, i in picks
            ]
            maps = {}
            attention = backbone.attention_maps(images)
            if attention is not None:
                source = "CLS" if backbone.attention_source == "class token" else "patch-mean"
                maps[f"{source} attention, last block\n(the token the backbone pools)"] = attention
            spatial = backbone.spatial_features(images)
            if spatial is not None:
                train, val = (
                    binary_subset(cache.get(spec, data_path, s, lambda: backbone), task)
                    for s in (task.train_split, task.val_split)
                )
                direction = probe_direction(train, val)
                maps["probe CAM (= Grad-CAM)\ncentred on train mean"] = report_lib.cam_maps(
                    spatial, direction.weights, direction.mean
                )
            if maps:
                out[(task_name, name)] = {"images": display, "captions": captions, "maps": maps}
    return out


def write_study_report(study: Study, layout: Layout, *, overlays: bool = True) -> pathlib.Path:
    """Rebuilds `<out>/report/` from every result that exists."""
    order = {name: i for i, name in enumerate(study.backbones)}
    results, predictions = [], {}
    for run in study.all_runs():
        if not layout.result(run).is_file():
            continue
        rec = json.loads(layout.result(run).read_text())
        rec["order"] = order[run.backbone]
        results.append(rec)
        predictions[run.run_id] = (
            Prediction.load(layout.prediction(run, "validation")),
            Prediction.load(layout.prediction(run, "test")),
        )
    if not results:
        raise ConfigError(f"No results in {layout.results} yet: run the study before asking for its report.")
    maps = _overlays(study, layout, results) if overlays else {}
    return report_lib.write_report(
        layout.report,
        results,
        predictions,
        study.tasks,
        reference=study.reference,
        overlays=maps,
        title=f"Study {study.name}",
        n_boot=study.n_boot,
    )


def run_study(study: Study, out_dir: str | os.PathLike, *, report: bool = True) -> pathlib.Path | None:
    """Runs what is missing, then writes the report; returns the report's index.html."""
    layout = Layout(out_dir)
    runs = study.all_runs()
    missing = [r for r in runs if not layout.result(r).is_file()]
    print(f"[study] {study.name}: {len(runs)} runs, {len(missing)} to compute, output in {layout.root}", flush=True)
    if missing:
        check_study_data(study, layout)
    for run in tqdm(missing, desc="runs", unit="run", disable=not missing):
        execute_run(study, run, layout)
    return write_study_report(study, layout) if report else None


# ─── SLURM ───────────────────────────────────────────────────────────────────────────────────────


# Five minutes before the time limit SLURM signals the batch shell (USR1, `--signal=B:USR1@300`); the trap
# sends SIGTERM to the job step's tasks only (`scancel --signal=TERM`; killing srun would SIGKILL them):
# the trainer saves a checkpoint and the study command exits with StoppedBeforeFinishingError; then the
# task is requeued and its rerun resumes from that checkpoint. Jobs that depend on it wait meanwhile.
# The same cycle as launch/slurm_multinode.sbatch, run on a real SLURM by tests/cluster/test_slurm.py.
_REQUEUE_ON_TIME_LIMIT = (
    'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})"',
    "requeue_on_time_limit() {",
    '  echo "time limit near: asking the step to checkpoint, then requeueing $SLURM_JOB_ID"',
    '  scancel --signal=TERM "$SLURM_JOB_ID" || true',
    '  wait "$STEP_PID" || true',
    '  echo "step stopped; requeueing $SLURM_JOB_ID"',
    '  scontrol requeue "$SLURM_JOB_ID"',
    "  exit 0",
    "}",
    "trap requeue_on_time_limit USR1",
)
_WAIT_FOR_STEP = (
    "STEP_PID=$!",
    "status=0",
    'wait "$STEP_PID" || status=$?',
    'echo "job $SLURM_JOB_ID: exited with status $status"',
    'exit "$status"',
)


def write_slurm(
    study: Study,
    out_dir: str | os.PathLike,
    study_file: str,
    *,
    partition: str = "",
    account: str = "",
    gpus: int = 1,
    time_limit: str = "04:00:00",
) -> pathlib.Path:
    """Writes `<out>/launch/`: pretrain.sbatch, runs.sbatch (an array over missing runs), report.sbatch
    and submit.sh chaining them with dependencies. Submits nothing; returns submit.sh."""
    layout = Layout(out_dir)
    layout.launch.mkdir(parents=True, exist_ok=True)
    runs = study.all_runs()
    missing = [i for i, r in enumerate(runs) if not layout.result(r).is_file()]
    pending_pre = [name for name in study.pretrain if not (layout.pretrain / name / "done.json").is_file()]
    tool = shlex.quote(os.fspath(pathlib.Path(__file__).resolve().parents[2] / "tools" / "study.py"))
    base = (
        f"{shlex.quote(sys.executable)} {tool} {shlex.quote(os.fspath(pathlib.Path(study_file).absolute()))} "
        f"--out {shlex.quote(os.fspath(layout.root))}"
    )
    header = [
        "#!/bin/bash",
        f"#SBATCH --gpus={gpus}",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={layout.launch}/%x_%A_%a.log",
        # relative paths in the study file (configs, data) mean what they mean where --slurm was run
        f"#SBATCH --chdir={os.getcwd()}",
        "#SBATCH --open-mode=append",
        # a failed pretraining cancels the jobs waiting on it instead of leaving them pending forever
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
    ]
    if partition:
        header.append(f"#SBATCH --partition={partition}")
    if account:
        header.append(f"#SBATCH --account={account}")

    def script(name: str, command: str, array: list[int] | None = None) -> pathlib.Path:
        lines = [*header, f"#SBATCH --job-name={study.name}_{name}"]
        if array is not None:
            lines.append(f"#SBATCH --array={','.join(map(str, array))}")
        lines += ["set -euo pipefail", *_REQUEUE_ON_TIME_LIMIT, f"{command} &", *_WAIT_FOR_STEP, ""]
        path = layout.launch / f"{name}.sbatch"
        path.write_text("\n".join(lines))
        return path

    (layout.launch / "runs.txt").write_text("\n".join(f"{i}\t{runs[i].run_id}" for i in missing) + "\n")
    (layout.launch / "pretrain.txt").write_text("\n".join(f"{i}\t{n}" for i, n in enumerate(study.pretrain)) + "\n")
    names = list(study.pretrain)
    submit = [
        "#!/bin/bash",
        "# Written by tools/study.py --slurm; review, then run: bash submit.sh",
        "set -euo pipefail",
        f"cd {shlex.quote(os.fspath(layout.launch))}",
        "dep=''",
    ]
    if pending_pre:
        script("pretrain", f"srun {base} --pretrain_index $SLURM_ARRAY_TASK_ID", [names.index(n) for n in pending_pre])
        submit += [
            "pre=$(sbatch --parsable pretrain.sbatch)",
            'echo "pretraining: job ${pre}"',
            'dep="--dependency=afterok:${pre}"',
        ]
    if missing:
        script("runs", f"srun {base} --run_index $SLURM_ARRAY_TASK_ID --no_report", missing)
        submit += [
            "runs=$(sbatch --parsable ${dep} runs.sbatch)",
            'echo "runs: job ${runs}"',
            'dep="--dependency=afterany:${runs}"',
        ]
    script("report", f"{base} --report_only")
    submit += ["sbatch ${dep} report.sbatch", ""]
    path = layout.launch / "submit.sh"
    path.write_text("\n".join(submit))
    path.chmod(0o755)
    return path
