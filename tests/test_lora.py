"""LoRA adapters (v4jax.lora) on the tiny Flash-like checkpoint loaded as released (FP8 / MXFP4 kept quantized):
zero-b identity, adapter gradients against the full model's weight gradient projected onto the adapter directions
and against finite differences, AdamW on the adapters alone (the base bit-identical), sharding, merging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from conftest import FIXTURE, assert_grads_close
from v4jax import lora
from v4jax.checkpoint import abstract_model, load_hub_state
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.moe import MoE
from v4jax.quant import Fp8Weight, Mxfp4Weight, QuantizedWeight
from v4jax.sharding import TRAIN_RULES, make_mesh, shard_model

ALL = lora.ATTENTION_TARGETS + lora.EXPERT_TARGETS


def quantized_model(**overrides) -> Transformer:
    cfg = ModelConfig.from_hf_config(FIXTURE / "config.json", **{"compute_dtype": "float32", **overrides})
    model = abstract_model(cfg)
    load_hub_state(model, FIXTURE, weights="quantized")
    return model


def batch(cfg, seed=0, length=33):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, length)))


def loss_fn(model, ids):
    logits = model(ids[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))


def randomize_b(model, seed=1, std=0.02):
    """Nonzero b everywhere: the gradient checks then test every term of W + scale b a."""
    key = jax.random.key(seed)
    for i, (_, _, ad) in enumerate(lora.adapters(model)):
        ad.b.set_value(std * jax.random.normal(jax.random.fold_in(key, i), ad.b.shape, jnp.float32))


def flat(state) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def leaves(state) -> dict:
    """Every array of a state as numpy, a quantized weight's codes and scales separately."""
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


@nnx.jit
def logits_of(model, ids):
    return model(ids)


@nnx.jit
def adapter_grads(model, ids):
    graphdef, adapters, rest = nnx.split(model, lora.LoraParam, ...)
    return jax.value_and_grad(lambda ad: loss_fn(nnx.merge(graphdef, ad, rest), ids))(adapters)


def _dense_param(path, var):
    return isinstance(var, nnx.Param) and not isinstance(var.get_value(), QuantizedWeight)


@nnx.jit
def dense_weight_grads(model, ids):
    graphdef, params, rest = nnx.split(model, _dense_param, ...)
    return jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), ids))(params)


def test_zero_b_gives_the_base_logits_exactly_and_the_base_stays_quantized():
    model = quantized_model()
    ids = batch(model.cfg)[:, :-1]
    base = np.asarray(logits_of(model, ids))
    lora.attach(model, lora.LoraConfig(rank=4, targets=ALL), nnx.Rngs(1))
    assert len(lora.adapters(model)) == 7 * 5 + 7 * 6  # 6 layers + MTP: 5 projections, shared + routed w1 w2 w3
    layer = model.layers[1]
    assert isinstance(layer.attn.wq_a.get_value(), Fp8Weight)
    assert isinstance(layer.ffn.experts.w1.get_value(), Mxfp4Weight)
    assert layer.ffn.experts.w1_lora.a.shape == (16, 4, 128)  # one (a, b) per expert
    np.testing.assert_array_equal(np.asarray(logits_of(model, ids)), base)


@pytest.mark.parametrize("targets", [lora.ATTENTION_TARGETS + ("shared_experts",), ("experts",)])
def test_adapter_grads_are_the_weight_grads_projected_onto_the_adapters(targets):
    """dL/da = s b^T G and dL/db = s G a^T, G = dL/dW' of the merged model (W' = W + s b a as a plain dense
    Param), fp32, 1e-4; then central differences at the largest-gradient coordinates of one a and one b."""
    model = quantized_model()
    ids = batch(model.cfg)
    lora.attach(model, lora.LoraConfig(rank=4, alpha=8.0, targets=targets), nnx.Rngs(1))
    randomize_b(model)
    loss, grads = adapter_grads(model, ids)
    got = flat(grads)
    merged = lora.merge(nnx.clone(model))
    merged_loss, wgrads = dense_weight_grads(merged, ids)
    np.testing.assert_allclose(float(merged_loss), float(loss), rtol=1e-5)
    weight_grads = flat(wgrads)
    ref = {}
    for owner_path, owner in nnx.iter_modules(model):
        for name, ad in list(vars(owner).items()):
            if not isinstance(ad, lora.Lora):
                continue
            prefix = ".".join(map(str, owner_path + (name,)))
            g = weight_grads[".".join(map(str, owner_path + (name[: -len("_lora")],)))].astype(np.float64)
            a, b = np.asarray(ad.a[...], np.float64), np.asarray(ad.b[...], np.float64)
            ref[prefix + ".a"] = ad.scale * np.einsum("...or,...oi->...ri", b, g)
            ref[prefix + ".b"] = ad.scale * np.einsum("...oi,...ri->...or", g, a)
    assert len(ref) == len(got) > 0
    assert max(np.abs(v).max() for v in ref.values()) > 0
    assert_grads_close(got, ref, tol=1e-4)

    # finite differences: the largest-gradient coordinate of the largest a and b gradients
    graphdef, adapters, rest = nnx.split(model, lora.LoraParam, ...)
    loss_at = jax.jit(lambda ad: loss_fn(nnx.merge(graphdef, ad, rest), ids))
    eps = 3e-3  # a step of 1e-2 already flips a top-k choice (routing / indexer) downstream
    for leaf in ("a", "b"):
        path = max((k for k in got if k.endswith("." + leaf)), key=lambda k: np.abs(got[k]).max())
        coord = np.unravel_index(np.argmax(np.abs(got[path])), got[path].shape)

        def shifted(d):
            state = [(p, v.replace(v.get_value().at[coord].add(d)) if ".".join(map(str, p)) == path else v)
                     for p, v in nnx.to_flat_state(adapters)]
            return float(loss_at(nnx.from_flat_state(state)))

        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        np.testing.assert_allclose(fd, got[path][coord], rtol=2e-2, err_msg=path)


def test_adamw_on_the_adapters_alone_lowers_the_loss_and_leaves_the_base_bit_identical():
    model = quantized_model()
    ids = batch(model.cfg)
    before = leaves(nnx.state(model))  # every base leaf: quantized codes and scales, norms, router, embeddings
    assert {str(x.dtype) for x in before.values()} >= {"float8_e4m3fn", "uint8", "float32"}
    lora.attach(model, lora.LoraConfig(rank=4), nnx.Rngs(1))
    graphdef, adapters, rest = nnx.split(model, lora.LoraParam, ...)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(adapters)
    # optimizer state only for the adapters: the step count, then mu and nu of each adapter leaf
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert n_adapter == lora.adapter_param_count(model.cfg, lora.LoraConfig(rank=4))
    assert len(jax.tree.leaves(opt_state)) == 1 + 2 * len(jax.tree.leaves(adapters))
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 1 + 2 * n_adapter

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(lambda ad: loss_fn(nnx.merge(graphdef, ad, rest), ids))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    start = flat(adapters)
    losses = []
    for _ in range(4):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    nnx.update(model, adapters)
    assert losses[-1] < losses[0] - 0.05, losses
    assert float(loss_fn(model, ids)) < losses[-1]  # the updated adapters are in the model
    end = flat(nnx.state(model, lora.LoraParam))
    assert all(not np.array_equal(end[k], start[k]) for k in start if k.startswith("layers."))  # mtp.*: no loss
    after = leaves(nnx.state(model, nnx.Not(lora.LoraParam)))
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and after[k].tobytes() == before[k].tobytes(), k


def test_adapters_shard_by_their_weights_logical_axes():
    """A quantized base loaded onto a mesh, adapters attached and placed by the training rules."""
    cfg = ModelConfig.from_hf_config(FIXTURE / "config.json")
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    model = abstract_model(cfg)
    load_hub_state(model, FIXTURE, weights="quantized", mesh=mesh, rules=TRAIN_RULES)
    lora.attach(model, lora.LoraConfig(rank=4, targets=ALL), nnx.Rngs(1))
    shard_model(model, mesh, TRAIN_RULES, lora.LoraParam)
    attn, ffn = model.layers[3].attn, model.layers[3].ffn
    fsdp = ("fsdp", "expert")
    want = [  # rank axis replicated; the rest as the weight's own axes
        (attn.wq_a_lora.a, PartitionSpec(None, fsdp)), (attn.wq_a_lora.b, PartitionSpec(None, None)),
        (attn.wq_b_lora.b, PartitionSpec(("tensor", *fsdp), None)), (attn.wo_a_lora.b, PartitionSpec("tensor", None)),
        (attn.wo_b_lora.b, PartitionSpec(fsdp, None)), (ffn.shared_experts.w2_lora.a, PartitionSpec(None, "tensor")),
        (ffn.experts.w1_lora.a, PartitionSpec("expert", None, "fsdp")),
        (ffn.experts.w1_lora.b, PartitionSpec("expert", "tensor", None)),
    ]
    for var, spec in want:
        assert var.get_value().sharding.spec == spec
    leaves = jax.tree.leaves(nnx.state(model, lora.LoraParam))
    assert all(x.sharding.mesh == mesh for x in leaves)


def test_merged_dense_model_matches_the_adapted_one():
    model = quantized_model(moe_impl="dense")  # the vmapped every-expert path
    ids = batch(model.cfg)[:, :-1]
    lora.attach(model, lora.LoraConfig(rank=4, targets=ALL), nnx.Rngs(1))
    randomize_b(model)
    adapted = np.asarray(logits_of(model, ids))
    merged = lora.merge(model)
    assert not lora.adapters(merged) and not jax.tree.leaves(nnx.state(merged, lora.LoraParam))
    assert isinstance(merged.layers[1].attn.wq_a.get_value(), jax.Array)
    assert isinstance(merged.layers[1].ffn.experts.w1.get_value(), jax.Array)
    out = np.asarray(logits_of(merged, ids))
    np.testing.assert_allclose(out, adapted, rtol=1e-5, atol=1e-5 * np.abs(adapted).max())


def test_adapter_param_count_matches_the_shapes():
    cfg = ModelConfig.preset("tiny")
    r, d, q, hd, h, g, o, f = 16, cfg.dim, cfg.q_lora_rank, cfg.head_dim, cfg.n_heads, cfg.o_groups, \
        cfg.o_lora_rank, cfg.moe_inter_dim
    attn = r * ((d + q) + (q + h * hd) + (d + hd) + (h * hd // g + g * o) + (g * o + d))
    shared = 3 * r * (d + f)
    layers = cfg.n_layers + cfg.n_mtp_layers
    assert lora.adapter_param_count(cfg, lora.LoraConfig()) == layers * (attn + shared)
    routed = lora.adapter_param_count(cfg, lora.LoraConfig(targets=("experts",)))
    assert routed == layers * cfg.n_routed_experts * shared
    with pytest.raises(ValueError, match="unknown"):
        lora.LoraConfig(targets=("wq",))


def test_routed_adapters_under_expert_parallelism_match_one_device():
    """Under an expert mesh the routed adapters go in merged (moe.MoE): output and adapter gradients equal the
    single-device grouped path's (fp32, 1e-5)."""
    cfg = ModelConfig.preset("tiny", compute_dtype="float32")
    moe = MoE(cfg, 4, rngs=nnx.Rngs(0))  # a score-routed layer
    lora.attach(moe, lora.LoraConfig(rank=4, targets=lora.EXPERT_TARGETS), nnx.Rngs(1))
    randomize_b(moe, std=0.2)
    y = jax.random.normal(jax.random.key(0), (2, 12, cfg.dim))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    ct = jax.random.normal(jax.random.key(1), y.shape)
    graphdef, adapters, rest = nnx.split(moe, lora.LoraParam, ...)

    @jax.jit
    def run(adapters):
        def loss(ad):
            out = nnx.merge(graphdef, ad, rest)(y, tokens, sow_stats=False)
            return jnp.sum(out * ct), out
        return jax.value_and_grad(loss, has_aux=True)(adapters)

    (_, want_out), want = run(adapters)
    with jax.set_mesh(make_mesh({"expert": 8})):
        assert "shard_map" in str(jax.make_jaxpr(run)(adapters))  # the expert-parallel path is the one traced
        (_, out), got = run(adapters)
    scale = np.abs(np.asarray(want_out)).max()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=1e-5 * scale)
    assert_grads_close(flat(got), flat(want), tol=1e-5)
    assert np.abs(flat(want)["experts.w1_lora.a"]).max() > 0
