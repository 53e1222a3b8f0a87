"""mHC (architecture §3.2): Sinkhorn in the official order, and the direction of the stream mixing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from v4jax.hyper_connection import hc_post, sinkhorn, split_sinkhorn


def sinkhorn_reference(c: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """Architecture §3.2 step 7, written out: row softmax + eps, column normalisation, then (row, column) x (iters-1)."""
    p = np.exp(c - c.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) + eps
    p = p / (p.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(-1, keepdims=True) + eps)
        p = p / (p.sum(-2, keepdims=True) + eps)
    return p


def test_sinkhorn_order_and_double_stochasticity():
    c = np.random.default_rng(0).standard_normal((5, 4, 4)).astype(np.float32) * 3
    got = np.asarray(sinkhorn(jnp.asarray(c), 20, 1e-6))
    np.testing.assert_allclose(got, sinkhorn_reference(c, 20, 1e-6), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-2), 1.0, atol=1e-5)  # columns: exact after the last step
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-2)  # rows: nearly converged after 20 rounds
    # The order matters at few iterations: ending on a row normalisation gives another matrix.
    few = np.asarray(sinkhorn(jnp.asarray(c), 2, 1e-6))
    other = sinkhorn_reference(c, 2, 1e-6)
    other = other / other.sum(-1, keepdims=True)
    assert np.abs(few - other).max() > 1e-4


def test_split_sinkhorn_pre_post_gates():
    mixes = np.random.default_rng(1).standard_normal((2, 24)).astype(np.float32)
    scale = np.array([0.5, 2.0, 1.5], np.float32)
    base = np.linspace(-1, 1, 24).astype(np.float32)
    pre, post, comb = split_sinkhorn(jnp.asarray(mixes), jnp.asarray(scale), jnp.asarray(base), 4, 20, 1e-6)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(np.asarray(pre), sig(mixes[:, :4] * 0.5 + base[:4]) + 1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(post), 2 * sig(mixes[:, 4:8] * 2.0 + base[4:8]), rtol=1e-6)
    logits = (mixes[:, 8:] * 1.5 + base[8:]).reshape(2, 4, 4)  # row j, column k = entry 8 + 4j + k
    np.testing.assert_allclose(np.asarray(comb), sinkhorn_reference(logits, 20, 1e-6), rtol=1e-5)


def test_hc_post_stream_k_takes_column_k():
    f = np.zeros((1, 1, 3), np.float32)
    x = np.arange(12, dtype=np.float32).reshape(1, 1, 4, 3)
    comb = np.zeros((1, 1, 4, 4), np.float32)
    comb[..., 2, 0] = 1.0  # column 0 takes stream 2
    out = np.asarray(hc_post(jnp.asarray(f), jnp.asarray(x), jnp.ones((1, 1, 4)), jnp.asarray(comb)))
    np.testing.assert_array_equal(out[0, 0, 0], x[0, 0, 2])
    np.testing.assert_array_equal(out[0, 0, 1:], 0)
    post = np.array([[[1.0, 2.0, 0.0, 0.5]]], np.float32)
    f = np.ones((1, 1, 3), np.float32)
    out = np.asarray(hc_post(jnp.asarray(f), jnp.asarray(x), jnp.asarray(post), jnp.zeros((1, 1, 4, 4))))
    np.testing.assert_array_equal(out[0, 0, :, 0], post[0, 0])
