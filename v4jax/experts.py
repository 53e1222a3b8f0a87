"""The SwiGLU experts of V4's MoE (architecture §3.5): their weights, and the two ways of running them, one expert on
its tokens (`expert_ffn`: the shared expert, the dense reference) or all routed experts at once on rows sorted by
expert (`grouped_ffn`: one grouped matmul per weight; the local work of moe's grouped and expert-parallel paths).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from kernels.fp4_matmul import fp4_ragged_dot, grouped_matmul
from v4jax.config import ModelConfig
from v4jax.formats import Mxfp4Weight, QuantizedWeight
from v4jax.layers import param, swiglu
from v4jax.quant import Adapted, fp8_fake_quant, linear


class Experts(nnx.Module):
    """SwiGLU weights w1 (gate), w3 (up) [.., f, d] and w2 (down) [.., d, f]; `n` stacks routed experts."""

    def __init__(self, cfg: ModelConfig, n: int | None, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        lead, lead_axes = ((n,), ("experts",)) if n else ((), ())
        f_axis, d_axis = ("expert_ffw", "expert_embed") if n else ("ffw", "embed")
        f, d = cfg.moe_inter_dim, cfg.dim
        self.w1 = param(rngs, lead + (f, d), lead_axes + (f_axis, d_axis), pd)
        self.w2 = param(rngs, lead + (d, f), lead_axes + (d_axis, f_axis), pd)
        self.w3 = param(rngs, lead + (f, d), lead_axes + (f_axis, d_axis), pd)


def expert_ffn(x, w1, w2, w3, limit: float, qat: bool, route_w=None):
    """One SwiGLU expert on x [n, d] with [out, in] weights (arrays or quant.Adapted); route_w [n] scales the hidden
    before w2."""
    hid = swiglu(linear(x, w1, quantized=True, qat=qat, out_dtype=jnp.float32),
                 linear(x, w3, quantized=True, qat=qat, out_dtype=jnp.float32), limit)
    if route_w is not None:
        hid = hid * route_w[:, None]
    return linear(hid.astype(x.dtype), w2, quantized=True, qat=qat, out_dtype=jnp.float32)


def grouped_ffn(xs, sizes, route_w, w1, w2, w3, limit: float, qat: bool, kernels: str = "reference"):
    """SwiGLU experts on rows sorted by expert: xs [m, d], sizes [e] rows per expert (rows past their sum belong
    to no expert), route_w [m], weights [e, out, in] (arrays, or MXFP4 storage: the fp4 grouped kernel then
    decodes them on the fly, by `kernels` = ModelConfig.kernels; either may come as quant.Adapted, with per-expert
    LoRA factors) -> [m, d] fp32. One grouped matmul per weight, fp32 accumulation; under qat the rows and the
    weighted hidden are FP8-rounded, as in expert_ffn."""
    def grouped(a, w):  # a [m, in], w [e, out, in] -> [m, out]
        if isinstance(w, Adapted):  # per-expert adapters: two more grouped matmuls, rank wide
            h = grouped_matmul(w.adapter_input(a), w.a.astype(a.dtype), sizes).astype(a.dtype)
            return grouped(a, w.base) + w.scale * grouped_matmul(h, w.b.astype(a.dtype), sizes)
        if isinstance(w, Mxfp4Weight):
            return fp4_ragged_dot(a, w, sizes, implementation=kernels)
        w = w.dequantize(jnp.float32) if isinstance(w, QuantizedWeight) else w
        return grouped_matmul(a, w.astype(a.dtype), sizes)

    if qat:
        xs = fp8_fake_quant(xs, 128)
    hid = swiglu(grouped(xs, w1), grouped(xs, w3), limit)
    hid = (hid * route_w[:, None]).astype(xs.dtype)
    if qat:
        hid = fp8_fake_quant(hid, 128)
    return grouped(hid, w2)
