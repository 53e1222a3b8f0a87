"""IndexCache (ModelConfig.index_topk_freq / index_topk_pattern): a CSA layer that reuses the top-k of the previous
computing CSA layer attends exactly those entries, in the full forward, the probe, the cache's prefill and decode
steps and the scanned stack; the config's errors name the fix; the default is untouched; the cost model drops
the skipped indexers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import KERNEL_IMPL, rel_err
from kernels.sparse_attention import sparse_attention
from test_decode import _model
from v4jax import cost
from v4jax.attention import entry_layout, token_layout, window_indices
from v4jax.config import ConfigError, ModelConfig
from v4jax.model import scan_pairs_per_step, scan_range, with_config
from v4jax.probe import probe

# Two CSA layers; with index_topk_freq 2 layer 1 reuses layer 0's top-k. 96 tokens: 24 CSA entries against top-k 8.
# Dense MoE: the shortest compiles.
SMALL = dict(n_layers=2, n_hash_layers=1, n_mtp_layers=0, compress_ratios=(4, 4), index_topk_freq=2, moe_impl="dense")
T = 96
forward = nnx.jit(lambda m, i: m(i))


@nnx.jit
def reused(attn0, attn1, y0, y1):
    """Layer 0's top-k of its input y0, and layer 1 attending it for its input y1."""
    top = attn0.forward(y0)[1]
    return top, attn1.forward(y1, None, top)[0]


def _ids(n, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 1024, (1, n)))


def test_reusing_layer_attends_the_computing_layers_picks():
    """Layer 1's picks are layer 0's, and its output is attention over its own window and entries restricted to
    exactly those picks (its own indexer would pick others, with a clearly different output)."""
    model = _model(**SMALL)
    assert [blk.attn.reuses_topk for blk in model.layers] == [False, True]
    ids = _ids(T)
    layers, _ = probe(model, ids)
    np.testing.assert_array_equal(np.asarray(layers[1].picked), np.asarray(layers[0].picked))
    assert layers[1].scores is None and layers[0].scores is not None

    cfg, attn0, attn1 = model.cfg, model.layers[0].attn, model.layers[1].attn
    mine = with_config(model, index_topk_freq=1).layers[1].attn  # layer 1 with its own indexer
    y = layers[1].attn_in
    out = np.asarray(reused(attn0, attn1, layers[0].attn_in, y)[1])
    own = np.asarray(forward(mine, y))
    lay = token_layout(None, 1, T)
    q, kv, _ = attn1._project(y, lay.pos)
    kv = jnp.concatenate([kv, attn1.compressor(y, lay, entry_layout(lay, 4))], axis=1)
    win = window_indices(jnp.arange(T), cfg.window_size, lay.doc, lay.doc)
    comp = jnp.where(layers[0].picked, T + jnp.arange(T // 4), -1)
    o = sparse_attention(q, kv, attn1.attn_sink[...], jnp.concatenate([win, comp], -1), cfg.head_dim**-0.5)
    np.testing.assert_allclose(np.asarray(attn1._output(o, lay.pos, q.dtype)), out, rtol=1e-5, atol=1e-5)

    assert np.linalg.norm(own - out) > 0.05 * np.linalg.norm(out)
    with pytest.raises(ValueError, match="reuses the top-k of an earlier CSA layer"):
        attn1(y)  # a reusing layer alone has no top-k to attend


def test_kernels_attend_the_reused_topk():
    """On the Pallas kernels (interpreted on CPU) a reusing layer gives the reused top-k to sparse attention: the
    picks and the output equal the reference path's."""
    model = _model(**SMALL)
    y0, y1 = (jnp.asarray(np.random.default_rng(s).standard_normal((1, T, model.cfg.dim)), jnp.float32) for s in (0, 1))
    kern = with_config(model, kernels=KERNEL_IMPL)
    (top, out), (top_k, out_k) = (reused(m.layers[0].attn, m.layers[1].attn, y0, y1) for m in (model, kern))
    np.testing.assert_array_equal(np.asarray(top_k), np.asarray(top))
    assert rel_err(np.asarray(out_k), np.asarray(out)).max() < 1e-5


@nnx.jit
def prefill_then_decode(model, ids):
    """A 40-token prefill chunk, then one token per step through the cache -> the logits of every position."""
    cache = model.init_cache(1, T)
    first, _, cache = model.step(cache, ids[:, :40])

    def decode(cache, token):
        logits, _, cache = model.step(cache, token[:, None])
        return cache, logits[:, 0]

    cache, rest = jax.lax.scan(decode, cache, ids[:, 40:].T)
    return jnp.concatenate([first, rest.swapaxes(0, 1)], axis=1), cache.lengths


def test_prefill_and_decode_over_the_cache_equal_the_full_forward():
    """The cached steps reuse the picks made in the same step: a prefill chunk then token-by-token decoding give
    the full forward's logits (test_decode's bar); a reusing layer's cache holds no indexer keys."""
    model = _model(**SMALL)
    ids = _ids(T)
    full = np.asarray(forward(model, ids))
    logits, lengths = prefill_then_decode(model, ids)
    assert int(lengths[0]) == T
    assert rel_err(logits, full).max() < 1e-5
    cache = model.init_cache(1, 64)
    assert cache.layers[1].index_keys is None and cache.layers[1].index_state is None
    assert cache.layers[0].index_keys is not None


# 6 layers: CSA 0 (hash routed), the scannable (CSA, HCA) pairs 1-2 and 3-4, CSA 5
DEEP = dict(n_layers=6, n_hash_layers=1, n_mtp_layers=0, compress_ratios=(4, 4, 128, 4, 128, 4), moe_impl="dense",
            index_topk_freq=2)


def test_scanned_layers_equal_unrolled():
    """freq 2 (F S F S) makes the scanned CSA layers reuse, then compute: one scan step runs both pairs, takes
    layer 0's top-k in its carry and hands layer 3's to layer 5. Scanned (with remat) and unrolled logits
    agree."""
    cfg = ModelConfig.preset("tiny", **DEEP)
    assert (*scan_range(cfg), scan_pairs_per_step(cfg)) == (1, 5, 2)
    model = _model(**DEEP)
    ids = _ids(T)
    unrolled = np.asarray(forward(model, ids))
    scanned = np.asarray(forward(with_config(model, scan_layers=True, remat="block"), ids))
    assert rel_err(scanned, unrolled).max() < 1e-5


def test_scan_plans():
    """The first CSA layer inside the scannable run: under IndexCache the run starts after it (the carry then
    holds a top-k from the start); roles with period 3 pairs leave the 4th pair unrolled; Flash with freq 2
    scans 9 steps of two pairs and runs its last pair unrolled."""
    tiny = dict(n_hash_layers=0)  # CSA 1, 3, 5; pairs from layer 1
    assert scan_range(ModelConfig.preset("tiny", **tiny)) == (1, 5)
    assert scan_range(ModelConfig.preset("tiny", **tiny, index_topk_freq=2)) == (3, 5)
    deep = ModelConfig.preset("tiny", n_layers=10, n_hash_layers=1, n_mtp_layers=0,  # scanned roles F S F F
                              compress_ratios=(4, 4, 128, 4, 128, 4, 128, 4, 128, 0), index_topk_pattern="FFSFF")
    assert (*scan_range(deep), scan_pairs_per_step(deep)) == (1, 7, 3)
    flash = ModelConfig.preset("flash", index_topk_freq=2)
    assert (*scan_range(flash), scan_pairs_per_step(flash)) == (4, 40, 2)
    fffs = ModelConfig.preset("tiny", **dict(DEEP, index_topk_freq=1, index_topk_pattern="FFFS"))
    assert (*scan_range(fffs), scan_pairs_per_step(fffs)) == (1, 5, 1)  # two steps, both computing


@pytest.mark.parametrize("changes, message", [
    (dict(index_topk_freq=0), "index_topk_freq: is 0"),
    (dict(index_topk_pattern="FSX"), "characters other than F and S"),
    (dict(index_topk_pattern="FS"), "has 2 characters but the model has 3 CSA layers"),
    (dict(index_topk_pattern="SFF"), "start the pattern with F"),
    (dict(index_topk_pattern="FSF", index_topk_freq=2), "Give one of them"),
])
def test_config_errors_name_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("tiny", **changes)


def test_freq_1_and_all_f_pattern_are_the_default_program():
    """The default (freq 1) and the all-F pattern trace to the same program (so compute the same logits bit for
    bit); freq 2 does not."""
    model = _model(**dict(SMALL, index_topk_freq=1))
    assert model.cfg.index_topk_roles == "FF" and not model.cfg.index_cache

    def program(m):
        graphdef, state = nnx.split(m)
        return str(jax.make_jaxpr(lambda st, i: nnx.merge(graphdef, st)(i))(state, _ids(T)))

    ref = program(model)
    assert program(with_config(model, index_topk_pattern="FF")) == ref
    assert program(with_config(model, index_topk_freq=2)) != ref


def test_cost_model_drops_the_skipped_indexer():
    """tiny with freq 2 skips one of three indexers: its query / weight / key projections, its scan and its
    cached keys, counted by hand from the config."""
    base, shared = ModelConfig.preset("tiny"), ModelConfig.preset("tiny", index_topk_freq=2)
    L = 1024
    f0, f1 = cost.forward_flops(base, L), cost.forward_flops(shared, L)
    i, d, r = base.index_n_heads, base.index_head_dim, base.q_lora_rank
    assert f0["indexer_scan"] - f1["indexer_scan"] == 2 * i * d * (L // 4)
    assert f0["indexer_proj"] - f1["indexer_proj"] == 2 * (i * d * r + i * base.dim)
    assert f0["compressors"] - f1["compressors"] == 2 * 2 * (2 * d) * base.dim  # the indexer's wkv and wgate
    for k in ("attention", "projections", "moe", "head", "mhc"):
        assert f0[k] == f1[k], k
    key = 2 * d  # bf16 index keys, one per 4 tokens
    assert cost.kv_bytes_per_token(base) - cost.kv_bytes_per_token(shared) == key / 4
    r0, r1 = cost.decode_read_bytes(base, L), cost.decode_read_bytes(shared, L)
    assert r0["index_keys"] - r1["index_keys"] == key * (L // 4) and r0["entries"] == r1["entries"]
