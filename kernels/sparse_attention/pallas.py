"""Index-list sparse attention with a sink (architecture §3.4.6) through Pallas kernels: the custom_vjp that joins the
forward and backward kernels of a target (pallas_gpu.py: Triton; pallas_tpu.py: Mosaic), padding, and dkv.

Backward math (z = scale q.k, p = exp(z - lse), delta = sum(o * do)): with cotangents do on o and dlse on lse,
dz = p * (dp - delta + dlse) where dp = do.kv (d lse / dz = p), and the sink, which has no value,
gets dsink = sum over queries of p_sink * (dlse - delta), p_sink = exp(sink - lse) (jnp: [b, s, h] work).

dkv: the backward kernel writes each (query, head block, slot)'s kv cotangent scale * dz^T q + p^T do, fp32,
and an XLA scatter-add (a segment sum over the index lists; -1 slots dropped) adds them into kv rows. Scratch:
b * s * n_head_blocks * k * d * 4 bytes (attn_chunk = 256 queries, k = 640, d = 512, one head block: 335 MB
per batch row), the order of the gathered keys the reference's autodiff keeps; no atomics, so deterministic.
Residuals are q, kv, o, lse only: no [s, k, d] gathered keys are kept between forward and backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.sparse_attention import pallas_gpu, pallas_tpu
from kernels.sparse_attention.tuning import blocks as tuned_blocks

# target -> (kernel module, interpret mode)
TARGETS = {"gpu": (pallas_gpu, False), "tpu": (pallas_tpu, False),
           "gpu_interpret": (pallas_gpu, True), "tpu_interpret": (pallas_tpu, True)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, kv, sink, idx, scale, cfgs, target):
    kernels, interpret = TARGETS[target]
    return kernels.forward(q, kv, sink, idx, scale, dict(cfgs[0]), interpret)


def _attention_fwd(q, kv, sink, idx, scale, cfgs, target):
    kernels, interpret = TARGETS[target]
    o, lse = kernels.forward(q, kv, sink, idx, scale, dict(cfgs[0]), interpret)
    return (o, lse), (q, kv, sink, idx, o, lse)


def _attention_bwd(scale, cfgs, target, res, cts):
    kernels, interpret = TARGETS[target]
    q, kv, sink, idx, o, lse = res
    do, dlse = cts
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse  # [b, s, hp]
    dq, parts = kernels.backward(q, kv, idx, do.astype(q.dtype), lse, delta, scale, dict(cfgs[1]), interpret)
    b, n = kv.shape[:2]
    rows = jnp.where(idx >= 0, idx, n)  # -1 slots point past the end: dropped
    dkv = jnp.zeros(kv.shape, jnp.float32).at[jnp.arange(b)[:, None, None], rows].add(
        jnp.sum(parts, axis=2), mode="drop")
    dsink = -jnp.sum(jnp.exp(sink - lse) * delta, axis=(0, 1))
    return dq, dkv.astype(kv.dtype), dsink, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, kv, sink, idx):
    if q.ndim != 4 or kv.ndim != 3 or idx.ndim != 3 or sink.ndim != 1:
        raise ValueError(f"sparse_attention wants q [b, s, h, d], kv [b, n, d], sink [h], idx [b, s, k]; got "
                         f"q {q.shape}, kv {kv.shape}, sink {sink.shape}, idx {idx.shape}")
    b, s, h, d = q.shape
    if kv.shape[0] != b or kv.shape[2] != d or sink.shape[0] != h or idx.shape[:2] != (b, s):
        raise ValueError(f"sparse_attention shapes disagree: q {q.shape}, kv {kv.shape}, sink {sink.shape}, "
                         f"idx {idx.shape}; kv must be [b, n, d], sink [h] and idx [b, s, k] for q [b, s, h, d]")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"sparse_attention idx must be integer kv row numbers (-1 = unused), got {idx.dtype}")


def sparse_attention(q, kv, sink, idx, scale: float, return_lse: bool = False, *, target: str = "gpu",
                     block_sizes: dict | None = None):
    """reference.sparse_attention's contract (q [b, s, h, d], kv [b, n, d], sink [h], idx [b, s, k], -1 = unused
    -> o [b, s, h, d] and, with return_lse, lse [b, s, h] fp32) through the Pallas kernels of `target` (a key
    of TARGETS; *_interpret run in Pallas interpret mode on any backend, slowly), differentiable in q, kv and
    sink (the lse output too). block_sizes: {"fwd": {...}, "bwd": {...}} as in tuning.BLOCKS, default the
    table's for the target."""
    if target not in TARGETS:
        raise ValueError(f"sparse_attention Pallas target {target!r} is unknown: use one of {sorted(TARGETS)}")
    _check(q, kv, sink, idx)
    b, s, h, d = q.shape
    k = idx.shape[-1]
    cfgs = block_sizes or tuned_blocks(target, h, k)
    hp, dp, kp = TARGETS[target][0].padded_shape(h, d, k, cfgs)
    dtype = jnp.result_type(q.dtype, kv.dtype)
    qp = jnp.pad(q.astype(dtype), [(0, 0), (0, 0), (0, hp - h), (0, dp - d)])  # zero heads / columns: inert
    kvp = jnp.pad(kv.astype(dtype), [(0, 0), (0, 0), (0, dp - d)])
    sinkp = jnp.pad(sink.astype(jnp.float32), (0, hp - h))
    idxp = jnp.pad(idx.astype(jnp.int32), [(0, 0), (0, 0), (0, kp - k)], constant_values=-1)
    frozen = tuple(tuple(sorted(cfgs[side].items())) for side in ("fwd", "bwd"))
    o, lse = _attention(qp, kvp, sinkp, idxp, float(scale), frozen, target)
    o, lse = o[:, :, :h, :d].astype(q.dtype), lse[:, :, :h]
    return (o, lse) if return_lse else o
