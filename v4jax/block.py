"""One V4 block (architecture §3.2): two mHC sites, attention then MoE, each read as the official code writes it:
hc_pre (collapse the streams) -> norm -> sub-layer -> hc_post (spread back and mix). The backbone's layers, the
preview's MTP block and the DSpark drafter's stages are all this block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.attention import Attention, AttentionCache
from v4jax.config import ModelConfig
from v4jax.hyper_connection import hc_post, hc_pre
from v4jax.layers import param, rms_norm
from v4jax.moe import MoE

STREAMS = ("batch", "seq", None, "act_embed")  # logical axes of the residual streams [b, s, hc, d]


class HCSite(nnx.Module):
    """The parameters of one mHC site (fn, base, scale) or, with `head=True`, of a head collapse."""

    def __init__(self, cfg: ModelConfig, head: bool, *, rngs: nnx.Rngs):
        hc = cfg.hc_mult
        n_mix = hc if head else (2 + hc) * hc
        self.cfg = cfg
        self.fn = param(rngs, (n_mix, hc * cfg.dim), ("hc_mix", "hc_embed"), jnp.float32)
        self.base = param(rngs, (n_mix,), ("hc_mix",), jnp.float32, "const", 0.0)
        self.scale = param(rngs, (1 if head else 3,), ("hc_gate",), jnp.float32, "const", 0.01)

    def pre(self, x: jax.Array):
        """hc_pre: streams x [b, s, hc, d] -> (the sub-layer's input u [b, s, d], post, comb for hc_post)."""
        cfg = self.cfg
        return hc_pre(x, self.fn[...], self.scale[...], self.base[...], hc=cfg.hc_mult, iters=cfg.hc_sinkhorn_iters,
                      eps=cfg.hc_eps, norm_eps=cfg.norm_eps)


class Block(nnx.Module):
    attention_cls = Attention

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.attn_norm = param(rngs, (cfg.dim,), ("norm",), pd, "const", 1.0)
        self.ffn_norm = param(rngs, (cfg.dim,), ("norm",), pd, "const", 1.0)
        self.hc_attn = HCSite(cfg, False, rngs=rngs)
        self.hc_ffn = HCSite(cfg, False, rngs=rngs)
        self.attn = self.attention_cls(cfg, layer, rngs=rngs)
        self.ffn = MoE(cfg, layer, rngs=rngs)

    def __call__(self, x: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [b, s, hc, d] streams, token_ids [b, s] (hash routing), segment_ids [b, s] packed documents
        (None: one per row) -> [b, s, hc, d]."""
        return self.forward(x, token_ids, segment_ids)[0]

    def forward(self, x: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None = None,
                topk: jax.Array | None = None):
        """__call__ passing on the CSA top-k under IndexCache (Attention.forward) -> (x, top-k)."""
        eps = self.cfg.norm_eps
        u, post, comb = self.hc_attn.pre(x)
        y, topk = self.attn.forward(rms_norm(u, self.attn_norm[...], eps), segment_ids, topk)
        x = hc_post(y, x, post, comb)
        u, post, comb = self.hc_ffn.pre(x)
        return hc_post(self.ffn(rms_norm(u, self.ffn_norm[...], eps), token_ids), x, post, comb), topk

    def step(self, x, token_ids, cache: AttentionCache, start, n_new, topk=None):
        """The block over a cache: the next tokens of each sequence (see Attention.step) -> (x, new cache, the
        chunk's pending cache writes, the CSA top-k for the next layers under IndexCache)."""
        eps = self.cfg.norm_eps
        u, post, comb = self.hc_attn.pre(x)
        y, cache, pending, topk = self.attn.step(rms_norm(u, self.attn_norm[...], eps), cache, start, n_new, topk)
        x = hc_post(y, x, post, comb)
        u, post, comb = self.hc_ffn.pre(x)
        x = hc_post(self.ffn(rms_norm(u, self.ffn_norm[...], eps), token_ids, False), x, post, comb)
        return x, cache, pending, topk
