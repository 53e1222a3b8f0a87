"""Inside numerics.batch_invariant(), on XLA:CPU without FMA contraction, chunked prefill (chunks of 1, 64, 129 and 300)
and decode reproduce the full forward pass bit for bit: 20 random released-layout checkpoints alternating between
2 four-layer plans (Flash's, and an HCA-first plan with 3 hash layers and head_dim 192), batch 2, 600 tokens, qat
off and on (tests/bit_equality.py, one child process per plan, started with XLA_FLAGS=--xla_cpu_max_isa=AVX)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bit_equality.py")
SEEDS = 20
PLANS = ("flash_4", "hca_prefix_3hash_hd192")  # bit_equality.PLANS: seed s runs on PLANS[s % 2]


@pytest.mark.parametrize("plan", PLANS)
def test_cache_path_equals_the_full_pass_bit_for_bit_over_20_seeds(plan):
    """One layer plan's 10 of the 20 seeds per test (each child compiles its plan's programs once, and the two
    tests can run on two workers at once)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_max_isa=AVX", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, SCRIPT, "--seeds", str(SEEDS), "--plan", plan], env=env,
                         capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == SEEDS // 2 * 2 * 4  # the plan's seeds x qat modes x chunk sizes
    assert {r["chunk"] for r in rows} == {1, 64, 129, 300}
    assert {r["plan"] for r in rows} == {plan}
    assert {r["seed"] for r in rows} == set(range(PLANS.index(plan), SEEDS, 2))
    assert all(r["finite"] for r in rows)
    differing = [r for r in rows if r["max_abs_diff"] != 0.0]
    assert not differing, differing[:5]
