"""Sparse attention over index lists (window ++ compressed entries) with an attention sink (spec §3.4.6).

`sparse_attention` picks the implementation: the Pallas kernels (pallas.py; Triton kernels on GPU, Mosaic
kernels on TPU) where the backend has them, the pure-jnp reference (reference.py) elsewhere.
"""

from __future__ import annotations

import jax

from kernels.sparse_attention import pallas, reference

IMPLEMENTATIONS = ("auto", "pallas", "pallas_interpret", "pallas_interpret_tpu", "reference")
PALLAS_BACKENDS = ("gpu", "tpu")  # backends with compiled Pallas kernels (pallas.TARGETS of the same name)


def sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, idx: jax.Array, scale: float,
                     return_lse: bool = False, implementation: str | None = None):
    """q [b, s, h, d], kv [b, n, d], sink [h] (fp32 logits), idx [b, s, k] int (-1 = unused) -> o [b, s, h, d]
    and, with return_lse, the fp32 log of the softmax denominator (sink included) [b, s, h].

    implementation: None / "auto" (Pallas where the backend has the kernels, else the reference), "pallas"
    (error on a backend without them), "pallas_interpret" / "pallas_interpret_tpu" (the GPU / TPU kernels in
    Pallas interpret mode: any backend, slow; for tests) or "reference"."""
    impl = implementation or "auto"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"sparse_attention implementation {implementation!r} is unknown: use one of "
                         f"{IMPLEMENTATIONS} (or None for 'auto')")
    backend = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if backend in PALLAS_BACKENDS else "reference"
    if impl == "reference":
        return reference.sparse_attention(q, kv, sink, idx, scale, return_lse)
    if impl == "pallas" and backend not in PALLAS_BACKENDS:
        raise ValueError(f"no compiled Pallas sparse attention kernel for backend {backend!r} (only "
                         f"{PALLAS_BACKENDS}): use implementation='auto' or 'reference', or 'pallas_interpret' to "
                         "run it interpreted")
    target = {"pallas": backend, "pallas_interpret": "gpu_interpret", "pallas_interpret_tpu": "tpu_interpret"}[impl]
    return pallas.sparse_attention(q, kv, sink, idx, scale, return_lse, target=target)


__all__ = ["sparse_attention", "IMPLEMENTATIONS"]
