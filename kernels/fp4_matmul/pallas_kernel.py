"""MXFP4-weight matmuls as Pallas kernels: dense (GPU Triton; TPU Mosaic) and grouped over experts (GPU Triton),
each with a backward kernel for dx (on TPU dx runs in XLA), plus CPU tests in interpret mode. The math is
reference.py's.

Hopper and TPU have no FP4 matmul units, so the weights are decoded in-kernel: each packed [rows, block_k / 2]
byte tile splits into its low (even-k) and high (odd-k) nibbles, each nibble is decoded arithmetically (e2m1:
sign bit, 2-bit exponent, 1-bit mantissa), multiplied by its UE8M0 scale (built from the exponent bits) and
rounded to the activation dtype (exact). Instead of interleaving the two halves back into k order, the
activations come split the same way (even and odd columns, one XLA copy outside), so a step is two dots:
x_even @ lo.T + x_odd @ hi.T, fp32 accumulation. HBM traffic for the weights stays at 0.53 bytes per weight.
The Blackwell block-scaled path is not here: Pallas' Triton backend has no scaled dot (Triton's dot_scaled needs
jax-triton), and a Mosaic GPU tcgen05 kernel could not be run or checked without a Blackwell device.

Grouped (jax.lax.ragged_dot's contract, rows sorted by expert): the row tiles are enumerated per group in XLA
(a tile crossing a group boundary is visited once per group: at most m / block_m + e work items), each
program reads its (group, tile, row range) and stores only its group's rows (masked stores), so no
accumulation between programs and no atomics. Triton only: Pallas' Triton backend has no scalar prefetch,
so the kernel indexes the weights by its group itself; a TPU version (scalar-prefetched group ids in the
BlockSpecs, as megablox does) is not written.

Backward: the weights are frozen quantized storage, so only dx = dy @ W, the same decode with the dot
transposed (x's even / odd column halves come out separately and are interleaved in XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from v4jax.formats import Mxfp4Weight


def _dot(a, b, trans_b=False):
    """a @ b (or a @ b.T) accumulated in fp32; full fp32 precision for fp32 inputs (no TF32)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _e2m1(code):
    """int32 e2m1 codes 0..15 -> fp32 values: magnitude 0.5 * m for exponent 0, else (1 + m / 2) * 2^(e - 1)."""
    e, m = (code >> 1) & 3, (code & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (2.0 + m) * (jnp.left_shift(1, e)).astype(jnp.float32) * 0.25)
    return jnp.where((code & 8) != 0, -mag, mag)  # code 8 is -0.0, as the lookup table has it


def _decode(packed, scale, dtype):
    """packed uint8 [r, c], scale uint8 [r, c / 16] -> (even-k, odd-k) weights [r, c] in dtype."""
    s = scale.astype(jnp.int32)
    # 2^(s - 127) from the exponent bits; s = 0 is the subnormal 2^-127, s = 255 gives inf like ldexp
    sf = jax.lax.bitcast_convert_type(jnp.where(s == 0, 1 << 22, s << 23), jnp.float32)
    r, g = sf.shape
    sf = jnp.broadcast_to(sf[:, :, None], (r, g, 16)).reshape(r, g * 16)  # one scale per 16 packed bytes
    p = packed.astype(jnp.int32)
    return (_e2m1(p & 15) * sf).astype(dtype), (_e2m1(p >> 4) * sf).astype(dtype)


def _fwd_kernel(xe_ref, xo_ref, p_ref, s_ref, o_ref, *, bk2, n_k):
    """xe/xo_ref [bm, k/2] even / odd columns of x, p_ref [bn, k/2], s_ref [bn, k/32] -> o_ref [bm, bn]."""
    def step(kk, acc):
        cols, scols = pl.ds(kk * bk2, bk2), pl.ds(kk * (bk2 // 16), bk2 // 16)
        xe = xe_ref[:, cols]
        lo, hi = _decode(p_ref[:, cols], s_ref[:, scols], xe.dtype)
        return acc + _dot(xe, lo, trans_b=True) + _dot(xo_ref[:, cols], hi, trans_b=True)

    o_ref[...] = jax.lax.fori_loop(0, n_k, step, jnp.zeros(o_ref.shape, jnp.float32))


def _bwd_kernel(dy_ref, p_ref, s_ref, dxe_ref, dxo_ref, *, bn, n_n):
    """dy_ref [bm, n], p_ref [n, bk/2], s_ref [n, bk/32] -> dx even / odd columns [bm, bk/2]."""
    def step(j, acc):
        rows = pl.ds(j * bn, bn)
        dy = dy_ref[:, rows]
        lo, hi = _decode(p_ref[rows, :], s_ref[rows, :], dy.dtype)
        return acc[0] + _dot(dy, lo), acc[1] + _dot(dy, hi)

    zero = jnp.zeros(dxe_ref.shape, jnp.float32)
    dxe, dxo = jax.lax.fori_loop(0, n_n, step, (zero, zero))
    dxe_ref[...], dxo_ref[...] = dxe.astype(dxe_ref.dtype), dxo.astype(dxo_ref.dtype)


def _compiler_params(cfg, target):
    if target != "gpu":
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _split(x):
    """[m, k] -> its even and odd columns, each [m, k / 2]."""
    x2 = x.reshape(x.shape[0], -1, 2)
    return x2[..., 0], x2[..., 1]


def _interleave(even, odd):
    return jnp.stack([even, odd], axis=-1).reshape(even.shape[0], -1)


def _forward(x, packed, scale, cfg, target):
    """Padded shapes: x [mp, kp], packed [np, kp / 2], scale [np, kp / 32] -> [mp, np] fp32."""
    (mp, kp), n_p = x.shape, packed.shape[0]
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    k2 = kp // 2
    kernel = functools.partial(_fwd_kernel, bk2=bk // 2, n_k=kp // bk)
    x_spec = pl.BlockSpec((bm, k2), lambda i, j: (i, 0))
    return pl.pallas_call(
        kernel, grid=(mp // bm, n_p // bn),
        in_specs=[x_spec, x_spec, pl.BlockSpec((bn, k2), lambda i, j: (j, 0)),
                  pl.BlockSpec((bn, kp // 32), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n_p), jnp.float32),
        compiler_params=_compiler_params(cfg, target), interpret=target == "interpret", name="fp4_matmul_fwd",
    )(*_split(x), packed, scale)


def _backward(dy, packed, scale, dtype, cfg, target):
    """dy [mp, np] -> dx [mp, kp] in dtype."""
    (mp, n_p), kp = dy.shape, 2 * packed.shape[1]
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    kernel = functools.partial(_bwd_kernel, bn=bn, n_n=n_p // bn)
    half = pl.BlockSpec((bm, bk // 2), lambda i, kk: (i, kk))
    dxe, dxo = pl.pallas_call(
        kernel, grid=(mp // bm, kp // bk),
        in_specs=[pl.BlockSpec((bm, n_p), lambda i, kk: (i, 0)),
                  pl.BlockSpec((n_p, bk // 2), lambda i, kk: (0, kk)),
                  pl.BlockSpec((n_p, bk // 32), lambda i, kk: (0, kk))],
        out_specs=[half, half], out_shape=[jax.ShapeDtypeStruct((mp, kp // 2), dtype)] * 2,
        compiler_params=_compiler_params(cfg, target), interpret=target == "interpret", name="fp4_matmul_bwd",
    )(dy.astype(dtype), packed, scale)
    return _interleave(dxe, dxo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _matmul(x, packed, scale, cfg, target):
    return _forward(x, packed, scale, dict(cfg), target)


def _matmul_fwd(x, packed, scale, cfg, target):
    return _forward(x, packed, scale, dict(cfg), target), (packed, scale, jnp.zeros((0,), x.dtype))


def _matmul_bwd(cfg, target, res, dy):
    packed, scale, like = res  # like: x's dtype
    if target == "tpu":  # the backward kernel's [n, block_k / 32] scale tiles do not fit Mosaic's tiling: XLA
        w = Mxfp4Weight(packed, scale).dequantize(like.dtype)
        return _dot(dy.astype(like.dtype), w).astype(like.dtype), None, None
    return _backward(dy, packed, scale, like.dtype, dict(cfg), target), None, None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _pad_weight(packed, scale, n_p, kp):
    """Zero codes (value 0) past n and k; any scale there."""
    lead = [(0, 0)] * (packed.ndim - 2)
    n, k2 = packed.shape[-2:]
    packed = jnp.pad(packed.astype(jnp.uint8), lead + [(0, n_p - n), (0, kp // 2 - k2)])
    scale = jnp.pad(scale, lead + [(0, n_p - n), (0, kp // 32 - scale.shape[-1])], constant_values=127)
    return packed, scale


def fp4_matmul(x, packed, scale, *, target: str, cfg: dict) -> jax.Array:
    """x [m, k] @ W.T for the MXFP4 weight (packed [n, k/2] uint8, scale [n, k/32] uint8) -> [m, n] fp32;
    differentiable in x (dx by the backward kernel)."""
    (m, k), n = x.shape, packed.shape[0]
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    mp, n_p, kp = -(-m // bm) * bm, -(-n // bn) * bn, -(-k // bk) * bk
    packed, scale = _pad_weight(packed, scale, n_p, kp)
    xp = jnp.pad(x, [(0, mp - m), (0, kp - k)])
    return _matmul(xp, packed, scale, tuple(sorted(cfg.items())), target)[:m, :n]


# ---- grouped (MoE) ------------------------------------------------------------------------------------------
def _work_items(group_sizes, mp: int, bm: int):
    """The (group, row tile, rows [start, end)) of every program, [mp / bm + e] int32 each; items past the
    real ones have an empty row range."""
    e = group_sizes.shape[0]
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    first, last = starts // bm, (ends - 1) // bm
    count = jnp.where(gs > 0, last - first + 1, 0)
    cum = jnp.cumsum(count)
    w = jnp.arange(mp // bm + e, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, w, side="right"), e - 1).astype(jnp.int32)
    real = w < cum[-1]
    tile = jnp.where(real, first[g] + w - (cum[g] - count[g]), 0)
    return g, tile, jnp.where(real, starts[g], 0), jnp.where(real, ends[g], 0)


def _item(refs):
    return tuple(r[0] for r in refs)


def _gfwd_kernel(g_ref, t_ref, rs_ref, re_ref, xe_ref, xo_ref, p_ref, s_ref, o_ref, *, bm, bn, bk2, n_k):
    """One (work item, n block): rows of tile t in [rs, re) times W[g]; full-array refs, sliced here."""
    from jax.experimental.pallas import triton as plgpu
    g, t, rs, re = _item((g_ref, t_ref, rs_ref, re_ref))
    j = pl.program_id(1)

    @pl.when(re > rs)
    def _():
        rows, wrows = pl.ds(t * bm, bm), pl.ds(j * bn, bn)

        def step(kk, acc):
            cols, scols = pl.ds(kk * bk2, bk2), pl.ds(kk * (bk2 // 16), bk2 // 16)
            xe = xe_ref[rows, cols]
            lo, hi = _decode(p_ref[g, wrows, cols], s_ref[g, wrows, scols], xe.dtype)
            return acc + _dot(xe, lo, trans_b=True) + _dot(xo_ref[rows, cols], hi, trans_b=True)

        acc = jax.lax.fori_loop(0, n_k, step, jnp.zeros((bm, bn), jnp.float32))
        r = t * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        plgpu.store(o_ref.at[rows, wrows], acc, mask=(r >= rs) & (r < re))


def _gbwd_kernel(g_ref, t_ref, rs_ref, re_ref, dy_ref, p_ref, s_ref, dxe_ref, dxo_ref, *, bm, bn, bk2, n_n):
    """One (work item, k block): dx rows of tile t in [rs, re) = dy @ W[g], even / odd column halves."""
    from jax.experimental.pallas import triton as plgpu
    g, t, rs, re = _item((g_ref, t_ref, rs_ref, re_ref))
    kk = pl.program_id(1)

    @pl.when(re > rs)
    def _():
        rows, cols, scols = pl.ds(t * bm, bm), pl.ds(kk * bk2, bk2), pl.ds(kk * (bk2 // 16), bk2 // 16)

        def step(j, acc):
            wrows = pl.ds(j * bn, bn)
            dy = dy_ref[rows, wrows]
            lo, hi = _decode(p_ref[g, wrows, cols], s_ref[g, wrows, scols], dy.dtype)
            return acc[0] + _dot(dy, lo), acc[1] + _dot(dy, hi)

        zero = jnp.zeros((bm, bk2), jnp.float32)
        dxe, dxo = jax.lax.fori_loop(0, n_n, step, (zero, zero))
        r = t * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bk2), 0)
        mask = (r >= rs) & (r < re)
        plgpu.store(dxe_ref.at[rows, cols], dxe.astype(dxe_ref.dtype), mask=mask)
        plgpu.store(dxo_ref.at[rows, cols], dxo.astype(dxo_ref.dtype), mask=mask)


def _full(shape):
    return pl.BlockSpec(shape, lambda w, j: (0,) * len(shape))


def _grouped_call(kernel, items, arrays, out_shape, grid_j, cfg, target, name):
    item = pl.BlockSpec((1,), lambda w, j: (w,))
    return pl.pallas_call(
        kernel, grid=(items[0].shape[0], grid_j),
        in_specs=[item] * 4 + [_full(a.shape) for a in arrays],
        out_specs=[_full(s.shape) for s in out_shape], out_shape=out_shape,
        compiler_params=_compiler_params(cfg, target), interpret=target == "interpret", name=name,
    )(*items, *arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _grouped(x, packed, scale, group_sizes, cfg, target):
    return _grouped_fwd(x, packed, scale, group_sizes, cfg, target)[0]


def _grouped_fwd(x, packed, scale, group_sizes, cfg, target):
    c = dict(cfg)
    (mp, kp), n_p = x.shape, packed.shape[1]
    bm, bn, bk = c["block_m"], c["block_n"], c["block_k"]
    items = _work_items(group_sizes, mp, bm)
    kernel = functools.partial(_gfwd_kernel, bm=bm, bn=bn, bk2=bk // 2, n_k=kp // bk)
    [out] = _grouped_call(kernel, items, (*_split(x), packed, scale),
                          [jax.ShapeDtypeStruct((mp, n_p), jnp.float32)], n_p // bn, c, target, "fp4_ragged_dot_fwd")
    # rows in no group were never stored
    out = jnp.where((jnp.arange(mp) < jnp.sum(group_sizes))[:, None], out, 0.0)
    return out, (packed, scale, group_sizes, jnp.zeros((0,), x.dtype))


def _grouped_bwd(cfg, target, res, dy):
    packed, scale, group_sizes, like = res
    dtype, c = like.dtype, dict(cfg)
    (mp, n_p), kp = dy.shape, 2 * packed.shape[2]
    bm, bn, bk = c["block_m"], c["block_n"], c["block_k"]
    items = _work_items(group_sizes, mp, bm)
    kernel = functools.partial(_gbwd_kernel, bm=bm, bn=bn, bk2=bk // 2, n_n=n_p // bn)
    half = jax.ShapeDtypeStruct((mp, kp // 2), dtype)
    dxe, dxo = _grouped_call(kernel, items, (dy.astype(dtype), packed, scale), [half, half], kp // bk, c, target,
                             "fp4_ragged_dot_bwd")
    dx = jnp.where((jnp.arange(mp) < jnp.sum(group_sizes))[:, None], _interleave(dxe, dxo), 0)
    return dx, None, None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def fp4_ragged_dot(x, packed, scale, group_sizes, *, target: str, cfg: dict) -> jax.Array:
    """Rows of x [m, k] sorted by group times their group's MXFP4 weight (packed [e, n, k/2], scale
    [e, n, k/32]) -> [m, n] fp32; differentiable in x. target "gpu" or "interpret"."""
    if target not in ("gpu", "interpret"):
        raise ValueError(f"the grouped Pallas MXFP4 kernel is Triton-only (target 'gpu' or 'interpret'), not "
                         f"{target!r}: use implementation='reference' there")
    (m, k), n = x.shape, packed.shape[1]
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    mp, n_p, kp = -(-m // bm) * bm, -(-n // bn) * bn, -(-k // bk) * bk
    packed, scale = _pad_weight(packed, scale, n_p, kp)
    xp = jnp.pad(x, [(0, mp - m), (0, kp - k)])
    return _grouped(xp, packed, scale, group_sizes.astype(jnp.int32), tuple(sorted(cfg.items())), target)[:m, :n]
