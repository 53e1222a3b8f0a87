"""MXFP4-weight matmuls (architecture §5.2): dense and grouped over experts, bf16 / fp32 activations, fp32 accumulation.
Upstream ops: the official fp4_gemm; DeepGEMM m_grouped_fp8_fp4_gemm (grouped)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import resolve, target_platform
from kernels.fp4_matmul import pallas_kernel, reference
from kernels.fp4_matmul.tuning import blocks as tuned_blocks
from kernels.fp4_matmul.reference import grouped_matmul
from v4jax.formats import Mxfp4Weight

__all__ = ["fp4_matmul", "fp4_ragged_dot", "grouped_matmul"]


def _check(name, x, w, weight_ndim):
    if not isinstance(w, Mxfp4Weight):
        raise ValueError(f"{name} wants a v4jax.formats.Mxfp4Weight, got {type(w).__name__}: quantize the weight "
                         "first (v4jax.hub reads the released MXFP4 experts as Mxfp4Weight)")
    if x.ndim != 2 or w.packed.ndim != weight_ndim or x.shape[1] != w.shape[-1]:
        lead = "[e, n, k]" if weight_ndim == 3 else "[n, k]"
        raise ValueError(f"{name} wants x [m, k] and a weight {lead} with the same k; got x {x.shape}, weight "
                         f"{w.shape}")
    if w.scale.dtype != jnp.uint8 or w.scale.shape != (*w.shape[:-1], w.shape[-1] // 32) or w.shape[-1] % 32:
        raise ValueError(f"{name} wants UE8M0 uint8 scales [.., n, k/32] with k a multiple of 32; got scale "
                         f"{w.scale.dtype} {w.scale.shape} for weight {w.shape}")


def _target(op, implementation, backends):
    """-> "reference" or the Pallas target (the backend, or "interpret")."""
    impl = resolve(op, implementation, backends)
    return {"pallas": target_platform(), "pallas_interpret": "interpret", "reference": "reference"}[impl]


def fp4_matmul(x: jax.Array, w: Mxfp4Weight, *, implementation: str | None = None,
               block_sizes: dict | None = None) -> jax.Array:
    """x [m, k] (bf16 / fp32) @ W.T for an MXFP4 weight W [n, k] -> [m, n] fp32 (fp32 accumulation), as
    v4jax.quant.linear computes with the dequantized weight. Differentiable in x only (W is frozen storage).

    implementation (ModelConfig.kernels' values): None / "auto" (the Pallas kernel on GPU / TPU, else the
    reference), "pallas" (error elsewhere), "pallas_interpret" (interpret mode: any backend, slow; for tests)
    or "reference". block_sizes: as tuning.BLOCKS' entries.
    """
    _check("fp4_matmul", x, w, 2)
    target = _target("fp4_matmul", implementation, ("gpu", "tpu"))
    if target == "reference":
        return reference.fp4_matmul(x, w)
    cfg = block_sizes or tuned_blocks(target, x.shape[0], w.shape[0], x.shape[1])
    return pallas_kernel.fp4_matmul(x, w.packed, w.scale, target=target, cfg=cfg)


def fp4_ragged_dot(x: jax.Array, w: Mxfp4Weight, group_sizes: jax.Array, *, implementation: str | None = None,
                   block_sizes: dict | None = None) -> jax.Array:
    """jax.lax.ragged_dot for MXFP4 expert weights in the checkpoint's [out, in] layout: x [m, k] with rows
    sorted by expert, W [e, n, k], group_sizes [e] (sum <= m) -> [m, n] fp32; rows past sum(group_sizes) are
    0. Differentiable in x only. The Pallas kernel is GPU-only ("auto" uses the reference on TPU and CPU)."""
    _check("fp4_ragged_dot", x, w, 3)
    if group_sizes.shape != w.shape[:1]:
        raise ValueError(f"fp4_ragged_dot group_sizes must be [e] = {w.shape[:1]}, got {group_sizes.shape}")
    target = _target("fp4_ragged_dot", implementation, ("gpu",))
    if target == "reference":
        return reference.fp4_ragged_dot(x, w, group_sizes)
    cfg = block_sizes or tuned_blocks(target, x.shape[0], w.shape[1], x.shape[1])
    return pallas_kernel.fp4_ragged_dot(x, w.packed, w.scale, group_sizes, target=target, cfg=cfg)
