"""A throw-away single-node SLURM for the launcher tests (launch/slurm_local_cluster.sh), and job helpers.

Skipped, with the reason, where SLURM or root is missing; `make test-slurm` sets AFM_REQUIRE_SLURM=1,
which turns the skip into a failure (CI must run these tests, not skip them).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _missing() -> str | None:
    absent = [b for b in ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged") if not shutil.which(b)]
    if absent:
        return f"SLURM not installed ({', '.join(absent)} not found; apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM runs its daemons as root (SlurmUser=root); run as root"
    return None


@dataclasses.dataclass
class Slurm:
    """The running cluster: `env` has SLURM_CONF and what the jobs need (venv, PYTHONPATH, CPU JAX)."""

    env: dict

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(
            list(args),
            env={**self.env, **kw.pop("env", {})},
            capture_output=True,
            text=True,
            timeout=kw.pop("timeout", 60),
            cwd=kw.pop("cwd", REPO),
            **kw,
        )
        assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submits from the repository root (SLURM_SUBMIT_DIR); returns the job id."""
        return self.run("sbatch", "--parsable", *args, env=env or {}).stdout.strip().split(";")[0]

    def states(self, job: str) -> dict[str, str]:
        """{job id (array tasks as A_i): state}."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job], env=self.env, capture_output=True, text=True)
        states = {}
        for line in out.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId")
            key = f"{fields.get('ArrayJobId')}_{task}" if task and fields.get("ArrayJobId") else fields["JobId"]
            states[key] = fields["JobState"]
        return states

    def wait(self, job: str, timeout: float = 300) -> dict[str, str]:
        """Waits until every part of `job` is finished; returns their final states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(job)
            if states and all(s in TERMINAL for s in states.values()):
                return states
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job], env=self.env)
                raise AssertionError(f"job {job} did not finish in {timeout} s: {states}")
            time.sleep(0.5)

    def wait_for(self, predicate, what: str, timeout: float = 240, poll: float = 0.2):
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(poll)
        return value


@pytest.fixture(scope="session")
def slurm():
    reason = _missing()
    if reason:
        if os.environ.get("AFM_REQUIRE_SLURM") == "1":
            pytest.fail(f"AFM_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    directory = tempfile.mkdtemp(prefix="afm-slurm-")
    start = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm_local_cluster.sh"), "start", directory],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, f"local SLURM did not start:\n{start.stdout}\n{start.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", start.stdout).group(1)
    env = dict(
        os.environ,
        SLURM_CONF=conf,
        AFM_VENV=sys.prefix,
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        AFM_SALT="slurm-test-salt",
        PYTHONUNBUFFERED="1",
    )
    try:
        yield Slurm(env)
    finally:
        subprocess.run(["bash", str(REPO / "launch" / "slurm_local_cluster.sh"), "stop", directory], timeout=120)
