"""Attention scaling, measured: one CSA and one HCA layer (v4jax.attention.Attention, forward, batch 1) against
dense causal attention with the same heads, as the context grows (performance.md §5 row 4).

The dense layer is the same module's projections and output (a window-only Attention) around
jax.nn.dot_product_attention(is_causal=True, XLA): the [heads, T, T] score matrix is materialised, the
standard non-fused path. Memory is the compiled program's temporary bytes (memory_analysis; nothing is run to
get it), time the median wall time of jitted calls. A program whose temporaries exceed TIME_BUDGET_BYTES is
compiled for its memory but not run. Heads are small so that 64K tokens fit a CPU: 2 query heads of 128 dims
sharing V4's one K=V head, the indexer 1 head of 64 (indexer scan / dense FLOPs per key 1/32, as in Flash),
window 128, CSA top-k 512 (Flash's), fp32.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import cost
from v4jax.attention import Attention
from v4jax.config import ModelConfig

CFG = ModelConfig.preset("tiny", dim=256, n_layers=2, n_hash_layers=0, compress_ratios=(4, 128, 0), n_heads=2,
                         head_dim=128, rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=64,
                         window_size=128, index_n_heads=1, index_head_dim=64, index_topk=512, attn_chunk=256,
                         original_seq_len=65536, compute_dtype="float32")
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
KINDS = {"csa": 0, "hca": 1, "dense": 2}  # layer index in CFG.compress_ratios (2: window-only projections)
TIME_BUDGET_BYTES = 5 << 30


def layer_fn(kind: str):
    """A jitted forward x [1, T, dim] -> [1, T, dim] of one layer of `kind`."""
    attn = Attention(CFG, KINDS[kind], rngs=nnx.Rngs(0))
    if kind != "dense":
        return nnx.jit(lambda m, x: m(x)), attn

    def dense(m, x):
        T = x.shape[1]
        pos = jnp.arange(T)[None]
        q, kv, _ = m._project(x, pos)
        kv = kv[:, :, None, :]  # the shared K=V head
        o = jax.nn.dot_product_attention(q, kv, kv, scale=CFG.head_dim**-0.5, is_causal=True, implementation="xla")
        return m._output(o, pos, x.dtype)

    return nnx.jit(dense), attn


def measure(kind: str, T: int, reps: int) -> dict:
    fn, attn = layer_fn(kind)
    x = jax.random.normal(jax.random.key(0), (1, T, CFG.dim), jnp.float32)
    compiled = fn.lower(attn, x).compile() if hasattr(fn, "lower") else None
    mem = compiled.memory_analysis().temp_size_in_bytes if compiled is not None else None
    out = {"kind": kind, "context": T, "temp_bytes": mem, "seconds": None}
    if mem is not None and mem > TIME_BUDGET_BYTES:
        return out
    fn(attn, x).block_until_ready()  # warm-up (compiles through the jit cache)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(attn, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    out["seconds"] = statistics.median(times)
    return out


def slope(rows, key, lo=8192):
    """Log-log growth exponent of `key` over the contexts >= lo where it was measured."""
    pts = [(r["context"], r[key]) for r in rows if r[key] and r["context"] >= lo]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def run(out_dir, quick: bool = False) -> dict:
    contexts = CONTEXTS[:4] if quick else CONTEXTS
    rows = []
    for T in contexts:
        for kind in KINDS:
            r = measure(kind, T, reps=1 if T >= 32768 or quick else 3)
            flops = (cost.dense_attention_flops(CFG, T) if kind == "dense" else
                     sum(cost.layer_attention_flops(CFG, CFG.compress_ratios[KINDS[kind]], T).values()))
            r["attention_gflop"] = flops * T / 1e9  # core attention + indexer scan over the T queries
            rows.append(r)
            print(f"attention_scaling {kind} T={T}: temp {r['temp_bytes'] / 2**20:.1f} MiB, "
                  f"time {r['seconds'] if r['seconds'] is None else round(r['seconds'], 3)} s", flush=True)
    by = {k: [r for r in rows if r["kind"] == k] for k in KINDS}
    result = {"config": {k: getattr(CFG, k) for k in ("dim", "n_heads", "head_dim", "window_size", "index_n_heads",
                                                      "index_head_dim", "index_topk", "attn_chunk", "compute_dtype")},
              "rows": rows, "time_budget_bytes": TIME_BUDGET_BYTES,
              "slopes": {k: {key: slope(v, key) for key in ("seconds", "temp_bytes")} for k, v in by.items()},
              "crossover": {}}
    for k in ("csa", "hca"):  # the first measured context from which the layer beats dense for good
        for key in ("seconds", "temp_bytes"):
            pairs = [(a["context"], a[key] < d[key]) for a, d in zip(by[k], by["dense"]) if a[key] and d[key]]
            wins = [c for i, (c, _) in enumerate(pairs) if all(w for _, w in pairs[i:])]
            result["crossover"][f"{k}_{key}"] = wins[0] if wins else None
    result["plots"] = [plot(result, out_dir)]
    return result


def plot(result: dict, out_dir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, style in (("csa", "o-"), ("hca", "s-"), ("dense", "^--")):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        for ax, key, scale in ((axes[0], "seconds", 1.0), (axes[1], "temp_bytes", 2**-20)):
            pts = [(r["context"], r[key] * scale) for r in rows if r[key]]
            if pts:
                s = result["slopes"][kind][key]
                label = kind.upper() + (f" (slope {s:.2f})" if s is not None else "")
                ax.plot(*zip(*pts), style, label=label)
    for ax, title in ((axes[0], "forward wall time [s]"), (axes[1], "compiled temporary memory [MiB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context T (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("One V4 layer vs dense causal attention, same heads (log-log; slope 1 = linear, 2 = quadratic)")
    fig.tight_layout()
    name = "attention_scaling.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"Layer: dim {c['dim']}, {c['n_heads']} query heads of {c['head_dim']} over one shared K=V head, window "
             f"{c['window_size']}, indexer {c['index_n_heads']} x {c['index_head_dim']}, top-k {c['index_topk']}, "
             f"query chunk {c['attn_chunk']}, {c['compute_dtype']}, batch 1. Dense programs whose temporaries exceed "
             f"{result['time_budget_bytes'] / 2**30:.0f} GiB were compiled (memory) but not run (time: -).",
             "", f"![attention scaling](perf/{result['plots'][0]})", "",
             "| context | CSA s | HCA s | dense s | CSA MiB | HCA MiB | dense MiB | GFLOP CSA / HCA / dense | "
             "CSA / dense: time, FLOPs | HCA / dense: time, FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in result["rows"]:
        by.setdefault(r["context"], {})[r["kind"]] = r

    def sec(r):
        return "-" if r["seconds"] is None else f"{r['seconds']:.3f}"

    def vs_dense(d, k):  # the layer over dense: measured time (where both ran) and counted attention FLOPs
        ran = None not in (d[k]["seconds"], d["dense"]["seconds"])
        t = f"{d[k]['seconds'] / d['dense']['seconds']:.2f}" if ran else "-"
        return f"{t}, {d[k]['attention_gflop'] / d['dense']['attention_gflop']:.3f}"

    for T, d in by.items():
        lines.append(f"| {T} | {sec(d['csa'])} | {sec(d['hca'])} | {sec(d['dense'])} | "
                     + " | ".join(f"{d[k]['temp_bytes'] / 2**20:.1f}" for k in ("csa", "hca", "dense"))
                     + " | " + " / ".join(f"{d[k]['attention_gflop']:.1f}" for k in ("csa", "hca", "dense"))
                     + f" | {vs_dense(d, 'csa')} | {vs_dense(d, 'hca')} |")
    s, x = result["slopes"], result["crossover"]

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    lines += ["", "Growth exponents (log-log fit over T >= 8K; 1 = linear, 2 = quadratic): "
              + "; ".join(f"{k.upper()} time {f(s[k]['seconds'])}, memory {f(s[k]['temp_bytes'])}" for k in s) + ".",
              "", "Measured crossover (the first context from which the layer stays below dense): "
              + "; ".join(f"{k.upper()} time {x[f'{k}_seconds'] or 'none measured'}, memory "
                          f"{x[f'{k}_temp_bytes'] or 'none measured'}" for k in ("csa", "hca")) + " tokens."]
    both = [T for T, d in by.items() if d["dense"]["seconds"] is not None]
    if both:  # performance.md §5 row 4: time ratio <= 2x the FLOP ratio at N >= 32K
        d = by[max(both)]
        dn = d["dense"]
        over = {k: (d[k]["seconds"] / dn["seconds"]) / (d[k]["attention_gflop"] / dn["attention_gflop"])
                for k in ("csa", "hca")}
        lines += ["", "Against performance.md §5 row 4 (time ratio to dense at most 2x the FLOP ratio, at N >= 32K): "
                  f"at {max(both)} tokens, the largest context where dense ran, CSA's time ratio is "
                  f"{over['csa']:.1f}x its FLOP ratio and HCA's {over['hca']:.1f}x."]
    return "\n".join(lines)
