"""Logical axis names on every parameter; rules -> PartitionSpecs; sharded == unsharded on one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import random_ids
from v4jax import sharding
from v4jax.config import ModelConfig
from v4jax.model import Transformer


def test_every_flash_parameter_has_a_spec():
    model = nnx.eval_shape(lambda: Transformer(ModelConfig.preset("flash"), rngs=nnx.Rngs(0)))
    specs = dict(nnx.to_flat_state(sharding.model_specs(model, sharding.TRAIN_RULES)))
    assert len(specs) > 1000
    get = lambda *p: specs[p].get_value() if hasattr(specs[p], "get_value") else specs[p]  # noqa: E731
    assert get("layers", 2, "ffn", "experts", "w1") == P("expert", "tensor", "fsdp")
    assert get("layers", 2, "attn", "wq_b") == P("tensor", None)
    assert get("embed") == P("tensor", "fsdp")


def test_collisions_are_rejected():
    with pytest.raises(ValueError, match="one mesh axis"):
        sharding.logical_to_spec(("heads", "experts"), {"heads": "tensor", "experts": "tensor"})


def test_sharded_model_equals_unsharded_on_one_device():
    cfg = ModelConfig.preset("tiny", compute_dtype="float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ids = random_ids((1, 40), cfg.vocab_size)
    fwd = nnx.jit(lambda m, i: m(i))
    ref = np.asarray(fwd(model, ids))
    sharding.shard_model(model, sharding.make_mesh(), sharding.DECODE_RULES)
    assert isinstance(model.layers[0].ffn.experts.w1[...].sharding, jax.sharding.NamedSharding)
    np.testing.assert_array_equal(np.asarray(fwd(model, ids)), ref)
