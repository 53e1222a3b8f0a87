"""The HF transformers side of bench/peers.py: DeepseekV4ForCausalLM (PyTorch, CPU, fp32, eager) run on the same
config, weights, batch and steps as v4jax. Runs in the oracle env as a worker that bench/peers.py starts and
drives, so that the two sides' repetitions alternate in one run (v4jax, HF, v4jax, HF, ...):

    .venv-oracle/bin/python bench/peer_hf.py SPEC.json

SPEC holds {"hf_config": {...}, "seed", "batch", "seq_len", "prompt_len", "decode_steps", "new_tokens", "lr"}.
The weights are v4jax.hub.random_hub_checkpoint(hf_config, seed) moved through the hub -> HF name map, as the
parity oracle does. After loading, the worker writes one JSON line (versions, threads) to its stdout, then reads
one operation name per line from stdin, runs it once and answers with one JSON line:

    forward   {"s"}: a forward of [batch, seq_len] (no grad, no cache)
    train     {"s"}: a training step (forward, next-token cross entropy, backward, AdamW); it changes the weights,
              so peers.py runs it last
    decode    {"step_s": [...]}: a prompt of prompt_len tokens through HF's cache, then decode_steps greedy
              single-token steps, each timed (the first is left out: it is the warm-up of the cached path)
    generate  {"s", "tokens"}: model.generate(prompt, max_new_tokens=new_tokens, do_sample=False), end to end
              (prefill included), and the new tokens
    quit

Anything else the libraries print goes to stderr (the answers keep stdout to themselves).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# transformers imports the hub package `kernels`: the repository's kernels/ and bench/kernels.py would stand in
# for it. So bench/ (this script's folder) leaves sys.path, and the repository goes on after hf_logits has
# imported transformers.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))
from hf_logits import build_model, load_weights  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from v4jax import hub  # noqa: E402  (numpy only)


def main(spec_path: str) -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (warnings, progress) go to stderr
    spec = json.load(open(spec_path))
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = spec["hf_config"]
    model = build_model(cfg)
    load_weights(model, hub.random_hub_checkpoint(cfg, spec["seed"]), model.config.num_hidden_layers)
    model.eval()
    # greedy generation of exactly new_tokens, as v4jax's generate() without stop tokens
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = cfg.get("bos_token_id", 0)
    rng = np.random.default_rng(spec["seed"])  # the same token ids as v4jax's side
    ids = torch.from_numpy(rng.integers(0, cfg["vocab_size"], (spec["batch"], spec["seq_len"])))
    prompt = ids[:1, :spec["prompt_len"]]
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"])

    @torch.no_grad()
    def forward():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False).logits
        return {"s": time.perf_counter() - t0}

    def train():
        model.train()
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        s = time.perf_counter() - t0
        model.eval()
        return {"s": s}

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
        return {"step_s": times[1:]}

    @torch.no_grad()
    def generate():
        t0 = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=spec["new_tokens"], do_sample=False)
        s = time.perf_counter() - t0
        return {"s": s, "tokens": out[0, prompt.shape[1]:].tolist()}

    ops = {"forward": forward, "train": train, "decode": decode, "generate": generate}
    answers.write(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "transformers": __import__("transformers").__version__}) + "\n")
    for line in sys.stdin:
        op = line.strip()
        if op == "quit":
            break
        answers.write(json.dumps(ops[op]()) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
