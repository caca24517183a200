"""`throughput.matmul_flops` counts what torch's FlopCounterMode counts: 2 per multiply-add of every
matrix product and convolution, walked through nested jaxprs, scans and conds. Expected values are
the textbook counts written out by hand (2·M·N·K for a matmul; 2 · output elements · kernel elements
per output feature for a convolution), not the function's own output."""

import jax
import jax.numpy as jnp

from afm_jax.train import throughput


def test_matmul_and_batched_dot_count_two_flops_per_multiply_add():
    assert throughput.matmul_flops(jnp.matmul, jnp.ones((3, 4)), jnp.ones((4, 5))) == 2 * 3 * 4 * 5
    # attention-shaped: batch 2, heads 3, 7 queries, 11 keys, head dim 8
    qk = throughput.matmul_flops(
        lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k), jnp.ones((2, 7, 3, 8)), jnp.ones((2, 11, 3, 8))
    )
    assert qk == 2 * (2 * 3 * 7 * 11) * 8


def test_patch_convolution_counts_kernel_elements_per_output_feature():
    def patchify(x, w):
        return jax.lax.conv_general_dilated(x, w, (16, 16), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # 2 images of 32² px, 3 channels, 16² patches -> 2·2·2 positions × 8 features, 16·16·3 MACs each
    assert throughput.matmul_flops(patchify, jnp.ones((2, 32, 32, 3)), jnp.ones((16, 16, 3, 8))) == 2 * (
        2 * 2 * 2 * 8
    ) * (16 * 16 * 3)


def test_gradient_nested_jit_scan_and_cond():
    x, w = jnp.ones((3, 4)), jnp.ones((4, 4))
    one = 2 * 3 * 4 * 4
    # forward x@w, backward dL/dw = x.T @ g (dL/dx is not needed): 2 products, inside a nested jit
    assert throughput.matmul_flops(jax.grad(lambda w: jnp.sum(jax.jit(jnp.matmul)(x, w))), w) == 2 * one
    # a scan of 7 products counts 7
    assert (
        throughput.matmul_flops(lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, length=7)[0], x, w) == 7 * one
    )
    # a cond counts its most expensive branch: (x@w)@w, not x@w
    branches = throughput.matmul_flops(lambda p, x, w: jax.lax.cond(p, lambda: x @ w, lambda: (x @ w) @ w), True, x, w)
    assert branches == 2 * one
