"""Small shared pieces of DeepSeek-V4: RMSNorm, rotary embedding and the clamped SwiGLU (architecture §3.3, §3.5).

RoPE acts on the *last* rope_head_dim dims of a head vector, rotating interleaved pairs (2j, 2j+1), GPT-J
style. Window-only layers and the MTP block use base rope_theta (10000) with no YaRN; CSA/HCA layers use
compress_rope_theta (160000) with the YaRN frequency blend (factor 16 over an original 65536 positions) and no
attention temperature. Everything is computed in fp32 and cast back to the input dtype, as the official code does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.numerics import mean


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight in fp32, cast back (official RMSNorm: weight applied before the cast)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
    """The (low, high) pair indices of the YaRN ramp: pairs below `low` keep their frequency, pairs above
    `high` are divided by rope_factor (architecture §3.3: 15 and 25 for the released configs)."""
    dim, base, orig = cfg.rope_head_dim, cfg.compress_rope_theta, cfg.original_seq_len

    def corr_dim(n_rot):
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    return max(math.floor(corr_dim(cfg.beta_fast)), 0), min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)


def rope_frequencies(cfg: ModelConfig, compressed: bool) -> np.ndarray:
    """Per-pair angular frequencies [rope_head_dim // 2] (fp32), for window-only or compressed layers."""
    dim = cfg.rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    if compressed and cfg.original_seq_len > 0:
        low, high = yarn_correction_range(cfg)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        freqs = freqs / np.float32(cfg.rope_factor) * ramp + freqs * (1 - ramp)
    return freqs.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, freqs: np.ndarray, inverse: bool = False) -> jax.Array:
    """Rotate the last 2*len(freqs) dims of x [..., s, (h,) d] by angle position * freq per interleaved pair.

    positions [b, s] (b may be 1) covers x's dims up to s; head axes after s broadcast.
    `inverse` rotates by -angle (the de-rotation of attention outputs, architecture §3.4.6).
    """
    rd = 2 * freqs.shape[0]
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs)  # [..., s, rd/2]
    extra = x.ndim - angle.ndim  # head axes between s and d
    angle = angle.reshape(angle.shape[:-1] + (1,) * extra + angle.shape[-1:])
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if inverse:
        sin = -sin
    nope, rope = x[..., :-rd], x[..., -rd:].astype(jnp.float32)
    a, b = rope[..., 0::2], rope[..., 1::2]
    rot = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rope.shape)
    return jnp.concatenate([nope, rot.astype(x.dtype)], axis=-1)


def swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in fp32 (architecture §3.5; no lower clamp on the gate)."""
    gate, up = gate.astype(jnp.float32), up.astype(jnp.float32)
    if limit > 0:
        up = jnp.clip(up, -limit, limit)
        gate = jnp.minimum(gate, limit)
    return jax.nn.silu(gate) * up


def split_chunks(a: jax.Array, chunk: int, fill=0) -> jax.Array:
    """[b, s, ...] -> [ceil(s / chunk), b, chunk, ...]: positions in chunks for a lax.map, the last chunk padded
    with `fill`."""
    b, s = a.shape[:2]
    n = -(-s // chunk)
    a = jnp.pad(a, [(0, 0), (0, n * chunk - s)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)


def join_chunks(a: jax.Array, s: int) -> jax.Array:
    """split_chunks undone: [n, b, chunk, ...] -> [b, s, ...], the padding dropped."""
    return jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1, *a.shape[3:])[:, :s]


# ---- parameters ---------------------------------------------------------------------------------------------
# Init (DeepSeek did not publish V4's, architecture §7.1): matrices N(0, 0.006^2) as DeepSeek-V3 states for all its
# weights; RMSNorm weights 1; mHC gating factors 0.01 and biases 0 (Megatron's mHC, so every site starts as
# "average the streams, add the sub-layer output"); attention sinks, ape and router biases 0.
INIT_STD = 0.006


def param(rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, init: str = "normal",
          value: float = 0.0):
    """An nnx.Param with its logical axis names (spec-level names; sharding.py maps them to mesh axes)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        v = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:  # "const"
        v = jnp.full(shape, value, jnp.float32)
    return nnx.Param(v.astype(dtype), out_sharding=axes, eager_sharding=False)
