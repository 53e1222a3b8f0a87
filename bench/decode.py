"""Decode speed over V4's compressed cache on CPU: tokens/s of one sequence after prefilled contexts of
several lengths, and each step time over the one at the shortest context (V4's promise: nearly flat).

    .venv/bin/python bench/decode.py [--contexts 1024 8192 ...] [--steps 32] [--configs tiny small]
                                     [--kv-format fp8 --index-format fp4] [--write docs/inference.md]
    .venv/bin/python -m bench decode   (the defaults, into docs/perf/results.json and docs/performance.md)

For each config and context: prefill `context` random tokens through Transformer.step in chunks of 512, then
time `steps` single-token decode steps (infer.generate's `_step`, the one generate() runs: jitted as a pure
function of the split model state, cache donated; the first step is a warm-up and not counted; median step
time, the argmax included). Prefill tokens/s leaves out the first chunk, which compiles. The cache is sized for
context + steps tokens: a step indexes every filled CSA key and attends (decoding them from the cache's format)
the top-k of them plus every filled HCA entry; that is the part that grows with the context. Weights are random
(1/sqrt(fan_in)); speed does not depend on them.

Configs: `tiny` is the test preset (window 16, index top-k 8). `small` is V4's layout at ~56M parameters
(29M activated): dim 512, 8 layers (2 window-only, then CSA / HCA alternating), window 128, 8 heads of 128,
indexer 16 heads of 128 with top-k 512, 8 routed experts (2 active) + 1 shared of width 256, vocab 16384.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from infer.generate import _step, split  # noqa: E402
from v4jax.config import ModelConfig  # noqa: E402
from v4jax.cost import cache_bytes  # noqa: E402
from v4jax.kv_cache import INDEX_FORMATS, KV_FORMATS  # noqa: E402
from v4jax.model import Transformer, param_counts  # noqa: E402

CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    "small": ModelConfig.preset(
        "tiny", vocab_size=16384, dim=512, n_layers=8, n_hash_layers=1, n_heads=8, head_dim=128, q_lora_rank=256,
        o_groups=4, o_lora_rank=128, window_size=128, compress_ratios=(0, 0, 4, 128, 4, 128, 4, 128, 0),
        original_seq_len=4096, index_n_heads=16, index_topk=512, n_routed_experts=8, n_activated_experts=2,
        moe_inter_dim=256, attn_chunk=256),
}
PREFILL_CHUNK = 512
MARK_BEGIN, MARK_END = "<!-- bench/decode.py: begin -->", "<!-- bench/decode.py: end -->"


def build(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var.ndim >= 2:
            var.set_value(jnp.asarray(rng.standard_normal(var.shape) / np.sqrt(var.shape[-1]), var.dtype))
    return model


def greedy_steps(static, leaves, cache, token: jax.Array, n: int) -> tuple[list[float], list[int], object]:
    """n greedy single-token steps from `token` [1, 1] through infer.generate's jitted step (split state, cache
    donated) -> (the seconds of each step, its token included, the n tokens, the cache)."""
    one = jnp.ones((1,), jnp.int32)
    times, tokens = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        logits, _, cache = _step(static, leaves, cache, token, one)
        token = jnp.argmax(logits[:, -1:], axis=-1)
        token.block_until_ready()
        times.append(time.perf_counter() - t0)
        tokens.append(int(token[0, 0]))
    return times, tokens, cache


def measure(model: Transformer, context: int, steps: int, kv_format, index_format) -> dict:
    """Prefill `context` tokens, then time `steps` + 1 decode steps -> prefill tokens/s, median step seconds."""
    vocab = model.cfg.vocab_size
    max_len = -(-(context + steps + 1) // 128) * 128  # a multiple of the HCA ratio
    cache = model.init_cache(1, max_len, kv_format, index_format)
    ids = np.random.default_rng(1).integers(0, vocab, (1, context))
    static, leaves = split(model)
    chunk_s = []
    for s in range(0, context, PREFILL_CHUNK):  # context is a multiple of the chunk, or smaller than it
        t0 = time.perf_counter()
        chunk = jnp.asarray(ids[:, s:s + PREFILL_CHUNK])
        logits, _, cache = _step(static, leaves, cache, chunk, jnp.asarray([chunk.shape[1]], jnp.int32))
        token = jnp.argmax(logits[:, -1:], axis=-1)
        token.block_until_ready()
        chunk_s.append(time.perf_counter() - t0)
    # the first chunk compiles the step: prefill speed is measured on the others
    prefill = PREFILL_CHUNK * (len(chunk_s) - 1) / sum(chunk_s[1:]) if len(chunk_s) > 1 else float("nan")
    times, _, cache = greedy_steps(static, leaves, cache, token, steps + 1)
    assert int(cache.lengths[0]) == context + steps + 1
    return {"prefill_tps": prefill, "step_s": statistics.median(times[1:]), "max_len": max_len}


def table(rows: list[dict], contexts: list[int]) -> str:
    lines = ["| config | params (activated) | context | cache / sequence | prefill tokens/s | step ms | tokens/s | "
             f"step / step at {contexts[0]} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['params']} | {r['context']} | {r['cache_mb']:.2f} MB | "
                     f"{r['prefill_tps']:.0f} | {1e3 * r['step_s']:.1f} | {1 / r['step_s']:.1f} | {r['ratio']} |")
    return "\n".join(lines)


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def write(path: str, text: str) -> None:
    """Replace the block between the bench markers in `path` (appended when the file has none)."""
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{MARK_BEGIN}\n{text}\n{MARK_END}"
    pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old + ("\n" if old else "") + block + "\n"
    with open(path, "w") as f:
        f.write(new)


def collect(configs, contexts, steps, kv_format=None, index_format=None) -> list[dict]:
    """measure() every config at every context (shortest first) -> one row each."""
    rows = []
    for name in configs:
        cfg = CONFIGS[name]
        counts = param_counts(cfg)
        model = build(cfg)
        size = cache_bytes(cfg, kv_format, index_format)
        short = None
        for context in contexts:
            r = measure(model, context, steps, kv_format, index_format)
            short = short or r["step_s"]
            rows.append({**r, "config": name, "context": context,
                         "params": f"{counts['total_without_mtp'] / 1e6:.1f}M ({counts['activated'] / 1e6:.1f}M)",
                         "cache_mb": (size.per_sequence + size.per_token * r["max_len"]) / 1e6,
                         "ratio": f"{r['step_s'] / short:.2f}"})
            print(f"{name} context {context}: prefill {r['prefill_tps']:.0f} tokens/s, "
                  f"step {1e3 * r['step_s']:.1f} ms ({1 / r['step_s']:.1f} tokens/s)", flush=True)
    return rows


def run(out_dir, quick: bool = False) -> dict:
    """The suite entry (bench/__main__.py): both configs, contexts 1024 and 8192 (32768 on an accelerator), FP8
    entries + FP4 keys."""
    contexts, steps = ([512], 4) if quick else ([1024, 8192] if jax.default_backend() == "cpu" else [1024, 32768], 16)
    rows = collect(list(CONFIGS), contexts, steps, "fp8", "fp4")
    return {"contexts": contexts, "steps": steps, "kv_format": "fp8", "index_format": "fp4",
            "compute_dtype": CONFIGS["tiny"].compute_dtype, "rows": rows}


def markdown(result: dict) -> str:
    return (f"Batch 1, {result['steps']} timed single-token steps (median) after prefilling each context in chunks of "
            f"{PREFILL_CHUNK}; kv_format={result['kv_format']}, index_format={result['index_format']}, compute dtype "
            f"{result['compute_dtype']}; random weights (bench/decode.py).\n\n"
            + table(result["rows"], result["contexts"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192], help="prefilled tokens, shortest first")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    p.add_argument("--kv-format", choices=KV_FORMATS, help="storage of windows + entries (default: compute dtype)")
    p.add_argument("--index-format", choices=INDEX_FORMATS, help="storage of indexer keys (default: compute dtype)")
    p.add_argument("--write", default=None, metavar="MD", help="put the results table into this markdown file")
    args = p.parse_args(argv)
    args.contexts = sorted(args.contexts)
    for c in args.contexts:
        if c > PREFILL_CHUNK and c % PREFILL_CHUNK:
            p.error(f"context {c} is not a multiple of the prefill chunk {PREFILL_CHUNK}: use e.g. 1024 or 8192")
    load = os.getloadavg()[0]
    rows = collect(args.configs, args.contexts, args.steps, args.kv_format, args.index_format)
    result = table(rows, args.contexts)
    print(result)
    if args.write:
        formats = f"kv_format={args.kv_format or 'compute dtype'}, index_format={args.index_format or 'compute dtype'}"
        command = " ".join(["bench/decode.py", *(argv if argv is not None else sys.argv[1:])])
        machine = (f"{cpu_name()}, {os.cpu_count()} CPUs (1-minute load average {load:.1f} at the start, "
                   f"{os.getloadavg()[0]:.1f} at the end), jax {jax.__version__} ({jax.default_backend()})")
        write(args.write, f"`.venv/bin/python {command}` on {machine}; batch 1, {args.steps} timed steps (median), "
                          f"{formats}, compute dtype {CONFIGS[args.configs[0]].compute_dtype}.\n\n{result}")


if __name__ == "__main__":
    main()
