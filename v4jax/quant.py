"""The quantization simulation of DeepSeek-V4's official inference code (spec §3.8, [OFF] kernel.py).

With `qat=True` the model reproduces what the released inference code computes: FP8 e4m3 activations (1x128
blocks) into every FP8/FP4 matmul, FP8 fake-quant of the KV non-RoPE dims in 1x64 blocks, and a Hadamard
rotation plus MXFP4 fake-quant (1x32 blocks) of the indexer queries and keys. All scales are UE8M0 powers of
two. Each function returns the dequantized value in the input dtype (the "fake quant" / in-place mode of the
official `act_quant` and `fp4_act_quant`).

Upstream ops: act_quant(inplace=True) -> fp8_fake_quant; fp4_act_quant(inplace=True) -> mxfp4_fake_quant;
rotate_activation -> hadamard; linear() -> linear.

Also here: the batch-invariant arithmetic mode (`batch_invariant`, below) that makes chunked prefill and decode
reproduce the full pass bit for bit, which the chaotic qat simulation needs for parity checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels import target_platform

FP8_MAX = 448.0
FP4_MAX = 6.0


def pow2_ceil(v: jax.Array) -> jax.Array:
    """2 ** ceil(log2(v)) for positive normal fp32 v, exactly (the kernel's exponent-bit trick)."""
    m, e = jnp.frexp(v)  # v = m * 2**e with m in [0.5, 1); m == 0.5 means v is already a power of two
    return jnp.ldexp(jnp.ones_like(v), e - (m == 0.5).astype(e.dtype))


def _block_fake_quant(x, block, qmax, amin, qdtype):
    shape = x.shape
    xb = x.astype(jnp.float32).reshape(*shape[:-1], shape[-1] // block, block)
    amax = jnp.maximum(ordered_max(jnp.abs(xb), axis=-1, keepdims=True), amin)
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
    return einsum("...i,ij->...j", x.astype(jnp.float32), h).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, *, quantized: bool = False, qat: bool = False,
           out_dtype=None) -> jax.Array:
    """y = x @ w.T with w in the checkpoint's [out, in] layout (or an `Adapted` weight), fp32 accumulation.

    `quantized` marks weights that are FP8 / FP4 in the released checkpoint: under `qat` their input is
    rounded to FP8 in 1x128 blocks first, as the official fp8_gemm / fp4_gemm path does.
    """
    if quantized and qat:
        x = fp8_fake_quant(x, 128)
    if isinstance(w, Adapted):  # the adapter sees the same (FP8-rounded) input: the merged weight computes this
        return (einsum("...i,oi->...o", x, w.base.astype(x.dtype)) + w.delta(x)).astype(out_dtype or x.dtype)
    return einsum("...i,oi->...o", x, w.astype(x.dtype)).astype(out_dtype or x.dtype)


def einsum(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with fp32 accumulation; full fp32 precision for fp32 inputs (TPUs otherwise use bf16 passes).
    Batch invariant (below): a linear map row by row (_rowwise), else the fp32 products and an ordered_sum over
    the contracted letters."""
    if not _batch_invariant.value:
        prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
        return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32, precision=prec)
    ins, out = eq.replace(" ", "").split("->")
    n_ell = max([x.ndim - len(s) + 3 for s, x in zip(ins.split(","), (a, b)) if "..." in s], default=0)
    ell = "".join(chr(ord("A") + i) for i in range(n_ell))  # "..." spelled out, right-aligned as numpy does
    spell = lambda s, nd: s.replace("...", ell[n_ell - (nd - len(s) + 3):]) if "..." in s else s  # noqa: E731
    (la, lb), out = (spell(s, x.ndim) for s, x in zip(ins.split(","), (a, b))), spell(out, n_ell + len(out) - 3)
    summed = "".join(c for c in dict.fromkeys(la + lb) if c not in out)
    if all(c in la for c in summed) and all(c in summed or c not in la for c in lb):
        return _rowwise(a, b, la, lb, out, summed)
    target = out + summed

    def place(x, letters):  # x's axes in target order, size-1 axes for the letters it lacks
        size = dict(zip(letters, x.shape))
        x = jnp.transpose(x.astype(jnp.float32), sorted(range(len(letters)), key=lambda i: target.index(letters[i])))
        return x.reshape([size.get(c, 1) for c in target])

    # Operands materialised first: XLA would otherwise recompute their producers (e.g. a fake quant) for every
    # element of the broadcast product. Every element is one exactly rounded product.
    a, b = jax.lax.optimization_barrier((a, b))
    prod = place(a, la) * place(b, lb)
    return ordered_sum(prod.reshape(*prod.shape[:len(out)], -1), axis=-1)


def _rowwise(a, b, la: str, lb: str, out: str, summed: str) -> jax.Array:
    """Batch-invariant einsum where b is a matrix applied to every row of a (a linear map): each row is its own
    vector-matrix product of one fixed shape, one lax.map step (the dot's own fixed order, at dot speed). At
    least two rows, padded: XLA inlines a loop of one step, and its dot then takes another code path."""
    a_free, b_free = ("".join(c for c in s if c not in summed) for s in (la, lb))
    a = jnp.einsum(f"{la}->{a_free}{summed}", a.astype(jnp.float32))  # transposes only
    b = jnp.einsum(f"{lb}->{summed}{b_free}", b.astype(jnp.float32))
    k = math.prod(b.shape[:len(summed)])
    rows, mat = a.reshape(math.prod(a.shape[:len(a_free)]), k), b.reshape(k, math.prod(b.shape[len(summed):]))
    n = rows.shape[0]
    rows = jnp.pad(rows, ((0, max(2 - n, 0)), (0, 0)))
    y = jax.lax.map(lambda r: jnp.dot(r, mat, precision=jax.lax.Precision.HIGHEST), rows)[:n]
    return jnp.einsum(f"{a_free}{b_free}->{out}", y.reshape(a.shape[:len(a_free)] + b.shape[len(summed):]))


# ---- batch-invariant arithmetic ------------------------------------------------------------------------------
# Why: under qat=True the model is chaotic in fp32. A last-bit change in an activation flips an FP8 rounding now
# and then (fp8_fake_quant, kv_fake_quant, the indexer's MXFP4) and on random weights a flip grows through the
# layers. XLA gives a token last bits that depend on the shapes around it: on CPU one row times a matrix is a
# GEMV, a different kernel than the same row inside a 256-row product; reductions are vectorised by shape; some
# reduce fusions go to a library (YNNPACK) whose exp differs from XLA's; and a multiply is contracted with the
# add after it into an FMA only when both land in one fused loop, which the fusion pass decides by shape. So
# chunked prefill and decode (1 .. C tokens per call) do not reproduce the full pass (T tokens) under qat.
# What: inside `with batch_invariant():` every contraction and float reduction that the model's forward and
# cache paths run through this module (einsum, linear, hadamard, ordered_sum / ordered_max / mean / softmax, used
# by attention, mHC, the norms, the indexer and sparse-attention references, the CPU grouped matmul) is computed
# in one order that does not depend on the shapes. A linear map (a weight matrix applied to rows) runs each row
# as its own vector-matrix product of one fixed shape (_rowwise). Every other sum takes exactly rounded fp32
# products, materialised (optimization_barrier: no FMA, no fusion choice), then a halving tree of elementwise
# adds over the reduced axis zero-padded to a power of two; padding and masked slots add exact zeros, so a longer
# masked axis gives the same bits. A token's sums are then the same alone in a decode step, in a chunk or in
# the full pass (on the test model of tests/test_decode.py the logits came out bit for bit under qat). Element-
# wise chains (norms, RoPE, mHC mixing) are not pinned: XLA:CPU contracts their multiply-adds into FMAs by fusion
# context, so on other checkpoints the last bits can still differ (README: measured up to 2.4e-6). Slower (tiny model, CPU: ~2.7x the run time of
# the full pass and of decode, ~1.5x the compile time) and memory hungrier: for parity checks, not production.
# Outside the context nothing changes. Pallas kernels and ragged_dot (GPU / TPU) do not follow it. The switch is
# a JAX user context, part of the jit cache key: a function traced without it is retraced inside it.
_batch_invariant = jax.make_user_context(default_value=False)


def batch_invariant(on: bool = True):
    """Context manager: trace (and run) the model with batch-invariant arithmetic (see above)."""
    return _batch_invariant(on)


def _tree(x: jax.Array, axis: int, keepdims: bool, op, pad: float) -> jax.Array:
    """Reduce one axis by a halving tree of the elementwise op, the axis padded with `pad` to a power of two.
    The input is materialised first (optimization_barrier): XLA:CPU contracts a multiply feeding an add into an
    FMA when both land in one fused loop, and whether a product fuses into its reduction depends on the shapes."""
    x = jax.lax.optimization_barrier(jnp.moveaxis(x, axis, -1))
    n = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (1 << max(n - 1, 0).bit_length()) - n)], constant_values=pad)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = op(x[..., :half], x[..., half:])
    return jnp.expand_dims(x[..., 0], axis) if keepdims else x[..., 0]


def ordered_sum(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """jnp.sum over one axis; batch invariant: a halving tree of elementwise adds in a fixed order."""
    if not _batch_invariant.value:
        return jnp.sum(x, axis=axis, keepdims=keepdims)
    return _tree(x, axis, keepdims, jnp.add, 0.0)


def ordered_max(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """jnp.max over one axis. The max is exact in any order, but batch invariant it is an elementwise tree too:
    XLA:CPU hands some shapes' reduce fusions to a library (YNNPACK) whose exp / log differ in the last bit from
    XLA's own, and a reduce would pull its consumers (the softmax's exp) into such a fusion."""
    if not _batch_invariant.value:
        return jnp.max(x, axis=axis, keepdims=keepdims)
    return _tree(x, axis, keepdims, jnp.maximum, -jnp.inf)


def mean(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """jnp.mean over one axis (ordered_sum / n under batch_invariant)."""
    if not _batch_invariant.value:
        return jnp.mean(x, axis=axis, keepdims=keepdims)
    return ordered_sum(x, axis, keepdims) / x.shape[axis]


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """jax.nn.softmax over one axis (its denominator an ordered_sum under batch_invariant)."""
    if not _batch_invariant.value:
        return jax.nn.softmax(x, axis=axis)
    e = jnp.exp(x - jax.lax.stop_gradient(ordered_max(x, axis=axis, keepdims=True)))
    return jax.lax.optimization_barrier(e / ordered_sum(e, axis, keepdims=True))  # no FMA into its consumers


def grouped_matmul(a: jax.Array, w: jax.Array, sizes: jax.Array, tile: int = 128) -> jax.Array:
    """a [m, in] (rows sorted by group), w [e, out, in], sizes [e] -> [m, out] fp32: row r times its group's
    weight; rows past sum(sizes) give 0. `jax.lax.ragged_dot` on GPU / TPU. XLA:CPU lowers ragged_dot densely
    (every group over every row: e times the work and an [e, m, out] buffer; measured: 16 groups cost 33x one),
    so on CPU the rows go in tiles and each (tile, group) pair that overlaps is one small matmul: at most
    m / tile + e of them (megablox's schedule, in jnp)."""
    if target_platform() != "cpu":
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
    def one(t, g, ok):
        rows = t * tile + jnp.arange(tile)
        y = einsum("ri,oi->ro", jax.lax.dynamic_slice_in_dim(a, t * tile, tile), w[g])
        return jnp.where((ok & (rows >= start[g]) & (rows < end[g]))[:, None], y, 0.0)

    def add_item(i, out):  # accumulated in place: no [items, tile, out] stack, forward or backward
        return out.at[tile_of[i]].add(one(tile_of[i], group[i], used[i]))

    # Item 0 starts the sum outside the loop: the carry then has the operands' type (varying under shard_map).
    out = add_item(0, jnp.zeros((n_tiles, tile, w.shape[1]), jnp.float32))
    out = jax.lax.fori_loop(1, n_tiles + e, add_item, out)
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A weight [.., out, in] with a LoRA adapter (v4jax.lora): it acts as base + scale * b @ a, with a
    [.., rank, in] and b [.., out, rank], through two thin matmuls (the sum is never formed in a forward).
    `base` is dense, or a QuantizedWeight where the grouped expert kernels read the storage directly. With a
    dropout `key` (set in training only, v4jax.lora.set_dropout_keys), the adapter's input goes through dropout
    of rate `rate`; the base product always sees the undropped input."""

    base: object
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    key: jax.Array | None = None
    rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    def adapter_input(self, x: jax.Array) -> jax.Array:
        """x as the adapter reads it: unchanged without a key, else each element zeroed with probability `rate`
        and the rest divided by 1 - rate (the mask drawn from `key` for x's shape)."""
        if self.key is None:
            return x
        keep = jax.random.bernoulli(self.key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))

    def delta(self, x: jax.Array) -> jax.Array:
        """scale * (x @ a.T) @ b.T for x [..., in] (after adapter_input), fp32 (the low-rank path rounds to x's
        dtype in between)."""
        h = einsum("...i,ri->...r", self.adapter_input(x), self.a.astype(x.dtype)).astype(x.dtype)
        return self.scale * einsum("...r,or->...o", h, self.b.astype(x.dtype))

    def merged(self) -> jax.Array:
        """The dense fp32 weight base + scale * b @ a."""
        base = self.base.dequantize(jnp.float32) if isinstance(self.base, QuantizedWeight) else self.base
        return base.astype(jnp.float32) + self.scale * einsum("...or,...ri->...oi", self.b, self.a)


def weight(owner, name: str, decode: bool = True):
    """The weight Variable `owner.<name>` for a matmul: dense (`dense`; with decode=False its stored value, for
    kernels that read quantized storage), or `Adapted` when a LoRA adapter is attached beside it as
    `owner.<name>_lora` (v4jax.lora)."""
    var = getattr(owner, name)
    w = dense(var) if decode else var.get_value()
    lora = getattr(owner, f"{name}_lora", None)
    if lora is None:
        return w
    key = getattr(lora, "dropout_key", None)
    return Adapted(w, lora.a[...], lora.b[...], lora.scale, None if key is None else key[...], lora.dropout)


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
