"""Storage formats of the inference cache (architecture §4.2); its size per token and sequence is v4jax.cost.cache_bytes.

Each stored tensor of an AttentionCache (the window ring, the compressed entries, the indexer keys) is either
a plain array in a float dtype ("fp32", "bf16") or one of the packed formats below. Every format keeps the
leading [b, slots] dims of the plain array, so a write is the same scatter on each leaf of the pytree, and a
read decodes only what a step uses: the rows it gathers (CSA's top-k), the filled prefix (HCA), the indexer
keys span by span as the indexer scores them (kernels/indexer).

    kv_format     window ring + compressed entries   "fp32" | "bf16" | "fp8" (Fp8Entries, FlashMLA's 584 B)
    index_format  indexer keys (CSA layers)          "fp32" | "bf16" | "fp8" (Fp8Keys, 132 B) | "fp4" (Fp4Keys, 68 B)

The FP8 entry and FP4 key encodings are the quantizers the model already simulates under qat=True (architecture
§3.8: FP8 e4m3 with a UE8M0 scale per 1x64 block on the non-rope dims; MXFP4 per 1x32 after the Hadamard),
with the same quantiser as quant.fp8_fake_quant / mxfp4_fake_quant (formats.block_quantize). Encoding a fake-quantized value gives it
back exactly, so under qat=True these formats lose nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from v4jax.formats import FP4_MAX, FP8_MAX, block_quantize, e4m3_decode, mxfp4_decode

PLAIN = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
KV_FORMATS = ("fp32", "bf16", "fp8")
INDEX_FORMATS = ("fp32", "bf16", "fp8", "fp4")


def _as_bytes(q: jax.Array) -> jax.Array:
    """FP8 codes stored as their bytes: XLA:CPU has no float8 scatter and converts the whole buffer around a
    one-row write (0.5 s for a 117 MB buffer, measured); a uint8 write touches the row only."""
    return jax.lax.bitcast_convert_type(q, jnp.uint8)


def _as_fp8(b: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn)


class Fp8Entries(NamedTuple):
    """KV entries as FlashMLA's V4 cache stores them (architecture §4.2; 584 B at head_dim 512): the non-rope dims as
    FP8 e4m3 with one UE8M0 scale byte per 64 (7 bytes padded to 8), the rope dims in BF16."""

    nope: jax.Array  # [..., head_dim - rope_dim] uint8: float8_e4m3fn bit patterns
    scale: jax.Array  # [..., ceil(n_blocks / 8) * 8] uint8: block j's scale is 2^(scale[j] - 127); pad bytes 0
    rope: jax.Array  # [..., rope_dim] bfloat16

    @staticmethod
    def empty(shape: tuple[int, ...], head_dim: int, rope_dim: int) -> "Fp8Entries":
        nope = head_dim - rope_dim
        if nope % 64:
            raise ValueError(f"kv_format='fp8' stores the {nope} non-rope dims in blocks of 64: use a head_dim - "
                             f"rope_head_dim that is a multiple of 64, or kv_format='bf16'")
        return Fp8Entries(jnp.zeros((*shape, nope), jnp.uint8),
                          jnp.zeros((*shape, -(-nope // 64 // 8) * 8), jnp.uint8),
                          jnp.zeros((*shape, rope_dim), jnp.bfloat16))

    def encode(self, x: jax.Array) -> "Fp8Entries":
        """x [..., head_dim] -> its encoding (the rope dims rounded to BF16, as the official cache keeps them)."""
        nope = self.nope.shape[-1]
        q, e = block_quantize(x[..., :nope], 64, FP8_MAX, 1e-4, jnp.float8_e4m3fn)
        pad = self.scale.shape[-1] - e.shape[-1]
        return Fp8Entries(_as_bytes(q), jnp.pad(e, [(0, 0)] * (e.ndim - 1) + [(0, pad)]),
                          x[..., nope:].astype(jnp.bfloat16))

    def decode(self, dtype) -> jax.Array:
        n_blocks = self.nope.shape[-1] // 64
        nope = e4m3_decode(self.nope, self.scale[..., :n_blocks], 64, dtype)
        return jnp.concatenate([nope, self.rope.astype(dtype)], axis=-1)


class Fp4Keys(NamedTuple):
    """Indexer keys as MXFP4 (architecture §4.2, 68 B at index_head_dim 128): e2m1 codes packed two per byte (low nibble
    = even dim, as in the released expert weights) and one UE8M0 scale byte per 32 dims."""

    packed: jax.Array  # [..., dim / 2] uint8
    scale: jax.Array  # [..., dim / 32] uint8

    @staticmethod
    def empty(shape: tuple[int, ...], dim: int) -> "Fp4Keys":
        if dim % 32:
            raise ValueError(f"index_format='fp4' stores keys in blocks of 32: index_head_dim {dim} is not a "
                             f"multiple of 32; use index_format='fp8' or 'bf16'")
        return Fp4Keys(jnp.zeros((*shape, dim // 2), jnp.uint8), jnp.zeros((*shape, dim // 32), jnp.uint8))

    def encode(self, x: jax.Array) -> "Fp4Keys":
        q, e = block_quantize(x, 32, FP4_MAX, FP4_MAX * 2.0**-126, jnp.float4_e2m1fn)
        code = jax.lax.bitcast_convert_type(q, jnp.uint4).astype(jnp.uint8)  # sign bit 3, exponent 2, mantissa 1
        pairs = code.reshape(*code.shape[:-1], -1, 2)
        return Fp4Keys(pairs[..., 0] | (pairs[..., 1] << 4), e)

    def decode(self, dtype) -> jax.Array:
        return mxfp4_decode(self.packed, self.scale, dtype)


class Fp8Keys(NamedTuple):
    """Indexer keys as vLLM's FP8 indexer cache (architecture §4.2, 132 B at index_head_dim 128): FP8 e4m3 with one
    fp32 scale per key (a power of two, so MXFP4 keys usually re-encode exactly; not guaranteed when the
    key's 32-blocks differ in scale by more than e4m3's range)."""

    q: jax.Array  # [..., dim] uint8: float8_e4m3fn bit patterns
    scale: jax.Array  # [..., 1] float32

    @staticmethod
    def empty(shape: tuple[int, ...], dim: int) -> "Fp8Keys":
        return Fp8Keys(jnp.zeros((*shape, dim), jnp.uint8), jnp.zeros((*shape, 1), jnp.float32))

    def encode(self, x: jax.Array) -> "Fp8Keys":
        q, e = block_quantize(x, x.shape[-1], FP8_MAX, 1e-4, jnp.float8_e4m3fn)
        return Fp8Keys(_as_bytes(q), jnp.ldexp(jnp.float32(1.0), e.astype(jnp.int32) - 127))

    def decode(self, dtype) -> jax.Array:
        return (_as_fp8(self.q).astype(jnp.float32) * self.scale).astype(dtype)


def check_formats(kv_format: str, index_format: str) -> None:
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format={kv_format!r} is not a cache format: use one of {KV_FORMATS} (or None for "
                         f"the compute dtype)")
    if index_format not in INDEX_FORMATS:
        raise ValueError(f"index_format={index_format!r} is not an indexer-key format: use one of {INDEX_FORMATS} "
                         f"(or None for the compute dtype)")


def empty_kv(kv_format: str, shape: tuple[int, ...], head_dim: int, rope_dim: int):
    """Zeroed storage for KV entries [*shape, head_dim] (window ring or compressed entries)."""
    if kv_format == "fp8":
        return Fp8Entries.empty(shape, head_dim, rope_dim)
    return jnp.zeros((*shape, head_dim), PLAIN[kv_format])


def empty_index_keys(index_format: str, shape: tuple[int, ...], dim: int):
    """Zeroed storage for indexer keys [*shape, dim]."""
    if index_format == "fp4":
        return Fp4Keys.empty(shape, dim)
    if index_format == "fp8":
        return Fp8Keys.empty(shape, dim)
    return jnp.zeros((*shape, dim), PLAIN[index_format])


def read(buf, dtype) -> jax.Array:
    """A stored buffer [b, slots, ...] (any format) decoded to a dense [b, slots, dim] array of `dtype`."""
    return buf.astype(dtype) if isinstance(buf, jax.Array) else buf.decode(dtype)


def read_prefix(buf, n: int, dtype) -> jax.Array:
    """Slots 0 .. n - 1 of a stored buffer, decoded -> [b, n, dim] (the rest is neither read nor decoded)."""
    return read(jax.tree.map(lambda a: a[:, :n], buf), dtype)


def gather(buf, idx: jax.Array, dtype) -> jax.Array:
    """The stored rows idx [b, ...] (-1: slot 0's row, for the caller to mask) of each sequence, decoded ->
    [b, ..., dim]: only the gathered rows are decoded."""
    safe = jnp.where(idx >= 0, idx, 0)
    return read(jax.tree.map(lambda a: jax.vmap(lambda a_b, i_b: a_b[i_b])(a, safe), buf), dtype)


def write(buf, new: jax.Array, slots: jax.Array):
    """buf with the rows new [b, k, dim] encoded into slots [b, k] of each sequence (-1: not written)."""
    enc = new.astype(buf.dtype) if isinstance(buf, jax.Array) else buf.encode(new)
    rows = jnp.arange(slots.shape[0])[:, None]

    def scatter(leaf, value):
        return leaf.at[rows, jnp.where(slots >= 0, slots, leaf.shape[1])].set(value, mode="drop")

    return jax.tree.map(scatter, buf, enc)
