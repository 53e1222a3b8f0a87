"""The lightning indexer of CSA layers (architecture §3.4.5): scores fused with top-k selection over each query's
visible range of entry slots. Upstream ops: the official Indexer (fp8_index + topk); DeepGEMM fp8_mqa_logits."""

from __future__ import annotations

import jax

from v4jax.numerics import in_batch_invariant
from kernels import per_batch_shard, resolve, target_platform
from kernels.indexer import cpu_kernel, pallas_kernel, reference
from kernels.indexer.reference import index_scores, picked_scores, prefix_ranges, visible_ranges

__all__ = ["indexer_topk", "index_scores", "picked_scores", "prefix_ranges", "visible_ranges"]
PALLAS_BACKENDS = ("gpu", "tpu")  # backends with a compiled kernel (tuning.BLOCKS targets of the same name)


def _check(q, w, keys, lo, hi, k):
    n = reference.n_slots(keys)
    if q.ndim != 4 or w.ndim != 3 or lo.shape != hi.shape or lo.ndim != 2:
        raise ValueError(f"indexer_topk wants q [b, s, i, d], w [b, s, i], lo and hi [b, s]; got q {q.shape}, "
                         f"w {w.shape}, lo {lo.shape}, hi {hi.shape}")
    b, s, i, d = q.shape
    if w.shape != (b, s, i) or jax.tree.leaves(keys)[0].shape[0] != b or lo.shape != (b, s):
        raise ValueError(f"indexer_topk shapes disagree: q {q.shape}, w {w.shape}, lo {lo.shape}, keys' leaves "
                         f"{[a.shape for a in jax.tree.leaves(keys)]}; w must be [b, s, i], keys [b, n, ...] and "
                         f"lo, hi [b, s] for q [b, s, i, d]")
    if isinstance(keys, jax.Array) and (keys.ndim != 3 or keys.shape[2] != d):
        raise ValueError(f"indexer_topk keys {keys.shape} must be [b, n, d] with q's d = {d}")
    if not 1 <= k <= n:
        raise ValueError(f"indexer_topk k={k} must be in [1, n={n}]: pass min(index_topk, n)")


# Query rows x heads per sequence up to which the CPU kernel beats XLA's dot and top_k: CPU_KERNEL_ROWS for any
# head count (one head of 64 dims, 2 and 4 heads of 128 measured faster), CPU_KERNEL_LANE_ROWS for a multiple of 8
# heads, which the kernel puts in the lanes of its score dot (one row, 65,536 keys of 128 dims, fp32 scores: 8, 16
# and 32 heads 0.33-0.80x the reference's time, 64 heads 0.86-1.09x; docs/kernels.md).
CPU_KERNEL_ROWS, CPU_KERNEL_LANE_ROWS = 4, 32


def cpu_kernel_fits(q, keys, dtype) -> bool:
    """Whether "auto" runs the CPU kernel: a CPU target, a decode-shaped query (s x heads <= CPU_KERNEL_ROWS, or
    <= CPU_KERNEL_LANE_ROWS with heads a multiple of 8), not inside the batch-invariant mode (the kernel sums in its
    own order), and operands the kernel reads."""
    rows, heads = q.shape[1] * q.shape[2], q.shape[2]
    few = rows <= CPU_KERNEL_ROWS or (heads % 8 == 0 and rows <= CPU_KERNEL_LANE_ROWS)
    return target_platform() == "cpu" and few and not in_batch_invariant() and cpu_kernel.usable(q, keys, dtype)


def indexer_topk(q: jax.Array, w: jax.Array, keys: jax.Array, lo: jax.Array, hi: jax.Array, k: int, dtype, *,
                 implementation: str | None = None, block_sizes: dict | None = None):
    """The top k visible entry slots of each query by I[b, s, t] = sum_i w[b, s, i] relu(q[b, s, i] . keys[b, t]).

    q [b, s, i, d] (index queries), w [b, s, i] fp32 (head weights), keys [b, n, d] or a packed cache format
    (v4jax.kv_cache's Fp4Keys / Fp8Keys: read and decoded span by span), lo / hi [b, s] int (query
    (b, s) sees slots lo <= t < hi, see visible_ranges / prefix_ranges), 1 <= k <= n, dtype: the scores'
    rounding dtype (the activation dtype) -> (slots [b, s, k] int32, best first, equal scores lower slot
    first, -1 where fewer than k are visible; their scores [b, s, k] fp32, -inf there). No gradient
    (picked_scores gives differentiable scores for the picks).

    implementation (ModelConfig.kernels' values): None / "auto" (the Pallas kernel on GPU / TPU; on a CPU the
    compiled CPU kernel for a decode-shaped query (cpu_kernel_fits) outside the batch-invariant mode, else the
    reference, on a CPU with its running top-k merged by cpu_kernel.topk_merge: same picks, no sort), "pallas"
    (error elsewhere), "pallas_interpret" (the kernel in Pallas interpret mode: any backend, slow; for tests) or
    "reference". block_sizes: as tuning.BLOCKS' entries.
    """
    _check(q, w, keys, lo, hi, k)
    impl = resolve("indexer", implementation, PALLAS_BACKENDS)
    if impl == "reference":
        if implementation in (None, "auto") and cpu_kernel_fits(q, keys, dtype):
            return per_batch_shard(lambda *a: cpu_kernel.indexer_topk(*a, k, dtype), (q, w, keys, lo, hi))
        if implementation in (None, "auto") and target_platform() == "cpu" and cpu_kernel.merge_usable():
            merge = cpu_kernel.topk_merge  # the reference's picks, its top_k merges compiled (exact)
            return per_batch_shard(lambda *a: reference.indexer_topk(*a, k, dtype, merge=merge),
                                   (q, w, keys, lo, hi))
        return reference.indexer_topk(q, w, keys, lo, hi, k, dtype)
    target = target_platform() if impl == "pallas" else "interpret"
    return per_batch_shard(lambda *a: pallas_kernel.indexer_topk(*a, k, dtype, target=target, block_sizes=block_sizes),
                           (q, w, keys, lo, hi))
