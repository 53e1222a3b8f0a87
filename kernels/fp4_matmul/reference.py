"""MXFP4-weight matmuls, pure jnp: the spec, the CPU path and the oracle of the Pallas kernels. Upstream ops:
the official `fp4_gemm` (kernel.py, FP4 expert weights times FP8 activations) and DeepGEMM's
m_grouped_fp8_fp4_gemm for the grouped (MoE) form.

Weights are v4jax.quant.Mxfp4Weight (spec §5.2): `packed` uint8 [.., n, k/2], two e2m1 codes per byte along
k (low nibble = even element), `scale` uint8 UE8M0 exponents [.., n, k/32]: W = e2m1 * 2^(scale - 127).
The reference decodes with Mxfp4Weight.dequantize itself, rounds W to the activation dtype (exact: e2m1 times
a power of two fits bf16) and multiplies with fp32 accumulation, as v4jax.quant.linear and moe._ragged do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.quant import Mxfp4Weight, einsum, grouped_matmul


def fp4_matmul(x: jax.Array, w: Mxfp4Weight) -> jax.Array:
    """x [m, k] @ W[n, k].T -> [m, n] fp32."""
    return einsum("mk,nk->mn", x, w.dequantize(jnp.float32).astype(x.dtype))


def fp4_ragged_dot(x: jax.Array, w: Mxfp4Weight, group_sizes: jax.Array) -> jax.Array:
    """Rows of x [m, k] sorted by group, group g's rows times W[g].T: W [e, n, k], group_sizes [e] -> [m, n]
    fp32 (rows past sum(group_sizes) are 0), jax.lax.ragged_dot's contract with [out, in] weights: the
    dequantized weight through the model's grouped matmul (v4jax.quant.grouped_matmul)."""
    return grouped_matmul(x, w.dequantize(jnp.float32).astype(x.dtype), group_sizes)
