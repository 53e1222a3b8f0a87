"""The DeepSeek-V4 pretraining objective (spec §6.1, §6.2).

    loss = CE(next token) + w_mtp * CE(MTP: position i predicts token i + 2) + 1e-4 * sum_layers balance_loss
           + w_idx * sum_CSA_layers indexer_kl

w_mtp is 0.3, then 0.1 from the start of the LR decay. The balance loss is DeepSeek-V3's sequence-wise
sum_e f_e P_e of every score-routed MoE layer (the model sows it, unweighted). The indexer KL (V3.2 recipe,
sown by CSA layers when the config's indexer_loss is on) trains the lightning indexer towards the main
attention over the compressed entries; the model detaches the indexer's input, so the KL trains only the
indexer. In the indexer warm-up stage the objective is the KL alone (the main model is frozen).

Packed rows: a target counts only if it lies in the same document as the position predicting it
(segment_ids equal), so no loss crosses documents; with a loss mask (SFT rows, train.chat), only targets
whose mask is 1 count (the assistant's tokens), for the main and the MTP loss alike. The aux-loss-free router
bias is not part of the gradient: `router_bias_updates` moves it from the expert loads after each step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from v4jax.layers import split_chunks


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed next-token cross entropy (nats) over the positions where mask is true; logits [b, s, v] fp32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * mask)


def head_cross_entropy(model, x: jax.Array, site, norm, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross entropy of model.logits(x, site, norm) over the masked positions, cfg.loss_chunk positions at
    a time, each chunk rematerialised: the fp32 logits (2.1 GB per 4096 positions at V4's 129K vocab) exist one
    chunk at a time, in the forward pass and again in the backward."""
    chunk = min(model.cfg.loss_chunk, targets.shape[1])

    @jax.checkpoint
    def chunk_sum(c):
        z, t, m = c
        return cross_entropy_sum(model.logits(z, site, norm), t, m)

    total = jnp.sum(jax.lax.map(chunk_sum, tuple(split_chunks(a, chunk) for a in (x, targets, mask))))  # pad: masked
    return total / jnp.maximum(jnp.sum(mask), 1)


def mtp_weight(step, decay_start: int, before: float = 0.3, after: float = 0.1):
    """The MTP loss weight: `before` until the LR decay starts, `after` from then on."""
    return jnp.where(step < decay_start, before, after)


def objective(model, tokens: jax.Array, segment_ids: jax.Array, weights: dict, loss_mask: jax.Array | None = None):
    """The training loss of one packed batch and its parts.

    tokens, segment_ids [b, L + 1] (the loader's rows); weights: {"mtp", "balance", "indexer", "lm"} scalars
    ("lm" is 0 in the indexer warm-up); loss_mask [b, L + 1] (optional): token j counts as a target only where
    it is nonzero. Returns (loss, metrics, expert loads {layer path: [experts]}).
    """
    inputs, segs = tokens[:, :-1], segment_ids[:, :-1]
    counts = jnp.ones(tokens.shape, bool) if loss_mask is None else loss_mask != 0
    same_doc = (segment_ids[:, 1:] == segs) & counts[:, 1:]  # target i + 1 belongs to position i's document
    x, stats = model.hidden(inputs, segs, with_stats=True)
    lm = head_cross_entropy(model, x, model.hc_head, model.norm, tokens[:, 1:], same_doc)
    metrics = {"lm_loss": lm}
    loss = weights["lm"] * lm
    if model.mtp is not None:
        # The MTP block is fed token i + 1 at position i and predicts token i + 2; the row's last position has
        # no i + 2, and a target in another document does not count.
        y, mtp_stats = model.mtp_hidden(x, tokens[:, 1:], segs)
        stats.update(mtp_stats)
        target = jnp.pad(tokens[:, 2:], ((0, 0), (0, 1)))
        mask = jnp.pad((segment_ids[:, 2:] == segs[:, :-1]) & counts[:, 2:], ((0, 0), (0, 1)))
        metrics["mtp_loss"] = head_cross_entropy(model, y, model.mtp.hc_head, model.mtp.norm, target, mask)
        loss = loss + weights["lm"] * weights["mtp"] * metrics["mtp_loss"]
    balance = [v for k, v in stats.items() if k.endswith("balance_loss")]
    if balance:
        metrics["balance_loss"] = sum(balance)
        loss = loss + weights["lm"] * weights["balance"] * metrics["balance_loss"]
    kl = [v for k, v in stats.items() if k.endswith("indexer_kl")]
    if kl:
        metrics["indexer_kl"] = sum(kl) / len(kl)
        loss = loss + weights["indexer"] * sum(kl)
    loads = {k[: -len(".expert_load")]: v for k, v in stats.items() if k.endswith("expert_load")}
    return loss, metrics, loads


def router_bias_updates(loads: dict[str, jax.Array], biases: dict[str, jax.Array], speed: float):
    """The aux-loss-free rule (DeepSeek-V3): each expert's bias moves by `speed` towards balance, down if it
    received more than the mean load in this step, up if less. loads {moe path: [e]}, biases {moe path: [e]}
    (score-routed layers only; hash-routed layers have no bias) -> the new biases."""
    return {k: b + speed * jnp.sign(jnp.mean(loads[k]) - loads[k]) for k, b in biases.items()}


def load_balance(loads: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(max, min) over the MoE layers and experts of load / mean load: 1 and 1 is perfectly balanced."""
    rel = jnp.stack([v / jnp.maximum(jnp.mean(v), 1e-9) for v in loads.values()])
    return jnp.max(rel), jnp.min(rel)
