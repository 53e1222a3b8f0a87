"""DSpark speculative decoding (GA checkpoints): a verified chunk committed for any accepted prefix leaves the cache
of a direct prefill of exactly that prefix; greedy DSpark decoding equals plain greedy decoding, rows accepting
different lengths; the sampling acceptance rule emits tokens distributed as the target's (a chi-square test that
rejects a wrong draft distribution)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.tree_util import keystr, tree_flatten_with_path
from scipy import stats

from infer.generate import SamplingParams, generate, generate_dspark, sampling_logits, speculative_accept
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.numerics import batch_invariant


@pytest.fixture(scope="module", autouse=True)
def _free_memory():
    """This module compiles many programs and holds big batches: give the memory back to the worker's next tests."""
    yield
    _model.cache_clear()
    jax.clear_caches()


@functools.lru_cache(maxsize=None)
def _model(**overrides) -> Transformer:
    return Transformer(ModelConfig.preset("tiny-dspark", compute_dtype="float32", **overrides), rngs=nnx.Rngs(0))


def _assert_caches_equal(got, want):
    """Every leaf of two caches bit for bit (the empty compressor slots are -inf in both)."""
    flat_got, flat_want = tree_flatten_with_path(got)[0], tree_flatten_with_path(want)[0]
    assert [keystr(p) for p, _ in flat_got] == [keystr(p) for p, _ in flat_want]
    for (path, a), (_, b) in zip(flat_got, flat_want):
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(a, b), (keystr(path), np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _ids(shape, seed):
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int32)


@pytest.mark.parametrize("formats", [(None, None), ("fp8", "fp4")])
def test_commit_equals_a_step_over_the_accepted_prefix(formats):
    """verify([anchor, drafts]) then commit(n) == step over the same chunk with n_new = n, for every n, row by
    row, in every storage format (window ring past its wrap, CSA / HCA windows completed inside the chunk)."""
    model = _model()
    P, C = 126, 5
    ids = _ids((2, P + C), 1)
    cache = model.init_cache(2, 256, *formats)
    _, _, cache = model.step(cache, jnp.asarray(ids[:, :P]), jnp.asarray([P, P - 9]))
    chunk = jnp.asarray(ids[:, P:])
    logits, pending = model.verify(cache, chunk)
    full_logits, _, _ = model.step(cache, chunk)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(full_logits))
    for n in ([0, 5], [1, 3], [3, 1], [4, 2], [5, 0]):
        n = jnp.asarray(n)
        _assert_caches_equal(model.commit(cache, pending, n), model.step(cache, chunk, n)[2])


def test_verify_then_rollback_equals_a_direct_prefill():
    """After accepting j of the chunk's tokens, a row's cache equals (bit for bit, fp32, qat off, batch-invariant
    arithmetic) the cache of prefilling the prompt and exactly those j tokens from scratch in one pass: window
    ring, compressor partial windows, compressed entries, indexer keys, the drafter's rings."""
    model = _model()
    lengths, C = (125, 60), 5
    ids = _ids((2, 125 + C), 2)
    accepted = np.asarray([4, 2])  # row 0 crosses position 128 (an HCA window ends), row 1 a CSA window
    with batch_invariant():
        cache = model.init_cache(2, 256)
        _, _, cache = model.step(cache, jnp.asarray(ids[:, :125]), jnp.asarray(lengths))
        chunk = np.stack([ids[i, n:n + C] for i, n in enumerate(lengths)])
        _, pending = model.verify(cache, jnp.asarray(chunk))
        committed = model.commit(cache, pending, jnp.asarray(accepted))
        rows = [np.concatenate([ids[i, :n], chunk[i, :a]]) for i, (n, a) in enumerate(zip(lengths, accepted))]
        direct = np.zeros((2, max(map(len, rows))), np.int32)
        for i, r in enumerate(rows):
            direct[i, :len(r)] = r
        _, _, want = model.step(model.init_cache(2, 256), jnp.asarray(direct), jnp.asarray([len(r) for r in rows]))
    _assert_caches_equal(committed, want)


def _bigram_drafter(model: Transformer, texts: list[list[int]], strength: float = 60.0) -> Transformer:
    """The model with its Markov head replaced by the bigrams of `texts` (rank = vocab: markov_w1 one-hot,
    markov_w2[s, t] = strength for each bigram t -> s seen, the last one seen winning): a drafter that often, not
    always, guesses the target's greedy path."""
    vocab = model.cfg.vocab_size
    drafter = Transformer(model.cfg.replace(dspark_markov_rank=vocab), rngs=nnx.Rngs(1))
    state = nnx.state(model)
    markov = drafter.dspark.stages[-1].markov_head
    w2 = np.zeros((vocab, vocab), np.float32)
    for t in texts:
        for a, b in zip(t[:-1], t[1:]):
            w2[:, a] = 0.0
            w2[b, a] = strength
    flat = {k: v for k, v in nnx.to_flat_state(state)
            if "markov_head" not in k and "confidence_head" not in k}
    nnx.update(drafter, nnx.from_flat_state(flat))
    markov.markov_w1.set_value(jnp.eye(vocab, dtype=jnp.float32))
    markov.markov_w2.set_value(jnp.asarray(w2))
    return drafter


def test_greedy_dspark_equals_greedy_decoding():
    """>= 256 new tokens on three prompts of different lengths in one batch, with a drafter that knows some of the
    target's bigrams: outputs identical to plain greedy decoding, many drafts accepted, and rows accepting
    different numbers of drafts in the same round."""
    prompts = [list(_ids(n, 10 + n)) for n in (7, 20, 33)]
    params = SamplingParams(max_new_tokens=256)
    greedy = generate(_model(), prompts, params)
    model = _bigram_drafter(_model(), greedy)  # the same target: its output below is the plain model's greedy
    rounds = []
    out, st = generate_dspark(model, prompts, params, on_tokens=lambda new: rounds.append([len(r) for r in new]))
    assert out == greedy
    assert st.accepted > 0.2 * st.drafted and st.mean_accepted > 1.0, st
    assert any(len(set(r)) > 1 for r in rounds[1:] if all(r)), "rows never accepted different lengths"
    # a drafter that is mostly wrong, with confidence truncation on: still the greedy output
    out, st = generate_dspark(_model(), prompts, SamplingParams(max_new_tokens=24), confidence=0.5)
    assert out == [g[:24] for g in greedy] and st.drafted < 4 * st.row_rounds


def _chain_samples(P, Q, params: SamplingParams, n_rows: int, n_tokens: int, seed: int, wrong_q: bool = False):
    """Emit n_tokens per row by speculative rounds over a toy target: next-token distribution P[prev] (vocab V),
    drafts from the chain Q, 3 per round (n_rows rows at once). wrong_q: verify against a draft distribution
    other than the one the drafts were drawn from (the bug of forgetting the Markov correction)."""
    V, k = P.shape[0], 3
    key = jax.random.key(seed)
    logP, logQ = jnp.log(jnp.asarray(P)), jnp.log(jnp.asarray(Q))
    key, sub = jax.random.split(key)
    first = jax.random.categorical(sub, jnp.broadcast_to(sampling_logits(logP[0], params), (n_rows, V)), axis=-1)
    out = [[int(t)] for t in np.asarray(first)]
    anchor = first
    while min(map(len, out)) < n_tokens:
        key, k_draft, k_acc = jax.random.split(key, 3)
        prev, drafts, draft_logits = anchor, [], []
        for kk in jax.random.split(k_draft, k):  # the drafter: d_i ~ softmax(log Q[d_{i-1}] / T)
            lq = logQ[prev]
            d = jax.random.categorical(kk, lq / params.temperature, axis=-1)
            drafts.append(d)
            draft_logits.append(jnp.zeros_like(lq) if wrong_q else lq)
            prev = d
        drafts = jnp.stack(drafts, 1)
        chunk = jnp.concatenate([anchor[:, None], drafts], axis=1)
        acc, nxt = speculative_accept(logP[chunk], jnp.stack(draft_logits, 1), drafts,
                                      jnp.full((n_rows,), k, jnp.int32), params, k_acc)
        acc, nxt, d_np = np.asarray(acc), np.asarray(nxt), np.asarray(drafts)
        for i in range(n_rows):
            out[i] += list(d_np[i, :acc[i]]) + [int(nxt[i])]
        anchor = jnp.asarray(nxt)
    return np.asarray([o[:n_tokens] for o in out])


def _chi_square_p(samples: np.ndarray, P: np.ndarray, params: SamplingParams) -> float:
    """p-value of the sampled sequences' joint counts against the target's exact sequence probabilities
    (the chain P processed by the sampling parameters), cells with expected count < 5 pooled."""
    Pt = np.asarray(jax.nn.softmax(sampling_logits(jnp.log(jnp.asarray(P)), params), axis=-1), np.float64)
    V, n = P.shape[0], samples.shape[1]
    cells = np.ravel_multi_index(samples.T, (V,) * n)
    observed = np.bincount(cells, minlength=V**n)
    seqs = np.stack(np.unravel_index(np.arange(V**n), (V,) * n), axis=1)
    prob = Pt[0, seqs[:, 0]] * np.prod([Pt[seqs[:, i - 1], seqs[:, i]] for i in range(1, n)], axis=0)
    expected = prob * len(samples)
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    assert obs[~keep].sum() == 0, "a sequence the target cannot produce was emitted"
    exp = exp[keep] * obs.sum() / exp[keep].sum()  # the target's probabilities are fp32: renormalise
    return stats.chisquare(obs[keep], exp).pvalue


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=3)])
def test_speculative_sampling_emits_the_target_distribution(params):
    rng = np.random.default_rng(0)
    V = 4
    P = np.asarray(jax.nn.softmax(rng.normal(0, 1.5, (V, V)), axis=-1), np.float64)
    Q = np.asarray(jax.nn.softmax(rng.normal(0, 1.5, (V, V)), axis=-1), np.float64)
    samples = _chain_samples(P, Q, params, 40_000, 4, seed=1)
    assert _chi_square_p(samples, P, params) > 1e-3
    # the same test catches a wrong rule: verifying against a draft distribution the drafts were not drawn from
    broken = _chain_samples(P, Q, params, 40_000, 4, seed=1, wrong_q=True)
    assert _chi_square_p(broken, P, params) < 1e-6


def test_sampled_dspark_generation_has_the_target_distribution():
    """End to end on a model with a 4-token vocabulary: 1,500 rows of one prompt sampled through
    generate_dspark (drafts sampled from the Markov-corrected drafter, verified by the target, per-row commits);
    the first three tokens' joint counts against the target's exact sequence probabilities (chi-square)."""
    V = 4
    model = Transformer(ModelConfig.preset("tiny-dspark", compute_dtype="float32", vocab_size=V,
                                           dspark_noise_token_id=V - 1), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # peaked, different target and draft distributions: a larger head, O(1) Markov and drafter mixing weights
    model.head.set_value(model.head[...] * 60.0)
    for path, var in nnx.to_flat_state(nnx.state(model.dspark)):
        if any(k in ".".join(map(str, path)) for k in ("markov", "hc_head", "main_proj")):
            var.set_value(jnp.asarray(rng.normal(0, var.shape[-1] ** -0.5, var.shape), jnp.float32))
    prompt = [3, 1, 2, 1, 0, 2, 1]
    params = SamplingParams(temperature=1.0, max_new_tokens=3, seed=4)
    out, st = generate_dspark(model, [prompt] * 1_500, params)
    samples = np.asarray(out)
    assert 0.1 * st.drafted < st.accepted < 0.9 * st.drafted, st  # both acceptances and rejections happen
    # exact: p(x1 | prompt) p(x2 | .., x1) p(x3 | .., x1, x2) from one forward over every 2-token continuation
    seqs = np.stack(np.unravel_index(np.arange(V * V), (V, V)), axis=1)
    logits = model(jnp.asarray([prompt + list(s) for s in seqs]))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    P = len(prompt)
    joint = np.exp(logp[0, P - 1, seqs[:, 0]] + logp[np.arange(V * V), P, seqs[:, 1]])  # p(x1, x2) [V*V]
    prob = (joint[:, None] * np.exp(logp[:, P + 1, :])).reshape(-1)  # p(x1, x2, x3) [V**3]
    cells = np.ravel_multi_index(samples.T, (V,) * 3)
    observed = np.bincount(cells, minlength=V**3)
    expected = prob * len(samples)
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
