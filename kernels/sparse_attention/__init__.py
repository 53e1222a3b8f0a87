"""Sparse attention over index lists (window ++ compressed entries) with an attention sink (architecture §3.4.6).

`sparse_attention` picks the implementation: the Pallas kernels (pallas.py; Triton kernels on GPU, Mosaic
kernels on TPU) where the backend has them, the pure-jnp reference (reference.py) elsewhere.
"""

from __future__ import annotations

import jax

from kernels import per_batch_shard, resolve, target_platform
from kernels.sparse_attention import pallas, reference

PALLAS_BACKENDS = ("gpu", "tpu")  # backends with compiled Pallas kernels (pallas.TARGETS of the same name)


def sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, idx: jax.Array, scale: float,
                     return_lse: bool = False, implementation: str | None = None):
    """q [b, s, h, d], kv [b, n, d], sink [h] (fp32 logits), idx [b, s, k] int (-1 = unused) -> o [b, s, h, d]
    and, with return_lse, the fp32 log of the softmax denominator (sink included) [b, s, h].

    implementation: None / "auto" (Pallas where the backend has the kernels, else the reference), "pallas"
    (error on a backend without them), "pallas_interpret" / "pallas_interpret_tpu" (the GPU / TPU kernels in
    Pallas interpret mode: any backend, slow; for tests) or "reference"."""
    impl = resolve("sparse_attention", implementation, PALLAS_BACKENDS, extra=("pallas_interpret_tpu",))
    if impl == "reference":
        return reference.sparse_attention(q, kv, sink, idx, scale, return_lse)
    target = {"pallas": target_platform(), "pallas_interpret": "gpu_interpret",
              "pallas_interpret_tpu": "tpu_interpret"}[impl]
    return per_batch_shard(lambda q, kv, idx, sink: pallas.sparse_attention(q, kv, sink, idx, scale, return_lse,
                                                                            target=target), (q, kv, idx), (sink,))


__all__ = ["sparse_attention"]
