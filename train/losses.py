"""The DeepSeek-V4 pretraining objective (architecture §6.1, §6.2).

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
bias is not part of the gradient: `router_bias_update` moves it from the expert loads after each step.

A DSpark drafter run (train.pretrain with drafter.enabled) has its own objective, `drafter_objective` (architecture
§8.5): CE, weighted L1 distance to the frozen target and the confidence BCE, see `drafter_loss`.
"""

from __future__ import annotations

from typing import NamedTuple

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
    it is nonzero. Returns (loss, metrics, the MoE layers' ExpertLoads).
    """
    inputs, segs = tokens[:, :-1], segment_ids[:, :-1]
    counts = jnp.ones(tokens.shape, bool) if loss_mask is None else loss_mask != 0
    same_doc = (segment_ids[:, 1:] == segs) & counts[:, 1:]  # target i + 1 belongs to position i's document
    x, layer_stats = model.hidden(inputs, segs, with_stats=True)
    mtp_stats = None
    lm = head_cross_entropy(model, x, model.hc_head, model.norm, tokens[:, 1:], same_doc)
    metrics = {"lm_loss": lm}
    loss = weights["lm"] * lm
    if model.mtp is not None:
        # The MTP block is fed token i + 1 at position i and predicts token i + 2; the row's last position has
        # no i + 2, and a target in another document does not count.
        y, mtp_stats = model.mtp_hidden(x, tokens[:, 1:], segs)
        target = jnp.pad(tokens[:, 2:], ((0, 0), (0, 1)))
        mask = jnp.pad((segment_ids[:, 2:] == segs[:, :-1]) & counts[:, 2:], ((0, 0), (0, 1)))
        metrics["mtp_loss"] = head_cross_entropy(model, y, model.mtp.hc_head, model.mtp.norm, target, mask)
        loss = loss + weights["lm"] * weights["mtp"] * metrics["mtp_loss"]
    stats = (*layer_stats, *([mtp_stats] if mtp_stats is not None else []))
    balance = [s.balance_loss for s in stats if s.balance_loss is not None]
    if balance:
        metrics["balance_loss"] = sum(balance)
        loss = loss + weights["lm"] * weights["balance"] * metrics["balance_loss"]
    kl = [s.indexer_kl for s in stats if s.indexer_kl is not None]
    if kl:
        metrics["indexer_kl"] = sum(kl) / len(kl)
        loss = loss + weights["indexer"] * sum(kl)
    loads = ExpertLoads(tuple(s.expert_load for s in layer_stats), None if mtp_stats is None else mtp_stats.expert_load)
    return loss, metrics, loads


class ExpertLoads(NamedTuple):
    """Token-slot counts per expert [experts] of each MoE that ran: one per backbone layer, and the MTP block's."""

    layers: tuple[jax.Array, ...]
    mtp: jax.Array | None = None


def router_bias_update(load: jax.Array, bias: jax.Array, speed: float) -> jax.Array:
    """The aux-loss-free rule (DeepSeek-V3) for one score-routed MoE: each expert's bias moves by `speed` towards
    balance, down if it received more than the mean load [e] in this step, up if less -> the new bias [e]."""
    return bias + speed * jnp.sign(jnp.mean(load) - load)


def load_balance(loads: ExpertLoads) -> tuple[jax.Array, jax.Array]:
    """(max, min) over the MoE layers and experts of load / mean load: 1 and 1 is perfectly balanced."""
    rel = jnp.stack([v / jnp.maximum(jnp.mean(v), 1e-9) for v in (*loads.layers, loads.mtp) if v is not None])
    return jnp.max(rel), jnp.min(rel)


# ---- the DSpark drafter (architecture §8.5) -----------------------------------------------------------------

def drafter_loss(draft_logits: jax.Array, conf: jax.Array, target_logits: jax.Array, gt: jax.Array,
                 valid: jax.Array, weights: dict):
    """The drafter's loss over N blocks of B slots per row: draft_logits (Markov-corrected) and target_logits
    [b, N, B, vocab] fp32, confidence logits conf [b, N, B], the true tokens gt [b, N, B], valid [b, N, B] (slot k's
    token exists and lies in the anchor's document). weights: {"ce", "tv", "confidence", "tv_decay"}.

        mask_k  = valid_0 & .. & valid_k                          (the contiguous prefix of a block that counts)
        l1_k    = ||softmax(draft_k) - softmax(target_k)||_1      (in [0, 2]; 1 - l1_k / 2 = sum min(p, q) is the
                                                                   probability that slot k's draft is accepted)
        loss    = ce * mean_mask CE(draft_k, gt_k)
                + tv * sum_{masked k} exp(-k / tv_decay) l1_k / (b N)         (k = 0 .. B - 1, per block)
                + confidence * mean_mask BCE_with_logits(conf_k, stop_gradient(1 - l1_k / 2))

    The spec writes the distance as ||.||_1 (twice the total variation): used as written. It does not say how the
    terms are averaged: CE and BCE over the counted slots, the weighted distance summed over a block's slots and
    averaged over the blocks (the sum_k of the formula). -> (loss, metrics: draft_ce, draft_tv (the weighted term),
    draft_bce, draft_accept (the mean acceptance probability of the counted slots))."""
    B = gt.shape[-1]
    mask = jnp.cumprod(valid.astype(jnp.int32), axis=-1).astype(jnp.float32)
    n_slots = jnp.maximum(jnp.sum(mask), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(draft_logits, gt)
    l1 = jnp.sum(jnp.abs(jax.nn.softmax(draft_logits, -1) - jax.nn.softmax(target_logits, -1)), axis=-1)
    w = jnp.exp(-jnp.arange(B, dtype=jnp.float32) / weights["tv_decay"])
    accept = jax.lax.stop_gradient(1.0 - 0.5 * l1)
    bce = optax.sigmoid_binary_cross_entropy(conf, accept)
    metrics = {"draft_ce": jnp.sum(ce * mask) / n_slots, "draft_tv": jnp.sum(w * l1 * mask) / (mask.size // B),
               "draft_bce": jnp.sum(bce * mask) / n_slots, "draft_accept": jnp.sum(accept * mask) / n_slots}
    loss = (weights["ce"] * metrics["draft_ce"] + weights["tv"] * metrics["draft_tv"]
            + weights["confidence"] * metrics["draft_bce"])
    return loss, metrics


def drafter_objective(model, tokens: jax.Array, segment_ids: jax.Array, anchors: jax.Array, weights: dict,
                      loss_mask: jax.Array | None = None):
    """The drafter's training loss on one packed batch: tokens, segment_ids [b, L + 1] (the loader's rows), anchors
    [b, N] (block starts, 1 <= a <= L - B), loss_mask as in `objective`. The frozen target runs over the first L
    tokens; everything taken from it (main_hidden, its logits, the embedding and head the drafter shares) is
    behind stop_gradient, so no gradient reaches the target. Slot k of the block at a proposes token a + 1 + k;
    the target's distribution for it is its logits at position a + k. -> (loss, metrics, None (no expert loads:
    the drafter's router biases stay as they are))."""
    sg = jax.lax.stop_gradient
    inputs, segs = tokens[:, :-1], segment_ids[:, :-1]
    b, N, B = *anchors.shape, model.cfg.dspark_block_size
    x, main_hidden = sg(model.drafter_inputs(inputs, segs))
    pos = (anchors[..., None] + jnp.arange(B)).reshape(b, N * B)
    at = lambda a, p: jnp.take_along_axis(a, p, axis=1)  # noqa: E731 - rows of a [b, L, ..] at positions p [b, n]
    target_logits = sg(model.logits(at(x, pos[:, :, None, None]), model.hc_head, model.norm))
    draft_logits, conf = model.dspark.teacher_forced(main_hidden, inputs, segs, anchors,
                                                     lambda ids: sg(model.embed_tokens(ids)), sg(model.head[...]))
    counts = jnp.ones(tokens.shape, bool) if loss_mask is None else loss_mask != 0
    valid = (at(segment_ids, pos + 1) == at(segs, jnp.repeat(anchors, B, axis=1))) & at(counts, pos + 1)
    loss, metrics = drafter_loss(draft_logits, conf, target_logits.reshape(draft_logits.shape),
                                 at(tokens, pos + 1).reshape(b, N, B), valid.reshape(b, N, B), weights)
    return loss, metrics, None
