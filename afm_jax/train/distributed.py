"""Joins a multi-process job with JAX's own runtime (`jax.distributed.initialize`); no launcher protocol.

Three ways a process learns it is part of a job, in this order:
1. explicit flags `--coordinator host:port --num_processes N --process_id i` (any machine; the CPU
   test and `launch/local_multiprocess.sh` use them);
2. SLURM: inside an `srun` step with more than one task, everything comes from SLURM's variables.
   JAX's own SLURM detection pins each process to GPU `SLURM_LOCALID`, which is right for one task
   per GPU but would leave 7 of 8 GPUs idle with one task per node; `slurm_local_device_ids`
   chooses the GPUs for either layout;
3. otherwise: a single process, nothing to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax

from afm_jax.errors import ConfigError


def _first_count(tasks_per_node: str) -> int:
    """'8(x2)' / '4,4' / '8' -> tasks on this kind of node (SLURM's compressed lists)."""
    match = re.match(r"\s*(\d+)", tasks_per_node)
    if not match:
        raise ValueError(f"Cannot read a task count from {tasks_per_node!r}.")
    return int(match.group(1))


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """GPU ordinals (as this process sees them) that the process should drive, or None (CPU/all).

    - one task per node: every visible GPU;
    - SLURM bound one GPU to each task (`--gpus-per-task=1`): the one visible GPU, ordinal 0;
    - each task sees all GPUs of its node: an equal contiguous share by `SLURM_LOCALID`.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        num_visible = len([v for v in visible.split(",") if v.strip()])
    elif env.get("SLURM_GPUS_ON_NODE"):
        num_visible = int(env["SLURM_GPUS_ON_NODE"])
    else:
        return None
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    tasks_on_node = _first_count(per_node)
    if tasks_on_node <= 1:
        return list(range(num_visible))
    if num_visible == 1:
        return [0]
    share, rest = divmod(num_visible, tasks_on_node)
    if share == 0 or rest:
        raise ConfigError(
            f"SLURM gives {tasks_on_node} tasks per node but {num_visible} visible GPUs; use one "
            "task per node or one task per GPU (see docs/cluster.md)."
        )
    local = int(env.get("SLURM_LOCALID", "0"))
    return list(range(local * share, (local + 1) * share))


def in_multi_task_slurm_step(env: Mapping[str, str]) -> bool:
    """True inside an `srun` step of several tasks (not in the sbatch script itself)."""
    if env.get("AFM_NO_DISTRIBUTED") == "1":
        return False
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    return all(k in env for k in needed) and int(tasks) > 1


def initialize(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when this process is part of a job; True if it did."""
    env = os.environ if env is None else env
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("Give all of --coordinator, --num_processes and --process_id (or none, under SLURM).")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id {process_id} is not in [0, --num_processes={num_processes}).")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if in_multi_task_slurm_step(env):
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids(env))
        return True
    return False
