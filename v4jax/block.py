"""One V4 block (spec §3.2): two mHC sites, attention then MoE, each read as the official code writes it:
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
        self.fn = param(rngs, (n_mix, hc * cfg.dim), ("hc_mix", "hc_embed"), jnp.float32)
        self.base = param(rngs, (n_mix,), ("hc_mix",), jnp.float32, "const", 0.0)
        self.scale = param(rngs, (1 if head else 3,), ("hc_gate",), jnp.float32, "const", 0.01)


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

    def _site(self, x, site: HCSite, norm, sublayer):
        cfg = self.cfg
        u, post, comb = hc_pre(x, site.fn[...], site.scale[...], site.base[...], hc=cfg.hc_mult,
                               iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
        return hc_post(sublayer(rms_norm(u, norm[...], cfg.norm_eps)), x, post, comb)

    def __call__(self, x: jax.Array, token_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [b, s, hc, d] streams, token_ids [b, s] (hash routing), segment_ids [b, s] packed documents
        (None: one per row) -> [b, s, hc, d]."""
        x = self._site(x, self.hc_attn, self.attn_norm, lambda y: self.attn(y, segment_ids))
        return self._site(x, self.hc_ffn, self.ffn_norm, lambda y: self.ffn(y, token_ids))

    def step(self, x, token_ids, cache: AttentionCache, start, n_new):
        """The block over a cache: the next tokens of each sequence (see Attention.step) -> (x, new cache, the
        chunk's pending cache writes)."""
        out = {}

        def attn(y):
            y, out["cache"], out["pending"] = self.attn.step(y, cache, start, n_new)
            return y

        x = self._site(x, self.hc_attn, self.attn_norm, attn)
        x = self._site(x, self.hc_ffn, self.ffn_norm, lambda y: self.ffn(y, token_ids, False))
        return x, out["cache"], out["pending"]
