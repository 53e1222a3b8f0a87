"""Training FLOPs of a V4 config and the device peak, for MFU.

The count is v4jax.cost.forward_flops (performance.md §1.3's accounting) averaged over the positions of a
row of seq_len tokens, with the MTP block and its head pass, times 3 for forward + backward. Packed documents
shorter than a row attend fewer keys, so this slightly overcounts attention on short documents.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from v4jax.config import ModelConfig
from v4jax.cost import forward_flops

# Dense BF16 peaks per chip (spec performance.md §4), by substrings of jax's device_kind.
PEAK_FLOPS = {"H100": 989e12, "H800": 989e12, "H200": 989e12, "B200": 2250e12, "GB200": 2500e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v6": 918e12, "TPU7x": 2307e12}


def train_flops_per_token(cfg: ModelConfig, seq_len: int, dense_csa: bool = False) -> float:
    """Forward + backward FLOPs per trained token (main model and MTP) at row length seq_len."""
    return 3 * sum(forward_flops(cfg, seq_len, "mean", mtp=bool(cfg.n_mtp_layers), dense_csa=dense_csa).values())


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
