"""The lightning indexer's scores and top-k selection of CSA layers (spec §3.4.5), pure jnp: the spec, the CPU
path and the oracle of the Pallas kernel. Upstream ops: the official `Indexer.forward` (its fp8_index scores,
then topk), DeepGEMM's fp8_mqa_logits for the scores.

    I[b, s, t] = sum_i w[b, s, i] * relu(q[b, s, i] . keys[b, t])        (fp32, then rounded to `dtype`)

Query (b, s) may pick entry slot t iff lo[b, s] <= t < hi[b, s]: the visible entries of a query are one
contiguous range of slots (its document's windows sit in consecutive slots, window 0 first, and a query sees
the windows that end by it, `visible_ranges`). The picks are the top k visible scores, best first; equal
scores keep the lower slot first (lax.top_k's order); -1 (score -inf) fills the row when fewer than k are
visible. This is exactly what v4jax.attention's chunk loop computes today with a [b, s, n] mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.quant import einsum, ordered_sum


def index_scores(q: jax.Array, w: jax.Array, keys: jax.Array, dtype) -> jax.Array:
    """q [b, s, i, d], w [b, s, i] fp32, keys [b, n, d] -> I [b, s, n] fp32, rounded through `dtype` (the
    official code keeps index scores in the activation dtype). Same ops as v4jax.attention.index_scores."""
    dots = einsum("bsid,btd->bsit", q, keys)
    return ordered_sum(jax.nn.relu(dots) * w[..., None], axis=2).astype(dtype).astype(jnp.float32)


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


def indexer_topk(q: jax.Array, w: jax.Array, keys: jax.Array, lo: jax.Array, hi: jax.Array, k: int, dtype):
    """-> (top slots [b, s, k] int32, -1 where fewer than k are visible; their scores [b, s, k] fp32, -inf
    there). Builds the full [b, s, n] score matrix."""
    visible = range_mask(lo, hi, keys.shape[1])
    scores = jnp.where(visible, index_scores(q, w, keys, dtype), -jnp.inf)
    val, top = jax.lax.top_k(scores, k)
    ok = jnp.take_along_axis(visible, top, axis=-1)
    return jnp.where(ok, top, -1).astype(jnp.int32), jnp.where(ok, val, -jnp.inf)


def picked_scores(q: jax.Array, w: jax.Array, keys: jax.Array, idx: jax.Array, dtype) -> jax.Array:
    """The scores of the picked slots idx [b, s, k] (-1 -> -inf), differentiable in q, w and keys: what the
    indexer KL loss needs (spec §6.2), computed from the k gathered keys instead of all n."""
    valid = idx >= 0
    picked = jax.vmap(lambda kb, ib: kb[ib])(keys, jnp.where(valid, idx, 0))  # [b, s, k, d]
    dots = einsum("bsid,bskd->bsik", q, picked)
    scores = ordered_sum(jax.nn.relu(dots) * w[..., None], axis=2).astype(dtype).astype(jnp.float32)
    return jnp.where(valid, scores, -jnp.inf)
