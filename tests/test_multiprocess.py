"""Two local processes (jax.distributed, gloo) train MAE through the launcher; one process resumes."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/ci/multiprocess_mae.py"


def _env():
    return dict(
        os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="", AFM_SALT="test-salt"
    )


@pytest.mark.slow
def test_two_processes_agree_and_a_single_process_resumes(tmp_path):
    workdir = tmp_path / "mp"
    out = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "--config", CONFIG, "--workdir", str(workdir)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert out.returncode == 0, out.stderr[-2000:] + "\n".join(log[-2000:] for log in logs)
    finals = [re.search(r"\[process (\d)/2\] step (\d+) loss ([0-9.]+)", log) for log in logs]
    assert all(finals), logs
    assert [m.group(1) for m in finals] == ["0", "1"]
    assert finals[0].group(2) == finals[1].group(2) == "8"
    assert finals[0].group(3) == finals[1].group(3)  # the same global loss on both
    assert (workdir / "metrics.jsonl").is_file()  # written by process 0 only
    assert not (workdir / "logs" / "process_1.log").read_text().count("step 2/8")

    # The checkpoint written by 2 processes restores in 1 process (other topology) and training goes on.
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "afm_jax.main",
            "--config",
            CONFIG,
            "--workdir",
            str(workdir),
            "--config.total_steps=12",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert "Resumed from" in single.stdout and "at step 8" in single.stdout
    assert "step 12/12" in single.stdout
