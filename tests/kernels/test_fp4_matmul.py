"""kernels/fp4_matmul: the in-kernel MXFP4 decode vs the e2m1 / UE8M0 definitions and Mxfp4Weight, the Pallas
kernels (interpret mode) vs the reference forward and dx, the reference vs a float64 per-group matmul, and
lowering for CUDA and TPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import KERNEL_IMPL, export_for
from kernels.fp4_matmul import fp4_matmul, fp4_ragged_dot, pallas_kernel
from v4jax.formats import Mxfp4Weight


def _weight(seed, shape, lo=118, hi=134):
    """A random MXFP4 weight [.., n, k]: every byte value, scales 2^-9 .. 2^6."""
    rng = np.random.default_rng(seed)
    *lead, n, k = shape
    return Mxfp4Weight(jnp.asarray(rng.integers(0, 256, (*lead, n, k // 2)), jnp.uint8),
                       jnp.asarray(rng.integers(lo, hi, (*lead, n, k // 32)), jnp.uint8))


def _e2m1_definition(code: int) -> float:
    """OCP MX e2m1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal (m / 2)."""
    sign, e, m = -1.0 if code & 8 else 1.0, (code >> 1) & 3, code & 1
    return sign * (m / 2 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def test_decode_matches_definition_and_quant():
    """All 256 bytes under scale bytes 2 (2^-125), 100, 127, 254 (6 * 2^127 overflows to inf, as in quant):
    the kernel's arithmetic decode equals the format's definition and Mxfp4Weight.dequantize bit for bit
    (signed zeros included). Scale bytes 0 and 1 make subnormal weights, which XLA's CPU flushes to zero."""
    packed = jnp.tile(jnp.arange(256, dtype=jnp.uint8)[None], (4, 1))  # [4, 256]: k = 512
    scale = jnp.repeat(jnp.array([2, 100, 127, 254], jnp.uint8)[:, None], 16, axis=1)  # [4, 16]
    lo, hi = pallas_kernel._decode(packed, scale, jnp.float32)
    got = np.stack([np.asarray(lo), np.asarray(hi)], axis=-1).reshape(4, 512)
    codes = np.stack([np.arange(256) & 15, np.arange(256) >> 4], axis=-1).reshape(512)
    want = np.array([[_e2m1_definition(c) * 2.0 ** (s - 127) for c in codes] for s in (2, 100, 127, 254)])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got, want.astype(np.float32))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    quant = np.asarray(Mxfp4Weight(packed, scale).dequantize(jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), quant.view(np.uint32))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@functools.partial(jax.jit, static_argnames=("implementation",))
def _fwd_vjp(x, w, dy, implementation):
    y, vjp = jax.vjp(lambda x: fp4_matmul(x, w, implementation=implementation), x)
    return y, vjp(dy)[0]


# (m, n, k), dtype: decode (one row), n and k not multiples of the blocks, bf16
@pytest.mark.parametrize("shape,dtype", [((1, 12, 64), jnp.float32), ((10, 12, 96), jnp.float32),
                                         ((9, 20, 160), jnp.bfloat16)])
def test_fp4_matmul_matches_reference(shape, dtype):
    m, n, k = shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    rng = np.random.default_rng(m)
    w = _weight(n, (n, k))
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    y, dx = _fwd_vjp(x, w, dy, KERNEL_IMPL)
    y_ref, dx_ref = _fwd_vjp(x, w, dy, "reference")
    assert y.dtype == jnp.float32 and dx.dtype == dtype and dx.shape == x.shape
    assert _rel(y, y_ref) < tol and _rel(dx, dx_ref) < tol
    # and the reference against a float64 matmul of the dequantized weight
    w64 = np.asarray(w.dequantize(jnp.float32).astype(dtype), np.float64)
    assert _rel(y_ref, np.asarray(x, np.float64) @ w64.T) < tol


@functools.partial(jax.jit, static_argnames=("implementation",))
def _gfwd_vjp(x, w, sizes, dy, implementation):
    y, vjp = jax.vjp(lambda x: fp4_ragged_dot(x, w, sizes, implementation=implementation), x)
    return y, vjp(dy)[0]


# group sizes: empty experts first, between and last, a group crossing row tiles, rows past the groups (zero)
@pytest.mark.parametrize("sizes,dtype", [((0, 3, 0, 6, 0), jnp.float32), ((11, 0, 2, 0, 0), jnp.bfloat16)])
def test_fp4_ragged_dot_matches_reference(sizes, dtype):
    m, n, k = 13, 12, 96
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    rng = np.random.default_rng(len(sizes) + sizes[0])
    w = _weight(7, (len(sizes), n, k))
    gs = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    y, dx = _gfwd_vjp(x, w, gs, dy, KERNEL_IMPL)
    y_ref, dx_ref = _gfwd_vjp(x, w, gs, dy, "reference")
    assert _rel(y, y_ref) < tol and _rel(dx, dx_ref) < tol
    # independent expectation: per-group float64 matmuls, zero rows past the groups
    w64 = np.asarray(w.dequantize(jnp.float32).astype(dtype), np.float64)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    want, want_dx = np.zeros((m, n)), np.zeros((m, k))
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        want[rows], want_dx[rows] = x64[rows] @ w64[g].T, dy64[rows] @ w64[g]
        start += size
    assert _rel(y, want) < tol and _rel(dx, want_dx) < tol
    np.testing.assert_array_equal(np.asarray(y)[sum(sizes):], 0.0)


def test_lowers_for_cuda():
    """Dense and grouped kernels, forward and dx, with the tuned GPU blocks and V4-Flash-like expert shapes
    (k = 4096 in, n = 2048 out, bf16): lowering to Triton must succeed (compiling to PTX needs the device)."""
    m, n, k, e = 96, 2048, 4096, 4
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    packed, scale = jax.ShapeDtypeStruct((n, k // 2), jnp.uint8), jax.ShapeDtypeStruct((n, k // 32), jnp.uint8)
    cfg = {"block_m": 64, "block_n": 128, "block_k": 128, "num_warps": 4, "num_stages": 2}

    def dense(x, p, s):
        f = lambda x: pallas_kernel.fp4_matmul(x, p, s, target="gpu", cfg=cfg)  # noqa: E731
        return jax.value_and_grad(lambda x: jnp.sum(f(x)))(x)

    text = export_for(dense, (x, packed, scale), "cuda").mlir_module()
    assert text.count("xla.gpu.triton") >= 2  # forward and backward kernels

    def grouped(x, p, s, sizes):
        f = lambda x: pallas_kernel.fp4_ragged_dot(x, p, s, sizes, target="gpu", cfg=cfg)  # noqa: E731
        return jax.value_and_grad(lambda x: jnp.sum(f(x)))(x)

    gp, gsc = (jax.ShapeDtypeStruct((e, *a.shape), jnp.uint8) for a in (packed, scale))
    text = export_for(grouped, (x, gp, gsc, jax.ShapeDtypeStruct((e,), jnp.int32)), "cuda").mlir_module()
    assert text.count("xla.gpu.triton") >= 2


def test_lowers_for_tpu():
    """The dense forward kernel with the tuned TPU blocks lowers through Mosaic (the dx of TPU runs in XLA)."""
    m, n, k = 256, 1024, 2048
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((n, k // 32), jnp.uint8))
    cfg = {"block_m": 128, "block_n": 256, "block_k": 512, "num_warps": None, "num_stages": None}
    text = export_for(lambda x, p, s: pallas_kernel.fp4_matmul(x, p, s, target="tpu", cfg=cfg), args,
                   "tpu").mlir_module()
    assert "tpu_custom_call" in text


def test_bad_input():
    w = _weight(0, (8, 64))
    with pytest.raises(ValueError, match="same k"):
        fp4_matmul(jnp.zeros((2, 32)), w)
    with pytest.raises(ValueError, match="Mxfp4Weight"):
        fp4_matmul(jnp.zeros((2, 64)), jnp.zeros((8, 64)))
    with pytest.raises(ValueError, match="group_sizes"):
        fp4_ragged_dot(jnp.zeros((2, 64)), _weight(0, (3, 8, 64)), jnp.zeros((2,), jnp.int32))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="no compiled Pallas fp4_ragged_dot"):
            fp4_ragged_dot(jnp.zeros((2, 64)), _weight(0, (3, 8, 64)), jnp.zeros((3,), jnp.int32),
                           implementation="pallas")
