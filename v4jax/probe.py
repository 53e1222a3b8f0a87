"""Probes into one forward pass, for looking inside a model (infer/notebooks/look_inside.ipynb).

`probe(model, token_ids)` runs the main model layer by layer through the blocks' own code and records, per
layer, what the forward computes but does not return:
  * mHC (architecture §3.2): each site's pre / post weights and the Sinkhorn-normalised stream-mixing matrix comb;
  * the compressed entries (architecture §3.4.4-5): which entries each query may see, and for CSA layers the lightning
    indexer's scores and its top-k picks among the visible entries (a layer reusing another's top-k under
    IndexCache records the picks it attends, and no scores);
  * the MoE routing (architecture §3.5): the expert loads the layers sow (token-slots per routed expert).
The final streams equal `Transformer.hidden` (tests/test_probe.py). Nothing here changes the model's math: the
records come from the same functions the layers call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.indexer import index_scores, indexer_topk, visible_ranges
from kernels.indexer.reference import range_mask
from v4jax.attention import Attention, entry_layout, token_layout
from v4jax.block import Block, HCSite
from v4jax.hyper_connection import hc_mixes, hc_post, split_sinkhorn
from v4jax.layers import join_chunks, rms_norm
from v4jax.model import Transformer, block_stats


class SiteMaps(NamedTuple):
    """One mHC site's maps per token (fp32): X' = post * f(sum_j pre_j X_j) + comb^T X."""

    pre: jax.Array  # [b, s, hc] collapse weights into the sub-layer input
    post: jax.Array  # [b, s, hc] weights spreading the sub-layer output over the streams
    comb: jax.Array  # [b, s, hc, hc] doubly stochastic mixing: stream k takes column k


class LayerProbe(NamedTuple):
    """What one block computed. The entry fields are None in window-only layers, the indexer's in HCA layers."""

    x_in: jax.Array  # [b, s, hc, d] the block's input streams
    attn_in: jax.Array  # [b, s, d] the attention sub-layer's input (mHC collapse, then attn_norm)
    mhc_attn: SiteMaps
    mhc_ffn: SiteMaps
    expert_load: jax.Array  # [experts] token-slots routed to each expert (sums to b * s * n_activated_experts)
    visible: jax.Array | None  # [b, s, n] bool: entry j is complete and in the query's document
    attended: jax.Array | None  # [b, s, n] bool: the entries attention uses (CSA: picked, or visible if csa_dense)
    picked: jax.Array | None  # [b, s, n] bool: the indexer's top-k among the visible entries (CSA)
    scores: jax.Array | None  # [b, s, n] fp32 index scores, -inf where not visible (CSA; None when it reuses a top-k)


def site_maps(model: Transformer, site: HCSite, x: jax.Array) -> SiteMaps:
    """The mHC maps of `site` on streams x [b, s, hc, d], as hc_pre computes them."""
    cfg = model.cfg
    mixes = hc_mixes(x, site.fn[...], cfg.norm_eps)
    return SiteMaps(*split_sinkhorn(mixes, site.scale[...], site.base[...], cfg.hc_mult, cfg.hc_sinkhorn_iters,
                                    cfg.hc_eps))


def entry_selection(attn: Attention, y: jax.Array, segment_ids: jax.Array | None = None,
                    topk: jax.Array | None = None) -> dict:
    """Visibility and (CSA) indexer picks of a compressed layer for its input y [b, s, d] (attn-normed), with
    the layer's own projections, indexer and visibility rule; a layer that reuses a top-k (IndexCache) records
    `topk` (Attention.forward's) as its picks. -> the entry fields of LayerProbe."""
    cfg, ratio = attn.cfg, attn.ratio
    b, T, _ = y.shape
    lay = token_layout(segment_ids, b, T)
    ent = entry_layout(lay, ratio)
    n = ent.start.shape[1]
    lo, hi = visible_ranges(lay.pos, lay.doc, ent.doc, ent.win, ratio)  # query sees slots lo <= j < hi
    visible = range_mask(lo, hi, n)
    out = dict(visible=visible, attended=visible)
    if attn.indexer is None or n == 0 or attn.reuses_topk and topk is None:  # (no top-k reused when dense)
        return out

    def marks(top):  # [b, s, k] slots, -1 unused -> [b, s, n] bool; slot n collects the -1s, then goes
        return jnp.zeros((b, T, n + 1), bool).at[
            jnp.arange(b)[:, None, None], jnp.arange(T)[None, :, None], jnp.where(top >= 0, top, n)].set(True)[..., :n]

    if attn.reuses_topk:
        picked = marks(join_chunks(topk, T))
        return dict(visible=visible, attended=visible if cfg.csa_dense else picked, picked=picked)
    q, _, qr = attn._project(y, lay.pos)
    iq, iw, keys = attn.indexer(y, qr, lay, ent)
    # the call Attention._attend makes per chunk of queries (same kernel, so the same tie-breaking)
    top, _ = indexer_topk(iq, iw, keys, lo, hi, min(cfg.index_topk, n), q.dtype, implementation=cfg.kernels)
    picked = marks(top)
    scores = jnp.where(visible, index_scores(iq, iw, keys, q.dtype), -jnp.inf)
    return dict(visible=visible, attended=visible if cfg.csa_dense else picked, picked=picked, scores=scores)


def _block(model: Transformer, block: Block, x, token_ids, segment_ids, topk):
    """One block as Block.forward runs it (topk: the CSA top-k passed on), recording its intermediates.
    -> (output streams, top-k, record fields)."""
    rec = dict(x_in=x, mhc_attn=site_maps(model, block.hc_attn, x))
    eps = model.cfg.norm_eps
    u, post, comb = block.hc_attn.pre(x)
    y = rec["attn_in"] = rms_norm(u, block.attn_norm[...], eps)  # the attention sub-layer's input
    if block.attn.ratio:
        rec.update(entry_selection(block.attn, y, segment_ids, topk))
    o, topk = block.attn.forward(y, segment_ids, topk)
    x = hc_post(o, x, post, comb)
    rec["mhc_ffn"] = site_maps(model, block.hc_ffn, x)
    u, post, comb = block.hc_ffn.pre(x)
    return hc_post(block.ffn(rms_norm(u, block.ffn_norm[...], eps), token_ids), x, post, comb), topk, rec


@nnx.jit
def _probe(model: Transformer, token_ids: jax.Array, segment_ids: jax.Array | None):
    x, topk = model.streams(token_ids), None
    records = []
    for block in model.layers:
        x, topk, rec = _block(model, block, x, token_ids, segment_ids, topk)
        records.append(rec | {"expert_load": block_stats(block).expert_load})
    layers = [LayerProbe(**{"visible": None, "attended": None, "picked": None, "scores": None, **rec})
              for rec in records]
    return layers, x


def probe(model: Transformer, token_ids: jax.Array, segment_ids: jax.Array | None = None):
    """token_ids [b, s] (segment_ids [b, s]: packed documents, as in Transformer.hidden) -> (a LayerProbe per
    main layer, the final streams [b, s, hc, d]). One jitted forward pass; the MTP block is not probed."""
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be [batch, seq], got shape {token_ids.shape}: add a batch axis")
    return _probe(model, token_ids, segment_ids)
