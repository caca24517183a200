"""Device mesh and placements: one `Mesh` with axes ("data", "fsdp").

The batch is sharded over both axes; parameters are replicated here (pure data parallelism). FSDP
placement by regex rules over parameter paths plugs in at `param_shardings` (scale-out issue).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """Mesh of shape (data, fsdp) from config; one size may be -1, meaning "the rest of the devices"."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp)]
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one of data/fsdp may be -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh: {len(devices)} devices are not divisible by {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"config.mesh: data×fsdp = {sizes[0]}×{sizes[1]} but there are {len(devices)} devices.")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """Placement for every leaf of a (train-state) pytree: replicated for data parallelism."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_tree)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's local slice (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
