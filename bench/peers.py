"""v4jax beside HF transformers' DeepseekV4ForCausalLM on the same configs, weights and batches, in one run:
forward tokens/s, training-step tokens/s and decode tokens/s, each as the ratio v4jax / HF.

Both sides get the weights v4jax.hub.random_hub_checkpoint(hf_config, seed) (HF through the parity oracle's
name map, v4jax through checkpoint.load_hub_state), fp32 activations, plain numerics (qat off) and next-token
cross entropy with AdamW (no MTP, balance or indexer loss on either side). HF runs first, in the oracle env
(.venv-oracle: PyTorch CPU, eager attention) via bench/peer_hf.py, then v4jax here: jitted, after compilation,
median of the same number of timed repetitions. MaxText's V4 port is not run (see docs/performance.md).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.decode import CONFIGS as DECODE_CONFIGS
from bench.decode import step as decode_step
from bench.train import timed
from v4jax import config as config_mod
from v4jax.checkpoint import load_hub_state
from v4jax.config import ModelConfig
from v4jax.hub import random_hub_checkpoint
from v4jax.model import Transformer, param_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE_PYTHON = os.path.join(ROOT, ".venv-oracle", "bin", "python")
CONFIGS = {"tiny": ModelConfig.preset("tiny"), "small": DECODE_CONFIGS["small"]}
SHAPE = dict(seed=0, batch=1, seq_len=512, steps=2, prompt_len=512, decode_steps=16, lr=1e-4)


def hf_config(cfg: ModelConfig) -> dict:
    """An HF transformers config.json dict for cfg (the inverse of ModelConfig.from_hf_config)."""
    d = {hf: getattr(cfg, ours) for hf, ours in config_mod._HF_NAMES.items()}
    d["compress_ratios"] = list(cfg.compress_ratios)
    d.update(num_key_value_heads=1, model_type="deepseek_v4", hidden_act="silu", tie_word_embeddings=False,
             norm_topk_prob=True, topk_method="noaux_tc", bos_token_id=0, eos_token_id=1,
             max_position_embeddings=int(cfg.rope_factor * cfg.original_seq_len),
             rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                           "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                           "beta_slow": cfg.beta_slow, "rope_theta": cfg.rope_theta})
    return d


def median_time(fn, steps: int) -> float:
    jax.block_until_ready(fn())  # compiles
    return timed(fn, steps)


def v4jax_times(hf: dict, spec: dict) -> dict:
    cfg = ModelConfig.from_hf_config(hf, compute_dtype="float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    load_hub_state(model, random_hub_checkpoint(hf, spec["seed"]))
    rng = np.random.default_rng(spec["seed"])  # the same token ids as peer_hf.py
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (spec["batch"], spec["seq_len"])))
    forward = nnx.jit(lambda m, x: m(x))
    forward_s = median_time(lambda: forward(model, ids), spec["steps"])

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # torch.optim.AdamW's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every parameter
    tx = optax.adamw(spec["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

    def loss_fn(p, x):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

    @jax.jit
    def train_step(p, opt_state, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    state = [params, tx.init(params)]

    def one():
        state[0], state[1], loss = train_step(*state, ids)
        return loss

    train_s = median_time(one, spec["steps"])

    # decode: prefill the prompt, then single-token steps over the cache (bench/decode.py's jitted step)
    prompt = ids[:1, :spec["prompt_len"]]
    max_len = -(-(spec["prompt_len"] + spec["decode_steps"] + 1) // 128) * 128
    cache = model.init_cache(1, max_len)
    token, cache = decode_step(model, cache, prompt)
    times = []
    for _ in range(spec["decode_steps"]):
        t0 = time.perf_counter()
        token, cache = decode_step(model, cache, token[:, None])
        token.block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"forward_s": forward_s, "train_s": train_s, "decode_step_s": statistics.median(times[1:])}


def hf_times(hf: dict, spec: dict) -> dict:
    if not os.path.exists(ORACLE_PYTHON):
        raise FileNotFoundError(f"{ORACLE_PYTHON} is missing: create it with `bash tests/oracle/setup_env.sh`")
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        json.dump({**spec, "hf_config": hf}, open(spec_path, "w"))
        subprocess.run([ORACLE_PYTHON, os.path.join(ROOT, "bench", "peer_hf.py"), spec_path, out_path], check=True)
        return json.load(open(out_path))


def run(out_dir, quick: bool = False) -> dict:
    with jax.default_device(jax.devices("cpu")[0]):  # HF runs on the CPU: so does v4jax, on a GPU host too
        return _run(quick)


def _run(quick: bool) -> dict:
    spec = dict(SHAPE, steps=1, decode_steps=4) if quick else dict(SHAPE)
    rows = []
    for name, cfg in CONFIGS.items():
        hf = hf_config(cfg)
        theirs = hf_times(hf, spec)
        ours = v4jax_times(hf, spec)
        tokens = spec["batch"] * spec["seq_len"]
        row = {"config": name, "params": param_counts(cfg)["total_without_mtp"],
               "activated": param_counts(cfg)["activated"], "torch": theirs["torch"],
               "transformers": theirs["transformers"], "torch_threads": theirs["threads"]}
        for key, per in (("forward", tokens), ("train", tokens), ("decode", 1)):
            s_key = "decode_step_s" if key == "decode" else f"{key}_s"
            row[f"{key}_tps_v4jax"] = per / ours[s_key]
            row[f"{key}_tps_hf"] = per / theirs[s_key]
            row[f"{key}_ratio"] = theirs[s_key] / ours[s_key]
        rows.append(row)
        print(f"peers {name}: " + ", ".join(f"{k} {row[f'{k}_ratio']:.2f}x" for k in ("forward", "train", "decode")),
              flush=True)
    return {"shape": spec, "rows": rows}


def markdown(result: dict) -> str:
    s = result["shape"]
    r0 = result["rows"][0]
    lines = [f"Batch {s['batch']} x {s['seq_len']} tokens for forward and training; decode: one sequence, "
             f"{s['decode_steps']} single-token steps after a {s['prompt_len']}-token prompt; median of {s['steps']} "
             f"timed repetitions. HF: transformers {r0['transformers']}, torch {r0['torch']} "
             f"({r0['torch_threads']} threads), eager, fp32. v4jax: jitted, fp32. "
             "Ratio = v4jax tokens/s / HF tokens/s.",
             "", "| config | params (activated) | forward tok/s v4jax / HF | ratio | train tok/s v4jax / HF | ratio | "
             "decode tok/s v4jax / HF | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [f"{r[f'{k}_tps_v4jax']:.1f} / {r[f'{k}_tps_hf']:.1f} | **{r[f'{k}_ratio']:.2f}x**"
                 for k in ("forward", "train", "decode")]
        size = f"{r['params'] / 1e6:.1f}M ({r['activated'] / 1e6:.1f}M)"
        lines.append(f"| {r['config']} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
