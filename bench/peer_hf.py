"""The HF transformers side of bench/peers.py: DeepseekV4ForCausalLM (PyTorch, CPU, fp32, eager) timed on the
same config, weights, batch and steps as v4jax. Runs in the oracle env, started by bench/peers.py:

    .venv-oracle/bin/python bench/peer_hf.py SPEC.json OUT.json

SPEC holds {"hf_config": {...}, "seed", "batch", "seq_len", "steps", "prompt_len", "decode_steps", "lr"}. The
weights are v4jax.hub.random_hub_checkpoint(hf_config, seed) moved through the hub -> HF name map, as the parity
oracle does. Measured (median seconds of `steps` timed repetitions after one warm-up): forward of [batch,
seq_len] (no grad, no cache), a training step (forward, next-token cross entropy, backward, AdamW), and decode
steps of one sequence over HF's cache after a prompt of prompt_len tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))
from hf_logits import build_model, load_weights  # noqa: E402
from v4jax import hub  # noqa: E402  (numpy only)


def median_time(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = spec["hf_config"]
    model = build_model(cfg)
    load_weights(model, hub.random_hub_checkpoint(cfg, spec["seed"]), model.config.num_hidden_layers)
    rng = np.random.default_rng(spec["seed"])
    ids = torch.from_numpy(rng.integers(0, cfg["vocab_size"], (spec["batch"], spec["seq_len"])))

    @torch.no_grad()
    def forward():
        return model(input_ids=ids, use_cache=False).logits

    model.eval()
    forward_s = median_time(forward, spec["steps"])

    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"])

    def train_step():
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    train_s = median_time(train_step, spec["steps"])
    model.eval()

    prompt = ids[:1, :spec["prompt_len"]]

    @torch.no_grad()
    def decode():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(spec["decode_steps"]):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    decode_s = decode()
    json.dump({"forward_s": forward_s, "train_s": train_s, "decode_step_s": decode_s,
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "transformers": __import__("transformers").__version__}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
