"""The DeepSeek-V4 model: embedding, mHC blocks, final head and the MTP block (architecture §3).

    tokens -> embed -> copy into hc_mult streams X [b, s, hc, d]
           -> for each layer: X = hc_post(attn(attn_norm(hc_pre(X)))); X = hc_post(moe(ffn_norm(hc_pre(X))))
           -> hc_head collapse -> norm -> head -> logits (fp32)
    MTP (depth 1): X_mtp = e_proj(enorm(embed(next tokens))) + h_proj(hnorm(X)) per stream -> one more block
           (window-only, score routed) -> its own hc_head -> its own norm -> the shared head.

Layers differ (window / CSA / HCA attention, hash or score routing), so they are a Python list: the parameter
tree (and checkpoint format) is per layer. With cfg.scan_layers the repeating (CSA, HCA) pairs after the first
ones run as one lax.scan over their parameters stacked inside the step (compile time stops growing with depth).
Under IndexCache (cfg.index_topk_freq / index_topk_pattern) the layers pass the CSA top-k along (Block.forward),
through the scan's carry too, one scan step then covering a period of the CSA layers' roles (scan_range).
cfg.remat rematerialises each block (or each scanned pair). The residual streams are sharding-constrained at
block boundaries only (v4jax.sharding.constrain; a no-op without active rules).
Einsum letters used across v4jax: b batch, s query positions, t key positions, d model, h heads, k head dim,
e experts, f expert hidden, g output groups, r o_lora rank, i indexer heads, c hyper-connection streams.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import kv_cache
from v4jax.attention import AttentionCache
from v4jax.block import STREAMS, Block, HCSite
from v4jax.config import ModelConfig
from v4jax.dspark import Drafter
from v4jax.hyper_connection import hc_head
from v4jax.layers import param, rms_norm
from v4jax.moe import HashTable
from v4jax.numerics import mean
from v4jax.quant import dense, linear
from v4jax.sharding import constrain

REMAT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class MTPBlock(Block):
    """Multi-token prediction, depth 1 (architecture §3.7). Shares the embedding and head with the main model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.n_layers, rngs=rngs)
        pd = jnp.dtype(cfg.param_dtype)
        self.e_proj = param(rngs, (cfg.dim, cfg.dim), ("mtp", "embed"), pd)
        self.h_proj = param(rngs, (cfg.dim, cfg.dim), ("mtp", "embed"), pd)
        self.enorm = param(rngs, (cfg.dim,), ("norm",), pd, "const", 1.0)
        self.hnorm = param(rngs, (cfg.dim,), ("norm",), pd, "const", 1.0)
        self.norm = param(rngs, (cfg.dim,), ("norm",), pd, "const", 1.0)
        self.hc_head = HCSite(cfg, True, rngs=rngs)

    def mix_inputs(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """e_proj(enorm(emb)) broadcast to the streams + h_proj(hnorm(x)) per stream: the block's input."""
        cfg = self.cfg
        e = linear(rms_norm(emb, self.enorm[...], cfg.norm_eps), dense(self.e_proj), quantized=True, qat=cfg.qat)
        h = linear(rms_norm(x, self.hnorm[...], cfg.norm_eps), dense(self.h_proj), quantized=True, qat=cfg.qat)
        return e[:, :, None, :] + h

    def __call__(self, x: jax.Array, emb: jax.Array, token_ids: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """x: the main model's final streams [b, s, hc, d]; emb: embeddings of `token_ids` [b, s, d]
        (the tokens one step ahead in training) -> this block's output streams."""
        return super().__call__(self.mix_inputs(x, emb), token_ids, segment_ids)


class Transformer(nnx.Module):
    """DeepSeek-V4 for causal LM. `__call__` returns fp32 logits; `mtp_logits` runs the MTP head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), pd)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.norm = param(rngs, (cfg.dim,), ("norm",), pd, "const", 1.0)
        self.hc_head = HCSite(cfg, True, rngs=rngs)
        self.head = param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), pd)
        self.mtp = MTPBlock(cfg, rngs=rngs) if cfg.n_mtp_layers and not cfg.dspark else None
        self.dspark = Drafter(cfg, rngs=rngs) if cfg.dspark else None

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [b, s] -> [b, s, d]. Rows come from a table whole along d: with d sharded (FSDP) and the ids
        sharded over the batch, the partitioner would otherwise replicate the batch (the global batch's
        embeddings on every device)."""
        table = constrain(self.embed[...], ("vocab", None))
        return constrain(table[token_ids].astype(self.cfg.compute_dtype), ("batch", "seq", "act_embed"))

    def hidden(self, token_ids: jax.Array, segment_ids: jax.Array | None = None, with_stats: bool = False):
        """token_ids [b, s] -> final residual streams [b, s, hc, d] (before the head collapse).

        segment_ids [b, s] marks packed documents (runs of equal ids): RoPE positions and compression windows
        restart at each document and no attention crosses documents. with_stats also returns each layer's
        LayerStats (a tuple, one per layer).
        """
        cfg = self.cfg
        x = self.streams(token_ids)
        first, stop = scan_range(cfg) if cfg.scan_layers else (cfg.n_layers, cfg.n_layers)
        run = rematted(run_blocks, cfg)
        stats, topk = [], None  # topk: the CSA top-k passed on under IndexCache

        def layer(i, x, topk):
            (x, topk), (stats_i,) = run(*nnx.split(nnx.List([self.layers[i]])), x, topk, token_ids, segment_ids)
            stats.append(stats_i)
            return x, topk

        for i in range(first):
            x, topk = layer(i, x, topk)
        if stop > first:
            x, topk, stats_scan = self._scan_pairs(run, first, stop, x, topk, token_ids, segment_ids)
            stats += stats_scan
        for i in range(stop, cfg.n_layers):
            x, topk = layer(i, x, topk)
        return (x, tuple(stats)) if with_stats else x

    def _scan_pairs(self, run, first: int, stop: int, x, topk, token_ids, segment_ids):
        """Layers first .. stop-1, (CSA, HCA) pairs of identical structure, as one lax.scan over their stacked
        parameters (the stack is a copy made inside the step; its gradient flows back to each layer). A step
        runs scan_pairs_per_step pairs (1 unless IndexCache needs more); the CSA top-k rides in the carry.

        The experts' weights, used only cast to the compute dtype, are stacked cast: the copy and the backward
        scan's stacked gradient are then 16-bit, not fp32 (Pro on 1024 chips: 2.8 instead of 5.5 GB per device
        each), with the same values (each layer's gradient slice is written once and arrives 16-bit)."""
        n = 2 * scan_pairs_per_step(self.cfg)
        pairs = [nnx.List(self.layers[i:i + n]) for i in range(first, stop, n)]
        graphdef = nnx.graphdef(pairs[0])

        def stack(path, *leaves):
            a = jnp.stack(leaves)
            return a.astype(self.cfg.compute_dtype) if path[-3].key in ("experts", "shared_experts") else a

        stacked = jax.tree_util.tree_map_with_path(stack, *(nnx.state(p) for p in pairs))
        (x, topk), stats = jax.lax.scan(lambda c, st: run(graphdef, st, *c, token_ids, segment_ids), (x, topk),
                                        stacked)
        # stats: the step's LayerStats (one per layer), each stacked over the steps -> one per layer, in order
        return x, topk, [jax.tree.map(lambda v, j=j: v[j], s) for j in range(len(pairs)) for s in stats]

    def streams(self, token_ids: jax.Array) -> jax.Array:
        """The embedded tokens copied into the hc_mult residual streams [b, s, hc, d]."""
        h = self.embed_tokens(token_ids)
        x = jnp.broadcast_to(h[:, :, None, :], h.shape[:2] + (self.cfg.hc_mult, h.shape[-1]))
        return constrain(x, STREAMS)

    def logits(self, x: jax.Array, site: HCSite, norm) -> jax.Array:
        """Collapse streams x [b, s, hc, d], normalise, project with the (shared) head in fp32 -> [b, s, vocab]."""
        cfg = self.cfg
        z = hc_head(x, site.fn[...], site.scale[...], site.base[...], eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
        z = rms_norm(z, norm[...], cfg.norm_eps)
        return linear(z.astype(jnp.float32), self.head[...].astype(jnp.float32))

    def __call__(self, token_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(token_ids, segment_ids), self.hc_head, self.norm)

    def drafter_inputs(self, token_ids: jax.Array, segment_ids: jax.Array | None = None):
        """The full-sequence forward that trains a DSpark drafter: -> (final streams [b, s, hc, d], main_hidden
        [b, s, n_targets * dim], the outputs of the blocks dspark_target_layer_ids averaged over the hc streams,
        as the cached forward gives the drafter). The blocks run one by one (no scan, no remat: nothing of this
        forward is differentiated) and what they sow is dropped."""
        x, captured, topk = self.streams(token_ids), {}, None
        for i, block in enumerate(self.layers):
            x, topk = block.forward(x, token_ids, segment_ids, topk)
            x = constrain(x, STREAMS)
            captured[i] = stream_mean(x)
        nnx.pop(self, nnx.Intermediate)
        return x, jnp.concatenate([captured[i] for i in self.cfg.dspark_target_layer_ids], axis=-1)

    # ---- inference over a cache ----------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, kv_format: str | None = None,
                   index_format: str | None = None) -> "Cache":
        """An empty cache for `batch` sequences of up to max_len tokens. kv_format stores the window rings and
        compressed entries ("fp32", "bf16", or "fp8": FlashMLA's 584-byte entries), index_format the indexer
        keys ("fp32", "bf16", "fp8" or "fp4"); None keeps the compute dtype. See v4jax.kv_cache."""
        plain = {"float32": "fp32", "bfloat16": "bf16"}[self.cfg.compute_dtype]
        kv_format, index_format = kv_format or plain, index_format or plain
        kv_cache.check_formats(kv_format, index_format)
        layers = tuple(blk.attn.init_cache(batch, max_len, kv_format, index_format) for blk in self.layers)
        mtp = self.mtp.attn.init_cache(batch, max_len, kv_format, index_format) if self.mtp is not None else None
        rings = self.dspark.init_rings(batch, kv_format) if self.dspark is not None else None
        return Cache(lengths=jnp.zeros((batch,), jnp.int32),  # distinct buffers: steps donate the cache
                     layers=layers, mtp=mtp, mtp_lengths=jnp.zeros((batch,), jnp.int32), dspark=rings)

    def _cached_forward(self, cache: "Cache", token_ids: jax.Array, n_new: jax.Array | None, logits_at=None):
        """The layers over the cache -> (logits, final streams, n_new, the layers' caches advanced by n_new,
        Pending (the chunk's writes and the drafter's main_hidden, for commit)). logits_at [b]: one chunk position
        per row whose logits alone are computed ([b, 1, vocab])."""
        b, C = token_ids.shape
        n_new = jnp.full((b,), C, jnp.int32) if n_new is None else n_new.astype(jnp.int32)
        x = self.streams(token_ids)
        layers, writes, captured, topk = [], [], {}, None  # topk: this chunk's CSA top-k under IndexCache
        targets = self.cfg.dspark_target_layer_ids
        for i, (block, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            x, layer_cache, pending, topk = block.step(x, token_ids, layer_cache, cache.lengths, n_new, topk)
            x = constrain(x, STREAMS)
            layers.append(layer_cache)
            writes.append(pending)
            if i in targets:
                captured[i] = stream_mean(x)
        main_hidden = jnp.concatenate([captured[i] for i in targets], axis=-1) if targets else None
        at = x if logits_at is None else jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None, None], 1)
        return self.logits(at, self.hc_head, self.norm), x, n_new, tuple(layers), Pending(tuple(writes), main_hidden)

    def step(self, cache: "Cache", token_ids: jax.Array, n_new: jax.Array | None = None,
             logits_at: jax.Array | None = None):
        """Feed the next tokens of each sequence: token_ids [b, C] (any C: a prefill chunk, or 1 to decode), of
        which the first n_new [b] are real (default all). -> (logits [b, C, vocab], final streams
        [b, C, hc, d], the cache advanced by n_new). With a DSpark drafter, its rings take these positions.
        logits_at [b] (a chunk position per row, e.g. the prompt's last): only those logits, [b, 1, vocab] (a
        prefill needs one row of the vocabulary projection, not C)."""
        logits, x, n_new, layers, pending = self._cached_forward(cache, token_ids, n_new, logits_at)
        return logits, x, self._advance(cache, layers, pending, n_new)

    def verify(self, cache: "Cache", token_ids: jax.Array, n_new: jax.Array | None = None):
        """A speculative chunk over the cache, committed later: -> (logits [b, C, vocab], Pending). Logits are
        exactly step's; `commit(cache, pending, n)` then advances the cache before this call by the first n [b]
        tokens of each row, as if only those had been fed (the rejected drafts leave no trace)."""
        logits, _, _, _, pending = self._cached_forward(cache, token_ids, n_new)
        return logits, pending

    def commit(self, cache: "Cache", pending: "Pending", n: jax.Array) -> "Cache":
        """The cache advanced by the first n [b] tokens of the chunk `verify` returned `pending` for."""
        n = n.astype(jnp.int32)
        layers = tuple(block.attn.commit(c, w, cache.lengths, n)
                       for block, c, w in zip(self.layers, cache.layers, pending.writes))
        return self._advance(cache, layers, pending, n)

    def _advance(self, cache: "Cache", layers, pending: "Pending", n: jax.Array) -> "Cache":
        """The new layer caches and lengths, and the drafter's rings given the main_hidden of positions
        lengths .. lengths + n - 1."""
        new = cache._replace(lengths=cache.lengths + n, layers=layers)
        if self.dspark is not None:
            new = new._replace(dspark=self.dspark.write_rings(cache.dspark, pending.main_hidden, cache.lengths, n))
        return new

    def draft(self, cache: "Cache", anchor: jax.Array, temperature: float = 0.0, key: jax.Array | None = None):
        """One DSpark draft block after the committed tokens of `cache`: anchor [b] is the next token (sampled
        from the target, not yet fed), at position lengths. -> (tokens [b, B], Markov-corrected logits
        [b, B, vocab] fp32, confidence logits [b, B] fp32)."""
        if self.dspark is None:
            raise ValueError("this config has no DSpark drafter (a GA checkpoint's dspark_* fields are not set)")
        return self.dspark.draft(cache.dspark, cache.lengths, anchor, self.embed_tokens, self.head[...],
                                 temperature, key)

    def mtp_step(self, cache: "Cache", x: jax.Array, token_ids: jax.Array, n_new: jax.Array | None = None):
        """The MTP block over its own cache: x [b, C, hc, d] the main streams at its next positions and
        token_ids [b, C] the tokens one ahead of them -> (logits [b, C, vocab] for the tokens two ahead, cache)."""
        b, C = token_ids.shape
        n_new = jnp.full((b,), C, jnp.int32) if n_new is None else n_new.astype(jnp.int32)
        y = self.mtp.mix_inputs(x, self.embed_tokens(token_ids))
        y, mtp_cache, _, _ = self.mtp.step(y, token_ids, cache.mtp, cache.mtp_lengths, n_new)
        new = cache._replace(mtp=mtp_cache, mtp_lengths=cache.mtp_lengths + n_new)
        return self.logits(y, self.mtp.hc_head, self.mtp.norm), new

    def mtp_logits(self, x: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """MTP head on the main streams x [b, s, hc, d] and the tokens it is fed (in training, the input
        shifted left by one, so that position i predicts token i + 2) -> [b, s, vocab]."""
        return self.logits(self.mtp_hidden(x, token_ids, segment_ids)[0], self.mtp.hc_head, self.mtp.norm)

    def mtp_hidden(self, x: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None = None):
        """The MTP block's output streams [b, s, hc, d] (before its head collapse) and its LayerStats."""
        if self.mtp is None:
            raise ValueError("this config has n_mtp_layers = 0: there is no MTP block")
        emb = self.embed_tokens(token_ids)
        return rematted(run_mtp, self.cfg)(*nnx.split(self.mtp), x, emb, token_ids, segment_ids)


def stream_mean(x: jax.Array) -> jax.Array:
    """The mean over the hc streams of x [b, s, hc, d] (in fp32), in x's dtype: a target layer's drafter input."""
    return mean(x.astype(jnp.float32), axis=2).astype(x.dtype)


def rematted(fn, cfg: ModelConfig):
    """fn(graphdef, state, ...) under cfg.remat's checkpoint policy (graphdef static); fn itself for "none"."""
    return fn if cfg.remat == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,))


def run_blocks(graphdef, state, x, topk, token_ids, segment_ids):
    """Apply blocks given as (graphdef, state) of an nnx.List, in order, to the streams x and the CSA top-k
    passed on (Block.forward) -> ((x, top-k), their LayerStats). Functional, so that jax.checkpoint and lax.scan
    can wrap it."""
    blocks = nnx.merge(graphdef, state)
    for block in blocks:
        x, topk = block.forward(x, token_ids, segment_ids, topk)
        x = constrain(x, STREAMS)
    return (x, topk), tuple(block_stats(b) for b in blocks)


def run_mtp(graphdef, state, x, emb, token_ids, segment_ids):
    """The MTP block given as (graphdef, state) -> (its output streams, its LayerStats); functional, as
    run_blocks, so that jax.checkpoint can wrap it."""
    mtp = nnx.merge(graphdef, state)
    y = mtp(x, emb, token_ids, segment_ids)
    return y, block_stats(mtp)


def scan_range(cfg: ModelConfig) -> tuple[int, int]:
    """(first, stop): layers first .. stop-1 are the scannable (CSA, HCA) pairs, all score-routed (the first
    consecutive run of them; first == stop when there is none). Flash: 4 .. 41 (19 pairs); Pro: 4 .. 59 (28).
    Under IndexCache the run ends at a whole number of scan steps (scan_pairs_per_step; the rest runs unrolled)
    and starts after the first CSA layer, so that the scan's carry always holds a top-k."""
    first, stop = _pair_run(cfg)
    step = 2 * scan_pairs_per_step(cfg)
    return first, first + (stop - first) // step * step


def scan_pairs_per_step(cfg: ModelConfig) -> int:
    """The pairs one scan step runs: 1, or under IndexCache the shortest period of the roles (computes its
    top-k or reuses one) of the run's CSA layers, so that every step is the same program (Flash with
    index_topk_freq 2: 2; with only the first CSA layer computing: 1)."""
    first, stop = _pair_run(cfg)
    reuses = [cfg.reuses_topk(i) for i in range(first, stop, 2)]
    return next(g for g in range(1, len(reuses) + 1) if reuses[g:] == reuses[:-g]) if reuses else 1


def _pair_run(cfg: ModelConfig) -> tuple[int, int]:
    n, r = cfg.n_layers, cfg.compress_ratios
    first = next((i for i in range(cfg.n_hash_layers, n - 1) if (r[i], r[i + 1]) == (4, 128)), n)
    if cfg.index_cache and first == cfg.csa_layers[0]:
        first += 2
    stop = first
    while stop + 1 < n and (r[stop], r[stop + 1]) == (4, 128):
        stop += 2
    return first, stop


class Cache(NamedTuple):
    """The model's inference state: tokens seen per sequence [b], one AttentionCache per layer, the MTP
    block's cache with its own length (it runs one position behind: it needs the next token) and the DSpark
    drafter's window rings, one per stage (they hold positions < lengths, like the layers)."""

    lengths: jax.Array
    layers: tuple[AttentionCache, ...]
    mtp: AttentionCache | None
    mtp_lengths: jax.Array
    dspark: tuple | None = None


class Pending(NamedTuple):
    """A verified chunk's cache writes: one attention.Pending per layer, and the drafter's input main_hidden
    [b, C, n_targets * dim] (None without a drafter)."""

    writes: tuple
    main_hidden: jax.Array | None


class LayerStats(NamedTuple):
    """What one block reports from a training forward (None where the layer has no such thing)."""

    expert_load: jax.Array | None = None  # [experts] token-slot counts of its MoE (the router-bias rule's input)
    balance_loss: jax.Array | None = None  # score-routed MoE layers (moe.balance_loss)
    indexer_kl: jax.Array | None = None  # CSA layers under cfg.indexer_loss (attention.indexer_kl)
    ep_dropped: jax.Array | None = None  # expert-parallel MoE: (token, slot) pairs over capacity


def block_stats(block: nnx.Module) -> LayerStats:
    """Remove what a block sowed during a forward (nnx.Intermediate: its MoE's and its attention's statistics) and
    return it as its LayerStats, so the module keeps no per-call state (repeated jitted calls see the same graph)."""
    sown = nnx.to_flat_state(nnx.pop(block, nnx.Intermediate))
    return LayerStats(**{path[-1]: var.get_value()[-1] for path, var in sown})


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure, shapes, dtypes and logical axes without allocating it (nnx.eval_shape): a fresh
    tree on every call, for a checkpoint to fill or to count and measure."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def model_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Flat {dotted path: variable} of every parameter and buffer of the model."""
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(nnx.state(model))}


def with_config(model: Transformer, **changes) -> Transformer:
    """The same weights under a changed config (e.g. a training stage switching csa_dense / indexer_loss)."""
    new = abstract_model(model.cfg.replace(**changes))
    nnx.update(new, nnx.state(model))
    return new


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Logical parameter counts from the real (abstract) parameter tree, without allocating it.

    total: every floating-point weight incl. the router biases and MTP (the released checkpoint's count;
    FP4 elements counted unpacked, block scales and the integer tid2eid table not counted).
    mtp: the weights of the mtp.* namespace, the preview's MTP block or a GA config's DSpark drafter (all its
    stages; the embedding and head it shares are not counted again); total_without_mtp: the rest.
    activated: what one token uses in the main model: everything but MTP / the drafter, the embedding table and
    the routed experts it does not pick (the LM head counts, as in DeepSeek's 13B / 49B figures).
    """
    model = abstract_model(cfg)
    sizes = {p: math.prod(v.shape) for p, v in model_variables(model).items() if not isinstance(v, HashTable)}
    total = sum(sizes.values())
    mtp = sum(n for p, n in sizes.items() if p.startswith(("mtp.", "dspark.")))
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    unused = cfg.n_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert
    return {"total": total, "total_without_mtp": total - mtp, "mtp": mtp,
            "activated": total - mtp - sizes["embed"] - unused}
