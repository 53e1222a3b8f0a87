"""v4jax.probe: its records are what the forward pass computes (final streams, attended entries), and they
meet the spec's definitions, recomputed here in numpy (visibility counts, index scores and top-k, mHC maps,
hash-routed expert loads)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.sparse_attention import sparse_attention
from test_hyper_connection import sinkhorn_reference
from v4jax.attention import entry_layout, token_layout, window_indices
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.probe import probe

# Two layers, CSA + hash routing and HCA + score routing, keep the compilations short. Row 0 is one document of
# 300 tokens, row 1 two packed documents (170 + 130): entries and visibility restart at the second.
CFG = ModelConfig.preset("tiny", compute_dtype="float32", n_layers=2, n_hash_layers=1, n_mtp_layers=0,
                         compress_ratios=(4, 128))
T, SPLIT = 300, 170
SEGMENTS = np.array([[0] * T, [0] * SPLIT + [1] * (T - SPLIT)])


@functools.lru_cache(maxsize=None)
def _run():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for blk in model.layers:  # init leaves mHC near uniform: spread the maps so the checks below can fail
        for site in (blk.hc_attn, blk.hc_ffn):
            site.base[...] = jnp.asarray(rng.normal(0, 1, site.base.shape), jnp.float32)
            site.scale[...] = jnp.ones_like(site.scale[...])
    ids = jnp.asarray(rng.integers(1, CFG.vocab_size, (2, T)))
    seg = jnp.asarray(SEGMENTS)
    layers, x = probe(model, ids, seg)
    ref, stats = nnx.jit(lambda m, i, s: m.hidden(i, s, with_stats=True))(model, ids, seg)
    return model, ids, seg, layers, x, ref, stats


def _positions():
    """Each token's position within its document [2, T]."""
    return np.array([np.arange(T), np.r_[np.arange(SPLIT), np.arange(T - SPLIT)]])


def test_probe_follows_the_forward_pass_and_routing():
    """Final streams equal Transformer.hidden; expert loads equal the sown stats, sum to tokens x top-k, and in
    the hash-routed layer equal the counts of the token -> expert table."""
    model, ids, _, layers, x, ref, stats = _run()
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref), rtol=0, atol=1e-6)
    for i, rec in enumerate(layers):
        load = np.asarray(rec.expert_load)
        np.testing.assert_array_equal(load, np.asarray(stats[i].expert_load))
        assert load.sum() == ids.size * CFG.n_activated_experts
    table = np.asarray(model.layers[0].ffn.gate.tid2eid[...])
    expected = np.bincount(table[np.asarray(ids)].ravel(), minlength=CFG.n_routed_experts)
    np.testing.assert_array_equal(np.asarray(layers[0].expert_load), expected)


def test_visibility_and_indexer_picks():
    """Query at document position p sees floor((p + 1) / ratio) entries (HCA attends all of them); the CSA
    picks are the top-k of numpy-recomputed index scores over them, min(k, visible) per query."""
    model, _, seg, layers, *_ = _run()
    counts = (_positions() + 1)
    assert layers[1].picked is None and layers[1].scores is None
    for i, ratio in ((0, 4), (1, 128)):
        np.testing.assert_array_equal(np.asarray(layers[i].visible).sum(-1), counts // ratio)
    np.testing.assert_array_equal(np.asarray(layers[1].attended), np.asarray(layers[1].visible))

    rec, attn = layers[0], model.layers[0].attn
    lay = token_layout(seg, 2, T)
    _, _, qr = attn._project(rec.attn_in, lay.pos)
    q, w, keys = (np.asarray(a, np.float64) for a in attn.indexer(rec.attn_in, qr, lay, entry_layout(lay, 4)))
    # I[t, s] = sum_i w[t, i] relu(q_i[t] . k[s]) (architecture §3.4.5), over the visible entries only
    scores = np.einsum("bti,btis->bts", w, np.maximum(np.einsum("btid,bsd->btis", q, keys), 0))
    visible = np.asarray(rec.visible)
    got = np.asarray(rec.scores)
    np.testing.assert_allclose(got[visible], scores[visible], rtol=1e-4, atol=1e-6)
    assert np.isneginf(got[~visible]).all()
    picked = np.asarray(rec.picked)
    np.testing.assert_array_equal(picked.sum(-1), np.minimum(counts // 4, CFG.index_topk))
    assert not (picked & ~visible).any()
    masked = np.where(visible, scores, -np.inf)
    for b in range(2):
        for t in range(T):
            k = picked[b, t].sum()
            assert set(np.argsort(-masked[b, t])[:k]) == set(np.flatnonzero(picked[b, t])), (b, t)


def test_picks_are_what_attention_attends():
    """Attention over the window plus exactly the picked entries reproduces the CSA layer's output; attending
    every visible entry instead does not (the picks matter)."""
    model, _, seg, layers, *_ = _run()
    rec, attn = layers[0], model.layers[0].attn
    lay = token_layout(seg, 2, T)
    q, kv, _ = attn._project(rec.attn_in, lay.pos)
    kv = jnp.concatenate([kv, attn.compressor(rec.attn_in, lay, entry_layout(lay, 4))], axis=1)
    win = window_indices(jnp.arange(T), CFG.window_size, lay.doc, lay.doc)

    def attend(entries):  # [b, T, n] bool -> the layer's output attending the window and those entries
        comp = jnp.where(entries, T + jnp.arange(entries.shape[-1]), -1)
        o = sparse_attention(q, kv, attn.attn_sink[...], jnp.concatenate([win, comp], -1), CFG.head_dim**-0.5)
        return np.asarray(attn._output(o, lay.pos, q.dtype))

    out = np.asarray(nnx.jit(lambda a, y, s: a(y, s))(attn, rec.attn_in, seg))
    np.testing.assert_allclose(attend(rec.picked), out, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(attend(rec.visible) - out) > 0.05 * np.linalg.norm(out)


def test_mhc_maps_match_the_definition():
    """pre / post / comb equal a numpy evaluation of architecture §3.2 on the block input; comb is doubly stochastic."""
    model, _, _, layers, *_ = _run()
    hc, sig = CFG.hc_mult, lambda z: 1 / (1 + np.exp(-z))
    for blk, rec in zip(model.layers, layers):
        site = blk.hc_attn
        xf = np.asarray(rec.x_in, np.float64).reshape(2, T, -1)
        mixes = xf @ np.asarray(site.fn[...]).T / np.sqrt(np.mean(xf**2, -1, keepdims=True) + CFG.norm_eps)
        s, base = np.asarray(site.scale[...]), np.asarray(site.base[...])
        pre = sig(mixes[..., :hc] * s[0] + base[:hc]) + CFG.hc_eps
        post = 2 * sig(mixes[..., hc:2 * hc] * s[1] + base[hc:2 * hc])
        logits = (mixes[..., 2 * hc:] * s[2] + base[2 * hc:]).reshape(2, T, hc, hc)
        comb = sinkhorn_reference(logits, CFG.hc_sinkhorn_iters, CFG.hc_eps)
        for got, want in zip(rec.mhc_attn, (pre, post, comb)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
        for maps in (rec.mhc_attn, rec.mhc_ffn):
            c = np.asarray(maps.comb)
            np.testing.assert_allclose(c.sum(-2), 1, atol=1e-5)  # columns: normalised last
            np.testing.assert_allclose(c.sum(-1), 1, atol=1e-3)  # rows: within Sinkhorn's tolerance
            assert np.abs(c - 1 / hc).max() > 0.1  # far from uniform: the test sees real mixing
