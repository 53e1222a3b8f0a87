"""Pretrain DeepSeek-V4 (architecture §6): Muon + AdamW, MTP, balanced routing, staged attention, packed documents.

    python -m train.pretrain configs/train/tiny.yaml [key.sub=value ...]      (or python train/pretrain.py ...)
    e.g.  python -m train.pretrain configs/train/tiny.yaml run_dir=runs/x schedule.peak_lr=1e-3
    python -m train.pretrain --help       every run-config key with its type, default and meaning

The same command resumes: if run_dir holds a checkpoint, training continues from the newest intact one
(model, optimizer, router biases, data position) and produces the same losses as an uninterrupted run; a
damaged newest checkpoint is moved aside and named. Multi-host: start one process per host with
distributed.coordinator_address / num_processes / process_id set (or none of them, where
jax.distributed.initialize() finds the cluster itself: TPU pods, SLURM); the mesh spans all processes and
every process loads only the rows of the global batch its devices hold.

The run: read and validate the config -> open the corpus -> build the mesh and the model (or load `init`
weights for fine-tuning) -> restore the newest intact checkpoint if any -> for each stage (batch size, sequence
length, attention mode), run jitted train steps: forward + backward over `grad_accum` micro-batches, optimizer
update, router bias update; log metrics (stdout, metrics.jsonl, TensorBoard); save asynchronously every
`checkpoint.every` steps and at the end.

DSpark drafter (drafter.enabled, a GA model config): the target is frozen, loaded from the newest checkpoint of
the run that drafter.target's config names (or from `init`); only the drafter trains, on blocks at random anchors
of each row (losses.drafter_objective, architecture §8.5), with AdamW after a gradient clip. Checkpoints hold
the drafter, its optimizer state and the loop's position; a resume reloads the target.

LoRA (lora.enabled): the base is `init` (a released-layout folder) loaded as stored, FP8 / MXFP4 kept quantized
(v4jax.lora); fresh adapters are attached to the lora.targets weights and are the only trained variables
(lora.optimizer: AdamW with the optimizer.adam_* keys, or Muon with its keys; no optimizer state for the base);
the base, norms, embeddings, router and its biases stay as loaded. Checkpoints hold the adapters, their optimizer
state and the loop's position alone; a resume reloads the base from `init`.

The guard: a bad step (non-finite loss or gradient norm, a loss above guard.spike_factor x the mean of the
last good steps, an update that would make a parameter non-finite) keeps the old state, inside the compiled
step. A checkpoint is written only after a good step (a save that falls due on a bad step waits for the next
good one). guard.max_bad_steps bad steps in a row roll back to the newest checkpoint: model, optimizer and
step from it, while the data goes on where it is (replaying the same batches from the same state would
diverge again); after guard.max_rollbacks rollbacks to one checkpoint the run stops and names it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the train package from the repository, not train/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import json
import math
import os
import time
import typing
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import NamedSharding
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tensorboardX import SummaryWriter

from train import cli, losses
from train.cli import InputError
from train.data import PackedStream, RowStream, open_corpus
from train.flops import peak_flops_per_device, train_flops_per_token
from train.muon import MatrixSplit, muon, muon_split, path_str, v4_optimizer
from v4jax import lora
from v4jax.checkpoint import load_hub_state
from v4jax.config import ModelConfig
from v4jax.model import Transformer, abstract_model
from v4jax.moe import RouterBias
from v4jax.sharding import (PRESETS, follow_params, for_mesh, make_mesh, mesh_shape, shard_model,
                             train_batch_sharding, use_rules)

# ---- configuration ----------------------------------------------------------------------------------------
# Every key a run config may set: its type, range and default. A YAML file sets some; key=value arguments
# override the file; the result is validated before anything is built (unknown keys and bad values are named).
# Numbers that YAML 1.1 reads as strings (3e-3: no dot) are accepted as numbers.


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    preset: str = Field("tiny", description="ModelConfig preset (v4jax/config.py)")
    config: str | None = Field(None, description="an official or HF config.json (or its folder) instead of preset")
    overrides: dict[str, Any] = Field({}, description="ModelConfig fields to change, e.g. {n_layers: 2}")


class DataSection(Section):
    path: str = Field("data/stdlib", description="token-shard folder (python -m train.data)")
    seed: int = Field(0, description="seeds the document order of each epoch")


class Stage(Section):
    until_step: int = Field(ge=1, description="the stage runs until this step")
    batch_size: int = Field(ge=1, description="rows per micro-batch")
    seq_len: int = Field(ge=1, description="tokens per row")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step")
    attention: Literal["dense", "indexer_warmup", "sparse"] = Field(
        "sparse", description="dense CSA | dense, only the indexer trains (KL) | top-k sparse, KL on the indexer")


class Schedule(Section):
    peak_lr: float = Field(2.7e-4, gt=0, description="learning rate after warmup")
    final_lr: float = Field(2.7e-5, ge=0, description="learning rate at the last step (cosine decay)")
    warmup_steps: int = Field(2000, ge=0, description="linear warmup from 0")
    decay_start: int | None = Field(None, ge=0, description="step the cosine decay starts (null: no decay)")


class Optimizer(Section):
    momentum: float = Field(0.95, ge=0, lt=1, description="Muon momentum")
    muon_rms_scale: float = Field(0.18, gt=0, description="Muon update RMS")
    muon_weight_decay: float = Field(0.1, ge=0)
    adam_b1: float = Field(0.9, ge=0, lt=1)
    adam_b2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-20, ge=0)
    adam_weight_decay: float = Field(0.1, ge=0)


class LossSection(Section):
    mtp_weight: float = Field(0.3, ge=0, description="MTP loss weight before decay_start")
    mtp_weight_in_decay: float = Field(0.1, ge=0, description="MTP loss weight from decay_start on")
    balance_weight: float = Field(1e-4, ge=0, description="sequence-wise balance loss weight")
    bias_update_speed: float = Field(1e-3, ge=0, description="router-bias step per train step")
    indexer_weight: float = Field(1.0, ge=0, description="indexer KL weight")


class LoraSection(Section):
    enabled: bool = Field(False, description="train LoRA adapters on the frozen base that `init` names (its FP8 / "
                                             "MXFP4 weights kept quantized) instead of the whole model")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="the adapters' optimizer: adamw (the optimizer.adam_* keys) | muon (train.muon on "
                             "every factor a and b, the optimizer.momentum / muon_* keys)")
    rank: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="adapter scale = alpha / rank")
    targets: list[str] = Field(list(lora.LoraConfig().targets), description=(
        f"weights to adapt: any of {', '.join(lora.ATTENTION_TARGETS + lora.EXPERT_TARGETS)} (experts: the routed "
        "ones, an adapter per expert)"))
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout rate of the adapters' input in training (a new "
                                                        "mask per step and micro-batch; the base sees the input "
                                                        "undropped)")

    @field_validator("targets")
    @classmethod
    def known_targets(cls, targets):
        lora.LoraConfig(targets=tuple(targets))  # names the unknown ones
        return targets


class DrafterSection(Section):
    enabled: bool = Field(False, description="train the DSpark drafter of a GA model config (model.*) on a frozen "
                                             "target (architecture §8.5) instead of the model; only the drafter "
                                             "is trained (AdamW, optimizer.adam_* keys) and checkpointed")
    target: str | None = Field(None, description="the target: the run config YAML of a training run whose newest "
                                                 "checkpoint is loaded (its model's backbone must be the GA "
                                                 "config's); or leave it null and name a released GA checkpoint "
                                                 "folder in init")
    anchors_per_seq: int = Field(16, ge=1, description="draft blocks per row, at distinct random anchors")
    ce_weight: float = Field(0.1, ge=0, description="cross entropy of the Markov-corrected drafts")
    tv_weight: float = Field(0.9, ge=0, description="slot-weighted L1 distance to the target's distribution")
    tv_decay: float = Field(4.0, gt=0, description="slot k's distance weight is exp(-k / tv_decay)")
    confidence_weight: float = Field(1.0, ge=0, description="BCE of the confidence head against the acceptance "
                                                            "probability")
    grad_clip: float = Field(1.0, gt=0, description="global gradient-norm clip")


class Mesh(Section):
    data: int = Field(-1, description="-1: the devices the other axes leave")
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    @model_validator(mode="after")
    def sizes(self):
        sizes = self.model_dump()
        if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
            raise ValueError(f"axis sizes are >= 1, or -1 for at most one axis (got {sizes})")
        return self


class Checkpoint(Section):
    every: int = Field(100, ge=1, description="save every this many steps (and at the end)")
    keep: int | None = Field(3, ge=1, description="checkpoints kept, the newest (null: all)")
    async_: bool = Field(True, alias="async", description="write in the background")


class Guard(Section):
    spike_factor: float | None = Field(
        3.0, gt=1, description="a loss above this times the mean of the last spike_window good steps is a spike "
                               "(null: no spike check)")
    spike_window: int = Field(20, ge=1, description="good steps the spike check averages; it starts once a stage "
                                                    "has had that many")
    max_bad_steps: int = Field(3, ge=1, description="bad steps in a row that roll back to the newest checkpoint")
    max_rollbacks: int = Field(2, ge=0, description="rollbacks to one checkpoint before the run stops")


class Distributed(Section):
    coordinator_address: str | None = None
    num_processes: int | None = Field(None, ge=1)
    process_id: int | None = Field(None, ge=0)


class RunConfig(Section):
    run_dir: str = Field("runs/default", description="checkpoints, metrics.jsonl, tensorboard/")
    seed: int = Field(0, description="model initialisation")
    model: ModelSection = ModelSection()
    init: str | None = Field(None, description="fine-tuning: a released-layout checkpoint folder to load (the "
                                               "base model of a LoRA run)")
    lora: LoraSection = LoraSection()
    drafter: DrafterSection = DrafterSection()
    data: DataSection = DataSection()
    stages: list[Stage] = Field(
        [Stage(until_step=100, batch_size=8, seq_len=256)], min_length=1,
        description="run in order, each until its until_step (increasing)")
    schedule: Schedule = Schedule()
    optimizer: Optimizer = Optimizer()
    loss: LossSection = LossSection()
    mesh: Mesh = Mesh()
    rules: Any = Field("train", description="sharding rules: train | decode | {logical axis: mesh axis}")
    checkpoint: Checkpoint = Checkpoint()
    log_every: int = Field(10, ge=1, description="steps between progress lines on stdout")
    guard: Guard = Guard()
    distributed: Distributed = Distributed()

    @field_validator("stages")
    @classmethod
    def increasing(cls, stages):
        ends = [s.until_step for s in stages]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"until_step must increase from stage to stage (got {ends})")
        return stages

    @field_validator("rules")
    @classmethod
    def known_rules(cls, rules):
        if not (rules in ("train", "decode") or isinstance(rules, dict)):
            raise ValueError("use train, decode or a {logical axis: mesh axis} mapping")
        return rules


ATTENTION = {"dense": dict(csa_dense=True, indexer_loss=False),
             "indexer_warmup": dict(csa_dense=True, indexer_loss=True),
             "sparse": dict(csa_dense=False, indexer_loss=True)}


class ConfigError(InputError):
    """A run config that does not validate: the message names each bad key."""


def _key(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _known_keys(loc) -> list[str]:
    """The keys allowed beside the last one of `loc`."""
    node = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        node = node.model_fields[part].annotation
        node = typing.get_args(node)[0] if typing.get_origin(node) is list else node
    return sorted(f.alias or name for name, f in node.model_fields.items())


def validate(raw: dict) -> dict:
    """The run config as plain dicts, every key typed and checked, defaults filled in."""
    try:
        cfg = RunConfig.model_validate(raw).model_dump(by_alias=True)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key {_key(err['loc'])!r}; known keys here: {_known_keys(err['loc'])}")
            elif err["type"] == "missing":
                problems.append(f"{_key(err['loc'])} is required")
            else:
                problems.append(f"{_key(err['loc'])} = {err['input']!r}: {err['msg']}")
        raise ConfigError("config: " + "; ".join(problems)) from None
    if cfg["lora"]["enabled"] and not cfg["init"]:
        raise ConfigError("config: lora.enabled trains adapters on a base model, and init names none: set init (and "
                          "model.config) to the base's released-layout checkpoint folder")
    if cfg["lora"]["enabled"] and any(st["attention"] == "indexer_warmup" for st in cfg["stages"]):
        raise ConfigError("config: an indexer_warmup stage trains only the indexer, which LoRA leaves frozen: use "
                          "dense or sparse stages with lora.enabled")
    if cfg["drafter"]["enabled"]:
        check_drafter(cfg)
    return cfg


def check_drafter(cfg: dict) -> None:
    """A drafter run needs a GA model config (one with a drafter), exactly one target and room for its anchors."""
    d = cfg["drafter"]
    if cfg["lora"]["enabled"]:
        raise ConfigError("config: drafter.enabled and lora.enabled both train part of a frozen model: enable one")
    if (d["target"] is None) == (cfg["init"] is None):
        raise ConfigError("config: drafter.enabled needs one frozen target: set drafter.target to the target run's "
                          "config (e.g. configs/train/tiny.yaml), or init to a released GA checkpoint folder")
    mcfg = model_config(cfg)
    if not mcfg.dspark:
        raise ConfigError("config: drafter.enabled trains a DSpark drafter and this model config has none: use a "
                          "GA config (model.preset: tiny-dspark, or a config.json with the dspark_* fields)")
    B, n = mcfg.dspark_block_size, d["anchors_per_seq"]
    for i, st in enumerate(cfg["stages"]):
        if n > st["seq_len"] - B:
            raise ConfigError(f"config: drafter.anchors_per_seq {n} is more than the {st['seq_len'] - B} anchors a row "
                              f"of stages[{i}].seq_len {st['seq_len']} holds (block size {B}): lower it")


def merge(base: dict, new: dict) -> dict:
    """`new` over `base`; dicts merge key by key (except model.overrides and rules, which replace)."""
    out = dict(base)
    for k, v in new.items():
        nested = isinstance(out.get(k), dict) and isinstance(v, dict) and k not in ("overrides", "rules")
        out[k] = merge(out[k], v) if nested else v
    return out


def parse_value(text: str):
    """A command-line value as YAML, except that numbers like 1e-3 (a string to YAML 1.1) are floats."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def load_config(argv: list[str]) -> dict:
    """The YAML file (first argument), then `dotted.key=value` overrides (values parsed as YAML), validated."""
    if not argv or "=" in argv[0]:
        raise ConfigError("usage: python -m train.pretrain CONFIG.yaml [key.sub=value ...] (see --help)")
    path = Path(argv[0])
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config is a mapping of keys (see --help)")
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"override {arg!r} is not key=value (e.g. schedule.peak_lr=1e-3)")
        update: dict = {}
        node = update
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_value(value)
        raw = merge(raw, update)
    return validate(raw)


def schema_help(model=RunConfig, prefix: str = "") -> list[str]:
    """One line per key of the run config: key, type, default and what it does (for --help)."""
    lines = []
    for name, f in model.model_fields.items():
        key, t = prefix + (f.alias or name), f.annotation
        if isinstance(t, type) and issubclass(t, BaseModel):
            lines += schema_help(t, key + ".")
            continue
        if typing.get_origin(t) is list and issubclass(typing.get_args(t)[0], BaseModel):
            lines.append(f"  {key}: a list, default {json.dumps(RunConfig().model_dump(by_alias=True)[key])}")
            lines += schema_help(typing.get_args(t)[0], key + "[i].")
            continue
        default = "required" if f.is_required() else f"default {json.dumps(f.default)}"
        kind = ("|".join(typing.get_args(t)) if typing.get_origin(t) is Literal
                else getattr(t, "__name__", str(t)).replace("typing.", ""))
        lines.append(f"  {key} ({kind}, {default})" + (f": {f.description}" if f.description else ""))
    return lines


def model_config(cfg: dict) -> ModelConfig:
    m = cfg["model"]
    if m["config"]:
        path = Path(m["config"])
        is_hf = "model_type" in json.loads((path / "config.json" if path.is_dir() else path).read_text())
        load = ModelConfig.from_hf_config if is_hf else ModelConfig.from_official_config
        return load(path, **m["overrides"])
    return ModelConfig.preset(m["preset"], **m["overrides"])


def build_model(cfg: dict, mcfg: ModelConfig, mesh=None, rules=None) -> Transformer:
    """The model a run starts from, placed on `mesh` by `rules` (if given): initialised from cfg["seed"], with
    `init`'s weights if named; with lora.enabled, `init`'s weights as stored (FP8 / MXFP4 kept quantized, nothing
    initialised) and fresh adapters (lora.attach: b = 0, so it computes the base)."""
    if cfg["lora"]["enabled"]:
        model = abstract_model(mcfg)
        load_hub_state(model, cfg["init"], weights="quantized", mesh=mesh, rules=rules)
        lora.attach(model, lora_config(cfg), nnx.Rngs(cfg["seed"]))
        return model if mesh is None else shard_model(model, mesh, rules, lora.LoraParam)
    model = Transformer(mcfg, rngs=nnx.Rngs(cfg["seed"]))
    if cfg["init"]:
        load_hub_state(model, cfg["init"], weights=mcfg.param_dtype)
    if cfg["drafter"]["enabled"] and cfg["drafter"]["target"]:
        load_target(model, cfg["drafter"]["target"])
    return model if mesh is None else shard_model(model, mesh, rules)


def load_target(model: Transformer, target_config: str) -> None:
    """Put the backbone of the run that `target_config` trained (its newest checkpoint; a preview model's MTP block
    is left out) into `model`, whose drafter stays as initialised. The two backbones must have the same variables
    and shapes."""
    target = restore_run([target_config])[0]
    backbone = {k: v for k, v in nnx.to_flat_state(nnx.state(target)) if k[0] != "mtp"}
    ours = {k: v for k, v in nnx.to_flat_state(nnx.state(model)) if k[0] != "dspark"}
    differ = sorted(".".join(map(str, k)) for k in set(ours) | set(backbone)
                    if k not in ours or k not in backbone or ours[k].shape != backbone[k].shape)
    if differ:
        raise ConfigError(f"the target run of {target_config} has another backbone than model.*: {differ[:5]} differ; "
                          "set model.* to the target's config plus the dspark_* fields")
    nnx.update(model, nnx.from_flat_state(backbone))


def lora_config(cfg: dict) -> lora.LoraConfig:
    lc = cfg["lora"]
    return lora.LoraConfig(rank=lc["rank"], alpha=lc["alpha"], targets=tuple(lc["targets"]), dropout=lc["dropout"])


def trained(cfg: dict):
    """The nnx filter of the variables a run trains: the adapters of a LoRA run, the drafter's parameters of a
    drafter run, else every Param."""
    if cfg["drafter"]["enabled"]:
        return nnx.All(nnx.Param, nnx.PathContains("dspark"))
    return lora.LoraParam if cfg["lora"]["enabled"] else nnx.Param


def optimizer(cfg: dict, mcfg: ModelConfig, params, schedule) -> optax.GradientTransformation:
    """Muon + AdamW for the whole model (train.muon); for LoRA adapters lora.optimizer: AdamW alone
    (optimizer.adam_* keys) or Muon alone (lora_muon_split); for a drafter, AdamW after a global-norm clip (the
    DeepSpec recipe; weight decay as optimizer.adam_weight_decay)."""
    o = cfg["optimizer"]
    adam = dict(b1=o["adam_b1"], b2=o["adam_b2"], eps=o["adam_eps"], weight_decay=o["adam_weight_decay"])
    if cfg["drafter"]["enabled"]:
        return optax.chain(optax.clip_by_global_norm(cfg["drafter"]["grad_clip"]), optax.adamw(schedule, **adam))
    if cfg["lora"]["enabled"] and cfg["lora"]["optimizer"] == "muon":
        return muon(schedule, lambda name, shape: lora_muon_split(name, shape, mcfg), o["momentum"],
                    o["muon_rms_scale"], o["muon_weight_decay"])
    if cfg["lora"]["enabled"]:
        return optax.adamw(schedule, **adam)
    return v4_optimizer(params, mcfg, schedule, momentum=o["momentum"], rms_scale=o["muon_rms_scale"],
                        muon_wd=o["muon_weight_decay"], adam_b1=adam["b1"], adam_b2=adam["b2"], adam_eps=adam["eps"],
                        adam_wd=adam["weight_decay"])


def lora_muon_split(name: str, shape: tuple[int, ...], mcfg: ModelConfig) -> MatrixSplit:
    """The matrices Muon orthogonalises in an adapter factor `<weight>_lora.a` [.., rank, in] or `.b` [.., out,
    rank]: leading axes (routed experts) index separate matrices, as for the weights; a is one matrix each; b's
    rows are its weight's output rows, so b is cut as muon_split cuts the weight (wo_a: a block per output group,
    the rest whole)."""
    owner, factor = name.rsplit(".", 1)
    return muon_split(owner.removesuffix("_lora"), shape, mcfg) if factor == "b" else MatrixSplit((shape[-2],))


def checkpointed(state: dict, cfg: dict) -> dict:
    """The part of the train state a checkpoint holds: params, others (router biases, tid2eid) and the optimizer
    state; a LoRA or drafter run's only the adapters or the drafter and their optimizer state (the frozen base or
    target is reloaded from `init` or drafter.target)."""
    partial_run = cfg["lora"]["enabled"] or cfg["drafter"]["enabled"]
    keys = ("params", "opt_state") if partial_run else ("params", "others", "opt_state")
    return {k: state[k] for k in keys}


def lr_schedule(s: dict, total_steps: int):
    """Linear warmup to peak_lr, constant until decay_start, then cosine down to final_lr at the last step."""
    decay_start = s["decay_start"] if s["decay_start"] is not None else total_steps
    return optax.join_schedules([
        optax.linear_schedule(0.0, s["peak_lr"], max(s["warmup_steps"], 1)),
        optax.constant_schedule(s["peak_lr"]),
        optax.cosine_decay_schedule(s["peak_lr"], max(total_steps - decay_start, 1), s["final_lr"] / s["peak_lr"]),
    ], [max(s["warmup_steps"], 1), decay_start])


# ---- the train step ---------------------------------------------------------------------------------------

def make_train_step(graphdef, tx, trainable, bias_speed: float | None, state_shardings):
    """The jitted step: (params, others, opt_state, batch [accum, rows, L+1], weights, loss_limit) -> new state,
    metrics. The new state keeps `state_shardings` (the inputs'), so the next call reuses the compiled program.

    `others` holds the non-trained variables (router biases, tid2eid; a LoRA run's whole base); `trainable` is a
    {name: bool} mask (False freezes a parameter: its update is zeroed). bias_speed None freezes the router
    biases: `others` comes back as it went in. A bad step keeps the old state (parameters, optimizer, router
    biases): its loss or gradient norm is not finite, its loss is above `loss_limit` (a spike), or its update
    would make a parameter non-finite. metrics["good"] says which.
    """

    def loss_fn(params, others, mb, weights):
        model = nnx.merge(graphdef, params, others)
        if "dropout_key" in mb:  # LoRA dropout: this micro-batch's masks
            lora.set_dropout_keys(model, mb["dropout_key"])
        if "anchors" in mb:  # a drafter run
            loss, metrics, loads = losses.drafter_objective(model, mb["tokens"], mb["segment_ids"], mb["anchors"],
                                                            weights, mb.get("loss_mask"))
        else:
            loss, metrics, loads = losses.objective(model, mb["tokens"], mb["segment_ids"], weights,
                                                    mb.get("loss_mask"))
        return loss, (metrics | {"loss": loss}, loads)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @partial(jax.jit, donate_argnums=(0, 1, 2), out_shardings=(*state_shardings, None))
    def step(params, others, opt_state, batch, weights, loss_limit=math.inf):
        def micro(grad_sum, mb):
            (_, (metrics, loads)), grads = grad_fn(params, others, mb, weights)
            return jax.tree.map(jnp.add, grad_sum, grads), (metrics, loads)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (metrics, loads) = jax.lax.scan(micro, zeros, batch)
        n_micro = batch["tokens"].shape[0]
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        loads = jax.tree.map(lambda v: jnp.sum(v, axis=0), loads)  # None for a drafter run

        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        updates = jax.tree_util.tree_map_with_path(lambda p, u: u if trainable[path_str(p)] else 0 * u, updates)
        new_params = optax.apply_updates(params, updates)
        good = step_is_good(metrics["loss"], grad_norm, new_params, loss_limit)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(good, n, o), new, old)  # noqa: E731
        if bias_speed is not None:
            others = keep(update_router_biases(others, loads, bias_speed), others)
        if loads is not None:
            load_max, load_min = losses.load_balance(loads)
            metrics |= {"load_max": load_max, "load_min": load_min}
        metrics |= {"grad_norm": grad_norm, "good": good}
        return keep(new_params, params), others, keep(new_opt, opt_state), metrics

    return step


def step_is_good(loss, grad_norm, new_params, loss_limit):
    """The guard: a finite loss not above loss_limit, a finite gradient norm, and finite updated parameters."""
    params_finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]))
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (loss <= loss_limit) & params_finite


def update_router_biases(others, loads: losses.ExpertLoads, speed: float):
    """Apply the aux-loss-free bias rule to the RouterBias of every score-routed MoE that ran: backbone layer i's
    (`layers.i.ffn.gate.bias`) from loads.layers[i], the MTP block's from loads.mtp (a GA checkpoint's drafter
    does not run in training: its biases stay)."""
    sites = [(("layers", i), load) for i, load in enumerate(loads.layers)] + [(("mtp",), loads.mtp)]

    def update(path, var):
        keys = tuple(getattr(k, "key", k) for k in path)
        load = next((load for site, load in sites if keys == (*site, "ffn", "gate", "bias")), None)
        if not isinstance(var, RouterBias) or load is None:
            return var
        return var.replace(losses.router_bias_update(load, var[...], speed))

    return jax.tree_util.tree_map_with_path(update, others, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---- data onto the mesh ------------------------------------------------------------------------------------

def global_batch(stream: PackedStream | RowStream, offset: int, stage: dict, sharding: NamedSharding) -> dict:
    """The stage's global batch [accum, rows, L+1] at stream `offset`; this process reads only the rows its
    devices hold (row r of micro-batch a is stream row a * rows + r)."""
    accum, rows, L = stage["grad_accum"], stage["batch_size"], stage["seq_len"]
    shape = (accum, rows, L + 1)
    held = sorted({r for idx in sharding.addressable_devices_indices_map(shape).values()
                   for r in range(*idx[1].indices(rows))})
    out = {}
    parts = [stream.batch(offset + (a * rows + held[0]) * L, len(held), L) for a in range(accum)]
    for key in parts[0]:  # tokens, segment_ids (and loss_mask for SFT rows)
        local = np.stack([p[key] for p in parts])
        out[key] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out


def anchor_batch(cfg: dict, offset: int, stage: dict, block: int, sharding: NamedSharding) -> jax.Array:
    """A drafter run's block starts for the batch at stream `offset`: [accum, rows, anchors_per_seq] distinct
    positions in 1 .. seq_len - block per row, sorted, drawn from (data.seed, offset) (a resume draws the same);
    this process holds only its rows, as global_batch."""
    accum, rows, L = stage["grad_accum"], stage["batch_size"], stage["seq_len"]
    rng = np.random.default_rng([cfg["data"]["seed"], offset])
    n = cfg["drafter"]["anchors_per_seq"]
    anchors = np.sort(np.argsort(rng.random((accum, rows, L - block)), axis=-1)[..., :n], axis=-1) + 1
    held = sorted({r for idx in sharding.addressable_devices_indices_map(anchors.shape).values()
                   for r in range(*idx[1].indices(rows))})
    return jax.make_array_from_process_local_data(sharding, anchors[:, held].astype(np.int32), anchors.shape)


# ---- checkpoints -------------------------------------------------------------------------------------------

def checkpoint_manager(cfg: dict) -> ocp.CheckpointManager:
    c = cfg["checkpoint"]
    opts = ocp.CheckpointManagerOptions(max_to_keep=c["keep"], enable_async_checkpointing=c["async"])
    return ocp.CheckpointManager(Path(cfg["run_dir"]).absolute() / "checkpoints", options=opts)


def save(manager, step: int, state: dict, meta: dict) -> None:
    """Async save (returns once the arrays are copied off the devices). Orbax writes into a temporary folder and
    renames it when complete, so a kill at any moment leaves only whole checkpoints behind."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(manager, state: dict, step: int) -> tuple[dict, dict]:
    """Checkpoint `step`, placed like `state` (its shapes and shardings)."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    got = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return got["state"], got["meta"]


def restore_newest(manager, state: dict) -> tuple[tuple[dict, dict] | None, str]:
    """(state, meta) of the newest checkpoint that restores (None when there is no checkpoint), and a note naming
    the newer ones that did not restore and why. Those are damaged (truncated or unreadable files; an older one
    of the same run restores) and are moved to <run_dir>/damaged-checkpoints/, out of the way of later saves.
    When no checkpoint restores, nothing is moved: that is more likely a run config that differs from the
    run's, named in the error."""
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            got = restore(manager, state, step)
        except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            failed.append((step, f"{type(e).__name__}: {reason}"))
            continue
        notes = []
        for bad, why in failed:
            aside = Path(manager.directory).parent / "damaged-checkpoints" / f"{bad}-{time.time_ns()}"
            if jax.process_index() == 0:
                aside.parent.mkdir(exist_ok=True)
                os.replace(Path(manager.directory) / str(bad), aside)
            notes.append(f"checkpoint {bad} is damaged ({why}), moved to {aside}")
        manager.reload()
        return got, "; ".join(notes)
    if failed:
        raise InputError(f"no checkpoint in {manager.directory} restores ("
                         + "; ".join(f"{bad}: {why}" for bad, why in failed) + "); if the run config's model or "
                         "optimizer changed since they were written, resume with the run's own")
    return None, ""


def restore_run(config_argv: list[str]):
    """The model of a training run's newest intact checkpoint -> (model, the run's tokenizer path, its meta), for
    what uses a run after training: train.export, a drafter's target, v4jax-generate and the notebooks. A LoRA
    run's model is its base (init, kept quantized) with the checkpoint's adapters attached."""
    cfg = load_config(config_argv)
    mcfg = model_config(cfg)
    stream = open_corpus(cfg["data"]["path"], cfg["data"]["seed"])
    graphdef, params, others = nnx.split(build_model(cfg, mcfg), trained(cfg), ...)
    # the run's optimizer, only to give the checkpoint's tree its structure
    tx = optimizer(cfg, mcfg, params, lr_schedule(cfg["schedule"], cfg["stages"][-1]["until_step"]))
    state = {"params": params, "others": others, "opt_state": jax.jit(tx.init)(params)}
    manager = checkpoint_manager(cfg)
    got, damaged = restore_newest(manager, checkpointed(state, cfg))
    manager.close()
    if got is None:
        raise InputError(f"no checkpoint in {manager.directory}: train first (python -m train.pretrain ...)")
    if damaged:
        print(damaged)
    state, meta = state | got[0], got[1]
    return nnx.merge(graphdef, state["params"], state["others"]), stream.meta["tokenizer"], meta


# ---- logging -----------------------------------------------------------------------------------------------

def json_record(record: dict) -> str:
    """One strict-JSON line: a non-finite number (NaN, Infinity) is written as null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False)


class Log:
    """Metrics to stdout (every log_every steps, with a progress bar), every step to run_dir/metrics.jsonl (one
    strict-JSON line per step) and to TensorBoard event files in run_dir/tensorboard; only process 0 writes."""

    def __init__(self, cfg: dict, total_steps: int):
        self.main = jax.process_index() == 0
        self.every, self.total = cfg["log_every"], total_steps
        self.dir = Path(cfg["run_dir"])
        self.file = self.board = None

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def start_at(self, step: int) -> None:
        """Records continue after `step` (a fresh start, a resume or a rollback): metrics.jsonl keeps its lines
        up to `step` (atomically replaced; a line cut by a kill is dropped) and TensorBoard discards its events
        after `step`."""
        if not self.main:
            return
        self.close()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        kept = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a kill
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self.file = open(path, "a")
        # purge_step: TensorBoard drops the earlier files' events from this step on; the suffix keeps file names
        # unique and in order
        self.board = SummaryWriter(str(self.dir / "tensorboard"), purge_step=step + 1,
                                   filename_suffix=f".{time.time_ns()}")

    def step(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write(json_record(record) + "\n")
        self.file.flush()
        s = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.board.add_scalar(k, v, s)
        self.board.flush()  # a kill loses nothing already logged
        if s % self.every == 0 or s == self.total:
            bar = "#" * round(20 * s / self.total)
            parts = [f"{k} {record[k]:.4g}" for k in ("loss", "lm_loss", "mtp_loss", "indexer_kl", "draft_ce",
                                                      "draft_tv", "draft_bce", "draft_accept", "grad_norm",
                                                      "load_max", "load_min", "lr") if k in record]
            speed = (f" | {record['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in record else "")
            speed += f"  MFU {100 * record['mfu']:.2f}%" if "mfu" in record else ""
            print(f"[{bar:<20}] step {s}/{self.total} | " + "  ".join(parts) + speed, flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.board.close()
        self.file = self.board = None


def mfu_peak(run_dir: Path) -> tuple[float, str]:
    """The device peak for MFU. Measured peaks (CPUs) are measured once per run and kept in
    run_dir/mfu_peak.json, so that MFU stays comparable across restarts."""
    path = run_dir / "mfu_peak.json"
    if path.exists():
        got = json.loads(path.read_text())
        return got["flops"], got["source"] + f" (kept in {path})"
    peak, source = peak_flops_per_device()
    if "measured" in source and jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"flops": peak, "source": source}))
    return peak, source


def loss_weights(step: int, stage: dict, cfg: dict) -> dict[str, float]:
    """The loss-term weights of `step` (0-based) in `stage`."""
    if cfg["drafter"]["enabled"]:
        d = cfg["drafter"]
        return {"ce": d["ce_weight"], "tv": d["tv_weight"], "confidence": d["confidence_weight"],
                "tv_decay": d["tv_decay"]}
    lc, attn = cfg["loss"], ATTENTION[stage["attention"]]
    decay_start = cfg["schedule"]["decay_start"]
    decay_start = decay_start if decay_start is not None else cfg["stages"][-1]["until_step"]
    return {"lm": 0.0 if stage["attention"] == "indexer_warmup" else 1.0, "balance": lc["balance_weight"],
            "indexer": lc["indexer_weight"] if attn["indexer_loss"] else 0.0,
            "mtp": losses.mtp_weight(step, decay_start, lc["mtp_weight"], lc["mtp_weight_in_decay"])}


# ---- the run -----------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m train.pretrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain or fine-tune DeepSeek-V4; the same command resumes from run_dir's newest checkpoint.",
        epilog="run config keys (set in the YAML file or as key.sub=value):\n" + "\n".join(schema_help()))
    ap.add_argument("config", help="run config YAML, e.g. configs/train/tiny.yaml")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value",
                    help="override a key of the file (values are YAML), e.g. schedule.peak_lr=1e-3")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a known error too "
                                                         "(or set V4JAX_DEBUG=1)")
    return ap.parse_args(argv)


@dataclasses.dataclass
class Run:
    """What set_up builds for a run: its config, mesh and rules (and the batch layout they give), the data, the
    model config, the log, the train state {params, others, opt_state} and the optimizer with its schedule."""

    cfg: dict
    mesh: jax.sharding.Mesh
    rules: dict
    batch_sharding: NamedSharding
    stream: PackedStream | RowStream
    mcfg: ModelConfig
    log: "Log"
    state: dict
    tx: optax.GradientTransformation
    schedule: Any


def set_up(cfg: dict) -> Run:
    """The run before its first step: processes joined, the mesh, the data (a missing, empty or unsafe corpus is
    named here, before anything compiles), the model built or loaded and placed, the optimizer state."""
    d = cfg["distributed"]
    if any(v is not None for v in d.values()):
        jax.distributed.initialize(d["coordinator_address"], d["num_processes"], d["process_id"])
    mesh = make_mesh(mesh_shape(dict(cfg["mesh"]), jax.device_count()))
    rules = PRESETS.get(cfg["rules"], cfg["rules"])
    stream = open_corpus(cfg["data"]["path"], cfg["data"]["seed"])
    if stream.seq_len is not None and any(st["seq_len"] != stream.seq_len for st in cfg["stages"]):
        raise ConfigError(f"{cfg['data']['path']} holds rows of seq_len {stream.seq_len} (packed by train.chat): set "
                          f"every stage's seq_len to {stream.seq_len}")
    mcfg = for_mesh(model_config(cfg), mesh)  # the MoE path this mesh runs
    if stream.meta["vocab_size"] > mcfg.vocab_size:
        raise ConfigError(f"the data's vocabulary ({stream.meta['vocab_size']}) is larger than the model's "
                          f"vocab_size ({mcfg.vocab_size}): set model.overrides.vocab_size or retokenise")
    stages = cfg["stages"]
    total = stages[-1]["until_step"]
    log = Log(cfg, total)
    log.say(f"model: {mcfg.n_layers} layers, dim {mcfg.dim}, {mcfg.n_routed_experts} experts ({mcfg.moe_impl}) | "
            f"mesh {dict(mesh.shape)} | {jax.process_count()} process(es), {jax.device_count()} device(s)")
    log.say(f"data: {stream.describe()}")

    model = build_model(cfg, mcfg, mesh, rules)
    if cfg["lora"]["enabled"]:
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, lora.LoraParam)))
        log.say(f"LoRA: base {cfg['init']} frozen (FP8 / MXFP4 kept quantized); {n:,} adapter parameters "
                f"(rank {cfg['lora']['rank']}, alpha {cfg['lora']['alpha']}, {', '.join(cfg['lora']['targets'])}) "
                f"trained with {dict(adamw='AdamW', muon='Muon')[cfg['lora']['optimizer']]}; router biases frozen")
    elif cfg["drafter"]["enabled"]:
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, trained(cfg))))
        log.say(f"drafter: {n:,} parameters trained with AdamW on the frozen target "
                f"{cfg['drafter']['target'] or cfg['init']}, {cfg['drafter']['anchors_per_seq']} blocks of "
                f"{mcfg.dspark_block_size} per row")
    elif cfg["init"]:
        log.say(f"init: weights from {cfg['init']}")
    _, params, others = nnx.split(model, trained(cfg), ...)
    schedule = lr_schedule(cfg["schedule"], total)
    tx = optimizer(cfg, mcfg, params, schedule)
    # the moments take their parameters' shardings (jnp.zeros alone would replicate them on every device)
    opt_state = jax.jit(tx.init, out_shardings=follow_params(jax.eval_shape(tx.init, params), params))(params)
    state = {"params": params, "others": others, "opt_state": opt_state}
    return Run(cfg, mesh, rules, train_batch_sharding(mesh, rules), stream, mcfg, log, state, tx, schedule)


def resume(run: Run, manager) -> tuple[int, int, list]:
    """Restore the newest intact checkpoint into run.state -> the loop's position: (step, data offset, the losses
    of the last good steps, the spike check's average); (0, 0, []) for a fresh run."""
    cfg, log = run.cfg, run.log
    got, damaged = restore_newest(manager, checkpointed(run.state, cfg))
    if got is None:
        return 0, 0, []
    run.state, meta = run.state | got[0], got[1]
    if meta["data_seed"] != cfg["data"]["seed"]:
        raise ConfigError(f"{cfg['run_dir']} was trained with data.seed {meta['data_seed']}; resume with it")
    log.say(f"resumed from {manager.directory / str(meta['step'])} (step {meta['step']}, data offset "
            f"{meta['data_offset']:,})" + (f"; {damaged}" if damaged else ""))
    return meta["step"], meta["data_offset"], meta.get("loss_window", [])


def train(run: Run, manager, step: int, offset: int, window: list) -> None:
    """The stage loop from `step` (data at `offset`): each stage's step compiled once, the guard (bad steps skipped,
    rolled back to the last checkpoint after guard.max_bad_steps in a row), metrics, checkpoints."""
    cfg, log, mesh, rules, stream, mcfg = run.cfg, run.log, run.mesh, run.rules, run.stream, run.mcfg
    state, tx, schedule, batch_sharding = run.state, run.tx, run.schedule, run.batch_sharding
    stages = cfg["stages"]
    total = stages[-1]["until_step"]
    lora_on, drafter_on = cfg["lora"]["enabled"], cfg["drafter"]["enabled"]
    g, every = cfg["guard"], cfg["checkpoint"]["every"]
    log.start_at(step)
    peak, peak_src = mfu_peak(Path(cfg["run_dir"]))
    log.say(f"MFU peak: {peak / 1e12:.3f} TFLOP/s per device ({peak_src})")
    compiled: dict[int, tuple] = {}  # stage index -> (train step, FLOPs per step)
    current, t_last = None, None
    bad, due, rollbacks = 0, False, {}  # rollbacks: how many went to each checkpoint
    while step < total:
        i = next(k for k, st in enumerate(stages) if step < st["until_step"])
        stage = stages[i]
        attn = ATTENTION[stage["attention"]]
        tokens_per_step = stage["grad_accum"] * stage["batch_size"] * stage["seq_len"]
        if i != current:
            current, t_last = i, None
            log.say(f"stage {i + 1}/{len(stages)}: until step {stage['until_step']}, {stage['batch_size']} "
                    f"x {stage['seq_len']} tokens x {stage['grad_accum']} micro-batches, attention "
                    f"{stage['attention']}")
        first = i not in compiled
        if first:
            def staged():
                m = Transformer(mcfg.replace(**attn), rngs=nnx.Rngs(0))
                return lora.attach(m, lora_config(cfg), nnx.Rngs(0)) if lora_on else m

            graphdef = nnx.graphdef(nnx.eval_shape(staged))
            warmup = stage["attention"] == "indexer_warmup"
            # a GA checkpoint's DSpark drafter is not part of the model's objective: it stays as loaded (no
            # decay), unless it is what the run trains
            trainable = {path_str(p): (drafter_on or not path_str(p).startswith("dspark."))
                         and (".indexer." in path_str(p) or not warmup)
                         for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])}
            shardings = jax.tree.map(lambda x: x.sharding, (state["params"], state["others"], state["opt_state"]))
            bias_speed = None if lora_on or drafter_on else cfg["loss"]["bias_update_speed"]
            step_fn = make_train_step(graphdef, tx, trainable, bias_speed, shardings)
            compiled[i] = (step_fn, train_flops_per_token(mcfg, stage["seq_len"], attn["csa_dense"])
                           * tokens_per_step)
            log.say("compiling the train step (the stage's first step runs with it)...")
            t_compile = time.perf_counter()
        train_step, flops = compiled[i]
        if step == (stages[i - 1]["until_step"] if i else 0):
            window = []  # a stage changes the objective: the spike check starts over
        full = g["spike_factor"] and len(window) == g["spike_window"]  # no spike check on a stage's first steps
        limit = g["spike_factor"] * sum(window) / len(window) if full else math.inf
        batch = global_batch(stream, offset, stage, batch_sharding)
        if cfg["lora"]["dropout"]:  # a key per micro-batch, from (seed, step): a resume draws the same masks
            batch["dropout_key"] = jax.random.split(jax.random.fold_in(jax.random.key(cfg["seed"]), step),
                                                    stage["grad_accum"])
        if drafter_on:
            batch["anchors"] = anchor_batch(cfg, offset, stage, mcfg.dspark_block_size, batch_sharding)
        weights = {k: jnp.float32(v) for k, v in loss_weights(step, stage, cfg).items()}
        with use_rules(mesh, rules):  # traced under the mesh and rules: per-device MoE dispatch, activation
            # constraints at block boundaries, kernels per batch shard
            *new, metrics = train_step(state["params"], state["others"], state["opt_state"], batch, weights,
                                       jnp.float32(limit))
        state = dict(zip(("params", "others", "opt_state"), new))
        metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
        if first:
            log.say(f"compiled and ran the first step in {time.perf_counter() - t_compile:.1f} s")
        step += 1
        offset += tokens_per_step
        now = time.perf_counter()
        good = metrics.pop("good")
        record = {"step": step, "lr": float(schedule(step - 1)), "tokens": offset, **metrics,
                  "skipped": not good}
        if t_last is not None:  # the stage's first step includes compilation: no speed for it
            record["tokens_per_s"] = tokens_per_step / (now - t_last)
            if not drafter_on:  # train_flops_per_token counts the model's objective, not the drafter's
                record["mfu"] = flops / (now - t_last) / (peak * jax.device_count())
        t_last = now
        log.step(record)
        if good:
            bad = 0
            window = (window + [metrics["loss"]])[-g["spike_window"]:]
        else:
            bad += 1
            loss, norm = metrics["loss"], metrics["grad_norm"]
            why = (f"non-finite loss or gradient norm (loss {loss}, grad norm {norm})"
                   if not (math.isfinite(loss) and math.isfinite(norm)) else
                   f"loss spike ({loss:.4g} > {limit:.4g} = {g['spike_factor']} x the mean of the last "
                   f"{len(window)} good steps)" if loss > limit else "the update made a parameter non-finite")
            log.say(f"step {step}: {why}; update skipped ({bad} in a row)")
            if bad >= g["max_bad_steps"]:
                manager.wait_until_finished()
                target = manager.latest_step()
                if target is None or rollbacks.get(target, 0) >= g["max_rollbacks"]:
                    kept = ("no checkpoint was written yet" if target is None else
                            f"the newest checkpoint, {manager.directory / str(target)}, holds the last good "
                            "state (checkpoints are written only after good steps)")
                    raise InputError(f"stopped: {bad} bad steps in a row at step {step}, after "
                                     f"{rollbacks.get(target, 0)} rollback(s) to checkpoint {target}; {kept}; "
                                     "lower schedule.peak_lr or check the data, then run again to resume")
                rollbacks[target] = rollbacks.get(target, 0) + 1
                got, meta = restore(manager, checkpointed(state, cfg), target)
                state |= got
                log.say(f"rolled back to checkpoint {target} ({rollbacks[target]} of at most "
                        f"{g['max_rollbacks']}); the data goes on at offset {offset:,}: the batches of steps "
                        f"{target + 1}-{step} are skipped")
                step, window, bad, due, current = meta["step"], meta.get("loss_window", []), 0, False, None
                log.start_at(step)
                continue
        due = due or step % every == 0 or step == total
        if due and good:  # never after a bad step: every checkpoint holds a state that passed the guard
            save(manager, step, checkpointed(state, cfg), {"step": step, "data_offset": offset,
                                                           "data_seed": cfg["data"]["seed"], "loss_window": window})
            due = False
    manager.wait_until_finished()
    last = manager.latest_step()
    note = f" (its update was skipped: the newest checkpoint is step {last})" if last != step else ""
    log.say(f"done: step {step}{note}, checkpoints in {manager.directory}")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    run = set_up(load_config([args.config, *args.overrides]))
    manager = checkpoint_manager(run.cfg)
    try:
        train(run, manager, *resume(run, manager))
    finally:
        manager.close()
        run.log.close()


if __name__ == "__main__":
    cli.run(main, "train.pretrain")
