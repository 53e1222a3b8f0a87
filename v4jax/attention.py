"""DeepSeek-V4 hybrid attention: sliding window + CSA (compressed sparse) + HCA (heavily compressed), spec §3.4.

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

from kernels.sparse_attention import sparse_attention
from v4jax.config import ModelConfig
from v4jax.layers import apply_rope, param, rms_norm, rope_frequencies
from v4jax.quant import dense, einsum, fp8_fake_quant, hadamard, linear, mxfp4_fake_quant


def kv_fake_quant(kv: jax.Array, rope_dim: int) -> jax.Array:
    """QAT of a KV entry: FP8 in 1x64 blocks on the non-rope dims; rope dims untouched (spec §3.4.2)."""
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
    """Gated pooling of `ratio` consecutive tokens into one KV entry (spec §3.4.3).

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

    def __call__(self, x: jax.Array, ent: Entries) -> jax.Array:
        """x [b, T, dim] -> the entries [b, n, head_dim] of the complete windows listed in `ent`."""
        cfg, m, d = self.cfg, self.ratio, self.head_dim
        b, n = ent.start.shape
        if n == 0:  # no complete window yet
            return jnp.zeros((b, 0, d), x.dtype)
        # The official code runs the compressor projections and the pooling in fp32.
        xf = x.astype(jnp.float32)
        tokens = ent.start[..., None] + jnp.arange(m)  # [b, n, m]
        gather = jax.vmap(lambda a, i: a[i])
        kv = gather(linear(xf, self.wkv[...].astype(jnp.float32)), tokens)  # [b, n, m, width]
        score = gather(linear(xf, self.wgate[...].astype(jnp.float32)), tokens) + self.ape[...]
        if self.overlap:
            # candidates of entry i: window i-1's first halves (absent at a document's first window), then
            # window i's second halves. A document's windows sit in consecutive slots.
            def prev(a, fill):
                a = jnp.pad(a[:, :-1, :, :d], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=fill)
                return jnp.where((ent.win > 0)[..., None, None], a, fill)

            kv = jnp.concatenate([prev(kv, 0.0), kv[..., d:]], axis=2)
            score = jnp.concatenate([prev(score, -jnp.inf), score[..., d:]], axis=2)
        pooled = jnp.sum(kv * jax.nn.softmax(score, axis=2), axis=2)  # [b, n, d]
        entry = rms_norm(pooled.astype(x.dtype), self.norm[...], cfg.norm_eps)
        entry = apply_rope(entry, ent.win * m, rope_frequencies(cfg, compressed=True))
        if cfg.qat:
            entry = mxfp4_fake_quant(hadamard(entry), 32) if self.rotate else kv_fake_quant(entry, cfg.rope_head_dim)
        return entry


class Indexer(nnx.Module):
    """The lightning indexer of CSA layers (spec §3.4.5): scores I[t, s] = sum_i w[t, i] relu(q_i[t] . k[s])
    over its own compressed keys and picks the top index_topk visible entries per query."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.wq_b = param(rngs, (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), ("index_heads", "q_lora"), pd)
        self.weights_proj = param(rngs, (cfg.index_n_heads, cfg.dim), ("index_heads", "embed"), pd)
        self.compressor = Compressor(cfg, 4, cfg.index_head_dim, rotate=True, rngs=rngs)

    def __call__(self, x: jax.Array, qr: jax.Array, positions: jax.Array, ent: Entries):
        """-> (queries [b, T, i, d], head weights [b, T, i] fp32, keys [b, n, d])."""
        cfg = self.cfg
        b, T, _ = x.shape
        q = linear(qr, dense(self.wq_b), quantized=True, qat=cfg.qat).reshape(b, T, cfg.index_n_heads, -1)
        q = apply_rope(q, positions, rope_frequencies(cfg, compressed=True))
        if cfg.qat:
            q = mxfp4_fake_quant(hadamard(q), 32)
        w = linear(x, self.weights_proj[...], out_dtype=jnp.float32)
        w = w * (cfg.index_head_dim**-0.5 * cfg.index_n_heads**-0.5)
        return q, w, self.compressor(x, ent)


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
    report's floor(t / m) is off by one, spec §3.4.4)."""
    same = ent.doc[:, None, :] == doc_q[:, :, None]
    return same & ((ent.win[:, None, :] + 1) * ratio <= (pos_q + 1)[:, :, None])


def index_scores(q: jax.Array, w: jax.Array, keys: jax.Array, dtype) -> jax.Array:
    """I[b, s, t] = sum_i w[b, s, i] * relu(q[b, s, i] . keys[b, t]), rounded to `dtype` (BF16 in BF16 runs,
    as the official code stores index scores)."""
    dots = einsum("bsid,btd->bsit", q, keys)
    return jnp.sum(jax.nn.relu(dots) * w[..., None], axis=2).astype(dtype).astype(jnp.float32)


def indexer_kl(q, kv, lse, comp, scores, T: int, scale: float):
    """The V3.2 indexer loss for one chunk of queries (spec §6.2): KL(p || softmax(I)) over the compressed
    entries in `comp` ([b, s, k], kv row indices T + j, -1 unused), where p is the main attention's probability
    mass on each entry (its full softmax, window and sink included: exp(z - lse)), summed over heads and
    normalised over the set. The teacher carries no gradient. -> (sum of per-query KL, number of queries)."""
    valid = comp >= 0
    keys = jax.vmap(lambda kv_b, i_b: kv_b[i_b])(kv, jnp.where(valid, comp, 0))  # [b, s, k, d]
    z = einsum("bshd,bskd->bshk", q, keys) * scale
    p = jnp.sum(jnp.where(valid[:, :, None], jnp.exp(z - lse[..., None]), 0.0), axis=2)  # [b, s, k]
    p = jax.lax.stop_gradient(p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-30))
    logits = jnp.where(valid, jnp.take_along_axis(scores, jnp.where(valid, comp - T, 0), axis=-1), -jnp.inf)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    kl = jnp.sum(jnp.where(valid & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)
    has = jnp.any(valid, axis=-1)
    return jnp.sum(jnp.where(has, kl, 0.0)), jnp.sum(has)


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
        self.wq_b = param(rngs, (h * hd, cfg.q_lora_rank), ("heads", "q_lora"), pd)
        self.wkv = param(rngs, (hd, cfg.dim), ("kv", "embed"), pd)
        self.kv_norm = param(rngs, (hd,), ("norm",), pd, "const", 1.0)
        self.wo_a = param(rngs, (cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups), ("o_groups", "o_group_in"), pd)
        self.wo_b = param(rngs, (cfg.dim, cfg.o_groups * cfg.o_lora_rank), ("embed", "o_groups"), pd)
        self.compressor = Compressor(cfg, self.ratio, hd, rotate=False, rngs=rngs) if self.ratio else None
        self.indexer = Indexer(cfg, rngs=rngs) if self.ratio == 4 else None

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [b, T, dim] (attn-normed block input) -> [b, T, dim]. segment_ids [b, T] marks packed documents:
        positions and compression windows restart at each document and nothing attends across documents."""
        cfg, ratio = self.cfg, self.ratio
        b, T, _ = x.shape
        h, hd, rd, qat = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.qat
        lay = token_layout(segment_ids, b, T)
        freqs = rope_frequencies(cfg, compressed=bool(ratio))

        qr = rms_norm(linear(x, dense(self.wq_a), quantized=True, qat=qat), self.q_norm[...], cfg.norm_eps)
        q = linear(qr, dense(self.wq_b), quantized=True, qat=qat).reshape(b, T, h, hd)
        q = apply_rope(rms_norm(q, None, cfg.norm_eps), lay.pos, freqs)  # per-head weightless RMS, then rope

        kv = rms_norm(linear(x, dense(self.wkv), quantized=True, qat=qat), self.kv_norm[...], cfg.norm_eps)
        kv = apply_rope(kv, lay.pos, freqs)
        if qat:
            kv = kv_fake_quant(kv, rd)

        # Keys: [window kv (T rows) ; compressed entries (T // ratio slots)], as the official prefill lays them out.
        ent = entry_layout(lay, ratio) if ratio else None
        if ratio:
            kv = jnp.concatenate([kv, self.compressor(x, ent)], axis=1)
        index = None
        if self.indexer is not None:
            # With the indexer loss on, the indexer learns from it alone: its inputs carry no gradient (V3.2).
            xi, qri = (jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)) if cfg.indexer_loss else (x, qr)
            index = self.indexer(xi, qri, lay.pos, ent)

        o = self._attend(q, kv, index, lay, ent)
        o = apply_rope(o, lay.pos, freqs, inverse=True)

        # Grouped low-rank output: heads split into o_groups contiguous groups, each with its own A_g.
        g, r = cfg.o_groups, cfg.o_lora_rank
        o = o.reshape(b, T, g, -1)
        o = einsum("bsgk,grk->bsgr", o, dense(self.wo_a).astype(o.dtype).reshape(g, r, -1)).astype(x.dtype)
        return linear(o.reshape(b, T, g * r), dense(self.wo_b), quantized=True, qat=qat)

    def _attend(self, q, kv, index, lay: Layout, ent: Entries | None) -> jax.Array:
        """Attention over [window ; compressed] for all T queries, `attn_chunk` queries at a time."""
        cfg, ratio = self.cfg, self.ratio
        b, T, h, hd = q.shape
        n_comp = ent.start.shape[1] if ent is not None else 0
        chunk = min(cfg.attn_chunk, T)
        n_chunks = -(-T // chunk)
        pad = n_chunks * chunk - T

        def split(a, fill=0):  # [b, T, ...] -> [n_chunks, b, chunk, ...]; padded queries see no keys (doc -1)
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
            return jnp.moveaxis(a.reshape(b, n_chunks, chunk, *a.shape[2:]), 1, 0)

        xs = {"q": split(q), "doc": split(lay.doc, -1), "pos": split(lay.pos),
              "t": jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)}
        if index is not None:
            xs["iq"], xs["iw"] = split(index[0]), split(index[1])
        sink, scale = self.attn_sink[...], hd**-0.5
        kl_on = index is not None and cfg.indexer_loss and n_comp > 0
        use_indexer = index is not None and (kl_on or not cfg.csa_dense)

        def one_chunk(c):
            idx = window_indices(c["t"], cfg.window_size, lay.doc, c["doc"])
            comp = None
            if n_comp:
                visible = visible_entries(c["pos"], c["doc"], ent, ratio)
                all_visible = jnp.where(visible, T + jnp.arange(n_comp), -1)
                if use_indexer:
                    scores = jnp.where(visible, index_scores(c["iq"], c["iw"], index[2], q.dtype), -jnp.inf)
                if index is None or cfg.csa_dense:  # HCA, or CSA's dense phase: every visible entry
                    comp = all_visible
                else:  # CSA: the indexer's top-k of the visible entries
                    top = jax.lax.top_k(scores, min(cfg.index_topk, n_comp))[1]
                    comp = jnp.where(jnp.take_along_axis(visible, top, axis=-1), T + top, -1)
                idx = jnp.concatenate([idx, comp], axis=-1)
            o, lse = sparse_attention(c["q"], kv, sink, idx, scale, return_lse=True)
            if kl_on:
                return o, indexer_kl(c["q"], kv, lse, comp, scores, T, scale)
            return o, (jnp.zeros(()), jnp.zeros((), jnp.int32))

        o, (kl_sum, kl_count) = jax.lax.map(one_chunk, xs)  # o: [n_chunks, b, chunk, h, hd]
        if kl_on:
            self.sow(nnx.Intermediate, "indexer_kl", jnp.sum(kl_sum) / jnp.maximum(jnp.sum(kl_count), 1))
        return jnp.moveaxis(o, 0, 1).reshape(b, n_chunks * chunk, h, hd)[:, :T]
