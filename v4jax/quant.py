"""The quantization simulation of DeepSeek-V4's official inference code (architecture §3.8, [OFF] kernel.py).

With `qat=True` the model reproduces what the released inference code computes: FP8 e4m3 activations (1x128
blocks) into every FP8/FP4 matmul, FP8 fake-quant of the KV non-RoPE dims in 1x64 blocks, and a Hadamard
rotation plus MXFP4 fake-quant (1x32 blocks) of the indexer queries and keys. All scales are UE8M0 powers of
two. Each function returns the dequantized value in the input dtype (the "fake quant" / in-place mode of the
official `act_quant` and `fp4_act_quant`).

Upstream ops: act_quant(inplace=True) -> fp8_fake_quant; fp4_act_quant(inplace=True) -> mxfp4_fake_quant;
rotate_activation -> hadamard; linear() -> linear.

Also here: how a layer reads a weight for a matmul (`weight`, `dense`): its dense value, its stored FP8 / MXFP4
form (v4jax.formats) for kernels that decode it themselves, or an `Adapted` weight when a LoRA adapter is
attached. The number formats are v4jax.formats, the summation order v4jax.numerics.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.formats import FP4_MAX, FP8_MAX, QuantizedWeight, block_dequantize, block_quantize
from v4jax.numerics import einsum


def _block_fake_quant(x, block, qmax, amin, qdtype):
    return block_dequantize(*block_quantize(x, block, qmax, amin, qdtype), block, x.dtype)



def fp8_fake_quant(x: jax.Array, block: int = 128) -> jax.Array:
    """FP8 e4m3 quantize-dequantize along the last dim in 1 x `block` blocks (official act_quant, inplace)."""
    return _block_fake_quant(x, block, FP8_MAX, 1e-4, jnp.float8_e4m3fn)


def mxfp4_fake_quant(x: jax.Array, block: int = 32) -> jax.Array:
    """MXFP4 (e2m1 values, UE8M0 scale per 32) quantize-dequantize (official fp4_act_quant, inplace)."""
    return _block_fake_quant(x, block, FP4_MAX, FP4_MAX * 2.0**-126, jnp.float4_e2m1fn)


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester-ordered Walsh-Hadamard matrix scaled by 1/sqrt(n) (orthogonal and symmetric)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two size, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
    """Normalized Walsh-Hadamard transform over the last dim (official rotate_activation)."""
    h = jnp.asarray(_hadamard_matrix(x.shape[-1]))
    return einsum("...i,ij->...j", x.astype(jnp.float32), h).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, *, quantized: bool = False, qat: bool = False,
           out_dtype=None) -> jax.Array:
    """y = x @ w.T with w in the checkpoint's [out, in] layout (or an `Adapted` weight), fp32 accumulation.

    `quantized` marks weights that are FP8 / FP4 in the released checkpoint: under `qat` their input is
    rounded to FP8 in 1x128 blocks first, as the official fp8_gemm / fp4_gemm path does.
    """
    if quantized and qat:
        x = fp8_fake_quant(x, 128)
    if isinstance(w, Adapted):  # the adapter sees the same (FP8-rounded) input: the merged weight computes this
        return (einsum("...i,oi->...o", x, w.base.astype(x.dtype)) + w.delta(x)).astype(out_dtype or x.dtype)
    return einsum("...i,oi->...o", x, w.astype(x.dtype)).astype(out_dtype or x.dtype)


def dense(var) -> jax.Array:
    """The value of a weight Variable as a dense array (quantized storage is dequantized to fp32)."""
    value = var.get_value()
    return value.dequantize(jnp.float32) if isinstance(value, QuantizedWeight) else value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A weight [.., out, in] with a LoRA adapter (v4jax.lora): it acts as base + scale * b @ a, with a
    [.., rank, in] and b [.., out, rank], through two thin matmuls (the sum is never formed in a forward).
    `base` is dense, or a QuantizedWeight where the grouped expert kernels read the storage directly. With a
    dropout `key` (set in training only, v4jax.lora.set_dropout_keys), the adapter's input goes through dropout
    of rate `rate`; the base product always sees the undropped input."""

    base: object
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    key: jax.Array | None = None
    rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    def adapter_input(self, x: jax.Array) -> jax.Array:
        """x as the adapter reads it: unchanged without a key, else each element zeroed with probability `rate`
        and the rest divided by 1 - rate (the mask drawn from `key` for x's shape)."""
        if self.key is None:
            return x
        keep = jax.random.bernoulli(self.key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))

    def delta(self, x: jax.Array) -> jax.Array:
        """scale * (x @ a.T) @ b.T for x [..., in] (after adapter_input), fp32 (the low-rank path rounds to x's
        dtype in between)."""
        h = einsum("...i,ri->...r", self.adapter_input(x), self.a.astype(x.dtype)).astype(x.dtype)
        return self.scale * einsum("...r,or->...o", h, self.b.astype(x.dtype))

    def merged(self) -> jax.Array:
        """The dense fp32 weight base + scale * b @ a."""
        base = self.base.dequantize(jnp.float32) if isinstance(self.base, QuantizedWeight) else self.base
        return base.astype(jnp.float32) + self.scale * einsum("...or,...ri->...oi", self.b, self.a)


def weight(owner, name: str, decode: bool = True):
    """The weight Variable `owner.<name>` for a matmul: dense (`dense`; with decode=False its stored value, for
    kernels that read quantized storage), or `Adapted` when a LoRA adapter is attached beside it as
    `owner.<name>_lora` (v4jax.lora)."""
    var = getattr(owner, name)
    w = dense(var) if decode else var.get_value()
    lora = getattr(owner, f"{name}_lora", None)
    if lora is None:
        return w
    key = getattr(lora, "dropout_key", None)
    return Adapted(w, lora.a[...], lora.b[...], lora.scale, None if key is None else key[...], lora.dropout)


