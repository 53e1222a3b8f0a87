"""The training objective (train/losses.py): masks across packed documents, MTP targets, the MTP weight schedule,
and the two balancing mechanisms on a router built to be unbalanced."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_grads_close
from train import losses
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.moe import MoE


def test_cross_entropy_counts_only_masked_positions():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7)), jnp.float32)
    targets = jnp.asarray([[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]])
    mask = jnp.asarray([[1, 1, 0, 0, 1], [0, 0, 0, 0, 1]], bool)
    ce = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(5), targets]
    assert np.isclose(losses.cross_entropy_sum(logits, targets, mask), ce[mask].sum(), rtol=1e-6)


def test_mtp_weight_drops_when_the_lr_decay_starts():
    got = [losses.mtp_weight(s, 100) for s in (0, 99, 100, 500)]
    assert np.allclose(got, [0.3, 0.3, 0.1, 0.1])


@pytest.mark.parametrize("loss_chunk, masked", [(1024, False), (7, True)])
def test_objective_matches_a_direct_computation_on_packed_rows(loss_chunk, masked):
    """lm loss = CE of tokens i + 1 within each document; MTP = CE of token i + 2 from mtp_logits fed token
    i + 1, within the document; the total adds 0.3 * MTP and 1e-4 * the summed balance losses. loss_chunk 7
    splits the 40 positions into 6 chunks, the last one padded. With a loss mask (SFT), only targets whose
    mask is 1 count, in both losses."""
    cfg = ModelConfig.preset("tiny", compute_dtype="float32", loss_chunk=loss_chunk)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 41)))
    seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 21], 2, axis=0))
    weights = {"lm": 1.0, "mtp": 0.3, "balance": 1e-4, "indexer": 0.0}
    mask = rng.integers(0, 2, tokens.shape) if masked else np.ones(tokens.shape, int)
    loss, metrics, loads = nnx.jit(losses.objective)(model, tokens, seg, weights, jnp.asarray(mask) if masked else None)

    # the direct computation, jitted (eager, each op is compiled on its own) and read back as numpy
    x = nnx.jit(lambda m, t, s: m.hidden(t, s))(model, tokens[:, :-1], seg[:, :-1])
    logp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, x: m.logits(x, m.hc_head, m.norm))(model, x)))
    pos = [i for i in range(40) if i != 19]  # position 19 ends document 0: its next token is document 1's
    lm = -np.mean([logp[b, i, tokens[b, i + 1]] for b in range(2) for i in pos if mask[b, i + 1]])
    mlogp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, x, t, s: m.mtp_logits(x, t, s))(model, x, tokens[:, 1:],
                                                                                            seg[:, :-1])))
    mpos = [i for i in range(39) if i not in (18, 19)]
    mtp = -np.mean([mlogp[b, i, tokens[b, i + 2]] for b in range(2) for i in mpos if mask[b, i + 2]])
    assert np.isclose(metrics["lm_loss"], lm, rtol=1e-5) and np.isclose(metrics["mtp_loss"], mtp, rtol=1e-5)
    n_score = cfg.n_layers - cfg.n_hash_layers + 1  # + the MTP block's MoE
    assert 0.5 * n_score < metrics["balance_loss"] < 2 * n_score  # ~1 per layer near uniform routing
    assert np.isclose(loss, lm + 0.3 * mtp + 1e-4 * metrics["balance_loss"], rtol=1e-6)
    assert len(loads.layers) == cfg.n_layers and loads.mtp is not None
    assert all(float(v.sum()) == 80 * cfg.n_activated_experts for v in (*loads.layers, loads.mtp))


def test_chunked_loss_has_the_gradients_of_the_whole_one():
    """The rematerialised, chunked head + cross entropy (loss_chunk 7 over 24 positions) gives the gradients
    of one chunk (loss_chunk 1024), head and MTP weights included."""
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, 1024, (2, 25)))
    seg = jnp.asarray(np.repeat([[0] * 11 + [1] * 14], 2, axis=0))
    weights = {"lm": 1.0, "mtp": 0.3, "balance": 1e-4, "indexer": 0.0}
    grads = []
    for chunk in (1024, 7):
        model = Transformer(ModelConfig.preset("tiny", compute_dtype="float32", loss_chunk=chunk), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss_fn = lambda p: losses.objective(nnx.merge(graphdef, p, rest), tokens, seg, weights)[0]  # noqa: E731
        g = jax.jit(jax.grad(loss_fn))(params)
        grads.append({path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(g)})
    assert np.max(np.abs(grads[0][("head",)])) > 0
    assert_grads_close(grads[1], grads[0])


def skewed_moe():
    """One score-routed MoE layer whose router strongly prefers experts 0-2 for the inputs below."""
    cfg = ModelConfig.preset("tiny", n_hash_layers=0, compute_dtype="float32")
    moe = MoE(cfg, 0, rngs=nnx.Rngs(0))
    y = jnp.asarray(np.random.default_rng(1).normal(size=(4, 64, cfg.dim)) + 0.5, jnp.float32)
    w = moe.gate.weight[...]
    moe.gate.weight[...] = w.at[:3].set(0.005)  # rows aligned with the inputs' mean direction
    return moe, y


@nnx.jit
def loads_of(moe, y):
    moe(y, jnp.zeros(y.shape[:2], jnp.int32))
    inter = nnx.pop(moe, nnx.Intermediate)
    return inter["expert_load"][-1], inter["balance_loss"][-1]


def spread(load):
    load = np.asarray(load)
    return load.max() / load.mean()


def test_bias_update_moves_loads_towards_balance():
    moe, y = skewed_moe()
    first, _ = loads_of(moe, y)
    assert spread(first) > 2.5  # built unbalanced
    for _ in range(300):  # the spec's speed 0.001 per step
        load, _ = loads_of(moe, y)
        moe.gate.bias[...] = losses.router_bias_update(load, moe.gate.bias[...], 1e-3)
    last, _ = loads_of(moe, y)
    assert spread(last) < 0.6 * spread(first), (spread(first), spread(last))
    assert float(moe.gate.bias[:3].max()) < 0 < float(moe.gate.bias[3:].max())  # overloaded experts pushed down


def test_balance_loss_gradient_moves_loads_towards_balance():
    moe, y = skewed_moe()
    first, b0 = loads_of(moe, y)

    def balance(m):  # the sown balance loss, differentiated w.r.t. the router weight only
        m(y, jnp.zeros(y.shape[:2], jnp.int32))
        return nnx.pop(m, nnx.Intermediate)["balance_loss"][-1]

    router = nnx.All(nnx.Param, nnx.PathContains("gate"))
    grad = nnx.jit(nnx.grad(balance, argnums=nnx.DiffState(0, router)))
    for _ in range(40):
        moe.gate.weight[...] = moe.gate.weight[...] - 0.05 * grad(moe)["gate"]["weight"][...]
    last, b1 = loads_of(moe, y)
    assert float(b1) < float(b0)
    assert spread(last) < 0.8 * spread(first), (spread(first), spread(last))
