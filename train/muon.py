"""The DeepSeek-V4 optimizer (architecture §6.1, [TR §2.4]): Muon for the matrices, AdamW for everything else.

Muon, per logically independent matrix W (n x m), with gradient G:
    M <- mu M + G                                  (momentum, mu = 0.95)
    O' = HybridNS(mu M + G)                        (Nesterov; Newton-Schulz on M / ||M||_F)
    O  = O' * sqrt(max(n, m)) * 0.18               (matches AdamW's update RMS, so one learning rate serves both)
    W <- W (1 - lr wd) - lr O                      (decoupled weight decay 0.1)
HybridNS: 10 steps X <- a X + b (X X^T) X + c (X X^T)^2 X, 8 with (3.4445, -4.7750, 2.0315) driving the
singular values up fast, then 2 with (2, -1.5, 0.5) settling them at 1.

Which matrices are "logically independent" (architecture §7.4 leaves it open; our choice, one rule in `muon_split`):
  * stacked routed experts [E, out, in]: every expert on its own (the leading axis is a batch of matrices);
  * attn.wo_a: one matrix per output group (the paper's A_k act on disjoint head groups: block diagonal);
  * CSA compressors' wkv / wgate [2 * head, dim]: the two halves on their own (the paper's W^b for the previous
    window and W^a for the own window are separate matrices, eqs. 9-12); HCA compressors hold one;
  * mHC fn [(2 + hc) hc, hc d]: the pre, post and res row blocks on their own (W^pre, W^post, W^res);
  * one matrix each: wq_b (the paper's single up-projection from the shared latent c^Q; heads are a reshape of
    its output), the indexer's wq_b and weights_proj, wq_a, wkv, wo_b, the router's gate.weight, the shared
    expert, MTP e_proj / h_proj, the head collapse fn.
AdamW (0.9, 0.95, eps 1e-20, wd 0.1): the embedding, the LM head, every vector (RMSNorm weights, mHC base and
scale, attention sinks) and the compressors' ape (a learned positional bias table, not a linear map).
Router biases (RouterBias) and tid2eid (HashTable) are not nnx.Params: no optimizer touches them.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from v4jax.config import ModelConfig

NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2


def hybrid_newton_schulz(m: jax.Array, coeffs=NS_COEFFS) -> jax.Array:
    """Approximate orthogonal polar factor of each matrix m [..., n, k] (leading axes are separate matrices)."""
    x = m.astype(jnp.float32)
    # + 1e-7: a (near-)zero matrix stays small instead of being blown up to a unit norm (or 0/0).
    x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + 1e-7)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on the smaller Gram matrix; the iteration commutes with transposition
        x = jnp.swapaxes(x, -1, -2)

    def ns_step(x, abc):
        a, b, c = abc[0], abc[1], abc[2]
        gram = x @ jnp.swapaxes(x, -1, -2)
        return a * x + (b * gram + c * gram @ gram) @ x, None

    # a scan (not a Python loop) keeps the compiled program small: one loop body per matrix shape
    x = jax.lax.scan(ns_step, x, jnp.asarray(coeffs, jnp.float32))[0]
    return x if wide else jnp.swapaxes(x, -1, -2)


@dataclasses.dataclass(frozen=True)
class MatrixSplit:
    """How Muon cuts one parameter [..., out, in] into matrices: leading axes index separate matrices, and the
    out axis is cut into row blocks of these sizes (one block = the whole tensor is one matrix)."""
    rows: tuple[int, ...]


def orthogonalize(update: jax.Array, split: MatrixSplit, rms_scale: float, coeffs=NS_COEFFS) -> jax.Array:
    """HybridNS of every matrix of `update`, each scaled by rms_scale * sqrt(max(n, m))."""
    blocks = jnp.split(update, np.cumsum(split.rows)[:-1].tolist(), axis=-2)
    out = [hybrid_newton_schulz(b, coeffs) * (rms_scale * math.sqrt(max(b.shape[-2:]))) for b in blocks]
    return jnp.concatenate(out, axis=-2).astype(update.dtype)


def path_str(path) -> str:
    """A jax tree path of the parameter state -> the dotted parameter name, e.g. 'layers.1.attn.wo_a'."""
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    return ".".join(str(k) for k in keys if k is not None)


def scale_by_muon(split_of, momentum: float = 0.95, rms_scale: float = 0.18,
                  coeffs=NS_COEFFS) -> optax.GradientTransformation:
    """Nesterov momentum + HybridNS + RMS scaling. `split_of(name, shape)` gives each leaf's MatrixSplit."""

    def init(params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def update(grads, mom, params=None):
        mom = jax.tree.map(lambda m, g: momentum * m + g.astype(jnp.float32), mom, grads)
        nesterov = jax.tree.map(lambda m, g: momentum * m + g.astype(jnp.float32), mom, grads)
        updates = jax.tree_util.tree_map_with_path(
            lambda p, n: orthogonalize(n, split_of(path_str(p), n.shape), rms_scale, coeffs), nesterov)
        return updates, mom

    return optax.GradientTransformation(init, update)


def muon(learning_rate, split_of, momentum: float = 0.95, rms_scale: float = 0.18,
         weight_decay: float = 0.1) -> optax.GradientTransformation:
    """Muon with decoupled weight decay: the update is -lr * (O + wd * W)."""
    return optax.chain(scale_by_muon(split_of, momentum, rms_scale), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def muon_split(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> MatrixSplit | None:
    """THE assignment rule: None -> AdamW; otherwise the MatrixSplit Muon orthogonalises (module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) < 2 or name in ("embed", "head") or leaf == "ape":
        return None
    hc = cfg.hc_mult
    if leaf == "fn" and shape[-2] == (2 + hc) * hc:  # an mHC site: pre, post, res blocks
        return MatrixSplit((hc, hc, hc * hc))
    if leaf == "wo_a":
        return MatrixSplit((cfg.o_lora_rank,) * cfg.o_groups)
    if leaf in ("wkv", "wgate") and ".compressor." in name:
        layer = int(re.match(r"layers\.(\d+)\.", name).group(1))
        if ".indexer." in name or cfg.compress_ratios[layer] == 4:  # the paired projections of the overlapping (CSA) compressor
            return MatrixSplit((shape[-2] // 2, shape[-2] // 2))
    return MatrixSplit((shape[-2],))


def assignment(params, cfg: ModelConfig) -> dict[str, MatrixSplit | None]:
    """{parameter name: its MatrixSplit (Muon) or None (AdamW)} for a parameter state."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {path_str(p): muon_split(path_str(p), tuple(x.shape), cfg) for p, x in leaves}


def describe_assignment(params, cfg: ModelConfig) -> str:
    """One line per parameter: name, shape, and `adamw` or `muon` with the matrices it is cut into."""
    lines = []
    for p, x in jax.tree_util.tree_leaves_with_path(params):
        name, shape = path_str(p), tuple(x.shape)
        split = muon_split(name, shape, cfg)
        if split is None:
            how = "adamw"
        else:
            batch = math.prod(shape[:-2])
            n = batch * len(split.rows)
            how = (f"muon  {n} x [{split.rows[0]}, {shape[-1]}]" if len(set(split.rows)) == 1 else
                   "muon  " + " + ".join(f"{batch} x [{r}, {shape[-1]}]" for r in split.rows))
        lines.append(f"{name:<42} {str(shape):<18} {how}")
    return "\n".join(lines)


def v4_optimizer(params, cfg: ModelConfig, learning_rate, *, momentum=0.95, rms_scale=0.18, muon_wd=0.1,
                 adam_b1=0.9, adam_b2=0.95, adam_eps=1e-20, adam_wd=0.1) -> optax.GradientTransformation:
    """Muon for the matrices `muon_split` names, AdamW for the rest; one learning rate (schedule) for both."""
    labels = jax.tree_util.tree_map_with_path(
        lambda p, x: "adamw" if muon_split(path_str(p), tuple(x.shape), cfg) is None else "muon", params)
    split_of = lambda name, shape: muon_split(name, shape, cfg)  # noqa: E731
    return optax.multi_transform({
        "muon": muon(learning_rate, split_of, momentum, rms_scale, muon_wd),
        "adamw": optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=adam_wd),
    }, labels)
