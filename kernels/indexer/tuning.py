"""Block sizes of the Pallas lightning-indexer kernel (kernels/indexer/pallas_kernel.py), as data.

block_q queries of all their (padded) heads form the M side of one matmul (block_q * heads rows against
block_k keys); `span` keys (a multiple of block_k) are scored per call and merged into the running top-k, so
the score buffer is [b, s, span], never [b, s, n]. Triton's dot wants every side >= 16 and power-of-two
shapes, so on GPU block_q * heads >= 16; Mosaic tiles the [block_q, block_k] score block by (8, 128), so on TPU
block_q >= 8.

The "gpu" values are first choices for an H100 with V4's 64 index heads x 128 dims (block_q * 64 = 128 rows,
[128, block_k] fp32 dots), NOT measured: no GPU was lent when they were written. Re-tune with
`bench/kernels.py` on the GPU. "tpu" (lowering-checked only, no TPU either) keeps Mosaic's tiling.
"interpret" is for the CPU tests: small blocks so that small shapes span several blocks and merge steps.
"""

from __future__ import annotations

BLOCKS = {
    "gpu": {"rows": 128, "block_k": 64, "span": 8192, "num_warps": 4, "num_stages": 2},
    "tpu": {"rows": 512, "block_k": 256, "span": 8192, "num_warps": None, "num_stages": None},
    "interpret": {"rows": 4, "block_k": 8, "span": 16, "num_warps": None, "num_stages": None},
}
MIN_ROWS = {"gpu": 16, "tpu": 8, "interpret": 1}  # of the matmul: block_q * heads
MIN_BLOCK_Q = {"gpu": 1, "tpu": 8, "interpret": 1}


def blocks(target: str, heads: int, n: int) -> dict:
    """Blocks for `heads` (already padded to a power of two) index heads and n keys on `target`: block_q =
    rows // heads, raised to the target's minima, span clipped to n rounded up to block_k."""
    if target not in BLOCKS:
        raise ValueError(f"no indexer block sizes for target {target!r}: use one of {sorted(BLOCKS)}")
    b = dict(BLOCKS[target])
    b["block_q"] = max(MIN_BLOCK_Q[target], b["rows"] // heads, -(-MIN_ROWS[target] // heads))
    n_up = -(-max(n, 1) // b["block_k"]) * b["block_k"]
    b["span"] = min(b["span"], n_up)
    return b
