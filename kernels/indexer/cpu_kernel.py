"""The CPU lightning-indexer kernels (cpu_kernel.cc), built and registered by kernels/cpu_ffi.py: indexer_topk,
the scores and top-k of a few query rows read straight from the stored key format (where `indexer_topk` would run
the reference on a CPU for a decode-shaped query outside the batch-invariant mode; the math and the picks are
reference.py's), and topk_merge, the reference's running top-k merge without a sort (every other CPU call).

Why a compiled kernel: XLA:CPU decodes every span of packed keys to memory and reads it back before the score dot,
and sorts each span into the running top-k, so a decode step over FP4 keys read several times the bytes the
format stores and ran slower than over BF16 keys (docs/inference.md). The kernel reads each stored key once.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_ffi

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")
TARGET, MERGE_TARGET = "v4jax_indexer_topk", "v4jax_topk_merge"
F32, BF16, FP8, FP4 = range(4)  # cpu_kernel.cc's key formats
DIM_MULTIPLE = {F32: 8, BF16: 16, FP8: 32, FP4: 64}


def _registered() -> str | None:
    return cpu_ffi.registered(SOURCE, ((TARGET, "V4jaxIndexerTopk"), (MERGE_TARGET, "V4jaxTopkMerge")))


def key_format(keys) -> tuple[int, jax.Array, jax.Array] | None:
    """keys (array or kv_cache format) -> (format code, codes [b, n, .], scales [b, n, .]), or None if the
    kernel does not read this format."""
    name = type(keys).__name__
    if name == "Fp4Keys":
        return FP4, keys.packed, keys.scale
    if name == "Fp8Keys":
        return FP8, keys.q, keys.scale
    if isinstance(keys, jax.Array) and keys.dtype in (jnp.float32, jnp.bfloat16):
        code = F32 if keys.dtype == jnp.float32 else BF16
        return code, keys, jnp.zeros((1,), jnp.float32)
    return None


def usable(q: jax.Array, keys, dtype) -> bool:
    """Whether `indexer_topk` can run these operands here: a known key format, q's dim a multiple of the
    format's vector width, scores rounded to fp32 or bf16, and the kernel built on this host."""
    fmt = key_format(keys)
    if fmt is None or q.shape[-1] % DIM_MULTIPLE[fmt[0]] or jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return False
    return _registered() is None


def indexer_topk(q: jax.Array, w: jax.Array, keys, lo: jax.Array, hi: jax.Array, k: int, dtype):
    """reference.indexer_topk's contract (scores in fp32 with another order of additions) for the operands
    `usable` accepts."""
    if _registered() is not None:
        raise RuntimeError(_registered())
    fmt, codes, scales = key_format(keys)
    b, s = lo.shape
    out = (jax.ShapeDtypeStruct((b, s, k), jnp.int32), jax.ShapeDtypeStruct((b, s, k), jnp.float32))
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    args = [jax.lax.stop_gradient(a) for a in (q.astype(jnp.float32), w.astype(jnp.float32), codes, scales)]
    return call(*args, lo.astype(jnp.int32), hi.astype(jnp.int32), fmt=np.int64(fmt),
                bf16_scores=jnp.dtype(dtype) == jnp.bfloat16)


def merge_usable() -> bool:
    """Whether topk_merge can run here (the kernels built on this host)."""
    return _registered() is None


def topk_merge(vals: jax.Array, idx: jax.Array, scores: jax.Array, start: jax.Array):
    """reference.topk_merge's result, computed without sorting the span: the span's scores that beat the running
    k-th, merged into the running top k (cpu_kernel.cc, TopkMergeImpl)."""
    if _registered() is not None:
        raise RuntimeError(_registered())
    *lead, k = vals.shape
    rows = math.prod(lead)
    out = (jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((rows, k), jnp.int32))
    call = jax.ffi.ffi_call(MERGE_TARGET, out, vmap_method="sequential")
    v, i = call(vals.reshape(-1, k), idx.reshape(-1, k).astype(jnp.int32),
                scores.reshape(-1, scores.shape[-1]).astype(jnp.float32), jnp.asarray(start, jnp.int32).reshape(1))
    return v.reshape(vals.shape), i.reshape(vals.shape)
