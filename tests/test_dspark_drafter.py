"""The DSpark drafter piece by piece against the equations of architecture §8.4, written here in numpy: the
rings hold kv_norm(wkv(main_x)) of the last window positions (main_x from the target layers' outputs averaged over
the hc streams), the block attention is bidirectional and sees only the filled ring slots, the head collapses with
a sigmoid gate, the Markov correction runs slot after slot, the confidence reads the pre-norm h. Also: every
drafter parameter has logical axes and a stage is sharded like a backbone layer of its kind."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import kv_cache, sharding
from v4jax.dspark import ring_index
from v4jax.config import ModelConfig
from v4jax.model import Transformer

CFG = ModelConfig.preset("tiny-dspark", compute_dtype="float32")


@functools.lru_cache(maxsize=None)
def _model(**overrides) -> Transformer:
    model = Transformer(CFG.replace(**overrides), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    # the init leaves the mHC maps near "average the streams" and the Markov / confidence heads tiny: give the
    # drafter's own parameters O(1) random values so that every term of the equations matters
    for path, var in nnx.to_flat_state(nnx.state(model.dspark)):
        name = ".".join(map(str, path))
        if any(k in name for k in ("hc_", "markov", "confidence", "main_proj", "attn_sink")):
            fan_in = var.shape[-1]
            var.set_value(jnp.asarray(rng.normal(0, fan_in**-0.5 if var.ndim > 1 else 0.5, var.shape), jnp.float32))
    return model


def _np(a):
    return np.asarray(a, np.float64)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 if w is None else _np(w))


def _rope(x, pos, theta, rd):
    """Interleaved-pair RoPE on the last rd dims, base theta, no YaRN: x [s, d], pos [s]."""
    freqs = 1.0 / theta ** (np.arange(0, rd, 2) / rd)
    ang = pos[:, None] * freqs
    a, b = x[:, -rd:][:, 0::2], x[:, -rd:][:, 1::2]
    rot = np.stack([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], -1).reshape(len(x), rd)
    return np.concatenate([x[:, :-rd], rot], -1)


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, 1000, (1, n)).astype(np.int32)


@pytest.mark.parametrize("qat", [False, True])
def test_rings_hold_main_x_entries_of_the_last_window(qat):
    model = _model(qat=qat)
    cfg, P, W = model.cfg, 40, model.cfg.window_size
    ids = _ids(P)
    # main_hidden from the training forward's blocks (independent of the cached step): block outputs, mean over
    # the hc streams, concatenated in dspark_target_layer_ids order
    x = model.streams(jnp.asarray(ids))
    outs = []
    for block in model.layers:
        x = block(x, jnp.asarray(ids))
        outs.append(_np(x)[0].mean(axis=1))
    main_hidden = np.concatenate([outs[i] for i in cfg.dspark_target_layer_ids], -1)
    first = model.dspark.stages[0]
    main_x = _rms(main_hidden @ _np(first.main_proj[...]).T, first.main_norm[...], cfg.norm_eps)
    cache = model.init_cache(1, 64)
    _, _, cache = model.step(cache, jnp.asarray(ids))
    pos = np.arange(P - W, P)
    for stage, ring in zip(model.dspark.stages, cache.dspark):
        kv = _rope(_rms(main_x @ _np(stage.attn.wkv[...]).T, stage.attn.kv_norm[...], cfg.norm_eps),
                   np.arange(P), cfg.rope_theta, cfg.rope_head_dim)[pos]
        got = _np(kv_cache.read(ring, jnp.float32))[0, pos % W]
        if qat:  # the simulation's FP8 inputs of main_proj and wkv and FP8 KV non-rope dims: ~5% per entry
            err = np.linalg.norm(got - kv, axis=-1) / np.linalg.norm(kv, axis=-1)
            assert err.max() < 0.08, err.max()
            mx = model.dspark.main_x(jnp.asarray(main_hidden[None], jnp.float32))
            np.testing.assert_allclose(got, _np(stage.attn.kv(mx, jnp.arange(P)[None]))[0, pos], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(got, kv, rtol=1e-4, atol=1e-5)


def test_block_attention_is_bidirectional_and_sees_only_filled_ring_slots():
    model = _model()
    attn, cfg = model.dspark.stages[1].attn, model.cfg
    B, W = cfg.dspark_block_size, cfg.window_size
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, B, cfg.dim)), jnp.float32)
    ring = jnp.asarray(rng.normal(size=(1, W, cfg.head_dim)), jnp.float32)
    pos = jnp.asarray([[9 + np.arange(B)]])[0]
    n_ring = jnp.asarray([9])
    base = _np(attn(x, ring, ring_index(n_ring, W, B), pos))
    later = _np(attn(x.at[:, B - 1].multiply(-1.0), ring, ring_index(n_ring, W, B), pos))
    assert np.max(np.abs(later[0, 0] - base[0, 0])) > 1e-3  # slot 0 sees the last slot
    unfilled = _np(attn(x, ring.at[:, 9:].set(7.0), ring_index(n_ring, W, B), pos))
    np.testing.assert_array_equal(unfilled, base)  # slots >= n_ring are invisible
    filled = _np(attn(x, ring.at[:, 8].set(7.0), ring_index(n_ring, W, B), pos))
    assert np.max(np.abs(filled - base)) > 1e-3


def test_draft_head_markov_and_confidence_equations():
    """Draft outputs against numpy: hc_head with a sigmoid gate on the last stage's streams, norm, fp32 head,
    the Markov term added slot by slot from the previous *drafted* token, argmax drafts, confidence on [h ; e]."""
    model = _model()
    cfg = model.cfg
    P, B = 30, cfg.dspark_block_size
    ids = _ids(P + 1, 3)
    cache = model.init_cache(1, 64)
    _, _, cache = model.step(cache, jnp.asarray(ids[:, :P]))
    anchor = jnp.asarray(ids[:, P])
    tokens, logits, conf = map(_np, model.draft(cache, anchor))
    # the stages' output streams, recomputed through the modules (their body is the backbone's verified block)
    block = jnp.concatenate([anchor[:, None], jnp.full((1, B - 1), cfg.dspark_noise_token_id)], 1)
    x = model.streams(block)
    pos = P + jnp.arange(B)[None]
    for stage, ring in zip(model.dspark.stages, cache.dspark):
        x = stage(x, ring, ring_index(jnp.asarray([min(P, cfg.window_size)]), cfg.window_size, B), pos, block)
    x = _np(x)[0]  # [B, hc, d]
    last = model.dspark.stages[-1]
    flat = x.reshape(B, -1)
    mix = flat @ _np(last.hc_head.fn[...]).T / np.sqrt(np.mean(flat**2, -1, keepdims=True) + cfg.norm_eps)
    gate = 1 / (1 + np.exp(-(mix * _np(last.hc_head.scale[...])[0] + _np(last.hc_head.base[...])))) + cfg.hc_eps
    h = np.einsum("sc,scd->sd", gate, x)
    base = _rms(h, last.norm[...], cfg.norm_eps) @ _np(model.head[...]).T
    w1, w2 = _np(last.markov_head.markov_w1[...]), _np(last.markov_head.markov_w2[...])
    prev, want_tokens, want_logits, e = int(anchor[0]), [], [], []
    for i in range(B):
        e.append(w1[prev])
        want_logits.append(base[i] + w2 @ w1[prev])
        prev = int(np.argmax(want_logits[-1]))
        want_tokens.append(prev)
    assert tokens[0].tolist() == want_tokens
    np.testing.assert_allclose(logits[0], np.stack(want_logits), rtol=1e-4, atol=1e-4 * np.abs(base).max())
    want_conf = np.concatenate([h, np.stack(e)], -1) @ _np(last.confidence_head.proj[...])[0]
    np.testing.assert_allclose(conf[0], want_conf, rtol=1e-4, atol=1e-5)


def test_every_drafter_parameter_is_sharded_like_the_backbone():
    model = nnx.eval_shape(lambda: Transformer(ModelConfig.preset("flash-0731"), rngs=nnx.Rngs(0)))
    for rules in (sharding.TRAIN_RULES, sharding.DECODE_RULES):
        specs = sharding.flat_specs(model, rules)  # raises if a parameter has no logical axes
        stage = {k.split(".", 3)[3]: v for k, v in specs.items() if k.startswith("dspark.stages.1.")}
        window_layer = {k.split(".", 2)[2]: v for k, v in specs.items() if k.startswith("layers.0.")}  # window-only
        score_layer = {k.split(".", 2)[2]: v for k, v in specs.items() if k.startswith("layers.4.")}  # score routed
        assert stage, "no drafter parameters"
        for name, spec in stage.items():
            like = window_layer if name.startswith(("attn.", "hc_", "attn_norm")) else score_layer
            assert spec == like[name], (name, spec, like[name])
        as_list = [list(e) if isinstance(e, tuple) else e for e in (rules["mtp"], rules["embed"])]
        assert specs["dspark.stages.0.main_proj"] == as_list
        assert specs["dspark.stages.2.markov_head.markov_w1"][0] == rules["vocab"]


def test_qat_drafts_simulate_the_fp8_path_of_the_same_weights():
    """qat=True (the official simulation: FP8 inputs of the FP8 / FP4 matmuls, FP8 KV non-rope dims, in the rings
    too) moves the draft logits by rounding-sized amounts, not more: same weights, a few % relative."""
    ids = _ids(30, 4)
    out = {}
    for qat in (False, True):
        model = _model(qat=qat)
        _, _, cache = model.step(model.init_cache(1, 64), jnp.asarray(ids[:, :29]))
        out[qat] = model.draft(cache, jnp.asarray(ids[:, 29]))
    err = np.linalg.norm(_np(out[True][1]) - _np(out[False][1]), axis=-1) / np.linalg.norm(_np(out[False][1]), axis=-1)
    assert 1e-4 < err.max() < 0.1, err
