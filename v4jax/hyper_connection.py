"""Manifold-constrained hyper-connections (mHC), architecture §3.2 and §3.6, [TR §2.2].

The residual state is hc_mult streams X [b, s, hc, d]. Each sub-layer site computes, from an unweighted RMS
of all hc*d values and a linear map fn, three things: `pre` weights that collapse the streams into the
sub-layer input, `post` weights that spread the sub-layer output back, and a doubly stochastic `comb` matrix
(Sinkhorn) that mixes the streams: X'_k = post_k f + sum_j comb[j, k] X_j. The head collapses the streams with
its own pre weights only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.numerics import einsum, mean, ordered_sum, softmax


def hc_mixes(x: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """(flatten(X) @ fn.T) * rsqrt(mean(flatten(X)^2) + eps), fp32: [b, s, n_mix]."""
    xf = x.reshape(*x.shape[:-2], -1).astype(jnp.float32)
    r = jax.lax.rsqrt(mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return einsum("...i,mi->...m", xf, fn.astype(jnp.float32)) * r


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """The official order: row softmax (+eps), a column normalization, then iters-1 (row, column) pairs."""
    p = softmax(logits, axis=-1) + eps
    p = p / (ordered_sum(p, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        p = p / (ordered_sum(p, axis=-1, keepdims=True) + eps)
        p = p / (ordered_sum(p, axis=-2, keepdims=True) + eps)
    return p


def split_sinkhorn(mixes, scale, base, hc: int, iters: int, eps: float):
    """mixes [.., (2+hc)*hc] -> pre [.., hc], post [.., hc], comb [.., hc, hc] (official hc_split_sinkhorn)."""
    base = base.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    pre = jax.nn.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2.0 * jax.nn.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    logits = mixes[..., 2 * hc:] * scale[2] + base[2 * hc:]
    comb = sinkhorn(logits.reshape(*logits.shape[:-1], hc, hc), iters, eps)
    return pre, post, comb


def collapse(x: jax.Array, pre: jax.Array) -> jax.Array:
    """sum_j pre_j X_j in fp32, cast back to X's dtype: [b, s, hc, d] -> [b, s, d]."""
    return ordered_sum(pre[..., None] * x.astype(jnp.float32), axis=-2).astype(x.dtype)


def hc_pre(x, fn, scale, base, *, hc: int, iters: int, eps: float, norm_eps: float):
    """Pre step of one mHC site: returns the sub-layer input u [b, s, d] and (post, comb) for hc_post."""
    pre, post, comb = split_sinkhorn(hc_mixes(x, fn, norm_eps), scale, base, hc, iters, eps)
    return collapse(x, pre), post, comb


def hc_post(f: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """X'_k = post_k * f + sum_j comb[j, k] * X_j (stream k takes column k of comb), in f's dtype."""
    mixed = einsum("...jk,...jd->...kd", comb, residual.astype(jnp.float32))
    return (post[..., None] * f.astype(jnp.float32)[..., None, :] + mixed).astype(f.dtype)


def hc_head(x, fn, scale, base, *, eps: float, norm_eps: float) -> jax.Array:
    """Collapse the streams before the final norm (architecture §3.6): pre_j = sigmoid(m_j * scale + base_j) + eps."""
    pre = jax.nn.sigmoid(hc_mixes(x, fn, norm_eps) * scale.astype(jnp.float32)[0] + base.astype(jnp.float32)) + eps
    return collapse(x, pre)
