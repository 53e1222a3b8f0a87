"""DSpark drafter fidelity (issue 14): v4jax's drafter against an independent implementation of DeepSeek's 0731
reference, RelicLLM's port of `DSparkBlock` on the official inference/model.py, run on CPU in fp32 with the
quantization simulation off (tests/oracle/make_dspark_fixture.py; tests/fixtures/dspark/meta.json says what ran
and what was stubbed).

The model is the project's tiny GA checkpoint (tests/ga_fixture.py, preset tiny-dspark, rebuilt here from the
fixture's seed and checked against the oracle's checkpoint digest), loaded dense in fp32. Per case, a batch of 2
random prompts of 11, 16 and 29 tokens (the window-16 ring partly filled, exactly full, wrapped), the fixture
holds the port's target logits at the last prompt position, main_hidden, the anchor (the target's greedy next
token), the greedy draft tokens, the Markov-corrected draft logits [b, B, vocab] and the confidence logits [b, B].
Needs no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from ga_fixture import write_ga_fixture
from v4jax import hub
from v4jax.checkpoint import load_hub_state
from v4jax.config import ModelConfig
from v4jax.model import Transformer

FIX = Path(__file__).resolve().parent / "fixtures" / "dspark"
CASES = ("short", "full", "wrap")
TOL = 1e-4


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    meta = json.loads((FIX / "meta.json").read_text())
    ref = dict(np.load(FIX / "ref.npz"))
    ckpt = tmp_path_factory.mktemp("dspark_oracle") / "tiny-0731"
    write_ga_fixture(ckpt, int(ref["seed"]))
    if hub.checkpoint_digest(ckpt) != meta["weights"]["checkpoint_digest"]:
        pytest.fail("tests/ga_fixture.py no longer writes the checkpoint the oracle ran on (its layout or random "
                    "weights changed): regenerate tests/fixtures/dspark (tests/oracle/make_dspark_fixture.py)")
    cfg = ModelConfig.from_hf_config(ckpt, compute_dtype="float32")
    assert not cfg.qat and cfg.dspark and cfg.n_mtp_layers == 3
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    load_hub_state(model, ckpt)  # dense fp32: FP8 / MXFP4 dequantized, as the oracle's weights
    return model, ref, {}


@nnx.jit
def _prefill_and_draft(model, ids, anchor):
    b, L = ids.shape
    cache = model.init_cache(b, L + 8)
    _, pending = model.verify(cache, ids)  # the same forward as step's, exposing the drafter's input main_hidden
    logits, _, cache = model.step(cache, ids)  # the prefill: fills the layers' caches and the drafter's rings
    tokens, draft_logits, conf = model.draft(cache, anchor)
    return logits[:, -1], pending.main_hidden, tokens, draft_logits, conf


def _run(oracle, case: str) -> dict:
    model, ref, memo = oracle
    if case not in memo:
        outs = _prefill_and_draft(model, jnp.asarray(ref[f"{case}_ids"], jnp.int32),
                                  jnp.asarray(ref[f"{case}_anchor"], jnp.int32))
        memo[case] = {k: np.asarray(v) for k, v in zip(
            ("target_logits", "main_hidden", "draft_tokens", "draft_logits", "confidence"), outs)}
    return memo[case]


@pytest.mark.parametrize("case", CASES)
def test_target_side_matches_the_oracle(oracle, case):
    """The drafter's inputs: the target's last logits (whose greedy token is the anchor) and main_hidden."""
    _, ref, _ = oracle
    got = _run(oracle, case)
    assert rel_err(got["target_logits"], ref[f"{case}_target_logits"]).max() <= TOL
    np.testing.assert_array_equal(got["target_logits"].argmax(-1), ref[f"{case}_anchor"])
    err = rel_err(got["main_hidden"], ref[f"{case}_main_hidden"])  # [b, L]: per position
    assert err.max() <= TOL, err.max()


@pytest.mark.parametrize("case", CASES)
def test_draft_matches_the_oracle(oracle, case):
    """Greedy draft tokens identical; Markov-corrected logits (per slot) and confidence logits within 1e-4."""
    _, ref, _ = oracle
    got = _run(oracle, case)
    err = rel_err(got["draft_logits"], ref[f"{case}_draft_logits"])  # [b, B]: per slot
    assert err.max() <= TOL, err
    np.testing.assert_array_equal(got["draft_tokens"], ref[f"{case}_draft_tokens"])
    conf, cref = got["confidence"], ref[f"{case}_confidence"]  # one logit per slot
    assert rel_err(conf, cref).max() <= TOL, (conf, cref)  # per row of B slots, as the logits' per slot
    # and each slot against its row's largest |logit| (a single logit near 0 is a cancellation with no relative
    # scale of its own: its error is that of the terms of the dot product)
    assert (np.abs(conf - cref) / np.abs(cref).max(-1, keepdims=True)).max() <= TOL, (conf, cref)
