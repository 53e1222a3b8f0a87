"""The lightning indexer (architecture §3.4.5) as a Pallas score kernel plus a blockwise running top-k: GPU (Triton
lowering), TPU (Mosaic) and CPU tests (interpret mode). The math and the picks are reference.py's.

Score kernel: one program scores block_q queries against block_k keys. The queries' heads are stacked as the
rows of one matmul ([block_q * heads, d] x [d, block_k], fp32 accumulation, as DeepGEMM's mqa logits put the
heads on M); relu, the per-head weight and the sum over heads are fused after it, so the [s, heads, n] dot
products are never written (the reference's einsum has that shape; whether XLA writes it depends on the
backend). Invisible slots (outside [lo, hi)) become -inf; scores are stored in the activation dtype, as the
reference rounds them.

Selection: Pallas has no sort or top-k on either backend, so the selection is the reference's running_topk:
the keys are scored `span` at a time (each span decoded from a packed cache format as it is read), merged
into the running top-k by lax.top_k, over the spans that intersect some query's visible range only: a decode
step or prefill chunk scores only the filled entries before it.

Shapes inside: heads padded to a power of two (zero heads add relu(0) * 0), d to a power of two (zero
columns change no dot product), queries to a multiple of block_q (empty ranges), keys to one span when there
are fewer. No gradient: the picks are integers; the scores the indexer loss needs come from
reference.picked_scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.indexer import reference
from kernels.indexer.tuning import blocks as tuned_blocks


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _score_kernel(q_ref, w_ref, lo_ref, hi_ref, k_ref, o_ref, *, block_q, heads, block_k):
    """q_ref [1, block_q * heads, d], w/lo/hi_ref [1, 1, block_q * heads] (lo, hi repeated over a query's heads,
    relative to this span; the unit axis keeps Mosaic's tiling happy), k_ref [1, block_k, d]
    -> o_ref [1, block_q, block_k]."""
    q, keys = q_ref[0], k_ref[0]
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # no TF32 / bf16 passes for fp32
    dots = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)  # [rows, block_k]
    col = pl.program_id(2) * block_k + jax.lax.broadcasted_iota(jnp.int32, dots.shape, 1)
    lo, hi = lo_ref[0, 0][:, None], hi_ref[0, 0][:, None]
    # a query's heads share its range: -inf in every head row sums to -inf for the query
    part = jnp.where((col >= lo) & (col < hi), jnp.maximum(dots, 0.0) * w_ref[0, 0][:, None], -jnp.inf)
    o_ref[0] = jnp.sum(part.reshape(block_q, heads, block_k), axis=1).astype(o_ref.dtype)


def _compiler_params(cfg, target):
    if target != "gpu":
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _span_scores(q_rows, w_rows, lo_rows, hi_rows, keys, dtype, cfg, target):
    """Scores of all queries against one span of keys [b, span, d] -> [b, s_p, span] in `dtype`."""
    b, n_rows, d = q_rows.shape  # w/lo/hi_rows [b, 1, n_rows]
    span = keys.shape[1]
    bq, bk, heads = cfg["block_q"], cfg["block_k"], cfg["heads"]
    rows = bq * heads
    kernel = functools.partial(_score_kernel, block_q=bq, heads=heads, block_k=bk)
    per_row = pl.BlockSpec((1, 1, rows), lambda i, j, t: (i, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(b, n_rows // rows, span // bk),
        in_specs=[pl.BlockSpec((1, rows, d), lambda i, j, t: (i, j, 0)), per_row, per_row, per_row,
                  pl.BlockSpec((1, bk, d), lambda i, j, t: (i, t, 0))],
        out_specs=pl.BlockSpec((1, bq, bk), lambda i, j, t: (i, j, t)),
        out_shape=jax.ShapeDtypeStruct((b, n_rows // heads, span), dtype),
        compiler_params=_compiler_params(cfg, target), interpret=target == "interpret", name="indexer_scores",
    )(q_rows, w_rows, lo_rows, hi_rows, keys)


def indexer_topk(q, w, keys, lo, hi, k: int, dtype, *, target: str = "gpu", block_sizes: dict | None = None):
    """reference.indexer_topk's contract through the Pallas score kernel on `target` ("gpu", "tpu" or
    "interpret"): q [b, s, i, d], w [b, s, i] fp32, keys [b, n, d] or a packed format (decoded span by span),
    lo/hi [b, s], 1 <= k <= n -> (slots [b, s, k] int32, -1 = none; scores [b, s, k] fp32, -inf = none).
    block_sizes: as tuning.BLOCKS' entries."""
    q, w, keys = (jax.lax.stop_gradient(a) for a in (q, w, keys))  # integer picks: nothing to differentiate
    b, s, h, d = q.shape
    n = reference.n_slots(keys)
    hp, dp = _pow2(h), _pow2(d)
    cfg = dict(block_sizes or tuned_blocks(target, hp, n))
    cfg.setdefault("block_q", max(1, cfg["rows"] // hp))
    cfg["heads"] = hp
    bq, span = cfg["block_q"], cfg["span"]
    if span % cfg["block_k"]:
        raise ValueError(f"indexer span {span} must be a multiple of block_k {cfg['block_k']}")
    if span > n:  # fewer slots than one span: pad them (never visible: every hi <= n)
        keys = jax.tree.map(lambda a: jnp.pad(a, [(0, 0), (0, span - n)] + [(0, 0)] * (a.ndim - 2)), keys)
    sp = -(-s // bq) * bq
    cdt = jnp.result_type(q.dtype, keys.dtype) if isinstance(keys, jax.Array) else q.dtype
    q_rows = jnp.pad(q.astype(cdt), [(0, 0), (0, sp - s), (0, hp - h), (0, dp - d)]).reshape(b, sp * hp, dp)
    w_rows = jnp.pad(w.astype(jnp.float32), [(0, 0), (0, sp - s), (0, hp - h)]).reshape(b, 1, sp * hp)
    # ranges clipped to the real slots; padded queries get [0, 0)
    lo, hi = (jnp.pad(jnp.clip(a, 0, n).astype(jnp.int32), [(0, 0), (0, sp - s)]) for a in (lo, hi))

    def score_span(start, span, lo_rel, hi_rel):
        rep = lambda a: jnp.repeat(a, hp, axis=1)[:, None]  # noqa: E731  (a query's range on each head row)
        part = jnp.pad(reference.key_rows(keys, start, span, cdt), [(0, 0), (0, 0), (0, dp - d)])
        return _span_scores(q_rows, w_rows, rep(lo_rel), rep(hi_rel), part, dtype, cfg, target).astype(jnp.float32)

    idx, vals = reference.running_topk(score_span, max(n, span), span, lo, hi, k)
    return idx[:, :s], vals[:, :s]
