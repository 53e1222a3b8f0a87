"""The index-list sparse attention reference against a dense masked softmax with a sink column (numpy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.sparse_attention import sparse_attention


def dense_reference(q, kv, sink, idx, scale):
    """Softmax over all n keys with a mask built from idx, plus a sink logit column (float64)."""
    b, s, h, d = q.shape
    n = kv.shape[1]
    out = np.zeros((b, s, h, d))
    for bi in range(b):
        logits = np.einsum("shd,nd->shn", q[bi], kv[bi]) * scale
        for si in range(s):
            mask = np.zeros(n, bool)
            mask[idx[bi, si][idx[bi, si] >= 0]] = True
            if not mask.any():
                continue
            z = np.concatenate([np.where(mask, logits[si], -np.inf), sink[:, None]], axis=-1)  # [h, n + 1]
            p = np.exp(z - z.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            out[bi, si] = p[:, :n] @ kv[bi]
    return out


def test_matches_dense_masked_softmax_with_sink():
    rng = np.random.default_rng(0)
    b, s, h, d, n, k = 2, 7, 3, 64, 20, 6
    q = rng.standard_normal((b, s, h, d))
    kv = rng.standard_normal((b, n, d))
    sink = rng.standard_normal(h)
    idx = np.stack([np.stack([rng.permutation(n)[:k] for _ in range(s)]) for _ in range(b)])
    idx[0, 1, 3:] = -1  # unused slots
    idx[1, 2, :] = -1  # no keys at all: zeros
    got = sparse_attention(*(jnp.asarray(a, jnp.float32) for a in (q, kv, sink)), jnp.asarray(idx), d**-0.5)
    want = dense_reference(q, kv, sink, idx, d**-0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert np.abs(want[0, 1]).max() > 0 and np.all(np.asarray(got)[1, 2] == 0)


def test_gradients_match_dense_reference():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 32)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, 9, 32)), jnp.float32)
    sink = jnp.asarray([0.3, -0.5], jnp.float32)
    idx = jnp.asarray([[[0, 1, -1], [2, 3, 4], [5, -1, -1], [6, 7, 8]]])

    def dense(q, kv, sink):  # same math with a dense mask, in jnp, for autodiff
        mask = jnp.zeros((1, 4, 9), bool).at[0, jnp.arange(4)[:, None], jnp.where(idx[0] >= 0, idx[0], 0)].max(idx[0] >= 0)  # -1 slots point at 0 but add nothing
        z = jnp.einsum("bshd,bnd->bshn", q, kv) / jnp.sqrt(32.0)
        z = jnp.where(mask[:, :, None], z, -jnp.inf)
        z = jnp.concatenate([z, jnp.broadcast_to(sink[:, None], z.shape[:-1] + (1,))], -1)
        return jnp.einsum("bshn,bnd->bshd", jax.nn.softmax(z, -1)[..., :9], kv)

    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    g1 = jax.grad(loss(lambda q, kv, s: sparse_attention(q, kv, s, idx, 32**-0.5)), argnums=(0, 1, 2))(q, kv, sink)
    g2 = jax.grad(loss(dense), argnums=(0, 1, 2))(q, kv, sink)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
