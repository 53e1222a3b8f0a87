"""DeepSeek-V4 hybrid attention: sliding window + CSA (compressed sparse) + HCA (heavily compressed), spec §3.4.

Every layer attends over its own 128-token window of one shared K=V head (512 dims, the last 64 roped) plus a
sink. CSA layers (ratio 4) add the lightning indexer's top-k of overlapping 4-token compressed entries; HCA
layers (ratio 128) add every visible 128-token entry. Queries are processed in chunks of `attn_chunk`: each
chunk builds its own index lists (window indices, then compressed indices offset by T, -1 = unused; the layout
of the official `sparse_attn`) and gathers only its keys, so memory is O(chunk * T), never [T, T].

Letters: b batch, s/t query/key positions, h heads, d head dim, g output groups, r o_lora rank, i index heads.
"""

from __future__ import annotations

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


class Compressor(nnx.Module):
    """Gated pooling of `ratio` consecutive tokens into one KV entry (spec §3.4.3).

    Ratio 4 (CSA) overlaps: entry i pools the first halves (dims [0, head_dim)) of window i-1's tokens with the
    second halves of window i's, one softmax over the 8 candidates per channel. Ratio 128 (HCA) pools its own
    window. Entries are RMS-normed, roped at position ratio * i, then fake-quantized under qat (FP8 for the main
    compressor; Hadamard + MXFP4 for the indexer's, `rotate=True`).
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

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [b, T, dim] (tokens 0..T-1) -> the complete windows' entries [b, T // ratio, head_dim]."""
        cfg, m, d = self.cfg, self.ratio, self.head_dim
        b, T, _ = x.shape
        n = T // m
        if n == 0:  # no complete window yet
            return jnp.zeros((b, 0, d), x.dtype)
        # The official code runs the compressor projections and the pooling in fp32.
        xf = x[:, : n * m].astype(jnp.float32)
        kv = linear(xf, self.wkv[...].astype(jnp.float32)).reshape(b, n, m, -1)
        score = linear(xf, self.wgate[...].astype(jnp.float32)).reshape(b, n, m, -1) + self.ape[...]
        if self.overlap:
            # candidates of entry i: window i-1's first halves (absent for i = 0), then window i's second halves
            def prev(a, fill):
                return jnp.pad(a[:, :-1, :, :d], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=fill)

            kv = jnp.concatenate([prev(kv, 0.0), kv[..., d:]], axis=2)
            score = jnp.concatenate([prev(score, -jnp.inf), score[..., d:]], axis=2)
        pooled = jnp.sum(kv * jax.nn.softmax(score, axis=2), axis=2)  # [b, n, d]
        entry = rms_norm(pooled.astype(x.dtype), self.norm[...], cfg.norm_eps)
        positions = (jnp.arange(n) * m)[None]
        entry = apply_rope(entry, positions, rope_frequencies(cfg, compressed=True))
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

    def __call__(self, x: jax.Array, qr: jax.Array, positions: jax.Array):
        """-> (queries [b, T, i, d], head weights [b, T, i] fp32, keys [b, T // 4, d])."""
        cfg = self.cfg
        b, T, _ = x.shape
        q = linear(qr, dense(self.wq_b), quantized=True, qat=cfg.qat).reshape(b, T, cfg.index_n_heads, -1)
        q = apply_rope(q, positions, rope_frequencies(cfg, compressed=True))
        if cfg.qat:
            q = mxfp4_fake_quant(hadamard(q), 32)
        w = linear(x, self.weights_proj[...], out_dtype=jnp.float32)
        w = w * (cfg.index_head_dim**-0.5 * cfg.index_n_heads**-0.5)
        return q, w, self.compressor(x)


def window_indices(t: jax.Array, window: int, T: int) -> jax.Array:
    """Key positions max(0, t - window + 1) .. t of each query t [q] -> [q, window], -1 where absent
    (before 0, or past the T real tokens for padded queries)."""
    win = t[:, None] - window + 1 + jnp.arange(window)
    return jnp.where((win >= 0) & (win <= t[:, None]) & (win < T), win, -1)


def visible_entries(t: jax.Array, n_comp: int, ratio: int) -> jax.Array:
    """[q, n_comp] bool: query t may use compressed entry i iff its whole window ends by t,
    (i + 1) * ratio <= t + 1 (the official rule; the report's floor(t / m) is off by one, spec §3.4.4)."""
    return (jnp.arange(n_comp)[None, :] + 1) * ratio <= (t + 1)[:, None]


def index_scores(q: jax.Array, w: jax.Array, keys: jax.Array, dtype) -> jax.Array:
    """I[b, s, t] = sum_i w[b, s, i] * relu(q[b, s, i] . keys[b, t]), rounded to `dtype` (BF16 in BF16 runs,
    as the official code stores index scores)."""
    dots = einsum("bsid,btd->bsit", q, keys)
    return jnp.sum(jax.nn.relu(dots) * w[..., None], axis=2).astype(dtype).astype(jnp.float32)


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

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [b, T, dim] (attn-normed block input, positions 0..T-1) -> [b, T, dim]."""
        cfg, ratio = self.cfg, self.ratio
        b, T, _ = x.shape
        h, hd, rd, qat = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.qat
        positions = jnp.arange(T)[None]
        freqs = rope_frequencies(cfg, compressed=bool(ratio))

        qr = rms_norm(linear(x, dense(self.wq_a), quantized=True, qat=qat), self.q_norm[...], cfg.norm_eps)
        q = linear(qr, dense(self.wq_b), quantized=True, qat=qat).reshape(b, T, h, hd)
        q = apply_rope(rms_norm(q, None, cfg.norm_eps), positions, freqs)  # per-head weightless RMS, then rope

        kv = rms_norm(linear(x, dense(self.wkv), quantized=True, qat=qat), self.kv_norm[...], cfg.norm_eps)
        kv = apply_rope(kv, positions, freqs)
        if qat:
            kv = kv_fake_quant(kv, rd)

        # Keys: [window kv (T rows) ; compressed entries (T // ratio rows)], as the official prefill lays them out.
        n_comp = T // ratio if ratio else 0
        if ratio:
            kv = jnp.concatenate([kv, self.compressor(x)], axis=1)
        index = self.indexer(x, qr, positions) if self.indexer is not None else None

        o = self._attend(q, kv, index, T, n_comp)
        o = apply_rope(o, positions, freqs, inverse=True)

        # Grouped low-rank output: heads split into o_groups contiguous groups, each with its own A_g.
        g, r = cfg.o_groups, cfg.o_lora_rank
        o = o.reshape(b, T, g, -1)
        o = einsum("bsgk,grk->bsgr", o, dense(self.wo_a).astype(o.dtype).reshape(g, r, -1)).astype(x.dtype)
        return linear(o.reshape(b, T, g * r), dense(self.wo_b), quantized=True, qat=qat)

    def _attend(self, q, kv, index, T: int, n_comp: int) -> jax.Array:
        """Attention over [window ; compressed] for all T queries, `attn_chunk` queries at a time."""
        cfg = self.cfg
        b, _, h, hd = q.shape
        chunk = min(cfg.attn_chunk, T)
        n_chunks = -(-T // chunk)
        pad = n_chunks * chunk - T

        def split(a):  # [b, T, ...] -> [n_chunks, b, chunk, ...]
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            return jnp.moveaxis(a.reshape(b, n_chunks, chunk, *a.shape[2:]), 1, 0)

        xs = {"q": split(q), "t": jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)}
        if index is not None:
            xs["iq"], xs["iw"] = split(index[0]), split(index[1])
        sink = self.attn_sink[...]

        def one_chunk(c):
            t = c["t"]  # [chunk] query positions
            win = window_indices(t, cfg.window_size, T)
            idx = jnp.broadcast_to(win, (b,) + win.shape)
            if n_comp:
                visible = visible_entries(t, n_comp, self.ratio)
                if index is None:  # HCA: every visible entry
                    comp = jnp.broadcast_to(jnp.where(visible, T + jnp.arange(n_comp), -1), (b, chunk, n_comp))
                else:  # CSA: the indexer's top-k of the visible entries
                    scores = index_scores(c["iq"], c["iw"], index[2], q.dtype)
                    scores = jnp.where(visible[None], scores, -jnp.inf)
                    top = jax.lax.top_k(scores, min(cfg.index_topk, n_comp))[1]
                    ok = jnp.take_along_axis(jnp.broadcast_to(visible[None], scores.shape), top, axis=-1)
                    comp = jnp.where(ok, T + top, -1)
                idx = jnp.concatenate([idx, comp], axis=-1)
            return sparse_attention(c["q"], kv, sink, idx, hd**-0.5)

        o = jax.lax.map(one_chunk, xs)  # [n_chunks, b, chunk, h, hd]
        return jnp.moveaxis(o, 0, 1).reshape(b, n_chunks * chunk, h, hd)[:, :T]
