"""DSpark drafter training (train/pretrain.py with drafter.enabled, losses.drafter_objective, architecture §8.5):
the loss against numpy; the teacher-forced blocks of a whole row reproduce Drafter.draft's logits and confidences
block by block; no gradient reaches the target and its variables stay bit-identical while the loss falls on
repeated text; a run through the loop on a frozen target run checkpoints the drafter alone and resumes; bad
configs are named."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_pretrain import run

from train import losses, pretrain
from train import tokenizer as tokenizer_lib
from train.data import tokenize_files
from v4jax.config import ModelConfig
from v4jax.dspark import context_index
from v4jax.model import Transformer

WEIGHTS = {"ce": 0.1, "tv": 0.9, "confidence": 1.0, "tv_decay": 4.0}
# tiny-dspark cut to 2 window-only backbone layers, both feeding a 2-stage drafter: quick to compile on a CPU
BACKBONE = dict(n_layers=2, n_hash_layers=1, n_routed_experts=8, n_heads=4, o_groups=2, moe_inter_dim=64,
                index_n_heads=4, compute_dtype="float32")
SMALL = BACKBONE | dict(compress_ratios=[0, 0, 0, 0], n_mtp_layers=2, dspark_target_layer_ids=[0, 1])


@functools.lru_cache(maxsize=None)
def _model(perturb: bool = True) -> Transformer:
    """The small drafter model in fp32; perturb: O(1) random values in the drafter's mHC, Markov, confidence and
    main_proj weights (their init is near-neutral: every term should matter)."""
    model = Transformer(ModelConfig.preset("tiny-dspark", **SMALL), rngs=nnx.Rngs(0))
    if not perturb:
        return model
    rng = np.random.default_rng(5)
    for path, var in nnx.to_flat_state(nnx.state(model.dspark)):
        name = ".".join(map(str, path))
        if any(k in name for k in ("hc_", "markov", "confidence", "main_proj", "attn_sink")):
            scale = var.shape[-1] ** -0.5 if var.ndim > 1 else 0.5
            var.set_value(jnp.asarray(rng.normal(0, scale, var.shape), jnp.float32))
    return model


def test_loss_against_numpy():
    rng = np.random.default_rng(0)
    b, N, B, V = 2, 3, 4, 11
    draft, target = rng.normal(0, 2, (2, b, N, B, V))
    conf = rng.normal(0, 1, (b, N, B))
    gt = rng.integers(0, V, (b, N, B))
    valid = rng.random((b, N, B)) > 0.25
    loss, metrics = losses.drafter_loss(*(jnp.asarray(a, jnp.float32) for a in (draft, conf, target)),
                                        jnp.asarray(gt), jnp.asarray(valid), WEIGHTS)
    ce = tv = bce = 0.0
    counted = 0
    for i in range(b):
        for n in range(N):
            for k in range(B):
                if not valid[i, n, :k + 1].all():
                    break  # the contiguous prefix ends at the first invalid slot
                p = np.exp(draft[i, n, k]) / np.exp(draft[i, n, k]).sum()
                q = np.exp(target[i, n, k]) / np.exp(target[i, n, k]).sum()
                l1 = np.abs(p - q).sum()
                y, c = 1 - l1 / 2, conf[i, n, k]
                ce -= np.log(p[gt[i, n, k]])
                tv += math.exp(-k / 4) * l1
                bce -= y * np.log(1 / (1 + np.exp(-c))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-c)))
                counted += 1
    want = 0.1 * ce / counted + 0.9 * tv / (b * N) + 1.0 * bce / counted
    assert 0 < counted < b * N * B
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["draft_tv"]), tv / (b * N), rtol=1e-5)


def test_context_index_is_the_window_inside_the_document():
    segs = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    got = np.asarray(context_index(jnp.asarray([[2, 8]]), segs, window=4, block=2))
    want = [[-1, -1, 0, 1]] * 2 + [[4, 5, 6, 7]] * 2  # anchor 2: positions 0, 1; anchor 8: the last 4 of doc 1
    np.testing.assert_array_equal(got[0], want)
    got = np.asarray(context_index(jnp.asarray([[5]]), segs, window=4, block=1))
    np.testing.assert_array_equal(got[0], [[-1, -1, 3, 4]])  # positions 1, 2 are in the other document


def test_teacher_forced_blocks_equal_draft():
    """Two blocks of one row (the first with less context than the window, the second with more) in one training
    pass, the row holding after each anchor the drafts that Drafter.draft made from the row's prefix: the
    teacher-forced logits and confidences are draft()'s (same context, same Markov inputs, no block sees the
    other)."""
    model = _model()
    cfg = model.cfg
    B, W = cfg.dspark_block_size, cfg.window_size
    row = np.random.default_rng(3).integers(0, 1000, 48).astype(np.int32)
    anchors, want = [5, 40], []

    @nnx.jit
    def draft(model, row, n, anchor):  # the drafts after the first n tokens of row
        _, _, cache = model.step(model.init_cache(1, 64), row, n)
        return model.draft(cache, anchor)

    @nnx.jit
    def teacher_forced(model, ids, anchors):
        _, main_hidden = model.drafter_inputs(ids)
        return model.dspark.teacher_forced(main_hidden, ids, jnp.zeros_like(ids), anchors, model.embed_tokens,
                                           model.head[...])

    for a in anchors:
        tokens, logits, conf = draft(model, jnp.asarray(row[None]), jnp.asarray([a]), jnp.asarray(row[a:a + 1]))
        row[a + 1:a + B] = np.asarray(tokens)[0, :B - 1]  # the Markov term's previous tokens are the drafts
        want.append((np.asarray(logits)[0], np.asarray(conf)[0]))
    assert anchors[0] < W < anchors[1]
    logits, conf = teacher_forced(model, jnp.asarray(row[None, :anchors[1] + B]), jnp.asarray([anchors]))
    for n, (want_logits, want_conf) in enumerate(want):
        scale = np.abs(want_logits).max()
        np.testing.assert_allclose(np.asarray(logits)[0, n], want_logits, rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(np.asarray(conf)[0, n], want_conf, rtol=1e-4, atol=1e-4)


def _repeated_batch(model, rows=2, length=48, n=6):
    """Rows of one short phrase repeated (the target's own greedy continuation is what the drafter must learn),
    anchors spread over each row."""
    phrase = np.random.default_rng(7).integers(0, 1000, 6)
    tokens = np.tile(np.resize(phrase, length + 1), (rows, 1)).astype(np.int32)
    anchors = np.tile(np.linspace(1, length - model.cfg.dspark_block_size, n).astype(np.int32), (rows, 1))
    return {"tokens": tokens, "segment_ids": np.zeros_like(tokens), "anchors": anchors}


def test_no_gradient_reaches_the_target():
    model = _model()
    mb = _repeated_batch(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        return losses.drafter_objective(m, *(jnp.asarray(mb[k]) for k in ("tokens", "segment_ids", "anchors")),
                                        WEIGHTS)[0]

    flat = jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params))
    grads = {pretrain.path_str(p): np.asarray(g) for p, g in flat}
    target = {k: g for k, g in grads.items() if not k.startswith("dspark.")}
    assert "embed" in target and "head" in target and len(target) > 50
    assert all(not g.any() for g in target.values()), [k for k, g in target.items() if g.any()][:5]
    assert sum(bool(g.any()) for k, g in grads.items() if k.startswith("dspark.")) > 20


def test_training_steps_lower_the_loss_and_leave_the_target_bit_identical():
    model = _model(perturb=False)
    cfg = pretrain.validate({"model": {"preset": "tiny-dspark"}, "drafter": {"enabled": True, "target": "x.yaml",
                                                                             "anchors_per_seq": 6},
                             "stages": [{"until_step": 12, "batch_size": 2, "seq_len": 48}],
                             "schedule": {"peak_lr": 3e-3, "warmup_steps": 1}})
    graphdef, params, others = nnx.split(model, pretrain.trained(cfg), ...)
    params, others = jax.tree.map(jnp.copy, (params, others))  # the step donates them; the cached model keeps its own
    assert all(pretrain.path_str(p).startswith("dspark.") for p, _ in jax.tree_util.tree_leaves_with_path(params))
    tx = pretrain.optimizer(cfg, model.cfg, params, pretrain.lr_schedule(cfg["schedule"], 12))
    opt_state = tx.init(params)
    shardings = jax.tree.map(lambda x: x.sharding, (params, others, opt_state))
    trainable = {pretrain.path_str(p): True for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    step = pretrain.make_train_step(graphdef, tx, trainable, None, shardings)
    before = {k: np.array(v) for k, v in jax.tree_util.tree_leaves_with_path(others)}
    batch = jax.tree.map(lambda a: jnp.asarray(a[None]), _repeated_batch(model))
    weights = {k: jnp.float32(v) for k, v in pretrain.loss_weights(0, cfg["stages"][0], cfg).items()}
    got = []
    for _ in range(12):
        params, others, opt_state, metrics = step(params, others, opt_state, batch, weights)
        assert bool(metrics["good"])
        got.append(float(metrics["loss"]))
    assert got[-1] < 0.75 * got[0], got
    after = dict(jax.tree_util.tree_leaves_with_path(others))
    for k, v in before.items():
        assert np.array_equal(np.asarray(after[k]), v), jax.tree_util.keystr(k)


def test_bad_drafter_configs_are_named():
    base = {"stages": [{"until_step": 2, "batch_size": 2, "seq_len": 32}]}
    with pytest.raises(pretrain.ConfigError, match="model.preset: tiny-dspark"):
        pretrain.validate(base | {"model": {"preset": "tiny"}, "drafter": {"enabled": True, "target": "t.yaml"}})
    with pytest.raises(pretrain.ConfigError, match="set drafter.target"):
        pretrain.validate(base | {"model": {"preset": "tiny-dspark"}, "drafter": {"enabled": True}})
    with pytest.raises(pretrain.ConfigError, match="anchors_per_seq 40 is more than the 28"):
        pretrain.validate(base | {"model": {"preset": "tiny-dspark"},
                                  "drafter": {"enabled": True, "target": "t.yaml", "anchors_per_seq": 40}})


# The target: the small backbone with an MTP block (a preview model), trained 2 steps; the drafter run: SMALL.
RUN = """
run_dir: {run_dir}
model: {{preset: {preset}, overrides: {overrides}}}
data: {{path: {data}}}
stages:
  - {{until_step: {steps}, batch_size: 2, seq_len: 48, attention: dense}}
schedule: {{peak_lr: 3.0e-3, final_lr: 3.0e-4, warmup_steps: 1}}
checkpoint: {{every: 2, keep: 5}}
log_every: 1
"""


def test_drafter_run_checkpoints_the_drafter_alone_and_resumes(tmp_path):
    """Target run (2 steps) -> drafter run to step 2 -> the same config to step 4 resumes from step 2: its
    checkpoints hold the drafter's parameters and optimizer state only, and the target in the drafter run's
    model is the target run's."""
    tokenize_files(tokenizer_lib.stdlib_files()[:10], tmp_path / "data")
    target = tmp_path / "target.yaml"
    target.write_text(RUN.format(run_dir=tmp_path / "target", preset="tiny", data=tmp_path / "data", steps=2,
                                 overrides=json.dumps(BACKBONE | {"compress_ratios": [0, 0, 0]})))
    run(["-m", "train.pretrain", str(target)])
    drafter = tmp_path / "drafter.yaml"
    drafter.write_text(RUN.format(run_dir=tmp_path / "drafter", preset="tiny-dspark", data=tmp_path / "data",
                                  steps=2, overrides=json.dumps(SMALL))
                       + f"drafter: {{enabled: true, target: {target}, anchors_per_seq: 8}}\n")
    first = run(["-m", "train.pretrain", str(drafter)]).stdout
    assert "drafter:" in first and "draft_tv" in first, first
    longer = "stages=[{until_step: 4, batch_size: 2, seq_len: 48, attention: dense}]"
    resumed = run(["-m", "train.pretrain", str(drafter), longer]).stdout
    assert "resumed from" in resumed and "step 4/4" in resumed, resumed
    with ocp.CheckpointManager(tmp_path / "drafter" / "checkpoints") as manager:
        assert manager.all_steps() == [2, 4]
        state = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(state) == {"params", "opt_state"} and set(state["params"]) == {"dspark"}
    from train.pretrain import restore_run

    target_model = restore_run([str(target)])[0]
    model = restore_run([str(drafter), longer])[0]
    assert np.array_equal(np.asarray(model.layers[1].attn.wkv[...]), np.asarray(target_model.layers[1].attn.wkv[...]))
