"""Block sizes of the Pallas sparse attention kernels (kernels/sparse_attention/pallas_{gpu,tpu}.py), as data.

Per target (pallas.TARGETS), the forward and backward kernels each take an index block (block_k: kv rows
gathered per step) and on GPU a heads block (block_h: the M side of every matmul, part of one query's heads;
TPU programs take all heads) plus Triton's num_warps / num_stages.
Triton's tl.dot needs every matmul dimension >= 16, so on GPU both blocks are >= 16 and heads are zero-padded
up to block_h (decode and small-head configs pay for the padding).

The "gpu" values are first choices for an H100 with V4's d = 512, NOT yet measured (no GPU was lent when they
were written): per program the fp32 accumulator [block_h, 512] plus q and one gathered kv block, 32 x 512 x 4 B
+ 2 x 32 x 512 x 2 B = 128 KiB, i.e. 128 registers a thread with 8 warps; 64 heads would double it and spill.
The backward's head blocks also multiply its per-slot scratch (pallas.py), a reason not to go narrower.
Re-tune with `python -m bench.kernels --sweep` on the GPU and edit the table. The TPU block is the smallest
lane-aligned one, also unmeasured. *_interpret are for the CPU test runs (Pallas interpret mode): small blocks
so that small test shapes still span several blocks.
"""

from __future__ import annotations

BLOCKS = {
    "gpu": {
        "fwd": {"block_h": 32, "block_k": 32, "num_warps": 8, "num_stages": 2},
        "bwd": {"block_h": 32, "block_k": 32, "num_warps": 8, "num_stages": 1},
    },
    "gpu_interpret": {
        "fwd": {"block_h": 2, "block_k": 4, "num_warps": None, "num_stages": None},
        "bwd": {"block_h": 2, "block_k": 4, "num_warps": None, "num_stages": None},
    },
    "tpu": {"fwd": {"block_k": 128}, "bwd": {"block_k": 128}},  # all heads in one block (pallas_tpu.py)
    "tpu_interpret": {"fwd": {"block_k": 8}, "bwd": {"block_k": 8}},
}
# smallest heads / index block a target accepts: tl.dot needs >= 16; Mosaic slices the index list along lanes
MIN_BLOCK = {"gpu": 16, "gpu_interpret": 1, "tpu": 128, "tpu_interpret": 1}


def _pow2_at_least(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def blocks(target: str, heads: int, k: int) -> dict:
    """Block sizes for `heads` query heads and `k` index slots on `target` (a key of BLOCKS): the table's
    blocks, shrunk (to a power of two, at least MIN_BLOCK) when the problem is smaller than a block."""
    if target not in BLOCKS:
        raise ValueError(f"no sparse attention block sizes for target {target!r}: use one of {sorted(BLOCKS)}")
    lo = MIN_BLOCK[target]
    size = {"block_h": heads, "block_k": k}
    return {side: {key: max(lo, min(v, _pow2_at_least(size[key]))) if key in size else v for key, v in b.items()}
            for side, b in BLOCKS[target].items()}
