"""Pretrain DeepSeek-V4 (spec §6): Muon + AdamW, MTP, balanced routing, staged attention, packed documents.

    python -m train.pretrain configs/train/tiny.yaml [key.sub=value ...]
    e.g.  python -m train.pretrain configs/train/tiny.yaml run_dir=runs/x schedule.peak_lr=1e-3

The same command resumes: if run_dir holds a complete checkpoint, training continues from the latest one
(model, optimizer, router biases, data position) and produces the same losses as an uninterrupted run.
Multi-host: start one process per host with distributed.coordinator_address / num_processes / process_id
set (or none of them, where jax.distributed.initialize() finds the cluster itself: TPU pods, SLURM); the mesh
spans all processes and every process loads only the rows of the global batch its devices hold.

The run: read the config -> build the mesh and the model (or load `init` weights for fine-tuning) -> restore
the latest checkpoint if any -> for each stage (batch size, sequence length, attention mode), run jitted
train steps: forward + backward over `grad_accum` micro-batches, NaN/Inf guard, optimizer update, router bias
update; log metrics; save asynchronously every `checkpoint.every` steps and at the end.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from train import losses
from train.data import PackedStream
from train.flops import peak_flops_per_device, train_flops_per_token
from train.muon import path_str, v4_optimizer
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.moe import RouterBias
from v4jax.sharding import DECODE_RULES, TRAIN_RULES, follow_params, make_mesh, model_specs, use_rules

# Every key a run config may set, with its default (a YAML file overrides these; key=value arguments override
# the file).
DEFAULTS = {
    "run_dir": "runs/default",
    "seed": 0,
    "model": {"preset": "tiny", "config": None, "overrides": {}},  # config: an official / HF config.json path
    "init": None,  # fine-tuning: a released-layout checkpoint folder (tid2eid is loaded and stays frozen)
    "data": {"path": "data/stdlib", "seed": 0},
    # Stages run in order, each until its `until_step`. attention: dense (CSA attends every visible compressed
    # entry), indexer_warmup (dense, only the indexer trains, on the KL loss), sparse (top-k, KL on the indexer).
    "stages": [{"until_step": 100, "batch_size": 8, "seq_len": 256, "grad_accum": 1, "attention": "sparse"}],
    "schedule": {"peak_lr": 2.7e-4, "final_lr": 2.7e-5, "warmup_steps": 2000, "decay_start": None},
    "optimizer": {"momentum": 0.95, "muon_rms_scale": 0.18, "muon_weight_decay": 0.1,
                  "adam_b1": 0.9, "adam_b2": 0.95, "adam_eps": 1e-20, "adam_weight_decay": 0.1},
    "loss": {"mtp_weight": 0.3, "mtp_weight_in_decay": 0.1, "balance_weight": 1e-4, "bias_update_speed": 1e-3,
             "indexer_weight": 1.0},
    "mesh": {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1},  # -1: the devices left over
    "rules": "train",  # train | decode | {logical axis: mesh axis}
    "checkpoint": {"every": 100, "keep": 3, "async": True},
    "log_every": 10,
    "max_nonfinite_steps": 3,  # consecutive skipped steps before the run stops
    "distributed": {"coordinator_address": None, "num_processes": None, "process_id": None},
}
STAGE_KEYS = {"until_step", "batch_size", "seq_len", "grad_accum", "attention"}
ATTENTION = {"dense": dict(csa_dense=True, indexer_loss=False),
             "indexer_warmup": dict(csa_dense=True, indexer_loss=True),
             "sparse": dict(csa_dense=False, indexer_loss=True)}


# ---- configuration ----------------------------------------------------------------------------------------

def merge(base: dict, new: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        if k not in base:
            raise SystemExit(f"config: unknown key {where}{k!r}; known keys here: {sorted(base)}")
        nested = isinstance(base[k], dict) and isinstance(v, dict) and k not in ("overrides", "rules")
        out[k] = merge(base[k], v, f"{where}{k}.") if nested else v
    return out


def parse_value(text: str):
    """A command-line value as YAML, except that numbers like 1e-3 (a string to YAML 1.1) are floats."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def load_config(argv: list[str]) -> dict:
    """The YAML file (first argument) over DEFAULTS, then `dotted.key=value` overrides (values parsed as YAML)."""
    if not argv or "=" in argv[0]:
        raise SystemExit("usage: python -m train.pretrain CONFIG.yaml [key.sub=value ...]")
    cfg = merge(DEFAULTS, yaml.safe_load(Path(argv[0]).read_text()) or {})
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"override {arg!r} is not key=value (e.g. schedule.peak_lr=1e-3)")
        update: dict = {}
        node = update
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_value(value)
        cfg = merge(cfg, update)
    for i, st in enumerate(cfg["stages"]):
        if set(st) - STAGE_KEYS or "until_step" not in st:
            raise SystemExit(f"config: stage {i} has keys {sorted(st)}; allowed {sorted(STAGE_KEYS)}, until_step required")
        st.setdefault("grad_accum", 1)
        st.setdefault("attention", "sparse")
        if st["attention"] not in ATTENTION:
            raise SystemExit(f"config: stage {i} attention {st['attention']!r}; use one of {sorted(ATTENTION)}")
    return cfg


def model_config(cfg: dict) -> ModelConfig:
    m = cfg["model"]
    if m["config"]:
        path = Path(m["config"])
        is_hf = "model_type" in json.loads((path / "config.json" if path.is_dir() else path).read_text())
        load = ModelConfig.from_hf_config if is_hf else ModelConfig.from_official_config
        return load(path, **m["overrides"])
    return ModelConfig.preset(m["preset"], **m["overrides"])


def lr_schedule(s: dict, total_steps: int):
    """Linear warmup to peak_lr, constant until decay_start, then cosine down to final_lr at the last step."""
    decay_start = s["decay_start"] if s["decay_start"] is not None else total_steps
    return optax.join_schedules([
        optax.linear_schedule(0.0, s["peak_lr"], max(s["warmup_steps"], 1)),
        optax.constant_schedule(s["peak_lr"]),
        optax.cosine_decay_schedule(s["peak_lr"], max(total_steps - decay_start, 1), s["final_lr"] / s["peak_lr"]),
    ], [max(s["warmup_steps"], 1), decay_start])


# ---- the train step ---------------------------------------------------------------------------------------

def make_train_step(graphdef, tx, trainable, bias_speed: float, state_shardings):
    """The jitted step: (params, others, opt_state, batch [accum, rows, L+1], weights) -> new state, metrics.
    The new state keeps `state_shardings` (the inputs'), so the next call reuses the compiled program.

    `others` holds the non-trained variables (router biases, tid2eid); `trainable` is a {name: bool} mask
    (False freezes a parameter: its update is zeroed). A non-finite loss or gradient norm skips the update.
    """

    def loss_fn(params, others, tokens, segment_ids, weights):
        model = nnx.merge(graphdef, params, others)
        loss, metrics, loads = losses.objective(model, tokens, segment_ids, weights)
        return loss, (metrics | {"loss": loss}, loads)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @partial(jax.jit, donate_argnums=(0, 1, 2), out_shardings=(*state_shardings, None))
    def step(params, others, opt_state, batch, weights):
        def micro(grad_sum, mb):
            (_, (metrics, loads)), grads = grad_fn(params, others, mb["tokens"], mb["segment_ids"], weights)
            return jax.tree.map(jnp.add, grad_sum, grads), (metrics, loads)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (metrics, loads) = jax.lax.scan(micro, zeros, batch)
        n_micro = batch["tokens"].shape[0]
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        loads = jax.tree.map(lambda v: jnp.sum(v, axis=0), loads)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        updates = jax.tree_util.tree_map_with_path(lambda p, u: u if trainable[path_str(p)] else 0 * u, updates)
        new_params = optax.apply_updates(params, updates)
        new_others = update_router_biases(others, loads, bias_speed)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        load_max, load_min = losses.load_balance(loads)
        metrics |= {"grad_norm": grad_norm, "load_max": load_max, "load_min": load_min, "finite": finite}
        return keep(new_params, params), keep(new_others, others), keep(new_opt, opt_state), metrics

    return step


def update_router_biases(others, loads, speed: float):
    """Apply the aux-loss-free bias rule to every RouterBias (path `<moe>.gate.bias`, loads keyed `<moe>`) of the
    MoEs that ran (a GA checkpoint's drafter does not run in training: its biases stay)."""
    def update(path, var):
        moe = path_str(path).removesuffix(".gate.bias")
        if not isinstance(var, RouterBias) or moe not in loads:
            return var
        return var.replace(losses.router_bias_updates({moe: loads[moe]}, {moe: var[...]}, speed)[moe])

    return jax.tree_util.tree_map_with_path(update, others, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---- data onto the mesh ------------------------------------------------------------------------------------

def global_batch(stream: PackedStream, offset: int, stage: dict, sharding: NamedSharding) -> dict:
    """The stage's global batch [accum, rows, L+1] at stream `offset`; this process reads only the rows its
    devices hold (row r of micro-batch a is stream row a * rows + r)."""
    accum, rows, L = stage["grad_accum"], stage["batch_size"], stage["seq_len"]
    shape = (accum, rows, L + 1)
    held = sorted({r for idx in sharding.addressable_devices_indices_map(shape).values()
                   for r in range(*idx[1].indices(rows))})
    out = {}
    parts = [stream.batch(offset + (a * rows + held[0]) * L, len(held), L) for a in range(accum)]
    for key in ("tokens", "segment_ids"):
        local = np.stack([p[key] for p in parts])
        out[key] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out


# ---- checkpoints -------------------------------------------------------------------------------------------

def checkpoint_manager(cfg: dict) -> ocp.CheckpointManager:
    c = cfg["checkpoint"]
    opts = ocp.CheckpointManagerOptions(max_to_keep=c["keep"], enable_async_checkpointing=c["async"])
    return ocp.CheckpointManager(Path(cfg["run_dir"]).absolute() / "checkpoints", options=opts)


def save(manager, step: int, state: dict, data_offset: int, data_seed: int) -> None:
    """Async save (returns once the arrays are copied off the devices). Orbax writes into a temporary folder and
    renames it when complete, so a kill at any moment leaves only whole checkpoints behind."""
    meta = {"step": step, "data_offset": data_offset, "data_seed": data_seed}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(manager, state: dict) -> tuple[dict, dict]:
    """The latest complete checkpoint, placed like `state` (its shapes and shardings)."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    got = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return got["state"], got["meta"]


# ---- logging -----------------------------------------------------------------------------------------------

class Log:
    """Metrics to stdout (every log_every steps, with a progress bar) and every step to run_dir/metrics.jsonl;
    only process 0 writes."""

    def __init__(self, cfg: dict, total_steps: int):
        self.main = jax.process_index() == 0
        self.every, self.total = cfg["log_every"], total_steps
        if self.main:
            Path(cfg["run_dir"]).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(cfg["run_dir"]) / "metrics.jsonl", "a")

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def step(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        s = record["step"]
        if s % self.every == 0 or s == self.total:
            bar = "#" * round(20 * s / self.total)
            parts = [f"{k} {record[k]:.4g}" for k in ("loss", "lm_loss", "mtp_loss", "indexer_kl", "grad_norm",
                                                      "load_max", "load_min", "lr") if k in record]
            speed = (f" | {record['tokens_per_s']:,.0f} tok/s  MFU {100 * record['mfu']:.2f}%"
                     if "tokens_per_s" in record else "")
            print(f"[{bar:<20}] step {s}/{self.total} | " + "  ".join(parts) + speed, flush=True)


# ---- the run -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    d = cfg["distributed"]
    if any(v is not None for v in d.values()):
        jax.distributed.initialize(d["coordinator_address"], d["num_processes"], d["process_id"])

    # Mesh and sharding rules.
    sizes = dict(cfg["mesh"])
    fixed = math.prod(v for v in sizes.values() if v != -1)
    sizes = {k: (jax.device_count() // fixed if v == -1 else v) for k, v in sizes.items()}
    mesh = make_mesh(sizes)
    rules = {"train": TRAIN_RULES, "decode": DECODE_RULES}.get(cfg["rules"], cfg["rules"])
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))

    # Data and model.
    stream = PackedStream(cfg["data"]["path"], cfg["data"]["seed"])
    mcfg = model_config(cfg)
    if stream.meta["vocab_size"] > mcfg.vocab_size:
        raise SystemExit(f"the data's vocabulary ({stream.meta['vocab_size']}) is larger than the model's "
                         f"vocab_size ({mcfg.vocab_size}): set model.overrides.vocab_size or retokenise")
    stages = cfg["stages"]
    total = stages[-1]["until_step"]
    log = Log(cfg, total)
    log.say(f"model: {mcfg.n_layers} layers, dim {mcfg.dim}, {mcfg.n_routed_experts} experts | mesh {sizes} | "
            f"{jax.process_count()} process(es), {jax.device_count()} device(s)")
    log.say(f"data: {stream.meta['n_docs']} documents, {stream.meta['n_tokens']:,} tokens; unigram entropy "
            f"{stream.meta['unigram_entropy_nats']:.3f} nats/token")

    model = Transformer(mcfg, rngs=nnx.Rngs(cfg["seed"]))
    if cfg["init"]:
        from v4jax.checkpoint import load_hub_state
        load_hub_state(model, cfg["init"], weights=mcfg.param_dtype)
        log.say(f"init: weights from {cfg['init']}")
    specs = model_specs(model, rules)
    state = jax.tree.map(lambda v, s: jax.device_put(v[...], NamedSharding(mesh, s)), nnx.state(model), specs,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, state)
    _, params, others = nnx.split(model, nnx.Param, ...)
    schedule = lr_schedule(cfg["schedule"], total)
    o = cfg["optimizer"]
    tx = v4_optimizer(params, mcfg, schedule, momentum=o["momentum"], rms_scale=o["muon_rms_scale"],
                      muon_wd=o["muon_weight_decay"], adam_b1=o["adam_b1"], adam_b2=o["adam_b2"],
                      adam_eps=o["adam_eps"], adam_wd=o["adam_weight_decay"])
    # the moments take their parameters' shardings (jnp.zeros alone would replicate them on every device)
    opt_state = jax.jit(tx.init, out_shardings=follow_params(jax.eval_shape(tx.init, params), params))(params)

    # Resume from the latest complete checkpoint, if any.
    manager = checkpoint_manager(cfg)
    step, offset = 0, 0
    if manager.latest_step() is not None:
        restored, meta = restore(manager, {"params": params, "others": others, "opt_state": opt_state})
        params, others, opt_state = restored["params"], restored["others"], restored["opt_state"]
        if meta["data_seed"] != cfg["data"]["seed"]:
            raise SystemExit(f"{cfg['run_dir']} was trained with data.seed {meta['data_seed']}; resume with it")
        step, offset = meta["step"], meta["data_offset"]
        log.say(f"resumed from {manager.directory / str(step)} (step {step}, data offset {offset:,})")

    peak, peak_src = peak_flops_per_device()
    log.say(f"MFU peak: {peak / 1e12:.3f} TFLOP/s per device ({peak_src})")
    lc = cfg["loss"]
    decay_start = cfg["schedule"]["decay_start"] if cfg["schedule"]["decay_start"] is not None else total
    bad_steps = 0
    for stage in stages:
        if step >= stage["until_step"]:
            continue
        attn = ATTENTION[stage["attention"]]
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(mcfg.replace(**attn), rngs=nnx.Rngs(0))))
        warmup = stage["attention"] == "indexer_warmup"
        # a GA checkpoint's DSpark drafter is not part of this objective: it stays as loaded (no decay either)
        trainable = {path_str(p): not path_str(p).startswith("dspark.") and ((".indexer." in path_str(p)) or not warmup)
                     for p, _ in jax.tree_util.tree_leaves_with_path(params)}
        shardings = jax.tree.map(lambda x: x.sharding, (params, others, opt_state))
        train_step = make_train_step(graphdef, tx, trainable, lc["bias_update_speed"], shardings)
        tokens_per_step = stage["grad_accum"] * stage["batch_size"] * stage["seq_len"]
        flops = train_flops_per_token(mcfg, stage["seq_len"], attn["csa_dense"]) * tokens_per_step
        log.say(f"stage: until step {stage['until_step']}, {stage['batch_size']} x {stage['seq_len']} tokens "
                f"x {stage['grad_accum']} micro-batches, attention {stage['attention']}")
        t_last = None
        while step < stage["until_step"]:
            batch = global_batch(stream, offset, stage, batch_sharding)
            weights = {"lm": 0.0 if warmup else 1.0, "balance": lc["balance_weight"],
                       "indexer": lc["indexer_weight"] if attn["indexer_loss"] else 0.0,
                       "mtp": losses.mtp_weight(step, decay_start, lc["mtp_weight"], lc["mtp_weight_in_decay"])}
            weights = {k: jnp.float32(v) for k, v in weights.items()}
            with use_rules(mesh, rules):  # traced under the mesh and rules: per-device MoE dispatch, activation
                # constraints at block boundaries, kernels per batch shard
                params, others, opt_state, metrics = train_step(params, others, opt_state, batch, weights)
            metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
            step += 1
            offset += tokens_per_step
            now = time.perf_counter()
            record = {"step": step, "lr": float(schedule(step - 1)), "tokens": offset} | metrics
            if t_last is not None:  # the stage's first step includes compilation: no speed for it
                record["tokens_per_s"] = tokens_per_step / (now - t_last)
                record["mfu"] = flops / (now - t_last) / (peak * jax.device_count())
            t_last = now
            log.step(record)
            if not metrics["finite"]:
                bad_steps += 1
                log.say(f"step {step}: non-finite loss or gradient norm (loss {metrics['loss']}, grad norm "
                        f"{metrics['grad_norm']}); update skipped ({bad_steps} in a row)")
                if bad_steps >= cfg["max_nonfinite_steps"]:
                    manager.wait_until_finished()
                    raise SystemExit(f"{bad_steps} non-finite steps in a row at step {step}: lower "
                                     "schedule.peak_lr or check the data; the last good checkpoint is kept")
            else:
                bad_steps = 0
            if step % cfg["checkpoint"]["every"] == 0 or step == total:
                save(manager, step, {"params": params, "others": others, "opt_state": opt_state}, offset,
                     cfg["data"]["seed"])
    manager.wait_until_finished()
    manager.close()
    log.say(f"done: step {step}, checkpoints in {manager.directory}")


if __name__ == "__main__":
    main()
