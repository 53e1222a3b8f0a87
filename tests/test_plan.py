"""The planning command (v4jax.plan, issue 7) on the tiny config: its analytic per-device bytes are the shard
sizes of the partition specs, and the compiled train step holds exactly the donated state as arguments."""

from __future__ import annotations

import argparse
import importlib.util
import math

import pytest
from flax import nnx

from v4jax import plan, sharding
from v4jax.config import ModelConfig
from v4jax.model import Transformer


def test_plan_train_step_on_8_devices():
    shape = {"fsdp": 4, "expert": 2}
    args = argparse.Namespace(config="tiny", step="train", batch=None, seq=64, scan=True, remat="block",
                              set=[], param_dtype=None, topology=None)
    report = plan.plan(args, shape)
    got = report["bytes_per_device"]
    assert report["batch"] == 8 and report["devices"] == 8  # one sequence per batch shard (fsdp x expert)

    # independently: every parameter's shard under TRAIN_RULES on this mesh, summed by hand
    mesh = sharding.make_mesh(shape)
    model = nnx.eval_shape(lambda: Transformer(ModelConfig.preset("tiny", scan_layers=True), rngs=nnx.Rngs(0)))
    want = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = sharding.logical_to_spec(sharding.logical_axes(var), sharding.TRAIN_RULES)
        split = [math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax or ())) for ax in spec]
        want += math.prod(-(-dim // n) for dim, n in zip(var.shape, split)) * var.dtype.itemsize
    assert got["params"] == want
    # the step donates parameters, optimizer state and the other variables: they are all its arguments
    # (besides the token batch and four loss weights) and all come back aliased
    state = got["params"] + got["optimizer_state"] + got["other_variables"]
    tokens = 8 * 65 * 4 // mesh.size * 2 + 4 * 4  # tokens and segment ids [1, 8, 65] int32, split over 8 devices
    assert state <= got["arguments (compiler)"] <= state + tokens + 1024
    assert got["outputs aliased to donated arguments (compiler)"] >= state - 1024
    assert got["activations = temporaries (compiler)"] > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu installed: no error to check")
def test_topology_without_libtpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="Install libtpu"):
        plan.tpu_devices("v5p:2x2x2", 8)
