"""The QAT primitives (architecture §3.8) bit-exact against independent definitions written here in numpy."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.linalg

from v4jax.formats import pow2_ceil
from v4jax.quant import fp8_fake_quant, hadamard, mxfp4_fake_quant

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def fp8_reference(x: np.ndarray, block: int) -> np.ndarray:
    out = np.empty_like(x)
    for row in range(x.shape[0]):
        for j in range(0, x.shape[1], block):
            blk = x[row, j:j + block]
            amax = max(float(np.abs(blk).max()), 1e-4)
            s = 2.0 ** math.ceil(math.log2(float(np.float32(amax) * np.float32(1 / 448))))
            q = np.clip(blk / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            out[row, j:j + block] = q * s
    return out


def e2m1_round(v: float) -> float:
    """Nearest e2m1 magnitude; ties go to the value with an even code (the lower code when its index is even)."""
    a = min(abs(v), 6.0)
    i = int(np.argmin(np.abs(E2M1 - a)))
    d = np.abs(E2M1 - a)
    ties = np.flatnonzero(d == d[i])
    if len(ties) == 2:
        i = int(ties[0] if ties[0] % 2 == 0 else ties[1])
    return math.copysign(E2M1[i], v)


def mxfp4_reference(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for row in range(x.shape[0]):
        for j in range(0, x.shape[1], 32):
            blk = x[row, j:j + 32]
            amax = max(float(np.abs(blk).max()), 6 * 2.0**-126)
            s = 2.0 ** math.ceil(math.log2(float(np.float32(amax) * np.float32(1 / 6))))
            out[row, j:j + 32] = [e2m1_round(v / s) * s for v in blk]
    return out


@pytest.mark.parametrize("block", [64, 128])
def test_fp8_fake_quant_bit_exact(block):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 256)) * np.exp(rng.uniform(-8, 8, (6, 1)))).astype(np.float32)
    x[0, :block] = 0.0  # amax floor
    x[1, :block] *= 0  # same
    x[2, 5] = 448.0 * 4  # block max exactly a power of two times 448
    got = np.asarray(fp8_fake_quant(jnp.asarray(x), block))
    np.testing.assert_array_equal(got, fp8_reference(x, block))
    assert not np.array_equal(got, x)


def test_mxfp4_fake_quant_bit_exact():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 128)) * 3).astype(np.float32)
    x[0, :32] = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)  # exact ties, scale 1
    got = np.asarray(mxfp4_fake_quant(jnp.asarray(x)))
    np.testing.assert_array_equal(got, mxfp4_reference(x))
    np.testing.assert_array_equal(got[0, :8], [0, 1, 1, 2, 2, 4, 4, 6])


def test_pow2_ceil():
    v = jnp.asarray([1.0, 1.5, 2.0, 0.3, 2.0**-20, 3.0 * 2**10], jnp.float32)
    np.testing.assert_array_equal(np.asarray(pow2_ceil(v)), [1, 2, 2, 0.5, 2.0**-20, 4096])


def test_hadamard_is_the_normalized_sylvester_transform():
    x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
    want = x @ scipy.linalg.hadamard(128) / np.sqrt(128)
    np.testing.assert_allclose(np.asarray(hadamard(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
