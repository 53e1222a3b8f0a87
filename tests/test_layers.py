"""RMSNorm, RoPE (interleaved pairs, two bases, YaRN on compressed layers) and the clamped SwiGLU (architecture §3.3, §3.5)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig
from v4jax.layers import apply_rope, rms_norm, rope_frequencies, swiglu, yarn_correction_range


def test_yarn_ramp_limits_for_released_configs():
    for name in ("flash", "pro"):
        assert yarn_correction_range(ModelConfig.preset(name)) == (15, 25)


def test_rope_frequencies_window_and_compressed():
    cfg = ModelConfig.preset("flash")
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(rope_frequencies(cfg, compressed=False), base, rtol=1e-6)
    comp = rope_frequencies(cfg, compressed=True)
    raw = 1.0 / 160000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(comp[:16], raw[:16], rtol=1e-6)  # pairs 0..15 keep their frequency
    np.testing.assert_allclose(comp[25:], raw[25:] / 16, rtol=1e-6)  # pairs 25..31 divided by 16
    j = 20  # blended linearly in between: ramp = (20 - 15) / 10
    np.testing.assert_allclose(comp[j], raw[j] * 0.5 + raw[j] / 16 * 0.5, rtol=1e-6)


def test_apply_rope_rotates_interleaved_pairs_of_the_last_dims():
    cfg = ModelConfig.preset("tiny")
    freqs = rope_frequencies(cfg, compressed=False)
    x = np.random.default_rng(0).standard_normal((1, 5, 2, 128)).astype(np.float32)
    pos = np.array([[0, 1, 7, 100, 3000]])
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), freqs))
    np.testing.assert_array_equal(got[..., :64], x[..., :64])  # nope dims untouched
    z = x[..., 64::2] + 1j * x[..., 65::2]  # pairs (2j, 2j+1) as complex numbers
    angle = (pos[0].astype(np.float32)[:, None] * freqs)[None, :, None, :]  # fp32 angles, as the official code
    rot = z * np.exp(1j * angle.astype(np.float64))
    np.testing.assert_allclose(got[..., 64::2], rot.real, atol=2e-5)
    np.testing.assert_allclose(got[..., 65::2], rot.imag, atol=2e-5)
    back = apply_rope(jnp.asarray(got), jnp.asarray(pos), freqs, inverse=True)
    np.testing.assert_allclose(np.asarray(back), x, atol=2e-5)


def test_rms_norm():
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    w = np.linspace(0.5, 2, 16).astype(np.float32)
    want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6)), want, rtol=1e-5)


def test_swiglu_clamp():
    gate = jnp.asarray([-30.0, 0.0, 5.0, 30.0])
    up = jnp.asarray([-30.0, 2.0, 30.0, 3.0])
    got = np.asarray(swiglu(gate, up, 10.0))
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    want = [silu(-30.0) * -10.0, 0.0, silu(5.0) * 10.0, silu(10.0) * 3.0]  # gate: upper clamp only
    np.testing.assert_allclose(got, want, rtol=1e-6)
