"""kernels/sparse_attention/cpu_kernel: the compiled CPU attention over stored entries (window rows ++ a range of
stored entries or a list of picked ones, read in their storage format, online softmax) against
reference.sparse_attention over the decoded rows, and when a cached step runs it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu_ffi
from kernels.sparse_attention import CPU_KERNEL_ROWS, cpu_kernel, reference, stored_kernel_fits
from v4jax import kv_cache
from v4jax.numerics import batch_invariant

pytestmark = pytest.mark.skipif(cpu_ffi.unsupported_cpu() is not None,
                                reason=f"no CPU kernels here: {cpu_ffi.unsupported_cpu()}")


def _operands(seed, b, s, h, d, m, w, n, fmt, dtype, rope=64):
    """Queries, window rows kv [b, m, d] with indices idx [b, s, w] (some -1), entries of n slots stored as fmt,
    ranges lo, hi (one row sees no entry at all, one every entry), sink."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, s, h, d)), dtype)
    kv = jnp.asarray(rng.standard_normal((b, m, d)), dtype)
    idx = jnp.asarray(rng.integers(-1, m, (b, s, w)), jnp.int32)
    x = jnp.asarray(rng.standard_normal((b, n, d)) * 2, jnp.float32)
    entries = kv_cache.write(kv_cache.empty_kv(fmt, (b, n), d, rope), x, jnp.broadcast_to(jnp.arange(n), (b, n)))
    lo = rng.integers(0, n // 4, (b, s)).astype(np.int32)
    hi = rng.integers(n // 2, n + 1, (b, s)).astype(np.int32)
    lo.flat[0], hi.flat[0] = 0, n
    lo.flat[-1] = hi.flat[-1] = n // 3
    sink = jnp.asarray(rng.standard_normal(h), jnp.float32)
    return q, kv, idx, entries, jnp.asarray(lo), jnp.asarray(hi), sink


def _picks(seed, b, s, n, k):
    """Distinct random slots [b, s, k] per row, some -1 (the first row's only -1 in its last place; the last row's
    all -1)."""
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.permutation(n)[:k] for _ in range(b * s)]).reshape(b, s, k).astype(np.int32)
    picks[rng.random((b, s, k)) < 0.2] = -1
    picks.reshape(b * s, k)[0] = np.append(rng.permutation(n)[:k - 1], -1)
    picks.reshape(b * s, k)[-1] = -1
    return jnp.asarray(picks)


@functools.partial(jax.jit, static_argnames="scale")
def _reference(q, kv, idx, entries, sink, scale, lo=None, hi=None, picks=None):
    """What a cached step computed before the kernel: the entries decoded to kv's dtype after the window rows,
    every slot in [lo, hi) (or in picks) appended to the index list."""
    rows = kv_cache.read(entries, kv.dtype)
    if picks is None:
        t = jnp.arange(rows.shape[1])
        comp = jnp.where((t >= lo[..., None]) & (t < hi[..., None]), kv.shape[1] + t, -1)
    else:
        comp = jnp.where(picks >= 0, kv.shape[1] + picks, -1)
    return reference.sparse_attention(q, jnp.concatenate([kv, rows], 1), sink, jnp.concatenate([idx, comp], -1),
                                      scale, return_lse=True)


@functools.partial(jax.jit, static_argnames="scale")
def _kernel(q, kv, idx, entries, sink, scale, lo=None, hi=None, picks=None):
    return cpu_kernel.stored_attention(q, kv, idx, entries, sink, scale, lo=lo, hi=hi, picks=picks)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 1, 4, 128, 20, 16, 5000), (1, 3, 1, 192, 9, 8, 77),
                                   (1, 2, 3, 64, 12, 7, 301)])
@pytest.mark.parametrize("seen", ["range", "picks"])
def test_matches_the_reference(fmt, dtype, shape, seen):
    """Outputs and log-denominators against the reference over the decoded rows: in fp32 within 2e-6 of the
    largest output (the kernel adds in its own order, block by block, and exp is glibc's); in bf16 within one bf16
    step of it (probabilities are rounded to bf16 relative to a running max, not the final one). A range of 5,000
    entries, or 600 picks of them, is split over the threads and many 8-key blocks; 77 entries leave a short last
    block; head dim 192 with FP8's 128 e4m3 dims in two scale blocks; 3 heads (tiles of 2 heads, then 1). A row
    that sees no key returns 0 and lse = sink exactly."""
    b, s, h, d, m, w, n = shape
    q, kv, idx, entries, lo, hi, sink = _operands(sum(shape), b, s, h, d, m, w, n, fmt, dtype)
    idx = idx.at[-1, -1].set(-1)  # the last row: no window key either
    seen_by = dict(lo=lo, hi=hi) if seen == "range" else dict(picks=_picks(sum(shape), b, s, n, min(n, 600)))
    ops = (q, kv, idx, entries, sink, d**-0.5)
    (o, lse), (ro, rlse) = _kernel(*ops, **seen_by), _reference(*ops, **seen_by)
    o, ro = np.asarray(o, np.float32), np.asarray(ro, np.float32)
    top = np.abs(ro).max()
    step = 2.0 ** (np.floor(np.log2(top)) - 7)  # bf16's spacing at the largest output
    np.testing.assert_allclose(o, ro, rtol=0, atol=2e-6 * top if dtype == jnp.float32 else step)
    np.testing.assert_allclose(lse, rlse, rtol=0, atol=4e-6 * np.abs(np.asarray(rlse)).max())
    np.testing.assert_array_equal(o[-1, -1], 0.0)
    np.testing.assert_array_equal(np.asarray(lse)[-1, -1], np.asarray(sink))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decodes_every_fp8_code(dtype):
    """Each query row attends one stored entry alone (no window key, a sink of -inf): its output is that entry,
    decoded. The entries' e4m3 bytes run through every code the encoders write (all but the two NaN codes:
    subnormals, zeros of both signs, the largest), under scale bytes 127 (1), 120 (2^-7) and 140 (2^13); the
    output must equal kv_cache.read's decode exactly."""
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    n, d, rope = 3, 576, 64  # 512 e4m3 dims: 8 scale blocks
    rng = np.random.default_rng(0)
    nope = np.stack([np.resize(np.roll(codes, 100 * i), d - rope) for i in range(n)])
    scale = rng.choice([127, 120, 140], (n, 8)).astype(np.uint8)
    entries = kv_cache.Fp8Entries(jnp.asarray(nope[None]), jnp.asarray(scale[None]),
                                  jnp.asarray(rng.standard_normal((1, n, rope)), jnp.bfloat16))
    q = jnp.asarray(rng.standard_normal((1, n, 1, d)), dtype)
    kv, idx = jnp.zeros((1, 1, d), dtype), jnp.full((1, n, 1), -1, jnp.int32)
    picks = jnp.arange(n, dtype=jnp.int32)[None, :, None]  # row i: entry i
    o, _ = _kernel(q, kv, idx, entries, jnp.full((1,), -jnp.inf), d**-0.5, picks=picks)
    want = kv_cache.read(entries, dtype)[0]
    np.testing.assert_array_equal(np.asarray(o[0, :, 0], np.float32), np.asarray(want, np.float32))


def test_takes_either_a_range_or_picks():
    q, kv, idx, entries, lo, hi, sink = _operands(0, 1, 1, 1, 128, 4, 2, 8, "bf16", jnp.float32)
    with pytest.raises(ValueError, match="either lo and hi"):
        cpu_kernel.stored_attention(q, kv, idx, entries, sink, 1.0)
    with pytest.raises(ValueError, match="either lo and hi"):
        cpu_kernel.stored_attention(q, kv, idx, entries, sink, 1.0, lo=lo, hi=hi, picks=_picks(0, 1, 1, 8, 4))


def test_when_a_cached_step_runs_it():
    """On a CPU with implementation None / 'auto': for up to CPU_KERNEL_ROWS query rows x heads, outside the
    batch-invariant mode, for the formats it reads."""
    kv = jnp.zeros((1, 4, 128))
    entries = kv_cache.empty_kv("fp8", (1, 8), 128, 64)
    assert stored_kernel_fits(jnp.zeros((1, 1, CPU_KERNEL_ROWS, 128)), kv, entries, None)
    assert stored_kernel_fits(jnp.zeros((1, 2, 4, 128)), kv, entries, "auto")
    assert not stored_kernel_fits(jnp.zeros((1, 1, CPU_KERNEL_ROWS + 1, 128)), kv, entries, None)
    assert not stored_kernel_fits(jnp.zeros((1, 1, 4, 128)), kv, entries, "reference")
    assert not stored_kernel_fits(jnp.zeros((1, 1, 4, 128)), kv, jnp.zeros((1, 8, 128), jnp.float16), None)
    with batch_invariant():
        assert not stored_kernel_fits(jnp.zeros((1, 1, 4, 128)), kv, entries, None)
