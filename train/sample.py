"""Sample text from a training run's latest checkpoint (a smoke test of what the model learned).

    python -m train.sample configs/train/tiny.yaml [key=value ...] [--prompt "def "] [--tokens 160]

The run config names the model, the run_dir with its checkpoints and the data folder (whose meta.json names the
tokenizer). Generation is the plain full forward pass per new token over a fixed-length buffer (causal, so the
unfilled tail does not affect the positions before it): one compilation, no KV cache (that is infer/'s job).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train import pretrain
from train import tokenizer as tokenizer_lib
from train.data import PackedStream
from train.muon import v4_optimizer
from v4jax.model import Transformer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="+", help="run config YAML and key=value overrides, as for train.pretrain")
    ap.add_argument("--prompt", default="", help="text after the document start token")
    ap.add_argument("--tokens", type=int, default=160, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = pretrain.load_config(args.config)
    mcfg = pretrain.model_config(cfg)
    stream = PackedStream(cfg["data"]["path"], cfg["data"]["seed"])
    tok = tokenizer_lib.load(stream.meta["tokenizer"])

    model = Transformer(mcfg, rngs=nnx.Rngs(cfg["seed"]))
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    # the run's optimizer, only to give the checkpoint's tree its structure
    tx = v4_optimizer(params, mcfg, pretrain.lr_schedule(cfg["schedule"], cfg["stages"][-1]["until_step"]))
    manager = pretrain.checkpoint_manager(cfg)
    if manager.latest_step() is None:
        raise SystemExit(f"no checkpoint in {manager.directory}: train first (python -m train.pretrain ...)")
    state, meta = pretrain.restore(manager, {"params": params, "others": others, "opt_state": jax.jit(tx.init)(params)})
    model = nnx.merge(graphdef, state["params"], state["others"])

    prompt = [0] + tok.encode(args.prompt).ids
    length = len(prompt) + args.tokens
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(prompt)] = prompt

    @nnx.jit
    def next_logits(model, ids, pos):
        return model(ids)[0, pos]

    key = jax.random.key(args.seed)
    for pos in range(len(prompt) - 1, length - 1):
        logits = next_logits(model, jnp.asarray(buf), pos)
        key, sub = jax.random.split(key)
        buf[0, pos + 1] = int(jax.random.categorical(sub, logits / args.temperature))
    print(f"--- sample from step {meta['step']} (temperature {args.temperature}) ---")
    print(tok.decode(buf[0, 1:].tolist()))


if __name__ == "__main__":
    main()
