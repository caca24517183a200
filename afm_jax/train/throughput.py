"""FLOP accounting: model FLOPs of a compiled step, and the device's peak to divide by (MFU).

The CPU peak is *measured* (a large matmul timed on the same device), accelerators' peaks come from
their data sheets (dense bf16). MFU = step FLOPs / step time / peak over all devices.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

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
