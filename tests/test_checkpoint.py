"""The hub <-> v4jax name map, loading dense or quantized (onto a mesh), and the loader's errors for weights
that do not fit the config."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from conftest import FIXTURE
from v4jax import hub
from v4jax.checkpoint import CheckpointMismatch, export_hub_state, hub_names, hub_to_path, load_hub_state, path_to_hub
from v4jax.config import ModelConfig
from v4jax.hub import load_hub_checkpoint
from v4jax.model import Transformer, abstract_model, model_variables
from v4jax.formats import Fp8Weight, Mxfp4Weight
from v4jax.quant import dense
from v4jax.sharding import TRAIN_RULES, make_mesh


def test_name_map_covers_the_released_fixture_exactly():
    raw = load_hub_checkpoint(FIXTURE)
    names = {n for n in raw if not n.endswith(".scale")}
    cfg = ModelConfig.from_hf_config(FIXTURE / "config.json")
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert set(hub_names(model)) == names
    for n in names:
        assert path_to_hub(*hub_to_path(n)) == n
    assert hub_to_path("layers.3.ffn.experts.11.w2.weight") == ("layers.3.ffn.experts.w2", 11)
    assert hub_to_path("mtp.0.hc_head_fn") == ("mtp.hc_head.fn", None)
    assert hub_to_path("layers.0.ffn.gate.weight") == ("layers.0.ffn.gate.weight", None)


def _tiny():
    return Transformer(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))


def test_export_then_load_roundtrip():
    a, b = _tiny(), Transformer(ModelConfig.preset("tiny"), rngs=nnx.Rngs(1))
    state = export_hub_state(a)
    load_hub_state(b, state)
    for k, v in export_hub_state(b).items():
        np.testing.assert_array_equal(v, state[k])


def test_missing_unknown_and_misshapen_tensors_are_listed_and_nothing_is_assigned():
    model = _tiny()
    state = export_hub_state(model)
    before = np.asarray(model.embed[...]).copy()
    bad = dict(state)
    del bad["layers.0.ffn.gate.tid2eid"]  # a hash layer without its table
    bad["layers.9.attn.wq_a.weight"] = np.zeros((1, 1), np.float32)
    bad["embed.weight"] = np.ones((10, 10), np.float32)
    bad["layers.1.attn.wq_b.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(CheckpointMismatch) as e:
        load_hub_state(model, bad)
    msg = str(e.value)
    assert "layers.0.ffn.gate.tid2eid" in msg and "layers.9.attn.wq_a.weight" in msg
    assert "embed.weight: shape (10, 10)" in msg and "layers.1.attn.wq_b.weight" in msg
    np.testing.assert_array_equal(np.asarray(model.embed[...]), before)


def test_quantized_params_decode_in_jax_to_the_dense_params():
    """FP8 / MXFP4 kept in the Params decode (quant.dense, inside the model's jitted matmuls) to exactly the
    values the numpy loader produces; test_convert's --verify test shows the logits are then identical too."""
    cfg = ModelConfig.from_hf_config(FIXTURE / "config.json")
    reference = abstract_model(cfg)
    load_hub_state(reference, FIXTURE)
    want = {p: np.asarray(v[...]) for p, v in model_variables(reference).items()}
    for weights, expert_type in (("quantized", Mxfp4Weight), ("fp8", Fp8Weight)):
        model = abstract_model(cfg)
        load_hub_state(model, FIXTURE, weights=weights)
        assert isinstance(model.layers[1].attn.wq_a.get_value(), Fp8Weight)
        assert isinstance(model.layers[1].ffn.experts.w1.get_value(), expert_type)
        assert model.layers[1].attn.q_norm.dtype == jnp.float32  # unquantized tensors take the param dtype
        for path, var in model_variables(model).items():
            np.testing.assert_array_equal(np.asarray(dense(var)), want[path], err_msg=path)


def test_loading_onto_a_mesh_shards_weights_scales_and_packed_experts():
    cfg = ModelConfig.from_hf_config(FIXTURE / "config.json")
    model = abstract_model(cfg)
    mesh = make_mesh({"fsdp": 4, "expert": 2})
    load_hub_state(model, hub.HubCheckpoint(FIXTURE), weights="quantized", mesh=mesh, rules=TRAIN_RULES)
    w1 = model.layers[3].ffn.experts.w1.get_value()  # ('experts', 'expert_ffw', 'expert_embed') -> expert, tensor, fsdp
    assert w1.packed.sharding.spec == PartitionSpec("expert", "tensor", "fsdp") and w1.packed.shape == (16, 128, 64)
    assert w1.scale.sharding.spec == PartitionSpec("expert", "tensor", "fsdp") and w1.scale.shape == (16, 128, 4)
    w2 = model.layers[3].ffn.experts.w2.get_value()  # ('experts', 'expert_embed', 'expert_ffw'): 2 scale columns
    assert w2.scale.shape == (16, 128, 4) and w2.scale.sharding.spec == PartitionSpec("expert", "fsdp", "tensor")
    wkv = model.layers[3].attn.wkv.get_value()  # ('kv', 'embed'): a 1x1 scale grid cannot split over fsdp x expert
    assert wkv.data.sharding.spec == PartitionSpec(None, ("fsdp", "expert"))
    assert wkv.scale.sharding.spec == PartitionSpec(None, None)
    raw = hub.load_hub_checkpoint(FIXTURE)
    np.testing.assert_array_equal(np.asarray(w1.packed[11]), raw["layers.3.ffn.experts.11.w1.weight"].view(np.uint8))
    wq_b = model.layers[3].attn.wq_b.get_value()  # ('q_rows', 'q_lora'): its values, sharded
    np.testing.assert_array_equal(np.asarray(wq_b.scale), raw["layers.3.attn.wq_b.scale"].view(np.uint8))


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("layers.2.attn.wkv.weight"), "layers.2.attn.wkv.scale: a scale without its .weight"),
    (lambda s: s.update({"layers.0.ffn.gate.tid2eid": s["layers.0.ffn.gate.tid2eid"].astype(np.float32)}),
     "layers.0.ffn.gate.tid2eid: dtype float32 but the model holds int32"),
    (lambda s: s.update({"layers.1.attn.wq_a.scale": s["layers.1.attn.wq_a.scale"][:, :0]}),
     "layers.1.attn.wq_a.scale: shape (1, 0) but its weight needs (1, 1)"),
    (lambda s: s.update({"layers.1.ffn.experts.2.w1.weight": s["layers.1.ffn.experts.2.w1.weight"][:, :32]}),
     "layers.1.ffn.experts.2.w1.scale: shape (128, 4) but its weight needs (128, 2)"),
    (lambda s: s.update({"norm.weight": s["norm.weight"].view(np.int16)}),
     "norm.weight: dtype int16 but the model holds float32"),
])
def test_loader_names_each_bad_tensor(damage, message):
    state = dict(hub.load_hub_checkpoint(FIXTURE))
    damage(state)
    model = abstract_model(ModelConfig.from_hf_config(FIXTURE / "config.json"))
    with pytest.raises(CheckpointMismatch) as e:
        load_hub_state(model, state, weights="quantized")
    assert message in str(e.value)
