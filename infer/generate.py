"""Generation over DeepSeek-V4's compressed KV cache (spec §4): prefill, decode, sampling, MTP speculation.

The cache is a pytree (v4jax.model.Cache) passed in and returned by jitted steps: `Transformer.step` feeds any
number of new tokens per sequence (a prefill chunk, or one token to decode) and is exact against the full
forward pass. Sequences of different lengths share a batch: each row advances by its own `n_new`.

MTP self-speculation (greedy): the MTP block drafts the token after next from the main model's last streams;
one main step over [next token, draft] verifies it. Accepted drafts give two tokens per main step; on a
rejection the step is redone for the one committed token from the cache before it (caches are immutable
pytrees, so keeping it costs no copy). Every committed token is the argmax of exact main-model logits, so the
output is token for token the greedy output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.model import Cache, Transformer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_tokens: tuple[int, ...] = ()
    seed: int = 0


def sample(logits: jax.Array, key: jax.Array, p: SamplingParams) -> jax.Array:
    """logits [b, vocab] -> tokens [b]: greedy at temperature 0, else temperature / top-k / top-p sampling."""
    if p.temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / p.temperature
    if p.top_k:
        kth = jax.lax.top_k(logits, p.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if p.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= p.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def _step_fn(model: Transformer, cache: Cache, tokens: jax.Array, n_new: jax.Array):
    return model.step(cache, tokens, n_new)


_step = nnx.jit(_step_fn, donate_argnums=1)  # the cache is updated in place
_step_keep = nnx.jit(_step_fn)  # speculation's verify step: the cache before it may still be needed


@functools.partial(nnx.jit, donate_argnums=1)
def _mtp_step(model: Transformer, cache: Cache, x: jax.Array, tokens: jax.Array, n_new: jax.Array):
    return model.mtp_step(cache, x, tokens, n_new)


def prefill(model: Transformer, prompts: list[list[int]], max_len: int, chunk: int | None = None,
            kv_format: str | None = None, index_format: str | None = None):
    """Feed the prompts (right-padded into one batch) `chunk` tokens at a time into a new cache (storage formats:
    Transformer.init_cache). -> (cache, logits of each prompt's last token [b, vocab], the final streams of every
    prompt position [b, P, hc, d])."""
    b, longest = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token (e.g. the BOS token)")
    if longest > max_len:
        raise ValueError(f"a prompt has {longest} tokens but the cache holds {max_len}: raise max_len")
    chunk = chunk or longest
    n_chunks = -(-longest // chunk)
    ids = np.zeros((b, n_chunks * chunk), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in prompts])
    cache = model.init_cache(b, max_len, kv_format, index_format)
    last = np.zeros((b, model.cfg.vocab_size), np.float32)
    xs = []
    for c in range(n_chunks):
        n_new = np.clip(lengths - c * chunk, 0, chunk)
        logits, x, cache = _step(model, cache, jnp.asarray(ids[:, c * chunk:(c + 1) * chunk]), jnp.asarray(n_new))
        xs.append(x)
        ends_here = (n_new > 0) & (lengths <= (c + 1) * chunk)
        last[ends_here] = np.asarray(logits)[ends_here, n_new[ends_here] - 1]
    return cache, jnp.asarray(last), jnp.concatenate(xs, axis=1)[:, :longest]


def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
             max_len: int | None = None, on_tokens: Callable[[np.ndarray], None] | None = None,
             kv_format: str | None = None, index_format: str | None = None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens (stopping a row at a stop token, which is kept).
    on_tokens(tokens [b]) is called after every decode step (streaming). -> the new tokens of each row."""
    max_len = max_len or max(len(p) for p in prompts) + params.max_new_tokens
    cache, logits, _ = prefill(model, prompts, max_len, kv_format=kv_format, index_format=index_format)
    key = jax.random.key(params.seed)
    b = len(prompts)
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for _ in range(params.max_new_tokens):
        key, sub = jax.random.split(key)
        tokens = np.asarray(sample(logits, sub, params))
        for i in np.flatnonzero(~done):
            out[i].append(int(tokens[i]))
        done |= np.isin(tokens, params.stop_tokens)
        if on_tokens is not None:
            on_tokens(tokens)
        if done.all():
            break
        logits, _, cache = _step(model, cache, jnp.asarray(tokens[:, None]), jnp.asarray((~done).astype(np.int32)))
        logits = logits[:, 0]
    return out


def generate_speculative(model: Transformer, prompt: list[int], max_new_tokens: int,
                         stop_tokens: tuple[int, ...] = (), max_len: int | None = None):
    """Greedy decoding of one prompt with MTP drafts. -> (new tokens, acceptance rate of the drafts)."""
    if model.mtp is None:
        raise ValueError("speculative decoding needs the MTP block: this config has n_mtp_layers = 0")
    max_len = max_len or len(prompt) + max_new_tokens + 2
    cache, logits, x = prefill(model, [prompt], max_len)
    one, two = jnp.ones(1, jnp.int32), jnp.full((1,), 2, jnp.int32)
    token = int(jnp.argmax(logits[0]))
    out = [token]
    # the MTP block catches up on the prompt: position i sees the streams at i and token i + 1
    if len(prompt) > 1:
        _, cache = _mtp_step(model, cache, x[:, :-1], jnp.asarray([prompt[1:]]), jnp.asarray([len(prompt) - 1]))
    pend_x, pend_t, n_pend = x[:, -1:], [token], 1  # MTP inputs not yet fed: streams and the token after each
    drafts = accepted = 0
    while len(out) < max_new_tokens and token not in stop_tokens:
        xs = jnp.concatenate([pend_x, jnp.zeros_like(pend_x)], axis=1)[:, :2]
        ts = jnp.asarray([(pend_t + [0])[:2]])
        mtp_logits, cache = _mtp_step(model, cache, xs, ts, jnp.asarray([n_pend]))
        draft = int(jnp.argmax(mtp_logits[0, n_pend - 1]))
        logits2, x2, verified = _step_keep(model, cache, jnp.asarray([[token, draft]]), two)
        truth = int(jnp.argmax(logits2[0, 0]))
        drafts += 1
        if truth == draft:
            accepted += 1
            token = int(jnp.argmax(logits2[0, 1]))
            out += [draft, token]
            cache, pend_x, pend_t, n_pend = verified, x2, [draft, token], 2
        else:
            _, x1, cache = _step(model, cache, jnp.asarray([[token, 0]]), one)  # commit only `token`
            token = truth
            out.append(token)
            pend_x, pend_t, n_pend = x1[:, :1], [token], 1
        if any(t in stop_tokens for t in out):
            out = out[: min(i for i, t in enumerate(out) if t in stop_tokens) + 1]
            break
    return out[:max_new_tokens], accepted / max(drafts, 1)
