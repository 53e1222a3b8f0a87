"""Index-list sparse attention with an attention sink: the pure-jnp reference (upstream op: `sparse_attn`).

For every query (b, s) and head h, the keys are the rows kv[b, idx[b, s, :]] of one shared K=V tensor
(V4's single 512-dim KV head); idx = -1 marks an unused slot. V4 puts the sliding-window positions first and
the selected (CSA) or all visible (HCA) compressed entries after them (architecture §3.4.6):

    z_k = scale * q . kv[idx_k]            (fp32)
    p_k = exp(z_k) / (sum_k exp(z_k) + exp(sink_h))
    o   = sum_k p_k kv[idx_k]

The sink adds to the denominator only. Memory is O(b * s * k * d) for the gathered keys, never O(s * n):
callers chunk the queries to bound it. A row whose indices are all -1 returns zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.numerics import einsum, ordered_max, ordered_sum


def sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, idx: jax.Array, scale: float,
                     return_lse: bool = False):
    """q [b, s, h, d], kv [b, n, d], sink [h] (fp32 logits), idx [b, s, k] int (-1 = unused) -> o [b, s, h, d]
    and, with return_lse, the fp32 log of the softmax denominator (sink included) [b, s, h]."""
    valid = idx >= 0
    keys = jax.vmap(lambda kv_b, i_b: kv_b[i_b])(kv, jnp.where(valid, idx, 0))  # [b, s, k, d]
    z = einsum("bshd,bskd->bshk", q, keys) * scale
    z = jnp.where(valid[:, :, None, :], z, -jnp.inf)
    sink = sink.astype(jnp.float32)[:, None]
    m = jnp.maximum(ordered_max(z, axis=-1, keepdims=True), sink)  # the sink bounds the max: no all -inf rows
    p = jnp.exp(z - m)
    denom = ordered_sum(p, axis=-1, keepdims=True) + jnp.exp(sink - m)
    # The official kernel multiplies bf16 probabilities with bf16 values (fp32 accumulation): same here.
    o = (einsum("bshk,bskd->bshd", p.astype(kv.dtype), keys) / denom).astype(q.dtype)
    return (o, (m + jnp.log(denom))[..., 0]) if return_lse else o
