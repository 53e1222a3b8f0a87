"""Inference over the cache (spec §4): chunked prefill of any size and decoding equal the full forward pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from v4jax.config import ModelConfig
from v4jax.model import Transformer


def _model(**cfg):
    """The tiny model with weights scaled like a trained one (1/sqrt(fan_in)): attention, indexer top-k and
    routing all have real spread."""
    model = Transformer(ModelConfig.preset("tiny", compute_dtype="float32", **cfg), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var.ndim >= 2:
            var.set_value(jnp.asarray(rng.standard_normal(var.shape) / np.sqrt(var.shape[-1]), jnp.float32))
    return model


@functools.partial(nnx.jit, static_argnums=2)
def chunked_logits(model, ids, chunk):
    """Feed ids [b, T] through the cache `chunk` tokens at a time (the last chunk partly padding)."""
    b, T = ids.shape
    n = -(-T // chunk)
    chunks = jnp.pad(ids, ((0, 0), (0, n * chunk - T))).reshape(b, n, chunk).swapaxes(0, 1)
    n_valid = jnp.minimum(chunk, T - chunk * jnp.arange(n))

    def body(cache, inp):
        tokens, k = inp
        logits, _, cache = model.step(cache, tokens, jnp.full((b,), k))
        return cache, logits

    cache, logits = jax.lax.scan(body, model.init_cache(b, n * chunk), (chunks, n_valid))
    assert cache.layers[1].entries.shape[1] == n * chunk // 4
    return logits.swapaxes(0, 1).reshape(b, n * chunk, -1)[:, :T], cache.lengths


@pytest.fixture(scope="module")
def setup():
    model = _model()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, model.cfg.vocab_size, (1, 610)))
    return model, ids, np.asarray(nnx.jit(lambda m, i: m(i))(model, ids))


@pytest.mark.parametrize("chunk", [1, 3, 4, 127, 128, 129, 300])
def test_chunked_prefill_and_decode_equal_full_forward(setup, chunk):
    """610 tokens cross 152 CSA windows and 4 HCA windows; window 16 and top-k 8 are exceeded early."""
    model, ids, full = setup
    logits, lengths = chunked_logits(model, ids, chunk)
    assert int(lengths[0]) == 610
    err = rel_err(logits, full)
    assert err.max() < 1e-5, (err.max(), np.argmax(err))


def test_batched_prompts_of_different_lengths_equal_each_alone():
    """Two prompts (37 and 70 tokens) prefilled together (right padding, n_new per row) then decoded 5 steps
    give the same logits as each sequence run alone."""
    model = _model()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 1024, n) for n in (37, 70)]
    cont = rng.integers(0, 1024, (2, 5))
    step = nnx.jit(lambda m, c, t, n: m.step(c, t, n))

    def run(rows, batch_prompts):
        cache = model.init_cache(len(rows), 128)
        padded = np.zeros((len(rows), 70), np.int64)
        for i, p in enumerate(batch_prompts):
            padded[i, : len(p)] = p
        n = jnp.asarray([len(p) for p in batch_prompts])
        logits, _, cache = step(model, cache, jnp.asarray(padded), n)
        out = [np.asarray(logits)[i, len(p) - 1] for i, p in enumerate(batch_prompts)]
        outs = [out]
        for s in range(5):
            logits, _, cache = step(model, cache, jnp.asarray(cont[rows, s : s + 1]), jnp.ones(len(rows), jnp.int32))
            outs.append(list(np.asarray(logits)[:, 0]))
        return np.asarray(outs).swapaxes(0, 1)  # [rows, 6, vocab]

    together = run([0, 1], prompts)
    for i in (0, 1):
        alone = run([i], [prompts[i]])[0]
        assert rel_err(together[i], alone).max() < 1e-5


def test_mtp_over_its_cache_equals_full_mtp(setup):
    """The MTP block fed chunk by chunk through its window cache equals mtp_logits on the whole sequence."""
    model, ids, _ = setup
    ids = ids[:, :200]
    x = nnx.jit(lambda m, i: m.hidden(i))(model, ids)
    nxt = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
    full = np.asarray(nnx.jit(lambda m, x, t: m.mtp_logits(x, t))(model, x, nxt))
    cache = model.init_cache(1, 256)
    step = nnx.jit(lambda m, c, x, t: m.mtp_step(c, x, t))
    outs = []
    for s in range(0, 200, 50):
        logits, cache = step(model, cache, x[:, s:s + 50], nxt[:, s:s + 50])
        outs.append(np.asarray(logits))
    assert rel_err(np.concatenate(outs, 1), full).max() < 1e-5


# ---- qat=True: the quantization simulation is chaotic in fp32 ------------------------------------------------
# XLA:CPU's matmul result for one row depends on how many rows are multiplied together (measured: rows of an
# [n, 128] x [128, 512] product differ in the last bit for n = 3 or 49 against n = 256). Under qat a last-bit
# change flips an FP8 rounding now and then, and on random tiny weights a flip grows through the layers (the
# full forward pass over the first 128 tokens differs from the one over 256 tokens by ~50% at some positions).
# So with qat the cache path is checked where shapes agree (bit-exact) and block by block with teacher forcing.

def test_qat_prefill_in_one_chunk_is_bit_exact():
    """With the prompt in one chunk the cache path does the full pass's arithmetic: identical logits."""
    model = _model(qat=True)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 1024, (1, 256)))
    full = np.asarray(nnx.jit(lambda m, i: m(i))(model, ids))
    logits, _ = chunked_logits(model, ids, 256)
    assert rel_err(logits, full).max() < 1e-6


@functools.partial(nnx.jit, static_argnums=3)
def _block_chunked(block, x, ids, chunk):
    """One block fed its input streams x [1, T, hc, d] through its own cache, `chunk` tokens at a time."""
    T = x.shape[1]
    n = -(-T // chunk)
    split = lambda a: jnp.pad(a, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (a.ndim - 2)).reshape(  # noqa: E731
        1, n, chunk, *a.shape[2:]).swapaxes(0, 1)

    def body(carry, inp):
        cache, start = carry
        xc, tc, k = inp
        y, cache = block.step(xc, tc, cache, start, jnp.full((1,), k))
        return (cache, start + k), y

    cache = block.attn.init_cache(1, n * chunk, "fp32", "fp32")
    _, ys = jax.lax.scan(body, (cache, jnp.zeros((1,), jnp.int32)),
                         (split(x), split(ids), jnp.minimum(chunk, T - chunk * jnp.arange(n))))
    return ys.swapaxes(0, 1).reshape(1, n * chunk, *x.shape[2:])[:, :T]


def test_qat_decode_equals_full_block_by_block():
    """Teacher forcing: the window, CSA and HCA blocks (layers 0-2) get the full pass's input streams, run them
    through their caches one token at a time and in chunks of 129, and must give the full pass's output at >= 97%
    of positions within 1e-5 (the rest are FP8 rounding flips; the median agrees to ~1e-7). 300 tokens cross 75
    CSA and 2 HCA windows."""
    model = _model(qat=True)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 1024, (1, 300)))
    x = nnx.jit(lambda m, i: m.streams(i))(model, ids)
    call = nnx.jit(lambda b, x, i: b(x, i))
    for i, block in enumerate(model.layers[:3]):
        full = call(block, x, ids)
        for chunk in (1, 129):
            err = rel_err(np.asarray(_block_chunked(block, x, ids, chunk))[0], np.asarray(full)[0]).max(axis=-1)
            assert np.mean(err < 1e-5) >= 0.97 and np.median(err) < 1e-6, (i, chunk, np.mean(err < 1e-5))
        x = full
