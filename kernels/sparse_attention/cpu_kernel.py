"""The CPU stored-entry attention kernel (cpu_kernel.cc: a few query rows over their window rows and the stored
entries they see, a range of slots or a list of picked slots, read straight from the entry format, online softmax),
built and registered by kernels/cpu_ffi.py. Used by a cached attention step on a CPU for decode-shaped queries
outside the batch-invariant mode: HCA layers and CSA's dense phase (a range), CSA's top-k (picks); the math is
reference.sparse_attention's over [kv[idx] ; entries[lo:hi]] or [kv[idx] ; entries[picks]].

Why a compiled kernel: XLA:CPU decodes the whole filled prefix of the entries (or the picked rows) to memory, copies
it after the window rows and gathers it once more for the score dot, so an HCA layer read several times its
entries' bytes per step, more so from FP8 entries (docs/inference.md). The kernel reads each attended entry once.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_ffi

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")
TARGET = "v4jax_stored_attention"
F32, BF16, FP8 = range(3)  # cpu_kernel.cc's entry formats


def _registered() -> str | None:
    return cpu_ffi.registered(SOURCE, ((TARGET, "V4jaxStoredAttention"),))


def entry_format(entries, d: int) -> tuple[int, jax.Array, jax.Array, jax.Array] | None:
    """entries (array or kv_cache format) with head dim d -> (format code, its three leaves; unused ones a dummy),
    or None if the kernel does not read this format."""
    dummy = jnp.zeros((1, 1, 1), jnp.uint8)
    if type(entries).__name__ == "Fp8Entries":
        ok = entries.nope.shape[-1] % 64 == 0 and entries.rope.shape[-1] % 8 == 0
        return (FP8, entries.nope, entries.scale, entries.rope) if ok else None
    if isinstance(entries, jax.Array) and entries.dtype in (jnp.float32, jnp.bfloat16) and entries.shape[-1] == d:
        return F32 if entries.dtype == jnp.float32 else BF16, entries, dummy, dummy
    return None


def usable(q: jax.Array, kv: jax.Array, entries) -> bool:
    """Whether `stored_attention` can run these operands here: q and kv in fp32 or bf16 with a head dim that is a
    multiple of 8 (at most 1024), an entry format the kernel reads, and the kernel built on this host."""
    d = q.shape[-1]
    if d % 8 or d > 1024 or kv.dtype not in (jnp.float32, jnp.bfloat16) or q.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    return entry_format(entries, d) is not None and _registered() is None


def stored_attention(q: jax.Array, kv: jax.Array, idx: jax.Array, entries, sink: jax.Array, scale: float, *,
                     lo: jax.Array | None = None, hi: jax.Array | None = None, picks: jax.Array | None = None):
    """q [b, s, h, d], kv [b, m, d] (the window rows), idx [b, s, w] into kv (-1 = unused), entries [b, n, ...]
    (array or kv_cache format) of which query (b, s) sees either the slots lo <= t < hi (lo, hi [b, s]) or the slots
    picks [b, s, k] (-1 = unused), sink [h] -> (o [b, s, h, d] in q's dtype, lse [b, s, h] fp32):
    reference.sparse_attention over the rows [kv ; entries decoded to kv's dtype] with idx ++ those entries, the
    probabilities rounded to kv's dtype as there."""
    if (picks is None) == (lo is None or hi is None):
        raise ValueError("stored_attention takes either lo and hi (a range of entry slots) or picks (a list of them)")
    if _registered() is not None:
        raise RuntimeError(_registered())
    fmt, a, b_, c = entry_format(entries, q.shape[-1])
    picked = picks is not None  # the unused operands: a dummy
    lo, hi = (jnp.zeros(q.shape[:2], jnp.int32),) * 2 if picked else (lo, hi)
    picks = picks if picked else jnp.zeros((1, 1, 1), jnp.int32)
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32))
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    args = [jax.lax.stop_gradient(x) for x in (q.astype(jnp.float32), kv, a, b_, c, sink.astype(jnp.float32))]
    o, lse = call(args[0], args[1], idx.astype(jnp.int32), *args[2:5], lo.astype(jnp.int32), hi.astype(jnp.int32),
                  picks.astype(jnp.int32), args[5], fmt=np.int64(fmt), scale=np.float32(scale),
                  bf16=kv.dtype == jnp.bfloat16, picked=picked)
    return o.astype(q.dtype), lse
