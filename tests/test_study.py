"""Studies: two backbones produce a report (table, ROC PNG, overlays), reruns reuse cached results,
study files and SLURM scripts, and the command-line tools' user errors."""

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

from afm_jax.errors import ConfigError
from afm_jax.evaluation import study as study_lib
from afm_jax.evaluation.backbones import BackboneSpec
from afm_jax.evaluation.protocols import TaskSpec

REPO = pathlib.Path(__file__).resolve().parents[1]


def _study(data_path, **kw):
    tiny = dict(variant="mu/8", image_size=32, model={"depth": 2})
    return study_lib.Study(
        name="t",
        tasks={
            "aff": TaskSpec("aff", data=os.fspath(data_path), positive_labels=(2,), negative_labels=(1,), unit="image")
        },
        backbones={
            "rand_a": BackboneSpec("random_init", seed=0, **tiny),
            "rand_b": BackboneSpec("random_init", seed=1, **tiny),
        },
        protocols=("knn", "linear"),
        n_boot=50,
        overlay_images=2,
        **kw,
    )


def test_study_with_two_backbones_writes_the_report_and_reuses_results(synthetic_dataset, tmp_path, monkeypatch):
    study = _study(synthetic_dataset)
    index = study_lib.run_study(study, tmp_path)
    report = tmp_path / "report"
    assert index == report / "index.html" and index.is_file()
    md = (report / "index.md").read_text()
    for run in study.all_runs():
        assert (tmp_path / "results" / f"{run.run_id}.json").is_file()
    for protocol in ("knn", "linear"):  # one row per backbone
        assert (
            f"| aff | {protocol} | 1 | 0 | rand_a | image |" in md
            and f"| aff | {protocol} | 1 | 0 | rand_b | image |" in md
        )
    assert "auroc" in md and "[" in md  # metrics with CIs
    assert "Paired comparisons with `rand_a`" in md and "rand_b | rand_a" in md
    rocs = sorted(p.name for p in report.glob("roc_*.png"))
    assert rocs == ["roc_aff_knn_f1_s0.png", "roc_aff_linear_f1_s0.png"]
    assert len(list(report.glob("overlays_*.png"))) == 2
    assert list(report.glob("calibration_*.png")) and list(report.glob("confusion_*.png"))
    assert "<table>" in index.read_text() and "roc_aff_knn_f1_s0.png" in index.read_text()
    result = json.loads((tmp_path / "results" / f"{study.all_runs()[0].run_id}.json").read_text())
    assert {"auroc", "kappa", "sensitivity_at_spec_0.90"} <= set(result["metrics"])
    assert (
        result["metrics"]["auroc"]["low"] <= result["metrics"]["auroc"]["point"] <= result["metrics"]["auroc"]["high"]
    )

    # A rerun computes nothing (every result exists) and rebuilds the report.
    def no_run(*a, **k):
        raise AssertionError("a cached run was recomputed")

    monkeypatch.setattr(study_lib, "run_protocol", no_run)
    study_lib.run_study(study, tmp_path, report=False)
    # A new seed is the only run that is missing.
    bigger = _study(synthetic_dataset, seeds=(0, 1))
    missing = [r for r in bigger.all_runs() if not study_lib.Layout(tmp_path).result(r).is_file()]
    assert {r.seed for r in missing} == {1} and len(missing) == 4


def test_slurm_mode_writes_array_scripts_for_missing_runs_only(synthetic_dataset, tmp_path):
    study = _study(synthetic_dataset)
    study.pretrain = {"mae": study_lib.PretrainSpec(config=os.fspath(REPO / "configs" / "demo.py"), data_task="aff")}
    study.backbones["mae"] = BackboneSpec("checkpoint", path="@mae", image_size=32)
    layout = study_lib.Layout(tmp_path)
    done = study.all_runs()[0]
    layout.results.mkdir(parents=True)
    layout.result(done).write_text("{}")
    submit = study_lib.write_slurm(study, tmp_path, "configs/studies/x.py", partition="gpu", gpus=1)
    runs = (layout.launch / "runs.sbatch").read_text()
    n = len(study.all_runs())
    assert f"#SBATCH --array={','.join(str(i) for i in range(1, n))}" in runs
    assert "--run_index $SLURM_ARRAY_TASK_ID" in runs and "#SBATCH --partition=gpu" in runs
    assert "--pretrain_index $SLURM_ARRAY_TASK_ID" in (layout.launch / "pretrain.sbatch").read_text()
    text = submit.read_text()
    assert "afterok:${pre}" in text and "afterany:${runs}" in text and "report.sbatch" in text


_STUBS = {
    # the trainer: runs until SIGTERM (then "saves" and exits 2, as the study does when stopped early)
    "srun": 'echo $$ > "$STUBS/srun.pid"; trap \'echo saved >> "$STUBS/calls"; exit 2\' TERM; '
    'if [ -n "${FAIL:-}" ]; then exit 3; fi; while :; do sleep 0.05; done',
    "scancel": 'echo "scancel $*" >> "$STUBS/calls"; kill -TERM "$(cat "$STUBS/srun.pid")"',
    "scontrol": 'echo "scontrol $*" >> "$STUBS/calls"',
}


def _run_script_with_stubs(script: pathlib.Path, tmp_path: pathlib.Path, *, signal_it: bool, fail: bool = False):
    stubs = tmp_path / "stubs"
    stubs.mkdir(parents=True)
    for name, body in _STUBS.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", STUBS=str(stubs), SLURM_JOB_ID="77")
    env.update(SLURM_ARRAY_TASK_ID="0", **({"FAIL": "1"} if fail else {}))
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    if signal_it:
        deadline = time.monotonic() + 30
        while not (stubs / "srun.pid").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        shell.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell before the time limit
    out, _ = shell.communicate(timeout=60)
    calls = (stubs / "calls").read_text().splitlines() if (stubs / "calls").is_file() else []
    return shell.returncode, calls, out


def test_slurm_scripts_checkpoint_and_requeue_before_the_time_limit(synthetic_dataset, tmp_path):
    """USR1 to the batch shell: SIGTERM to the step's tasks only, wait for them, requeue this task, exit 0;
    a step that fails by itself is not requeued and its status is the job's."""
    study = _study(synthetic_dataset)
    study.pretrain = {"mae": study_lib.PretrainSpec(config=os.fspath(REPO / "configs" / "demo.py"), data_task="aff")}
    study_lib.write_slurm(study, tmp_path / "out", "configs/studies/x.py")
    script = study_lib.Layout(tmp_path / "out").launch / "pretrain.sbatch"
    header = script.read_text()
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header
    # the study file's relative paths resolve where --slurm ran; a failed job cancels its dependants
    assert f"#SBATCH --chdir={os.getcwd()}" in header and "#SBATCH --kill-on-invalid-dep=yes" in header
    status, calls, out = _run_script_with_stubs(script, tmp_path / "signalled", signal_it=True)
    assert (status, calls) == (0, ["scancel --signal=TERM 77", "saved", "scontrol requeue 77"]), out
    status, calls, out = _run_script_with_stubs(script, tmp_path / "failing", signal_it=False, fail=True)
    assert (status, calls) == (3, []), out


def test_study_file_mistakes_are_user_errors(tmp_path, synthetic_dataset):
    with pytest.raises(ConfigError, match="does not exist"):
        study_lib.load_study(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_study"):
        study_lib.load_study(bad)
    study = _study(synthetic_dataset)
    study.backbones["ghost"] = BackboneSpec("checkpoint", path="@nothing")
    with pytest.raises(ConfigError, match="pretraining"):
        study.validate()
    with pytest.raises(ConfigError, match="disjoint"):
        TaskSpec("x", data="d", positive_labels=(1,), negative_labels=(1,))


def test_demo_study_file_loads():
    study = study_lib.load_study(REPO / "configs" / "studies" / "demo.py")
    assert set(study.backbones) == {"mae", "random_init"} and "mae" in study.pretrain
    assert {r.protocol for r in study.all_runs()} == {"knn", "linear"} and set(study.tasks) == {
        "aff_vs_nff",
        "fracture",
    }


def test_tools_print_a_message_not_a_traceback(tmp_path, capsys, synthetic_dataset):
    import importlib.util

    def tool(name):
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    study_file = tmp_path / "s.py"
    study_file.write_text(
        "from afm_jax.evaluation.study import Study\nfrom afm_jax.evaluation.backbones import BackboneSpec\n"
        "from afm_jax.evaluation.protocols import TaskSpec\n"
        f"def get_study():\n    return Study(name='s', tasks={{'a': TaskSpec('a', data={os.fspath(synthetic_dataset)!r})}},"
        " backbones={'r': BackboneSpec('random_init', variant='mu/8', image_size=32)})\n"
    )
    assert tool("study").main([str(study_file), "--out", str(tmp_path / "o"), "--report_only"]) == 2
    assert "error: No results" in capsys.readouterr().err
    assert tool("study").main([str(study_file), "--out", str(tmp_path / "o"), "--run_index", "99"]) == 2
    err = capsys.readouterr().err
    assert "--run_index 99 is out of range: the study has 2 runs (0 to 1)" in err and "Traceback" not in err
    broken = tmp_path / "broken.py"
    broken.write_text("def get_study(:\n    pass\n")
    assert tool("study").main([str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"Study file {broken} has a syntax error at line 1" in err and "Traceback" not in err
    assert (
        tool("evaluate").main(
            [
                "--backbone",
                "checkpoint:/no/such/run",
                "--data",
                os.fspath(synthetic_dataset),
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err
    code = tool("evaluate").main(
        [
            "--backbone",
            "random_init:,variant=mu/8,image_size=32",
            "--data",
            os.fspath(synthetic_dataset),
            "--protocol",
            "knn",
            "--unit",
            "image",
            "--n_boot",
            "20",
            "--out",
            str(tmp_path / "e2"),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and 0.0 <= json.loads(last)["auroc"] <= 1.0
    assert (tmp_path / "e2" / "result.json").is_file()


def test_curation_ablation_study_needs_the_curation_output(tmp_path, monkeypatch):
    """The ablation study file loads when tools/curate.py's selections exist, and says what to run when not."""
    ablation = REPO / "configs" / "studies" / "curation_ablation.py"
    monkeypatch.setenv("AFM_ABLATION_CURATION", str(tmp_path / "cur"))
    with pytest.raises(ConfigError, match="tools/curate.py"):
        study_lib.load_study(ablation)
    (tmp_path / "cur").mkdir()
    for name in ("selection.json", "selection_random.json"):
        (tmp_path / "cur" / name).write_text(json.dumps(["a"]))
    study = study_lib.load_study(ablation)
    assert sorted(study.pretrain) == ["curated_s0", "curated_s1", "random_subset_s0", "random_subset_s1"]
    sel = {n: p.overrides["data.selection"] for n, p in study.pretrain.items()}
    assert sel["curated_s0"].endswith("selection.json") and sel["random_subset_s1"].endswith("selection_random.json")
    assert {p.overrides["seed"] for p in study.pretrain.values()} == {0, 1}
