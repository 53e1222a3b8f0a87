"""Training throughput on this machine: tokens/s and MFU of the train step, and the Muon update's share of it.

    python -m bench.train [--configs tiny small50m] [--steps 3] [--batch 8] [--seq-len 128]
    python -m bench train          (the same at the defaults, into docs/perf/results.json and docs/performance.md)

For each config: the full jitted train step of train/pretrain.py (forward + backward with MTP, balance loss,
Muon + AdamW, router bias update) on packed rows of the embedded corpus (data/stdlib; `python -m train.data
stdlib --output data/stdlib` makes it), median of --steps timed steps after compilation; then the jitted
optimizer update (tx.update on the same gradients' shapes) alone. MFU uses train/flops.py's V4 FLOP count and
the device peak of train/flops.py (on CPU a measured fp32 matmul rate; on a GPU or TPU its datasheet BF16 peak).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from train.data import PackedStream
from train.flops import peak_flops_per_device, train_flops_per_token
from train.muon import path_str, v4_optimizer
from train.pretrain import make_train_step
from v4jax.config import ModelConfig
from v4jax.model import Transformer, param_counts

CONFIGS = {
    "tiny": dict(),
    # about 50M parameters: wider, more experts
    "small50m": dict(dim=256, moe_inter_dim=256, n_routed_experts=32, q_lora_rank=256, o_lora_rank=64,
                     n_heads=8, index_n_heads=16),
}


def timed(fn, steps):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name, batch, seq_len, steps, peak):
    cfg = ModelConfig.preset("tiny", **CONFIGS[name], csa_dense=False)
    graphdef, params, others = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = v4_optimizer(params, cfg, 1e-3)
    opt_state = jax.jit(tx.init)(params)
    trainable = {path_str(p): True for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    shardings = jax.tree.map(lambda x: x.sharding, (params, others, opt_state))
    step = make_train_step(graphdef, tx, trainable, 1e-3, shardings)
    rows = PackedStream("data/stdlib", 0).batch(0, batch, seq_len)
    data = {k: jnp.asarray(v)[None] for k, v in rows.items()}
    w = {k: jnp.float32(v) for k, v in dict(lm=1.0, mtp=0.3, balance=1e-4, indexer=1.0).items()}
    state = [params, others, opt_state]

    def one():
        state[0], state[1], state[2], m = step(*state, data, w)
        return m

    t0 = time.perf_counter()
    jax.block_until_ready(one())
    compile_s = time.perf_counter() - t0
    step_s = timed(one, steps)
    grads = jax.tree.map(jnp.ones_like, state[0])
    update = jax.jit(tx.update)
    jax.block_until_ready(update(grads, state[2], state[0]))
    opt_s = timed(lambda: update(grads, state[2], state[0]), steps)
    tokens = batch * seq_len
    flops = train_flops_per_token(cfg, seq_len) * tokens
    n = param_counts(cfg)
    return {"config": name, "params": n["total"], "activated": n["activated"], "batch": batch, "seq_len": seq_len,
            "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "mfu": flops / step_s / peak, "optimizer_s": opt_s}


def line(r: dict) -> str:
    return (f"{r['config']:<9} {r['params'] / 1e6:6.1f}M params ({r['activated'] / 1e6:.1f}M active) | "
            f"{r['batch']}x{r['seq_len']} | compile {r['compile_s']:5.1f}s | step {r['step_s']:6.2f}s | "
            f"{r['tokens_per_s']:7.0f} tok/s | MFU {100 * r['mfu']:5.2f}% | optimizer update {r['optimizer_s']:5.2f}s "
            f"= {100 * r['optimizer_s'] / r['step_s']:4.1f}% of the step")


def run(out_dir, quick: bool = False, configs=tuple(CONFIGS), steps=3) -> dict:
    """The suite entry (bench/__main__.py): every config, batch 8 x 128 on CPU, 32 x 1024 on an accelerator."""
    batch, seq_len = (8, 128) if jax.default_backend() == "cpu" else (32, 1024)
    if not os.path.exists("data/stdlib/meta.json"):
        raise FileNotFoundError("bench train reads data/stdlib: make it with `python -m train.data stdlib --output "
                                "data/stdlib` (run from the repository root)")
    peak, src = peak_flops_per_device()
    rows = []
    for name in configs[:1] if quick else configs:
        rows.append(bench(name, batch, seq_len, 1 if quick else steps, peak))
        print(line(rows[-1]), flush=True)
    return {"peak_flops": peak, "peak_source": src, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["The full train step of train/pretrain.py (MTP, balance loss, Muon + AdamW, router-bias update) on "
             f"packed rows of data/stdlib; MFU against {result['peak_flops'] / 1e12:.3f} TFLOP/s "
             f"({result['peak_source']}), "
             "FLOPs from train/flops.py (v4jax.cost).", "",
             "| config | params (activated) | batch x seq | compile s | step s | tokens/s | MFU | optimizer share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M ({r['activated'] / 1e6:.1f}M) | "
                     f"{r['batch']}x{r['seq_len']} | {r['compile_s']:.1f} | {r['step_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {100 * r['mfu']:.2f}% | "
                     f"{100 * r['optimizer_s'] / r['step_s']:.1f}% |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    peak, src = peak_flops_per_device()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; peak {peak / 1e12:.3f} TFLOP/s ({src})")
    for name in args.configs:
        print(line(bench(name, args.batch, args.seq_len, args.steps, peak)))


if __name__ == "__main__":
    main()
