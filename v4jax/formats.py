"""The number formats V4 stores and computes in (architecture §3.8, §4.2, §5.2): FP8 e4m3 and MXFP4 (e2m1) values with
UE8M0 power-of-two block scales.

  * block_quantize / block_dequantize: the activation quantiser of the official kernels (one scale per 1 x block
    run along the last dim, chosen by the kernel's fp32 arithmetic), which the qat simulation (quant.py) and the
    FP8 / FP4 inference cache (kv_cache.py) both use; the cache decodes with e4m3_decode / mxfp4_decode (the same
    values, built from bits);
  * Fp8Weight / Mxfp4Weight: released weights kept in their storage inside the parameter tree (128 x 128 FP8
    blocks, 1 x 32 MXFP4 blocks), dequantized where a matmul reads them.

The e2m1 value table and the format limits are v4jax.hub's (numpy, where released files are encoded and decoded).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from v4jax.hub import FP4_MAX, FP8_MAX
from v4jax.numerics import ordered_max

__all__ = ["FP4_MAX", "FP8_MAX", "Fp8Weight", "Mxfp4Weight", "QuantizedWeight", "block_dequantize",
           "block_quantize", "e2m1_to_f32", "e2m1_unpack", "e4m3_decode", "mxfp4_decode", "pow2_ceil"]


def pow2_ceil(v: jax.Array) -> jax.Array:
    """2 ** ceil(log2(v)) for positive normal fp32 v, exactly (the kernel's exponent-bit trick)."""
    m, e = jnp.frexp(v)  # v = m * 2**e with m in [0.5, 1); m == 0.5 means v is already a power of two
    return jnp.ldexp(jnp.ones_like(v), e - (m == 0.5).astype(e.dtype))


def block_quantize(x: jax.Array, block: int, qmax: float, amin: float, qdtype) -> tuple[jax.Array, jax.Array]:
    """x [..., n * block] -> (codes [..., n * block] in qdtype, UE8M0 exponent bytes [..., n] uint8): each run of
    `block` values along the last dim shares the scale 2^(byte - 127) = pow2_ceil(max(amax, amin) / qmax), the
    official act_quant's arithmetic (it multiplies by the fp32 constant 1 / qmax rather than dividing)."""
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = jnp.maximum(ordered_max(jnp.abs(xb), axis=-1, keepdims=True), amin)
    s = pow2_ceil(amax * jnp.float32(1.0 / qmax))
    q = jnp.clip(xb / s, -qmax, qmax).astype(qdtype)
    exponent = jnp.frexp(s)[1] - 1  # s = 0.5 * 2^e exactly, i.e. 2^(e - 1)
    return q.reshape(x.shape), (exponent[..., 0] + 127).astype(jnp.uint8)


def e2m1_to_f32(codes: jax.Array) -> jax.Array:
    """e2m1 codes (the low 4 bits of an integer array: sign bit 3, exponent bits 2-1, mantissa bit 0) -> their
    values (hub.E2M1_VALUES) as fp32, built from bits: exponent e > 0 gives 2^(e-1) * (1 + m/2), e = 0 gives m/2.
    Pure elementwise integer work that fuses with its neighbours; XLA:CPU's float4 convert and a 16-entry table
    gather each cost 2-4x more per value here (measured)."""
    c = codes.astype(jnp.uint32)
    e, m = (c >> 1) & 3, c & 1
    magnitude = jnp.where(e > 0, ((e + 126) << 23) | (m << 22), m * jnp.uint32(126 << 23))
    return jax.lax.bitcast_convert_type(((c >> 3) & 1) << 31 | magnitude, jnp.float32)


def e2m1_unpack(packed: jax.Array) -> jax.Array:
    """MXFP4 bytes [..., n] (two e2m1 codes each, low nibble = even element) -> their values [..., 2n] fp32."""
    b = packed.astype(jnp.uint8)
    return jnp.stack([e2m1_to_f32(b & 0xF), e2m1_to_f32(b >> 4)], axis=-1).reshape(*b.shape[:-1], -1)


def mxfp4_decode(packed: jax.Array, exponent_bytes: jax.Array, dtype, block: int = 32) -> jax.Array:
    """MXFP4 bytes [..., n] (low nibble = even element) with one UE8M0 byte per `block` values ([..., 2n / block])
    -> the values e2m1 * 2^(byte - 127) [..., 2n] in `dtype`, exactly for bf16 and fp32 (an e2m1 value has two
    significant bits; bf16 has fp32's exponent range). Built as bit patterns (no table, no float multiply):
    exponent byte 1 gives subnormals, kept (a float multiply flushes them on XLA:CPU). bf16 packs both codes of a
    byte in one uint32 word read back as two bf16s; fp32 interleaves two fp32 patterns. On XLA:CPU (measured,
    docs/inference.md) the bf16 form is what a many-row score dot wants (the f32 multiply of the older decode was
    pulled into the dot library's fused prologue and ran ~15x slower), the fp32 form what a one-row dot (XLA's own
    GEMV, in fp32) wants. Exponent bytes 1 .. 253 with finite values: what
    block_quantize writes for finite inputs (amin >= FP4_MAX * 2^-126)."""
    p = packed.astype(jnp.uint32)
    base = jnp.repeat((exponent_bytes.astype(jnp.uint32) - 1) << 23, block // 2, axis=-1)  # 0.5 * scale, per byte

    def bits(code, shift):  # fp32 bits >> shift; code = sign bit 3, magnitude index 0..7 (0, .5, 1, 1.5, 2, 3, 4, 6)
        idx = code & 7
        # idx >= 2 is 2^(e-1) * (1 + m/2), (e, m) the index's bits: exponent + mantissa fields = idx << 22 added to
        # 0.5 * scale's; idx 1 is 0.5 * scale (the subnormal 2^-127 = 1 << 22 when the byte is 1)
        mag = jnp.where(idx >= 2, (idx << 22) + base, jnp.where(idx == 1, jnp.maximum(base, 1 << 22), 0))
        return (mag | ((code & 8) << 28)) >> shift

    lo, hi = p & 0xF, p >> 4
    if dtype == jnp.bfloat16:
        words = bits(lo, 16) | (bits(hi, 16) << 16)
        return jax.lax.bitcast_convert_type(words, jnp.bfloat16).reshape(*packed.shape[:-1], -1)
    words = jnp.stack([bits(lo, 0), bits(hi, 0)], axis=-1).reshape(*packed.shape[:-1], -1)
    return jax.lax.bitcast_convert_type(words, jnp.float32).astype(dtype)


def e4m3_decode(codes: jax.Array, exponent_bytes: jax.Array, block: int, dtype) -> jax.Array:
    """FP8 e4m3 bit patterns [..., n * block] (uint8) times 2^(byte - 127) of their block ([..., n] uint8) ->
    [..., n * block] in `dtype`: block_dequantize's values, built as fp32 bit patterns from integer fields (XLA:CPU's
    float8 convert and multiply take about 1.5x the instructions: callgrind, the decode of an FP8 window ring).
    Bit for bit block_dequantize's for every non-NaN code at exponent bytes 10 .. 246 (the results are normal
    fp32 numbers there), which covers the cache's encoder (amin 1e-4: bytes >= 105); the NaN codes, which
    block_quantize never writes, decode as 480 x scale."""
    c = codes.astype(jnp.int32)
    e, m = (c >> 3) & 15, c & 7
    s = jnp.repeat(exponent_bytes.astype(jnp.int32) - 127, block, axis=-1)
    p = (m >= 2).astype(jnp.int32) + (m >= 4)  # a subnormal code m * 2^-9 = 2^(p - 9) * (1 + fraction)
    field = jnp.where(e > 0, e + 120, 118 + p) + s  # the fp32 exponent field: 2^(e - 7) or 2^(p - 9), times 2^s
    mantissa = jnp.where(e > 0, m << 20, (m << (23 - p)) & 0x7FFFFF)
    bits = jnp.where((e > 0) | (m > 0), (field << 23) | mantissa, 0) | ((c >> 7) << 31)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def block_dequantize(q: jax.Array, exponent_bytes: jax.Array, block: int, dtype) -> jax.Array:
    """codes [..., n * block] times 2^(byte - 127) of their block ([..., n] uint8) -> [..., n * block] dtype."""
    return (q.astype(jnp.float32) * jnp.repeat(_ue8m0_to_f32(exponent_bytes), block, axis=-1)).astype(dtype)


class QuantizedWeight:
    """Base of weights kept in a released storage format (FP8 blocks, MXFP4) inside an nnx.Param.

    Subclasses are pytrees with `shape` (the logical [.., out, in]) and `dequantize(dtype)`; the model reads
    every weight through `dense`, so a quantized tree runs unchanged (dequantized at the point of use).
    """

    shape: tuple[int, ...]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        raise NotImplementedError


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
        scale = _expand_blocks(_ue8m0_to_f32(self.scale), self.shape, 1, 32)
        return (e2m1_unpack(self.packed) * scale).astype(dtype)
