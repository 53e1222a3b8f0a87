"""bench/cache_reads.py's method on a case with a hand-known answer: a jitted sum over an array larger than the
simulated cache reads the array's bytes once, nearly all of them in XLA's code."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from bench import cache_reads

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("gcc") is None,
                                reason="bench.cache_reads needs valgrind and gcc (not installed here)")


def test_a_sum_reads_its_array_once(tmp_path):
    shim = cache_reads.build_shim(str(tmp_path))
    nbytes = 16 << 20  # 16 MiB: 16x the simulated 1 MiB cache
    program = textwrap.dedent(f"""
        import ctypes, jax, jax.numpy as jnp
        sim = ctypes.CDLL({shim!r})
        x = jnp.arange({nbytes // 4}, dtype=jnp.float32)
        total = jax.jit(jnp.sum)
        total(x).block_until_ready()  # compiled and run once, not simulated
        sim.sim_on()
        for _ in range(2):
            total(x).block_until_ready()
        sim.sim_off()
    """)
    out = str(tmp_path / "callgrind.out")
    p = cache_reads.simulate(["-c", program], out)
    assert p.returncode == 0, p.stderr[-2000:]
    objects = cache_reads.by_object(out)
    read, xla = (cache_reads.count(objects, "D1mr", x) * cache_reads.LINE / 2 for x in (False, True))
    assert nbytes <= xla <= read < 1.03 * nbytes, (xla, read, nbytes)
