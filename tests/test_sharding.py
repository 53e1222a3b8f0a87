"""Sharding (issue 7): rule presets -> specs, golden spec files, meshes, and sharded == single device.

On the 8 fake CPU devices, for the meshes (data 2, expert 4), (fsdp 2, expert 2, tensor 2) and (expert 8): the
training objective (train/losses.py: LM + MTP + balance + indexer KL) and its gradients under TRAIN_RULES, and
the decode step's logits under DECODE_RULES, equal the same computation on one device (fp32). Also: scanning
the (CSA, HCA) pairs and rematerialisation leave loss, stats and gradients unchanged.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import assert_grads_close, random_ids, rel_err
from train import losses
from v4jax import sharding
from v4jax.config import ConfigError, ModelConfig
from v4jax.model import Transformer, scan_range

GOLDEN = Path(__file__).parent / "golden" / "partition_specs"
MESHES = [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2), dict(expert=8)]
# Smaller than `tiny` (compile time): window-only, CSA and HCA layers, one hash layer, MTP; every sharded dim
# (vocab, heads, o_groups, index heads, experts, expert hidden, dim) divides by 2, 4 and 8.
SMALL = dict(vocab_size=256, dim=64, moe_inter_dim=32, n_layers=3, n_hash_layers=1, n_heads=4, n_routed_experts=8,
             n_activated_experts=2, q_lora_rank=32, head_dim=64, rope_head_dim=32, o_groups=2, o_lora_rank=16,
             window_size=8, compress_ratios=(0, 4, 128, 0), index_n_heads=4, index_head_dim=32, index_topk=4,
             hc_sinkhorn_iters=3, compute_dtype="float32")
B, L, DECODE_STEPS = 8, 24, 9  # decode crosses two CSA windows (ratio 4) and the 8-token window ring
WEIGHTS = {"lm": 1.0, "mtp": 0.3, "balance": 1e-4, "indexer": 1.0}


@functools.cache
def abstract_model(preset: str) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(ModelConfig.preset(preset), rngs=nnx.Rngs(0)))


def small_model(**changes) -> Transformer:
    return Transformer(ModelConfig.preset("tiny", **{**SMALL, **changes}), rngs=nnx.Rngs(0))


def train_batch():
    tokens = random_ids((B, L + 1), SMALL["vocab_size"], seed=1)
    segs = jnp.asarray(np.repeat([[0] * 14 + [1] * (L + 1 - 14)], B, axis=0))  # two packed documents per row
    return tokens, segs


def loss_and_grads(model: Transformer, tokens, segs):
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    weights = {k: jnp.float32(v) for k, v in WEIGHTS.items()}

    def loss_fn(p):
        return losses.objective(nnx.merge(graphdef, p, others), tokens, segs, weights)[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return float(loss), {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}


@nnx.jit
def decode_step(model, cache, tokens):
    logits, _, cache = model.step(cache, tokens)
    return logits, cache


def decode_logits(model: Transformer, place=lambda a: a) -> np.ndarray:
    """Feed DECODE_STEPS tokens one at a time from an empty cache -> logits [steps, b, vocab]."""
    ids = random_ids((B, DECODE_STEPS), SMALL["vocab_size"], seed=2)
    cache = jax.tree.map(place, model.init_cache(B, 16))
    out = []
    for t in range(DECODE_STEPS):
        logits, cache = decode_step(model, cache, place(ids[:, t:t + 1]))
        out.append(np.asarray(logits[:, 0]))
    return np.stack(out)


@pytest.fixture(scope="module")
def single_device():
    """Loss, gradients and decode logits of the unsharded model (device 0)."""
    model = small_model()
    return loss_and_grads(model, *train_batch()), decode_logits(model)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: ",".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_training_and_decode_equal_single_device(shape, single_device):
    (ref_loss, ref_grads), ref_logits = single_device
    mesh = sharding.make_mesh(shape)

    model = sharding.shard_model(small_model(), mesh, sharding.TRAIN_RULES)
    assert model.layers[1].ffn.experts.w1[...].sharding.spec == P("expert", "tensor", "fsdp")
    tokens, segs = (jax.device_put(a, sharding.batch_sharding(mesh, sharding.TRAIN_RULES, 2)) for a in train_batch())
    with sharding.use_rules(mesh, sharding.TRAIN_RULES):
        loss, grads = loss_and_grads(model, tokens, segs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref_grads)

    model = sharding.shard_model(small_model(), mesh, sharding.DECODE_RULES)
    with sharding.use_rules(mesh, sharding.DECODE_RULES):
        logits = decode_logits(model, lambda a: jax.device_put(
            a, sharding.batch_sharding(mesh, sharding.DECODE_RULES, a.ndim)))
    assert np.max(rel_err(logits, ref_logits)) < 1e-5


def test_scan_and_remat_leave_loss_stats_and_gradients_unchanged(single_device):
    # 5 layers: window, then (CSA, HCA) x 2 scanned as one lax.scan of length 2
    changes = dict(n_layers=5, compress_ratios=(0, 4, 128, 4, 128, 0))
    assert scan_range(ModelConfig.preset("tiny", **{**SMALL, **changes})) == (1, 5)
    assert scan_range(ModelConfig.preset("flash")) == (4, 42) and scan_range(ModelConfig.preset("pro")) == (4, 60)
    tokens, segs = train_batch()
    weights = {k: jnp.float32(v) for k, v in WEIGHTS.items()}
    forward = nnx.jit(lambda m: losses.objective(m, tokens, segs, weights))
    ref_loss, ref_metrics, ref_loads = forward(small_model(**changes))
    loss, metrics, loads = forward(small_model(**changes, scan_layers=True))
    assert len(loads.layers) == len(ref_loads.layers) == 5 and loads.mtp is not None  # every layer's, the MTP's
    for got, want in zip((*loads.layers, loads.mtp), (*ref_loads.layers, ref_loads.mtp)):
        np.testing.assert_array_equal(got, want)
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # gradients through the scan and each remat policy, on the 3-layer model (its one pair scans, length 1), with
    # the attention in 3 query chunks (each rematerialised under remat) and the loss in 5 chunks
    assert scan_range(ModelConfig.preset("tiny", **SMALL)) == (1, 3)
    (ref_loss, ref_grads), _ = single_device
    for remat in ("block", "dots"):
        model = small_model(scan_layers=True, remat=remat, attn_chunk=8, loss_chunk=5)
        loss, grads = loss_and_grads(model, tokens, segs)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("name", ["flash_train", "flash_decode", "pro_train", "pro_decode"])
def test_partition_specs_match_golden_files(name):
    """Regenerate with `python -m train.plan --golden tests/golden/partition_specs` after an intended change."""
    preset, rules = name.split("_")
    got = sharding.flat_specs(abstract_model(preset), sharding.PRESETS[rules])
    want = json.loads((GOLDEN / f"{name}.json").read_text())
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if v != want[k]} == {}


def test_spec_examples_and_collisions():
    model = abstract_model("flash")
    specs = sharding.flat_specs(model, sharding.TRAIN_RULES)
    assert specs["layers.2.ffn.experts.w1"] == ["expert", "tensor", "fsdp"]
    fsdp = ["fsdp", "expert"]  # FSDP of all but the routed experts spans the expert axis too
    assert specs["layers.2.ffn.shared_experts.w1"] == ["tensor", fsdp]
    assert specs["layers.2.attn.wq_b"] == [["tensor", *fsdp], None]  # heads over tensor (TP), then FSDP
    assert specs["layers.2.attn.wo_a"] == ["tensor", fsdp]  # output groups over tensor
    assert specs["layers.2.attn.indexer.wq_b"] == [["tensor", *fsdp], None]  # indexer heads over tensor, FSDP
    assert specs["embed"] == ["tensor", fsdp]
    decode = sharding.flat_specs(model, sharding.DECODE_RULES)
    assert decode["embed"] == ["tensor", None] and decode["layers.2.attn.wq_b"] == ["tensor", None]  # no FSDP
    assert not any("fsdp" in str(v) for v in decode.values())
    assert {k for k, v in decode.items() if "expert" in str(v)} == {k for k in decode if ".experts." in k}
    # FSDP for the rest: every parameter of more than 64K elements has a dim on fsdp
    sizes = {".".join(map(str, p)): np.prod(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {k for k, n in sizes.items() if n > 2 ** 16 and "fsdp" not in str(specs[k])} == set()
    with pytest.raises(ValueError, match="one mesh axis"):
        sharding.logical_to_spec(("heads", "experts"), {"heads": "tensor", "experts": "tensor"})
    with pytest.raises(ValueError, match="one mesh axis"):  # a tuple rule collides too
        sharding.logical_to_spec(("batch", "embed"), sharding.TRAIN_RULES)


def test_mesh_from_config():
    assert sharding.mesh_shape({"fsdp": 2, "data": -1}, 8) == {"data": 4, "fsdp": 2, "expert": 1, "tensor": 1}
    mesh = sharding.make_mesh({"data": -1, "expert": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    for bad, match in [({"expert": 3}, "needs 3 devices"), ({"context": 2}, "unknown"),
                       ({"data": -1, "fsdp": -1}, "at most one -1"), ({"data": -1, "fsdp": 3}, "do not divide")]:
        with pytest.raises(ValueError, match=match):
            sharding.mesh_shape(bad, 8)
    # one process is one DCN granule: asking for two over DCN is refused by the hybrid builder
    with pytest.raises(ValueError):
        sharding.make_mesh({"data": 2, "fsdp": 4}, dcn={"data": 2})
    with pytest.raises(ConfigError, match="remat"):
        ModelConfig.preset("tiny", remat="everything")


def test_constrain_is_a_no_op_without_rules_and_shards_under_them():
    x = jnp.ones((8, 4, 2, 16))
    assert sharding.constrain(x, ("batch", "seq", None, "act_embed")) is x
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    with sharding.use_rules(mesh, sharding.TRAIN_RULES):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "seq", None, "act_embed")))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp", "expert"))), 4)
    assert y.addressable_shards[0].data.shape == (1, 4, 2, 16)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4, 2, 16)))


def test_optimizer_moments_follow_their_parameters():
    from train.muon import v4_optimizer

    mesh = sharding.make_mesh({"fsdp": 4, "expert": 2})
    model = sharding.shard_model(small_model(), mesh, sharding.TRAIN_RULES)
    params = nnx.state(model, nnx.Param)
    tx = v4_optimizer(params, model.cfg, 1e-3)
    shardings = sharding.follow_params(jax.eval_shape(tx.init, params), params)
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init, out_shardings=shardings)(params)
    by_shape = {}
    for p in jax.tree.leaves(params):
        by_shape.setdefault(p.shape, set()).add(p.sharding.spec)
    moments = [x for x in jax.tree.leaves(state) if x.ndim >= 1]
    assert len(moments) >= len(jax.tree.leaves(params))  # Muon momentum or AdamW mu, nu for every parameter
    for x in moments:
        assert x.sharding.spec in by_shape[x.shape]
    assert not all(x.sharding.is_fully_replicated for x in moments)


@nnx.jit
def dspark_round(model, cache, prompt, chunk):
    """Prefill, draft a block, verify a chunk and commit 2 of its tokens, draft again: both drafts' logits and
    confidences."""
    _, _, cache = model.step(cache, prompt)
    first = model.draft(cache, chunk[:, 0])
    _, pending = model.verify(cache, chunk)
    cache = model.commit(cache, pending, jnp.full((chunk.shape[0],), 2, jnp.int32))
    second = model.draft(cache, chunk[:, 2])
    return first[1], first[2], second[1], second[2]


def test_sharded_dspark_drafter_equals_single_device():
    """A GA model's drafter under the decode rules on (data 2, expert 2, tensor 2): draft logits and confidences
    after a prefill and after a verify / commit equal one device's."""
    changes = dict(compress_ratios=(0, 4, 128, 0, 0), n_mtp_layers=2, dspark_block_size=3,
                   dspark_noise_token_id=255, dspark_target_layer_ids=(1, 2), dspark_markov_rank=16)
    prompt, chunk = random_ids((B, 11), SMALL["vocab_size"], seed=3), random_ids((B, 4), SMALL["vocab_size"], seed=4)
    model = small_model(**changes)
    ref = dspark_round(model, model.init_cache(B, 32), prompt, chunk)
    mesh = sharding.make_mesh(dict(data=2, expert=2, tensor=2))
    model = sharding.shard_model(small_model(**changes), mesh, sharding.DECODE_RULES)
    assert model.dspark.stages[1].ffn.experts.w1[...].sharding.spec == P("expert", "tensor", None)
    place = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, sharding.DECODE_RULES, a.ndim))  # noqa: E731
    with sharding.use_rules(mesh, sharding.DECODE_RULES):
        got = dspark_round(model, jax.tree.map(place, model.init_cache(B, 32)), place(prompt), place(chunk))
    for g, r in zip(got, ref):  # logits per slot, confidences per row
        assert np.max(rel_err(g, r)) < 1e-5
