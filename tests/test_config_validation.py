"""Model config validation (issue 15): a config file must give every field that sets a shape (no silent Flash
values), every field has its type (an int field rejects "128", 128.5 and true; a float field takes an int), and
sizes are positive; each problem is one ConfigError naming the field and the fix, raised before any model exists."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from v4jax.config import _HF_NAMES, _SIZE_FIELDS, PRESETS, ConfigError, ModelConfig

TINY_HF = ModelConfig.preset("tiny").to_hf_config()
TINY_OFFICIAL = ModelConfig.preset("tiny").to_official_dict()
HF_OF = {ours: hf for hf, ours in _HF_NAMES.items()}


@pytest.mark.parametrize("field", _SIZE_FIELDS)
def test_a_config_file_without_a_size_field_is_refused(field):
    hf = {k: v for k, v in TINY_HF.items() if k != HF_OF[field]}
    with pytest.raises(ConfigError, match=rf"HF config: missing \['{HF_OF[field]}'\]"):
        ModelConfig.from_hf_config(hf)
    official = {k: v for k, v in TINY_OFFICIAL.items() if k != field}
    with pytest.raises(ConfigError, match=rf"official config: missing \['{field}'\]"):
        ModelConfig.from_official_config(official)


def test_every_missing_key_is_listed_at_once_and_an_override_supplies_one(tmp_path):
    hf = {k: v for k, v in TINY_HF.items() if k not in ("hidden_size", "vocab_size", "n_routed_experts")}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(tmp_path)
    assert "missing ['vocab_size', 'hidden_size', 'n_routed_experts']" in str(e.value)
    assert "none is taken from a preset" in str(e.value)
    cfg = ModelConfig.from_hf_config(tmp_path, dim=128, vocab_size=1024, n_routed_experts=16)
    assert cfg == ModelConfig.preset("tiny", attn_chunk=cfg.attn_chunk)


@pytest.mark.parametrize("key, value, problem", [
    ("hidden_size", "128", "is '128' (str). Give an integer"),
    ("hidden_size", 128.5, "is 128.5 (float). Give an integer"),
    ("hidden_size", 128.0, "is 128.0 (float). Give an integer"),
    ("num_hidden_layers", True, "is True (bool). Give an integer"),
    ("compress_ratios", [0, "4", 128, 4, 128, 4, 0], "is (0, '4', 128, 4, 128, 4, 0) (tuple). Give a list of integers"),
    ("compress_ratios", 7, "is 7 (int). Give a list of integers"),
    ("routed_scaling_factor", "1.5", "is '1.5' (str). Give a number"),
    ("scoring_func", 1, "is 1 (int). Give a string"),
])
def test_wrong_types_name_the_field(key, value, problem):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(dict(TINY_HF, **{key: value}))
    ours = _HF_NAMES[key]
    named = f"ModelConfig.{ours}" + (f" (HF config.json: {key})" if key != ours else "")
    assert str(e.value).startswith(f"{named}: {problem}"), str(e.value)


def test_a_float_field_takes_an_int_and_presets_still_load():
    assert ModelConfig.from_hf_config(dict(TINY_HF, routed_scaling_factor=2)).route_scale == 2
    for name in PRESETS:
        ModelConfig.preset(name)
    for path in (REPO / "configs" / "model").glob("*.json"):
        ModelConfig.from_official_config(path)
    with pytest.raises(ConfigError, match=r"ModelConfig.qat: is 1 \(int\). Give true or false"):
        ModelConfig.preset("tiny", qat=1)
    with pytest.raises(ConfigError, match="ModelConfig.moe_ep_capacity"):
        ModelConfig.preset("tiny", moe_ep_capacity="2")


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_attention_heads", "o_groups", "head_dim"])
def test_sizes_must_be_positive(key):
    with pytest.raises(ConfigError, match=rf"ModelConfig.{_HF_NAMES[key]}: is 0\. Give a size of at least 1"):
        ModelConfig.from_hf_config(dict(TINY_HF, **{key: 0}))
