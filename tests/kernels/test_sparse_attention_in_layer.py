"""The Pallas sparse attention kernels (GPU and TPU versions, interpret mode) inside a real V4 attention layer:
a CSA layer of the tiny config with the indexer loss on (the loss reads the kernel's lse); output, indexer KL
and gradients against the same layer on the jnp reference. v4jax.attention calls `sparse_attention` by name;
the test swaps it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import v4jax.attention as attention_mod
from conftest import KERNEL_IMPL
from kernels.sparse_attention import sparse_attention
from v4jax.config import ModelConfig


def run(impl, monkeypatch, cfg, x):
    """-> (layer output, indexer KL, grads of every parameter) with the layer's attention on `impl`."""
    def forced(*args, implementation=None, **kwargs):  # whatever cfg.kernels says, run `impl`
        return sparse_attention(*args, implementation=impl, **kwargs)

    monkeypatch.setattr(attention_mod, "sparse_attention", forced)
    attn = attention_mod.Attention(cfg, 1, rngs=nnx.Rngs(0))  # layer 1: CSA (ratio 4) with the indexer

    def loss(attn, x):
        y = attn(x)
        kl = nnx.pop(attn, nnx.Intermediate)["indexer_kl"][0]
        return jnp.sum(jnp.sin(y)) + kl, (y, kl)

    (_, (y, kl)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(attn, x)
    return y, kl, jax.tree.leaves(nnx.state(grads))


def test_csa_layer_with_pallas_kernels_matches_reference(monkeypatch):
    cfg = ModelConfig.preset("tiny", compute_dtype="float32", indexer_loss=True, attn_chunk=8)
    assert cfg.compress_ratios[1] == 4
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 11, cfg.dim)), jnp.float32)  # chunks of 8 and 3
    y_ref, kl_ref, grads_ref = run("reference", monkeypatch, cfg, x)
    assert float(kl_ref) > 0
    for impl in (KERNEL_IMPL, "pallas_interpret_tpu"):  # the GPU and the TPU kernels
        y, kl, grads = run(impl, monkeypatch, cfg, x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-5 * np.abs(y_ref).max())
        np.testing.assert_allclose(float(kl), float(kl_ref), rtol=1e-4)
        for g, r in zip(grads, grads_ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * (np.abs(r).max() + 1e-30))
