"""The cluster launchers on a real (local, single-node) SLURM: sbatch, srun, signals, requeue, arrays.

Every job goes through the files a user submits — launch/slurm_multinode.sbatch,
launch/preprocess_array.sbatch, the scripts of `tools/study.py --slurm` — with only sbatch
command-line options (which override #SBATCH lines) and environment variables to fit a CPU node:
2 tasks on one node, jax.distributed initialised from SLURM's variables (afm_jax/train/distributed.py).
Run with `make test-slurm` (root; installs nothing itself — .ci/run does).
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

CONFIG = "configs/ci/multiprocess_mae.py"
STEPS = 40  # long enough (~10 s of steps) to signal the job mid-run
# A CPU node: one node, 2 tasks of 1 CPU, no GPUs; the 10-minute USR1 offset needs a longer limit.
CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:30:00"]


def read_params(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """The `params` arrays of a checkpoint, as numpy, keyed by path (independent of how it was sharded)."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state["params"])}


def assert_same_params(a: dict, b: dict, *, atol: float = 0.0) -> float:
    assert a.keys() == b.keys() and len(a) > 10
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= atol, f"parameters differ by up to {worst}"
    return worst


def pretrain(slurm, tmp: pathlib.Path, name: str) -> tuple[str, pathlib.Path, pathlib.Path]:
    workdir, log = tmp / name, tmp / f"{name}.out"
    job = slurm.sbatch(
        *CPU_NODE,
        f"--output={log}",
        "launch/slurm_multinode.sbatch",
        CONFIG,
        str(workdir),
        f"--config.total_steps={STEPS}",
    )
    return job, workdir, log


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    job, workdir, log = pretrain(slurm, tmp, "uninterrupted")
    states = slurm.wait(job, timeout=400)
    text = log.read_text()
    assert states == {job: "COMPLETED"}, text[-4000:]
    return workdir, text


def test_two_task_job_agrees_across_processes_and_equals_one_process(slurm, uninterrupted, tmp_path):
    workdir, text = uninterrupted
    finals = re.findall(rf"\[process (\d)/2\] step {STEPS} loss ([0-9.]+)", text)
    assert sorted(p for p, _ in finals) == ["0", "1"], text[-3000:]
    assert finals[0][1] == finals[1][1]  # the same global loss on both processes
    assert text.count(f"step {STEPS}/{STEPS} |") == 1  # console line from process 0 only
    assert "srun: error" not in text and "Traceback" not in text

    # One process, 2 CPU devices, the two hosts' batches side by side: the same global batch every step.
    reference = tmp_path / "one_process"
    out = subprocess.run(
        [sys.executable, "tests/cluster/one_process_reference.py", CONFIG, str(reference), str(STEPS)],
        cwd=REPO,
        env=slurm.env,  # same salt, hence the same patient splits
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    one_loss = re.findall(rf"step {STEPS}/{STEPS} \| loss ([0-9.]+)", out.stdout)
    two_loss = re.findall(rf"step {STEPS}/{STEPS} \| loss ([0-9.]+)", text)
    assert one_loss == two_loss, (one_loss, two_loss)
    worst = assert_same_params(read_params(workdir, STEPS), read_params(reference, STEPS), atol=1e-6)
    print(f"2-process job vs 1-process run: max |param difference| = {worst:.3g}")


def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_parameters(slurm, uninterrupted, tmp_path):
    job, workdir, log = pretrain(slurm, tmp_path, "preempted")
    slurm.wait_for(lambda: log.is_file() and "step 4/" in log.read_text(), "training to reach step 4")
    # What SLURM does 10 minutes before the time limit (#SBATCH --signal=B:USR1@600):
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    states = slurm.wait(job, timeout=400)
    text = log.read_text()
    print(text)
    assert states == {job: "COMPLETED"}, text[-4000:]
    stopped = re.search(r"Stopping at step (\d+) \(SIGTERM, all processes\); checkpoint saved", text)
    assert stopped, text
    step = int(stopped.group(1))
    assert 4 <= step < STEPS
    # The order of one requeue cycle: signal -> checkpoint -> requeue -> rerun of the script -> resume -> end.
    marks = [
        "(restart 0)",
        "time limit near",
        f"Stopping at step {step}",
        "trainer stopped; requeueing",
        "(restart 1)",
        f"at step {step}.",
        f"step {STEPS}/{STEPS}",
        f"[process 0/2] step {STEPS} loss",
    ]
    positions = [text.find(m) for m in marks]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(marks, positions))
    assert re.search(rf"Resumed from \S+ at step {step}\.", text)
    assert "(restart 2)" not in text and "Traceback" not in text
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert step in saved or max(saved) == STEPS
    worst = assert_same_params(read_params(workdir, STEPS), read_params(uninterrupted[0], STEPS))
    print(f"requeued job vs uninterrupted job: max |param difference| = {worst}")


def _nan_as_text(value):
    """A record without a regression `target` holds NaN, which is unequal to itself: compare it as text."""
    return "nan" if isinstance(value, float) and value != value else value


def _dataset(directory: pathlib.Path) -> tuple:
    """Everything of a dataset except its creation time and path: info, decoded records, index, manifest."""
    from afm_jax.data import records

    info = records.read_info(directory)
    info.pop("created")
    info.pop("path")
    recs = {
        split: [
            {
                k: _nan_as_text(v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in records.open_split(directory, split)[i].items()
            }
            for i in range(n)
        ]
        for split, n in info["splits"].items()
    }
    index = {p.name: p.read_text() for p in (directory / "index").iterdir()}
    return info, recs, index, (directory / "manifest.csv").read_text()


def test_preprocess_array_job_merges_to_the_single_process_dataset_and_a_killed_task_resumes(slurm, tmp_path):
    from afm_jax.data import synthetic

    archive = tmp_path / "dicom"
    synthetic.write_dicom_files(archive, num_patients=16, image_size=64)
    salt = tmp_path / "salt"
    salt.write_text("array-test-salt")
    salt.chmod(0o600)
    common = [
        "--input",
        str(archive),
        "--labels",
        str(archive / "labels.csv"),
        "--name",
        "femur",
        "--variant",
        "std512",
        "--chunk_size",
        "1",
    ]
    env = {
        "AFM_SALT_FILE": str(salt),
        "PY": sys.executable,
        "INPUT": str(archive),
        "LABELS": str(archive / "labels.csv"),
        "NAME": "femur",
        "VARIANT": "std512",
        "EXTRA_ARGS": "--chunk_size 1",
    }

    single = subprocess.run(
        [
            sys.executable,
            "tools/preprocess.py",
            *common,
            "--out",
            str(tmp_path / "single"),
            "--workers",
            "0",
            "--quiet",
        ],
        cwd=REPO,
        env={**slurm.env, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    out = tmp_path / "array"
    env["OUT"] = str(out)
    logs = tmp_path / "logs"
    logs.mkdir()
    opts = ["--cpus-per-task=1", "--mem=500M", "--time=00:20:00", f"--output={logs}/%x-%A_%a.out"]
    chunks = out / ".work" / "femur_std512_v1" / "chunks"
    # Task 1 is held in the script's site set-up hook (AFM_SETUP) before the tool starts, and killed once
    # the others are done: a task lost mid-array. (Freezing it from outside once it is RUNNING raced the
    # tool, a shard takes < 1 s, and CI once saw task 1 finish first; killing it between two chunks cannot
    # be timed reliably here either. A conversion interrupted mid-shard and rerun is tested in
    # tests/test_conversion.py.)
    held = tmp_path / "task1-held"
    hold = tmp_path / "hold_task_1.sh"
    hold.write_text(f'if [[ "$SLURM_ARRAY_TASK_ID" == 1 ]]; then touch {held}; sleep 600; fi\n')
    array = slurm.sbatch(*opts, "--array=0-2", "launch/preprocess_array.sbatch", env={**env, "AFM_SETUP": str(hold)})
    slurm.wait_for(held.exists, "task 1 to reach the hold", poll=0.05)
    slurm.wait_for(
        lambda: all(slurm.states(f"{array}_{i}").get(f"{array}_{i}") == "COMPLETED" for i in (0, 2)), "tasks 0 and 2"
    )
    assert slurm.states(f"{array}_1") == {f"{array}_1": "RUNNING"}
    slurm.run("scancel", f"{array}_1")
    states = slurm.wait(array)
    assert states[f"{array}_0"] == states[f"{array}_2"] == "COMPLETED", states
    assert states[f"{array}_1"] == "CANCELLED", states
    num_chunks = json.loads((chunks.parent / "plan.json").read_text())["num_chunks"]
    done_before = {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk-*.jsonl")}
    assert {int(n[6:12]) % 3 for n in done_before} == {0, 2}
    assert len(done_before) == len([c for c in range(num_chunks) if c % 3 != 1])

    # The merge refuses while task 1's chunks are missing; resubmitting task 1 alone resumes it.
    merge = slurm.sbatch(*opts, "launch/preprocess_array.sbatch", env={**env, "MERGE": "1"})
    assert slurm.wait(merge) == {merge: "FAILED"}
    again = slurm.sbatch(*opts, "--array=1", "launch/preprocess_array.sbatch", env={**env, "SHARDS": "3"})
    assert slurm.wait(again) == {f"{again}_1": "COMPLETED"}
    # It left the other tasks' chunks alone and converted its own (c mod 3 == 1): now every chunk is there.
    assert all((chunks / name).stat().st_mtime_ns == t for name, t in done_before.items())
    assert len(list(chunks.glob("chunk-*.jsonl"))) == num_chunks
    log = (logs / f"afm-preprocess-{again}_1.out").read_text()
    assert "shard 1/3 done; 0 chunks of other shards still to convert" in log, log
    merge = slurm.sbatch(
        *opts, f"--dependency=afterok:{again}", "launch/preprocess_array.sbatch", env={**env, "MERGE": "1"}
    )
    assert slurm.wait(merge) == {merge: "COMPLETED"}, [p.read_text()[-2000:] for p in logs.glob(f"*{merge}*")]
    name = "femur_std512_v1/1.0.0"
    assert _dataset(out / name) == _dataset(tmp_path / "single" / name)


def test_study_slurm_scripts_run_the_study_to_the_local_report(slurm, tmp_path):
    study = "tests/cluster/tiny_study.py"
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    env = {**slurm.env, "AFM_SALT": "study-salt"}
    # The local run goes on beside the cluster's jobs (2 cores: one each, most of the time).
    local_log = tmp_path / "local.log"
    with open(local_log, "w") as log_file:
        local_run = subprocess.Popen(
            [sys.executable, "tools/study.py", study, "--out", str(local)],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    slurm.run(
        sys.executable, "tools/study.py", study, "--out", str(cluster), "--slurm", "--config.slurm.gpus=1", env=env
    )
    launch = cluster / "launch"
    # The scripts ask for a GPU (#SBATCH --gpus=1); SBATCH_GPUS overrides it for sbatch calls in submit.sh.
    submitted = slurm.run("bash", str(launch / "submit.sh"), env={**env, "SBATCH_GPUS": "0"}).stdout
    report_job = re.findall(r"Submitted batch job (\d+)", submitted)[-1]
    pretrain_job = re.search(r"pretraining: job (\d+)", submitted).group(1)
    # The time limit nears mid-pretraining (what #SBATCH --signal=B:USR1@300 does): the task checkpoints,
    # requeues itself and resumes; the runs that depend on it wait, and the report still equals the local one.
    pretrain_log = launch / f"tiny_pretrain_{pretrain_job}_0.log"
    slurm.wait_for(lambda: pretrain_log.is_file() and "step 50/" in pretrain_log.read_text(), "pretraining step 50")
    slurm.run("scancel", "--signal=USR1", "--batch", f"{pretrain_job}_0")
    assert slurm.wait(report_job, timeout=400) == {report_job: "COMPLETED"}, "\n".join(
        p.read_text()[-2000:] for p in launch.glob("*.log")
    )
    assert local_run.wait(timeout=400) == 0, local_log.read_text()[-3000:]
    text = pretrain_log.read_text()
    stopped = re.search(r"Stopping at step (\d+) \(SIGTERM\); checkpoint saved", text)
    assert stopped and int(stopped.group(1)) < 1000, text[-3000:]
    marks = ["(restart 0)", "time limit near", "step stopped; requeueing", "(restart 1)"]
    marks += [f"at step {stopped.group(1)}.", "step 1000/1000", "exited with status 0"]
    positions = [text.find(m) for m in marks]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(marks, positions))
    print("\n".join(line for line in text.splitlines() if any(m in line for m in [*marks, "Resumed", "Stopping"])))
    for log in launch.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert sorted(p.name for p in (cluster / "results").glob("*.json")) == sorted(
        p.name for p in (local / "results").glob("*.json")
    )

    def report(root):
        return (root / "report" / "index.md").read_text().replace(str(root), "OUT")

    assert report(cluster) == report(local)
