"""bench/peers.py: the token agreement and the table (no model), v4jax's decode and generate() measurements on the
tiny preset in quick mode, and the whole quick comparison against HF transformers where the oracle env exists."""

import os

import pytest

from bench import peers


def test_agreement_counts_positions_and_the_first_difference():
    assert peers.agreement([1, 2, 3], [1, 2, 3]) == {"agree": 3, "of": 3, "first_difference": None}
    assert peers.agreement([1, 5, 3, 7], [1, 2, 3, 4]) == {"agree": 2, "of": 4, "first_difference": 1}
    assert peers.agreement([1, 2], [1, 2, 9]) == {"agree": 2, "of": 3, "first_difference": 2}


def _row(config):
    row = {"config": config, "params": 8e6, "activated": 4e6, "torch": "t", "transformers": "x", "torch_threads": 2,
           "decode_step_s_v4jax": 0.01, "decode_step_s_hf": 0.1, "generate_s_v4jax": 1.0, "generate_s_hf": 3.0,
           "agreement": {"agree": 3, "of": 4, "first_difference": 2}}
    for k in peers.KINDS:
        row.update({f"{k}_tps_v4jax": 20.0, f"{k}_tps_hf": 10.0, f"{k}_ratio": 2.0})
    return row


def test_markdown_has_a_generate_column_and_the_agreement():
    md = peers.markdown({"shape": dict(peers.SHAPE), "interleaved": True, "rows": [_row("tiny"), _row("small")]})
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| config |"))
    assert "generate tok/s v4jax / HF" in header and "greedy tokens agree" in header
    rows = [ln for ln in lines if ln.startswith("| tiny |") or ln.startswith("| small |")]
    assert len(rows) == 2 and {ln.count("|") for ln in rows} == {header.count("|")}
    assert "3 / 4 (first difference at token 2)" in rows[0]
    assert "tiny 10.0 / 100.0" in md and "tiny 1.00 / 3.00" in md


def test_v4jax_side_decode_and_generate_quick():
    spec = dict(peers.SHAPE, **peers.QUICK)
    side = peers.V4jaxSide(peers.hf_config(peers.CONFIGS["tiny"]), spec)
    dec = side.decode()
    assert len(dec["step_s"]) == spec["decode_steps"] - 1 and all(t > 0 for t in dec["step_s"])
    gen = side.generate()
    assert gen["s"] > 0 and len(gen["tokens"]) == spec["new_tokens"]
    assert all(0 <= t < side.model.cfg.vocab_size for t in gen["tokens"])
    assert side.generate()["tokens"] == gen["tokens"]  # greedy: the same tokens every time


@pytest.mark.skipif(not os.path.exists(peers.ORACLE_PYTHON), reason="no oracle env (.venv-oracle): HF side not run")
def test_quick_run_against_hf_has_generate_ratio_and_agreement():
    result = peers._run(quick=True, configs=["tiny"])
    (row,) = result["rows"]
    n = peers.QUICK["new_tokens"]
    for k in peers.KINDS:
        assert row[f"{k}_ratio"] > 0 and row[f"{k}_tps_v4jax"] > 0 and row[f"{k}_tps_hf"] > 0
    assert len(row["tokens_v4jax"]) == n and len(row["tokens_hf"]) == n
    assert row["agreement"]["of"] == n
    assert "| tiny |" in peers.markdown(result)
