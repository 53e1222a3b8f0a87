"""v4jax-convert on the released-layout fixture: safetensors -> Orbax (sharded, interrupted and resumed) ->
safetensors byte for byte, restore onto two meshes, --verify, HF loading our BF16 export, and bad input."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURE
from v4jax import hub
from v4jax.checkpoint import CheckpointMismatch, OrbaxReader, load_hub_state, restore_orbax
from v4jax.config import ModelConfig
from v4jax.model import abstract_model, model_variables
from v4jax.convert import convert, export, main
from v4jax.formats import Mxfp4Weight
from v4jax.quant import dense
from v4jax.sharding import DECODE_RULES, TRAIN_RULES, make_mesh

MESH = {"fsdp": 4, "expert": 2}


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted (weights kept quantized, sharded for fsdp=4 x expert=2) in ~1 MB units, after an
    interruption at the third unit and a resume: (Orbax dir, units committed by each run, the refusals seen)."""
    dst = str(tmp_path_factory.mktemp("convert") / "ckpt")
    first, second, seen = [], [], {}

    def stop_after_two(item, nbytes):
        first.append(item)
        if len(first) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        convert(FIXTURE, dst, "quantized", MESH, "train", unit_bytes=1 << 20, progress=stop_after_two)
    with pytest.raises(Exception) as e:  # the interrupted conversion is not readable as a checkpoint
        OrbaxReader(dst)
    seen["unfinished"] = str(e.value)
    with pytest.raises(ValueError) as e:  # resuming with other options is refused
        convert(FIXTURE, dst, "fp8", MESH, "train", unit_bytes=1 << 20, progress=lambda *a: None)
    seen["other_options"] = str(e.value)
    convert(FIXTURE, dst, "quantized", MESH, "train", unit_bytes=1 << 20, progress=lambda item, n: second.append(item))
    return dst, first, second, seen


def test_interrupted_conversion_resumes_where_it_stopped(converted):
    dst, first, second, seen = converted
    assert "not a finished Orbax checkpoint" in seen["unfinished"] and ".partial_save" in seen["unfinished"]
    assert "used other options" in seen["other_options"]
    assert len(first) == 2 and len(second) >= 3 and not set(first) & set(second)  # nothing redone
    assert sorted(os.listdir(os.path.dirname(dst))) == ["ckpt"]  # no journal, partial or temp dirs left
    assert OrbaxReader(dst).custom["weights"] == "quantized"


def test_safetensors_orbax_safetensors_is_byte_identical(converted, tmp_path):
    export(converted[0], tmp_path / "back", "release", max_shard_bytes=4 << 20, progress=lambda *a: None)
    assert hub.checkpoint_digest(tmp_path / "back") == hub.checkpoint_digest(FIXTURE)  # every name, dtype, byte
    ckpt = hub.HubCheckpoint(tmp_path / "back")
    files = sorted(ckpt.files)
    assert len(files) == 3 and {ckpt.shard_of[n] for n in ckpt.keys() if n.startswith("mtp.")} == {files[-1]}
    assert all(ckpt.shard_of[n] != files[-1] for n in ckpt.keys() if not n.startswith("mtp."))
    index = json.loads((tmp_path / "back" / hub.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(ckpt[n].nbytes for n in ckpt.keys())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"


def test_restore_onto_two_meshes_gives_identical_values(converted):
    a = restore_orbax(converted[0], make_mesh(MESH), TRAIN_RULES)
    b = restore_orbax(converted[0], make_mesh({"tensor": 4, "expert": 2}), DECODE_RULES)
    w1a, w1b = a.layers[1].ffn.experts.w1.get_value(), b.layers[1].ffn.experts.w1.get_value()
    assert isinstance(w1a, Mxfp4Weight)
    assert w1a.packed.sharding.spec != w1b.packed.sharding.spec  # really resharded
    assert len(w1b.packed.sharding.device_set) == 8
    source = abstract_model(ModelConfig.from_hf_config(FIXTURE / "config.json"))
    load_hub_state(source, FIXTURE)
    want = {p: np.asarray(v[...]) for p, v in model_variables(source).items()}
    va, vb = model_variables(a), model_variables(b)
    for path in want:
        for x, y in zip(jax.tree.leaves(va[path].get_value()), jax.tree.leaves(vb[path].get_value())):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
        np.testing.assert_array_equal(np.asarray(dense(va[path])), want[path], err_msg=path)


def test_verify_quantized_params_give_the_source_logits_exactly(converted, capsys):
    # `verify`: the source dequantized at load vs the converted FP8 / MXFP4 Params (dequantized in the matmuls)
    assert main(["verify", str(FIXTURE), converted[0], "--tokens", "16"]) == 0
    assert "max relative logits error 0.000e+00" in capsys.readouterr().out


def test_hf_transformers_loads_our_bf16_export(converted, tmp_path):
    """tests/oracle/make_hf_export_fixture.sh ran HF's own from_pretrained on this export (its conversion
    mapping renames and stacks the hub names) and stored its fp32 logits; the digest proves it is the same export."""
    ref = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "hf_bf16_export", "ref.npz"))
    export(converted[0], tmp_path / "bf16", "bfloat16", progress=lambda *a: None)
    assert hub.checkpoint_digest(tmp_path / "bf16") == str(ref["digest"])
    cfg = ModelConfig.from_hf_config(tmp_path / "bf16" / "config.json", compute_dtype="float32")
    assert cfg.dtype == "bf16"  # no quantization_config left
    model = abstract_model(cfg)
    load_hub_state(model, tmp_path / "bf16")
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jax.numpy.asarray(ref["input_ids"])), np.float64)
    want = ref["logits"].astype(np.float64)
    err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert err.max() < 1e-4, err.max()


def test_a_config_that_does_not_match_writes_nothing(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, n_routed_experts=8, moe_intermediate_size=64)))
    with pytest.raises(CheckpointMismatch) as e:
        convert(src, tmp_path / "out", progress=lambda *a: None)
    msg = str(e.value)
    assert "unknown tensors (not in this config's model): ['layers.0.ffn.experts.10.w1.weight'" in msg
    assert "layers.0.ffn.experts.0.w1.weight: shape (128, 128) but the config needs (64, 128)" in msg
    assert sorted(os.listdir(tmp_path)) == ["src"]
