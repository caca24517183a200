"""Runs two MAE train steps of a tiny model on one global batch under several meshes; prints JSON.

Run in a fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is
fixed when JAX starts), by tests/test_sharding.py.
"""

import json
import sys

import jax
import numpy as np

from afm_jax.train import assembly, sharding
from afm_jax.train.defaults import default_config
from afm_jax.train.tasks import get_task


def tiny_config(data: int, fsdp: int, accum_steps: int = 1, remat: str = "none"):
    config = default_config("mae", "mu/8")
    config.image_size = 32
    config.batch_size = 16
    config.accum_steps = accum_steps
    config.model.width, config.model.num_heads, config.model.depth = 64, 2, 2
    config.model.remat = remat
    config.mae.update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    config.optim.base_lr = 1e-2
    config.mesh.data, config.mesh.fsdp = data, fsdp
    config.sharding.min_fsdp_size = 0  # shard even tiny arrays, so the test exercises FSDP
    return config


def restore_elsewhere(devices: list, workdir: str) -> dict:
    """Saves a state trained on 8 devices with FSDP, restores it on 4 devices (data=2 × fsdp=2)."""
    from afm_jax.train.checkpoint import Checkpointer

    def build(data, fsdp, devs):
        config = tiny_config(data, fsdp)
        task = get_task("mae")
        task.setup(config, workdir="", total_steps=10, steps_per_epoch=5)
        mesh = sharding.make_mesh(config.mesh, devs)
        return mesh, assembly.assemble(config, task, mesh, total_steps=10, warmup_steps=0)

    mesh8, parts8 = build(1, 8, devices)
    state = parts8.initial_state()
    images = np.random.default_rng(0).random((16, 32, 32, 1), dtype=np.float32)
    state, _ = parts8.jit_step(state, sharding.global_batch(mesh8, {"image": images}))
    saved = jax.device_get(state.params)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(1, state, None, {"step": 1})
    ckpt.close()

    mesh4, parts4 = build(2, 2, devices[:4])
    target = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), parts4.abstract_state, parts4.state_shardings
    )
    ckpt = Checkpointer(workdir)
    restored, meta = ckpt.restore(1, target, None)
    ckpt.close()
    diffs = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored.params)))
    ]
    devices_used = {d.id for leaf in jax.tree.leaves(restored.params) for d in leaf.sharding.device_set}
    # and the restored state trains on the new mesh
    restored, metrics = parts4.jit_step(restored, sharding.global_batch(mesh4, {"image": images}))
    return {
        "max_diff": max(diffs),
        "devices_used": sorted(devices_used),
        "step": int(restored.step),
        "loss_after": float(metrics["loss"]),
        "meta_step": meta["step"],
    }


def run(data: int, fsdp: int, devices: list, steps: int = 2) -> dict:
    config = tiny_config(data, fsdp)
    task = get_task("mae")
    task.setup(config, workdir="", total_steps=10, steps_per_epoch=5)
    mesh = sharding.make_mesh(config.mesh, devices)
    parts = assembly.assemble(config, task, mesh, total_steps=10, warmup_steps=0)
    state = parts.initial_state()
    sharded = sorted({str(s.spec) for s in jax.tree.leaves(parts.state_shardings)})
    losses = []
    for i in range(steps):
        images = np.random.default_rng(i).random((16, 32, 32, 1), dtype=np.float32)
        batch = sharding.global_batch(mesh, {"image": images})
        state, metrics = parts.jit_step(state, batch)
        losses.append(float(metrics["loss"]))
    params = jax.device_get(state.params)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    return {
        "losses": losses,
        "param_sum": float(np.sum(flat)),
        "param_abs": float(np.sum(np.abs(flat))),
        "first": [float(x) for x in flat[:64]],
        "specs": sharded,
        "devices": mesh.size,
    }


if __name__ == "__main__":
    devices = jax.devices()
    results = {
        "single": run(1, 1, devices[:1]),
        "data8": run(8, 1, devices),
        "fsdp8": run(1, 8, devices),
        "data2_fsdp4": run(2, 4, devices),
    }
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results["restore_8_to_4"] = restore_elsewhere(devices, tmp)
    print(json.dumps(results))
    sys.stdout.flush()
