"""The arithmetic every layer sums with: `einsum` (fp32 accumulation) and the reductions ordered_sum, ordered_max,
mean and softmax, each of which runs in one fixed, shape-independent order inside `with batch_invariant():`, so
that chunked prefill and decode can reproduce the full pass bit for bit (why and how: below). Outside that
context they are jnp's own ops.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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


# Why: under qat=True the model is chaotic in fp32. A last-bit change in an activation flips an FP8 rounding now
# and then (fp8_fake_quant, kv_fake_quant, the indexer's MXFP4) and on random weights a flip grows through the
# layers. XLA gives a token last bits that depend on the shapes around it: on CPU one row times a matrix is a
# GEMV, a different kernel than the same row inside a 256-row product; reductions are vectorised by shape; some
# reduce fusions go to a library (YNNPACK) whose exp differs from XLA's; and a multiply is contracted with the
# add after it into an FMA only when both land in one fused loop, which the fusion pass decides by shape. So
# chunked prefill and decode (1 .. C tokens per call) do not reproduce the full pass (T tokens) under qat.
# What: inside `with batch_invariant():` every contraction and float reduction that the model's forward and
# cache paths run through this module (einsum, so quant.linear and quant.hadamard too; ordered_sum / ordered_max /
# mean / softmax; used by attention, mHC, the norms, the indexer and sparse-attention references, the CPU grouped
# matmul) is computed in one order that does not depend on the shapes. A linear map (a weight matrix applied to rows) runs each row
# as its own vector-matrix product of one fixed shape (_rowwise). Every other sum takes exactly rounded fp32
# products, materialised (optimization_barrier: no FMA, no fusion choice), then a halving tree of elementwise
# adds over the reduced axis zero-padded to a power of two; padding and masked slots add exact zeros, so a longer
# masked axis gives the same bits. A token's sums are then the same alone in a decode step, in a chunk or in
# the full pass. Element-wise chains (norms, RoPE, mHC mixing) are not pinned: XLA:CPU contracts their
# multiply-adds into FMAs by fusion context, so with FMA the last bits can still differ (README: measured up to
# 2.4e-6); without (XLA_FLAGS=--xla_cpu_max_isa=AVX) the logits are bit for bit those of the full pass on every
# seed and layer plan of tests/test_bit_equality.py (20 random checkpoints, both qat modes). Slower (tiny
# model, CPU: ~2.7x the run time of the full pass and of decode, ~1.5x the compile time) and memory hungrier: for
# parity checks, not production.
# Outside the context nothing changes. Pallas kernels and ragged_dot (GPU / TPU) do not follow it. The switch is
# a JAX user context, part of the jit cache key: a function traced without it is retraced inside it.
_batch_invariant = jax.make_user_context(default_value=False)


def batch_invariant(on: bool = True):
    """Context manager: trace (and run) the model with batch-invariant arithmetic (see above)."""
    return _batch_invariant(on)


def in_batch_invariant() -> bool:
    """Whether the code being traced runs inside `with batch_invariant():`."""
    return bool(_batch_invariant.value)


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
