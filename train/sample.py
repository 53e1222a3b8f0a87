"""The model of a training run's newest intact checkpoint, for everything that uses a run after training:
train.export, the drafter's target, and v4jax-generate / the notebook, which sample from a run
(`v4jax-generate configs/train/tiny.yaml --prompt "def "`: the sampling command of training runs too).

Layering: v4jax/ imports neither train/ nor infer/; train/ imports v4jax/ only; infer/ (generation, its CLI
and notebook) sits on top and may import both, e.g. this module to restore a run.
"""

from __future__ import annotations

import jax
from flax import nnx

from train import pretrain
from train.cli import InputError
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
