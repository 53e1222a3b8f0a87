"""Block sizes of the Pallas MXFP4 matmul kernels (kernels/fp4_matmul/pallas_kernel.py), as data.

block_m x block_n output tiles, block_k elements of k per step (block_k / 2 packed bytes, block_k / 32 scale
bytes per weight row; block_k is a multiple of 32 and block_k / 32 a power of two). The backward kernel
(dx = dy @ W) has [block_m, block_k] tiles and steps over n by block_n. Triton's dot wants every side >= 16.

The "gpu" values are first choices for an H100 (bf16 tensor-core tiles of 64 x 128 with the weight decode in
registers), NOT measured: no GPU was lent when they were written; re-tune with bench/kernels.py.
"tpu" keeps Mosaic's (8, 128) tiling (forward only). "interpret" is for the CPU tests: small blocks so that
small shapes span several blocks.
"""

from __future__ import annotations

BLOCKS = {
    "gpu": {"block_m": 64, "block_n": 128, "block_k": 128, "num_warps": 4, "num_stages": 2},
    "tpu": {"block_m": 128, "block_n": 256, "block_k": 512, "num_warps": None, "num_stages": None},
    "interpret": {"block_m": 4, "block_n": 8, "block_k": 64, "num_warps": None, "num_stages": None},
}
MIN_BLOCK = {"gpu": 16, "tpu": 8, "interpret": 1}


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def blocks(target: str, m: int, n: int, k: int) -> dict:
    """The table's blocks for an [m, k] x [k, n] problem on `target`, shrunk to a power of two (at least the
    target's minimum) when the problem is smaller than a block."""
    if target not in BLOCKS:
        raise ValueError(f"no fp4_matmul block sizes for target {target!r}: use one of {sorted(BLOCKS)}")
    b, lo = dict(BLOCKS[target]), MIN_BLOCK[target]
    b["block_m"] = max(lo, min(b["block_m"], _pow2(m)))
    b["block_n"] = max(lo, min(b["block_n"], _pow2(n)))
    b["block_k"] = max(32 * max(1, -(-lo // 16)), min(b["block_k"], _pow2(k)))
    return b
