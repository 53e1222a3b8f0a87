"""Index-list sparse attention with a sink (architecture §3.4.6): the Pallas TPU (Mosaic) kernels, forward and backward.
The math and the custom_vjp around them are pallas.py's; the GPU kernels are pallas_gpu.py.

Mosaic has no vector-indexed load from a ref, so kv stays in HBM (memory space ANY) and each block of block_k
index slots is fetched row by row with DMAs into a VMEM scratch [block_k, d]: the slot numbers come from an SMEM
copy of the query's index list (scalar reads give the DMA addresses), the validity mask from a VMEM copy. One
program is one query with all its heads (TPU blocks must be (8, 128)-aligned or whole dimensions: the heads are
whole), grid b x s; heads are padded to a multiple of 8 and d to a multiple of 128. The DMAs of a block are
started together and waited on before its matmuls (no double buffering yet). The row buffer is 32-bit: Mosaic
packs two 16-bit rows per sublane, so a DMA into one bf16 row at an odd offset does not compile (found by
compiling for a TPU topology with libtpu); 16-bit kv is widened to fp32 for the gather (exact) and the rows are
narrowed back before the matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.sparse_attention.pallas_gpu import dot


def padded_shape(h: int, d: int, k: int, cfgs: dict) -> tuple[int, int, int]:
    """Heads to a multiple of 8 (sublanes), d to a multiple of 128 (lanes), k to the index block."""
    bk = max(cfgs["fwd"]["block_k"], cfgs["bwd"]["block_k"])
    return -(-h // 8) * 8, -(-d // 128) * 128, -(-k // bk) * bk


def _gather(idx_smem, kv_hbm, keys, sem, j, block_k):
    """DMA the kv rows of index block j of this query into keys [block_k, d] (-1 slots fetch row 0)."""
    b = pl.program_id(0)

    def copy(r):
        row = jnp.maximum(idx_smem[0, 0, 0, j * block_k + r], 0)
        return pltpu.make_async_copy(kv_hbm.at[b, pl.ds(row, 1)], keys.at[pl.ds(r, 1)], sem)

    jax.lax.fori_loop(0, block_k, lambda r, c: (copy(r).start(), c)[1], 0)
    jax.lax.fori_loop(0, block_k, lambda r, c: (copy(r).wait(), c)[1], 0)
    return keys[...]


def _valid(idx_ref, j, block_k):
    return idx_ref[0, 0, :, pl.ds(pl.multiple_of(j * block_k, block_k), block_k)] >= 0  # [1, block_k]


def _fwd_kernel(idx_smem, idx_ref, q_ref, kv_hbm, sink_ref, o_ref, lse_ref, keys_buf, sem, *, scale, block_k,
                n_blocks):
    q = q_ref[0, 0]  # [h, d]
    sink = sink_ref[0]  # [h] fp32

    def body(j, carry):  # online softmax, as pallas_gpu._fwd_kernel
        m, l, acc = carry
        keys = _gather(idx_smem, kv_hbm, keys_buf, sem, j, block_k).astype(q.dtype)
        z = jnp.where(_valid(idx_ref, j, block_k), dot(q, keys, trans_b=True) * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(z - m_new[:, None])
        acc = acc * alpha[:, None] + dot(p.astype(keys.dtype), keys)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, (sink, jnp.ones_like(sink), jnp.zeros(q.shape, jnp.float32)))
    o_ref[0, 0] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[0, 0, 0] = m + jnp.log(l)


def _bwd_kernel(idx_smem, idx_ref, q_ref, kv_hbm, do_ref, lse_ref, delta_ref, dq_ref, dkv_ref, keys_buf, sem, *,
                scale, block_k, n_blocks):
    q, do = q_ref[0, 0], do_ref[0, 0]  # [h, d]
    lse, delta = lse_ref[0, 0, 0], delta_ref[0, 0, 0]  # [h] fp32; delta = sum(o * do) - dlse

    def body(j, dq):  # as pallas_gpu._bwd_kernel
        keys = _gather(idx_smem, kv_hbm, keys_buf, sem, j, block_k).astype(q.dtype)
        z = dot(q, keys, trans_b=True) * scale
        p = jnp.where(_valid(idx_ref, j, block_k), jnp.exp(z - lse[:, None]), 0.0)
        dz = p * (dot(do, keys, trans_b=True) - delta[:, None])
        rows = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        dkv_ref[0, 0, rows, :] = scale * dot(dz.T.astype(q.dtype), q) + dot(p.T.astype(do.dtype), do)
        return dq + dot(dz.astype(keys.dtype), keys)

    dq = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[0, 0] = (dq * scale).astype(dq_ref.dtype)


def _call(kernel, ins, out_shape, out_specs, q, kv, idx, cfg, interpret, name):
    """pallas_call over (b, s) with the index list in SMEM and VMEM, kv in HBM and a [block_k, d] row buffer."""
    b, s, hp, dp = q.shape
    kp, bk = idx.shape[-1], cfg["block_k"]
    idx4 = idx[:, :, None, :]  # [b, s, 1, kp]: the last two block dims are then whole dimensions
    per_query = lambda *shape: pl.BlockSpec((1, 1, *shape), lambda i, j: (i, j) + (0,) * len(shape))  # noqa: E731
    specs = {"q": per_query(hp, dp), "kv": pl.BlockSpec(memory_space=pl.ANY), "sink": pl.BlockSpec((1, hp),
             lambda i, j: (0, 0)), "heads": per_query(1, hp)}
    return pl.pallas_call(
        functools.partial(kernel, scale=cfg["scale"], block_k=bk, n_blocks=kp // bk),
        grid=(b, s),
        in_specs=[pl.BlockSpec((1, 1, 1, kp), lambda i, j: (i, j, 0, 0), memory_space=pltpu.SMEM),
                  per_query(1, kp)] + [specs[kind] for kind, _ in ins],
        out_specs=[per_query(*spec) for spec in out_specs],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bk, dp), jnp.float32), pltpu.SemaphoreType.DMA(())],
        interpret=pltpu.InterpretParams() if interpret else False, name=name,
    )(idx4, idx4, *(a.astype(jnp.float32) if kind == "kv" else a for kind, a in ins))


def forward(q, kv, sink, idx, scale, cfg, interpret):
    """Padded q [b, s, hp, dp], kv [b, n, dp], sink [hp] fp32, idx [b, s, kp] -> o, lse [b, s, hp] fp32."""
    b, s, hp, dp = q.shape
    o, lse = _call(_fwd_kernel, [("q", q), ("kv", kv), ("sink", sink[None])],
                   [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, s, 1, hp), jnp.float32)],
                   [(hp, dp), (1, hp)], q, kv, idx, {**cfg, "scale": scale}, interpret, "sparse_attention_fwd")
    return o, lse[:, :, 0]


def backward(q, kv, idx, do, lse, delta, scale, cfg, interpret):
    """-> dq [b, s, hp, dp] and per-slot kv cotangents [b, s, 1, kp, dp] fp32 (one head block: all heads)."""
    b, s, hp, dp = q.shape
    kp = idx.shape[-1]
    dq, parts = _call(_bwd_kernel, [("q", q), ("kv", kv), ("q", do), ("heads", lse[:, :, None]),
                                    ("heads", delta[:, :, None])],
                      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, s, kp, dp), jnp.float32)],
                      [(hp, dp), (kp, dp)], q, kv, idx, {**cfg, "scale": scale}, interpret, "sparse_attention_bwd")
    return dq, parts[:, :, None]
