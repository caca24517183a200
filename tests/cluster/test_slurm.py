"""The cluster launchers on a real (local, single-node) SLURM: sbatch, srun, signals, requeue, arrays.

Every job goes through the files a user submits — launch/slurm_multinode.sbatch,
launch/preprocess_array.sbatch, the scripts of `tools/study.py --slurm` — with only sbatch
command-line options (which override #SBATCH lines) and environment variables to fit a CPU node:
2 tasks on one node, jax.distributed initialised from SLURM's variables (afm_jax/train/distributed.py).
Run with `make test-slurm` (root; installs nothing itself — .ci/run does).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO

CONFIG = "configs/ci/multiprocess_mae.py"
STEPS = 40                                   # long enough (~10 s of steps) to signal the job mid-run
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
    job = slurm.sbatch(*CPU_NODE, f"--output={log}", "launch/slurm_multinode.sbatch", CONFIG, str(workdir),
                       f"--config.total_steps={STEPS}")
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
    assert finals[0][1] == finals[1][1]                               # the same global loss on both processes
    assert text.count(f"step {STEPS}/{STEPS} |") == 1                 # console line from process 0 only
    assert "srun: error" not in text and "Traceback" not in text

    # One process, 2 CPU devices, the two hosts' batches side by side: the same global batch every step.
    reference = tmp_path / "one_process"
    out = subprocess.run([sys.executable, "tests/cluster/one_process_reference.py", CONFIG, str(reference), str(STEPS)],
                         cwd=REPO, env=slurm.env,    # same salt, hence the same patient splits
                         capture_output=True, text=True, timeout=400)
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
    marks = ["(restart 0)", "time limit near", f"Stopping at step {step}", "trainer stopped; requeueing", "(restart 1)",
             f"at step {step}.", f"step {STEPS}/{STEPS}", f"[process 0/2] step {STEPS} loss"]
    positions = [text.find(m) for m in marks]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(marks, positions))
    assert re.search(rf"Resumed from \S+ at step {step}\.", text)
    assert "(restart 2)" not in text and "Traceback" not in text
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert step in saved or max(saved) == STEPS
    worst = assert_same_params(read_params(workdir, STEPS), read_params(uninterrupted[0], STEPS))
    print(f"requeued job vs uninterrupted job: max |param difference| = {worst}")
