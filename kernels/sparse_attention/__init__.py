"""Sparse attention over index lists (window ++ compressed entries) with an attention sink (architecture §3.4.6).

`sparse_attention` picks the implementation: the Pallas kernels (pallas.py; Triton kernels on GPU, Mosaic
kernels on TPU) where the backend has them, the pure-jnp reference (reference.py) elsewhere. `stored_attention`
is the compiled CPU kernel (cpu_kernel.py) for a cached step's attention over stored entries (a range of them, or
the ones CSA's indexer picked), where `stored_kernel_fits` says so.
"""

from __future__ import annotations

import jax

from kernels import per_batch_shard, resolve, target_platform
from kernels.sparse_attention import cpu_kernel, pallas, reference
from v4jax.numerics import in_batch_invariant

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


# query rows x heads per sequence up to which a cached step runs stored_attention on a CPU (measured: the decode
# steps of the long-context demo (4 heads) and the tiny preset (8) ran faster with it; see docs/inference.md)
CPU_KERNEL_ROWS = 16


def stored_kernel_fits(q: jax.Array, kv: jax.Array, entries, implementation: str | None) -> bool:
    """Whether a cached step's attention over stored entries runs stored_attention: implementation None / "auto", a
    CPU target, a decode-shaped query (s x heads <= CPU_KERNEL_ROWS), not inside the batch-invariant mode (the
    kernel adds in its own order), and operands the kernel reads."""
    return (implementation in (None, "auto") and target_platform() == "cpu" and not in_batch_invariant()
            and q.shape[1] * q.shape[2] <= CPU_KERNEL_ROWS and cpu_kernel.usable(q, kv, entries))


def stored_attention(q: jax.Array, kv: jax.Array, idx: jax.Array, entries, sink: jax.Array, scale: float, *,
                     lo: jax.Array | None = None, hi: jax.Array | None = None, picks: jax.Array | None = None):
    """sparse_attention(q, [kv ; entries decoded], sink, idx ++ the entries the row sees, scale, return_lse=True),
    where a row sees the entry slots lo <= t < hi or the slots in picks [b, s, k] (-1 = unused), computed by the CPU
    kernel from the stored entries (cpu_kernel.stored_attention), on each device's share of the batch."""
    if picks is not None:
        return per_batch_shard(lambda q, kv, idx, entries, picks, sink: cpu_kernel.stored_attention(
            q, kv, idx, entries, sink, scale, picks=picks), (q, kv, idx, entries, picks), (sink,))
    return per_batch_shard(lambda q, kv, idx, entries, lo, hi, sink: cpu_kernel.stored_attention(
        q, kv, idx, entries, sink, scale, lo=lo, hi=hi), (q, kv, idx, entries, lo, hi), (sink,))


__all__ = ["sparse_attention", "stored_attention", "stored_kernel_fits"]
