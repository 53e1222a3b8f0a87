"""lora.optimizer = muon: two steps of train.pretrain's own train step on the adapters of a small model equal Muon
applied by hand (train.muon's HybridNS per matrix: each routed expert's factor on its own, wo_a's b per output
group, wq_a's whole; Nesterov momentum; RMS scaling; decoupled weight decay) to the gradients jax.grad gives;
a's gradient is exactly zero at step 1 (b = 0), so its update is the weight decay alone and nothing is NaN; the
base comes back bit-identical; the Muon state checkpoints and restores (the adapters' momentum and a step count); a bad
lora.optimizer is named."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train import losses, pretrain
from train.muon import hybrid_newton_schulz, path_str
from v4jax import lora
from v4jax.config import ModelConfig
from v4jax.model import Transformer

SMALL = dict(vocab_size=256, n_layers=1, n_mtp_layers=0, n_hash_layers=0, compress_ratios=[0], n_routed_experts=4,
             n_heads=4, o_groups=2, moe_inter_dim=32, compute_dtype="float32")
LR, MU, RMS, WD = 0.02, 0.9, 0.2, 0.1  # not the defaults: the optimizer section's keys are the ones used
RAW = {"init": "unused", "lora": {"enabled": True, "rank": 4, "alpha": 8, "optimizer": "muon",
                                  "targets": ["wq_a", "wo_a", "experts"]},
       "optimizer": {"momentum": MU, "muon_rms_scale": RMS, "muon_weight_decay": WD}}
WEIGHTS = {"lm": 1.0, "mtp": 0.0, "balance": 1e-4, "indexer": 0.0}
newton_schulz = jax.jit(hybrid_newton_schulz)  # one compile per matrix shape (eager, its scan compiles per call)


def by_hand(name: str, nesterov: np.ndarray, param: np.ndarray, mcfg: ModelConfig) -> np.ndarray:
    """-lr (O + wd W): O = HybridNS * rms * sqrt(max(n, m)) of each expert's matrix, wo_a's b per output group."""
    groups = mcfg.o_groups if name.endswith("wo_a_lora.b") else 1
    out = np.zeros_like(nesterov)
    for idx in np.ndindex(nesterov.shape[:-2]):
        for rows in np.split(np.arange(nesterov.shape[-2]), groups):
            m = nesterov[idx][rows]
            out[idx][rows] = np.asarray(newton_schulz(jnp.asarray(m))) * RMS * math.sqrt(max(m.shape))
    return -LR * (out + WD * param)


def flat(state) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def test_muon_steps_on_the_adapters_match_muon_by_hand_and_leave_the_base(tmp_path):
    cfg = pretrain.validate(RAW | {"run_dir": str(tmp_path / "run"), "checkpoint": {"async": False}})
    mcfg = ModelConfig.preset("tiny", **SMALL)
    model = lora.attach(Transformer(mcfg, rngs=nnx.Rngs(0)), pretrain.lora_config(cfg), nnx.Rngs(1))
    graphdef, params, base = nnx.split(model, lora.LoraParam, ...)
    tx = pretrain.optimizer(cfg, mcfg, params, optax.constant_schedule(LR))
    opt_state = tx.init(params)
    trainable = {path_str(p): True for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    shardings = jax.tree.map(lambda x: x.sharding, (params, base, opt_state))
    step = pretrain.make_train_step(graphdef, tx, trainable, None, shardings)
    weights = {k: jnp.float32(v) for k, v in WEIGHTS.items()}
    tokens = jax.random.randint(jax.random.key(2), (2, 1, 2, 33), 0, SMALL["vocab_size"])  # 2 steps of 1 x 2 x 32
    batches = [{"tokens": t, "segment_ids": jnp.ones_like(t)} for t in tokens]

    @jax.jit
    def grad(params, tokens):
        def loss(p):
            return losses.objective(nnx.merge(graphdef, p, base), tokens, jnp.ones_like(tokens), WEIGHTS)[0]
        return jax.grad(loss)(params)

    base_before = jax.tree.map(np.array, base)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - the step donates its inputs
    p1, base1, s1, m1 = step(copy(params), copy(base), copy(opt_state), batches[0], weights)
    p2, base2, s2, m2 = step(copy(p1), base1, copy(s1), batches[1], weights)
    assert bool(m1["good"]) and bool(m2["good"])

    g1, g2 = flat(grad(params, tokens[0, 0])), flat(grad(p1, tokens[1, 0]))
    p0, p1f, p2f = flat(params), flat(p1), flat(p2)
    assert len(p0) == (2 + 3) * 2  # (wq_a, wo_a, the routed experts' w1, w2, w3) x (a, b)
    for name in p0:
        if name.endswith(".a"):  # b = 0: no gradient reaches a, its Muon direction is 0 (not NaN), only decay moves it
            assert not g1[name].any()
            np.testing.assert_allclose(p1f[name], p0[name] * (1 - LR * WD), rtol=1e-6)
        nesterov1 = (1 + MU) * g1[name]  # momentum starts at 0
        want1 = p0[name] + by_hand(name, nesterov1, p0[name], mcfg)
        momentum2 = MU * g1[name] + g2[name]
        want2 = p1f[name] + by_hand(name, MU * momentum2 + g2[name], p1f[name], mcfg)
        for got, want in ((p1f[name], want1), (p2f[name], want2)):
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, want, atol=2e-5 * LR, err_msg=name)
        assert np.abs(p2f[name] - p1f[name]).max() > 1e-3 * LR, name  # every factor moves at step 2
    assert jax.tree.all(jax.tree.map(lambda x, y: x.dtype == y.dtype and np.array_equal(x, y), base_before,
                                     jax.tree.map(np.asarray, base2)))

    # the checkpoint of a Muon run: adapters, their momentum and one step count (the schedule's), restored bitwise
    state = {"params": p2, "others": base2, "opt_state": s2}
    assert sum(x.size for x in jax.tree.leaves(pretrain.checkpointed(state, cfg))) == 2 * sum(
        x.size for x in p0.values()) + 1
    manager = pretrain.checkpoint_manager(cfg)
    pretrain.save(manager, 2, pretrain.checkpointed(state, cfg), {"step": 2})
    fresh = {"params": params, "others": base, "opt_state": tx.init(params)}
    got, meta = pretrain.restore(manager, pretrain.checkpointed(fresh, cfg), 2)
    manager.close()
    want = flat(pretrain.checkpointed(state, cfg))
    assert meta == {"step": 2} and flat(got).keys() == want.keys()
    assert all(flat(got)[k].tobytes() == v.tobytes() for k, v in want.items())


def test_a_bad_lora_optimizer_is_named():
    with pytest.raises(pretrain.ConfigError, match=r"lora.optimizer = 'sgd': Input should be 'adamw' or 'muon'"):
        pretrain.validate(RAW | {"lora": RAW["lora"] | {"optimizer": "sgd"}})
    assert pretrain.validate({})["lora"]["optimizer"] == "adamw"
