"""The DSpark drafter of the GA checkpoints (Flash-0731, Pro-0813), architecture §8.3-8.4.

    target layers' outputs, mean over the hc streams, concatenated -> main_hidden [b, s, n_targets * dim]
    main_x = main_norm(main_proj(main_hidden))           (stage 0's weights; once per committed position)
    each stage keeps a window ring of kv_norm(wkv(main_x)) roped at its position (slot = position mod W)

    one draft block after the committed positions < L, anchor = the next token (sampled from the target):
    ids [anchor, noise x (B - 1)] at positions L .. L + B - 1 -> embed -> hc streams
      -> for each stage: a V4 block (window-only, score-routed MoE) whose attention sees the stage's ring and
         every slot of the block (bidirectional inside the block)
      -> last stage: h = hc_head(x) (sigmoid gate), logits = head(norm(h)) in fp32
      -> for i = 0 .. B-1 in order: e_i = markov_w1[out_i], logits_i += markov_w2 @ e_i, out_{i+1} = sample(logits_i)
         (out_0 = anchor), confidence_i = proj([h_i ; e_i]) (pre-norm h)

Slot i proposes the token at position L + 1 + i. The embedding and LM head are the target's. Parameter names
follow the official per-stage modules: stage 0 owns main_proj / main_norm, the last stage the head pieces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.sparse_attention import sparse_attention
from v4jax import kv_cache
from v4jax.attention import Attention, ring_slots
from v4jax.block import STREAMS, Block, HCSite
from v4jax.config import ModelConfig
from v4jax.hyper_connection import hc_head, hc_post
from v4jax.layers import param, rms_norm
from v4jax.quant import dense, linear
from v4jax.sharding import constrain


class DSparkAttention(Attention):
    """A drafter stage's attention over N blocks of B = cfg.dspark_block_size consecutive query slots: queries and
    the blocks' own keys from x, the other keys from context entries `kv(main_x, positions)` (at inference the
    stage's ring, written by Drafter.write_rings; in training every position of the row)."""

    def __call__(self, x: jax.Array, ctx: jax.Array, ctx_idx: jax.Array, positions: jax.Array) -> jax.Array:
        """x [b, N * B, dim] (attn-normed blocks), ctx [b, T, d] (decoded entries), ctx_idx [b, N * B, K] the
        entries each query sees (-1: none), positions [b, N * B] -> [b, N * B, dim]. Every query also sees all B
        slots of its own block (bidirectional inside a block) and nothing of the other blocks."""
        cfg = self.cfg
        b, S, _ = x.shape
        B, T = cfg.dspark_block_size, ctx.shape[1]
        q, kv, _ = self._project(x, positions)
        own = T + jnp.arange(S)[:, None] // B * B + jnp.arange(B)  # [S, B]: the block's keys after the context
        idx = jnp.concatenate([ctx_idx, jnp.broadcast_to(own, (b, S, B))], axis=-1)
        o = sparse_attention(q, jnp.concatenate([ctx.astype(kv.dtype), kv], axis=1), self.attn_sink[...], idx,
                             cfg.head_dim**-0.5, implementation=cfg.kernels)
        return self._output(o, positions, x.dtype)


def ring_index(n_ring: jax.Array, window: int, n_queries: int) -> jax.Array:
    """The context index of a block over a ring of `window` slots of which the first n_ring [b] are filled:
    [b, n_queries, window], -1 for the empty slots."""
    slots = jnp.arange(window)
    idx = jnp.where(slots[None] < n_ring[:, None], slots, -1)
    return jnp.broadcast_to(idx[:, None], (n_ring.shape[0], n_queries, window))


def context_index(anchors: jax.Array, segment_ids: jax.Array, window: int, block: int) -> jax.Array:
    """Training's context index: the block at anchor a (anchors [b, N]) sees the row positions a - window .. a - 1
    that exist and lie in a's document (segment_ids [b, L]) -> [b, N * block, window] (-1: none), the same for the
    block's B queries. This is what the ring holds when a is the next position at inference."""
    b, N = anchors.shape
    t = anchors[..., None] - window + jnp.arange(window)  # [b, N, window]
    seg_t = jnp.take_along_axis(segment_ids, jnp.maximum(t, 0).reshape(b, -1), axis=1).reshape(t.shape)
    seg_a = jnp.take_along_axis(segment_ids, anchors, axis=1)
    idx = jnp.where((t >= 0) & (seg_t == seg_a[..., None]), t, -1)
    return jnp.repeat(idx, block, axis=1)


class MarkovHead(nnx.Module):
    """The low-rank correction from the previous draft token: markov_w1 is an embedding [vocab, rank],
    markov_w2 a rank -> vocab linear in the [out, in] layout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.markov_w1 = param(rngs, (cfg.vocab_size, cfg.dspark_markov_rank), ("vocab", "markov_rank"), pd)
        self.markov_w2 = param(rngs, (cfg.vocab_size, cfg.dspark_markov_rank), ("vocab", "markov_rank"), pd)


class ConfidenceHead(nnx.Module):
    """One acceptance logit per draft slot from [h ; e] (no bias), in fp32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.proj = param(rngs, (1, cfg.dim + cfg.dspark_markov_rank), (None, "confidence_in"),
                          jnp.dtype(cfg.param_dtype))


class DSparkStage(Block):
    """Stage s of the drafter: a V4 block at layer id n_layers + s (window-only, score routed) with DSpark
    attention; stage 0 also holds main_proj / main_norm, the last stage the head collapse, norm, Markov and
    confidence heads."""

    attention_cls = DSparkAttention

    def __init__(self, cfg: ModelConfig, stage: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.n_layers + stage, rngs=rngs)
        pd = jnp.dtype(cfg.param_dtype)
        if stage == 0:
            n_in = len(cfg.dspark_target_layer_ids) * cfg.dim
            self.main_proj = param(rngs, (cfg.dim, n_in), ("mtp", "embed"), pd)
            self.main_norm = param(rngs, (cfg.dim,), ("norm",), pd, "const", 1.0)
        if stage == cfg.n_mtp_layers - 1:
            self.norm = param(rngs, (cfg.dim,), ("norm",), pd, "const", 1.0)
            self.hc_head = HCSite(cfg, True, rngs=rngs)
            self.markov_head = MarkovHead(cfg, rngs=rngs)
            self.confidence_head = ConfidenceHead(cfg, rngs=rngs)

    def __call__(self, x, ctx, ctx_idx, positions, token_ids):
        """x [b, N * B, hc, d] streams of N blocks, the context as in DSparkAttention -> the same after this
        stage."""
        eps = self.cfg.norm_eps
        u, post, comb = self.hc_attn.pre(x)
        x = hc_post(self.attn(rms_norm(u, self.attn_norm[...], eps), ctx, ctx_idx, positions), x, post, comb)
        u, post, comb = self.hc_ffn.pre(x)
        return hc_post(self.ffn(rms_norm(u, self.ffn_norm[...], eps), token_ids, False), x, post, comb)


class Drafter(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.stages = nnx.List([DSparkStage(cfg, s, rngs=rngs) for s in range(cfg.n_mtp_layers)])

    def main_x(self, main_hidden: jax.Array) -> jax.Array:
        """main_hidden [b, s, n_targets * dim] -> the rings' input main_x [b, s, dim]."""
        cfg, first = self.cfg, self.stages[0]
        y = linear(main_hidden, dense(first.main_proj), quantized=True, qat=cfg.qat)
        return rms_norm(y, first.main_norm[...], cfg.norm_eps)

    def init_rings(self, batch: int, kv_format: str) -> tuple:
        cfg = self.cfg
        return tuple(kv_cache.empty_kv(kv_format, (batch, cfg.window_size), cfg.head_dim, cfg.rope_head_dim)
                     for _ in self.stages)

    def write_rings(self, rings: tuple, main_hidden: jax.Array, start: jax.Array, n: jax.Array) -> tuple:
        """The rings after positions start [b] + j, j < n [b], whose main_hidden [b, C, ..] is given."""
        main_x = self.main_x(main_hidden)
        pos = start[:, None] + jnp.arange(main_x.shape[1])
        slots = ring_slots(pos, n, self.cfg.window_size)
        return tuple(kv_cache.write(ring, stage.attn.kv(main_x, pos), slots) for stage, ring in zip(self.stages, rings))

    def draft(self, rings: tuple, lengths: jax.Array, anchor: jax.Array, embed_tokens, head: jax.Array,
              temperature: float = 0.0, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One block of B drafts after `lengths` [b] committed tokens, anchor [b] the next token (see the module
        docstring). Tokens are sampled from softmax(logits / temperature) (argmax at 0; key needed otherwise).
        -> (tokens [b, B] int32, Markov-corrected logits [b, B, vocab] fp32, confidence logits [b, B] fp32)."""
        cfg = self.cfg
        b, B = anchor.shape[0], cfg.dspark_block_size
        ids = jnp.concatenate([anchor[:, None].astype(jnp.int32),
                               jnp.full((b, B - 1), cfg.dspark_noise_token_id, jnp.int32)], axis=1)
        dtype = jnp.dtype(cfg.compute_dtype)
        ctxs = [kv_cache.read(ring, dtype) for ring in rings]
        idx = ring_index(jnp.minimum(lengths, cfg.window_size), cfg.window_size, B)
        h, logits = self._blocks(ids, lengths[:, None] + jnp.arange(B), ctxs, idx, embed_tokens, head)
        tokens, logits, e = markov_sample(logits, anchor, self.stages[-1].markov_head, temperature, key, h.dtype)
        return tokens, logits, self._confidence(h, e)

    def teacher_forced(self, main_hidden: jax.Array, tokens: jax.Array, segment_ids: jax.Array, anchors: jax.Array,
                       embed_tokens, head: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Training (architecture §8.5): the blocks of rows tokens [b, L] (segment_ids [b, L] their documents,
        main_hidden [b, L, n_targets * dim] the target's) at anchors [b, N] (positions a with a + B <= L), all in
        one pass. Block n is [tokens[a], noise x (B - 1)] at positions a .. a + B - 1; its queries see the row
        positions of a's document in a - W .. a - 1 (context_index: the ring at inference) and their own block;
        the Markov term is teacher-forced, its previous tokens being tokens[a .. a + B - 1] (the anchor, then the
        true tokens), so that slot k's logits are draft()'s whenever the drafts before k were right.
        -> (Markov-corrected logits [b, N, B, vocab] fp32, confidence logits [b, N, B] fp32)."""
        cfg = self.cfg
        b, L = tokens.shape
        N, B = anchors.shape[1], cfg.dspark_block_size
        main_x = self.main_x(main_hidden)
        row = jnp.broadcast_to(jnp.arange(L), (b, L))
        ctxs = [stage.attn.kv(main_x, row) for stage in self.stages]
        pos = (anchors[..., None] + jnp.arange(B)).reshape(b, N * B)
        prev = jnp.take_along_axis(tokens, pos, axis=1).astype(jnp.int32)  # [anchor, gt_0 .. gt_{B-2}] per block
        ids = jnp.where(jnp.arange(N * B) % B == 0, prev, cfg.dspark_noise_token_id)
        idx = context_index(anchors, segment_ids, cfg.window_size, B)
        h, logits = self._blocks(ids, pos, ctxs, idx, embed_tokens, head)
        markov = self.stages[-1].markov_head
        e = markov.markov_w1[...][prev].astype(h.dtype)
        logits = logits + linear(e.astype(jnp.float32), markov.markov_w2[...].astype(jnp.float32))
        conf = self._confidence(h, e)
        return logits.reshape(b, N, B, -1), conf.reshape(b, N, B)

    def _blocks(self, ids, positions, ctxs, ctx_idx, embed_tokens, head):
        """The stages over blocks ids [b, N * B] at positions [b, N * B] with context ctxs (one [b, T, d] per
        stage) seen through ctx_idx -> (the pre-norm h [b, N * B, dim], head logits before the Markov term, fp32)."""
        cfg = self.cfg
        e0 = embed_tokens(ids)
        x = constrain(jnp.broadcast_to(e0[:, :, None, :], e0.shape[:2] + (cfg.hc_mult, cfg.dim)), STREAMS)
        for stage, ctx in zip(self.stages, ctxs):
            x = constrain(stage(x, ctx, ctx_idx, positions, ids), STREAMS)
        last = self.stages[-1]
        site = last.hc_head
        h = hc_head(x, site.fn[...], site.scale[...], site.base[...], eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
        return h, linear(rms_norm(h, last.norm[...], cfg.norm_eps).astype(jnp.float32), head.astype(jnp.float32))

    def _confidence(self, h: jax.Array, e: jax.Array) -> jax.Array:
        """One acceptance logit per slot from the pre-norm h and the Markov embedding e, in fp32."""
        return linear(jnp.concatenate([h.astype(jnp.float32), e.astype(jnp.float32)], axis=-1),
                      self.stages[-1].confidence_head.proj[...].astype(jnp.float32))[..., 0]


def markov_sample(logits: jax.Array, anchor: jax.Array, markov: MarkovHead, temperature: float,
                  key: jax.Array | None, dtype):
    """The sequential Markov correction over the slots of logits [b, B, vocab] (fp32): slot i adds
    markov_w2 @ markov_w1[out_i] (out_0 = anchor, out_{i+1} the token drawn from slot i) -> (tokens [b, B],
    corrected logits [b, B, vocab], the embeddings e_i [b, B, rank])."""
    w1, w2 = markov.markov_w1[...], markov.markov_w2[...].astype(jnp.float32)
    B = logits.shape[1]
    if temperature > 0 and key is None:
        raise ValueError("sampling drafts (temperature > 0) needs a PRNG key")
    keys = jax.random.split(key, B) if temperature > 0 else jnp.zeros((B,), jnp.uint32)

    def slot(prev, xs):
        li, ki = xs
        e = w1[prev].astype(dtype)
        li = li + linear(e.astype(jnp.float32), w2)
        tok = jnp.argmax(li, axis=-1) if temperature == 0 else jax.random.categorical(ki, li / temperature, axis=-1)
        tok = tok.astype(jnp.int32)
        return tok, (tok, li, e)

    _, (tokens, logits, e) = jax.lax.scan(slot, anchor.astype(jnp.int32), (jnp.moveaxis(logits, 1, 0), keys))
    return tuple(jnp.moveaxis(a, 0, 1) for a in (tokens, logits, e))
