"""Generation over DeepSeek-V4's compressed KV cache (architecture §4): prefill, decode, sampling, MTP speculation.

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
import time
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

    def __post_init__(self):
        for name, ok, fix in (("temperature", self.temperature >= 0, "use 0 (greedy) or a positive value"),
                              ("top_k", self.top_k >= 0, "use 0 (no cut) or a positive count"),
                              ("top_p", 0 < self.top_p <= 1, "use a value in (0, 1]"),
                              ("max_new_tokens", self.max_new_tokens >= 1, "ask for at least one token")):
            if not ok:
                raise ValueError(f"SamplingParams.{name} is {getattr(self, name)!r}: {fix}")


def sample(logits: jax.Array, key: jax.Array, p: SamplingParams) -> jax.Array:
    """logits [b, vocab] -> tokens [b]: greedy at temperature 0, else temperature / top-k / top-p sampling."""
    if p.temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, sampling_logits(logits, p), axis=-1)


def sampling_logits(logits: jax.Array, p: SamplingParams) -> jax.Array:
    """The logits [..., vocab] of the distribution `sample` draws from at temperature > 0: scaled by the
    temperature, -inf outside the top-k and the top-p nucleus."""
    logits = logits.astype(jnp.float32) / p.temperature
    if p.top_k:
        kth = jax.lax.top_k(logits, p.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if p.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= p.top_p
        drop = jnp.put_along_axis(jnp.zeros_like(drop_sorted), order, drop_sorted, axis=-1, inplace=False)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


class Static:
    """A model's graph definition and state tree structure as one static jit argument that hashes once and compares
    by identity first: nnx's GraphDef hashes and compares its whole node tree on every call (measured on
    bench/decode.py's `small` model: 4.5 ms of dispatch per decode step, 1.2 ms with this)."""

    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, Static) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)

    def merge(self, leaves: list) -> Transformer:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def split(model: Transformer) -> tuple[Static, list]:
    """The model as every compiled call here takes it: (Static, the state's arrays as a flat list). A jax.jit of a
    pure function of these runs with no per-call traversal of the module (nnx.jit's cost, ~10 ms per call on a
    full model) and flattens only a list."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return Static(graphdef, treedef), leaves


def _step_fn(static: Static, leaves: list, cache: Cache, tokens: jax.Array, n_new: jax.Array, logits_at=None):
    return static.merge(leaves).step(cache, tokens, n_new, logits_at)


_step = jax.jit(_step_fn, static_argnums=0, donate_argnums=2)  # the cache is updated in place
_step_keep = jax.jit(_step_fn, static_argnums=0)  # speculation's verify step: the cache before it may still be needed
_sample = jax.jit(sample, static_argnums=2)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _mtp_step(static: Static, leaves: list, cache: Cache, x: jax.Array, tokens: jax.Array, n_new: jax.Array):
    return static.merge(leaves).mtp_step(cache, x, tokens, n_new)


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
    vocab = model.cfg.vocab_size
    bad = sorted({int(t) for p in prompts for t in p if not 0 <= int(t) < vocab})
    if bad:
        raise ValueError(f"prompt token ids {bad[:8]} are outside the model's vocabulary [0, {vocab}): check that the "
                         "tokenizer is the model's")
    chunk = chunk or longest
    n_chunks = -(-longest // chunk)
    ids = np.zeros((b, n_chunks * chunk), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in prompts])
    cache = model.init_cache(b, max_len, kv_format, index_format)
    static, leaves = split(model)
    last = np.zeros((b, model.cfg.vocab_size), np.float32)
    xs = []
    for c in range(n_chunks):
        n_new = np.clip(lengths - c * chunk, 0, chunk)
        logits, x, cache = _step(static, leaves, cache, jnp.asarray(ids[:, c * chunk:(c + 1) * chunk]),
                                 jnp.asarray(n_new), jnp.asarray(np.maximum(n_new - 1, 0)))  # last logits only
        xs.append(x)
        ends_here = (n_new > 0) & (lengths <= (c + 1) * chunk)
        last[ends_here] = np.asarray(logits)[ends_here, 0]
    return cache, jnp.asarray(last), jnp.concatenate(xs, axis=1)[:, :longest]


def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
             max_len: int | None = None, on_tokens: Callable[[np.ndarray], None] | None = None,
             kv_format: str | None = None, index_format: str | None = None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens (stopping a row at a stop token, which is kept).
    Without on_tokens the whole decode is one compiled on-device loop (_decode_loop); with it (streaming), a
    Python loop calls on_tokens(tokens [b]) after every token. Both draw the same tokens (same key sequence).
    -> the new tokens of each row."""
    max_len = max_len or max(len(p) for p in prompts) + params.max_new_tokens
    cache, logits, _ = prefill(model, prompts, max_len, kv_format=kv_format, index_format=index_format)
    static, leaves = split(model)
    key = jax.random.key(params.seed)
    rule = dataclasses.replace(params, seed=0)  # the compiled functions' static part: a new seed compiles nothing
    if on_tokens is None:
        tokens, n = map(np.asarray, _decode_loop(static, leaves, cache, logits, key, rule))
        return [row[:k].tolist() for row, k in zip(tokens, n)]
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for n in range(1, params.max_new_tokens + 1):
        key, sub = jax.random.split(key)
        tokens = np.asarray(_sample(logits, sub, rule))
        for i in np.flatnonzero(~done):
            out[i].append(int(tokens[i]))
        done |= np.isin(tokens, params.stop_tokens)
        on_tokens(tokens)
        if done.all() or n == params.max_new_tokens:
            return out
        logits, _, cache = _step(static, leaves, cache, jnp.asarray(tokens[:, None]),
                                 jnp.asarray((~done).astype(np.int32)))
        logits = logits[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=2)
def _decode_loop(static: Static, leaves: list, cache: Cache, logits: jax.Array, key: jax.Array, p: SamplingParams):
    """generate's decode as one lax.while_loop from the prompts' last logits [b, vocab]: sample, stop a row at a
    stop token or max_new_tokens, step the rows still going. -> (tokens [b, max_new_tokens], count per row [b])."""
    model = static.merge(leaves)
    stops = jnp.asarray(p.stop_tokens or (-1,), jnp.int32)

    def draw(carry, logits):
        i, cache, done, out, key = carry
        key, sub = jax.random.split(key)
        tokens = sample(logits, sub, p).astype(jnp.int32)
        out = out.at[:, i].set(jnp.where(done, 0, tokens))
        return i + 1, cache, done | jnp.isin(tokens, stops), out, key

    def body(carry):
        i, cache, done, out, key = carry
        logits, _, cache = model.step(cache, out[:, i - 1][:, None], (~done).astype(jnp.int32))
        return draw((i, cache, done, out, key), logits[:, 0])

    b = logits.shape[0]
    start = (jnp.int32(0), cache, jnp.zeros(b, bool), jnp.zeros((b, p.max_new_tokens), jnp.int32), key)
    i, _, _, out, _ = jax.lax.while_loop(lambda c: (c[0] < p.max_new_tokens) & ~jnp.all(c[2]), body,
                                         draw(start, logits))
    hit = jnp.isin(out, stops) & (jnp.arange(p.max_new_tokens) < i)
    return out, jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1) + 1, i)


def generate_speculative(model: Transformer, prompt: list[int], max_new_tokens: int,
                         stop_tokens: tuple[int, ...] = (), max_len: int | None = None):
    """Greedy decoding of one prompt with MTP drafts. -> (new tokens, acceptance rate of the drafts)."""
    if model.mtp is None:
        raise ValueError("MTP speculation needs the preview's MTP block: this model has none (n_mtp_layers = 0, or a "
                         "GA checkpoint whose mtp.* stages are a DSpark drafter: use generate_dspark)")
    max_len = max_len or len(prompt) + max_new_tokens + 2
    cache, logits, x = prefill(model, [prompt], max_len)
    static, leaves = split(model)
    one, two = jnp.ones(1, jnp.int32), jnp.full((1,), 2, jnp.int32)
    token = int(jnp.argmax(logits[0]))
    out = [token]
    # the MTP block catches up on the prompt: position i sees the streams at i and token i + 1
    if len(prompt) > 1:
        _, cache = _mtp_step(static, leaves, cache, x[:, :-1], jnp.asarray([prompt[1:]]),
                             jnp.asarray([len(prompt) - 1]))
    pend_x, pend_t, n_pend = x[:, -1:], [token], 1  # MTP inputs not yet fed: streams and the token after each
    drafts = accepted = 0
    while len(out) < max_new_tokens and token not in stop_tokens:
        xs = jnp.concatenate([pend_x, jnp.zeros_like(pend_x)], axis=1)[:, :2]
        ts = jnp.asarray([(pend_t + [0])[:2]])
        mtp_logits, cache = _mtp_step(static, leaves, cache, xs, ts, jnp.asarray([n_pend]))
        draft = int(jnp.argmax(mtp_logits[0, n_pend - 1]))
        logits2, x2, verified = _step_keep(static, leaves, cache, jnp.asarray([[token, draft]]), two)
        truth = int(jnp.argmax(logits2[0, 0]))
        drafts += 1
        if truth == draft:
            accepted += 1
            token = int(jnp.argmax(logits2[0, 1]))
            out += [draft, token]
            cache, pend_x, pend_t, n_pend = verified, x2, [draft, token], 2
        else:
            _, x1, cache = _step(static, leaves, cache, jnp.asarray([[token, 0]]), one)  # commit only `token`
            token = truth
            out.append(token)
            pend_x, pend_t, n_pend = x1[:, :1], [token], 1
        if any(t in stop_tokens for t in out):
            out = out[: min(i for i, t in enumerate(out) if t in stop_tokens) + 1]
            break
    return out[:max_new_tokens], accepted / max(drafts, 1)


# ---- DSpark speculative decoding (GA checkpoints) -------------------------------------------------------------
def speculative_accept(target_logits: jax.Array, draft_logits: jax.Array, drafts: jax.Array, n_draft: jax.Array,
                       p: SamplingParams, key: jax.Array):
    """The standard speculative acceptance rule, per row, for drafts [b, k] proposed by draft_logits [b, k, vocab]
    (slot i's token drawn from softmax(draft_logits_i / T)) and checked by target_logits [b, k + 1, vocab]
    (position i scores the token after i accepted drafts); only the first n_draft [b] drafts count.

    Greedy (T = 0): accept while the draft equals the target's argmax, then take the target's argmax.
    Sampling: accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from
    normalize(max(p_i - q_i, 0)); after n_draft acceptances draw a bonus token from p. p is the target's sampling
    distribution (temperature, top-k, top-p), q the draft's: every emitted token is distributed as the target's.
    -> (accepted drafts [b], the next token [b])."""
    b, k = drafts.shape
    rows = jnp.arange(b)
    if p.temperature == 0:
        ok = drafts == jnp.argmax(target_logits[:, :k], axis=-1)
    else:
        k_u, k_next = jax.random.split(key)
        probs = jax.nn.softmax(sampling_logits(target_logits, p), axis=-1)
        q = jax.nn.softmax(draft_logits.astype(jnp.float32) / p.temperature, axis=-1)
        p_d = jnp.take_along_axis(probs[:, :k], drafts[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        ok = jax.random.uniform(k_u, (b, k)) * q_d < p_d  # u < p / q, without dividing by a tiny q
    ok &= jnp.arange(k)[None] < n_draft[:, None]
    accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    if p.temperature == 0:
        return accepted, jnp.argmax(target_logits[rows, accepted], axis=-1).astype(jnp.int32)
    p_a = probs[rows, accepted]
    q_a = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)[rows, accepted]  # zero after the last draft
    rest = jnp.where((accepted < n_draft)[:, None], jnp.maximum(p_a - q_a, 0.0), p_a)
    rest = jnp.where(jnp.sum(rest, -1, keepdims=True) > 0, rest, p_a)  # p == q: a rejection has probability 0
    return accepted, jax.random.categorical(k_next, jnp.log(rest), axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class SpeculationStats:
    """Counts over the decode loop, per row: row_rounds (verify passes, summed over rows), drafted / accepted
    (draft tokens verified / accepted), emitted (tokens the rounds emitted: accepted + the target's own, clipped
    at max_new_tokens and stop tokens); rounds (batched verify passes) and seconds (decode loop wall time,
    prefill and the first token excluded)."""

    row_rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    rounds: int = 0
    seconds: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per row and verify pass."""
        return self.accepted / max(self.row_rounds, 1)

    @property
    def tokens_per_pass(self) -> float:
        """Tokens emitted per row and target pass (about mean_accepted + 1): the speed-up over plain decoding at
        equal pass cost."""
        return self.emitted / max(self.row_rounds, 1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(2,))
def _dspark_round(static: Static, leaves: list, cache: Cache, anchor, active, p: SamplingParams,
                  confidence: float | None, key):
    """One speculative round, jitted as a pure function of the model state: draft a block after the cache,
    verify [anchor, drafts] with the target, accept per row, commit the anchor and the accepted drafts.
    -> (cache, drafts [b, B], drafts verified [b], accepted [b], the next anchor [b])."""
    model = static.merge(leaves)
    k_draft, k_accept = jax.random.split(key)
    drafts, draft_logits, conf = model.draft(cache, anchor, p.temperature, k_draft)
    n_draft = jnp.full(anchor.shape, drafts.shape[1], jnp.int32)
    if confidence is not None:  # truncate at the first slot the drafter itself doubts (lossless: fewer checks)
        n_draft = jnp.sum(jnp.cumprod(jax.nn.sigmoid(conf) >= confidence, axis=1), axis=1).astype(jnp.int32)
    n_draft = jnp.where(active, n_draft, 0)
    chunk = jnp.concatenate([anchor[:, None], drafts], axis=1)
    logits, pending = model.verify(cache, chunk, jnp.where(active, 1 + n_draft, 0))
    accepted, nxt = speculative_accept(logits, draft_logits, drafts, n_draft, p, k_accept)
    cache = model.commit(cache, pending, jnp.where(active, accepted + 1, 0))
    return cache, drafts, n_draft, accepted, nxt


def generate_dspark(model: Transformer, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
                    max_len: int | None = None, confidence: float | None = None,
                    on_tokens: Callable[[list[list[int]]], None] | None = None,
                    kv_format: str | None = None, index_format: str | None = None):
    """Continue each prompt with DSpark speculation (GA checkpoints): per round the drafter proposes a block of
    dspark_block_size tokens, one target pass over [anchor, drafts] verifies them and every row keeps its own
    accepted prefix (speculative_accept: greedy output equals plain greedy decoding; sampled output is
    distributed as the target's). confidence (0..1) truncates each row's block at its first slot whose
    sigmoid(confidence logit) is below it. on_tokens(new tokens of each row) is called after every round.
    -> (new tokens of each row, SpeculationStats)."""
    if model.dspark is None:
        raise ValueError("DSpark decoding needs a GA checkpoint's drafter (dspark_* config fields); "
                         "for the preview's MTP block use generate_speculative")
    if params.temperature < 0 or confidence is not None and not 0.0 <= confidence <= 1.0:
        raise ValueError(f"temperature {params.temperature} / confidence {confidence}: use temperature >= 0 and "
                         "a confidence threshold in [0, 1]")
    B = model.cfg.dspark_block_size
    need = max(len(p) for p in prompts) + params.max_new_tokens + B + 1  # a verify chunk may reach past the end
    if max_len is not None and max_len < need:
        raise ValueError(f"max_len {max_len} is too small for DSpark decoding: the longest prompt plus "
                         f"max_new_tokens plus a verify chunk of {B + 1} needs {need}; raise max_len or leave it None")
    max_len = max_len or need
    cache, logits, _ = prefill(model, prompts, max_len, kv_format=kv_format, index_format=index_format)
    key = jax.random.key(params.seed)
    key, sub = jax.random.split(key)
    anchor = np.asarray(sample(logits, sub, params)).astype(np.int32)
    b = len(prompts)
    out: list[list[int]] = [[int(t)] for t in anchor]
    done = np.array([_finished(o, params) for o in out])
    if on_tokens is not None:
        on_tokens([list(o) for o in out])
    static, leaves = split(model)
    rule = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)  # the round's part
    stats = SpeculationStats()
    start = time.perf_counter()
    while not done.all():
        key, sub = jax.random.split(key)
        cache, drafts, n_draft, accepted, nxt = _dspark_round(static, leaves, cache, jnp.asarray(anchor),
                                                              jnp.asarray(~done), rule, confidence, sub)
        drafts, n_draft, accepted, nxt = map(np.asarray, (drafts, n_draft, accepted, nxt))
        new: list[list[int]] = [[] for _ in range(b)]
        for i in np.flatnonzero(~done):
            new[i] = [int(t) for t in drafts[i, : accepted[i]]] + [int(nxt[i])]
            new[i] = _clip(out[i], new[i], params)
            out[i] += new[i]
            done[i] = _finished(out[i], params)
            stats.row_rounds += 1
            stats.drafted += int(n_draft[i])
            stats.accepted += int(accepted[i])
            stats.emitted += len(new[i])
        stats.rounds += 1
        anchor = nxt
        if on_tokens is not None:
            on_tokens(new)
    stats.seconds = time.perf_counter() - start
    return out, stats


def _clip(before: list[int], new: list[int], p: SamplingParams) -> list[int]:
    """The part of `new` that follows `before` up to max_new_tokens and the first stop token (kept)."""
    new = new[: p.max_new_tokens - len(before)]
    stops = [j for j, t in enumerate(new) if t in p.stop_tokens]
    return new[: stops[0] + 1] if stops else new


def _finished(out: list[int], p: SamplingParams) -> bool:
    return len(out) >= p.max_new_tokens or bool(out) and out[-1] in p.stop_tokens
