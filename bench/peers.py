"""v4jax beside HF transformers' DeepseekV4ForCausalLM on the same configs, weights and batches, in one run:
forward tokens/s, training-step tokens/s, decode tokens/s and end-to-end greedy generate() tokens/s, each as the
ratio v4jax / HF.

Both sides get the weights v4jax.hub.random_hub_checkpoint(hf_config, seed) (HF through the parity oracle's
name map, v4jax through checkpoint.load_hub_state), fp32 activations, plain numerics (qat off) and next-token
cross entropy with AdamW (no MTP, balance or indexer loss on either side). HF runs in the oracle env
(.venv-oracle: PyTorch CPU, eager attention) as a worker process (bench/peer_hf.py) that this module drives, so
the repetitions alternate: one warm-up each (v4jax compiles there), then v4jax, HF, v4jax, HF, ... and the
median of each side. v4jax runs jitted as pure functions of the split model state; decode and generate go
through infer.generate (its `_step`, the step generate's prefill takes, and `generate` itself). The training
step runs last on both sides (it changes the weights; decode and generate see the loaded ones). MaxText's V4
port is not run (see docs/performance.md).

decode: a prompt of prompt_len tokens through the cache, then decode_steps greedy single-token steps, each timed
(the first of each repetition left out); tokens/s = 1 / median step. generate: greedy generation of new_tokens
tokens after the same prompt (v4jax infer.generate.generate with SamplingParams(max_new_tokens); HF
model.generate(..., do_sample=False), EOS off on both), wall time end to end, prefill included; tokens/s =
new_tokens / median seconds. The two sides' greedy tokens are compared and the agreement reported (random
weights: a near-tie between two logits may go either way in fp32, so it is reported, not asserted).
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

from bench.decode import CONFIGS as DECODE_CONFIGS, greedy_steps
from infer.generate import SamplingParams, _step, generate, split
from v4jax import config as config_mod
from v4jax.checkpoint import load_hub_state
from v4jax.config import ModelConfig
from v4jax.hub import random_hub_checkpoint
from v4jax.model import Transformer, param_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE_PYTHON = os.path.join(ROOT, ".venv-oracle", "bin", "python")
CONFIGS = {"tiny": ModelConfig.preset("tiny"), "small": DECODE_CONFIGS["small"]}
SHAPE = dict(seed=0, batch=1, seq_len=512, steps=2, prompt_len=512, decode_steps=16, new_tokens=16, lr=1e-4)
QUICK = dict(steps=1, decode_steps=4, new_tokens=4)
KINDS = ("forward", "train", "decode", "generate")


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


class V4jaxSide:
    """The v4jax side: the same operations as bench/peer_hf.py's worker, each run once per call."""

    def __init__(self, hf: dict, spec: dict):
        cfg = ModelConfig.from_hf_config(hf, compute_dtype="float32")
        self.model = model = Transformer(cfg, rngs=nnx.Rngs(0))
        load_hub_state(model, random_hub_checkpoint(hf, spec["seed"]))
        self.spec = spec
        rng = np.random.default_rng(spec["seed"])  # the same token ids as peer_hf.py
        self.ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (spec["batch"], spec["seq_len"])))
        self.prompt = self.ids[:1, :spec["prompt_len"]]
        self.static, self.leaves = split(model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self._forward = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x))
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

        self._train_step = train_step
        self.params = params
        self.train_state = [params, tx.init(params)]  # the module keeps the loaded weights: decode sees those
        # the decode cache's capacity: prompt + steps, rounded up to a multiple of 128 (as bench/decode.py)
        self.max_len = -(-(spec["prompt_len"] + spec["decode_steps"] + 1) // 128) * 128

    def forward(self) -> dict:
        t0 = time.perf_counter()
        self._forward(self.params, self.ids).block_until_ready()
        return {"s": time.perf_counter() - t0}

    def train(self) -> dict:
        t0 = time.perf_counter()
        self.train_state[0], self.train_state[1], loss = self._train_step(*self.train_state, self.ids)
        loss.block_until_ready()
        return {"s": time.perf_counter() - t0}

    def decode(self) -> dict:
        """The prompt, then decode_steps greedy steps through infer.generate's jitted step (split state, cache
        donated), each timed with its argmax."""
        cache = self.model.init_cache(1, self.max_len)
        logits, _, cache = _step(self.static, self.leaves, cache, self.prompt,
                                 jnp.asarray([self.prompt.shape[1]], jnp.int32))
        times, _, _ = greedy_steps(self.static, self.leaves, cache, jnp.argmax(logits[:, -1:], axis=-1),
                                   self.spec["decode_steps"])
        return {"step_s": times[1:]}

    def generate(self) -> dict:
        prompt = [np.asarray(self.prompt[0]).tolist()]
        t0 = time.perf_counter()
        out = generate(self.model, prompt, SamplingParams(max_new_tokens=self.spec["new_tokens"]))
        return {"s": time.perf_counter() - t0, "tokens": out[0]}


class HFSide:
    """bench/peer_hf.py as a worker in the oracle env: call(op) runs one operation there -> its answer."""

    def __init__(self, hf: dict, spec: dict):
        if not os.path.exists(ORACLE_PYTHON):
            raise FileNotFoundError(f"{ORACLE_PYTHON} is missing: create it with `bash tests/oracle/setup_env.sh`")
        self._tmp = tempfile.TemporaryDirectory()
        spec_path = os.path.join(self._tmp.name, "spec.json")
        with open(spec_path, "w") as f:
            json.dump({**spec, "hf_config": hf}, f)
        self.proc = subprocess.Popen([ORACLE_PYTHON, os.path.join(ROOT, "bench", "peer_hf.py"), spec_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer("start")

    def _answer(self, op: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench/peer_hf.py ended (exit status {self.proc.wait()}) during {op!r}: its "
                               "stderr above says why")
        return json.loads(line)

    def call(self, op: str) -> dict:
        self.proc.stdin.write(op + "\n")
        self.proc.stdin.flush()
        return self._answer(op)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()
        self._tmp.cleanup()


def interleaved(ours, theirs, reps: int) -> tuple[list[dict], list[dict]]:
    """One untimed call each (v4jax compiles in its), then reps rounds of (ours, theirs) -> their answers."""
    ours(), theirs()
    a, b = [], []
    for _ in range(reps):
        a.append(ours())
        b.append(theirs())
    return a, b


def compare(hf: dict, spec: dict) -> dict:
    """Every KIND on both sides, interleaved -> seconds per unit (forward_s, train_s, decode_step_s, generate_s)
    per side and both sides' greedy tokens."""
    ours = V4jaxSide(hf, spec)
    theirs = HFSide(hf, spec)
    try:
        out = {"v4jax": {}, "hf": dict(theirs.info)}
        for kind in ("forward", "decode", "generate", "train"):  # train last: it changes the weights
            a, b = interleaved(getattr(ours, kind), lambda: theirs.call(kind), spec["steps"])
            for side, answers in (("v4jax", a), ("hf", b)):
                samples = [t for r in answers for t in r["step_s"]] if kind == "decode" else [r["s"] for r in answers]
                out[side]["decode_step_s" if kind == "decode" else f"{kind}_s"] = statistics.median(samples)
                out[side].setdefault("samples", {})[kind] = samples
                if kind == "generate":
                    out[side]["tokens"] = answers[-1]["tokens"]
    finally:
        theirs.close()
    return out


def agreement(ours: list[int], theirs: list[int]) -> dict:
    """Greedy tokens of both sides: how many positions agree, and the first that does not (None: all agree)."""
    same = [a == b for a, b in zip(ours, theirs)]
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    return {"agree": sum(same), "of": max(len(ours), len(theirs)), "first_difference": first}


def run(out_dir, quick: bool = False) -> dict:
    with jax.default_device(jax.devices("cpu")[0]):  # HF runs on the CPU: so does v4jax, on a GPU host too
        return _run(quick)


def _run(quick: bool, configs=None) -> dict:
    spec = dict(SHAPE, **QUICK) if quick else dict(SHAPE)
    rows = []
    for name in configs or CONFIGS:
        cfg = CONFIGS[name]
        hf = hf_config(cfg)
        load_start = os.getloadavg()[0]
        times = compare(hf, spec)
        ours, theirs = times["v4jax"], times["hf"]
        tokens = spec["batch"] * spec["seq_len"]
        row = {"config": name, "params": param_counts(cfg)["total_without_mtp"],
               "activated": param_counts(cfg)["activated"], "torch": theirs["torch"],
               "transformers": theirs["transformers"], "torch_threads": theirs["threads"],
               "decode_step_s_v4jax": ours["decode_step_s"], "decode_step_s_hf": theirs["decode_step_s"],
               "generate_s_v4jax": ours["generate_s"], "generate_s_hf": theirs["generate_s"],
               "tokens_v4jax": ours["tokens"], "tokens_hf": theirs["tokens"],
               "agreement": agreement(ours["tokens"], theirs["tokens"]),
               "samples_s": {"v4jax": ours["samples"], "hf": theirs["samples"]},  # every timed repetition / step
               "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)]}  # 1-minute, start and end
        for key, per in (("forward", tokens), ("train", tokens), ("decode", 1), ("generate", spec["new_tokens"])):
            s_key = "decode_step_s" if key == "decode" else f"{key}_s"
            row[f"{key}_tps_v4jax"] = per / ours[s_key]
            row[f"{key}_tps_hf"] = per / theirs[s_key]
            row[f"{key}_ratio"] = theirs[s_key] / ours[s_key]
        rows.append(row)
        a = row["agreement"]
        print(f"peers {name}: " + ", ".join(f"{k} {row[f'{k}_ratio']:.2f}x" for k in KINDS)
              + f"; greedy tokens agree {a['agree']}/{a['of']}", flush=True)
    return {"shape": spec, "interleaved": True, "rows": rows}


def markdown(result: dict) -> str:
    s = result["shape"]
    r0 = result["rows"][0]
    n_new = s.get("new_tokens")
    lines = [f"Batch {s['batch']} x {s['seq_len']} tokens for forward and training; decode: one sequence, "
             f"{s['decode_steps']} single-token greedy steps after a {s['prompt_len']}-token prompt (the first of "
             f"each repetition left out; median step); generate: greedy generation of {n_new} tokens after the same "
             "prompt, end to end (prefill included), v4jax `infer.generate.generate` vs HF `model.generate(..., "
             f"do_sample=False)`; median of {s['steps']} timed repetitions per side after one untimed each, the two "
             "sides alternating in one run (v4jax, HF, v4jax, HF). "
             f"HF: transformers {r0['transformers']}, torch {r0['torch']} ({r0['torch_threads']} threads), eager, "
             "fp32, in a worker process (bench/peer_hf.py). v4jax: jitted as pure functions of the split model "
             "state (decode and generate through infer.generate's step), fp32. "
             "Ratio = v4jax tokens/s / HF tokens/s.",
             "", "| config | params (activated) | forward tok/s v4jax / HF | ratio | train tok/s v4jax / HF | ratio | "
             "decode tok/s v4jax / HF | ratio | generate tok/s v4jax / HF | ratio | greedy tokens agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [f"{r[f'{k}_tps_v4jax']:.1f} / {r[f'{k}_tps_hf']:.1f} | **{r[f'{k}_ratio']:.2f}x**" for k in KINDS]
        a = r["agreement"]
        agree = f"{a['agree']} / {a['of']}" + ("" if a["first_difference"] is None
                                               else f" (first difference at token {a['first_difference']})")
        size = f"{r['params'] / 1e6:.1f}M ({r['activated'] / 1e6:.1f}M)"
        lines.append(f"| {r['config']} | {size} | " + " | ".join(cells) + f" | {agree} |")
    lines += ["", "Decode step, median ms (v4jax / HF): " + "; ".join(
        f"{r['config']} {1e3 * r['decode_step_s_v4jax']:.1f} / {1e3 * r['decode_step_s_hf']:.1f}"
        for r in result["rows"]) + ". generate() seconds for the prompt and the new tokens (v4jax / HF): " + "; ".join(
        f"{r['config']} {r['generate_s_v4jax']:.2f} / {r['generate_s_hf']:.2f}" for r in result["rows"]) + "."]
    if all("load_average" in r for r in result["rows"]):
        lines[-1] += (" 1-minute load average at the start and end of each config: " + "; ".join(
                          f"{r['config']} {r['load_average'][0]} / {r['load_average'][1]}" for r in result["rows"])
                      + " (the alternation gives both sides the same conditions on average). HF's times swing "
                      "most with load from other jobs (PyTorch's 2 threads on 2 busy cores): every timed sample is in "
                      "docs/perf/results.json (samples_s); runs on a loaded machine gave much higher ratios.")
    return "\n".join(lines)
