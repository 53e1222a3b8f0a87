"""CPU, fp32 stand-ins for the GPU kernels the DSpark oracle's port calls (tests/oracle/make_dspark_fixture.py).

The official inference code (`inference/model.py`, `from kernel import ...`) and RelicLLM's port of its DSpark
module (`from src.kernels.ops import ...`) call tilelang / CUDA kernels. This module is registered under both
names before they are imported. Written here from the kernels' definitions (the official `inference/kernel.py`),
with the quantization simulation off (the oracle compares at qat=False):

  act_quant(x, ..., inplace=True)      the FP8 round trip of the KV's non-RoPE dims -> a no-op (x unchanged)
  fp4_act_quant(x, ..., inplace=True)  the indexer's MXFP4 round trip -> a no-op
  act_quant(..., inplace=False), fp8_gemm, fp4_gemm
                                       only reached for FP8 / FP4 weights; the oracle loads every weight
                                       dequantized to fp32 (F.linear), so these raise
  sparse_attn                          gather the top-k KV rows (-1 = none), softmax over them plus the per-head
                                       sink logit, weighted sum; fp32 throughout
  hc_split_sinkhorn                    pre = sigmoid + eps, post = 2 sigmoid, comb = softmax rows + eps then
                                       Sinkhorn (a column pass, then iters-1 row+column passes), as the kernel
  hadamard_rotate                      replaces inference/model.py's rotate_activation (fast_hadamard_transform,
                                       bf16 only): x @ H_n / sqrt(n) in fp32 (Sylvester order)
"""
from __future__ import annotations

import torch


def act_quant(x, block_size=128, scale_fmt=None, scale_dtype=torch.float32, inplace=False):
    if inplace:
        return x  # quantization simulation off
    raise NotImplementedError("act_quant for an FP8 GEMM: the oracle loads fp32 weights, this is never reached")


def fp4_act_quant(x, block_size=32, inplace=False):
    if inplace:
        return x  # quantization simulation off
    raise NotImplementedError("fp4_act_quant without inplace is never reached by the oracle")


def fp8_gemm(*args, **kwargs):
    raise NotImplementedError("fp8_gemm: the oracle loads fp32 weights")


def fp4_gemm(*args, **kwargs):
    raise NotImplementedError("fp4_gemm: the oracle loads fp32 weights")


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float) -> torch.Tensor:
    """q [b, m, h, d], kv [b, n, d] (one shared KV head), attn_sink [h], topk_idxs [b, m, k] (-1 = none)
    -> o [b, m, h, d]: o = sum_j exp(s_j) kv_j / (sum_j exp(s_j) + exp(sink)), s_j = scale * q . kv_j."""
    b, m, h, d = q.shape
    idx = topk_idxs.long()
    valid = idx >= 0
    rows = torch.arange(b).view(b, 1, 1)
    sel = kv.float()[rows, idx.clamp(min=0)]  # [b, m, k, d]
    s = torch.einsum("bmhd,bmkd->bmhk", q.float(), sel) * softmax_scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    sink = attn_sink.float().view(1, 1, h)
    mx = torch.maximum(s.amax(dim=-1), sink)  # [b, m, h]
    p = torch.exp(s - mx[..., None])
    denom = p.sum(dim=-1) + torch.exp(sink - mx)
    o = torch.einsum("bmhk,bmkd->bmhd", p, sel) / denom[..., None]
    return o.to(q.dtype)


def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int = 4,
                      sinkhorn_iters: int = 20, eps: float = 1e-6):
    """mixes [b, s, (2 + hc) * hc] -> pre [b, s, hc], post [b, s, hc], comb [b, s, hc, hc] (comb[j, k] is
    mixes entry 2 hc + j hc + k)."""
    hc = hc_mult
    m = mixes.float()
    pre = torch.sigmoid(m[..., :hc] * hc_scale[0] + hc_base[:hc]) + eps
    post = 2 * torch.sigmoid(m[..., hc:2 * hc] * hc_scale[1] + hc_base[hc:2 * hc])
    comb = (m[..., 2 * hc:] * hc_scale[2] + hc_base[2 * hc:]).unflatten(-1, (hc, hc))
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def _hadamard(n: int) -> torch.Tensor:
    assert n > 0 and n & (n - 1) == 0, f"Hadamard size {n} is not a power of two"
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    n = x.size(-1)
    return (x.float() @ _hadamard(n)).mul(n ** -0.5).to(x.dtype)
