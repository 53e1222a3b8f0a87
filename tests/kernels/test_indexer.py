"""kernels/indexer: visible ranges vs attention.visible_entries, the reference vs attention.py's chunk code,
the Pallas kernel (interpret mode) vs the reference, picked_scores, and lowering for CUDA and TPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import KERNEL_IMPL, export_for
from kernels.indexer import indexer_topk, pallas_kernel, picked_scores, prefix_ranges, reference, visible_ranges
from v4jax import attention


def _inputs(seed, b, s, h, d, n, integer, dtype=jnp.float32):
    """Index queries, weights, keys (numpy-drawn: no per-op compiles); small integers make every score exact
    (and ties common)."""
    rng = np.random.default_rng(seed)
    if integer:
        q, w, keys = (rng.integers(lo, 3, size=sh) for lo, sh in ((-2, (b, s, h, d)), (0, (b, s, h)), (-2, (b, n, d))))
    else:
        q, w, keys = (rng.standard_normal(sh) for sh in ((b, s, h, d), (b, s, h), (b, n, d)))
    return jnp.asarray(q, dtype), jnp.asarray(w, jnp.float32), jnp.asarray(keys, dtype)


def _ranges(seed, b, s, n, k):
    """[lo, hi) per query, cycling through: fewer than k visible, nothing visible, everything, random."""
    rng = np.random.default_rng(seed)
    lo, hi = np.zeros((b * s,), np.int32), np.zeros((b * s,), np.int32)
    for r in range(b * s):
        a, c = sorted(rng.integers(0, n + 1, size=2))
        lo[r], hi[r] = [(n // 3, n // 3 + k // 2), (3, 3), (0, n), (a, c)][r % 4]
    return jnp.asarray(lo.reshape(b, s)), jnp.asarray(hi.reshape(b, s))


@functools.partial(jax.jit, static_argnames=("k", "dtype", "implementation"))
def _topk(q, w, keys, lo, hi, k, dtype, implementation):
    return indexer_topk(q, w, keys, lo, hi, k, dtype, implementation=implementation)


def _segments(seed, b, T):
    """Packed rows: random document lengths (some shorter than the ratio, so some make no entry)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, T), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, T), size=rng.integers(0, 5), replace=False))
        seg[i] = np.searchsorted(cuts, np.arange(T), side="right")
    return jnp.asarray(seg)


@pytest.mark.parametrize("T,packed", [(37, True), (29, False)])
def test_visible_ranges_match_visible_entries(T, packed):
    b, ratio = 3, 4

    @jax.jit
    def masks(seg):
        lay = attention.token_layout(seg, b, T)
        ent = attention.entry_layout(lay, ratio)
        # every token, plus two padded queries (document -1, position 0) as _attend pads chunks
        pos = jnp.concatenate([lay.pos, jnp.zeros((b, 2), jnp.int32)], axis=1)
        doc = jnp.concatenate([lay.doc, jnp.full((b, 2), -1, jnp.int32)], axis=1)
        lo, hi = visible_ranges(pos, doc, ent.doc, ent.win, ratio)
        return attention.visible_entries(pos, doc, ent, ratio), reference.range_mask(lo, hi, ent.doc.shape[1])

    want, got = masks(_segments(T, b, T) if packed else None)
    np.testing.assert_array_equal(got, want)
    assert int(jnp.sum(want)) > 0


def test_prefix_ranges_match_step_visibility():
    """Attention.step's entry visibility, (j + 1) * m <= pos + 1 over its n cache slots, as ranges (padded
    queries have position 0)."""
    pos, n, m = jnp.array([[0, 3, 4, 7, 8, 40, 41]]), 10, 4
    lo, hi = prefix_ranges(pos, n, m)
    want = (jnp.arange(n) + 1) * m <= (pos + 1)[..., None]
    np.testing.assert_array_equal(reference.range_mask(lo, hi, n), want)


def test_reference_is_attention_chunk_code():
    """Bit-identical to what attention._attend's one_chunk computes today from the [b, s, n] mask (bf16)."""
    b, T, ratio, k = 2, 48, 4, 5
    q, w, keys = _inputs(2, b, T, 4, 32, T // ratio, integer=False, dtype=jnp.bfloat16)

    @jax.jit
    def both(seg):
        lay = attention.token_layout(seg, b, T)
        ent = attention.entry_layout(lay, ratio)
        visible = attention.visible_entries(lay.pos, lay.doc, ent, ratio)
        scores = jnp.where(visible, attention.index_scores(q, w, keys, jnp.bfloat16), -jnp.inf)
        top = jax.lax.top_k(scores, k)[1]
        want = jnp.where(jnp.take_along_axis(visible, top, axis=-1), top, -1)
        want_val = jnp.where(want >= 0, jnp.take_along_axis(scores, top, axis=-1), -jnp.inf)
        lo, hi = visible_ranges(lay.pos, lay.doc, ent.doc, ent.win, ratio)
        return (want, want_val), indexer_topk(q, w, keys, lo, hi, k, jnp.bfloat16, implementation="reference")

    (want, want_val), (idx, val) = both(_segments(1, b, T))
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(val, want_val)
    assert bool(jnp.any(want == -1)) and bool(jnp.any(want >= 0))  # both short and full rows occur


def _global_topk(q, w, keys, lo, hi, k, dtype):
    """The definition: lax.top_k over the whole [b, s, n] masked score matrix."""
    visible = reference.range_mask(lo, hi, keys.shape[1])
    val, top = jax.lax.top_k(jnp.where(visible, reference.index_scores(q, w, keys, dtype), -jnp.inf), k)
    ok = jnp.take_along_axis(visible, top, axis=-1)
    return jnp.where(ok, top, -1), jnp.where(ok, val, -jnp.inf)


def _stored(fmt, keys):
    """keys [b, n, d] written to an empty index-key buffer of format fmt (None: the array itself)."""
    from v4jax import kv_cache
    b, n, d = keys.shape
    if fmt is None:
        return keys
    return kv_cache.write(kv_cache.empty_index_keys(fmt, (b, n), d), keys, jnp.broadcast_to(jnp.arange(n), (b, n)))


@pytest.mark.parametrize("span", [1, 3, 8, 37, (16, 4, 1), (12, 5), (32, 8)])
def test_reference_spans_equal_the_global_topk_with_ties(span):
    """Scoring span by span (n = 37 not a multiple of 3 or 8: the last span is clamped to end at n), or in
    levels of spans (longest first), and merging gives the global top_k's picks, order (ties: lower slot
    first) and -1 fill exactly."""
    b, s, h, d, n, k = 2, 9, 3, 8, 37, 6
    q, w, keys = _inputs(11, b, s, h, d, n, integer=True)
    lo, hi = _ranges(12, b, s, n, k)
    got = jax.jit(functools.partial(reference.indexer_topk, k=k, dtype=jnp.float32, span=span))(q, w, keys, lo, hi)
    want = jax.jit(functools.partial(_global_topk, k=k, dtype=jnp.float32))(q, w, keys, lo, hi)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.sum(np.asarray(want[0]) >= 0) > b * s  # picks made


@pytest.mark.parametrize("fmt", [None, "fp4"])
def test_decode_shaped_queries_take_the_keys_as_the_left_operand(fmt):
    """Fewer query rows than key dims (a decode step's shape): the keys are the score dot's left operand, scored
    in levels of spans, from plain or FP4-stored keys. Picks, order (ties across spans) and scores equal the
    global top_k's (integer inputs: every score exact)."""
    from v4jax import kv_cache
    b, s, h, d, n, k = 2, 1, 2, 32, 37, 6
    q, w, keys = _inputs(15, b, s, h, d, n, integer=True)
    keys = keys.at[:, 20:36].set(keys[:, 1:17])  # repeated keys in other spans: ties
    assert reference.few_query_rows(q)
    lo, hi = _ranges(16, b, s, n, k)
    lo, hi = jnp.zeros_like(lo), jnp.full_like(hi, n)  # every slot visible: all three levels are merged
    stored = _stored(fmt, keys)
    got = jax.jit(functools.partial(reference.indexer_topk, k=k, dtype=jnp.float32, span=(16, 4, 1)))(
        q, w, stored, lo, hi)
    want = jax.jit(functools.partial(_global_topk, k=k, dtype=jnp.float32))(q, w, kv_cache.read(stored, jnp.float32)
                                                                            if fmt else keys, lo, hi)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert len(set(np.asarray(want[1]).ravel().tolist())) < want[1].size  # ties among the picks
    assert np.any(np.asarray(want[0]) >= 20)  # picks from the repeats too


@pytest.mark.parametrize("fmt", [None, "fp4"])
def test_one_score_row_in_fp32_gives_the_bf16_dot_scores(fmt):
    """One index head, one query (a decode step of the long-context demo): the reference scores it in fp32 (keys
    decoded straight to fp32); picks and scores equal the global top_k of the bf16 dot over the whole buffer."""
    from v4jax import kv_cache
    b, s, h, d, n, k = 4, 1, 1, 64, 300, 16  # rows: fewer than k visible, none, all, a random range
    q, w, keys = _inputs(17, b, s, h, d, n, integer=False, dtype=jnp.bfloat16)
    lo, hi = _ranges(18, b, s, n, k)
    stored = _stored(fmt, keys)
    got = jax.jit(functools.partial(reference.indexer_topk, k=k, dtype=jnp.bfloat16, span=(64, 16)))(
        q, w, stored, lo, hi)
    want = jax.jit(functools.partial(_global_topk, k=k, dtype=jnp.bfloat16))(q, w, kv_cache.read(stored, jnp.bfloat16),
                                                                             lo, hi)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.sum(np.asarray(want[0]) >= 0) > k  # picks made


def test_span_levels():
    """Hand-computed: SPAN * 4^j up to the slots, MAX_SPAN and the score budget; one span when n <= SPAN."""
    assert reference.span_levels(65568, 1) == (16384, 4096, 1024)  # MAX_SPAN
    assert reference.span_levels(1 << 20, 1) == (16384, 4096, 1024)
    assert reference.span_levels(20000, 1) == (16384, 4096, 1024)
    assert reference.span_levels(1 << 20, 256) == (16384, 4096, 1024)  # 2^22 / 256 = 16384
    assert reference.span_levels(1 << 20, 4096) == (1024,)
    assert reference.span_levels(500, 1) == (500,)
    assert reference.span_levels(4095, 1) == (1024,)


def test_only_spans_inside_the_ranges_are_scored():
    """A span that no query can see is never scored: every span at or past the last visible one scores +inf
    here, which would win every pick if it were merged."""
    b, s, n, span, k = 1, 4, 40, 4, 3
    lo = jnp.array([[0, 9, 9, 2]], jnp.int32)
    hi = jnp.array([[3, 9, 14, 11]], jnp.int32)  # spans 0 .. 3 intersect; 4 .. 9 do not

    def score_span(start, span, lo_rel, hi_rel):
        scores = jnp.broadcast_to(-(start + jnp.arange(span)).astype(jnp.float32), (b, s, span))
        scores = jnp.where(reference.range_mask(lo_rel, hi_rel, span), scores, -jnp.inf)
        return jnp.where(start >= 16, jnp.inf, scores)

    idx, val = jax.jit(lambda lo, hi: reference.running_topk(score_span, n, span, lo, hi, k))(lo, hi)
    np.testing.assert_array_equal(idx, [[[0, 1, 2], [-1, -1, -1], [9, 10, 11], [2, 3, 4]]])
    assert np.all(np.asarray(val) < np.inf)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_reference_reads_packed_keys_span_by_span(fmt):
    """Keys stored as v4jax.kv_cache's Fp4Keys / Fp8Keys: the picks and scores equal those over the decoded
    buffer (each span decoded as it is read)."""
    from v4jax import kv_cache
    b, s, h, d, n, k = 2, 5, 2, 32, 30, 4
    q, w, keys = _inputs(13, b, s, h, d, n, integer=False)
    lo, hi = _ranges(14, b, s, n, k)
    stored = _stored(fmt, keys)
    topk = functools.partial(reference.indexer_topk, k=k, dtype=jnp.float32, span=7)
    got = jax.jit(topk)(q, w, stored, lo, hi)
    want = jax.jit(topk)(q, w, kv_cache.read(stored, jnp.float32), lo, hi)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert float(jnp.max(jnp.abs(kv_cache.read(stored, jnp.float32) - keys))) > 0  # the format is lossy


# (b, s, heads, d, n, k), score dtype: decode with one head; prefill with n not a multiple of the blocks (nor
# of the merge span); k == n; many heads
CASES = [((1, 1, 1, 16, 21, 4), jnp.float32), ((2, 7, 4, 16, 37, 9), jnp.bfloat16),
         ((1, 5, 3, 8, 12, 12), jnp.float32), ((1, 3, 16, 32, 40, 6), jnp.bfloat16)]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_pallas_exact_with_ties(shape, dtype):
    """Integer inputs: every score is exact, so the picks, their order (ties: lower slot first) and the -1 fill
    must equal the reference's exactly."""
    b, s, h, d, n, k = shape
    q, w, keys = _inputs(sum(shape), b, s, h, d, n, integer=True)
    lo, hi = _ranges(n, b, s, n, k)
    got = _topk(q, w, keys, lo, hi, k, dtype, KERNEL_IMPL)
    want = _topk(q, w, keys, lo, hi, k, dtype, "reference")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # each row: min(visible, k) picks, then -1 (the rows with fewer than k or nothing visible included)
    count = np.sum(np.asarray(got[0]) >= 0, axis=-1)
    np.testing.assert_array_equal(count, np.minimum(np.asarray(hi - lo), k))
    assert np.all(np.sort(np.asarray(got[0]) >= 0, axis=-1)[..., ::-1] == (np.asarray(got[0]) >= 0))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_pallas_random(dtype, tol):
    """Random inputs: the kernel sums heads in another order than the einsum, so near-ties may swap; its picks
    must be visible, scored as the reference scores them, and as good as the reference's picks."""
    b, s, h, d, n, k = 2, 6, 4, 32, 45, 8
    q, w, keys = _inputs(3, b, s, h, d, n, integer=False, dtype=dtype)
    lo, hi = _ranges(4, b, s, n, k)
    idx, val = _topk(q, w, keys, lo, hi, k, dtype, KERNEL_IMPL)
    ref_idx, ref_val = _topk(q, w, keys, lo, hi, k, dtype, "reference")
    np.testing.assert_array_equal(idx >= 0, ref_idx >= 0)
    ok = np.asarray(idx >= 0)
    assert np.all((np.asarray(idx) >= np.asarray(lo)[..., None]) | ~ok)
    assert np.all((np.asarray(idx) < np.asarray(hi)[..., None]) | ~ok)
    full = reference.index_scores(q, w, keys, dtype)
    at_picks = np.take_along_axis(np.asarray(full), np.where(ok, idx, 0), axis=-1)
    scale = np.abs(np.asarray(ref_val)[ok]).max()
    np.testing.assert_allclose(np.asarray(val)[ok], at_picks[ok], rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(np.asarray(val)[ok], np.asarray(ref_val)[ok], rtol=tol, atol=tol * scale)


def test_no_gradient_through_the_kernel():
    """Training differentiates through the chunk loop: the kernel must pass (zero) gradients, not fail."""
    q, w, keys = _inputs(8, 1, 2, 2, 8, 10, integer=False)
    lo, hi = jnp.zeros((1, 2), jnp.int32), jnp.full((1, 2), 10, jnp.int32)
    loss = lambda q: jnp.sum(_topk(q, w, keys, lo, hi, 3, jnp.float32, KERNEL_IMPL)[1])  # noqa: E731
    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(q), 0.0)


def test_picked_scores_values_and_gradient():
    b, s, h, d, n, k = 2, 4, 3, 16, 20, 6
    q, w, keys = _inputs(5, b, s, h, d, n, integer=False)
    lo, hi = _ranges(6, b, s, n, k)
    idx, val = _topk(q, w, keys, lo, hi, k, jnp.float32, "reference")
    ok = idx >= 0
    picked = jax.jit(picked_scores, static_argnums=4)(q, w, keys, idx, jnp.float32)
    np.testing.assert_allclose(np.where(ok, picked, 0), np.where(ok, val, 0), rtol=1e-5, atol=1e-5)
    c = jnp.asarray(np.random.default_rng(7).standard_normal(idx.shape), jnp.float32)

    def via_picks(q, w, keys):
        return jnp.sum(jnp.where(ok, picked_scores(q, w, keys, idx, jnp.float32) * c, 0))

    def via_full(q, w, keys):  # what indexer_kl differentiates today: the full scores at the picks
        full = reference.index_scores(q, w, keys, jnp.float32)
        return jnp.sum(jnp.where(ok, jnp.take_along_axis(full, jnp.where(ok, idx, 0), axis=-1) * c, 0))

    grads = jax.jit(lambda *a: (jax.grad(via_picks, (0, 1, 2))(*a), jax.grad(via_full, (0, 1, 2))(*a)))
    for g1, g2 in zip(*grads(q, w, keys)):
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-5)
        assert float(jnp.max(jnp.abs(g2))) > 0


@pytest.mark.parametrize("target,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_device(target, platform):
    """The kernel with V4's indexer shapes (64 heads x 128, bf16) lowers for its device: a kernel that stops
    lowering fails here. (Lowering only: the Triton / Mosaic compile to machine code needs the device.)"""
    b, s, h, d, n, k = 1, 20, 64, 128, 1000, 64  # s spans several query blocks on both targets
    args = (jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, s, h), jnp.float32),
            jax.ShapeDtypeStruct((b, n, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, s), jnp.int32),
            jax.ShapeDtypeStruct((b, s), jnp.int32))
    f = lambda q, w, keys, lo, hi: pallas_kernel.indexer_topk(q, w, keys, lo, hi, k, jnp.bfloat16,  # noqa: E731
                                                              target=target)
    text = export_for(f, args, platform).mlir_module()
    assert ("xla.gpu.triton" if target == "gpu" else "tpu_custom_call") in text


def test_bad_input():
    q, w, keys = _inputs(0, 1, 2, 2, 8, 5, integer=True)
    lo = hi = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="min\\(index_topk, n\\)"):
        indexer_topk(q, w, keys, lo, hi, 6, jnp.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        indexer_topk(q, w[:, :1], keys, lo, hi, 2, jnp.float32)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="no compiled Pallas indexer"):
            indexer_topk(q, w, keys, lo, hi, 2, jnp.float32, implementation="pallas")
    with pytest.raises(ValueError, match="unknown"):
        indexer_topk(q, w, keys, lo, hi, 2, jnp.float32, implementation="triton")
