"""DeepSeek-V4 hybrid attention: sliding window + CSA (compressed sparse) + HCA (heavily compressed), architecture §3.4.

Every layer attends over its own 128-token window of one shared K=V head (512 dims, the last 64 roped) plus a
sink. CSA layers (ratio 4) add the lightning indexer's top-k of overlapping 4-token compressed entries; HCA
layers (ratio 128) add every visible 128-token entry. Queries are processed in chunks of `attn_chunk`: each
chunk builds its own index lists (window indices, then compressed indices offset by T, -1 = unused; the layout
of the official `sparse_attn`) and gathers only its keys, so memory is O(chunk * T), never [T, T].

Letters: b batch, s/t query/key positions, h heads, d head dim, g output groups, r o_lora rank, i index heads.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.indexer import index_scores, indexer_topk, picked_scores, prefix_ranges, visible_ranges
from kernels.indexer.reference import n_slots, range_mask
from kernels.sparse_attention import sparse_attention, stored_attention, stored_kernel_fits
from v4jax import kv_cache
from v4jax.config import ModelConfig
from v4jax.layers import apply_rope, join_chunks, param, rms_norm, rope_frequencies, split_chunks
from v4jax.numerics import einsum, ordered_sum, softmax
from v4jax.quant import Adapted, dense, fp8_fake_quant, hadamard, linear, mxfp4_fake_quant, weight


def kv_fake_quant(kv: jax.Array, rope_dim: int) -> jax.Array:
    """QAT of a KV entry: FP8 in 1x64 blocks on the non-rope dims; rope dims untouched (architecture §3.4.2)."""
    return jnp.concatenate([fp8_fake_quant(kv[..., :-rope_dim], 64), kv[..., -rope_dim:]], axis=-1)


class Layout(NamedTuple):
    """Where each token sits in a (possibly packed) row: its document and its position within it."""

    doc: jax.Array  # [b, T] document number (0, 1, ... along the row)
    pos: jax.Array  # [b, T] position within the document: RoPE position, restarts at each document


def token_layout(segment_ids: jax.Array | None, b: int, T: int) -> Layout:
    """Documents are the runs of equal segment ids in a row; None means one document per row."""
    t = jnp.broadcast_to(jnp.arange(T), (b, T))
    if segment_ids is None:
        return Layout(jnp.zeros((b, T), jnp.int32), t)
    first = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    doc = jnp.cumsum(first, axis=1) - 1
    return Layout(doc, t - jax.lax.cummax(jnp.where(first, t, 0), axis=1))


class Entries(NamedTuple):
    """The compressed entries of a row: entry j pools tokens start[j] .. start[j] + ratio - 1, the window
    `win[j]` (counted from 0 at its document's start) of document `doc[j]`; unused slots have doc -1."""

    start: jax.Array  # [b, n]
    doc: jax.Array  # [b, n]
    win: jax.Array  # [b, n]


def entry_layout(lay: Layout, ratio: int) -> Entries:
    """Windows are aligned to document starts; a document's tail shorter than `ratio` makes no entry
    (TR §3.5.3). A row of one document gets entries 0 .. T // ratio - 1 at tokens 0, ratio, 2 * ratio, ..."""
    b, T = lay.doc.shape
    n, span = T // ratio, T - ratio + 1
    if n == 0:
        z = jnp.zeros((b, 0), jnp.int32)
        return Entries(z, z, z)
    # token s starts an entry if it starts a window of its document and the window ends inside the document
    is_start = (lay.pos[:, :span] % ratio == 0) & (lay.doc[:, ratio - 1:] == lay.doc[:, :span])
    slot = jnp.where(is_start, jnp.cumsum(is_start, axis=1) - 1, n)  # slot n = dropped
    rows = jnp.arange(b)[:, None]
    start = jnp.zeros((b, n), jnp.int32).at[rows, slot].set(jnp.arange(span, dtype=jnp.int32), mode="drop")
    used = jnp.zeros((b, n), bool).at[rows, slot].set(True, mode="drop")
    doc = jnp.where(used, jnp.take_along_axis(lay.doc, start, axis=1), -1)
    return Entries(start, doc, jnp.take_along_axis(lay.pos, start, axis=1) // ratio)


class Compressor(nnx.Module):
    """Gated pooling of `ratio` consecutive tokens into one KV entry (architecture §3.4.3).

    Ratio 4 (CSA) overlaps: entry i pools the first halves (dims [0, head_dim)) of window i-1's tokens with the
    second halves of window i's, one softmax over the 8 candidates per channel. Ratio 128 (HCA) pools its own
    window. Entries are RMS-normed, roped at position ratio * (window index in the document), then
    fake-quantized under qat (FP8 for the main compressor; Hadamard + MXFP4 for the indexer's, `rotate=True`).
    """

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, rotate: bool, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg, self.ratio, self.head_dim, self.rotate = cfg, ratio, head_dim, rotate
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * head_dim
        self.ape = param(rngs, (ratio, width), ("compress_ratio", "compress_kv"), jnp.float32, "const")
        self.wkv = param(rngs, (width, cfg.dim), ("compress_kv", "embed"), pd)
        self.wgate = param(rngs, (width, cfg.dim), ("compress_kv", "embed"), pd)
        self.norm = param(rngs, (head_dim,), ("norm",), pd, "const", 1.0)

    def project(self, x: jax.Array, positions: jax.Array):
        """Per-token values and gate logits [b, s, width] in fp32 (the official code pools in fp32); the gate
        includes ape at each token's offset in its window."""
        xf = x.astype(jnp.float32)
        kv = linear(xf, self.wkv[...].astype(jnp.float32))
        score = linear(xf, self.wgate[...].astype(jnp.float32)) + self.ape[...][positions % self.ratio]
        return kv, score

    def pool(self, kv, score, prev_kv, prev_score, has_prev, win, dtype) -> jax.Array:
        """Windows kv / score [.., ratio, width] (and, for the overlap, the previous window's rows, used where
        has_prev [..]) -> finished entries [.., head_dim] for window indices `win` [..]."""
        cfg, m, d = self.cfg, self.ratio, self.head_dim
        if self.overlap:  # 8 candidates: the previous window's first halves, then this window's second halves
            keep = has_prev[..., None, None]
            kv = jnp.concatenate([jnp.where(keep, prev_kv[..., :d], 0.0), kv[..., d:]], axis=-2)
            score = jnp.concatenate([jnp.where(keep, prev_score[..., :d], -jnp.inf), score[..., d:]], axis=-2)
        pooled = ordered_sum(kv * softmax(score, axis=-2), axis=-2)
        entry = rms_norm(pooled.astype(dtype), self.norm[...], cfg.norm_eps)
        entry = apply_rope(entry, win * m, rope_frequencies(cfg, compressed=True))
        if cfg.qat:
            entry = mxfp4_fake_quant(hadamard(entry), 32) if self.rotate else kv_fake_quant(entry, cfg.rope_head_dim)
        return entry

    def __call__(self, x: jax.Array, lay: Layout, ent: Entries) -> jax.Array:
        """x [b, T, dim] -> the entries [b, n, head_dim] of the complete windows listed in `ent`."""
        b, n = ent.start.shape
        if n == 0:  # no complete window yet
            return jnp.zeros((b, 0, self.head_dim), x.dtype)
        tokens = ent.start[..., None] + jnp.arange(self.ratio)  # [b, n, m]
        gather = jax.vmap(lambda a, i: a[i])
        kv, score = (gather(a, tokens) for a in self.project(x, lay.pos))  # [b, n, m, width]
        # a document's windows sit in consecutive slots: the previous window is the previous slot
        prev_kv, prev_score = (jnp.pad(a[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0))) for a in (kv, score))
        return self.pool(kv, score, prev_kv, prev_score, ent.win > 0, ent.win, x.dtype)

    def init_state(self, batch: int) -> "CompressorState":
        rows = (2 if self.overlap else 1) * self.ratio
        width = self.wkv.shape[0]
        return CompressorState(jnp.zeros((batch, rows, width), jnp.float32),
                               jnp.full((batch, rows, width), -jnp.inf, jnp.float32))

    def advance(self, kv: jax.Array, score: jax.Array, start: jax.Array, n_new: jax.Array, state: "CompressorState"):
        """Compress the next tokens of each sequence from their projections kv, score [b, C, width] (`project` at
        positions start + j), of which the first n_new [b] are real. The state holds the projections of the
        current (incomplete) window, slot = position mod ratio, preceded for the overlap by the last complete
        window. -> (entries [b, K, head_dim], their indices [b, K] (-1: none), new state); K = C // ratio + 2
        windows are examined. Nothing here depends on tokens past n_new, so the same projections advance a
        state by any prefix of them (speculative verification commits the accepted prefix this way)."""
        m = self.ratio
        b, C, _ = kv.shape
        off, w0 = start % m, start // m
        # rows r of the buffer hold positions w0 * m + r: the state's partial window, then the new tokens
        n_win = C // m + 2
        r = jnp.arange(n_win * m)[None, :]
        j = jnp.clip(r - off[:, None], 0, C - 1)
        from_state = r < off[:, None]
        cur = (state.kv[:, -m:], state.score[:, -m:])

        def buffer(old, new):
            rows = jnp.where(from_state[..., None], jnp.take_along_axis(old, jnp.minimum(r, m - 1)[..., None], 1),
                             jnp.take_along_axis(new, j[..., None], 1))
            return rows.reshape(b, n_win, m, -1)

        win_kv, win_score = buffer(cur[0], kv), buffer(cur[1], score)
        win = w0[:, None] + jnp.arange(n_win)
        done = (off + n_new) // m  # complete windows in the buffer
        if self.overlap:
            prev_kv = jnp.concatenate([state.kv[:, None, :m], win_kv[:, :-1]], axis=1)
            prev_score = jnp.concatenate([state.score[:, None, :m], win_score[:, :-1]], axis=1)
        else:
            prev_kv, prev_score = win_kv, win_score  # unused without overlap
        entries = self.pool(win_kv, win_score, prev_kv, prev_score, win > 0, win, self.cfg.compute_dtype)
        index = jnp.where(jnp.arange(n_win)[None] < done[:, None], win, -1)

        def pick(a, k):  # window k [b] of a [b, n_win, m, width]
            return jnp.take_along_axis(a, k[:, None, None, None], 1)[:, 0]

        # the new partial window: rows past the filled ones take the empty state's values (0, -inf), so the
        # state depends only on the tokens fed, never on what followed them in the chunk
        filled = (jnp.arange(m)[None] < ((off + n_new) % m)[:, None])[..., None]
        new_cur = [jnp.where(filled, pick(a, done), empty) for a, empty in ((win_kv, 0.0), (win_score, -jnp.inf))]
        if self.overlap:  # the last complete window becomes "previous" (unchanged if none completed)
            last = jnp.maximum(done - 1, 0)
            new_prev = [jnp.where((done > 0)[:, None, None], pick(a, last), old[:, :m])
                        for a, old in ((win_kv, state.kv), (win_score, state.score))]
            new_cur = [jnp.concatenate([p_, c_], axis=1) for p_, c_ in zip(new_prev, new_cur)]
        return entries, index, CompressorState(*new_cur)


class CompressorState(NamedTuple):
    """A compressor's partial-window state (fp32 values and gate logits incl. ape): [b, rows, width], rows =
    ratio (HCA) or 2 * ratio (CSA: the previous complete window, then the current one)."""

    kv: jax.Array
    score: jax.Array


class Indexer(nnx.Module):
    """The lightning indexer of CSA layers (architecture §3.4.5): scores I[t, s] = sum_i w[t, i] relu(q_i[t] . k[s])
    over its own compressed keys and picks the top index_topk visible entries per query."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.wq_b = param(rngs, (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), ("index_q_rows", "q_lora"),
                          pd)
        self.weights_proj = param(rngs, (cfg.index_n_heads, cfg.dim), ("index_heads", "embed"), pd)
        self.compressor = Compressor(cfg, 4, cfg.index_head_dim, rotate=True, rngs=rngs)

    def queries(self, x: jax.Array, qr: jax.Array, positions: jax.Array):
        """-> (queries [b, T, i, d], head weights [b, T, i] fp32)."""
        cfg = self.cfg
        b, T, _ = x.shape
        q = linear(qr, dense(self.wq_b), quantized=True, qat=cfg.qat).reshape(b, T, cfg.index_n_heads, -1)
        q = apply_rope(q, positions, rope_frequencies(cfg, compressed=True))
        if cfg.qat:
            q = mxfp4_fake_quant(hadamard(q), 32)
        w = linear(x, self.weights_proj[...], out_dtype=jnp.float32)
        return q, w * (cfg.index_head_dim**-0.5 * cfg.index_n_heads**-0.5)

    def __call__(self, x: jax.Array, qr: jax.Array, lay: Layout, ent: Entries) -> "IndexInputs":
        return IndexInputs(*self.queries(x, qr, lay.pos), self.compressor(x, lay, ent))


class IndexInputs(NamedTuple):
    """What the lightning indexer scores with: its queries [b, s, i, d] and head weights [b, s, i] (fp32), and the
    entries' index keys [b, n, d] (in a cached step the cache's buffer, possibly in a packed format)."""

    q: jax.Array
    weights: jax.Array
    keys: jax.Array | kv_cache.Fp8Keys | kv_cache.Fp4Keys


class Queries(NamedTuple):
    """The queries of an attention call, per query [b, s, ...]: q [b, s, h, d], position pos (in its document),
    document doc (full pass; None in a cached step) and row (full pass: the query's row t; cached step: the
    row's first new position). Attention._attend maps over chunks of them (the last one padded with _PADDING)."""

    q: jax.Array
    pos: jax.Array
    doc: jax.Array | None
    row: jax.Array


_PADDING = Queries(q=0, pos=0, doc=-1, row=0)


class PassKeys(NamedTuple):
    """The keys of a full pass, rows [window kv (T) ; compressed entries]: a query sees the window rows of its
    document up to itself and the entries the visibility rule allows (visible_ranges)."""

    doc: jax.Array  # [b, T] every token's document
    entries: Entries | None

    def of(self, c: Queries, window: int, ratio: int):
        """-> (window rows [b, chunk, window], -1 absent; visible entry slots lo <= j < hi, [b, chunk] each)."""
        win = window_indices(c.row[0], window, self.doc, c.doc)
        return win, (visible_ranges(c.pos, c.doc, self.entries.doc, self.entries.win, ratio) if ratio else None)


class StepKeys(NamedTuple):
    """The keys of a cached step, rows [window ring (W) ; this chunk (C)], then the cache's n_entries entry slots:
    position p sits in ring slot p mod W until the chunk (from the row's start) holds it."""

    n_entries: int

    def of(self, c: Queries, window: int, ratio: int):
        """-> (window rows [b, chunk, window], -1 absent; the filled entry slots lo <= j < hi, [b, chunk] each)."""
        k = c.pos[..., None] - window + 1 + jnp.arange(window)  # key positions
        start = c.row[..., None]
        win = jnp.where(k < 0, -1, jnp.where(k >= start, window + k - start, k % window))
        return win, (prefix_ranges(c.pos, self.n_entries, ratio) if ratio else None)


def window_indices(t: jax.Array, window: int, doc: jax.Array, doc_q: jax.Array) -> jax.Array:
    """Keys of queries t [q] (documents doc_q [b, q]) in the sliding window: positions t - window + 1 .. t of
    the same document -> [b, q, window], -1 where absent. doc [b, T] is every token's document."""
    T = doc.shape[1]
    j = t[:, None] - window + 1 + jnp.arange(window)  # [q, window]
    same = doc[:, jnp.clip(j, 0, T - 1)] == doc_q[:, :, None]
    return jnp.where((j >= 0) & (j < T) & same, j, -1)


def visible_entries(pos_q: jax.Array, doc_q: jax.Array, ent: Entries, ratio: int) -> jax.Array:
    """[b, q, n] bool: a query (position pos_q in document doc_q) may use entry j iff it belongs to the same
    document and its whole window ends by the query: (win + 1) * ratio <= pos + 1 (the official rule; the
    report's floor(t / m) is off by one, architecture §3.4.4)."""
    same = ent.doc[:, None, :] == doc_q[:, :, None]
    return same & ((ent.win[:, None, :] + 1) * ratio <= (pos_q + 1)[:, :, None])


def indexer_kl(q, kv, lse, comp, logits, scale: float):
    """The V3.2 indexer loss for one chunk of queries (architecture §6.2): KL(p || softmax(I)) over the compressed
    entries in `comp` ([b, s, k] kv row indices, -1 unused) whose index scores are `logits` [b, s, k], where p is
    the main attention's probability mass on each entry (its full softmax, window and sink included:
    exp(z - lse)), summed over heads and normalised over the set. The teacher carries no gradient.
    -> (sum of per-query KL, number of queries)."""
    valid = comp >= 0
    keys = jax.vmap(lambda kv_b, i_b: kv_b[i_b])(kv, jnp.where(valid, comp, 0))  # [b, s, k, d]
    z = einsum("bshd,bskd->bshk", q, keys) * scale
    p = jnp.sum(jnp.where(valid[:, :, None], jnp.exp(z - lse[..., None]), 0.0), axis=2)  # [b, s, k]
    p = jax.lax.stop_gradient(p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-30))
    log_q = jax.nn.log_softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
    kl = jnp.sum(jnp.where(valid & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)
    has = jnp.any(valid, axis=-1)
    return jnp.sum(jnp.where(has, kl, 0.0)), jnp.sum(has)


PREFIX_MIN = 64  # the shortest prefix of an entry buffer a cached step reads


def prefix_sizes(n: int) -> tuple[int, ...]:
    """The static lengths a cached step reads the entry buffer's filled prefix in (n slots): powers of two
    from PREFIX_MIN, then n. A step reads the shortest that holds what its queries see, so its cost follows the
    filled length (within 2x), not the capacity."""
    return (*(PREFIX_MIN << i for i in range(max(n - 1, 0).bit_length()) if PREFIX_MIN << i < n), n)


class Attention(nnx.Module):
    """One V4 attention layer (window-only, CSA or HCA by compress_ratios[layer])."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg, self.layer = cfg, layer
        self.ratio = cfg.compress_ratios[layer]
        h, hd = cfg.n_heads, cfg.head_dim
        self.attn_sink = param(rngs, (h,), ("heads",), jnp.float32, "const")
        self.wq_a = param(rngs, (cfg.q_lora_rank, cfg.dim), ("q_lora", "embed"), pd)
        self.q_norm = param(rngs, (cfg.q_lora_rank,), ("norm",), pd, "const", 1.0)
        self.wq_b = param(rngs, (h * hd, cfg.q_lora_rank), ("q_rows", "q_lora"), pd)
        self.wkv = param(rngs, (hd, cfg.dim), ("kv", "embed"), pd)
        self.kv_norm = param(rngs, (hd,), ("norm",), pd, "const", 1.0)
        self.wo_a = param(rngs, (cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups), ("o_groups", "o_group_in"), pd)
        self.wo_b = param(rngs, (cfg.dim, cfg.o_groups * cfg.o_lora_rank), ("embed", "o_groups"), pd)
        self.compressor = Compressor(cfg, self.ratio, hd, rotate=False, rngs=rngs) if self.ratio else None
        self.indexer = Indexer(cfg, rngs=rngs) if self.ratio == 4 else None
        # IndexCache (ModelConfig.index_topk_freq / _pattern): attend the top-k of an earlier CSA layer, given to
        # forward / step, and never run the indexer (its weights stay, unread)
        self.reuses_topk = cfg.reuses_topk(layer)

    @property
    def indexes(self) -> bool:
        """Whether this layer runs its lightning indexer (a CSA layer that does not reuse another's top-k)."""
        return self.indexer is not None and not self.reuses_topk

    def _project(self, x: jax.Array, positions: jax.Array):
        """-> q [b, s, h, d] (per-head RMS, roped), the window kv [b, s, d] (roped, fake-quantized under qat)
        and the query latent qr [b, s, q_lora] that the indexer shares."""
        cfg = self.cfg
        b, s, _ = x.shape
        freqs = rope_frequencies(cfg, compressed=bool(self.ratio))
        qr = rms_norm(linear(x, weight(self, "wq_a"), quantized=True, qat=cfg.qat), self.q_norm[...], cfg.norm_eps)
        q = linear(qr, weight(self, "wq_b"), quantized=True, qat=cfg.qat).reshape(b, s, cfg.n_heads, cfg.head_dim)
        q = apply_rope(rms_norm(q, None, cfg.norm_eps), positions, freqs)  # weightless per-head RMS, then rope
        return q, self.kv(x, positions), qr

    def kv(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The key/value entries [b, s, d] of inputs x [b, s, dim]: kv_norm(wkv(x)), roped, fake-quantized under
        qat."""
        cfg = self.cfg
        kv = rms_norm(linear(x, weight(self, "wkv"), quantized=True, qat=cfg.qat), self.kv_norm[...], cfg.norm_eps)
        kv = apply_rope(kv, positions, rope_frequencies(cfg, compressed=bool(self.ratio)))
        return kv_fake_quant(kv, cfg.rope_head_dim) if cfg.qat else kv

    def _output(self, o: jax.Array, positions: jax.Array, dtype) -> jax.Array:
        """Inverse rope of the outputs, then the grouped low-rank projection (heads in o_groups contiguous
        groups, each with its own A_g, then wo_b)."""
        cfg = self.cfg
        b, s = o.shape[:2]
        o = apply_rope(o, positions, rope_frequencies(cfg, compressed=bool(self.ratio)), inverse=True)
        g, r = cfg.o_groups, cfg.o_lora_rank
        o = o.reshape(b, s, g, -1)
        w = weight(self, "wo_a")
        lat = einsum("bsgk,grk->bsgr", o, getattr(w, "base", w).astype(o.dtype).reshape(g, r, -1))
        if isinstance(w, Adapted):  # the adapter's rows of group j, like the weight's, read group j's heads only
            h = einsum("bsgk,nk->bsgn", w.adapter_input(o), w.a.astype(o.dtype)).astype(o.dtype)
            lat = lat + w.scale * einsum("bsgn,grn->bsgr", h, w.b.astype(o.dtype).reshape(g, r, -1))
        return linear(lat.astype(dtype).reshape(b, s, g * r), weight(self, "wo_b"), quantized=True, qat=cfg.qat)

    def _index_inputs(self, x, qr):
        """With the indexer loss on, the indexer learns from it alone: its inputs carry no gradient (V3.2)."""
        stop = jax.lax.stop_gradient
        return (stop(x), stop(qr)) if self.cfg.indexer_loss else (x, qr)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [b, T, dim] (attn-normed block input) -> [b, T, dim]. segment_ids [b, T] marks packed documents:
        positions and compression windows restart at each document and nothing attends across documents."""
        return self.forward(x, segment_ids)[0]

    def forward(self, x: jax.Array, segment_ids: jax.Array | None = None, topk: jax.Array | None = None):
        """__call__, passing on the CSA top-k under IndexCache: -> (output, the top-k for the next CSA layers).
        topk is the most recent computing CSA layer's (None before any): a reusing layer attends it, a layer
        that computes its own returns that instead, every other layer returns topk unchanged. The top-k is
        kept in the query chunks of _attend, [n_chunks, b, chunk, k] entry slots (-1 unused)."""
        ratio = self.ratio
        b, T, _ = x.shape
        lay = token_layout(segment_ids, b, T)
        q, kv, qr = self._project(x, lay.pos)
        # Keys: [window kv (T rows) ; compressed entries (T // ratio slots)], as the official prefill lays them out.
        ent = entry_layout(lay, ratio) if ratio else None
        index = None
        if ratio:
            kv = jnp.concatenate([kv, self.compressor(x, lay, ent)], axis=1)
        if self.indexes:
            index = self.indexer(*self._index_inputs(x, qr), lay, ent)
        queries = Queries(q, lay.pos, lay.doc, jnp.broadcast_to(jnp.arange(T), (b, T)))
        o, topk = self._attend(queries, kv, index, PassKeys(lay.doc, ent), T, True, topk=topk)
        return self._output(o, lay.pos, x.dtype), topk

    def _attend(self, queries: Queries, kv: jax.Array, index: IndexInputs | None, keys: PassKeys | StepKeys,
                comp_offset: int, sow_stats: bool, stored=None, topk: jax.Array | None = None):
        """Sparse attention of the queries over kv rows, `attn_chunk` queries at a time. Per chunk, keys.of gives
        the window rows [b, chunk, window] and the bounds lo, hi [b, chunk] of the visible entry slots
        lo <= j < hi. The entries are kv's rows from comp_offset on (the full pass), or, with `stored` (a cached
        step), the cache's entry buffer: then a chunk reads only what it attends, the top-k rows it picked (CSA)
        or the filled prefix (HCA; a static length of prefix_sizes, chosen at run time), decoded from the cache's
        format, and appends them to its own copy of kv. With cfg.indexer_loss and sow_stats, sows the indexer KL
        (training). A layer that reuses a top-k (IndexCache) attends `topk` [n_chunks, b, chunk, k] instead of
        its indexer's. -> ([b, s, h, d], the top-k for the next CSA layers: see forward)."""
        cfg, ratio = self.cfg, self.ratio
        q = queries.q
        b, S, h, hd = q.shape
        n_comp = (n_slots(stored) if stored is not None else kv.shape[1] - comp_offset) if ratio else 0
        chunk = min(cfg.attn_chunk, S)
        xs = Queries(*(None if a is None else split_chunks(a, chunk, fill) for a, fill in zip(queries, _PADDING)))
        # the indexer's queries and weights go in chunks alongside; its keys are every chunk's
        index_xs = None if index is None else (split_chunks(index.q, chunk), split_chunks(index.weights, chunk))
        sink, scale = self.attn_sink[...], hd**-0.5
        kl_on = index is not None and cfg.indexer_loss and n_comp > 0 and sow_stats
        assert stored is None or not kl_on, "the indexer loss is a training (full pass) statistic"
        sparse = ratio == 4 and n_comp > 0 and not cfg.csa_dense
        if self.reuses_topk and sparse and topk is None:
            raise ValueError(f"layer {self.layer} reuses the top-k of an earlier CSA layer (ModelConfig."
                             "index_topk_freq / index_topk_pattern): run it through Block.forward / step with that "
                             "top-k, as Transformer does, or use a config where it computes its own")
        given = topk if self.reuses_topk else None  # the top-k this layer attends as it is
        emit = cfg.index_cache and index is not None and sparse  # return the top-k this layer computes

        def attend(c, rows, idx):
            return sparse_attention(c.q, rows, sink, idx, scale, return_lse=True, implementation=cfg.kernels)

        def every_visible(c, idx, lo, hi, n):  # HCA, or CSA's dense phase: entry slots 0 .. n - 1, masked
            rows = kv if stored is None else jnp.concatenate([kv, kv_cache.read_prefix(stored, n, kv.dtype)], 1)
            comp = jnp.where(range_mask(lo, hi, n), comp_offset + jnp.arange(n), -1)
            return attend(c, rows, jnp.concatenate([idx, comp], axis=-1)), comp

        def one_chunk(chunk_in):
            c, index_c, top = chunk_in
            ix = None if index is None else IndexInputs(*index_c, index.keys)
            idx, ranges = keys.of(c, cfg.window_size, ratio)
            comp = None
            if not n_comp:
                o, lse = attend(c, kv, idx)
            elif not sparse:
                if stored is None:
                    (o, lse), comp = every_visible(c, idx, *ranges, n_comp)
                elif stored_kernel_fits(c.q, kv, stored, cfg.kernels):  # the filled entries, read as stored
                    o, lse = stored_attention(c.q, kv, idx, stored, sink, scale, lo=ranges[0], hi=ranges[1])
                else:  # the shortest prefix holding every entry this chunk can see
                    sizes = prefix_sizes(n_comp)
                    branches = [lambda n=n: every_visible(c, idx, *ranges, n)[0] for n in sizes]
                    o, lse = jax.lax.switch(jnp.sum(jnp.asarray(sizes) < jnp.max(ranges[1])), branches)
            else:  # CSA: the indexer's top-k of the visible entries (or the one given)
                k = min(cfg.index_topk, n_comp)
                if top is None:
                    top, _ = indexer_topk(ix.q, ix.weights, ix.keys, *ranges, k, q.dtype, implementation=cfg.kernels)
                if stored is None:
                    comp = jnp.where(top >= 0, comp_offset + top, -1)
                    o, lse = attend(c, kv, jnp.concatenate([idx, comp], axis=-1))
                elif stored_kernel_fits(c.q, kv, stored, cfg.kernels):  # the picked entries, read as stored
                    o, lse = stored_attention(c.q, kv, idx, stored, sink, scale, picks=top)
                else:  # the picked rows, decoded, after kv: query i's pick j is row comp_offset + i * k + j
                    picked = kv_cache.gather(stored, top, kv.dtype)  # [b, chunk, k, d]
                    rows = jnp.concatenate([kv, picked.reshape(b, -1, hd)], axis=1)
                    comp = jnp.where(top >= 0, comp_offset + jnp.arange(top.shape[1] * k).reshape(-1, k), -1)
                    o, lse = attend(c, rows, jnp.concatenate([idx, comp], axis=-1))
            if kl_on:  # the indexer's scores of the attended entries (all visible ones, in slot order, when dense)
                slots = jnp.where(comp >= 0, comp - comp_offset, -1)
                logits = (jnp.where(comp >= 0, index_scores(ix.q, ix.weights, ix.keys, q.dtype), -jnp.inf)
                          if cfg.csa_dense else picked_scores(ix.q, ix.weights, ix.keys, slots, q.dtype))
                return o, indexer_kl(c.q, kv, lse, comp, logits, scale), top if emit else None
            return o, (jnp.zeros(()), jnp.zeros((), jnp.int32)), top if emit else None

        # Under remat, the backward pass recomputes each chunk: the map then keeps the chunk's inputs, not every
        # chunk's gathered key rows and probabilities ([chunk, keys, head_dim] and [chunk, heads, keys] each).
        body = one_chunk if cfg.remat == "none" else jax.checkpoint(one_chunk)
        o, (kl_sum, kl_count), top = jax.lax.map(body, (xs, index_xs, given))  # o: [n_chunks, b, chunk, h, hd]
        if kl_on:
            self.sow(nnx.Intermediate, "indexer_kl", jnp.sum(kl_sum) / jnp.maximum(jnp.sum(kl_count), 1))
        return join_chunks(o, S), top if emit else topk

    # ---- inference: the same layer over a cache ------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, kv_format: str, index_format: str) -> "AttentionCache":
        """An empty cache for sequences of up to max_len tokens (architecture §4.1); window ring and entries stored as
        kv_format, indexer keys as index_format (v4jax.kv_cache)."""
        cfg, m = self.cfg, self.ratio
        kv = lambda n: kv_cache.empty_kv(kv_format, (batch, n), cfg.head_dim, cfg.rope_head_dim)  # noqa: E731
        cache = AttentionCache(window=kv(cfg.window_size))
        if m:
            cache = cache._replace(entries=kv(max_len // m), state=self.compressor.init_state(batch))
        if self.indexes:
            cache = cache._replace(
                index_keys=kv_cache.empty_index_keys(index_format, (batch, max_len // m), cfg.index_head_dim),
                index_state=self.indexer.compressor.init_state(batch))
        return cache

    def step(self, x: jax.Array, cache: "AttentionCache", start: jax.Array, n_new: jax.Array,
             topk: jax.Array | None = None):
        """The next tokens of each sequence, x [b, C, dim] at positions start [b] + j (the first n_new [b] real;
        any C, 1 for decoding) -> ([b, C, dim], the cache advanced by n_new, the chunk's Pending writes, the
        top-k for the next CSA layers: as in forward, of this step's queries). Keys are the window ring (W rows),
        these tokens (C) and the compressed entries the queries can see, read from the cache's buffer up to its
        filled length only.
        `commit(cache, pending, start, n)` advances the cache before this step by any n <= n_new instead."""
        m, W = self.ratio, self.cfg.window_size
        C = x.shape[1]
        pos = start[:, None] + jnp.arange(C)
        q, kv, qr = self._project(x, pos)
        xi, qri = self._index_inputs(x, qr)
        pending = Pending(kv=kv, comp=self.compressor.project(x, pos) if m else None,
                          index=self.indexer.compressor.project(xi, pos) if self.indexes else None)
        # New entries and keys are encoded into the cache's storage format first and read from it: this step's
        # own tokens see stored entries exactly as later steps will. Keys are the rows of [window ring (W) ; this
        # chunk (C)], then the entries each query chunk reads from the cache (Attention._attend). The ring is
        # read as it was before this step's writes; the barrier orders that read before commit's in-place write
        # (without it XLA copies every layer's ring twice per step).
        kv_rows, window = jax.lax.optimization_barrier(
            (jnp.concatenate([kv_cache.read(cache.window, kv.dtype), kv], axis=1), cache.window))
        new_cache = self.commit(cache._replace(window=window), pending, start, n_new)
        index = None
        if self.indexes:
            index = IndexInputs(*self.indexer.queries(xi, qri, pos), new_cache.index_keys)
        queries = Queries(q, pos, None, jnp.broadcast_to(start[:, None], pos.shape))
        keys = StepKeys(n_slots(new_cache.entries) if m else 0)
        o, topk = self._attend(queries, kv_rows, index, keys, W + C, False, stored=new_cache.entries, topk=topk)
        return self._output(o, pos, x.dtype), new_cache, pending, topk

    def commit(self, cache: "AttentionCache", pending: "Pending", start: jax.Array, n: jax.Array) -> "AttentionCache":
        """The cache advanced by the first n [b] tokens of a chunk whose projections are `pending` (Attention.step
        at positions start [b] + j): the window ring, the compressors' partial windows, the finished compressed
        entries and indexer keys, exactly as a step over those n tokens alone would leave them."""
        new = cache
        if self.ratio:
            ent, slot, state = self.compressor.advance(*pending.comp, start, n, cache.state)
            new = new._replace(entries=kv_cache.write(cache.entries, ent, slot), state=state)
        if self.indexes:
            keys, slot, state = self.indexer.compressor.advance(*pending.index, start, n, cache.index_state)
            new = new._replace(index_keys=kv_cache.write(cache.index_keys, keys, slot), index_state=state)
        pos = start[:, None] + jnp.arange(pending.kv.shape[1])
        return new._replace(window=kv_cache.write(cache.window, pending.kv, ring_slots(pos, n, self.cfg.window_size)))


def ring_slots(pos: jax.Array, n: jax.Array, window: int) -> jax.Array:
    """Slots of a window ring (position p in slot p mod window) for a chunk at positions pos [b, C] of which the
    first n [b] are kept: the last `window` of them get their slot, the rest -1 (not written)."""
    j = jnp.arange(pos.shape[1])[None]
    return jnp.where((j < n[:, None]) & (j >= n[:, None] - window), pos % window, -1)


class Pending(NamedTuple):
    """What a cached attention step computed for its chunk and writes into the cache: the window kv [b, C, d] and
    the projections (values, gate logits) [b, C, width] of the compressor and the indexer's compressor."""

    kv: jax.Array
    comp: tuple[jax.Array, jax.Array] | None
    index: tuple[jax.Array, jax.Array] | None


class AttentionCache(NamedTuple):
    """One layer's inference state (architecture §4.1): the window ring [b, W, d] (position p in slot p mod W); for
    compressed layers the entries [b, max_len // ratio, d] and the compressor's partial window; for CSA also
    the indexer's keys [b, max_len // 4, index_head_dim] and its compressor state. Ring, entries and keys are
    plain arrays or the packed formats of v4jax.kv_cache (same [b, slots] leading dims; read them through
    kv_cache.read). Sequence lengths live in the model-level cache."""

    window: jax.Array | kv_cache.Fp8Entries
    entries: jax.Array | kv_cache.Fp8Entries | None = None
    state: CompressorState | None = None
    index_keys: jax.Array | kv_cache.Fp8Keys | kv_cache.Fp4Keys | None = None
    index_state: CompressorState | None = None
