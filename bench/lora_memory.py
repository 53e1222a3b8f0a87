"""Compiled memory of one LoRA train step on the quantized base beside one full fine-tuning step of the same model
(issue 17): train.pretrain's own model building, optimizer and train step, lowered and compiled for each, with
XLA's memory_analysis. The base: the preset's random weights stored as released (FP8 / MXFP4), written to a
temporary folder; full fine-tuning loads it dense (param_dtype) and trains everything with Muon + AdamW, LoRA keeps
it quantized and trains the adapters with AdamW.

    .venv/bin/python bench/lora_memory.py [--preset tiny] [--batch 8] [--seq 128] [--rank 16] [--remat none]

peak = arguments + temporaries + outputs - outputs aliased to donated arguments (as train.plan reports it).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the packages from the repository, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from train import pretrain
from train.muon import path_str
from v4jax import hub
from v4jax.config import ModelConfig
from v4jax.sharding import TRAIN_RULES, make_mesh, use_rules


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def step_memory(cfg: dict, batch: int, seq: int) -> dict:
    """Bytes of one compiled train step of run config `cfg` (one device)."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
    mcfg = pretrain.model_config(cfg)
    graphdef, params, others = nnx.split(pretrain.build_model(cfg, mcfg, mesh, TRAIN_RULES), pretrain.trained(cfg), ...)
    tx = pretrain.optimizer(cfg, mcfg, params, 1e-4)
    opt_state = jax.jit(tx.init)(params)
    trainable = {path_str(p): True for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    shardings = jax.tree.map(lambda x: x.sharding, (params, others, opt_state))
    bias_speed = None if cfg["lora"]["enabled"] else cfg["loss"]["bias_update_speed"]
    step = pretrain.make_train_step(graphdef, tx, trainable, bias_speed, shardings)
    tokens = jax.ShapeDtypeStruct((1, batch, seq + 1), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    weights = {k: jnp.float32(v) for k, v in dict(lm=1.0, mtp=0.3, balance=1e-4, indexer=0.0).items()}
    with use_rules(mesh, TRAIN_RULES):
        mem = step.lower(params, others, opt_state, {"tokens": tokens, "segment_ids": tokens}, weights,
                         jnp.float32(jnp.inf)).compile().memory_analysis()
    return {"weights": nbytes((params, others)), "trained of them": nbytes(params),
            "optimizer state": nbytes(opt_state),
            "arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
            "outputs": mem.output_size_in_bytes, "aliased": mem.alias_size_in_bytes,
            "peak": mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--remat", default="none", choices=["none", "block", "dots"])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        hub.write_random_checkpoint(base, ModelConfig.preset(args.preset).to_hf_config(), 0)
        run = {"init": str(base), "model": {"config": str(base), "overrides": {"csa_dense": True,
                                                                               "remat": args.remat}},
               "stages": [{"until_step": 1, "batch_size": args.batch, "seq_len": args.seq, "attention": "dense"}]}
        got = {name: step_memory(pretrain.validate(run | {"lora": {"enabled": lora_on, "rank": args.rank}}),
                                 args.batch, args.seq)
               for name, lora_on in (("full", False), ("lora", True))}
    print(f"{args.preset}, batch {args.batch} x {args.seq} tokens, remat {args.remat}, LoRA rank {args.rank} "
          f"(default targets), {jax.default_backend()} backend; MB:")
    print(f"  {'':<20}{'full':>10}{'lora':>10}{'lora/full':>11}")
    for key in got["full"]:
        full, lo = got["full"][key], got["lora"][key]
        ratio = f"{lo / full:11.3f}" if full else ""
        print(f"  {key:<20}{full / 1e6:10.2f}{lo / 1e6:10.2f}{ratio}")


if __name__ == "__main__":
    main()
