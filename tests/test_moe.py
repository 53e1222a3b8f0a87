"""The MoE (architecture §3.5): routing weights from unbiased scores, hash routing, ragged == dense, the shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.moe import MoE, balanced_hash_table
from kernels.fp4_matmul import grouped_matmul

CFG = ModelConfig.preset("tiny", compute_dtype="float32")


def _moe(layer, seed=0, **cfg):
    moe = MoE(CFG.replace(**cfg), layer, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(moe, nnx.Param)):
        var.set_value(jnp.asarray(rng.standard_normal(var.shape) / np.sqrt(var.shape[-1]), jnp.float32))
    return moe


def test_score_routing_uses_bias_for_selection_only():
    moe = _moe(layer=4)  # score routed
    y = jax.random.normal(jax.random.key(0), (50, CFG.dim))
    w, ids, scores = moe.gate(y, jnp.zeros(50, jnp.int32))
    s = np.sqrt(np.log1p(np.exp(np.asarray(y) @ np.asarray(moe.gate.weight[...]).T)))  # sqrt(softplus)
    np.testing.assert_allclose(np.asarray(scores), s, rtol=1e-5)
    bias = np.zeros(16, np.float32)
    bias[7] = 100.0  # expert 7 always selected, but its weight still comes from its unbiased score
    moe.gate.bias.set_value(jnp.asarray(bias))
    w, ids = (np.asarray(a) for a in moe.gate(y, jnp.zeros(50, jnp.int32))[:2])
    assert (ids == 7).any(-1).all()
    picked = np.take_along_axis(s, ids, -1)
    np.testing.assert_allclose(w, picked / picked.sum(-1, keepdims=True) * CFG.route_scale, rtol=1e-5)


def test_hash_routing_follows_tid2eid():
    moe = _moe(layer=0)
    table = np.random.default_rng(3).integers(0, 16, (CFG.vocab_size, 3))
    moe.gate.tid2eid.set_value(jnp.asarray(table, jnp.int32))
    tokens = jnp.asarray([5, 900, 5, 17])
    y = jax.random.normal(jax.random.key(1), (4, CFG.dim))
    w, ids, scores = (np.asarray(a) for a in moe.gate(y, tokens))
    np.testing.assert_array_equal(ids, table[np.asarray(tokens)])
    picked = np.take_along_axis(scores, ids, -1)
    np.testing.assert_allclose(w, picked / picked.sum(-1, keepdims=True) * CFG.route_scale, rtol=1e-5)


def test_balanced_hash_table():
    t = np.asarray(balanced_hash_table(jax.random.key(0), 1000, 16, 3))
    assert all(len(set(r)) == 3 for r in t)
    counts = np.bincount(t.ravel(), minlength=16)
    assert counts.max() - counts.min() <= 1


def _manual_moe(moe, y, tokens):
    """Per token, per selected expert, the SwiGLU with clamp written out (numpy), plus the shared expert."""
    w, ids, _ = (np.asarray(a) for a in moe.gate(y, tokens))
    y = np.asarray(y, np.float64)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731

    def ffn(x, w1, w2, w3):
        return (silu(np.minimum(x @ w1.T, 10)) * np.clip(x @ w3.T, -10, 10)) @ w2.T

    ex = [np.asarray(getattr(moe.experts, n)[...], np.float64) for n in ("w1", "w2", "w3")]
    sh = [np.asarray(getattr(moe.shared_experts, n)[...], np.float64) for n in ("w1", "w2", "w3")]
    out = ffn(y, *sh)
    for i in range(len(y)):
        for slot in range(ids.shape[1]):
            e = ids[i, slot]
            out[i] += w[i, slot] * ffn(y[i], ex[0][e], ex[1][e], ex[2][e])
    return out


def test_ragged_and_dense_match_manual_sum():
    y = jax.random.normal(jax.random.key(2), (1, 40, CFG.dim)) * 3
    tokens = jax.random.randint(jax.random.key(3), (1, 40), 0, CFG.vocab_size)
    for impl in ("ragged", "dense"):
        moe = _moe(layer=4, moe_impl=impl)
        got = np.asarray(moe(y, tokens))[0]
        np.testing.assert_allclose(got, _manual_moe(moe, y[0], tokens[0]), rtol=1e-4, atol=1e-5)


def test_ragged_equals_dense_under_qat_and_with_idle_experts():
    """All tokens on a few experts (most receive zero tokens), qat on: the two paths agree exactly enough."""
    y = jax.random.normal(jax.random.key(4), (2, 8, CFG.dim))
    tokens = jnp.full((2, 8), 3)
    outs = []
    for impl in ("ragged", "dense"):
        moe = _moe(layer=0, moe_impl=impl, qat=True)  # hash layer: every token 3 -> the same 3 experts
        outs.append(np.asarray(moe(y, tokens)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_balance_loss_formula():
    """sum_e f_e P_e per row (V3), averaged over rows, against a direct numpy evaluation."""
    from v4jax.moe import balance_loss

    rng = np.random.default_rng(5)
    scores = rng.uniform(0.1, 2, (2, 10, 16)).astype(np.float32)
    ids = np.stack([np.stack([rng.permutation(16)[:3] for _ in range(10)]) for _ in range(2)])
    want = 0.0
    for b in range(2):
        f = np.bincount(ids[b].ravel(), minlength=16) * 16 / (3 * 10)
        p = (scores[b] / scores[b].sum(-1, keepdims=True)).mean(0)
        want += (f * p).sum() / 2
    np.testing.assert_allclose(float(balance_loss(jnp.asarray(scores), jnp.asarray(ids))), want, rtol=1e-6)


@pytest.mark.parametrize("m, sizes", [(300, [0, 130, 1, 0, 150]), (256, [0, 0, 0, 0]), (6, [0, 1, 1, 0, 4, 0]),
                                      (517, [40, 0, 300, 7, 170])])
def test_grouped_matmul_equals_per_group_matmuls(m, sizes):
    """The CPU tiling of the grouped matmul against a float64 loop over groups: empty groups, a group of one
    row, groups crossing tiles, rows past sum(sizes) (zero), decode-sized inputs; and its gradients."""
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((m, 64)), rng.standard_normal((len(sizes), 48, 64))
    want, start = np.zeros((m, 48)), 0
    for g, n in enumerate(sizes):
        want[start:start + n] = a[start:start + n] @ w[g].T
        start += n
    f = lambda a, w: grouped_matmul(a, w, jnp.asarray(sizes, jnp.int32))  # noqa: E731
    got = f(jnp.asarray(a, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=1.0))
    ct = rng.standard_normal((m, 48))  # d/da = ct @ w[g], d/dw[g] = ct^T a over the group's rows
    da, dw = jax.grad(lambda a, w: jnp.sum(f(a, w) * ct), (0, 1))(jnp.asarray(a, jnp.float32),
                                                                   jnp.asarray(w, jnp.float32))
    want_da, want_dw, start = np.zeros_like(a), np.zeros_like(w), 0
    for g, n in enumerate(sizes):
        want_da[start:start + n] = ct[start:start + n] @ w[g]
        want_dw[g] = ct[start:start + n].T @ a[start:start + n]
        start += n
    np.testing.assert_allclose(np.asarray(da), want_da, rtol=1e-5, atol=1e-5 * np.abs(want_da).max(initial=1.0))
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5 * np.abs(want_dw).max(initial=1.0))
