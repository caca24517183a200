"""FLOP accounting: model FLOPs of a compiled step, and the device's peak to divide by (MFU).

The CPU peak is *measured* (a large matmul timed on the same device), accelerators' peaks come from
their data sheets (dense bf16). MFU = step FLOPs / step time / peak over all devices.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

# Dense bf16 tensor-core peaks, FLOP/s per device (vendor data sheets, no sparsity).
PEAK_FLOPS_BY_DEVICE_KIND = {
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
}


def compiled_flops(compiled: jax.stages.Compiled, num_devices: int = 1) -> float | None:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (None if unavailable).

    For a function partitioned over several devices (SPMD) XLA counts the FLOPs of *one device's*
    program; pass `num_devices` (the mesh size) to get the whole step's."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends don't implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"]) * num_devices


def measure_matmul_flops(
    size: int = 2048, dtype=jnp.float32, repeats: int = 5, device: jax.Device | None = None
) -> float:
    """Achieved FLOP/s of a (size × size) @ (size × size) matmul on one device: the practical ceiling."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    b = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def device_peak_flops(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_matmul_flops(device=device), "measured fp32 matmul"
    kind = getattr(device, "device_kind", "")
    if kind in PEAK_FLOPS_BY_DEVICE_KIND:
        return PEAK_FLOPS_BY_DEVICE_KIND[kind], f"data sheet ({kind})"
    return measure_matmul_flops(size=8192, dtype=jnp.bfloat16, device=device), f"measured bf16 matmul ({kind})"


def matmul_flops(fn, *args, **kwargs) -> float:
    """FLOPs of the matrix products one call of ``fn(*args, **kwargs)`` asks for, counted on its jaxpr.

    Counts ``dot_general`` and ``conv_general_dilated`` only, 2 per multiply-add — the convention of
    PyTorch's ``torch.utils.flop_counter.FlopCounterMode``, so a JAX step and its PyTorch peer can be
    checked to do the same matmul work. XLA's ``cost_analysis`` (``compiled_flops``) also counts
    elementwise work and fusion-dependent extras, so it is not comparable to the torch count.
    Nested jaxprs (jit, remat, custom_jvp/vjp) are walked; a ``scan`` counts its body ``length``
    times, a ``cond`` its most expensive branch, a ``while`` loop its body once (the trip count is
    not known statically)."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return float(_jaxpr_matmul_flops(closed.jaxpr))


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _jaxpr_matmul_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * _prod(eqn.outvars[0].aval.shape) * _prod(lhs[i] for i in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * _prod(eqn.outvars[0].aval.shape) * (_prod(rhs) // out_features)
        elif name == "cond":
            total += max(_jaxpr_matmul_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            repeat = eqn.params["length"] if name == "scan" else 1
            for sub in _sub_jaxprs(eqn.params):
                total += repeat * _jaxpr_matmul_flops(sub)
    return total


def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item
