"""Sample text from a training run's newest intact checkpoint (a smoke test of what the model learned).

    python -m train.sample configs/train/tiny.yaml [key=value ...] [--prompt "def "] [--tokens 160]

The run config names the model, the run_dir with its checkpoints and the data folder (whose meta.json names the
tokenizer). Generation runs over the compressed KV cache (infer.generate).
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

from infer.generate import SamplingParams, generate

from train import pretrain
from train import tokenizer as tokenizer_lib
from train.cli import InputError, run
from train.data import open_corpus


def restore_run(config_argv: list[str]):
    """The model of a training run's newest intact checkpoint -> (model, the run's tokenizer path, its meta).
    A LoRA run's model is its base (init, kept quantized) with the checkpoint's adapters attached."""
    cfg = pretrain.load_config(config_argv)
    mcfg = pretrain.model_config(cfg)
    stream = open_corpus(cfg["data"]["path"], cfg["data"]["seed"])
    graphdef, params, others = nnx.split(pretrain.build_model(cfg, mcfg), pretrain.trained(cfg), ...)
    # the run's optimizer, only to give the checkpoint's tree its structure
    tx = pretrain.optimizer(cfg, mcfg, params, pretrain.lr_schedule(cfg["schedule"], cfg["stages"][-1]["until_step"]))
    state = {"params": params, "others": others, "opt_state": jax.jit(tx.init)(params)}
    manager = pretrain.checkpoint_manager(cfg)
    got, damaged = pretrain.restore_newest(manager, pretrain.checkpointed(state, cfg))
    manager.close()
    if got is None:
        raise InputError(f"no checkpoint in {manager.directory}: train first (python -m train.pretrain ...)")
    if damaged:
        print(damaged)
    state, meta = state | got[0], got[1]
    return nnx.merge(graphdef, state["params"], state["others"]), stream.meta["tokenizer"], meta


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="+", help="run config YAML and key=value overrides, as for train.pretrain")
    ap.add_argument("--prompt", default="", help="text after the document start token")
    ap.add_argument("--tokens", type=int, default=160, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--debug", action="store_true", help="show the traceback of a known error too "
                                                         "(or set V4JAX_DEBUG=1)")
    args = ap.parse_args(argv)
    model, tokenizer_path, meta = restore_run(args.config)
    tok = tokenizer_lib.load(tokenizer_path)
    prompt = [0] + tok.encode(args.prompt).ids
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.tokens, seed=args.seed)
    tokens = generate(model, [prompt], params)[0]
    print(f"--- sample from step {meta['step']} (temperature {args.temperature}) ---")
    print(tok.decode(prompt[1:] + tokens))


if __name__ == "__main__":
    run(main, "train.sample")
