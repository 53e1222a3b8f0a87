"""GA checkpoints (Flash-0731 layout, architecture §8.2-8.3) on the tiny fixture tests/ga_fixture.py writes: both
config files, the name map and release dtypes of every drafter tensor, dense and quantized loads giving identical
logits and drafts, to-orbax -> to-hub byte for byte, verify, train.export's writer, and the errors for mtp.*
tensors of the wrong layout."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from ga_fixture import SHARD_BYTES, write_ga_fixture
from v4jax import hub
from v4jax.checkpoint import CheckpointMismatch, hub_names, load_hub_state
from v4jax.config import ConfigError, ModelConfig
from v4jax.model import abstract_model, model_variables
from v4jax.convert import convert, export, export_model, main, verify_outputs
from v4jax.formats import Fp8Weight, Mxfp4Weight
from v4jax.quant import dense
from v4jax.sharding import TRAIN_RULES, make_mesh


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def ga(tmp_path_factory):
    path = tmp_path_factory.mktemp("ga") / "tiny-0731"
    write_ga_fixture(path)
    return path


def test_both_config_files_give_the_same_ga_config(ga):
    cfg = ModelConfig.from_hf_config(ga)
    assert cfg == ModelConfig.from_official_config(ga / "inference" / "config.json")
    assert cfg.dspark and cfg.n_mtp_layers == 3 and cfg.dspark_target_layer_ids == (3, 4, 5)
    assert cfg == ModelConfig.preset("tiny-dspark", attn_chunk=cfg.attn_chunk)  # attn_chunk: ours, not stored
    hf = json.loads((ga / "config.json").read_text())  # as released: the stage count is not num_nextn_predict_layers
    assert hf["num_nextn_predict_layers"] == 1 and len(hf["compress_ratios"]) == 6 + 3 and "n_mtp_layers" not in hf
    assert json.loads((ga / "inference" / "config.json").read_text())["n_mtp_layers"] == 3


def test_stage_count_from_the_index_when_compress_ratios_is_absent(ga, tmp_path):
    hf = json.loads((ga / "config.json").read_text())
    ratios = hf.pop("compress_ratios")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shutil.copy(ga / hub.INDEX_FILE, tmp_path)
    assert ModelConfig.from_hf_config(tmp_path, compress_ratios=ratios).n_mtp_layers == 3
    index = json.loads((ga / hub.INDEX_FILE).read_text())  # an index whose drafter has two stages
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if not n.startswith("mtp.2.")}
    (tmp_path / hub.INDEX_FILE).write_text(json.dumps(index))
    assert ModelConfig.from_hf_config(tmp_path / "config.json", compress_ratios=ratios[:-1]).n_mtp_layers == 2
    with pytest.raises(ConfigError, match="Give compress_ratios"):  # neither ratios nor an index: no guess
        ModelConfig.from_hf_config(hf)


def test_every_drafter_tensor_is_mapped_and_stored_as_released(ga):
    ckpt = hub.HubCheckpoint(ga)
    names = {n for n in ckpt.keys() if not n.endswith(".scale")}
    assert set(hub_names(abstract_model(ModelConfig.from_hf_config(ga)))) == names
    for n in names:
        assert hub.path_to_hub(*hub.hub_to_path(n, dspark=True)) == n
    assert hub.hub_to_path("mtp.0.main_proj.weight", dspark=True) == ("dspark.stages.0.main_proj", None)
    assert hub.hub_to_path("mtp.1.ffn.experts.5.w2.weight", dspark=True) == ("dspark.stages.1.ffn.experts.w2", 5)
    assert hub.hub_to_path("mtp.2.hc_head_fn", dspark=True) == ("dspark.stages.2.hc_head.fn", None)
    assert hub.hub_to_path("mtp.2.markov_head.markov_w1.weight", dspark=True) == (
        "dspark.stages.2.markov_head.markov_w1", None)
    assert hub.hub_to_path("mtp.0.norm.weight") == ("mtp.norm", None)  # the preview layout is unchanged
    for name, dspark in (("mtp.1.attn.wq_a.weight", False), ("mtp.0.main_proj.weight", False),
                         ("mtp.0.e_proj.weight", True)):
        with pytest.raises(KeyError, match="GA" if dspark else "preview"):
            hub.hub_to_path(name, dspark=dspark)
    # the stage-specific tensors in their release dtypes (architecture §8.3), tiny shapes
    E4M3, UE8M0, BF16, F32 = hub.E4M3, hub.UE8M0, hub.BF16, np.dtype(np.float32)
    assert {n: ckpt.info(n) for n in ckpt.keys() if n.startswith("mtp.") and n.split(".", 2)[2] in (
        "main_proj.weight", "main_proj.scale", "main_norm.weight", "norm.weight", "hc_head_fn", "hc_head_base",
        "hc_head_scale", "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
        "confidence_head.proj.weight")} == {
        "mtp.0.main_proj.weight": (E4M3, (128, 384)), "mtp.0.main_proj.scale": (UE8M0, (1, 3)),
        "mtp.0.main_norm.weight": (BF16, (128,)), "mtp.2.norm.weight": (BF16, (128,)),
        "mtp.2.hc_head_fn": (F32, (4, 512)), "mtp.2.hc_head_base": (F32, (4,)), "mtp.2.hc_head_scale": (F32, (1,)),
        "mtp.2.markov_head.markov_w1.weight": (BF16, (1024, 32)),
        "mtp.2.markov_head.markov_w2.weight": (BF16, (1024, 32)),
        "mtp.2.confidence_head.proj.weight": (BF16, (1, 160))}
    mtp = [n for n in names if n.startswith("mtp.")]  # stages: window-only, score routed, experts in MXFP4
    assert not [n for n in mtp if ".compressor." in n or ".indexer." in n or "tid2eid" in n]
    assert all(f"mtp.{s}.ffn.gate.bias" in names for s in range(3))
    assert ckpt.info("mtp.1.ffn.experts.15.w3.weight") == (np.dtype(np.int8), (128, 64))
    assert ckpt.info("mtp.1.attn.wo_a.scale") == (UE8M0, (1, 2))
    shards = sorted(ckpt.files)  # the drafter alone in the last shard
    assert len(shards) > 2 and {ckpt.shard_of[n] for n in ckpt.keys() if n.startswith("mtp.")} == {shards[-1]}
    assert all(ckpt.shard_of[n] != shards[-1] for n in ckpt.keys() if not n.startswith("mtp."))
    # HF transformers builds no drafter: hub_to_hf drops mtp.* and maps the rest as for the preview
    state = hub.dequantize_hub_state(hub.load_hub_checkpoint(ga))
    main_only = hub.hub_to_hf({n: a for n, a in state.items() if not n.startswith("mtp.")}, 6)
    assert hub.hub_to_hf(state, 6).keys() == main_only.keys()


def test_random_drafter_heads_have_scales_that_matter(ga):
    """The Markov correction markov_w2 @ markov_w1[token] is O(1) over the vocab, as the head's logits are, and
    the confidence projection is N(0, 1 / (dim + rank))."""
    state = hub.dequantize_hub_state(hub.load_hub_checkpoint(ga))
    w1, w2 = state["mtp.2.markov_head.markov_w1.weight"], state["mtp.2.markov_head.markov_w2.weight"]
    correction = w1[[0, 7, 500]] @ w2.T  # [3, vocab]
    assert 0.7 < correction.std() < 1.4
    assert 0.9 * 160**-0.5 < state["mtp.2.confidence_head.proj.weight"].std() < 1.1 * 160**-0.5


def _ids(vocab, n=16, seed=0):  # verify's token ids
    return jax.numpy.asarray(np.random.default_rng(seed).integers(0, vocab, (1, n)))


def test_dense_and_quantized_loads_give_identical_logits_and_drafts(ga):
    cfg = ModelConfig.from_hf_config(ga, compute_dtype="float32")
    dense_model, quantized = abstract_model(cfg), abstract_model(cfg)
    load_hub_state(dense_model, ga)
    # placed as restore_orbax places them, so that verify (next test) reuses this compile
    one_device = make_mesh({"data": 1}, jax.devices()[:1])
    load_hub_state(quantized, ga, weights="quantized", mesh=one_device, rules=TRAIN_RULES)
    assert isinstance(quantized.dspark.stages[0].main_proj.get_value(), Fp8Weight)
    assert isinstance(quantized.dspark.stages[1].ffn.experts.w1.get_value(), Mxfp4Weight)
    want = {p: np.asarray(v[...]) for p, v in model_variables(dense_model).items() if p.startswith("dspark.")}
    for path, var in model_variables(quantized).items():
        if path.startswith("dspark."):
            np.testing.assert_array_equal(np.asarray(dense(var)), want[path], err_msg=path)
    # step-prefilled logits, then one draft block: Markov-corrected logits [1, B, vocab], confidences [1, B]
    got, ref = verify_outputs(quantized, _ids(cfg.vocab_size)), verify_outputs(dense_model, _ids(cfg.vocab_size))
    assert [a.shape for a in ref] == [(1, 16, 1024), (1, 4, 1024), (1, 4)]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    logits, drafts, confidence = (np.asarray(a) for a in ref)
    assert np.isfinite(drafts).all() and np.isfinite(confidence).all() and np.ptp(confidence) > 0.1
    assert len(set(np.argmax(drafts[0], axis=-1).tolist())) > 1  # the slots propose different tokens


@pytest.fixture(scope="module")
def converted(ga, tmp_path_factory):
    """The fixture converted to Orbax, weights kept quantized, sharded fsdp=4 x expert=2, in ~4 MB units."""
    dst = tmp_path_factory.mktemp("ga-orbax") / "ckpt"
    convert(ga, dst, "quantized", {"fsdp": 4, "expert": 2}, "train", unit_bytes=4 << 20, progress=_quiet)
    return dst


def test_orbax_and_back_is_byte_identical_and_verify_passes(ga, converted, tmp_path, capsys):
    export(converted, tmp_path / "back", "release", max_shard_bytes=SHARD_BYTES, progress=_quiet)
    want, got = hub.HubCheckpoint(ga), hub.HubCheckpoint(tmp_path / "back")
    assert sorted(got.keys()) == sorted(want.keys())
    for name in want.keys():
        assert got.info(name) == want.info(name), name
        assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes(), name
    assert {got.shard_of[n] for n in got.keys() if n.startswith("mtp.")} == {sorted(got.files)[-1]}
    assert ModelConfig.from_hf_config(tmp_path / "back") == ModelConfig.from_hf_config(ga)
    assert main(["verify", str(ga), str(converted), "--tokens", "16"]) == 0
    assert "max relative logits error 0.000e+00" in capsys.readouterr().out


def test_verify_sees_a_difference_in_the_drafter_alone(ga, converted, tmp_path):
    """A source whose confidence head differs from the conversion's (nothing else reads it) fails verify."""
    src = tmp_path / "src"
    shutil.copytree(ga, src)
    ckpt = hub.HubCheckpoint(src)
    shard = ckpt.shard_of["mtp.2.confidence_head.proj.weight"]
    tensors = {n: np.array(ckpt.files[shard][n]) for n in ckpt.files[shard].keys()}
    tensors["mtp.2.confidence_head.proj.weight"] *= np.asarray(1.5, hub.BF16)
    del ckpt
    hub.write_safetensors(src / shard, tensors)
    assert main(["verify", str(src), str(converted), "--tokens", "16"]) == 1


def test_train_export_writes_the_drafter_as_released(ga, tmp_path):
    """train.export's writer (export_model) on a model holding the release's quantized values: the same bytes."""
    model = abstract_model(ModelConfig.from_hf_config(ga))
    load_hub_state(model, ga, weights="quantized")
    export_model(model, tmp_path / "out", max_shard_bytes=SHARD_BYTES, progress=_quiet)
    assert hub.checkpoint_digest(tmp_path / "out") == hub.checkpoint_digest(ga)
    assert ModelConfig.from_hf_config(tmp_path / "out") == ModelConfig.from_hf_config(ga)


def _ga_state(ga):
    return dict(hub.load_hub_checkpoint(ga))


def _without(state, name):
    state.pop(name)
    return state


@pytest.mark.parametrize("config, state, message", [
    (lambda: ModelConfig.preset("tiny"), _ga_state,
     "the checkpoint's mtp.* tensors are a GA DSpark drafter of 3 stages (e.g. ['mtp.0.main_norm.weight', "
     "'mtp.0.main_proj.weight']) but the config is a preview one (one MTP block, no dspark_* fields): load it with its "
     "own config.json (ModelConfig.from_hf_config(checkpoint_dir) reads the dspark_* fields)"),
    (lambda: ModelConfig.preset("tiny-dspark"),
     lambda ga: hub.quantize_hub_state(hub.random_hub_checkpoint(ModelConfig.preset("tiny").to_hf_config(), 0)),
     "the checkpoint's mtp.* tensors are the preview's MTP block (e.g. ['mtp.0.e_proj.weight', 'mtp.0.enorm.weight'])"
     " but the config is a GA one with a 3-stage DSpark drafter: load it with a preview config"),
    (lambda: ModelConfig.preset("tiny-dspark"),
     lambda ga: _without(_ga_state(ga), "mtp.2.markov_head.markov_w1.weight"),
     "missing tensors: ['mtp.2.markov_head.markov_w1.weight']"),
    (lambda: ModelConfig.preset("tiny-dspark"),
     lambda ga: dict(_ga_state(ga), **{"mtp.0.e_proj.weight": np.zeros((128, 128), np.float32)}),
     "the mtp.* tensors fit neither layout: ['mtp.0.e_proj.weight'] belong to the preview's MTP block, "
     "['mtp.0.main_norm.weight', 'mtp.0.main_proj.weight', 'mtp.1.attn.attn_sink'] to a GA DSpark drafter"),
    (lambda: ModelConfig.preset("tiny-dspark", n_mtp_layers=2, compress_ratios=(0, 4, 128, 4, 128, 4, 0, 0)),
     _ga_state, "the checkpoint's DSpark drafter has 3 stages (mtp.0 .. mtp.2) but the config's n_mtp_layers is 2"),
])
def test_mtp_tensors_of_the_wrong_layout_are_named_with_the_fix(ga, config, state, message):
    with pytest.raises(CheckpointMismatch) as e:
        load_hub_state(abstract_model(config()), state(ga), weights="quantized")
    assert message in str(e.value)
