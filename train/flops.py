"""Training FLOPs of a V4 config, for MFU (the accounting of spec performance.md §1.3, times 3 for training).

Per token, forward: 2 FLOPs per activated matrix parameter (everything but the embedding table; routed
experts count k of E; the MTP block counts, and the LM head twice, main and MTP), plus, per layer and query,
2 * heads * (2 * head_dim) per attended key (QK and PV over the window, the compressed entries the query uses)
and for CSA layers 2 * index_heads * index_head_dim per compressed entry the indexer scans. Training is
3x the forward. Keys are averaged over the positions of a full row of seq_len tokens: packed documents
shorter than a row attend fewer keys, so this slightly overcounts attention on short documents.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.model import Transformer

# Dense BF16 peaks per chip (spec performance.md §4), by substrings of jax's device_kind.
PEAK_FLOPS = {"H100": 989e12, "H800": 989e12, "H200": 989e12, "B200": 2250e12, "GB200": 2500e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v6": 918e12, "TPU7x": 2307e12}


def matmul_params_per_token(cfg: ModelConfig) -> float:
    from v4jax.checkpoint import model_variables

    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    total = 0.0
    for path, var in model_variables(model).items():
        if not isinstance(var, nnx.Param) or len(var.shape) < 2 or path == "embed":
            continue
        n = math.prod(var.shape)
        if ".experts.w" in path and len(var.shape) == 3:
            n *= cfg.n_activated_experts / cfg.n_routed_experts
        total += 2 * n if path == "head" and cfg.n_mtp_layers else n
    return total


def attended_keys(cfg: ModelConfig, ratio: int, seq_len: int, dense_csa: bool) -> tuple[float, float]:
    """(mean keys a query attends, mean compressed entries the indexer scans) for one layer type."""
    t = np.arange(seq_len) + 1  # tokens visible to each query
    keys = np.minimum(t, cfg.window_size).astype(np.float64)
    visible = t // ratio if ratio else 0 * t
    scanned = visible if ratio == 4 and not dense_csa else 0 * t
    keys += visible if ratio == 128 or dense_csa else np.minimum(visible, cfg.index_topk)
    return float(keys.mean()), float(np.mean(scanned))


def train_flops_per_token(cfg: ModelConfig, seq_len: int, dense_csa: bool = False) -> float:
    fwd = 2 * matmul_params_per_token(cfg)
    for ratio in cfg.compress_ratios:  # the MTP entry (0) is its window-only block
        keys, scanned = attended_keys(cfg, ratio, seq_len, dense_csa and ratio == 4)
        fwd += 2 * cfg.n_heads * 2 * cfg.head_dim * keys + 2 * cfg.index_n_heads * cfg.index_head_dim * scanned
    return 3 * fwd


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from). CPUs have no datasheet number here: the peak
    is measured as the best fp32 matmul rate of a 1024^3 product (about a second)."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"{kind} dense BF16 datasheet"
    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best, f"{kind}: measured fp32 matmul"
