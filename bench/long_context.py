"""Long context, one process per length: chunked prefill and decode of one sequence at 4K ... 1M tokens for the
BF16 cache and for FP8 entries + FP4 indexer keys (issue 16 item 6).

    .venv/bin/python -m bench long_context            # the suite: into docs/perf/results.json, docs/performance.md
    .venv/bin/python -m bench.long_context [--configs tiny demo] [--lengths 4096 16384] [--formats bf16 fp8+fp4]
        [--steps 16] [--timeout 2700] [--capacity 1048576 --capacity-fill 4096 | --capacity 0] [--out DIR]
    .venv/bin/python -m bench.long_context --from-json DIR/long_context.json [--out DIR]   # reprint a saved run
    .venv/bin/python -m bench.long_context --config demo --lengths 1048576 --capacity 0   # the 1M demo alone

Each (config, length) runs in its own child process (`--child`), so that its peak RSS (the kernel's VmHWM of the
child: its own high-water mark, not the parent's) belongs to that length alone, and a slow length is stopped after
`--timeout` seconds and reported as timed out (the longer lengths of that config are then skipped). In the child,
with random weights (bench/decode.build; speed does not depend on them), one cache per format, every step of the
formats interleaved (the order alternating, so that each sees the same machine load and none runs first in a cold
process); the peak RSS is the child's, all caches held (the table gives each cache's own MiB):

- prefill: the length's random tokens (the same for every format) in chunks of 2,048 through infer.generate's
  `_step` (jax.jit of Transformer.step over the split state, cache donated), lowered and compiled once before the
  first chunk (its compile time is reported apart); prefill seconds are the sum of every chunk's run time (a last
  partial chunk is padded and fed with n_new < 2,048, so no second compile).
- decode: the same `_step` compiled for one token and one warm-up step; then `steps` single-token steps, the median
  (greedy: each step feeds the argmax of the last logits, outside the timed call); beside it the median over steps
  of step / the first format's step taken next to it, the comparison of the formats that machine load moves
  least.
- bytes per step: the cost model's `v4jax.cost.decode_read_bytes` (what the step must read), XLA's own count
  ("bytes accessed" of the compiled decode step's cost analysis: operands and results of every HLO op,
  intermediates included, so it is no DRAM figure), and an inferred figure: after the timings the child measures
  this machine's memory bandwidth B (GB/s: a jitted fp32 sum over a 256 MiB array, best of 5), and
  bytes_inferred(L) = (step(L) - step(L0)) * B is set beside decode_read_bytes(L) - decode_read_bytes(L0), the
  growth over the shortest length L0 run. This is a time converted to bytes: it equals the model's growth only if
  the extra time is all memory traffic at B; extra compute (e.g. decoding FP8 / FP4 codes) shows as excess.
- capacity check: a cache of capacity `--capacity` holding `--capacity-fill` tokens against one sized for those
  tokens (fill + steps, rounded up to 128), decoded in one child, interleaved step by step.

The prefill-time exponent is a least-squares fit of log(prefill seconds) on log(L) over the lengths that finished;
the local slopes between neighbouring lengths are given too. Counted FLOPs (v4jax.cost.forward_flops, position
"mean", times L) over the measured prefill time give the achieved FLOP rate.

Configs: `tiny` is the test preset (window 16, 16 indexer heads of 128, top-k 8, 3 CSA + 2 HCA layers); at 1M its
prefill counts 1.7e15 FLOPs, 97% of them the indexer's O(L^2) scan, far beyond a 2-core CPU, so its default
lengths stop at 256K. `demo` is the stated long-context demo: V4's layer plan cut to one CSA / HCA pair (two
window-only layers as in Flash, then CSA (ratio 4) and HCA (ratio 128): 0 0 4 128), V4's window 128, top-k 512,
head dims (128, rope 64) and YaRN (original length 65,536, factor 16: 1M positions), at small widths (dim 128, 4
heads, 4 routed experts of 128, vocab 4096) and with ONE indexer head of 64 dims instead of V4's 64 heads of 128:
the indexer's scan is O(L^2) per CSA layer (2 * heads * head_dim * L^2 / 8 FLOPs): with V4's indexer it alone
would count 1.2e17 FLOPs per CSA layer at 1M, with one head of 64 it is 1.8e13, and the whole 1M prefill counts
3.3e13 FLOPs (54% indexer scan, 34% attention, mostly HCA's L/128 entries per query): about 18 minutes at 30
GFLOP/s. A second CSA / HCA pair doubles the quadratic terms (6.2e13 FLOPs at 1M): measured at HEAD, the 6-layer
plan ran its counted FLOPs at about 12 GFLOP/s up to 64K, so it would not fit the 30-minute target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from v4jax import cost  # noqa: E402
from v4jax.config import ModelConfig  # noqa: E402

CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    "demo": ModelConfig.preset(
        "tiny", vocab_size=4096, dim=128, moe_inter_dim=128, n_layers=4, n_hash_layers=1, n_mtp_layers=0,
        n_heads=4, n_routed_experts=4, n_activated_experts=2, q_lora_rank=128, head_dim=128, o_groups=2,
        o_lora_rank=64, window_size=128, compress_ratios=(0, 0, 4, 128), original_seq_len=65536,
        index_n_heads=1, index_head_dim=64, index_topk=512, attn_chunk=256),
}
FORMATS = {"bf16": ("bf16", "bf16"), "fp8+fp4": ("fp8", "fp4")}  # name: (kv_format, index_format)
CHUNK = 2048
LENGTHS = {"tiny": [4096, 16384, 65536, 262144], "demo": [4096, 16384, 65536, 262144, 1048576]}
QUICK_LENGTHS = [1024, 4096]
STEPS, QUICK_STEPS = 16, 4
TIMEOUT = 5400  # seconds per child (every format's prefill): above twice the 30-minute target, so that a near
# miss still reports its time
CAPACITY, CAPACITY_FILL = 1 << 20, 4096
QUICK_CAPACITY, QUICK_CAPACITY_FILL = 1 << 16, 1024
BANDWIDTH_BYTES = 256 << 20


def fit_exponent(lengths, seconds) -> float | None:
    """Least-squares slope of log(seconds) on log(lengths) (None with fewer than two points)."""
    if len(lengths) < 2:
        return None
    return float(np.polyfit(np.log(np.asarray(lengths, float)), np.log(np.asarray(seconds, float)), 1)[0])


def local_exponents(lengths, seconds) -> list[float]:
    """The slope between each pair of neighbouring points, log-log."""
    return [math.log(seconds[i + 1] / seconds[i]) / math.log(lengths[i + 1] / lengths[i])
            for i in range(len(lengths) - 1)]


def inferred_bytes(step_s: float, step0_s: float, bandwidth_gbs: float) -> float:
    """Bytes that the extra step time over the shortest length would move at the measured bandwidth."""
    return (step_s - step0_s) * bandwidth_gbs * 1e9


def capacity_for(tokens: int) -> int:
    """Cache slots for `tokens`, rounded up to a multiple of 128 (the HCA ratio)."""
    return -(-tokens // 128) * 128


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


# ---- the child: one (config, format, length) -----------------------------------------------------------------
def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, reps: int = 5) -> float:
    """GB/s of a jitted fp32 sum over an nbytes array (best of `reps` after a warm-up)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best / 1e9


def _xla_bytes(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["bytes accessed"])
    except Exception:  # not every backend reports it
        return None


def _decode_step(dec, leaves, cache, token):
    """One timed single-token greedy step -> (seconds, cache, next token)."""
    import jax.numpy as jnp

    t0 = time.perf_counter()
    logits, _, cache = dec(leaves, cache, token, jnp.ones((1,), jnp.int32))
    logits.block_until_ready()
    seconds = time.perf_counter() - t0
    return seconds, cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]


def _prefill(model, static, leaves, length: int, caches: list) -> list:
    """Chunked prefill of the same `length` random tokens into each of `caches` (new, empty), their chunks
    interleaved (the order alternating, so that every cache sees the same machine load and none runs first in a
    cold process) -> [(cache, first decode token, info)], in the order of `caches`."""
    import jax.numpy as jnp

    from infer.generate import _step

    chunk = min(CHUNK, length)
    n_chunks = -(-length // chunk)
    ids = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (1, n_chunks * chunk)).astype(np.int32)
    runs = []
    for cache in caches:
        t0 = time.perf_counter()
        pre = _step.lower(static, leaves, cache, jnp.asarray(ids[:, :chunk]), jnp.asarray([chunk], jnp.int32)).compile()
        runs.append({"pre": pre, "cache": cache, "compile_s": time.perf_counter() - t0, "times": []})
    for c in range(n_chunks):
        n = min(chunk, length - c * chunk)
        tokens, n_new = jnp.asarray(ids[:, c * chunk:(c + 1) * chunk]), jnp.asarray([n], jnp.int32)
        for r in runs if c % 2 == 0 else runs[::-1]:
            t0 = time.perf_counter()
            r["logits"], _, r["cache"] = r["pre"](leaves, r["cache"], tokens, n_new)
            r["logits"].block_until_ready()
            r["times"].append(time.perf_counter() - t0)
    return [(r["cache"], jnp.argmax(r["logits"][:, n - 1], axis=-1).astype(jnp.int32)[:, None],
             {"prefill_compile_s": r["compile_s"], "prefill_s": sum(r["times"]), "chunk": chunk,
              "first_chunk_s": r["times"][0], "last_chunk_s": r["times"][-1]}) for r in runs]


def _compile_decode(static, leaves, cache, token):
    import jax.numpy as jnp
    from infer.generate import _step

    t0 = time.perf_counter()
    dec = _step.lower(static, leaves, cache, token, jnp.ones((1,), jnp.int32)).compile()
    return dec, time.perf_counter() - t0


def _decode_interleaved(leaves, runs: list[dict], steps: int) -> None:
    """`steps` single-token steps of each run ({"dec", "cache", "token", "times"}), interleaved, the order
    alternating: every run sees the same machine load."""
    for i in range(steps):
        for r in runs if i % 2 == 0 else runs[::-1]:
            t, r["cache"], r["token"] = _decode_step(r["dec"], leaves, r["cache"], r["token"])
            r["times"].append(t)


def child_length(config: str, formats: list[str], length: int, steps: int) -> dict:
    """A cache of each format prefilled with the same `length` tokens (chunks interleaved), then decoded (steps
    interleaved) -> {"formats": {format: its measurements}}; the peak RSS is the child's, every cache included."""
    import jax

    from bench.decode import build
    from infer.generate import split

    model = build(CONFIGS[config])
    static, leaves = split(model)
    capacity = capacity_for(length + steps + 1)
    caches = [model.init_cache(1, capacity, *FORMATS[fmt]) for fmt in formats]
    runs = []
    for cache, token, out in _prefill(model, static, leaves, length, caches):
        dec, out["decode_compile_s"] = _compile_decode(static, leaves, cache, token)
        out.update(xla_bytes_accessed=_xla_bytes(dec), capacity=capacity,
                   cache_mib=sum(x.nbytes for x in jax.tree.leaves(cache)) / 2**20)
        _, cache, token = _decode_step(dec, leaves, cache, token)  # the warm-up step
        runs.append({"out": out, "dec": dec, "cache": cache, "token": token, "times": []})
    _decode_interleaved(leaves, runs, steps)
    peak = peak_rss_mib()  # before the bandwidth array
    bandwidth = measure_bandwidth()
    results = {}
    for fmt, r in zip(formats, runs):
        assert int(r["cache"].lengths[0]) == length + steps + 1
        results[fmt] = {**r["out"], "step_s": statistics.median(r["times"]), "step_min_s": min(r["times"]),
                        "step_times_s": r["times"], "peak_rss_mib": peak, "bandwidth_gbs": bandwidth,
                        "paired_base": formats[0],
                        "paired_ratio": statistics.median(t / b for t, b in zip(r["times"], runs[0]["times"]))}
    return {"formats": results}


def child_capacity(config: str, fmt: str, fill: int, capacity: int, steps: int) -> dict:
    """Step time of a `capacity`-slot cache holding `fill` tokens vs a cache sized for them (one process, the two
    caches' prefill chunks and steps interleaved)."""
    from bench.decode import build
    from infer.generate import split

    model = build(CONFIGS[config])
    static, leaves = split(model)
    small = capacity_for(fill + steps + 1)
    caches = [model.init_cache(1, cap, *FORMATS[fmt]) for cap in (small, capacity)]
    runs = {}
    for name, (cache, token, info) in zip(("small", "large"), _prefill(model, static, leaves, fill, caches)):
        dec, _ = _compile_decode(static, leaves, cache, token)
        runs[name] = {"dec": dec, "cache": cache, "token": token, "times": [], "prefill_s": info["prefill_s"],
                      "xla_bytes_accessed": _xla_bytes(dec)}
    _decode_interleaved(leaves, list(runs.values()), steps + 1)
    out = {"fill": fill, "small_capacity": small, "large_capacity": capacity, "peak_rss_mib": peak_rss_mib()}
    for name, r in runs.items():
        out[f"{name}_step_s"] = statistics.median(r["times"][1:])
        out[f"{name}_prefill_s"] = r["prefill_s"]
        out[f"{name}_xla_bytes_accessed"] = r["xla_bytes_accessed"]
    out["ratio"] = out["large_step_s"] / out["small_step_s"]
    return out


# ---- the parent ----------------------------------------------------------------------------------------------
def spawn(spec: dict, timeout: float) -> dict:
    """Run one child (`--child SPEC`) -> its result, or {"error": ...} / {"timed_out": timeout}."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "bench.long_context", "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out": timeout}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": f"exit status {p.returncode}: {p.stderr.strip()[-600:]}"}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": time.perf_counter() - t0}


def model_figures(cfg: ModelConfig, fmt: str, length: int) -> dict:
    """The cost model's bytes per decode step and prefill FLOPs at `length`."""
    kv_format, index_format = FORMATS[fmt]
    read = cost.decode_read_bytes(cfg, length, kv_format, index_format)
    flops = cost.forward_flops(cfg, length, "mean")
    return {"model_bytes": sum(read.values()), "model_read": read,
            "prefill_flops": sum(flops.values()) * length, "indexer_flops": flops["indexer_scan"] * length}


def analyse(rows: list[dict]) -> dict:
    """Per (config, format): step / step(L0), byte growths, prefill exponent and FLOP rate."""
    fits = {}
    for key in sorted({(r["config"], r["format"]) for r in rows}):
        done = [r for r in rows if (r["config"], r["format"]) == key and "step_s" in r]
        if not done:
            continue
        base = done[0]
        for r in done:
            if "step_times_s" in r:
                r.setdefault("step_min_s", min(r["step_times_s"]))
            r["step_ratio"] = r["step_s"] / base["step_s"]
            r["model_growth"] = r["model_bytes"] - base["model_bytes"]
            r["inferred_growth"] = inferred_bytes(r["step_s"], base["step_s"], r["bandwidth_gbs"])
            xb, xb0 = r.get("xla_bytes_accessed"), base.get("xla_bytes_accessed")
            r["xla_growth"] = xb - xb0 if xb is not None and xb0 is not None else None
            r["prefill_tps"] = r["length"] / r["prefill_s"]
            r["gflops"] = r["prefill_flops"] / r["prefill_s"] / 1e9
            r["indexer_gflops_lower"] = r["indexer_flops"] / r["prefill_s"] / 1e9  # as if the prefill were all indexer
        ls, ss = [r["length"] for r in done], [r["prefill_s"] for r in done]
        fits[f"{key[0]} {key[1]}"] = {"exponent": fit_exponent(ls, ss), "local": local_exponents(ls, ss),
                                      "lengths": ls, "base_length": base["length"]}
    return fits


def collect(configs, formats, lengths: dict, steps: int, timeout: float, capacity: int, fill: int,
            out_dir: str | None = None, quick: bool = False) -> dict:
    rows, caps = [], []
    for config in configs:
        cfg = CONFIGS[config]
        stopped = None
        for length in sorted(lengths[config]):
            res = {"skipped": f"a shorter length ({stopped}) did not finish"} if stopped else spawn(
                {"kind": "length", "config": config, "formats": formats, "length": length, "steps": steps}, timeout)
            for fmt in formats:
                row = {"config": config, "format": fmt, "length": length, **model_figures(cfg, fmt, length)}
                row.update({**res["formats"][fmt], "wall_s": res["wall_s"]} if "formats" in res else res)
                print(line(row), flush=True)
                rows.append(row)
            stopped = stopped or ("formats" not in res and length)
        for fmt in formats if capacity else []:
            r = {"config": config, "format": fmt, **spawn({"kind": "capacity", "config": config, "format": fmt,
                                                           "fill": fill, "capacity": capacity, "steps": steps},
                                                          timeout)}
            print(capacity_line(r), flush=True)
            caps.append(r)
    result = {"quick": quick, "steps": steps, "chunk": CHUNK, "timeout_s": timeout, "formats": dict(FORMATS),
              "configs": {c: describe_config(CONFIGS[c]) for c in configs}, "rows": rows, "capacity": caps,
              "capacity_args": {"capacity": capacity, "fill": fill}}
    result["fits"] = analyse(rows)
    if out_dir:
        result["plot"] = plot(result, out_dir)
    return result


def describe_config(cfg: ModelConfig) -> str:
    return (f"dim {cfg.dim}, layers {cfg.n_layers} (compress ratios {' '.join(map(str, cfg.compress_ratios))}), "
            f"{cfg.n_heads} heads of {cfg.head_dim}, window {cfg.window_size}, indexer {cfg.index_n_heads} x "
            f"{cfg.index_head_dim} top-k {cfg.index_topk}, {cfg.n_routed_experts} experts ({cfg.n_activated_experts} "
            f"active) of {cfg.moe_inter_dim}, vocab {cfg.vocab_size}, compute {cfg.compute_dtype}")


def _fmt_s(s: float) -> str:
    return f"{s:.2f}" if s < 100 else f"{s:.0f}"


def line(r: dict) -> str:
    head = f"{r['config']} {r['format']} L={r['length']}"
    if "step_s" not in r:
        why = (f"timed out after {r['timed_out']:.0f} s" if "timed_out" in r else r.get("skipped") or r.get("error"))
        return f"{head}: {why}"
    return (f"{head}: prefill {_fmt_s(r['prefill_s'])} s ({r['length'] / r['prefill_s']:.0f} tokens/s, compile "
            f"{r['prefill_compile_s']:.1f} s), decode {1e3 * r['step_s']:.2f} ms/step (compile "
            f"{r['decode_compile_s']:.1f} s), peak RSS {r['peak_rss_mib']:.0f} MiB, model "
            f"{r['model_bytes'] / 2**20:.2f} MiB/step, bandwidth {r['bandwidth_gbs']:.1f} GB/s")


def capacity_line(r: dict) -> str:
    head = f"{r['config']} {r['format']} capacity check"
    if "ratio" not in r:
        return f"{head}: " + (f"timed out after {r['timed_out']:.0f} s" if "timed_out" in r else r.get("error", ""))
    return (f"{head}: {r['fill']} tokens in {r['large_capacity']} slots {1e3 * r['large_step_s']:.2f} ms/step vs in "
            f"{r['small_capacity']} slots {1e3 * r['small_step_s']:.2f} ms/step: {r['ratio']:.2f}x")


def plot(result: dict, out_dir: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for (config, fmt), style in zip(sorted({(r["config"], r["format"]) for r in result["rows"]}),
                                    ("o-", "s--", "^-", "v--", "D-", "x--")):
        done = [r for r in result["rows"] if (r["config"], r["format"]) == (config, fmt) and "step_s" in r]
        if not done:
            continue
        ls = [r["length"] for r in done]
        fit = result["fits"][f"{config} {fmt}"]["exponent"]
        label = f"{config} {fmt}" + (f" (exponent {fit:.2f})" if fit is not None else "")
        color = axes[0].plot(ls, [r["prefill_s"] for r in done], style, label=label)[0].get_color()
        axes[1].plot(ls, [1e3 * r["step_s"] for r in done], style, color=color, label=f"{config} {fmt}")
        for key, ls_, what in (("model_growth", style, "model"), ("inferred_growth", style[0] + ":", "inferred")):
            pts = [(r["length"], r[key] / 2**20) for r in done[1:] if r[key] > 0]
            if pts:
                axes[2].plot(*zip(*pts), ls_, color=color, label=f"{config} {fmt}: {what}")
    titles = ("chunked prefill time [s]", "decode step [ms]", "bytes per step over L0 [MiB]: model vs inferred")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context L (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Long context, one process per length" + (" (QUICK: plumbing check)" if result["quick"] else ""))
    fig.tight_layout()
    name = "long_context.png"
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    return name


# ---- the suite -----------------------------------------------------------------------------------------------
def run(out_dir, quick: bool = False) -> dict:
    """The suite entry: both configs and formats; quick: 1K and 4K, a 64K-slot capacity check holding 1K."""
    if quick:
        lengths = {c: QUICK_LENGTHS for c in CONFIGS}
        return collect(list(CONFIGS), list(FORMATS), lengths, QUICK_STEPS, TIMEOUT, QUICK_CAPACITY,
                       QUICK_CAPACITY_FILL, out_dir, quick=True)
    return collect(list(CONFIGS), list(FORMATS), LENGTHS, STEPS, TIMEOUT, CAPACITY, CAPACITY_FILL, out_dir)


def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.2f}"


def _min(r: dict) -> str:
    return f" ({1e3 * r['step_min_s']:.2f})" if "step_min_s" in r else ""


def _paired(r: dict) -> str:
    """The median over interleaved steps of step / the same step of the child's first format."""
    if "paired_ratio" not in r or r["paired_base"] == r["format"]:
        return "-"
    return f"**{r['paired_ratio']:.3f}** (vs {r['paired_base']})"


def _cache(r: dict) -> str:
    return f" ({r['cache_mib']:.1f})" if "cache_mib" in r else ""


def markdown(result: dict) -> str:
    out = []
    if result.get("quick"):
        out += ["**QUICK RUN: small lengths to check the plumbing; these are not the benchmark's results.**", ""]
    cap = result["capacity_args"]
    out += [
        f"One sequence; one child process per (config, length), holding a cache of each format, prefilled with the "
        f"same tokens in chunks of {result['chunk']} through infer.generate's `_step` (jax.jit over the split model "
        f"state, cache donated; compiled before the first chunk, compile time apart); decode: median of "
        f"{result['steps']} single-token steps after a warm-up, and the median over steps of step / the first "
        "format's step beside it; the formats' chunks and steps interleaved, the order alternating; cache capacity "
        f"= L + steps rounded up to 128; random weights; per-child limit {result['timeout_s']:.0f} s "
        "(bench/long_context.py). Formats: " + ", ".join(f"{k} = kv_format {v[0]}, index_format {v[1]}"
                                                         for k, v in result["formats"].items()) + ". Peak RSS: the "
        "child's VmHWM, every format's cache held; the cache's own MiB in brackets.", "",
        "Configs: " + "; ".join(f"`{k}`: {v}" for k, v in result["configs"].items()) + ". `demo` is V4's layer plan "
        "cut to one pair (two window-only layers, then one CSA and one HCA layer), window 128 and top-k 512 at small "
        "widths with one indexer head of 64 (V4: 64 x 128), because the indexer's O(L^2) scan dominates prefill at 1M "
        "on a 2-core CPU (1M counts 3.3e13 FLOPs, 54% indexer scan); `tiny` stops at 256K by default (its 16 x 128 "
        "indexer counts 1.7e15 FLOPs at 1M).", "",
        "What is measured and what is inferred: prefill seconds, step ms, compile seconds and peak RSS (the child's "
        "VmHWM) are measured; *model MiB/step* is `v4jax.cost.decode_read_bytes` (counted); *XLA MiB/step* is the "
        "compiled decode step's own cost analysis (\"bytes accessed\": operands and results of every HLO op, "
        "intermediates included: a static count, not DRAM traffic; every run-time-chosen branch and loop body is "
        "counted as compiled, not as run); *inferred growth* = (step(L) - step(L0)) x B, "
        "with B this machine's bandwidth measured in the same child (jitted fp32 sum over 256 MiB, best of 5), set "
        "beside the model's growth decode_read_bytes(L) - decode_read_bytes(L0), L0 the shortest length: a time "
        "converted to bytes, which matches the model only if the extra step time is all memory traffic at B. "
        "GFLOP/s = counted prefill FLOPs (`cost.forward_flops`, mean position, x L) / measured prefill time; the "
        "indexer's own rate is not timed apart: its scan FLOPs over the whole prefill time bound it from below.", "",
        "| config | format | L | prefill s | prefill tok/s | compile s (prefill / decode) | step ms, median (min) | "
        "step / step(L0) | step / first format's step, interleaved | peak RSS MiB (cache MiB) | "
        "model MiB/step | model growth MiB | inferred growth MiB (B GB/s) | XLA MiB/step | "
        "prefill GFLOP/s (indexer share of FLOPs; indexer rate >=) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lead = f"| {r['config']} | {r['format']} | {r['length']} |"
        if "step_s" not in r:
            why = (f"timed out after {r['timed_out']:.0f} s" if "timed_out" in r
                   else r.get("skipped") or f"failed: {r.get('error', '')[:200]}")
            out.append(f"{lead} {why} |" + " |" * 6 + f" {_mib(r['model_bytes'])} |" + " |" * 4)
            continue
        out.append(
            f"{lead} {_fmt_s(r['prefill_s'])} | {r['prefill_tps']:.0f} | {r['prefill_compile_s']:.1f} / "
            f"{r['decode_compile_s']:.1f} | {1e3 * r['step_s']:.2f}{_min(r)} | {r['step_ratio']:.2f} | "
            f"{_paired(r)} | {r['peak_rss_mib']:.0f}{_cache(r)} | "
            f"{_mib(r['model_bytes'])} | {_mib(r['model_growth'])} | {_mib(r['inferred_growth'])} "
            f"({r['bandwidth_gbs']:.1f}) | {_mib(r.get('xla_bytes_accessed'))} | {r['gflops']:.1f} "
            f"({r['indexer_flops'] / r['prefill_flops']:.0%}; indexer >= {r['indexer_gflops_lower']:.1f}) |")
    out += ["", "Prefill time vs L (log-log least squares over the lengths that finished; local slopes between "
                "neighbouring lengths):", ""]
    for key, f in result["fits"].items():
        exp = "n/a (one length)" if f["exponent"] is None else f"{f['exponent']:.2f}"
        local = ", ".join(f"{a}->{b}: {s:.2f}" for a, b, s in zip(f["lengths"], f["lengths"][1:], f["local"]))
        out.append(f"- {key}: exponent {exp}" + (f" (local: {local})" if local else ""))
    if result["capacity"]:
        out += ["", f"Capacity check (issue 16's acceptance: <= 1.2x): {cap['fill']} tokens in a cache of "
                    f"{cap['capacity']} slots vs in one sized for them (fill + steps, rounded up to 128), decoded in "
                    "one child, steps interleaved; median step.", "",
                "| config | format | tokens | small capacity | step ms | large capacity | step ms | ratio | "
                "XLA MiB/step (small / large) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["capacity"]:
            if "ratio" not in r:
                why = f"timed out after {r['timed_out']:.0f} s" if "timed_out" in r else "failed"
                out.append(f"| {r['config']} | {r['format']} | {cap['fill']} | {why} | | | | | |")
                continue
            out.append(f"| {r['config']} | {r['format']} | {r['fill']} | {r['small_capacity']} | "
                       f"{1e3 * r['small_step_s']:.2f} | {r['large_capacity']} | {1e3 * r['large_step_s']:.2f} | "
                       f"{r['ratio']:.2f}x | {_mib(r['small_xla_bytes_accessed'])} / "
                       f"{_mib(r['large_xla_bytes_accessed'])} |")
    if result.get("plot"):
        out += ["", f"![long context](perf/{result['plot']})"]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", "--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--formats", "--format", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help="context lengths (default: tiny " + " ".join(map(str, LENGTHS["tiny"])) + "; demo "
                   + " ".join(map(str, LENGTHS["demo"])) + ")")
    p.add_argument("--steps", type=int, default=STEPS, help="timed decode steps (median)")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per child process")
    p.add_argument("--capacity", type=int, default=CAPACITY, help="large capacity of the capacity check (0: skip)")
    p.add_argument("--capacity-fill", type=int, default=CAPACITY_FILL, help="tokens held in the capacity check")
    p.add_argument("--out", default=None, help="write long_context.png, .json and .md here")
    p.add_argument("--quick", action="store_true", help="1K and 4K, 4 steps, a 64K capacity check holding 1K")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="print the table of a saved long_context.json (and redraw its plot into --out) without running")
    p.add_argument("--record", action="store_true",
                   help="store the result as the suite's long_context entry (docs/perf/results.json, plot in docs/perf) "
                   "and rewrite docs/performance.md: for runs with lengths other than the suite's defaults")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.from_json:
        result = json.load(open(args.from_json))
        result["fits"] = analyse(result["rows"])
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            result["plot"] = plot(result, args.out)
        print(markdown(result))
        return
    if args.child:
        spec = json.loads(args.child)
        if spec["kind"] == "length":
            res = child_length(spec["config"], spec["formats"], spec["length"], spec["steps"])
        else:
            res = child_capacity(spec["config"], spec["format"], spec["fill"], spec["capacity"], spec["steps"])
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.quick:
        lengths = {c: args.lengths or QUICK_LENGTHS for c in CONFIGS}
        steps, capacity, fill = QUICK_STEPS, QUICK_CAPACITY, QUICK_CAPACITY_FILL
    else:
        lengths = {c: args.lengths or LENGTHS[c] for c in CONFIGS}
        steps, capacity, fill = args.steps, args.capacity, args.capacity_fill
    if args.record:
        from bench.__main__ import OUT, machine, record
        args.out, m = OUT, machine()  # the machine (load average) before the run, as the suite records it
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    result = collect(args.configs, args.formats, lengths, steps, args.timeout, capacity, fill, args.out,
                     quick=args.quick)
    md = markdown(result)
    print(md)
    if args.out and not args.record:  # a recorded run's result lives in results.json and performance.md
        with open(os.path.join(args.out, "long_context.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "long_context.md"), "w") as f:
            f.write(md + "\n")
    if args.record:
        record("long_context", m, result, " ".join([".venv/bin/python -m bench.long_context", *(argv or sys.argv[1:])]),
               args.quick)


if __name__ == "__main__":
    main()
