"""kernels/indexer/cpu_kernel: the compiled CPU indexer (scores and top-k read straight from the stored key format)
against the definition (lax.top_k over every masked score of the decoded keys), when `indexer_topk` runs it, and its
build errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu_ffi
from test_indexer import _ranges
from kernels.indexer import cpu_kernel, indexer_topk, reference
from v4jax import kv_cache
from v4jax.numerics import batch_invariant

pytestmark = pytest.mark.skipif(cpu_ffi.unsupported_cpu() is not None,
                                reason=f"no CPU kernels here: {cpu_ffi.unsupported_cpu()}")
FORMATS = ["fp32", "bf16", "fp8", "fp4"]


def _inputs(seed, b, s, h, d, n, integer):
    """Integers in [-2, 2] (weights in [-2, 2]: negative weights give -0 scores) make every score exact in any
    order of additions and stored exactly in every format; normal draws otherwise."""
    rng = np.random.default_rng(seed)
    shapes = ((b, s, h, d), (b, s, h), (b, n, d))
    if integer:
        q, w, keys = (rng.integers(-2, 3, size=sh) for sh in shapes)
    else:
        q, w, keys = (rng.standard_normal(sh) for sh in shapes)
    return (jnp.asarray(a, jnp.float32) for a in (q, w, keys))


def _stored(fmt, keys):
    b, n, d = keys.shape
    return kv_cache.write(kv_cache.empty_index_keys(fmt, (b, n), d), keys, jnp.broadcast_to(jnp.arange(n), (b, n)))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _kernel(q, w, keys, lo, hi, k, dtype):
    return cpu_kernel.indexer_topk(q, w, keys, lo, hi, k, dtype)


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _definition(q, w, keys, lo, hi, k, dtype):
    """lax.top_k over the whole [b, s, n] masked score matrix of the decoded keys."""
    keys = kv_cache.read(keys, jnp.float32)
    visible = reference.range_mask(lo, hi, keys.shape[1])
    val, top = jax.lax.top_k(jnp.where(visible, reference.index_scores(q, w, keys, dtype), -jnp.inf), k)
    ok = jnp.take_along_axis(visible, top, axis=-1)
    return jnp.where(ok, top, -1), jnp.where(ok, val, -jnp.inf)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(2, 4, 1, 64, 701, 6), (1, 3, 3, 128, 530, 40), (2, 1, 1, 128, 9, 9),
                                   (1, 4, 16, 64, 530, 40), (2, 2, 24, 64, 301, 20)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_exact_with_ties(fmt, shape, dtype):
    """Integer inputs: every score is exact, so picks, order (ties, -0 below +0 as in lax.top_k: lower slot
    first), scores and the -1 / -inf fill equal the definition's exactly. Shapes: one head (keys decoded in
    registers) and three (decoded once per key), a slot count that is no multiple of the 4-key group or the
    256-slot chunk, k small enough that the candidates are pruned many times, and k = n; 16 and 24 heads (in the
    lanes of the score dot: a block of 16, then 8). Two all-zero keys in the first query's range: zero scores."""
    b, s, h, d, n, k = shape
    q, w, keys = _inputs(sum(shape), b, s, h, d, n, integer=True)
    keys = keys.at[:, n // 3:n // 3 + 2].set(0)
    keys = keys.at[:, n // 2:].set(keys[:, :n - n // 2])  # every key twice: ties across chunks
    lo, hi = _ranges(n, b, s, n, k)
    stored = _stored(fmt, keys)
    np.testing.assert_array_equal(kv_cache.read(stored, jnp.float32), keys)  # integers are stored exactly
    got, want = _kernel(q, w, stored, lo, hi, k, dtype), _definition(q, w, stored, lo, hi, k, dtype)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(np.signbit(got[1]), np.signbit(want[1]))
    picked = np.asarray(want[1])[np.asarray(want[0]) >= 0]
    assert np.sum(picked == 0) > 1 and len(set(picked.tolist())) < picked.size  # zero scores and ties picked


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("h", [1, 2, 16, 24])
def test_random_scores_and_picks(fmt, h):
    """Normal draws: the kernel adds in another order than XLA's dot, so its fp32 scores may differ in the last
    bits (within 2e-6 of the largest score here: a sum over heads with weights of either sign cancels); the picks
    are the definition's (no near-ties at this size), and the bf16-rounded scores are within one bf16 step."""
    b, s, d, n, k = 2, 2, 64, 3000, 64
    q, w, keys = _inputs(h, b, s, h, d, n, integer=False)
    lo, hi = _ranges(7, b, s, n, k)
    stored = _stored(fmt, keys)
    got, want = _kernel(q, w, stored, lo, hi, k, jnp.float32), _definition(q, w, stored, lo, hi, k, jnp.float32)
    np.testing.assert_array_equal(got[0], want[0])
    ok = np.asarray(want[0]) >= 0
    scale = np.abs(np.asarray(want[1])[ok]).max()
    np.testing.assert_allclose(np.asarray(got[1])[ok], np.asarray(want[1])[ok], rtol=0, atol=2e-6 * scale)
    got16, want16 = (f(q, w, stored, lo, hi, k, jnp.bfloat16) for f in (_kernel, _definition))
    np.testing.assert_array_equal(got16[0] >= 0, want16[0] >= 0)
    np.testing.assert_allclose(np.asarray(got16[1])[ok], np.asarray(want16[1])[ok], rtol=2**-8)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("h, dtype", [(1, jnp.float32), (1, jnp.bfloat16), (3, jnp.bfloat16), (8, jnp.float32),
                                      (8, jnp.bfloat16)])
def test_fp4_filter_keeps_every_pick(d, h, dtype):
    """MXFP4 keys go through the kernel's integer filter (every head's query rounded to int8 per 32-dim block,
    plus an error bound) before being scored: it must never drop a key the top-k needs. Queries: large integers
    (up to 3,000) on a fifth of the dims, small ones (up to 3) elsewhere, which the int8 rounding loses; keys: 40
    families sharing their values on the large dims, random on the others, so that within the leading family the
    picks differ only through the small dims (without the bound the filter drops them: checked by hand). Keys hold
    e2m1 values with a 6 in every 32-dim block (block scale 1: stored exactly), and weights are multiples of 1/8 (one
    head) or of 1/2 (several, each head its own query, weights of both signs in every row), so every score and every
    partial sum of one is an exact fp32 value: picks (ties by slot), scores and signs must equal the definition's
    exactly, in fp32 and rounded to bf16."""
    rng = np.random.default_rng(d + h)
    b, s, n, k = 1, 4, 6000, 20
    big = np.zeros(d, bool)
    big[rng.permutation(d)[:d // 5]] = True
    big[::32] = False  # the 6s
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    values = rng.choice(e2m1, (n, d)) * rng.choice([-1, 1], (n, d))
    family = rng.choice(e2m1, (40, d)) * rng.choice([-1, 1], (40, d))
    values[:, big] = family[rng.integers(0, 40, n)][:, big]
    values[:, ::32] = 6.0
    keys = jnp.asarray(values[None], jnp.float32)
    q = np.where(big, rng.integers(-3000, 3001, (b, s, h, d)), rng.integers(-3, 4, (b, s, h, d)))
    if h == 1:
        w = np.array([[[1.5], [-0.5], [0.25], [-2.0]]])
    else:
        w = rng.choice([-1.0, -0.5, 0.5, 1.0], (b, s, h))
        w[..., 0], w[..., 1] = 1.0, -0.5
    q, w = jnp.asarray(q, jnp.float32), jnp.asarray(w, jnp.float32)
    lo, hi = jnp.zeros((b, s), jnp.int32), jnp.asarray([[n, n - 77, n // 2, n]], jnp.int32)
    stored = _stored("fp4", keys)
    np.testing.assert_array_equal(kv_cache.read(stored, jnp.float32), keys)
    got, want = _kernel(q, w, stored, lo, hi, k, dtype), _definition(q, w, stored, lo, hi, k, dtype)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(np.signbit(got[1]), np.signbit(want[1]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_zero_threshold(fmt):
    """The first 3,000 slots score 0 (their dots are negative), the next 3,000 mostly do not: with a positive
    weight the later slots must still enter after k zeros filled the top-k (+0 is beaten by any positive score);
    with a negative weight every score is -0 or below, so the first k slots are the picks (the kernel stops
    scanning once k slots score -0). Integers: exact scores, compared with the definition exactly."""
    rng = np.random.default_rng(3)
    n, d, k = 6000, 64, 50
    q = jnp.asarray(rng.integers(1, 3, (1, 2, 1, d)), jnp.float32)
    keys = np.abs(rng.integers(-2, 3, (1, n, d))).astype(np.float32)
    keys[:, : n // 2] *= -1
    w = jnp.asarray([[[1.0], [-1.0]]], jnp.float32)
    lo, hi = jnp.zeros((1, 2), jnp.int32), jnp.full((1, 2), n, jnp.int32)
    stored = _stored(fmt, jnp.asarray(keys))
    got, want = _kernel(q, w, stored, lo, hi, k, jnp.float32), _definition(q, w, stored, lo, hi, k, jnp.float32)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(np.signbit(got[1]), np.signbit(want[1]))
    assert np.asarray(want[0])[0, 0].min() >= n // 2 and np.asarray(want[0])[0, 1].max() < k


@pytest.mark.parametrize("seed", range(6))
def test_topk_merge_equals_lax_top_k(seed):
    """cpu_kernel.topk_merge against reference.topk_merge (lax.top_k over [running | span]): values bit for bit
    and slots, with many ties, both zeros and infinities (integer-valued draws) or normal draws, running lists
    partly -inf, spans of any length (the 8-wide compares and their tail)."""
    rng = np.random.default_rng(seed)
    special = np.array([0.0, -0.0, 1.0, -1.0, 2.0, -np.inf, np.inf], np.float32)
    for _ in range(20):
        rows, k, m = (int(x) for x in (rng.integers(1, 40), rng.integers(1, 70), rng.integers(1, 300)))
        ties = bool(rng.integers(2))
        draw = (lambda shape: rng.choice(special, shape)) if ties else (
            lambda shape: rng.standard_normal(shape).astype(np.float32))
        first = draw((rows, k + int(rng.integers(0, 60))))
        first[:, int(rng.integers(0, first.shape[1] + 1)):] = -np.inf  # fewer than k seen so far, some rows
        vals, idx = jax.lax.top_k(jnp.asarray(first), k)
        idx = jnp.where(vals > -jnp.inf, idx, -1)
        scores, start = jnp.asarray(draw((rows, m))), jnp.int32(rng.integers(0, 10_000))
        want = reference.topk_merge(vals, idx, scores, start)
        got = jax.jit(cpu_kernel.topk_merge)(vals, idx, scores, start)
        np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32))
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_rows_take_the_merge_kernel_with_the_same_picks(fmt):
    """A prefill-shaped query (more rows than the scan kernel takes) under 'auto': the reference's scores with
    topk_merge's merges, several spans (span 64 forced) -> the same slots and scores as implementation='reference'
    (which merges with lax.top_k)."""
    b, s, h, d, n, k = 2, 24, 2, 64, 700, 20
    q, w, keys = _inputs(5, b, s, h, d, n, integer=False)
    lo, hi = _ranges(5, b, s, n, k)
    stored = _stored(fmt, keys)
    for dtype in (jnp.float32, jnp.bfloat16):
        want = reference.indexer_topk(q, w, stored, lo, hi, k, dtype, span=64)
        got = jax.jit(lambda *a: reference.indexer_topk(*a, k, dtype, span=64, merge=cpu_kernel.topk_merge))(
            q, w, stored, lo, hi)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(np.asarray(got[1]).view(np.int32), np.asarray(want[1]).view(np.int32))
        auto = jax.jit(lambda *a: indexer_topk(*a, k, dtype))(q, w, stored, lo, hi)
        np.testing.assert_array_equal(auto[0], reference.indexer_topk(q, w, stored, lo, hi, k, dtype)[0])


def _runs(q, keys, target=cpu_kernel.TARGET, **kw) -> bool:
    b, s = q.shape[:2]
    lo = hi = jnp.zeros((b, s), jnp.int32)
    w = jnp.zeros(q.shape[:3], jnp.float32)
    text = str(jax.make_jaxpr(lambda q, keys: indexer_topk(q, w, keys, lo, hi, 4, jnp.float32, **kw))(q, keys))
    return target in text


def test_when_indexer_topk_runs_the_kernel():
    """'auto' on a CPU: the kernel for up to CPU_KERNEL_ROWS query rows x heads, or CPU_KERNEL_LANE_ROWS with a
    multiple of 8 heads, outside the batch-invariant mode (whose fixed order of additions the kernel does not
    follow), for the formats it reads; else the reference with topk_merge."""
    from kernels.indexer import CPU_KERNEL_LANE_ROWS, CPU_KERNEL_ROWS
    keys = jnp.zeros((1, 64, 64), jnp.bfloat16)
    assert _runs(jnp.zeros((1, 1, 1, 64)), keys)
    assert _runs(jnp.zeros((1, 1, CPU_KERNEL_ROWS, 64)), _stored("fp4", keys.astype(jnp.float32)))
    assert not _runs(jnp.zeros((1, 1, CPU_KERNEL_ROWS + 1, 64)), keys)
    assert not _runs(jnp.zeros((1, 2, CPU_KERNEL_ROWS, 64)), keys)
    assert _runs(jnp.zeros((1, 1, CPU_KERNEL_LANE_ROWS, 64)), keys)
    assert _runs(jnp.zeros((1, CPU_KERNEL_LANE_ROWS // 8, 8, 64)), keys)
    assert not _runs(jnp.zeros((1, 2, CPU_KERNEL_LANE_ROWS, 64)), keys)
    assert not _runs(jnp.zeros((1, 1, 1, 64)), keys, implementation="reference")
    assert not _runs(jnp.zeros((1, 1, 1, 32)), _stored("fp4", jnp.zeros((1, 64, 32))))  # FP4 wants d % 64
    with batch_invariant():
        assert not _runs(jnp.zeros((1, 1, 1, 64)), keys)
    # more rows: the reference, its merges by topk_merge (exact, so in the batch-invariant mode too)
    many = jnp.zeros((1, 2, CPU_KERNEL_LANE_ROWS, 64))
    assert _runs(many, keys, cpu_kernel.MERGE_TARGET)
    assert not _runs(many, keys, cpu_kernel.MERGE_TARGET, implementation="reference")
    with batch_invariant():
        assert _runs(many, keys, cpu_kernel.MERGE_TARGET)


def test_build_errors_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-v4jax")
    with pytest.raises(RuntimeError, match="need a C\\+\\+17 compiler.*implementation='reference'"):
        cpu_ffi.build(cpu_kernel.SOURCE, str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing half-written
