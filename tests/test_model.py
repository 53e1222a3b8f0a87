"""End-to-end parity of the whole model with independent implementations, and the real-size shapes/counts.

References: HF transformers' DeepseekV4ForCausalLM (fixtures made by tests/oracle/, same random weights moved
through the checkpoint name map) and DeepSeek's official inference code, both run on the tiny Flash-like checkpoint
in the released layout (tests/flashlike_fixture.py; references by tests/oracle/make_flashlike_fixture.py).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURE, REPO, fixture_model, fixture_refs, forward_hidden, head_logits, mtp_logits, rel_err
from v4jax.checkpoint import load_hub_state
from v4jax.config import ModelConfig
from v4jax.hub import checkpoint_digest, random_hub_checkpoint
from v4jax.model import Transformer, param_counts

PARITY = REPO / "tests" / "fixtures" / "parity"


@pytest.mark.parametrize("name", ["tiny_flashlike", "tiny_prolike"])
def test_logits_match_hf_transformers(name):
    """qat=False, fp32: every position within 1e-4 relative of HF transformers (>= 512 tokens, several HCA
    blocks, top-k selecting among more visible entries than it keeps, randomised tid2eid)."""
    hf_config = json.loads((PARITY / name / "config.json").read_text())
    ref = np.load(PARITY / name / "ref.npz")
    cfg = ModelConfig.from_hf_config(hf_config, compute_dtype="float32")
    assert ref["input_ids"].shape[1] >= 512 and ref["input_ids"].shape[1] // 128 >= 4
    assert cfg.index_topk < ref["input_ids"].shape[1] // 4
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    load_hub_state(model, random_hub_checkpoint(hf_config, int(ref["seed"])))
    logits = head_logits(model, forward_hidden(model, jnp.asarray(ref["input_ids"])))
    err = rel_err(logits, ref["logits"])
    assert err.max() < 1e-4, f"max rel err {err.max():.2e} at {np.unravel_index(err.argmax(), err.shape)}"


def test_fixture_checkpoint_is_the_one_the_references_saw():
    """The checkpoint conftest writes (config + seed) is byte for byte the one the stored references were
    computed from: a change of the random writer or the release encoding shows here first."""
    meta = json.loads((REPO / "tests" / "fixtures" / "flashlike" / "meta.json").read_text())
    assert checkpoint_digest(FIXTURE) == meta["weights"]["checkpoint_digest"]


@pytest.fixture(scope="module")
def fixture_outputs():
    model = fixture_model()
    ids = jnp.asarray(fixture_refs()["input_ids"])
    x = forward_hidden(model, ids)
    return np.asarray(head_logits(model, x)), np.asarray(mtp_logits(model, x, ids))


def test_released_layout_checkpoint_matches_hf_and_official(fixture_outputs):
    """The FP8/MXFP4 fixture checkpoint, dequantized: 1e-4 against HF at every position and against the official
    code at every third (the seed has no near tie of an indexer or router top-k, so the references agree)."""
    logits, _ = fixture_outputs
    refs = fixture_refs()
    pos = refs["positions"]
    assert rel_err(refs["official_logits"], refs["hf_logits"][:, pos]).max() < 1e-5
    assert rel_err(logits, refs["hf_logits"]).max() < 1e-4
    assert rel_err(logits[:, pos], refs["official_logits"]).max() < 1e-4


def test_mtp_block_matches_official(fixture_outputs):
    """The official MTP block applied to the last layer's streams with the same ids (HF has no MTP)."""
    logits, mtp = fixture_outputs
    refs = fixture_refs()
    assert rel_err(mtp[:, refs["positions"]], refs["official_mtp_logits"]).max() < 1e-4
    assert rel_err(mtp, logits).min() > 1e-2  # the MTP head really is a different function


def test_qat_blocks_match_official_simulation():
    """qat=True, block by block with teacher forcing (the official fp32 run with its simulation on, first 192
    tokens): the median token agrees to 1e-6 and at most 2% of tokens differ by more than 1e-4 (FP8 / top-k
    flips)."""
    model = fixture_model(qat=True)
    refs = fixture_refs()
    streams = refs["qat_streams"]  # [layers + 1, 1, T, hc, d]: block i maps entry i to entry i + 1
    T = streams.shape[2]
    ids = jnp.asarray(refs["input_ids"][:, :T])
    run = nnx.jit(lambda blk, x, t: blk(x, t))
    for i, block in enumerate(model.layers):
        out = np.asarray(run(block, jnp.asarray(streams[i]), ids))
        err = rel_err(out.reshape(T, -1), streams[i + 1].reshape(T, -1))
        assert np.median(err) < 1e-6, (i, np.median(err))
        assert (err > 1e-4).mean() <= 0.02, (i, (err > 1e-4).mean())
    # the simulation is really on: without it, block outputs move by FP8-sized amounts
    plain = fixture_model()
    out = np.asarray(run(plain.layers[1], jnp.asarray(streams[1]), ids))
    assert np.median(rel_err(out.reshape(T, -1), streams[2].reshape(T, -1))) > 1e-4


def test_qat_routes_and_topk_match_official():
    """The MoE routes and the indexer's selections of the qat run equal the official ones for >= 98% of tokens."""
    from v4jax.attention import entry_layout, index_scores, token_layout, visible_entries
    from v4jax.layers import rms_norm
    from v4jax.hyper_connection import hc_post, hc_pre
    from v4jax.quant import linear

    model = fixture_model(qat=True)
    cfg = model.cfg
    refs = fixture_refs()
    streams = refs["qat_streams"]
    T = streams.shape[2]
    ids = jnp.asarray(refs["input_ids"][:, :T])
    for i in (1, 3, 5):  # CSA layers: the indexer's picks, given the official block input
        blk = model.layers[i]
        x = jnp.asarray(streams[i])
        u, _, _ = hc_pre(x, blk.hc_attn.fn[...], blk.hc_attn.scale[...], blk.hc_attn.base[...], hc=4,
                         iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
        xn = rms_norm(u, blk.attn_norm[...], cfg.norm_eps)
        qr = rms_norm(linear(xn, blk.attn.wq_a[...], quantized=True, qat=True), blk.attn.q_norm[...], cfg.norm_eps)
        lay = token_layout(None, 1, T)
        ent = entry_layout(lay, 4)
        q, w, keys = blk.attn.indexer(xn, qr, lay, ent)
        visible = visible_entries(lay.pos, lay.doc, ent, 4)
        scores = jnp.where(visible, index_scores(q, w, keys, q.dtype), -jnp.inf)
        top = np.asarray(jnp.argsort(-scores, axis=-1)[..., : cfg.index_topk])[0]
        ref = refs["qat_index_topk"][i]  # [T, k] compressed entries, -1 = none
        agree = [set(top[s][ref[s] >= 0]) == set(ref[s][ref[s] >= 0]) for s in range(T)]
        assert np.mean(agree) >= 0.98, (i, np.mean(agree))
    assert (refs["qat_index_topk"][1, :3] == -1).all()  # fewer visible entries than top-k at the start

    def routes(blk, x):  # the block's attention site, then its router on the ffn input
        u, post, comb = blk.hc_attn.pre(x)
        x = hc_post(blk.attn(rms_norm(u, blk.attn_norm[...], cfg.norm_eps)), x, post, comb)
        u, _, _ = hc_pre(x, blk.hc_ffn.fn[...], blk.hc_ffn.scale[...], blk.hc_ffn.base[...], hc=4,
                         iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
        return blk.ffn.gate(rms_norm(u, blk.ffn_norm[...], cfg.norm_eps)[0], ids[0])[1]

    for i, blk in enumerate(model.layers):  # hash layers (0, 1) and score-routed layers alike
        got = np.asarray(nnx.jit(routes)(blk, jnp.asarray(streams[i])))
        ref = refs["qat_route_idx"][i]
        agree = np.mean([set(got[s]) == set(ref[s]) for s in range(T)])
        assert agree >= 0.98, (i, agree)


def test_flash_and_pro_parameter_counts():
    """jax.eval_shape of the full models: Flash has exactly the released checkpoint's 290,942,289,362 logical
    parameters (architecture §2.4, [HDR]); Pro about 1598.8B; activated per token about 13.3B and 48.9B."""
    flash, pro = param_counts(ModelConfig.preset("flash")), param_counts(ModelConfig.preset("pro"))
    assert flash["total"] == 290_942_289_362
    assert round(pro["total"] / 1e9, 1) == 1598.8
    assert round(flash["activated"] / 1e9, 1) == 13.3
    assert round(pro["activated"] / 1e9, 1) == 48.9
    assert round(flash["total_without_mtp"] / 1e9) == 284  # the report's 284B


def test_ga_parameter_counts_include_the_dspark_drafter():
    """Flash-0731 / Pro-0813: the preview backbone (same counts without the mtp namespace) plus three drafter
    stages, each a window-only score-routed block, and the stage-specific tensors of architecture §8.3,
    counted here by hand from the tensor table: Flash's drafter is 19,845,850,983 (the spec's "about 19.8B")."""
    def drafter(d, n_heads, q_lora, o_groups, experts, rank, vocab=129280, hd=512, o_lora=1024, inter=None, hc=4):
        attn = (q_lora * d + q_lora + n_heads * hd * q_lora + hd * d + hd
                + o_groups * o_lora * (n_heads * hd // o_groups) + d * o_groups * o_lora + n_heads)
        block = attn + 2 * d + 2 * ((2 + hc) * hc * hc * d + (2 + hc) * hc + 3) + experts * d + experts \
            + 3 * d * inter * (experts + 1)
        heads = 3 * d * d + 2 * d + hc * hc * d + hc + 1 + 2 * vocab * rank + d + rank
        return 3 * block + heads

    for preview, ga, want in (("flash", "flash-0731", drafter(4096, 64, 1024, 8, 256, 256, inter=2048)),
                              ("pro", "pro-0813", drafter(7168, 128, 1536, 16, 384, 512, inter=3072))):
        old, new = param_counts(ModelConfig.preset(preview)), param_counts(ModelConfig.preset(ga))
        assert new["total_without_mtp"] == old["total_without_mtp"] and new["activated"] == old["activated"]
        assert new["mtp"] == want and new["total"] == old["total_without_mtp"] + want
    assert param_counts(ModelConfig.preset("flash-0731"))["mtp"] == 19_845_850_983


def test_flash_shapes_match_released_tensor_table():
    """A few released tensor shapes (architecture §5.2) come out of the abstract Flash model."""
    from v4jax.model import model_variables

    v = model_variables(nnx.eval_shape(lambda: Transformer(ModelConfig.preset("flash"), rngs=nnx.Rngs(0))))
    assert v["layers.2.attn.wo_a"].shape == (8192, 4096)
    assert v["layers.2.attn.indexer.wq_b"].shape == (8192, 1024)
    assert v["layers.2.attn.compressor.ape"].shape == (4, 1024)
    assert v["layers.3.attn.compressor.ape"].shape == (128, 512)
    assert v["layers.0.ffn.gate.tid2eid"].shape == (129280, 6)
    assert v["layers.5.ffn.experts.w2"].shape == (256, 4096, 2048)
    assert v["mtp.hc_head.fn"].shape == (4, 16384)
    assert "layers.0.attn.compressor.ape" not in v and "layers.3.attn.indexer.wq_b" not in v


def test_bf16_compute_stays_close_to_fp32():
    """compute_dtype bfloat16 (the default) tracks the fp32 result to bf16 accuracy."""
    ids = jnp.asarray(fixture_refs()["input_ids"][:, :200])
    ref = fixture_refs()["hf_logits"][:, :200]
    model = fixture_model(compute_dtype="bfloat16")
    logits = head_logits(model, forward_hidden(model, ids))
    assert np.median(rel_err(logits, ref)) < 5e-2


def test_init_starts_uniform_and_fits_a_batch():
    """The documented init (N(0, 0.006^2), mHC gates 0.01): the first loss is ln(vocab) (near-uniform
    predictions), and gradients through every component (indexer top-k, ragged experts, mHC) let AdamW fit a
    fixed batch without a NaN."""
    import optax

    cfg = ModelConfig.preset("tiny", compute_dtype="float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 65)))

    def loss_fn(m):
        logits = m.logits(m.hidden(ids[:, :-1]), m.hc_head, m.norm)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(25)]
    assert abs(losses[0] - np.log(cfg.vocab_size)) < 0.01
    assert np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0], losses


def test_packed_documents_equal_separate_runs():
    """Two documents packed in one row (segment_ids) give, position by position, the logits of each document
    run alone: positions and compression windows restart and nothing attends across (lengths cross many
    4-token windows and a 128-token one, and are not multiples of either)."""
    cfg = ModelConfig.preset("tiny", compute_dtype="float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    a = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 141)))
    b = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 170)))
    fwd = nnx.jit(lambda m, i, s: m(i, s))
    packed = fwd(model, jnp.concatenate([a, b], 1), jnp.asarray([[5] * 141 + [9] * 170]))
    alone_a, alone_b = fwd(model, a, None), fwd(model, b, None)
    assert rel_err(packed[:, :141], alone_a).max() < 1e-5
    assert rel_err(packed[:, 141:], alone_b).max() < 1e-5
    assert rel_err(fwd(model, jnp.concatenate([a, b], 1), None)[:, 141:], alone_b).min() > 1e-3  # unpacked differs


def test_training_stats_and_config_switch():
    """hidden(with_stats=True) returns each MoE layer's expert load (all token-slots counted) and the balance
    loss of score-routed layers; with_config keeps the weights under a new config; the model keeps no stats."""
    from v4jax.model import with_config

    cfg = ModelConfig.preset("tiny", compute_dtype="float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)))
    x, stats = nnx.jit(lambda m, i: m.hidden(i, with_stats=True))(model, ids)
    loads = [s.expert_load for s in stats if s.expert_load is not None]
    assert len(loads) == cfg.n_layers and all(float(v.sum()) == 80 * cfg.n_activated_experts for v in loads)
    assert [i for i, s in enumerate(stats) if s.balance_loss is not None] == [2, 3, 4, 5]
    dense = with_config(model, csa_dense=True, indexer_loss=True)
    assert dense.cfg.csa_dense and dense.layers[1].attn.cfg.indexer_loss
    np.testing.assert_array_equal(np.asarray(dense.embed[...]), np.asarray(model.embed[...]))
    _, stats = nnx.jit(lambda m, i: m.hidden(i, with_stats=True))(dense, ids)
    assert [i for i, s in enumerate(stats) if s.indexer_kl is not None] == [1, 3, 5]
    assert not nnx.state(model, nnx.Intermediate)
