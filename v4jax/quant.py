"""The quantization simulation of DeepSeek-V4's official inference code (spec §3.8, [OFF] kernel.py).

With `qat=True` the model reproduces what the released inference code computes: FP8 e4m3 activations (1x128
blocks) into every FP8/FP4 matmul, FP8 fake-quant of the KV non-RoPE dims in 1x64 blocks, and a Hadamard
rotation plus MXFP4 fake-quant (1x32 blocks) of the indexer queries and keys. All scales are UE8M0 powers of
two. Each function returns the dequantized value in the input dtype (the "fake quant" / in-place mode of the
official `act_quant` and `fp4_act_quant`).

Upstream ops: act_quant(inplace=True) -> fp8_fake_quant; fp4_act_quant(inplace=True) -> mxfp4_fake_quant;
rotate_activation -> hadamard; linear() -> linear.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0


def pow2_ceil(v: jax.Array) -> jax.Array:
    """2 ** ceil(log2(v)) for positive normal fp32 v, exactly (the kernel's exponent-bit trick)."""
    m, e = jnp.frexp(v)  # v = m * 2**e with m in [0.5, 1); m == 0.5 means v is already a power of two
    return jnp.ldexp(jnp.ones_like(v), e - (m == 0.5).astype(e.dtype))


def _block_fake_quant(x, block, qmax, amin, qdtype):
    shape = x.shape
    xb = x.astype(jnp.float32).reshape(*shape[:-1], shape[-1] // block, block)
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), amin)
    # The kernel multiplies by the fp32 constant 1/qmax (it does not divide): keep that rounding.
    s = pow2_ceil(amax * jnp.float32(1.0 / qmax))
    q = jnp.clip(xb / s, -qmax, qmax).astype(qdtype).astype(jnp.float32)
    return (q * s).reshape(shape).astype(x.dtype)


def fp8_fake_quant(x: jax.Array, block: int = 128) -> jax.Array:
    """FP8 e4m3 quantize-dequantize along the last dim in 1 x `block` blocks (official act_quant, inplace)."""
    return _block_fake_quant(x, block, FP8_MAX, 1e-4, jnp.float8_e4m3fn)


def mxfp4_fake_quant(x: jax.Array, block: int = 32) -> jax.Array:
    """MXFP4 (e2m1 values, UE8M0 scale per 32) quantize-dequantize (official fp4_act_quant, inplace)."""
    return _block_fake_quant(x, block, FP4_MAX, FP4_MAX * 2.0**-126, jnp.float4_e2m1fn)


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester-ordered Walsh-Hadamard matrix scaled by 1/sqrt(n) (orthogonal and symmetric)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two size, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
    """Normalized Walsh-Hadamard transform over the last dim (official rotate_activation)."""
    h = jnp.asarray(_hadamard_matrix(x.shape[-1]))
    y = jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, *, quantized: bool = False, qat: bool = False,
           out_dtype=None) -> jax.Array:
    """y = x @ w.T with w in the checkpoint's [out, in] layout, fp32 accumulation.

    `quantized` marks weights that are FP8 / FP4 in the released checkpoint: under `qat` their input is
    rounded to FP8 in 1x128 blocks first, as the official fp8_gemm / fp4_gemm path does.
    """
    if quantized and qat:
        x = fp8_fake_quant(x, 128)
    return einsum("...i,oi->...o", x, w.astype(x.dtype)).astype(out_dtype or x.dtype)


def einsum(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with fp32 accumulation; full fp32 precision for fp32 inputs (TPUs otherwise use bf16 passes)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32, precision=prec)


def grouped_matmul(a: jax.Array, w: jax.Array, sizes: jax.Array, tile: int = 128) -> jax.Array:
    """a [m, in] (rows sorted by group), w [e, out, in], sizes [e] -> [m, out] fp32: row r times its group's
    weight; rows past sum(sizes) give 0. `jax.lax.ragged_dot` on GPU / TPU. XLA:CPU lowers ragged_dot densely
    (every group over every row: e times the work and an [e, m, out] buffer; measured: 16 groups cost 33x one),
    so on CPU the rows go in tiles and each (tile, group) pair that overlaps is one small matmul: at most
    m / tile + e of them (megablox's schedule, in jnp)."""
    if jax.default_backend() != "cpu":
        return jax.lax.ragged_dot(a, jnp.swapaxes(w, 1, 2), sizes, preferred_element_type=jnp.float32)
    m, e = a.shape[0], w.shape[0]
    tile = min(tile, -(-m // 8) * 8)  # decode: a few rows, small tiles
    n_tiles = -(-m // tile)
    a = jnp.pad(a, ((0, n_tiles * tile - m), (0, 0)))
    end = jnp.cumsum(sizes)
    start = end - sizes
    count = jnp.where(sizes > 0, (end - 1) // tile - start // tile + 1, 0)  # tiles group g overlaps
    item_end = jnp.cumsum(count)
    item = jnp.arange(n_tiles + e)  # work items: (tile, group) pairs in group order; the tail is unused
    group = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), e - 1)
    used = item < item_end[-1]
    tile_of = jnp.where(used, start[group] // tile + item - (item_end - count)[group], 0)

    @jax.checkpoint  # backward recomputes each item: no per-item copy of the group's weight is saved
    def one(args):
        t, g, ok = args
        rows = t * tile + jnp.arange(tile)
        y = einsum("ri,oi->ro", jax.lax.dynamic_slice_in_dim(a, t * tile, tile), w[g])
        return jnp.where((ok & (rows >= start[g]) & (rows < end[g]))[:, None], y, 0.0)

    ys = jax.lax.map(one, (tile_of, group, used))  # [items, tile, out]
    out = jnp.zeros((n_tiles, tile, w.shape[1]), jnp.float32).at[tile_of].add(ys)
    return out.reshape(n_tiles * tile, -1)[:m]


class QuantizedWeight:
    """Base of weights kept in a released storage format (FP8 blocks, MXFP4) inside an nnx.Param.

    Subclasses are pytrees with `shape` (the logical [.., out, in]) and `dequantize(dtype)`; the model reads
    every weight through `dense`, so a quantized tree runs unchanged (dequantized at the point of use).
    """

    shape: tuple[int, ...]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        raise NotImplementedError


def dense(var) -> jax.Array:
    """The value of a weight Variable as a dense array (quantized storage is dequantized to fp32)."""
    value = var.get_value()
    return value.dequantize(jnp.float32) if isinstance(value, QuantizedWeight) else value


# ---- released storage formats kept in the parameter tree (spec §5.2 encoding details) ----------------------
def _ue8m0_to_f32(scale: jax.Array) -> jax.Array:
    """UE8M0 exponent bytes (stored as uint8) -> 2^(b - 127) exactly; F32 scales (Base models) pass through."""
    if scale.dtype == jnp.float32:
        return scale
    return jnp.ldexp(jnp.float32(1.0), scale.astype(jnp.int32) - 127)


def _expand_blocks(s: jax.Array, shape: tuple[int, ...], rows: int, cols: int) -> jax.Array:
    """A per-block grid [.., ceil(r/rows), ceil(c/cols)] repeated over [.., r, c]."""
    s = jnp.repeat(jnp.repeat(s, rows, axis=-2), cols, axis=-1)
    return s[..., : shape[-2], : shape[-1]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight(QuantizedWeight):
    """FP8 e4m3 weight [.., out, in] with one UE8M0 scale per 128x128 block ([.., ceil(out/128), ceil(in/128)]
    uint8 exponent bytes, the checkpoint's F8_E8M0 bytes; or float32 scales): w = data * 2^(scale - 127)."""

    data: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        s = _expand_blocks(_ue8m0_to_f32(self.scale), self.shape, 128, 128)
        return (self.data.astype(jnp.float32) * s).astype(dtype)


_E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mxfp4Weight(QuantizedWeight):
    """MXFP4 weight: `packed` uint8 (or int8) [.., out, in/2] holding two e2m1 codes per byte along K (low nibble
    = even element), `scale` uint8 UE8M0 exponents [.., out, in/32]: w = e2m1 * 2^(scale - 127)."""

    packed: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], 2 * self.packed.shape[-1])

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        b = self.packed.astype(jnp.uint8)
        lut = jnp.asarray(_E2M1_VALUES)
        vals = jnp.stack([lut[b & 0xF], lut[b >> 4]], axis=-1).reshape(self.shape)
        return (vals * _expand_blocks(_ue8m0_to_f32(self.scale), self.shape, 1, 32)).astype(dtype)
