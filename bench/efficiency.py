"""V4's efficiency claims, recounted from our code: decode FLOPs per token (v4jax.cost.forward_flops), KV
bytes per token and at a context (cost.kv_bytes, from the cache pytrees) and cache bytes read per decode step,
for V4-Flash and V4-Pro against V3.2 (MLA + DSA) and GQA-8, beside performance.md §1.1-1.4's derived values
and DeepSeek's claims. Nothing is timed: the numbers depend only on the configs.
"""

from __future__ import annotations

import os

import numpy as np

from v4jax import cost
from v4jax.config import ModelConfig

CONTEXTS = {"4K": 2**12, "32K": 2**15, "128K": 2**17, "1M": 2**20}
# performance.md §1.3 (derived, GFLOP and % of V3.2) and §1.1 (claims at 1M)
SPEC_FLOPS = {"4K": (113, 109, 29, 96, 25), "32K": (142, 114, 32, 81, 22), "128K": (240, 133, 42, 55, 18),
              "1M": (1157, 304, 140, 26, 12)}
CLAIMS = {"flops_1m": {"pro": 27, "flash": 10}, "kv_1m_v32": {"pro": 10, "flash": 7},
          "kv_1m_gqa": {"pro": 2, "flash": 2}}
# performance.md §1.2 (% of V3.2 FP8 / of GQA-8 BF16 at 1M) and §1.4 (GB read per decode step at 128K, 1M)
SPEC_KV = {"pro": (10.3, 1.98), "flash": (7.2, 1.96)}
SPEC_READ = {"pro": (0.11, 0.71), "flash": (0.07, 0.48), "v3.2": (1.14, 8.5)}
V4_FORMAT, V32_FORMAT = ("fp8", "fp4"), ("fp8", "fp8")  # FlashMLA 584 B entries + FP4 keys; 656 B + FP8 keys


def run(out_dir, quick: bool = False) -> dict:
    models = {"flash": ModelConfig.preset("flash"), "pro": ModelConfig.preset("pro")}
    v32 = cost.V32_BASELINE
    flops = {}
    for ctx, n in CONTEXTS.items():
        row = {"v3.2": v32.forward_flops(n)}
        row.update({k: cost.forward_flops(m, n) for k, m in models.items()})
        flops[ctx] = {k: {p: v / 1e9 for p, v in parts.items()} for k, parts in row.items()}
    kv = {}
    for name, m in models.items():
        gqa = cost.gqa_baseline(m.n_layers)
        at = cost.kv_bytes(m, 2**20, *V4_FORMAT)
        kv[name] = {"bf16": cost.kv_bytes_per_token(m, "bf16", "bf16"),
                    "paper": cost.kv_bytes_per_token(m, *V4_FORMAT, payload_only=True),
                    "stored": cost.kv_bytes_per_token(m, *V4_FORMAT), "gib_1m": at / 2**30,
                    "pct_v32": 100 * at / cost.kv_bytes(v32, 2**20, *V32_FORMAT),
                    "pct_gqa": 100 * at / cost.kv_bytes(gqa, 2**20, "bf16")}
    kv["v3.2"] = {"bf16": cost.kv_bytes_per_token(v32, "bf16", "bf16"),
                  "stored": cost.kv_bytes_per_token(v32, *V32_FORMAT)}
    read = {}
    for name, m, fmt in (("pro", models["pro"], V4_FORMAT), ("flash", models["flash"], V4_FORMAT),
                         ("v3.2", v32, V32_FORMAT)):
        read[name] = [sum(cost.decode_read_bytes(m, n, *fmt).values()) / 1e9 for n in (2**17, 2**20)]
    result = {"flops": flops, "kv": kv, "read_gb": read}
    result["plots"] = [plot(result, models, v32, out_dir)]
    return result


def plot(result, models, v32, out_dir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ctx = np.unique(np.geomspace(2**12, 2**20, 17).astype(int))
    for name, m, style in (("V4-Flash", models["flash"], "o-"), ("V4-Pro", models["pro"], "s-"), ("V3.2", v32, "^--")):
        f = [sum((m.forward_flops(n) if m is v32 else cost.forward_flops(m, n)).values()) / 1e9 for n in ctx]
        axes[0].plot(ctx, f, style, label=name, markersize=3)
        fmt = V32_FORMAT if m is v32 else V4_FORMAT
        axes[1].plot(ctx, [cost.kv_bytes(m, n, *fmt) / 2**30 for n in ctx], style, label=f"{name} ({'/'.join(fmt)})",
                     markersize=3)
    for layers in (43, 61):
        axes[1].plot(ctx, [cost.kv_bytes(cost.gqa_baseline(layers), n, "bf16") / 2**30 for n in ctx], ":",
                     label=f"GQA-8 bf16, {layers} layers")
    axes[0].set(title="decode FLOPs per token [GFLOP]", yscale="log")
    axes[1].set(title="KV cache of one sequence [GiB]", yscale="log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    name = "efficiency.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def markdown(result: dict) -> str:
    f, kv, rd = result["flops"], result["kv"], result["read_gb"]
    lines = [f"![efficiency](perf/{result['plots'][0]})", "",
             "Decode FLOPs per token, GFLOP (`v4jax.cost.forward_flops`, position = the context; spec = "
             "performance.md §1.3):", "",
             "| context | V3.2 ours / spec | Pro ours / spec | Flash ours / spec | Pro / V3.2 ours / spec | "
             "Flash / V3.2 ours / spec |", "|---|---|---|---|---|---|"]
    for ctx, (sv, sp, sf, spp, sfp) in SPEC_FLOPS.items():
        tot = {k: sum(v.values()) for k, v in f[ctx].items()}
        lines.append(f"| {ctx} | {tot['v3.2']:.1f} / {sv} | {tot['pro']:.1f} / {sp} | {tot['flash']:.1f} / {sf} | "
                     f"{100 * tot['pro'] / tot['v3.2']:.1f}% / {spp}% | "
                     f"{100 * tot['flash'] / tot['v3.2']:.1f}% / {sfp}% |")
    one = f["1M"]
    tot = {k: sum(v.values()) for k, v in one.items()}
    lines += ["", "Breakdown at 1M (GFLOP): " + "; ".join(
        f"{k}: " + ", ".join(f"{p} {v:.1f}" for p, v in one[k].items() if v >= 0.05) for k in one) + ".",
        "", f"Claims at 1M (§1.1): Pro {100 * tot['pro'] / tot['v3.2']:.1f}% of V3.2's FLOPs (claim "
        f"{CLAIMS['flops_1m']['pro']}%), Flash {100 * tot['flash'] / tot['v3.2']:.1f}% (claim "
        f"{CLAIMS['flops_1m']['flash']}%; the spec's own recount gives 12%, §7: DeepSeek's accounting is not public).",
        "", "KV cache (`v4jax.cost.kv_bytes`, measured from `Transformer.init_cache`'s pytree; stored = FP8 584-byte "
        "entries + MXFP4 68-byte indexer keys, paper = their payload without scale bytes; V3.2 FP8 = FlashMLA's "
        "656 B + "
        "132 B FP8 key):", "",
        "| model | B/token BF16 | B/token paper | B/token stored | GiB at 1M (stored, + windows) | "
        "% of V3.2 FP8 (spec, claim) "
        "| % of GQA-8 BF16 (spec, claim) |", "|---|---|---|---|---|---|---|"]
    for name in ("pro", "flash"):
        k = kv[name]
        lines.append(f"| {name} | {k['bf16']:.0f} | {k['paper']:.1f} | {k['stored']:.2f} | {k['gib_1m']:.2f} | "
                     f"{k['pct_v32']:.2f}% ({SPEC_KV[name][0]}%, {CLAIMS['kv_1m_v32'][name]}%) | {k['pct_gqa']:.2f}% "
                     f"({SPEC_KV[name][1]}%, ~{CLAIMS['kv_1m_gqa'][name]}%) |")
    lines.append(f"| v3.2 | {kv['v3.2']['bf16']:.0f} | - | {kv['v3.2']['stored']:.0f} | "
                 f"{kv['v3.2']['stored'] * 2**20 / 2**30:.1f} | 100% | - |")
    lines += ["", "Cache bytes read per decode step, one sequence, GB (`v4jax.cost.decode_read_bytes`; performance.md §1.4): "
              + "; ".join(f"{k} {v[0]:.3f} at 128K (spec {SPEC_READ[k][0]}), {v[1]:.3f} at 1M (spec {SPEC_READ[k][1]})"
                          for k, v in rd.items())
              + f". Pro / V3.2: {100 * rd['pro'][0] / rd['v3.2'][0]:.1f}% and "
              f"{100 * rd['pro'][1] / rd['v3.2'][1]:.1f}% "
              "(spec 9.5% and 8.3%)."]
    return "\n".join(lines)
