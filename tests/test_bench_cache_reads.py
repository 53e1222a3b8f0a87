"""bench/cache_reads.py's method on cases with a hand-known answer: a jitted sum over an array larger than the
simulated cache reads the array's bytes once, nearly all of them in XLA's code; over an array that fits, each step
reads all of it only after the shim's cold pass (whose own reads are not counted); and the compiled decode step's
readers of its growing cache buffers, found in its HLO."""

from __future__ import annotations

import shutil
import textwrap

import jax.numpy as jnp
import pytest

from bench import cache_reads

needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("gcc") is None,
                                    reason="bench.cache_reads needs valgrind and gcc (not installed here)")


def _sum_reads(tmp_path, nbytes: int, cold: bool) -> tuple[float, float]:
    """(bytes read per step by the whole process, by the kernels) for 2 simulated steps of a jitted sum."""
    tmp_path.mkdir(exist_ok=True)
    shim = cache_reads.build_shim(str(tmp_path))
    program = textwrap.dedent(f"""
        import ctypes, jax, jax.numpy as jnp
        sim = ctypes.CDLL({shim!r})
        x = jnp.arange({nbytes // 4}, dtype=jnp.float32)
        total = jax.jit(jnp.sum)
        total(x).block_until_ready()  # compiled and run once, not simulated
        sim.sim_on()
        for _ in range(2):
            if {cold}:
                sim.sim_cold()
            total(x).block_until_ready()
        sim.sim_off()
    """)
    out = str(tmp_path / "callgrind.out")
    p = cache_reads.simulate(["-c", program], out)
    assert p.returncode == 0, p.stderr[-2000:]
    objects = cache_reads.by_object(out)
    return tuple(cache_reads.count(objects, "D1mr", scope) * cache_reads.LINE / 2 for scope in ("process", "kernels"))


@needs_valgrind
def test_a_sum_reads_its_array_once(tmp_path):
    nbytes = 16 << 20  # 16 MiB: 16x the simulated 1 MiB cache
    read, xla = _sum_reads(tmp_path, nbytes, cold=False)
    assert nbytes <= xla <= read < 1.03 * nbytes, (xla, read, nbytes)


@needs_valgrind
def test_the_cold_pass_makes_every_step_read_a_cached_array(tmp_path):
    nbytes = 256 << 10  # a quarter of the simulated cache: partly still cached from the step before, unless cold
    _, warm = _sum_reads(tmp_path / "warm", nbytes, cold=False)
    read, xla = _sum_reads(tmp_path / "cold", nbytes, cold=True)
    assert warm < nbytes <= xla <= read, (warm, xla, read, nbytes)
    assert read < 2 * nbytes, (read, nbytes)  # the pass's own 4 MiB is not counted


def test_cache_readers_finds_who_reads_the_growing_buffers():
    """With the CPU kernels the compiled decode step reads the compressed entries and indexer keys only in them
    (the figure bench.cache_reads sets beside the model counts those kernels); the jnp references read them in
    XLA's own code, and cache_readers must say so."""
    from kernels.indexer import cpu_kernel

    if not cpu_kernel.usable(jnp.zeros((1, 1, 1, 64)), jnp.zeros((1, 8, 64), jnp.bfloat16), jnp.bfloat16):
        pytest.skip("the compiled CPU kernels need x86-64 with AVX2 + FMA")
    kernels_only = {"v4jax_indexer_topk", "v4jax_stored_attention", "wrapped_scatter_computation"}
    for fmt in cache_reads.FORMATS:
        step = cache_reads.compiled_step("demo", fmt, 1024, 1)[0]
        assert set(cache_reads.cache_readers(step.as_text())) == kernels_only, fmt
    step = cache_reads.compiled_step("demo", "bf16", 1024, 1, kernels="reference")[0]
    assert set(cache_reads.cache_readers(step.as_text())) - kernels_only
