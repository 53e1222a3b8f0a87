"""The CPU lightning-indexer kernel (cpu_kernel.cc: scores and top-k of a few query rows, read straight from the
stored key format), built and registered by kernels/cpu_ffi.py. Used where `indexer_topk` runs the reference on a
CPU for a decode-shaped query outside the batch-invariant mode; the math and the picks are reference.py's.

Why a compiled kernel: XLA:CPU decodes every span of packed keys to memory and reads it back before the score dot,
and sorts each span into the running top-k, so a decode step over FP4 keys read several times the bytes the
format stores and ran slower than over BF16 keys (docs/inference.md). The kernel reads each stored key once.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_ffi

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")
TARGET = "v4jax_indexer_topk"
F32, BF16, FP8, FP4 = range(4)  # cpu_kernel.cc's key formats
DIM_MULTIPLE = {F32: 8, BF16: 16, FP8: 32, FP4: 64}


def _registered() -> str | None:
    return cpu_ffi.registered(SOURCE, ((TARGET, "V4jaxIndexerTopk"),))


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
