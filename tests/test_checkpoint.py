"""The hub <-> v4jax name map and the loader's errors for weights that do not fit the config."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURE
from v4jax.checkpoint import CheckpointMismatch, export_hub_state, hub_names, hub_to_path, load_hub_state, path_to_hub
from v4jax.config import ModelConfig
from v4jax.hub import load_hub_checkpoint
from v4jax.model import Transformer


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
