"""Bit equality of the cache path with the full pass inside numerics.batch_invariant(), over random seeds and layer
plans: for each seed, a random released-layout checkpoint (v4jax.hub.random_hub_tensors) on the layer plan
PLANS[seed % len(PLANS)], two rows of 600 random tokens, both qat modes; chunked prefill in chunks of 1 (decode), 64,
129 and 300 tokens, each compared with the full forward pass, logit for logit, bit for bit.

What it relies on: the mode pins every contraction and reduction (v4jax/numerics.py), and XLA:CPU must not contract
element-wise multiply-adds into FMAs, which it does by fusion context (so the last bits of norms, RoPE or mHC mixing
can depend on the chunk). `--xla_cpu_max_isa=AVX` keeps LLVM to an ISA without FMA; tests/test_bit_equality.py
runs this file with that flag, one child process per layer plan (--plan). By hand:

    XLA_FLAGS=--xla_cpu_max_isa=AVX .venv/bin/python tests/bit_equality.py --seeds 20 [--plan flash_4]

Prints one JSON line per (seed, qat, chunk): the largest |difference| and the positions that differ.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from flashlike_fixture import CONFIG  # noqa: E402
from infer.generate import Static, split  # noqa: E402
from test_decode import chunked_logits  # noqa: E402  (the cache path of tests/test_decode.py)
from v4jax import hub, numerics  # noqa: E402
from v4jax.checkpoint import load_hub_state  # noqa: E402
from v4jax.config import ModelConfig  # noqa: E402
from v4jax.model import Transformer  # noqa: E402

# Changes to the Flash-like fixture config (tests/fixtures/flashlike: 16 experts, 16 indexer heads, top-k 8, window
# 16), cut to 4 layers (compress_ratios has the MTP layer's entry last).
PLANS = {
    "flash_4": dict(num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=2),
    "hca_prefix_3hash_hd192": dict(num_hidden_layers=4, compress_ratios=[128, 4, 128, 0, 0], num_hash_layers=3,
                                   head_dim=192),
}
CHUNKS = (1, 64, 129, 300)  # decode; aligned with both compression ratios; with neither; with the CSA ratio only
BATCH, TOKENS = 2, 600  # past 4 HCA windows (128), 150 CSA windows (4), window 16 and top-k 8 (issue 16: >= 600)


def build(plan: str, seed: int, qat: bool) -> Transformer:
    with open(CONFIG) as f:
        hf = {**json.load(f), **PLANS[plan]}
    model = Transformer(ModelConfig.from_hf_config(hf, compute_dtype="float32", qat=qat), rngs=nnx.Rngs(0))
    load_hub_state(model, hub.random_hub_checkpoint(hf, seed))
    return model


@functools.partial(jax.jit, static_argnums=0)
def full_pass(static: Static, leaves: list, ids: jax.Array) -> jax.Array:
    return static.merge(leaves)(ids)


@functools.partial(jax.jit, static_argnums=(0, 3))
def cache_pass(static: Static, leaves: list, ids: jax.Array, chunk: int) -> jax.Array:
    """chunked_logits compiled once per (layer plan, qat mode, chunk) and reused over the seeds."""
    return chunked_logits(static.merge(leaves), ids, chunk)[0]


def plan_of(seed: int) -> str:
    return list(PLANS)[seed % len(PLANS)]


def check(seed: int, qat: bool, chunks=CHUNKS):
    plan = plan_of(seed)
    model = build(plan, seed, qat)
    static, leaves = split(model)
    ids = jnp.asarray(np.random.default_rng(1000 + seed).integers(0, 1024, (BATCH, TOKENS)), jnp.int32)
    with numerics.batch_invariant():
        full = np.asarray(full_pass(static, leaves, ids))
        for chunk in chunks:
            t0 = time.perf_counter()
            got = np.asarray(cache_pass(static, leaves, ids, chunk))
            diff = np.abs(got - full).max(axis=-1)
            bad = np.argwhere(diff > 0)
            yield {"seed": seed, "plan": plan, "qat": qat, "chunk": chunk, "max_abs_diff": float(diff.max()),
                   "positions_differing": len(bad), "first": bad[:3].tolist(), "finite": bool(np.isfinite(full).all()),
                   "s": round(time.perf_counter() - t0, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--plan", choices=list(PLANS), help="only the seeds of this layer plan (seed %% %d)" % len(PLANS))
    args = p.parse_args()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if args.plan and plan_of(seed) != args.plan:
            continue
        for qat in (False, True):
            for row in check(seed, qat):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
