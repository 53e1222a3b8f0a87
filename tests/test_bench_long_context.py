"""bench/long_context.py's arithmetic: the prefill-time exponent fit, the bandwidth-inferred bytes per step and the
table of a run with a timed-out length (no model is run)."""

import math

import pytest

from bench import long_context as lc


def test_fit_exponent_recovers_a_power_law_and_local_slopes():
    lengths = [4096, 16384, 65536, 262144]
    seconds = [3e-6 * n**1.5 for n in lengths]
    assert lc.fit_exponent(lengths, seconds) == pytest.approx(1.5, abs=1e-9)
    # two points: the slope by hand, log(40 / 10) / log(16384 / 4096) = log 4 / log 4 = 1
    assert lc.fit_exponent([4096, 16384], [10.0, 40.0]) == pytest.approx(1.0)
    assert lc.local_exponents([1, 2, 8], [1.0, 4.0, 8.0]) == pytest.approx([2.0, math.log(2) / math.log(4)])
    assert lc.fit_exponent([4096], [1.0]) is None


def test_inferred_bytes_and_capacity():
    # 2 ms more per step at 5 GB/s is 10 MB more read per step
    assert lc.inferred_bytes(0.012, 0.010, 5.0) == pytest.approx(1e7)
    assert lc.capacity_for(4096 + 17) == 4224 and lc.capacity_for(128) == 128


def test_analyse_and_markdown_with_a_timed_out_length():
    def row(length, prefill_s, step_s, model_bytes):
        return {"config": "tiny", "format": "bf16", "length": length, "prefill_s": prefill_s, "step_s": step_s,
                "model_bytes": model_bytes, "model_read": {}, "prefill_flops": 1e12, "indexer_flops": 5e11,
                "bandwidth_gbs": 10.0, "xla_bytes_accessed": 2.0**20 * length / 1024, "prefill_compile_s": 1.0,
                "decode_compile_s": 1.0, "peak_rss_mib": 900.0}

    rows = [row(4096, 2.0, 0.010, 1e6), row(16384, 16.0, 0.011, 3e6),
            {**row(16384, 16.0, 0.0099, 1e6), "format": "fp8+fp4", "paired_base": "bf16", "paired_ratio": 0.9},
            {"config": "tiny", "format": "bf16", "length": 65536, "model_bytes": 9e6, "prefill_flops": 1e13,
             "indexer_flops": 9e12, "timed_out": 900}]
    fits = lc.analyse(rows)
    assert fits["tiny bf16"]["exponent"] == pytest.approx(1.5)  # 8x the time for 4x the length
    assert rows[1]["step_ratio"] == pytest.approx(1.1)
    assert rows[1]["model_growth"] == pytest.approx(2e6)
    assert rows[1]["inferred_growth"] == pytest.approx(1e7)  # 1 ms at 10 GB/s
    assert rows[1]["xla_growth"] == pytest.approx(12 * 2.0**20)
    assert rows[1]["prefill_tps"] == pytest.approx(1024) and rows[1]["gflops"] == pytest.approx(1e12 / 16 / 1e9)
    result = {"quick": True, "steps": 4, "chunk": 2048, "timeout_s": 900, "formats": dict(lc.FORMATS),
              "configs": {"tiny": "tiny"}, "rows": rows, "capacity": [], "fits": fits,
              "capacity_args": {"capacity": 1 << 20, "fill": 4096}}
    md = lc.markdown(result)
    assert md.startswith("**QUICK RUN")
    table = [ln for ln in md.splitlines() if ln.startswith("| tiny |")]
    assert len(table) == 4 and "timed out after 900 s" in table[3]
    assert "**0.900** (vs bf16)" in table[2] and "(vs" not in table[1]  # the interleaved ratio, on the other format
    assert {ln.count("|") for ln in table} == {md.splitlines()[[i for i, ln in enumerate(md.splitlines())
                                                                if ln.startswith("| config |")][0]].count("|")}
    assert "exponent 1.50" in md
