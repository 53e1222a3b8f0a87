"""ModelConfig: presets (architecture §2), the official and HF loaders, configs/model/*.json, and clear errors."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURE, REPO
from v4jax.config import PRESETS, ConfigError, ModelConfig


def test_flash_and_pro_presets_match_spec_table():
    f, p = ModelConfig.preset("flash"), ModelConfig.preset("pro")
    assert (f.dim, f.n_layers, f.n_heads, f.q_lora_rank, f.o_groups, f.index_topk, f.n_routed_experts,
            f.moe_inter_dim, f.route_scale) == (4096, 43, 64, 1024, 8, 512, 256, 2048, 1.5)
    assert (p.dim, p.n_layers, p.n_heads, p.q_lora_rank, p.o_groups, p.index_topk, p.n_routed_experts,
            p.moe_inter_dim, p.route_scale) == (7168, 61, 128, 1536, 16, 1024, 384, 3072, 2.5)
    assert len(f.compress_ratios) == 44 and len(p.compress_ratios) == 62
    assert f.compress_ratios.count(4) == 21 and f.compress_ratios.count(128) == 20  # architecture §2.3
    assert p.compress_ratios.count(4) == 30 and p.compress_ratios.count(128) == 31
    assert f.compress_ratios[:3] == (0, 0, 4) and p.compress_ratios[:3] == (128, 128, 4)


def test_tiny_preset_keeps_every_feature():
    t = ModelConfig.preset("tiny")
    assert {0, 4, 128} <= set(t.compress_ratios[: t.n_layers])
    assert t.n_hash_layers > 0 and t.n_mtp_layers == 1 and t.o_groups > 1
    assert t.index_topk < 320 // 4  # fewer than the entries visible at test lengths


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_files_load_and_equal_presets(name):
    path = REPO / "configs" / "model" / f"{name}.json"
    loaded = ModelConfig.from_official_config(path)
    assert loaded.to_official_dict() == ModelConfig.preset(name).to_official_dict()


def test_every_config_file_loads():
    files = sorted((REPO / "configs" / "model").glob("*.json"))
    assert files
    for f in files:
        ModelConfig.from_official_config(f)


def test_hf_and_official_loaders_agree_on_the_fixture():
    """The fixture's HF config.json and the official ModelArgs its reference run used describe one model."""
    meta = json.loads((REPO / "tests" / "fixtures" / "flashlike" / "meta.json").read_text())
    a = ModelConfig.from_hf_config(FIXTURE / "config.json")
    b = ModelConfig.from_official_config(meta["model_args"])
    assert a == b
    assert a.original_seq_len == 256 and a.window_size == 16 and a.index_head_dim == 128


def test_released_hf_config_fields():
    """A released-style HF config (architecture §2.1 field names) maps onto Flash."""
    hf = {"vocab_size": 129280, "n_routed_experts": 256, "n_shared_experts": 1, "q_lora_rank": 1024, "head_dim": 512,
          "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
          "hc_mult": 4,
          "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
          "moe_intermediate_size": 2048, "num_hash_layers": 3, "num_nextn_predict_layers": 1,
          "num_experts_per_tok": 6, "routed_scaling_factor": 1.5, "sliding_window": 128, "qk_rope_head_dim": 64,
          "scoring_func": "sqrtsoftplus", "compress_ratios": list(ModelConfig.preset("flash").compress_ratios),
          "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                           "beta_fast": 32, "beta_slow": 1},
          "quantization_config": {"quant_method": "fp8", "scale_fmt": "ue8m0"}, "expert_dtype": "fp4",
          "model_type": "deepseek_v4"}
    assert ModelConfig.from_hf_config(hf) == ModelConfig.preset("flash")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    """to_hf_config writes what from_hf_config reads back to the same model (v4jax's runtime fields aside)."""
    cfg = ModelConfig.preset(name)
    back = ModelConfig.from_hf_config(cfg.to_hf_config(), attn_chunk=cfg.attn_chunk)
    assert back == cfg


def test_hf_config_written_like_the_release():
    """Written from the fixture's config, every field of the released-layout config.json comes back (token ids
    are the tokenizer's business and are not model fields)."""
    fixture = json.loads((FIXTURE / "config.json").read_text())
    written = ModelConfig.from_hf_config(fixture).to_hf_config()
    assert {k: v for k, v in fixture.items() if k not in ("bos_token_id", "eos_token_id")} == written


@pytest.mark.parametrize("change, field", [
    (dict(compress_ratios=(0, 4, 128)), "compress_ratios"),  # wrong length
    (dict(compress_ratios=(0, 4, 64, 4, 128, 4, 0)), "compress_ratios"),  # value outside {0, 4, 128}
    (dict(compress_ratios=(0, 4, 128, 4, 128, 4, 4)), "compress_ratios"),  # MTP entry must be 0
    (dict(o_groups=3), "o_groups"),
    (dict(n_activated_experts=17), "n_activated_experts"),
    (dict(n_hash_layers=7), "n_hash_layers"),
    (dict(rope_head_dim=63), "rope_head_dim"),
    (dict(score_func="relu"), "score_func"),
    (dict(qat=True, dim=96), "dim"),
    (dict(qat=True, index_head_dim=96), "index_head_dim"),
    (dict(moe_impl="loop"), "moe_impl"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}"):
        ModelConfig.preset("tiny", **change)


def test_loader_errors():
    with pytest.raises(ConfigError, match="unknown fields"):
        ModelConfig.from_official_config({"dim": 8, "n_layer": 2})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_hf_config({"num_key_value_heads": 8})
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_hf_config(REPO / "no_such_config.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("flash2")
