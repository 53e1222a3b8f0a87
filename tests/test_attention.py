"""Hybrid attention pieces (architecture §3.4): index lists, visibility, the compressor's overlap order, chunking, memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.attention import (Attention, Compressor, entry_layout, token_layout, visible_entries,
                             window_indices)
from v4jax.config import ModelConfig
from v4jax.layers import rope_frequencies

TINY = ModelConfig.preset("tiny", compute_dtype="float32")


def test_window_indices():
    doc = jnp.zeros((1, 21), jnp.int32)
    doc_q = jnp.asarray([[0, 0, 0, -1]])  # the last query is chunk padding (t = 21 >= T): no keys
    got = np.asarray(window_indices(jnp.asarray([0, 3, 20, 21]), 4, doc, doc_q))[0]
    np.testing.assert_array_equal(got, [[-1, -1, -1, 0], [0, 1, 2, 3], [17, 18, 19, 20], [-1, -1, -1, -1]])
    packed = jnp.asarray([[0, 0, 0, 1, 1, 1]])  # the window stops at the document start
    got = np.asarray(window_indices(jnp.asarray([4]), 4, packed, jnp.asarray([[1]])))[0]
    np.testing.assert_array_equal(got, [[-1, -1, 3, 4]])


def test_visibility_rule_is_the_codes():
    """(i + 1) * m <= t + 1: a query sees the entry whose window ends at itself (the report's floor(t/m) would not)."""
    lay = token_layout(None, 1, 12)
    ent = entry_layout(lay, 4)
    vis = np.asarray(visible_entries(lay.pos[:, :9], lay.doc[:, :9], ent, 4))[0]
    assert [int(v.sum()) for v in vis] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    lay = token_layout(None, 1, 384)
    vis = visible_entries(jnp.asarray([[255, 256]]), jnp.zeros((1, 2), jnp.int32), entry_layout(lay, 128), 128)
    assert np.asarray(vis).sum(-1).tolist() == [[2, 2]]


def test_packed_documents_layout():
    """Documents of 6 and 9 tokens, ratio 4: positions restart; windows align to each document's start; the
    1-token tail of the second document makes no entry."""
    lay = token_layout(jnp.asarray([[7] * 6 + [3] * 9]), 1, 15)
    np.testing.assert_array_equal(np.asarray(lay.pos)[0], list(range(6)) + list(range(9)))
    ent = entry_layout(lay, 4)
    np.testing.assert_array_equal(np.asarray(ent.start)[0], [0, 6, 10])
    np.testing.assert_array_equal(np.asarray(ent.doc)[0], [0, 1, 1])
    np.testing.assert_array_equal(np.asarray(ent.win)[0], [0, 0, 1])
    ent = entry_layout(token_layout(jnp.asarray([[0] * 5 + [1] * 3 + [2] * 7]), 1, 15), 4)
    np.testing.assert_array_equal(np.asarray(ent.doc)[0], [0, 2, -1])  # doc 1 is too short; one slot unused


def _randomize(module, seed):
    """Random values (scaled like real weights) for every parameter of `module`, ape and norms included."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        fan_in = var.shape[-1]
        var.set_value(jnp.asarray(rng.standard_normal(var.shape) / np.sqrt(fan_in) + (1.0 if var.ndim == 1 else 0),
                                  jnp.float32))


def compressor_reference(x, wkv, wgate, ape, norm, ratio, cfg):
    """Architecture §3.4.3 written out per entry and channel (numpy, float64)."""
    x = x[0].astype(np.float64)
    d = norm.shape[0]
    a, z = x @ wkv.T, x @ wgate.T
    n = x.shape[0] // ratio
    out = np.zeros((n, d))
    for i in range(n):
        own = range(i * ratio, (i + 1) * ratio)
        if ratio == 4:  # 8 candidates: first halves of window i-1, second halves of window i
            vals = [a[j, :d] for j in range(i * 4 - 4, i * 4) if j >= 0] + [a[j, d:] for j in own]
            logit = [z[j, :d] + ape[j % 4, :d] for j in range(i * 4 - 4, i * 4) if j >= 0]
            logit += [z[j, d:] + ape[j % 4, d:] for j in own]
        else:
            vals, logit = [a[j] for j in own], [z[j] + ape[j % ratio] for j in own]
        w = np.exp(np.array(logit) - np.max(logit, axis=0))
        out[i] = (w / w.sum(0) * np.array(vals)).sum(0)
    out = out / np.sqrt((out**2).mean(-1, keepdims=True) + cfg.norm_eps) * norm
    freqs = rope_frequencies(cfg, compressed=True)
    ang = (np.arange(n) * ratio)[:, None].astype(np.float32) * freqs
    zc = (out[:, -64::2] + 1j * out[:, -63::2]) * np.exp(1j * ang.astype(np.float64))
    out[:, -64::2], out[:, -63::2] = zc.real, zc.imag
    return out


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_matches_spec_equations(ratio):
    comp = Compressor(TINY, ratio, 128, rotate=False, rngs=nnx.Rngs(0))
    _randomize(comp, ratio)
    x = np.random.default_rng(1).standard_normal((1, 2 * ratio + 3, TINY.dim)).astype(np.float32)
    lay = token_layout(None, 1, x.shape[1])
    got = np.asarray(comp(jnp.asarray(x), lay, entry_layout(lay, ratio)))[0]
    want = compressor_reference(x, *(np.asarray(v[...]) for v in (comp.wkv, comp.wgate, comp.ape, comp.norm)),
                                ratio, TINY)
    assert got.shape == (2, 128)  # only complete windows produce entries
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    if ratio == 4:  # swapping the halves' roles (the wrong half order) changes the result
        swapped = np.asarray(comp.wkv[...]).reshape(2, 128, -1)[::-1].reshape(256, -1)
        wrong = compressor_reference(x, swapped, np.asarray(comp.wgate[...]), np.asarray(comp.ape[...]),
                                     np.asarray(comp.norm[...]), ratio, TINY)
        assert np.abs(wrong - got).max() > 1e-2


@pytest.mark.parametrize("layer", [0, 1, 2])  # window-only, CSA, HCA
def test_query_chunking_does_not_change_attention(layer):
    attn = Attention(TINY, layer, rngs=nnx.Rngs(0))
    _randomize(attn, layer)
    x = jax.random.normal(jax.random.key(0), (2, 301, TINY.dim))
    full = attn(x)
    attn.cfg = TINY.replace(attn_chunk=37)
    np.testing.assert_allclose(np.asarray(attn(x)), np.asarray(full), rtol=1e-5, atol=1e-6)


def test_indexer_leaves_unused_slots_when_fewer_entries_than_topk():
    """With T = 40 a CSA query sees at most 10 entries; top-k 8 is exceeded for t < 35. Changing what an
    invisible entry would contribute must not change any output (causality through the index lists)."""
    attn = Attention(TINY, 1, rngs=nnx.Rngs(0))
    _randomize(attn, 3)
    x = jax.random.normal(jax.random.key(1), (1, 40, TINY.dim))
    y = attn(x)
    x2 = x.at[:, 30:].set(jax.random.normal(jax.random.key(2), (1, 10, TINY.dim)))
    np.testing.assert_allclose(np.asarray(attn(x2))[:, :30], np.asarray(y)[:, :30], rtol=1e-5, atol=1e-6)


def _temp_bytes(layer: int, T: int, cfg: ModelConfig) -> int:
    attn = nnx.eval_shape(lambda: Attention(cfg, layer, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(attn)
    f = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
    x = jax.ShapeDtypeStruct((1, T, cfg.dim), jnp.float32)
    return f.lower(state, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("layer", [1, 2])  # CSA, HCA
def test_compressed_attention_memory_grows_linearly(layer):
    """Compiled temp memory at T = 8K and 16K: doubling T at most ~doubles it (measured: 227 -> 453 MiB for CSA,
    100 -> 200 MiB for HCA); one fp32 [T, T] score matrix alone would be 1 GiB at 16K, and quadruple."""
    cfg = TINY.replace(window_size=128, index_topk=64, attn_chunk=256)
    small, large = _temp_bytes(layer, 8192, cfg), _temp_bytes(layer, 16384, cfg)
    assert large < 2.2 * small, (small, large)
    assert large < 16384 * 16384 * 4, large


def test_csa_dense_mode_attends_every_visible_entry():
    """csa_dense: a CSA layer attends all visible compressed entries, i.e. the result of a top-k at least as large
    as the number of entries."""
    attn = Attention(TINY.replace(csa_dense=True), 1, rngs=nnx.Rngs(0))
    _randomize(attn, 4)
    x = jax.random.normal(jax.random.key(3), (1, 100, TINY.dim))
    dense = attn(x)
    attn.cfg = TINY.replace(index_topk=25)  # 25 = all of T // 4
    np.testing.assert_allclose(np.asarray(attn(x)), np.asarray(dense), rtol=1e-5, atol=1e-6)
    attn.cfg = TINY  # top-8: a different (sparse) result
    assert np.abs(np.asarray(attn(x)) - np.asarray(dense)).max() > 1e-4


@pytest.mark.parametrize("csa_dense", [True, False])
def test_indexer_loss_trains_only_the_indexer(csa_dense):
    """The indexer KL (V3.2 recipe) is finite and >= 0; its gradient reaches the indexer's weights and nothing
    of the main path (the indexer input is detached), while the attention output gives the indexer none."""
    cfg = TINY.replace(indexer_loss=True, csa_dense=csa_dense)
    attn = Attention(cfg, 1, rngs=nnx.Rngs(0))
    _randomize(attn, 5)
    x = jax.random.normal(jax.random.key(4), (1, 96, cfg.dim))

    def kl(m):
        m(x)
        return nnx.pop(m, nnx.Intermediate)["indexer_kl"][-1]

    value, g_kl = nnx.value_and_grad(kl)(attn)
    assert np.isfinite(float(value)) and float(value) >= 0
    assert float(jnp.abs(g_kl.indexer.wq_b[...]).max()) > 0
    assert float(jnp.abs(g_kl.indexer.compressor.wkv[...]).max()) > 0
    for name in ("wq_a", "wkv", "wq_b", "wo_b"):
        assert float(jnp.abs(getattr(g_kl, name)[...]).max()) == 0, name

    def out(m):
        y = jnp.sum(jnp.sin(m(x)))
        nnx.pop(m, nnx.Intermediate)
        return y

    g_out = nnx.grad(out)(attn)
    assert float(jnp.abs(g_out.indexer.wq_b[...]).max()) == 0
    assert float(jnp.abs(g_out.wq_a[...]).max()) > 0
