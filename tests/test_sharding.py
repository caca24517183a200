"""Sharding: data-parallel and FSDP steps equal the single-device step; placement rules; SLURM layout."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from afm_jax.errors import ConfigError
from afm_jax.train import distributed, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_runs():
    """Two MAE steps under 1 device, data=8, fsdp=8 and data=2×fsdp=4 (8 fake CPU devices)."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "tests/scripts/sharded_steps.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "data2_fsdp4"])
def test_sharded_steps_equal_the_single_device_step(sharded_runs, mesh):
    single, other = sharded_runs["single"], sharded_runs[mesh]
    assert other["devices"] == 8
    np.testing.assert_allclose(other["losses"], single["losses"], rtol=2e-6)
    np.testing.assert_allclose(other["first"], single["first"], atol=2e-6)
    np.testing.assert_allclose(other["param_abs"], single["param_abs"], rtol=2e-6)


def test_fsdp_meshes_really_shard_parameters(sharded_runs):
    assert sharded_runs["data8"]["specs"] == ["P()"]
    assert any("fsdp" in s for s in sharded_runs["fsdp8"]["specs"])


def test_a_checkpoint_from_8_devices_restores_on_4(sharded_runs):
    r = sharded_runs["restore_8_to_4"]
    assert r["max_diff"] == 0.0
    assert r["devices_used"] == [0, 1, 2, 3]
    assert r["step"] == 2 and r["meta_step"] == 1 and np.isfinite(r["loss_after"])


def test_fsdp_spec_picks_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((384, 1536), 8, 0) == P(None, "fsdp")
    assert sharding.fsdp_spec((1536, 384), 8, 0) == P("fsdp", None)
    assert sharding.fsdp_spec((3, 5), 8, 0) == P()  # nothing divides: replicated
    assert sharding.fsdp_spec((384, 1536), 8, 10**7) == P()  # too small to be worth sharding
    assert sharding.fsdp_spec((384, 1536), 1, 0) == P()  # no fsdp axis


def test_rules_first_match_wins_and_explicit_specs_are_checked():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES)
    tree = {
        "encoder": {
            "pos_embed": jax.ShapeDtypeStruct((1, 5, 8), np.float32),
            "fc1": {"kernel": jax.ShapeDtypeStruct((8, 32), np.float32)},
        }
    }
    cfg = ml_collections.ConfigDict(
        dict(rules=(("pos_embed$", "replicated"), ("fc1/kernel$", (None, "fsdp")), (".*", "fsdp")), min_fsdp_size=0)
    )
    specs = sharding.param_shardings(mesh, tree, cfg)
    assert specs["encoder"]["pos_embed"].spec == P()
    assert specs["encoder"]["fc1"]["kernel"].spec == P(None, "fsdp")
    bad = ml_collections.ConfigDict(dict(rules=(("fc1/kernel$", ("fsdp",)),), min_fsdp_size=0))
    with pytest.raises(ConfigError, match="one entry per dimension"):
        sharding.param_shardings(mesh, tree, bad)


def test_mesh_sizes_are_checked_with_messages():
    devices = jax.devices()[:1]
    with pytest.raises(ConfigError, match="at most one"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=-1)), devices)
    with pytest.raises(ConfigError, match="devices"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1)), devices)


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}, list(range(8))),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_LOCALID": "5"}, [5]),
        ({"CUDA_VISIBLE_DEVICES": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_LOCALID": "3"}, [0]),
        (
            {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_LOCALID": "1"},
            [4, 5, 6, 7],
        ),
        ({"SLURM_STEP_TASKS_PER_NODE": "2"}, None),  # no GPUs: CPU job
    ],
)
def test_slurm_gpu_assignment(env, expected):
    assert distributed.slurm_local_device_ids(env) == expected


def test_distributed_is_only_joined_inside_a_multi_task_srun_step():
    srun = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
    }
    assert distributed.in_multi_task_slurm_step(srun)
    assert not distributed.in_multi_task_slurm_step({**srun, "SLURM_STEP_NUM_TASKS": "1"})
    assert not distributed.in_multi_task_slurm_step({k: v for k, v in srun.items() if k != "SLURM_STEP_NODELIST"})
    assert not distributed.initialize(env={})
    with pytest.raises(ConfigError, match="all of"):
        distributed.initialize(coordinator="127.0.0.1:1234", env={})
