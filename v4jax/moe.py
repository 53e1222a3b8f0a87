"""DeepSeek-V4 mixture of experts (architecture §3.5): the Gate, routed experts and the shared expert.

Gate: s = sqrt(softplus(y . W_g)) in fp32. Score-routed layers pick the top-k of s + bias (the
auxiliary-loss-free bias steers selection only); the first n_hash_layers take their k experts from a fixed
token-id table tid2eid. Either way the weights are the *unbiased* s at the chosen experts, normalised to sum 1
and scaled by route_scale. Experts (v4jax.experts) are SwiGLU with the clamp; the routing weight multiplies the hidden
activation before the down projection, as the official code does (it matters under qat's FP8 rounding).

Three implementations of the routed sum, chosen by cfg.moe_impl (a run on a mesh gets its choice from
sharding.for_mesh, once, before the model is built):
  * "ragged": sort the (token, slot) pairs by expert and run dropless grouped matmuls (`jax.lax.ragged_dot`);
  * "expert_parallel": the same on every device of the current mesh (`jax.set_mesh` / sharding.use_rules) for its
    own tokens (v4jax.expert_parallel: never a global sort, which the partitioner would replicate), exchanging
    them with the devices holding their experts when the `expert` axis is larger than 1 (buffers sized by
    cfg.moe_ep_capacity); sows `ep_dropped`, the (token, slot) pairs that did not fit (0 with the default);
  * "dense": every expert on every token (a plain reference for tests).
The gate and the shared expert run outside the exchange either way. Letters: n tokens, k slots, e experts,
f expert hidden, d model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.expert_parallel import ep_routed
from v4jax.experts import Experts, expert_ffn, grouped_ffn
from v4jax.layers import param
from v4jax.quant import Adapted, linear, weight


class RouterBias(nnx.Variable):
    """The aux-loss-free routing bias: updated by the training loop from expert loads, never by gradients."""


class HashTable(nnx.Variable):
    """tid2eid: frozen token-id -> expert-ids table of hash-routed layers."""


def balanced_hash_table(key: jax.Array, vocab: int, n_experts: int, k: int) -> jax.Array:
    """A tid2eid for training from scratch (the real hash is unpublished, architecture §7.2): every token gets k
    distinct experts and every expert the same number of (token, slot) pairs, +-1, in a random token order."""
    order = jax.random.permutation(key, vocab)
    slots = (jnp.arange(vocab)[:, None] * k + jnp.arange(k)) % n_experts
    return jnp.zeros((vocab, k), jnp.int32).at[order].set(slots.astype(jnp.int32))


class Gate(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.hash = layer < cfg.n_hash_layers
        self.weight = param(rngs, (cfg.n_routed_experts, cfg.dim), ("router", "embed"), jnp.dtype(cfg.param_dtype))
        if self.hash:
            table = balanced_hash_table(rngs.params(), cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts)
            self.tid2eid = HashTable(table, out_sharding=("vocab", None), eager_sharding=False)
        else:
            self.bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), out_sharding=("router",),
                                   eager_sharding=False)

    def __call__(self, y: jax.Array, token_ids: jax.Array):
        """y [n, d], token_ids [n] -> (weights [n, k] fp32, expert ids [n, k] int32, scores [n, e] fp32)."""
        cfg = self.cfg
        logits = linear(y.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        if cfg.score_func == "softmax":
            scores = jax.nn.softmax(logits, axis=-1)
        elif cfg.score_func == "sigmoid":
            scores = jax.nn.sigmoid(logits)
        else:
            scores = jnp.sqrt(jax.nn.softplus(logits))
        if self.hash:
            ids = self.tid2eid[...][token_ids].astype(jnp.int32)
        else:
            ids = jax.lax.top_k(scores + self.bias[...], cfg.n_activated_experts)[1]
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        if cfg.score_func != "softmax":
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights * cfg.route_scale, ids, scores


def balance_loss(scores: jax.Array, ids: jax.Array) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss sum_e f_e P_e, averaged over rows (architecture §6.1; unweighted).

    scores [b, s, e] (unbiased router scores), ids [b, s, k]: f_e = e / (k s) * (tokens routed to e) carries no
    gradient; P_e = mean over tokens of s_e / sum_j s_j.
    """
    b, s, e = scores.shape
    k = ids.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.float32), axis=(1, 2))  # [b, e]
    f = jax.lax.stop_gradient(counts * (e / (k * s)))
    p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)
    return jnp.mean(jnp.sum(f * p, axis=-1))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = Gate(cfg, layer, rngs=rngs)
        self.experts = Experts(cfg, cfg.n_routed_experts, rngs=rngs)
        self.shared_experts = Experts(cfg, None, rngs=rngs) if cfg.n_shared_experts else None

    def __call__(self, y: jax.Array, token_ids: jax.Array, sow_stats: bool = True) -> jax.Array:
        """y [b, s, d] (ffn-normed), token_ids [b, s] -> [b, s, d]. Sows the training statistics
        `expert_load` (and `balance_loss` in score-routed layers) unless told not to (inference);
        Transformer.hidden collects them."""
        cfg = self.cfg
        shape = y.shape
        x = y.reshape(-1, shape[-1])
        weights, ids, scores = self.gate(x, token_ids.reshape(-1))
        if sow_stats:
            self._sow_stats(ids, scores, shape[0])
        if cfg.moe_impl == "expert_parallel":
            mesh = jax.sharding.get_abstract_mesh()
            if mesh.empty:
                raise ValueError("moe_impl 'expert_parallel' runs on the current mesh and none is set: trace inside "
                                 "sharding.use_rules(mesh, rules) (or jax.set_mesh), or use moe_impl 'ragged'")
            ex = self.experts
            # LoRA on routed experts goes in merged (a dense weight gradient per layer, as in full training).
            w1, w2, w3 = (w.merged() if isinstance(w, Adapted) else w
                          for w in (weight(ex, n) for n in ("w1", "w2", "w3")))
            # Inference calls cannot report drops, so they get the buffers that never drop.
            routed, dropped = ep_routed(x, weights, ids, w1, w2, w3, cfg, mesh,
                                        cfg.moe_ep_capacity if sow_stats else None)
            if sow_stats:
                self.sow(nnx.Intermediate, "ep_dropped", dropped)
        elif cfg.moe_impl == "ragged":
            routed = self._ragged(x, weights, ids)
        else:
            routed = self._dense(x, weights, ids)
        if self.shared_experts is not None:
            se = self.shared_experts
            routed = routed + expert_ffn(x, *(weight(se, n) for n in ("w1", "w2", "w3")), cfg.swiglu_limit, cfg.qat)
        return routed.astype(y.dtype).reshape(shape)

    def _sow_stats(self, ids, scores, batch: int):
        e, k = self.cfg.n_routed_experts, self.cfg.n_activated_experts
        self.sow(nnx.Intermediate, "expert_load", jnp.zeros(e).at[ids.reshape(-1)].add(1.0))
        if not self.gate.hash:
            loss = balance_loss(scores.reshape(batch, -1, e), ids.reshape(batch, -1, k))
            self.sow(nnx.Intermediate, "balance_loss", loss)

    def _dense(self, x, weights, ids):
        """Every expert on every token; the routing weight is zero for experts a token did not pick."""
        cfg = self.cfg
        ex = self.experts
        dense_w = jnp.sum(jax.nn.one_hot(ids, cfg.n_routed_experts, dtype=jnp.float32) * weights[..., None], axis=1)
        out = jax.vmap(lambda w1, w2, w3, rw: expert_ffn(x, w1, w2, w3, cfg.swiglu_limit, cfg.qat, rw),
                       in_axes=(0, 0, 0, 1))(*(weight(ex, n) for n in ("w1", "w2", "w3")), dense_w)
        return jnp.sum(out, axis=0)

    def _ragged(self, x, weights, ids):
        """Dropless grouped matmul: sort the n*k (token, expert) pairs by expert, one ragged_dot per weight."""
        cfg = self.cfg
        n, k = ids.shape
        flat = ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=cfg.n_routed_experts).astype(jnp.int32)
        ex = self.experts
        out = grouped_ffn(x[token], sizes, weights.reshape(-1)[order],
                          *(weight(ex, n, decode=False) for n in ("w1", "w2", "w3")), cfg.swiglu_limit, cfg.qat,
                          cfg.kernels)
        return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(out)
