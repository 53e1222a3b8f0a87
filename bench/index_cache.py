"""IndexCache (ModelConfig.index_topk_freq / index_topk_pattern, issue 16 item 4): what skipping CSA layers' indexers
saves and what it changes, on the `tiny` preset (3 CSA layers: 1, 3, 5).

    .venv/bin/python -m bench.index_cache [--length 4096] [--steps 32] [--reps 3] [--trained configs/train/tiny.yaml]
        [--out FILE.json]

Variants, one process, the same weights (v4jax.model.with_config): `freq1` (the default: every CSA layer computes
its top-k), `freq2` (index_topk_freq 2: layers 1 and 5 compute, 3 reuses 1's), `first` (pattern FSS: only layer 1
computes, 3 and 5 reuse its top-k).

- speed, random weights (bench.decode.build, compute dtype bf16): `length` random tokens prefilled through the
  cache in chunks of 1,024 (infer.generate's `_step`, cache donated), then `steps` greedy single-token decode
  steps. Each repetition runs the variants one after the other (interleaved, so that a change in the machine's
  load hits all of them); a first repetition compiles and is not counted. Reported: the median over repetitions
  of the prefill seconds (sum of the chunks) and of the median decode step.
- deviation from `freq1`: the relative RMS of the prefill logits over every position and vocabulary entry
  (||a - b|| / ||b||) and the share of positions whose argmax (greedy token) agrees; with random weights and
  random tokens, and with `--trained` on a trained run's model (its newest checkpoint, train.pretrain.restore_run)
  over the first `length` tokens of the stdlib corpus, full forward, where the next-token loss is given too.

Not part of `python -m bench` (that suite rewrites docs/performance.md); its numbers are in docs/inference.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.decode import build, greedy_steps
from infer.generate import _step, split
from v4jax.config import ModelConfig
from v4jax.model import with_config

VARIANTS = {"freq1": {}, "freq2": {"index_topk_freq": 2}, "first": {"index_topk_pattern": "FSS"}}
CHUNK = 1024
CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "stdlib",
                      "00000.tokens.npy")


def run_once(static, leaves, ids: np.ndarray, steps: int) -> dict:
    """Prefill ids [1, L] (L a multiple of CHUNK, or shorter than it) then `steps` greedy decode steps."""
    L = ids.shape[1]
    model = static.merge(leaves)
    cache = model.init_cache(1, -(-(L + steps + 1) // 128) * 128)
    chunk = min(CHUNK, L)
    logits, prefill_s = [], 0.0
    for s in range(0, L, chunk):
        t0 = time.perf_counter()
        out, _, cache = _step(static, leaves, cache, jnp.asarray(ids[:, s:s + chunk]), jnp.asarray([chunk], jnp.int32))
        out.block_until_ready()
        prefill_s += time.perf_counter() - t0
        logits.append(np.asarray(out[0], np.float32))
    step_s, tokens, _ = greedy_steps(static, leaves, cache, jnp.argmax(out[:, -1:], axis=-1), steps)
    return {"prefill_s": prefill_s, "decode_ms": 1e3 * statistics.median(step_s), "logits": np.concatenate(logits),
            "tokens": tokens}


def deviation(a: np.ndarray, ref: np.ndarray) -> dict:
    """Relative RMS of logits a vs ref [positions, vocab] and the share of positions with the same argmax."""
    return {"rel_rms": float(np.linalg.norm(a - ref) / np.linalg.norm(ref)),
            "greedy_agree": float(np.mean(np.argmax(a, -1) == np.argmax(ref, -1)))}


def speed(length: int, steps: int, reps: int) -> dict:
    base = build(ModelConfig.preset("tiny"))
    models = {name: split(with_config(base, **changes)) for name, changes in VARIANTS.items()}
    ids = np.random.default_rng(1).integers(0, base.cfg.vocab_size, (1, length)).astype(np.int32)
    runs = {name: [] for name in VARIANTS}
    for rep in range(reps + 1):  # rep 0 compiles
        for name, (static, leaves) in models.items():
            r = run_once(static, leaves, ids, steps)
            if rep:
                runs[name].append(r)
            print(f"rep {rep} {name}: prefill {r['prefill_s']:.3f} s, decode {r['decode_ms']:.2f} ms/step", flush=True)
    out = {}
    for name, rs in runs.items():
        out[name] = {"prefill_s": statistics.median(r["prefill_s"] for r in rs),
                     "decode_ms": statistics.median(r["decode_ms"] for r in rs),
                     "prefill_runs_s": [round(r["prefill_s"], 4) for r in rs],
                     "decode_runs_ms": [round(r["decode_ms"], 3) for r in rs],
                     **deviation(rs[0]["logits"], runs["freq1"][0]["logits"]),
                     "decoded_tokens_agree": float(np.mean(np.equal(rs[0]["tokens"], runs["freq1"][0]["tokens"])))}
    return out


def trained_deviation(run_config: str, length: int) -> dict:
    """Deviation and next-token loss of a trained run's model over the corpus' first `length` tokens."""
    from train.pretrain import restore_run

    base = restore_run([run_config])[0]
    ids = jnp.asarray(np.asarray(np.load(CORPUS, mmap_mode="r")[:length + 1], np.int32)[None])
    out, ref = {}, None
    for name, changes in VARIANTS.items():
        logits = np.asarray(nnx.jit(lambda m, i: m(i))(with_config(base, **changes), ids[:, :-1]), np.float32)[0]
        ref = logits if ref is None else ref
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        loss = float(-np.mean(logp[np.arange(length), np.asarray(ids[0, 1:])]))
        out[name] = {"loss": loss, **deviation(logits, ref)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (a multiple of 1024, or fewer)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after one that compiles)")
    p.add_argument("--trained", default=None, help="a training run config (e.g. configs/train/tiny.yaml)")
    p.add_argument("--trained-length", type=int, default=1024, help="corpus tokens for the trained model")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    result = {"command": "python -m bench.index_cache " + " ".join(argv if argv is not None else os.sys.argv[1:]),
              "load_average_start": round(load, 2), "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
              "length": args.length, "steps": args.steps, "reps": args.reps,
              "speed": speed(args.length, args.steps, args.reps)}
    if args.trained:
        result["trained"] = trained_deviation(args.trained, args.trained_length)
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
