"""Muon (train/muon.py) against an independent numpy computation of architecture §6.1 and against optax.contrib.muon."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.muon import NS_COEFFS, MatrixSplit, assignment, describe_assignment, muon, path_str, v4_optimizer
from v4jax.config import ModelConfig
from v4jax.model import Transformer

LR, WD, MU = 0.02, 0.1, 0.95


def numpy_muon_steps(w, grads, blocks):
    """The spec's formula in float64 numpy, written out: per matrix (leading index, row block) M = mu M + G,
    X = (mu M + G) / ||.||_F, 8 + 2 HybridNS steps on X as given (no transposition), O = 0.18 sqrt(max) X,
    W <- W (1 - lr wd) - lr O."""
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    for g in grads:
        m = MU * m + g
        nest = MU * m + g
        out = np.zeros_like(w)
        start = 0
        for rows in blocks:
            for idx in np.ndindex(*w.shape[:-2]):
                x = nest[idx][start:start + rows]
                x = x / np.sqrt((x * x).sum())
                for a, b, c in [(3.4445, -4.7750, 2.0315)] * 8 + [(2, -1.5, 0.5)] * 2:
                    gram = x @ x.T
                    x = a * x + b * gram @ x + c * gram @ gram @ x
                out[idx][start:start + rows] = 0.18 * np.sqrt(max(x.shape)) * x
            start += rows
        w = w * (1 - LR * WD) - LR * out
    return w


CASES = {  # name: (shape, row blocks)
    "square": ((6, 6), (6,)),
    "tall": ((9, 4), (9,)),
    "wide": ((3, 11), (3,)),
    "experts": ((3, 8, 5), (8,)),  # a stacked-expert tensor: each expert its own matrix
    "wo_a": ((8, 12), (2, 2, 2, 2)),  # output groups: row blocks
    "hc_fn": ((24, 16), (4, 4, 16)),  # unequal blocks (mHC pre / post / res)
}


def test_muon_matches_numpy_spec_formula():
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in CASES.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, (s, _) in CASES.items()} for _ in range(3)]
    tx = muon(LR, lambda name, shape: MatrixSplit(CASES[name][1]), MU, 0.18, WD)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    step = jax.jit(tx.update)
    for g in grads:
        u, state = step(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
    for k, (shape, blocks) in CASES.items():
        ref = numpy_muon_steps(params[k], [g[k] for g in grads], blocks)
        moved = ref - params[k]
        err = np.abs(np.asarray(p[k]) - ref).max() / np.abs(moved).max()
        assert err < 1e-4, (k, err)
    # the split matters: orthogonalising wo_a as one matrix gives a different update
    whole = numpy_muon_steps(params["wo_a"], [grads[0]["wo_a"]], (8,))
    split = numpy_muon_steps(params["wo_a"], [grads[0]["wo_a"]], CASES["wo_a"][1])
    assert np.abs(whole - split).max() > 1e-3


def test_muon_matches_optax_contrib_muon_on_first_step():
    """Same NS coefficients (8 + 2 steps), consistent-RMS scale 0.18, weight decay 0.1, per-expert dimension
    numbers. They agree exactly on step 1 only: optax's momentum is a bias-corrected EMA, which from step 2
    weights the current gradient differently from the spec's mu M + G (Frobenius normalisation absorbs only a
    common factor)."""
    rng = np.random.default_rng(1)
    shapes = {"a": (7, 13), "b": (12, 5), "experts": (4, 6, 10)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()} for _ in range(2)]
    dims = {k: optax.contrib.MuonDimensionNumbers(reduction_axis=-1, output_axis=-2) for k in shapes}
    theirs = optax.contrib.muon(LR, ns_coeffs=NS_COEFFS, ns_steps=10, beta=MU, weight_decay=WD,
                                consistent_rms=0.18, muon_weight_dimension_numbers=dims, eps=1e-7)
    ours = muon(LR, lambda name, shape: MatrixSplit((shape[-2],)), MU, 0.18, WD)
    s_t, s_o = theirs.init(params), ours.init(params)
    rel = []
    for g in grads:
        u_t, s_t = theirs.update(g, s_t, params)
        u_o, s_o = ours.update(g, s_o, params)
        rel.append({k: float(jnp.abs(u_t[k] - u_o[k]).max() / jnp.abs(u_t[k]).max()) for k in shapes})
    assert max(rel[0].values()) < 1e-5, rel[0]
    assert max(rel[1].values()) > 1e-3, rel[1]  # the documented momentum difference is real


def test_tiny_model_parameter_assignment():
    """Print the rule's assignment for the tiny model and check the spec's partition on it."""
    cfg = ModelConfig.preset("tiny")
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    print("\n" + describe_assignment(params, cfg))
    a = assignment(params, cfg)
    shapes = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    adamw = {k for k, v in a.items() if v is None}
    assert {"embed", "head", "norm", "layers.0.attn_norm", "layers.0.hc_attn.base", "layers.0.hc_attn.scale",
            "layers.1.attn.attn_sink", "layers.1.attn.compressor.ape", "mtp.hc_head.scale"} <= adamw
    assert all(k.endswith(("norm", "base", "scale", "attn_sink", "ape")) for k in adamw - {"embed", "head"})
    assert a["layers.1.ffn.experts.w1"] == MatrixSplit((128,))  # [16, 128, 128]: 16 matrices
    assert a["layers.1.attn.wo_a"] == MatrixSplit((32,) * 4)
    assert a["layers.1.attn.compressor.wkv"] == MatrixSplit((128, 128))  # CSA: paired halves
    assert a["layers.1.attn.indexer.compressor.wgate"] == MatrixSplit((128, 128))
    assert a["layers.2.attn.compressor.wkv"] == MatrixSplit((128,))  # HCA: one matrix
    assert a["layers.0.hc_ffn.fn"] == MatrixSplit((4, 4, 16))
    assert a["hc_head.fn"] == MatrixSplit((4,))
    for k in ("layers.1.attn.wq_b", "layers.0.ffn.gate.weight", "mtp.e_proj", "layers.3.attn.indexer.weights_proj"):
        assert a[k] == MatrixSplit((shapes[k][-2],)), k


def test_v4_optimizer_steps_the_tiny_model():
    """The combined optimizer runs on the real parameter tree; a Muon update has RMS lr * 0.18 (+ the decay)."""
    cfg = ModelConfig.preset("tiny")
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tx = v4_optimizer(params, cfg, 1e-3)
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(u)}
    for name in ("layers.4.attn.wq_a", "layers.4.ffn.experts.w2"):
        rms = float(jnp.sqrt(jnp.mean(jnp.square(flat[name]))))
        assert 0.17e-3 < rms < 0.19e-3, (name, rms)
