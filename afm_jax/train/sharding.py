"""Device mesh and placements: one `Mesh` with axes ("data", "fsdp").

The batch is sharded over both axes. Every array of the train state (params, optimiser moments, a
DINO teacher, ...) is placed by the first matching rule of `config.sharding.rules` (MaxText /
big_vision style: regular expressions over the array's path such as
`opt_state/0/mu/encoder/blocks/3/mlp/fc1/kernel`):

    ("pos_embed$", "replicated")        # keep small or odd arrays whole on every device
    (".*", "fsdp")                      # shard along the largest dimension divisible by the fsdp axis
    ("fc1/kernel$", (None, "fsdp"))     # an explicit PartitionSpec, one entry per dimension

With `mesh.fsdp = 1` every rule amounts to replication, i.e. pure data parallelism. Arrays smaller
than `sharding.min_fsdp_size` elements stay replicated (sharding them costs more than it saves).
Because optimiser moments and teacher params carry the param's path as a suffix, one rule places a
param and everything that mirrors it alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from afm_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = ((".*", "fsdp"),)


def default_sharding_config() -> ml_collections.ConfigDict:
    """`config.sharding`: placement rules (first match wins) and the FSDP size floor."""
    return ml_collections.ConfigDict(dict(rules=DEFAULT_RULES, min_fsdp_size=2**12))


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """Mesh of shape (data, fsdp) from config; one size may be -1, meaning "the rest of the devices"."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp)]
    if sizes.count(-1) > 1:
        raise ConfigError('Config keys `mesh.data`/`mesh.fsdp`: at most one may be -1 ("the rest").')
    known = int(np.prod([s for s in sizes if s != -1]))
    if known <= 0:
        raise ConfigError(f"Config keys `mesh.data`/`mesh.fsdp` = {sizes}: sizes must be positive or -1.")
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"Config key `mesh`: {len(devices)} devices are not divisible by {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"Config key `mesh`: data×fsdp = {sizes[0]}×{sizes[1]} but there are {len(devices)} devices.")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def path_string(path: tuple) -> str:
    """'a/b/0/kernel' for a pytree key path."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return "/".join(names)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Shard the largest dimension divisible by `fsdp_size` over "fsdp" (ties: the last such
    dimension); replicated when none divides or the array is small."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def _spec_for(path: str, shape: Sequence[int], rules: Sequence, fsdp_size: int, min_size: int) -> P:
    for pattern, placement in rules:
        if not re.search(pattern, path):
            continue
        if placement == "replicated" or len(shape) == 0:
            return P()
        if placement == "fsdp":
            return fsdp_spec(shape, fsdp_size, min_size)
        spec = tuple(placement)
        if len(spec) != len(shape):
            raise ConfigError(
                f"Config key `sharding.rules`: rule {pattern!r} gives {spec} for {path} of "
                f"shape {tuple(shape)} (one entry per dimension needed)."
            )
        for dim, axis in zip(shape, spec):
            if axis is not None and dim % dict(data=1, fsdp=fsdp_size).get(axis, 1):
                raise ConfigError(
                    f"Config key `sharding.rules`: {path} dimension {dim} is not divisible by "
                    f"the size of mesh axis {axis!r}."
                )
        return P(*spec)
    return P()


def param_shardings(mesh: Mesh, abstract_tree: Any, sharding_cfg: ml_collections.ConfigDict | None = None) -> Any:
    """A NamedSharding for every leaf of a (train-state) pytree, from the rules (see module doc)."""
    rules = tuple(sharding_cfg.rules) if sharding_cfg is not None else DEFAULT_RULES
    min_size = int(sharding_cfg.min_fsdp_size) if sharding_cfg is not None else 2**12
    fsdp_size = mesh.shape["fsdp"]

    def place(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, _spec_for(path_string(path), shape, rules, fsdp_size, min_size))

    return jax.tree_util.tree_map_with_path(place, abstract_tree)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's local slice (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
