"""Compile-time memory planning for a V4 config on a device mesh (issue 7), without accelerators.

    python -m train.plan --config flash --mesh fsdp=32,expert=8 --step train --set moe_ep_capacity=1.25
    python -m train.plan --config flash --mesh expert=8 --step train --lora --seq 8192     # LoRA SFT step
    python -m train.plan --config flash --mesh fsdp=32,expert=8 --topology v5p:8x8x4 --step train ...
    python -m train.plan --config flash --mesh expert=8 --step decode --batch 16 --max-len 65536 --param-dtype bfloat16
    python -m train.plan --golden tests/golden/partition_specs      # rewrite the golden partition-spec files

The model is abstract (nnx.eval_shape: nothing allocated); the step is lowered with ShapeDtypeStructs carrying
their shardings and compiled by the SPMD partitioner, exactly as for real devices. The devices are fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count, set here before the backend starts) or, with
--topology, the chips of a TPU slice described by libtpu (jax.experimental.topologies): the TPU compiler then
plans the memory of a real accelerator. XLA:CPU's plan is larger than an accelerator's (docs/sharding.md): it
widens 16-bit gathers and collectives to 32-bit words and schedules without a memory-aware collective scheduler.

Reported per device: parameters, optimizer state, the other variables (router biases, hash tables) and the
KV cache are exact sums of each array's shard shape (analytic, from the partition specs); "activations" is the
compiled program's temporary buffer size (XLA's memory analysis), and the peak is arguments + temporaries +
outputs not aliased to donated arguments. `--step train` compiles train.pretrain's step: forward, backward and
the Muon/AdamW update with the router-bias rule; `--step forward` the training objective alone; `--step decode`
one token of Transformer.step over the cache. `--step train --lora` compiles the step of a LoRA run (the trainer's
lora.enabled; --lora-rank / --lora-targets as its lora.rank / lora.targets, their defaults when not given): the
frozen base as `load_hub_state(weights="quantized")` holds it (FP8 e4m3 + UE8M0 128x128 block scales, routed
experts MXFP4, the rest as the model's variables), adapters trained with AdamW, router biases frozen, and an SFT
batch (tokens, segment ids, loss mask); "params" is then the adapters and "other_variables" the frozen base.
The batch is laid out by sharding.train_batch_sharding, as the trainer places it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def parse_mesh(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--mesh {text!r}: write axis=size pairs, e.g. fsdp=32,expert=8") from None


def main(argv: list[str] | None = None) -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--config", default="flash", help="a ModelConfig preset: flash, pro, tiny")
    a.add_argument("--mesh", default="data=1", help="axis=size,... over data, fsdp, expert, tensor")
    a.add_argument("--step", default="train", choices=["train", "forward", "decode"])
    a.add_argument("--batch", type=int, default=None, help="global sequences (default: one per batch shard)")
    a.add_argument("--seq", type=int, default=4096, help="training sequence length")
    a.add_argument("--max-len", type=int, default=65536, help="decode: cache capacity per sequence")
    a.add_argument("--kv-format", default="bf16", help="decode: cache storage (fp32, bf16, fp8)")
    a.add_argument("--index-format", default="bf16", help="decode: indexer key storage (fp32, bf16, fp8, fp4)")
    a.add_argument("--param-dtype", default=None, help="override the master weights' dtype (bfloat16 for decode)")
    a.add_argument("--remat", default="block", choices=["none", "block", "dots"])
    a.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="scan_layers")
    a.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a ModelConfig field, e.g. --set n_layers=4 --set 'compress_ratios=[0,0,4,128,0]'")
    a.add_argument("--topology", metavar="NAME", help="compile for a TPU topology this host does not have, e.g. "
                   "v5p:8x8x4 (256 chips; needs libtpu: pip install 'jax[tpu]'), instead of fake CPU devices")
    a.add_argument("--lora", action="store_true", help="--step train of a LoRA run on the quantized base")
    a.add_argument("--lora-rank", type=int, help="adapter rank (default: the run config's lora.rank)")
    a.add_argument("--lora-targets", help="comma-separated weights to adapt (default: the run config's lora.targets)")
    a.add_argument("--golden", metavar="DIR", help="write {flash,pro}_{train,decode}.json partition specs and exit")
    args = a.parse_args(argv)
    if args.lora and args.step != "train":
        raise SystemExit(f"--lora plans the train step of a LoRA run, not --step {args.step}: use --step train")
    shape = parse_mesh(args.mesh)
    n_devices = math.prod(shape.values())
    # Before jax starts its CPU backend: as many fake devices as the mesh has. The program is never run, so
    # LLVM's optimisation (most of a CPU compile) is off; buffer sizes come from XLA's HLO passes before it.
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}"
                               " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    import jax
    jax.config.update("jax_platforms", "cpu")
    if args.golden:
        write_golden(Path(args.golden))
        return
    report = plan(args, shape)
    print(json.dumps(report, indent=1))


def write_golden(folder: Path) -> None:
    """Every parameter path -> its PartitionSpec, for Flash and Pro under both presets (tests compare these)."""
    from v4jax import sharding
    from v4jax.config import ModelConfig
    from v4jax.model import abstract_model

    folder.mkdir(parents=True, exist_ok=True)
    for preset in ("flash", "pro"):
        model = abstract_model(ModelConfig.preset(preset))
        for rules in ("train", "decode"):
            specs = sharding.flat_specs(model, sharding.PRESETS[rules])
            lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in specs.items()]  # one variable per line
            (folder / f"{preset}_{rules}.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
            print(f"{folder}/{preset}_{rules}.json: {len(specs)} variables")


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (padded shards, as XLA lays them)."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def plan(args, shape: dict[str, int]) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from train import losses, pretrain
    from train.muon import path_str, v4_optimizer
    from v4jax import checkpoint, lora, sharding
    from v4jax.config import ModelConfig
    from v4jax.model import abstract_model

    overrides = dict(scan_layers=args.scan, remat=args.remat)
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = json.loads(value)
    if args.param_dtype:
        overrides["param_dtype"] = args.param_dtype
    mesh = sharding.make_mesh(shape, devices=tpu_devices(args.topology, math.prod(shape.values()))
                              if args.topology else None)
    cfg = sharding.for_mesh(ModelConfig.preset(args.config, **overrides), mesh)  # the MoE path a run on it takes
    rules = sharding.PRESETS["decode" if args.step == "decode" else "train"]
    run = lora_run(args) if args.lora else None  # the trainer's validated run config: its lora section
    model = abstract_model(cfg) if run is None else lora.abstract_adapted(cfg, pretrain.lora_config(run))
    specs = sharding.model_specs(model, rules)
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, s)),
                         nnx.state(model), specs, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, state)
    if run is not None:  # the base as the trainer loads it: quantized where the release is, placed by the rules
        for path, var in checkpoint.model_variables(model).items():
            if not isinstance(var, lora.LoraParam):
                var.set_value(checkpoint.abstract_quantized_leaf(path, var, mesh, rules))
    graphdef, params, others = nnx.split(model, nnx.Param if run is None else pretrain.trained(run), ...)
    batch_spec = sharding.train_batch_sharding(mesh, rules).spec[1]
    shards = math.prod(mesh.shape[a] for a in ((batch_spec,) if isinstance(batch_spec, str) else batch_spec or ()))
    batch = args.batch or shards
    report = {"config": args.config, "mesh": dict(mesh.shape), "step": args.step, "batch": batch,
              "batch_axes": batch_spec, "devices": mesh.size, "device_kind": mesh.devices.flat[0].device_kind,
              "moe_impl": cfg.moe_impl, "scan_layers": cfg.scan_layers, "remat": cfg.remat,
              "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype}
    if run is not None:
        report["lora"] = {k: run["lora"][k] for k in ("rank", "alpha", "targets")} | {
            "adapter_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(params))}
    bytes_ = {"params": shard_bytes(params), "other_variables": shard_bytes(others)}

    def sds(shape_, dtype, spec):
        return jax.ShapeDtypeStruct(shape_, dtype, sharding=NamedSharding(mesh, spec))

    if args.step == "decode":
        cache = jax.eval_shape(lambda: model.init_cache(batch, args.max_len, args.kv_format, args.index_format))
        cache = jax.tree.map(lambda x: sds(x.shape, x.dtype, PartitionSpec(batch_spec)), cache)
        bytes_["cache"] = shard_bytes(cache)
        report |= {"max_len": args.max_len, "kv_format": args.kv_format, "index_format": args.index_format}

        def fn(params, others, cache, tokens):
            logits, _, cache = nnx.merge(graphdef, params, others).step(cache, tokens)
            return logits, cache

        step = jax.jit(fn, donate_argnums=(2,))
        call_args = (params, others, cache, sds((batch, 1), jnp.int32, PartitionSpec(batch_spec)))
    else:
        tokens = jax.ShapeDtypeStruct((1, batch, args.seq + 1), jnp.int32,
                                      sharding=sharding.train_batch_sharding(mesh, rules))
        batch_in = {"tokens": tokens, "segment_ids": tokens} | ({"loss_mask": tokens} if run is not None else {})
        weights = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in ("lm", "mtp", "balance", "indexer")}
        report["seq"] = args.seq
        if args.step == "forward":
            def fn(params, others, batch_in, weights):
                model = nnx.merge(graphdef, params, others)
                return losses.objective(model, batch_in["tokens"][0], batch_in["segment_ids"][0], weights)[0]

            step = jax.jit(fn)
            call_args = (params, others, batch_in, weights)
        else:
            tx = v4_optimizer(params, cfg, 1e-4) if run is None else pretrain.optimizer(run, cfg, params, 1e-4)
            opt_state = optimizer_state(tx, params)
            bytes_["optimizer_state"] = shard_bytes(opt_state)
            trainable = {path_str(p): True for p, _ in jax.tree_util.tree_leaves_with_path(params)}
            shardings = jax.tree.map(lambda x: x.sharding, (params, others, opt_state))
            step = pretrain.make_train_step(graphdef, tx, trainable, 1e-3 if run is None else None, shardings)
            call_args = (params, others, opt_state, batch_in, weights)

    print(json.dumps(report | {"analytic_bytes_per_device": bytes_}), flush=True)  # before the long compile
    t0, c0 = time.perf_counter(), time.process_time()
    with sharding.use_rules(mesh, rules):
        lowered = step.lower(*call_args)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    mem = compiled.memory_analysis()
    bytes_ |= {"arguments (compiler)": mem.argument_size_in_bytes, "activations = temporaries (compiler)":
               mem.temp_size_in_bytes, "outputs (compiler)": mem.output_size_in_bytes,
               "outputs aliased to donated arguments (compiler)": mem.alias_size_in_bytes}
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    bytes_["peak = arguments + temporaries + unaliased outputs"] = peak
    # The most bytes live at once in the compiled schedule (arguments included), where the compiler reports it
    # (TPU): a lower bound beside `peak`, which counts the whole temporary heap, fragmentation included. XLA:CPU's
    # number there leaves the temporaries out (Flash's LoRA step: 20.6 GB, the arguments): not reported.
    if getattr(mem, "peak_memory_in_bytes", 0) > 0 and mesh.devices.flat[0].platform != "cpu":
        bytes_["live peak (compiler)"] = mem.peak_memory_in_bytes
    report["bytes_per_device"] = bytes_
    report["GB_per_device"] = {k: round(v / 1e9, 3) for k, v in bytes_.items()}
    # CPU seconds (all threads) as well as wall seconds: the second depends on what else the machine runs
    report |= {"lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
               "lower_cpu_s": round(c1 - c0, 1), "compile_cpu_s": round(c2 - c1, 1)}
    return report


def lora_run(args) -> dict:
    """A LoRA run config as train.pretrain validates it (its lora section, with --lora-rank / --lora-targets)."""
    from train import pretrain

    section = {"enabled": True}
    if args.lora_rank is not None:
        section["rank"] = args.lora_rank
    if args.lora_targets:
        section["targets"] = args.lora_targets.split(",")
    try:  # init only has to be named: the plan reads no weights
        return pretrain.validate({"init": "(planned: none read)", "lora": section})
    except pretrain.ConfigError as e:
        raise SystemExit(f"--lora-rank / --lora-targets: {e}") from None


def tpu_devices(topology: str, n: int) -> list:
    """The devices of a TPU topology, without TPUs (libtpu compiles for them ahead of time)."""
    from jax.experimental import topologies
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # no libtpu, or a name it does not know
        raise SystemExit(f"--topology {topology!r}: {e}. Install libtpu (pip install 'jax[tpu]') and name a "
                         "topology as <generation>:<chips per dim>, e.g. v5p:8x8x4 or v6e:16x16") from None
    if len(devices) != n:
        raise SystemExit(f"--topology {topology!r} has {len(devices)} chips but --mesh names {n} devices")
    return devices


def optimizer_state(tx, params):
    """Abstract optimizer state, each moment laid out like its parameter (sharding.follow_params)."""
    import jax

    from v4jax import sharding

    abstract = jax.eval_shape(tx.init, params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        sharding.follow_params(abstract, params))


if __name__ == "__main__":
    main(sys.argv[1:])
