"""The planning command (train.plan, issue 7; LoRA plans, issue 17) on a 2-layer tiny config over 8 devices: its
analytic per-device bytes are the shard sizes of the partition specs, the compiled train step holds exactly the
donated state as arguments, the LoRA plan's frozen base is what the trainer's quantized load puts on each device,
and the batch layout is the trainer's."""

from __future__ import annotations

import argparse
import importlib.util
import math

import jax
import pytest
from flax import nnx

from train import plan, pretrain
from train import tokenizer as tokenizer_lib
from train.data import tokenize_files
from v4jax import checkpoint, hub, lora, sharding
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.formats import Mxfp4Weight

SHAPE = {"fsdp": 4, "expert": 2}
SMALL = {"n_layers": 2, "n_hash_layers": 1, "compress_ratios": [4, 128, 0]}  # a hash layer, a CSA layer, MTP
TOKENS = 8 * 65 * 4 // 8  # one [1, 8, 65] int32 batch array's bytes per device (one row each)


def plan_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{
        "config": "tiny", "step": "train", "batch": None, "seq": 64, "scan": True, "remat": "block", "param_dtype":
        None, "topology": None, "lora": False, "lora_rank": None, "lora_targets": None,
        "set": [f"{k}={v}" for k, v in SMALL.items()], **kw})


@pytest.fixture(scope="module")
def full_plan():
    return plan.plan(plan_args(), SHAPE)


@pytest.fixture(scope="module")
def lora_plan():
    return plan.plan(plan_args(lora=True), SHAPE)


def device0_bytes(tree) -> int:
    """Bytes of the real arrays of `tree` held by the mesh's first device."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def test_plan_train_step_on_8_devices(full_plan):
    got = full_plan["bytes_per_device"]
    assert full_plan["batch"] == 8 and full_plan["devices"] == 8  # one sequence per batch shard (fsdp x expert)
    assert full_plan["moe_impl"] == "expert_parallel"  # the MoE path train.pretrain runs on 8 devices (for_mesh)

    # independently: every parameter's shard under TRAIN_RULES on this mesh, summed by hand
    mesh = sharding.make_mesh(SHAPE)
    model = nnx.eval_shape(lambda: Transformer(ModelConfig.preset("tiny", scan_layers=True, **SMALL),
                                               rngs=nnx.Rngs(0)))
    want = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = sharding.logical_to_spec(sharding.logical_axes(var), sharding.TRAIN_RULES)
        split = [math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax or ())) for ax in spec]
        want += math.prod(-(-dim // n) for dim, n in zip(var.shape, split)) * var.dtype.itemsize
    assert got["params"] == want
    # the step donates parameters, optimizer state and the other variables: they are all its arguments
    # (besides the token batch and four loss weights) and all come back aliased
    state = got["params"] + got["optimizer_state"] + got["other_variables"]
    assert state <= got["arguments (compiler)"] <= state + 2 * TOKENS + 4 * 4 + 1024
    assert got["outputs aliased to donated arguments (compiler)"] >= state - 1024
    assert got["activations = temporaries (compiler)"] > 0


def test_lora_plan_holds_the_quantized_base_as_loaded(tmp_path, lora_plan, full_plan):
    """The plan's abstract base against a real quantized load of a random release-layout checkpoint onto the same
    mesh (train.pretrain.build_model's path): leaf for leaf the same shapes, dtypes and shardings, hence bytes."""
    cfg = ModelConfig.preset("tiny", **SMALL)
    base_dir = tmp_path / "base"
    hub.write_random_checkpoint(base_dir, cfg.to_hf_config(), 0)
    mesh = sharding.make_mesh(SHAPE)
    run = pretrain.validate({"init": str(base_dir), "lora": {"enabled": True}, "model": {"config": str(base_dir)}})
    model = pretrain.build_model(run, pretrain.model_config(run), mesh, sharding.TRAIN_RULES)
    variables = checkpoint.model_variables(model)
    base = {p: v for p, v in variables.items() if not isinstance(v, lora.LoraParam)}
    assert any(isinstance(v.get_value(), Mxfp4Weight) for v in base.values())  # it is quantized
    for path, var in base.items():
        real, planned = var.get_value(), checkpoint.abstract_quantized_leaf(path, var, mesh, sharding.TRAIN_RULES)
        assert jax.tree.structure(real) == jax.tree.structure(planned), path
        for r, p in zip(jax.tree.leaves(real), jax.tree.leaves(planned)):
            assert (r.shape, r.dtype, r.sharding.spec) == (p.shape, p.dtype, p.sharding.spec), path

    got = lora_plan["bytes_per_device"]
    adapters = [v.get_value() for v in variables.values() if isinstance(v, lora.LoraParam)]
    assert lora_plan["lora"]["adapter_parameters"] == sum(a.size for a in adapters)
    assert got["other_variables"] == device0_bytes([v.get_value() for v in base.values()])
    assert got["params"] == device0_bytes(adapters)
    assert got["optimizer_state"] == 2 * got["params"] + 4  # AdamW: two fp32 moments and an int32 count
    state = got["params"] + got["optimizer_state"] + got["other_variables"]
    assert state <= got["arguments (compiler)"] <= state + 3 * TOKENS + 4 * 4 + 1024  # + loss mask
    # the frozen base in FP8 / MXFP4 and adapters instead of fp32 weights with Muon / AdamW state
    full = full_plan["bytes_per_device"]
    key = "peak = arguments + temporaries + unaliased outputs"
    assert got["arguments (compiler)"] < full["arguments (compiler)"] / 2 and got[key] < full[key]


def test_trainer_places_the_batch_as_planned(tmp_path, monkeypatch, lora_plan):
    """train.pretrain's batch sharding is the one the planner lowered with (rows over data, fsdp and expert)."""
    class Placed(Exception):
        pass

    def spy(*args):
        raise Placed(sharding.train_batch_sharding(*args))

    monkeypatch.setattr(pretrain, "train_batch_sharding", spy)
    tokenize_files(tokenizer_lib.stdlib_files()[:3], tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{path: {tmp_path / 'data'}}}\n"
                      f"mesh: {{fsdp: 4, expert: 2}}\nmodel: {{preset: tiny, overrides: {SMALL}}}\n"
                      "stages: [{until_step: 1, batch_size: 8, seq_len: 16}]\n")
    with pytest.raises(Placed) as placed:  # stops where the trainer lays out its batches
        pretrain.main([str(config)])
    assert placed.value.args[0].spec == jax.sharding.PartitionSpec(None, lora_plan["batch_axes"], None)
    assert lora_plan["batch_axes"] == ("data", "fsdp", "expert")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu installed: no error to check")
def test_topology_without_libtpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="Install libtpu"):
        plan.tpu_devices("v5p:2x2x2", 8)
