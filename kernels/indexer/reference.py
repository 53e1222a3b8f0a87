"""The lightning indexer's scores and top-k selection of CSA layers (architecture §3.4.5), pure jnp: the spec, the CPU
path and the oracle of the Pallas kernel. Upstream ops: the official `Indexer.forward` (its fp8_index scores,
then topk), DeepGEMM's fp8_mqa_logits for the scores.

    I[b, s, t] = sum_i w[b, s, i] * relu(q[b, s, i] . keys[b, t])        (fp32, then rounded to `dtype`)

Query (b, s) may pick entry slot t iff lo[b, s] <= t < hi[b, s]: the visible entries of a query are one
contiguous range of slots (its document's windows sit in consecutive slots, window 0 first, and a query sees
the windows that end by it, `visible_ranges`). The picks are the top k visible scores, best first; equal
scores keep the lower slot first (lax.top_k's order); -1 (score -inf) fills the row when fewer than k are
visible.

Cost follows the visible ranges, not the buffer: `indexer_topk` scores a span of slots at a time, only the spans
that intersect some query's [lo, hi) (while-loops with data-dependent bounds), and merges each span's scores into a
running top-k. The spans come in levels (`span_levels`: 1,024 slots times powers of 4, up to 16K and as large as a
budget of score elements allows): the longest spans cover the bulk of the visible extent, shorter ones the rest, so
a short extent is scored in short spans (a cache of capacity 1M holding 4K tokens costs what one of 4K does) and a
long one in few merges (XLA:CPU's top_k, 256 rows, k = 512: ~53 ns per element over 1.5K elements, ~4.6 ns over 66K,
measured; 1,024-slot merges spent over half of a demo prefill chunk in top_k; on a CPU, `indexer_topk`'s auto
passes cpu_kernel.topk_merge, same result without the sort). The keys may be a packed cache format
(v4jax.kv_cache: any pytree of [b, n, ...] leaves with a .decode(dtype) method): each span is decoded as it is
scored, so no dense copy of the whole buffer is made. The merge returns exactly the global top_k's picks and order:
spans are merged in slot order (running entries have lower slots than the span's), and top_k keeps the lower
position first among equal values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.numerics import einsum, ordered_sum


def index_scores(q: jax.Array, w: jax.Array, keys: jax.Array, dtype) -> jax.Array:
    """q [b, s, i, d], w [b, s, i] fp32, keys [b, n, d] -> I [b, s, n] fp32, rounded through `dtype` (the
    official code keeps index scores in the activation dtype). With few query rows (decode) the keys are the
    dot's left operand: XLA:CPU wants the right operand contracted on its major axis and gave a [n, d] right
    operand a transposed copy, one key read per cache line (callgrind, 32 KiB L1 simulated: 89 MiB of reads per demo
    decode step at 64K tokens for 2 MiB of BF16 keys); as the left operand they are read in place."""
    if few_query_rows(q):
        dots = jnp.moveaxis(einsum("btd,bsid->btsi", keys, q), 1, 3)
    else:
        dots = einsum("bsid,btd->bsit", q, keys)
    return round_to(ordered_sum(jax.nn.relu(dots) * w[..., None], axis=2), dtype)


def round_to(x: jax.Array, dtype) -> jax.Array:
    """fp32 x rounded to `dtype`'s precision, kept in fp32. Not x.astype(dtype).astype(float32): XLA, allowed excess
    precision by default, drops that pair of converts inside a fused program (seen on XLA:CPU feeding top_k with
    several heads), and the picks then come from unrounded scores; it keeps a reduce_precision."""
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def few_query_rows(q: jax.Array) -> bool:
    """Whether q [b, s, i, d] scores fewer query rows (s * i) than each key has dims: a decode step's shape."""
    s, i, d = q.shape[1:]
    return s * i < d


def visible_ranges(pos_q: jax.Array, doc_q: jax.Array, ent_doc: jax.Array, ent_win: jax.Array, ratio: int):
    """The entry slots [lo, hi) a query may use, as v4jax.attention.visible_entries' mask (same document,
    (win + 1) * ratio <= pos + 1) but as per-query bounds: pos_q, doc_q [b, q] (document -1 = a padded query,
    which sees nothing); ent_doc, ent_win [b, n] from attention.entry_layout (-1 = unused slot) -> lo, hi
    [b, q] int32. Relies on entry_layout's order: used slots first, documents ascending, a document's windows
    0, 1, 2, ... in consecutive slots (tests/kernels/test_indexer.py checks the equivalence)."""
    n = ent_doc.shape[1]
    # unused slots (doc -1) sort after every document; a padded query (doc -1) then finds an empty range
    key = jnp.where(ent_doc < 0, jnp.iinfo(jnp.int32).max, ent_doc).astype(jnp.int32)
    find = jax.vmap(lambda k, v, side: jnp.searchsorted(k, v, side=side), in_axes=(0, 0, None))
    first = find(key, doc_q.astype(jnp.int32), "left")
    last = find(key, doc_q.astype(jnp.int32), "right")
    lo = jnp.minimum(first, n).astype(jnp.int32)
    hi = jnp.minimum(last, first + (pos_q + 1) // ratio).astype(jnp.int32)
    return lo, jnp.maximum(hi, lo)


def prefix_ranges(pos_q: jax.Array, n: int, ratio: int):
    """The ranges of Attention.step (one sequence per row, entry j = window j): slots j with (j + 1) * ratio
    <= pos + 1, i.e. [0, min((pos + 1) // ratio, n)) -> lo, hi [b, q] int32."""
    hi = jnp.clip((pos_q + 1) // ratio, 0, n).astype(jnp.int32)
    return jnp.zeros_like(hi), hi


def range_mask(lo: jax.Array, hi: jax.Array, n: int) -> jax.Array:
    """[b, s] bounds -> [b, s, n] bool: lo <= t < hi."""
    t = jnp.arange(n)
    return (t >= lo[..., None]) & (t < hi[..., None])


SPAN = 1024  # the shortest span of slots scored per merge step
SPAN_GROWTH = 4  # each longer level of spans is this many times the previous
# fp32 elements of one span's [b, s, heads, span] products (16 MiB; 2^24 ran the tiny preset's 16-head prefill
# chunk 1.9x slower)
SCORE_BUDGET = 1 << 22
# the longest span: XLA:CPU's score dot slows per slot past 64K (one query: 1.5 ms at 64K slots, 35 at 256K), and
# few-row (decode) scans ran faster with 16K than 64K spans (demo, one index head, interleaved medians, two runs:
# 256K slots BF16 3.7 vs 4.5 ms, FP4 4.7 vs 4.7-5.2 ms; 64K slots 1.8 vs 2.6, 2.3 vs 3.0); many-row scans stop
# at SCORE_BUDGET first
MAX_SPAN = 1 << 14


def span_levels(n: int, rows: int) -> tuple[int, ...]:
    """The span lengths for n slots and `rows` = b * s * heads products per slot, longest first: SPAN * 4^j up
    to n, MAX_SPAN and SCORE_BUDGET / rows (at least SPAN); (n,) when n <= SPAN."""
    top = min(n, MAX_SPAN, max(SPAN, SCORE_BUDGET // max(rows, 1)))
    levels = [min(n, SPAN)]
    while levels[-1] * SPAN_GROWTH <= top:
        levels.append(levels[-1] * SPAN_GROWTH)
    return tuple(reversed(levels))


def n_slots(keys) -> int:
    """Slots of a key buffer: an array [b, n, d] or a packed format whose leaves are [b, n, ...]."""
    return jax.tree.leaves(keys)[0].shape[1]


def key_rows(keys, start, size: int, dtype) -> jax.Array:
    """Slots start .. start + size - 1 of a key buffer (array or packed format), decoded -> [b, size, d] dtype."""
    part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1), keys)
    return part.decode(dtype) if hasattr(part, "decode") else part.astype(dtype)


def topk_merge(vals: jax.Array, idx: jax.Array, scores: jax.Array, start) -> tuple[jax.Array, jax.Array]:
    """One merge of running_topk: the running top k (vals [..., k] best first, their slots idx) and a span's scores
    [..., span] of slots start .. start + span - 1 -> the top k of both (lax.top_k over the running entries, then
    the span's: equal scores keep the running entry, then the lower slot, first)."""
    v, pick = jax.lax.top_k(jnp.concatenate([vals, scores], axis=-1), vals.shape[-1])
    slots = jnp.broadcast_to(start + jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape)
    return v, jnp.take_along_axis(jnp.concatenate([idx, slots], axis=-1), pick, axis=-1)


def running_topk(score_span, n: int, spans, lo: jax.Array, hi: jax.Array, k: int, merge=topk_merge):
    """The top k visible slots of 0 .. n - 1, scored a span at a time over the spans that intersect some [lo, hi)
    only. spans: one span length, or lengths longest first (span_levels), each <= n; the longer levels take
    as many whole spans as fit the visible extent, the shortest covers the rest. score_span(start, span, lo_rel,
    hi_rel) -> [b, s, span] fp32 scores of slots start .. start + span - 1 (span: the level's static length),
    -inf outside [lo_rel, hi_rel) (bounds relative to start). A span that would run past n starts at
    n - span instead, its slots already merged made invisible. merge: topk_merge or a function with its result
    (cpu_kernel.topk_merge). -> (slots [b, s, k] int32, -1 = none; scores [b, s, k] fp32, -inf = none)."""
    spans = (spans,) if isinstance(spans, int) else tuple(spans)
    b, s = lo.shape
    has = hi > lo
    pos = jnp.min(jnp.where(has, lo, n)) // spans[-1] * spans[-1]  # slots before pos are merged (or invisible)
    last = jnp.max(jnp.where(has, hi, 0))
    carry = (jnp.full((b, s, k), -jnp.inf, jnp.float32), jnp.full((b, s, k), -1, jnp.int32))
    for level, span in enumerate(spans):
        shortest = level == len(spans) - 1
        count = jnp.maximum(-(-(last - pos) // span) if shortest else (last - pos) // span, 0)

        def step(j, carry, span=span, base=pos):
            vals, idx = carry
            begin = base + j * span  # this span's first new slot
            start = jnp.minimum(begin, n - span)
            return merge(vals, idx, score_span(start, span, jnp.maximum(lo, begin) - start, hi - start), start)

        carry = jax.lax.fori_loop(0, count, step, carry)
        pos = pos + count * span
    vals, idx = carry
    return jnp.where(vals > -jnp.inf, idx, -1), vals


def indexer_topk(q: jax.Array, w: jax.Array, keys, lo: jax.Array, hi: jax.Array, k: int, dtype, span=None,
                 merge=topk_merge):
    """-> (top slots [b, s, k] int32, -1 where fewer than k are visible; their scores [b, s, k] fp32, -inf
    there). keys: [b, n, d] or a packed format (decoded span by span to q's dtype). span: a length or levels
    for running_topk (default span_levels); merge: running_topk's. No gradient."""
    q, w, keys = (jax.lax.stop_gradient(a) for a in (q, w, keys))  # integer picks: nothing to differentiate
    n = n_slots(keys)
    b, s, i, _ = q.shape
    spans = span_levels(n, b * s * i) if span is None else span
    # one score row per query (decode, one index head) is XLA:CPU's matrix-vector dot, which computes in fp32 whatever
    # its operands: keys decoded straight to fp32 skip a bf16 copy (same scores, tests/kernels/test_indexer.py)
    kdt = jnp.float32 if s * i == 1 else q.dtype
    q = q.astype(kdt)

    def score_span(start, span, lo_rel, hi_rel):
        scores = index_scores(q, w, key_rows(keys, start, span, kdt), dtype)
        return jnp.where(range_mask(lo_rel, hi_rel, span), scores, -jnp.inf)

    return running_topk(score_span, n, spans, lo, hi, k, merge)


def picked_scores(q: jax.Array, w: jax.Array, keys: jax.Array, idx: jax.Array, dtype) -> jax.Array:
    """The scores of the picked slots idx [b, s, k] (-1 -> -inf), differentiable in q, w and keys: what the
    indexer KL loss needs (architecture §6.2), computed from the k gathered keys instead of all n."""
    valid = idx >= 0
    picked = jax.vmap(lambda kb, ib: kb[ib])(keys, jnp.where(valid, idx, 0))  # [b, s, k, d]
    dots = einsum("bsid,bskd->bsik", q, picked)
    scores = round_to(ordered_sum(jax.nn.relu(dots) * w[..., None], axis=2), dtype)
    return jnp.where(valid, scores, -jnp.inf)
