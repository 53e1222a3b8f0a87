"""LoRA adapters (v4jax.lora) on the tiny Flash-like checkpoint loaded as released (FP8 / MXFP4 kept quantized):
zero-b identity, adapter gradients against the full model's weight gradient projected onto the adapter directions
and against finite differences, AdamW on the adapters alone (the base bit-identical), sharding, merging; adapters
saved alone (PEFT layout) and loaded back, with named mismatches; dropout on the adapter input."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from conftest import FIXTURE, assert_grads_close, fixture_model, fixture_refs, forward_hidden, head_logits, rel_err
from v4jax import hub, lora
from v4jax.checkpoint import abstract_model, load_hub_state
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.moe import MoE, expert_ffn, grouped_ffn
from v4jax.quant import Adapted, linear
from v4jax.formats import Fp8Weight, Mxfp4Weight, QuantizedWeight
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


def test_adapter_grads_are_the_weight_grads_projected_onto_the_adapters():
    """Adapters on every target at once: dL/da = s b^T G and dL/db = s G a^T, G = dL/dW' of the merged model
    (W' = W + s b a as a plain dense Param), fp32, 1e-4; then central differences at the largest-gradient
    coordinate of an a and of a b among the routed experts' adapters, and among the others'."""
    model = quantized_model()
    ids = batch(model.cfg)
    lora.attach(model, lora.LoraConfig(rank=4, alpha=8.0, targets=ALL), nnx.Rngs(1))
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

    # finite differences: the largest-gradient coordinate of the largest a and b gradients, routed experts and others
    graphdef, adapters, rest = nnx.split(model, lora.LoraParam, ...)
    loss_at = jax.jit(lambda ad: loss_fn(nnx.merge(graphdef, ad, rest), ids))
    eps = 3e-3  # a step of 1e-2 already flips a top-k choice (routing / indexer) downstream
    for leaf, routed in itertools.product(("a", "b"), (True, False)):
        path = max((k for k in got if k.endswith("." + leaf) and (".experts." in k) == routed),
                   key=lambda k: np.abs(got[k]).max())
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
    moe.cfg = cfg.replace(moe_impl="expert_parallel")  # the same weights on the expert-parallel path
    graphdef_ep = nnx.graphdef(moe)

    @functools.partial(jax.jit, static_argnums=0)
    def run(graphdef, adapters):
        def loss(ad):
            out = nnx.merge(graphdef, ad, rest)(y, tokens, sow_stats=False)
            return jnp.sum(out * ct), out
        return jax.value_and_grad(loss, has_aux=True)(adapters)

    (_, want_out), want = run(graphdef, adapters)
    with jax.set_mesh(make_mesh({"expert": 8})):
        assert "shard_map" in str(jax.make_jaxpr(run, static_argnums=0)(graphdef_ep, adapters))
        (_, out), got = run(graphdef_ep, adapters)
    scale = np.abs(np.asarray(want_out)).max()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=1e-5 * scale)
    assert_grads_close(flat(got), flat(want), tol=1e-5)
    assert np.abs(flat(want)["experts.w1_lora.a"]).max() > 0


def test_saved_adapters_load_back_bit_identical_under_peft_names(tmp_path):
    """save_adapters writes PEFT's layout (HF module names, lora_A [rank, in], lora_B [out, rank], fp32);
    load_adapters onto a fresh base gives the same factors bit for bit, hence the same logits."""
    assert [lora.peft_module(f"layers.1.{p}") for p in ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a",
                                                          "attn.wo_b", "ffn.shared_experts.w1",
                                                          "ffn.shared_experts.w2", "ffn.shared_experts.w3")] == [
        f"model.layers.1.{m}" for m in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj",
                                        "self_attn.o_a_proj", "self_attn.o_b_proj", "mlp.shared_experts.gate_proj",
                                        "mlp.shared_experts.down_proj", "mlp.shared_experts.up_proj")]
    model = quantized_model()
    ids = batch(model.cfg)[:, :-1]
    lora.attach(model, lora.LoraConfig(rank=4, alpha=6.0, targets=ALL, dropout=0.1), nnx.Rngs(1))
    randomize_b(model)
    lora.save_adapters(model, tmp_path / "ad", base="the-base")
    config = json.loads((tmp_path / "ad" / lora.ADAPTER_CONFIG).read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "base_model_name_or_path")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 6.0, "lora_dropout": 0.1, "base_model_name_or_path": "the-base"}
    stored = hub.SafetensorsFile(tmp_path / "ad" / lora.ADAPTER_WEIGHTS)
    assert len(stored.keys()) == 2 * 7 * (5 + 3 + 3 * 16)  # 6 layers + MTP: 5 projections, shared, 16 experts
    assert sorted(config["target_modules"]) == sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0]
                                                       for k in stored.keys()})
    layer = model.layers[1]
    for name, want in (("model.layers.1.self_attn.q_a_proj.lora_A", layer.attn.wq_a_lora.a),
                       ("model.layers.1.self_attn.o_b_proj.lora_B", layer.attn.wo_b_lora.b),
                       ("model.layers.1.mlp.experts.3.down_proj.lora_B", layer.ffn.experts.w2_lora.b[3]),
                       ("mtp.0.attn.wkv.lora_A", model.mtp.attn.wkv_lora.a)):
        got = stored[f"base_model.model.{name}.weight"]
        assert got.dtype == np.float32 and got.tobytes() == np.asarray(want).tobytes(), name

    loaded = lora.load_adapters(quantized_model(), tmp_path / "ad")
    want, got = leaves(nnx.state(model, lora.LoraParam)), leaves(nnx.state(loaded, lora.LoraParam))
    assert got.keys() == want.keys() and all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert {(ad.scale, ad.dropout) for *_, ad in lora.adapters(loaded)} == {(1.5, 0.1)}
    np.testing.assert_array_equal(np.asarray(logits_of(loaded, ids)), np.asarray(logits_of(model, ids)))


def test_adapters_that_do_not_fit_are_named_and_nothing_is_attached(tmp_path):
    model = quantized_model()
    lora.attach(model, lora.LoraConfig(rank=4), nnx.Rngs(1))
    ad = tmp_path / "ad"
    lora.save_adapters(model, ad)
    with pytest.raises(FileExistsError, match="already exists: remove it or choose another folder"):
        lora.save_adapters(model, ad)
    with pytest.raises(ValueError, match="already has LoRA adapters: load the adapters onto the base alone"):
        lora.load_adapters(model, ad)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json \\+ adapter_model.safetensors"):
        lora.load_adapters(quantized_model(), tmp_path)

    config, weights = json.loads((ad / lora.ADAPTER_CONFIG).read_text()), ad / lora.ADAPTER_WEIGHTS
    stored = hub.SafetensorsFile(weights)
    tensors = {k: np.array(stored[k]) for k in stored.keys()}
    cases = [
        ({**config, "r": 8}, tensors, r"q_a_proj.lora_A.weight is \[4, 128\], this model needs \[8, 128\]"),
        ({**config, "use_dora": True}, tensors, r"\{'use_dora': True\}: only plain LoRA adapters load here"),
        (config, {**{k: v for k, v in tensors.items() if "layers.2.self_attn.kv_proj" not in k},
                  "base_model.model.model.layers.9.self_attn.kv_proj.lora_A.weight": np.zeros((4, 128), np.float32)},
         r"missing \['base_model.model.model.layers.2.self_attn.kv_proj.lora_A.weight', .*\] \(2 in all\); not in "
         r"this model \['base_model.model.model.layers.9.self_attn.kv_proj.lora_A.weight'\] \(1 in all\)\. Load them "
         r"onto the base they were trained on"),
    ]
    for i, (cfg, ts, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        (bad / lora.ADAPTER_CONFIG).write_text(json.dumps(cfg))
        hub.write_safetensors(bad / lora.ADAPTER_WEIGHTS, ts)
        base = quantized_model()
        with pytest.raises(lora.AdapterMismatch, match=message):
            lora.load_adapters(base, bad)
        assert not lora.adapters(base)


def test_dropout_masks_the_adapter_input_only():
    """linear: base product of x plus scale ((x * keep / (1 - rate)) a^T) b^T with keep drawn from the key for
    x's shape; no key: the undropped product. grouped_ffn (rows of one expert) equals expert_ffn on that expert's
    slices with the same keys: the grouped path masks its inputs the same way."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-1]), jnp.float32)  # noqa: E731
    x, w, a, b = normal(3, 5, 64), normal(32, 64), normal(4, 64), normal(32, 4)
    key = jax.random.key(7)
    keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))
    xd = np.where(keep, np.asarray(x) / 0.75, 0.0)
    want = np.asarray(x) @ np.asarray(w).T + 2.0 * (xd @ np.asarray(a).T) @ np.asarray(b).T
    np.testing.assert_allclose(linear(x, Adapted(w, a, b, 2.0, key, 0.25)), want, rtol=1e-5, atol=1e-5)
    plain = np.asarray(x) @ np.asarray(w).T + 2.0 * (np.asarray(x) @ np.asarray(a).T) @ np.asarray(b).T
    np.testing.assert_allclose(linear(x, Adapted(w, a, b, 2.0, None, 0.25)), plain, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, plain, atol=1e-2)

    e, d, f, m = 3, 64, 32, 16
    ws = [(normal(e, f, d), normal(e, 4, d), normal(e, f, 4)), (normal(e, d, f), normal(e, 4, f), normal(e, d, 4)),
          (normal(e, f, d), normal(e, 4, d), normal(e, f, 4))]
    adapted = [Adapted(w, a, b, 2.0, jax.random.fold_in(key, i), 0.25) for i, (w, a, b) in enumerate(ws)]
    one = [Adapted(t.base[0], t.a[0], t.b[0], 2.0, t.key, 0.25) for t in adapted]
    xs, route_w = normal(m, d), jnp.ones((m,), jnp.float32)
    grouped = grouped_ffn(xs, jnp.asarray([m, 0, 0]), route_w, *adapted, limit=10.0, qat=False)
    np.testing.assert_allclose(grouped, expert_ffn(xs, *one, limit=10.0, qat=False, route_w=route_w),
                               rtol=1e-5, atol=1e-5)


def test_dropout_keys_draw_new_masks_and_rate_zero_sets_none():
    """set_dropout_keys: the same key gives the same logits bit for bit, another key other ones (the attention
    output projection's and the routed experts' adapters dropped); with rate 0 it sets no key, so the forward is
    the one without dropout."""
    model = quantized_model()
    ids = batch(model.cfg)[:, :-1]
    lora.attach(model, lora.LoraConfig(rank=4, targets=("wo_a", "experts"), dropout=0.5), nnx.Rngs(1))
    randomize_b(model, std=0.2)
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, key):
        return lora.set_dropout_keys(nnx.merge(graphdef, state), key)(ids)

    key = jax.random.key(3)
    one, same, other = (np.asarray(logits(state, k)) for k in (key, key, jax.random.fold_in(key, 1)))
    np.testing.assert_array_equal(one, same)
    assert np.abs(one - other).max() > 1e-2 * np.abs(one).max()
    assert not jax.tree.leaves(nnx.state(model, lora.LoraKey))  # keys live in the train step's copy only

    undropped = quantized_model()
    lora.attach(undropped, lora.LoraConfig(rank=4, targets=("wo_a", "experts")), nnx.Rngs(1))
    lora.set_dropout_keys(undropped, key)
    assert not jax.tree.leaves(nnx.state(undropped, lora.LoraKey))


def test_peft_adapters_made_on_hf_transformers_give_its_merged_logits():
    """tests/fixtures/peft (made by tests/oracle/make_peft_fixture.py): PEFT's own adapter folder for HF
    transformers' V4 over the fixture checkpoint (rank 4, alpha 8, random factors on every attention layer's
    q_a / q_b / kv / o_a (grouped) / o_b projections and the shared experts) and HF's logits with them merged.
    load_adapters reads the folder as PEFT wrote it; the MTP block, which HF lacks, gets zero adapters; the adapted
    forward gives HF's logits to the precision the bare fixture matches HF at, the adapters moving them by far more."""
    folder = Path(__file__).parent / "fixtures" / "peft"
    ref = np.load(folder / "ref.npz")
    assert json.loads((folder / "meta.json").read_text())["seed"] == int(fixture_refs()["seed"])
    model = lora.load_adapters(fixture_model(), folder)
    assert lora.adapters(model.mtp) and all(not np.any(np.asarray(ad.b[...])) for *_, ad in lora.adapters(model.mtp))
    ids, pos = jnp.asarray(ref["input_ids"]), ref["positions"]
    got = np.asarray(head_logits(model, forward_hidden(model, ids)))[:, pos]
    assert rel_err(got, ref["peft_logits"]).max() < 1e-4
    assert rel_err(ref["base_logits"], ref["peft_logits"]).min() > 0.05
