"""Memory evidence for sparse attention training at T = 32K (compile only): jax.grad of one attention, chunked
as v4jax runs it, fits in bounds derived from its shapes, while dense masked attention exceeds the 24 GiB CI
machine. bench/kernels.py prints the same numbers (`python -m bench.kernels --memory`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is a script folder, not an installed package
from bench.kernels import memory_sparse_vs_dense  # noqa: E402


def test_sparse_training_memory_fits_where_dense_does_not():
    mem = memory_sparse_vs_dense(T=32768, heads=4, d=64, chunk=256)
    T, n, k, h, d, c = (mem["shapes"][key] for key in ("T", "n", "k", "heads", "d", "chunk"))
    f32 = 4
    # reference: autodiff keeps every chunk's gathered keys ([T, k, d] in all) and ~3 logit-sized [T, h, k]
    # arrays; +25% for one chunk's temporaries
    assert mem["sparse"] < 1.25 * T * k * (d + 3 * h) * f32
    # Pallas kernels: q, o, do, dq [T, h, d]; kv, dkv and its accumulator [n, d]; one chunk's per-slot kv
    # cotangents and gathered rows [c, k, d] (x3); x2 margin. No [T, k, d] term at all.
    assert mem["sparse_pallas"] < 2 * (4 * T * h * d + 3 * n * d + 3 * c * k * d) * f32
    # dense masked: every [h, T, n] fp32 logit array alone is 20 GiB; autodiff needs several
    assert mem["dense"] > 24 * 2**30
