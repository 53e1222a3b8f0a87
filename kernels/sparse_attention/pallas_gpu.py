"""Index-list sparse attention with a sink (architecture §3.4.6): the Pallas GPU kernels (Triton lowering), forward
and backward; also what implementation="pallas_interpret" runs on CPU. The custom_vjp, padding and the dkv
segment sum around them are pallas.py's; the TPU kernels are pallas_tpu.py.

One program handles one query (b, s) and one block of its heads: the heads are the M side of every matmul
(V4's heads share one K=V head and one index list per query, as in FlashMLA's sparse kernels), so the same
kernel serves prefill/training (grid b x s x head blocks) and decode (s = 1, all heads in few programs).

Forward: online softmax in fp32 over blocks of block_k indices; the kv rows of a block are gathered inside the
kernel with one vector-indexed load (kv_ref[0, rows, :]); the running max starts at the sink logit and the
running sum at exp(0) = 1, so the sink sits in the denominator only and an all -1 row gives o = 0, lse = sink.
Backward: recomputes p from lse and writes dq plus each slot's kv cotangent (per head block; pallas.py sums them).

Shapes inside: heads padded to a multiple of block_h, d to a power of two (Triton loads need power-of-two
shapes; zero columns change no dot product), k to a multiple of block_k with -1. Indices must be < n (a GPU
load does not clamp the way the reference's gather does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def dot(a, b, trans_b=False):
    """a @ b (or a @ b.T) accumulated in fp32; full fp32 precision for fp32 inputs (no TF32)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _gather_block(idx_ref, kv_ref, j, block_k):
    """The j-th block of the index list and its kv rows: (valid [block_k] bool, keys [block_k, d])."""
    ix = idx_ref[0, 0, pl.ds(j * block_k, block_k)]
    valid = ix >= 0
    return valid, kv_ref[0, jnp.where(valid, ix, 0), :]  # -1 slots read row 0 and are masked out


def _fwd_kernel(idx_ref, q_ref, kv_ref, sink_ref, o_ref, lse_ref, *, scale, block_k, n_blocks):
    q = q_ref[0, 0]  # [block_h, d]
    sink = sink_ref[...]  # [block_h] fp32

    def body(j, carry):
        m, l, acc = carry
        valid, keys = _gather_block(idx_ref, kv_ref, j, block_k)
        z = jnp.where(valid[None, :], dot(q, keys, trans_b=True) * scale, -jnp.inf)  # [block_h, block_k]
        m_new = jnp.maximum(m, jnp.max(z, axis=1))  # finite: m starts at the sink
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(z - m_new[:, None])
        # probabilities meet the values in the kv dtype (bf16 in bf16 runs, like the reference), fp32 accumulation
        acc = acc * alpha[:, None] + dot(p.astype(keys.dtype), keys)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (sink, jnp.ones_like(sink), jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[0, 0] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[0, 0] = m + jnp.log(l)


def _bwd_kernel(idx_ref, q_ref, kv_ref, do_ref, lse_ref, delta_ref, dq_ref, dkv_ref, *, scale, block_k, n_blocks):
    q, do = q_ref[0, 0], do_ref[0, 0]  # [block_h, d]
    lse, delta = lse_ref[0, 0], delta_ref[0, 0]  # [block_h] fp32; delta = sum(o * do) - dlse

    def body(j, dq):
        valid, keys = _gather_block(idx_ref, kv_ref, j, block_k)
        z = dot(q, keys, trans_b=True) * scale
        p = jnp.where(valid[None, :], jnp.exp(z - lse[:, None]), 0.0)  # [block_h, block_k]
        dz = p * (dot(do, keys, trans_b=True) - delta[:, None])
        dkv = scale * dot(dz.T.astype(q.dtype), q) + dot(p.T.astype(do.dtype), do)  # [block_k, d]
        dkv_ref[0, 0, 0, pl.ds(j * block_k, block_k), :] = dkv
        return dq + dot(dz.astype(keys.dtype), keys)

    dq = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[0, 0] = (dq * scale).astype(dq_ref.dtype)


def _compiler_params(cfg, interpret):
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def padded_shape(h: int, d: int, k: int, cfgs: dict) -> tuple[int, int, int]:
    """Heads to the heads block, d to a power of two, k to the index block (blocks are powers of two, so the
    larger of the forward and backward blocks suits both)."""
    bh = max(cfgs["fwd"]["block_h"], cfgs["bwd"]["block_h"])
    bk = max(cfgs["fwd"]["block_k"], cfgs["bwd"]["block_k"])
    return -(-h // bh) * bh, 1 << (d - 1).bit_length(), -(-k // bk) * bk


def forward(q, kv, sink, idx, scale, cfg, interpret):
    """Padded shapes: q [b, s, hp, dp], kv [b, n, dp], sink [hp] fp32, idx [b, s, kp] int32."""
    b, s, hp, dp = q.shape
    bh, bk = cfg["block_h"], cfg["block_k"]
    kp = idx.shape[-1]
    kernel = functools.partial(_fwd_kernel, scale=scale, block_k=bk, n_blocks=kp // bk)
    return pl.pallas_call(
        kernel,
        grid=(b, s, hp // bh),
        in_specs=[pl.BlockSpec((1, 1, kp), lambda i, j, g: (i, j, 0)),
                  pl.BlockSpec((1, 1, bh, dp), lambda i, j, g: (i, j, g, 0)),
                  pl.BlockSpec((1, kv.shape[1], dp), lambda i, j, g: (i, 0, 0)),
                  pl.BlockSpec((bh,), lambda i, j, g: (g,))],
        out_specs=[pl.BlockSpec((1, 1, bh, dp), lambda i, j, g: (i, j, g, 0)),
                   pl.BlockSpec((1, 1, bh), lambda i, j, g: (i, j, g))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, s, hp), jnp.float32)],
        compiler_params=_compiler_params(cfg, interpret), interpret=interpret, name="sparse_attention_fwd",
    )(idx, q, kv, sink)


def backward(q, kv, idx, do, lse, delta, scale, cfg, interpret):
    """-> dq [b, s, hp, dp] and per-slot kv cotangents [b, s, head blocks, kp, dp] fp32."""
    b, s, hp, dp = q.shape
    bh, bk = cfg["block_h"], cfg["block_k"]
    kp, g = idx.shape[-1], hp // bh
    kernel = functools.partial(_bwd_kernel, scale=scale, block_k=bk, n_blocks=kp // bk)
    rows = pl.BlockSpec((1, 1, bh, dp), lambda i, j, h: (i, j, h, 0))
    per_head = pl.BlockSpec((1, 1, bh), lambda i, j, h: (i, j, h))
    return pl.pallas_call(
        kernel,
        grid=(b, s, g),
        in_specs=[pl.BlockSpec((1, 1, kp), lambda i, j, h: (i, j, 0)), rows,
                  pl.BlockSpec((1, kv.shape[1], dp), lambda i, j, h: (i, 0, 0)), rows, per_head, per_head],
        out_specs=[rows, pl.BlockSpec((1, 1, 1, kp, dp), lambda i, j, h: (i, j, h, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, s, g, kp, dp), jnp.float32)],
        compiler_params=_compiler_params(cfg, interpret), interpret=interpret, name="sparse_attention_bwd",
    )(idx, q, kv, do, lse, delta)
