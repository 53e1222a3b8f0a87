"""MXFP4-weight matmuls, pure jnp: the spec, the CPU path and the oracle of the Pallas kernels. Upstream ops:
the official `fp4_gemm` (kernel.py, FP4 expert weights times FP8 activations) and DeepGEMM's
m_grouped_fp8_fp4_gemm for the grouped (MoE) form.

Weights are v4jax.formats.Mxfp4Weight (architecture §5.2): `packed` uint8 [.., n, k/2], two e2m1 codes per byte along
k (low nibble = even element), `scale` uint8 UE8M0 exponents [.., n, k/32]: W = e2m1 * 2^(scale - 127).
The reference decodes with Mxfp4Weight.dequantize itself, rounds W to the activation dtype (exact: e2m1 times
a power of two fits bf16) and multiplies with fp32 accumulation, as v4jax.quant.linear and moe._ragged do.

Also here: `grouped_matmul`, the grouped matmul of dense weights every MoE path runs on (ragged_dot on GPU / TPU,
tiles on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import target_platform
from v4jax.formats import Mxfp4Weight, QuantizedWeight
from v4jax.numerics import einsum, in_batch_invariant


def fp4_matmul(x: jax.Array, w: Mxfp4Weight) -> jax.Array:
    """x [m, k] @ W[n, k].T -> [m, n] fp32."""
    return einsum("mk,nk->mn", x, w.dequantize(jnp.float32).astype(x.dtype))


def fp4_ragged_dot(x: jax.Array, w: Mxfp4Weight, group_sizes: jax.Array) -> jax.Array:
    """Rows of x [m, k] sorted by group, group g's rows times W[g].T: W [e, n, k], group_sizes [e] -> [m, n]
    fp32 (rows past sum(group_sizes) are 0), jax.lax.ragged_dot's contract with [out, in] weights: the
    weight decoded by grouped_matmul (on CPU one selected expert at a time)."""
    return grouped_matmul(x, w, group_sizes)


def _decoded(w, dtype) -> jax.Array:
    """A weight (array or stored QuantizedWeight) as an array of `dtype`."""
    return (w.dequantize(jnp.float32) if isinstance(w, QuantizedWeight) else w).astype(dtype)


def grouped_matmul(a: jax.Array, w: jax.Array, sizes: jax.Array, tile: int = 128) -> jax.Array:
    """a [m, in] (rows sorted by group), w [e, out, in] (an array or a stored QuantizedWeight, decoded to a's
    dtype), sizes [e] -> [m, out] fp32: row r times its group's weight; rows past sum(sizes) give 0.
    `jax.lax.ragged_dot` on GPU / TPU. XLA:CPU lowers ragged_dot densely (every group over every row: e times the
    work and an [e, m, out] buffer; measured: 16 groups cost 33x one), so on CPU the rows go in tiles and each
    (tile, group) pair that overlaps is one small matmul (megablox's schedule, in jnp), each slicing (and
    decoding) only its group's weight: a loop over m / tile + e slots (the unused tail repeats the last group,
    masked; a lax.cond to skip it deadlocked the collectives of 8 CPU devices sharing 2 cores under shard_map).
    Fewer rows than groups (decode) take each row's own group's weight instead, gathered: a step reads only the
    experts its tokens picked."""
    if target_platform() != "cpu":
        return jax.lax.ragged_dot(a, jnp.swapaxes(_decoded(w, a.dtype), 1, 2), sizes,
                                  preferred_element_type=jnp.float32)
    m, e = a.shape[0], w.shape[0]
    end = jnp.cumsum(sizes)
    if m < e and not in_batch_invariant():  # decode: fewer rows than experts, each row times its own expert
        group = jnp.minimum(jnp.searchsorted(end, jnp.arange(m), side="right"), e - 1)
        wg = _decoded(jax.tree.map(lambda x: x[group], w), a.dtype)
        return jnp.where((jnp.arange(m) < end[-1])[:, None], einsum("ri,roi->ro", a, wg), 0.0)
    tile = min(tile, -(-m // 8) * 8)  # a few rows (batched decode): small tiles
    n_tiles = -(-m // tile)
    a = jnp.pad(a, ((0, n_tiles * tile - m), (0, 0)))
    start = end - sizes
    count = jnp.where(sizes > 0, (end - 1) // tile - start // tile + 1, 0)  # tiles group g overlaps
    item_end = jnp.cumsum(count)
    item = jnp.arange(n_tiles + e)  # work items: (tile, group) pairs in group order; the tail is unused
    group = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), e - 1)
    used = item < item_end[-1]
    tile_of = jnp.where(used, start[group] // tile + item - (item_end - count)[group], 0)

    def weight_of(g):
        return _decoded(jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, g, keepdims=False), w), a.dtype)

    @jax.checkpoint  # backward recomputes each item: no per-item copy of the group's weight is saved
    def one(t, g, ok):
        rows = t * tile + jnp.arange(tile)
        y = einsum("ri,oi->ro", jax.lax.dynamic_slice_in_dim(a, t * tile, tile), weight_of(g))
        return jnp.where((ok & (rows >= start[g]) & (rows < end[g]))[:, None], y, 0.0)

    def add_item(i, out):  # accumulated in place: no [items, tile, out] stack, forward or backward
        return out.at[tile_of[i]].add(one(tile_of[i], group[i], used[i]))

    # Item 0 starts the sum outside the loop: the carry then has the operands' type (varying under shard_map).
    out = add_item(0, jnp.zeros((n_tiles, tile, w.shape[1]), jnp.float32))
    out = jax.lax.fori_loop(1, n_tiles + e, add_item, out)
    return out.reshape(n_tiles * tile, -1)[:m]
