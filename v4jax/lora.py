"""LoRA adapters on a frozen (possibly quantized) DeepSeek-V4 (issue 17, item 1: the library side).

An adapter on a weight W [.., out, in] is a pair of factors a [.., rank, in] (random) and b [.., out, rank] (zero at
the start, so the adapted model starts equal to the base); the layer then computes with W + (alpha / rank) * b @ a.

Where they live: `attach` puts a `Lora` module beside each targeted weight of the built model, as the attribute
`<weight>_lora` of the module that owns it (`layers.3.attn.wq_a` gets `layers.3.attn.wq_a_lora.{a,b}`). The model
reads every targeted weight through `quant.weight(owner, name)`, which returns a `quant.Adapted` (base, a, b,
scale) when such an attribute exists; `quant.linear`, the grouped output projection (attention `_output`) and the
grouped expert matmuls (`experts.grouped_ffn`) add scale * (x a^T) b^T to the base product. The sum W + scale b a is
never formed in a forward or backward pass (except under expert parallelism, below), so no weight-sized gradient
is computed for it.

The base stays as loaded: `checkpoint.load_hub_state(model, src, weights="quantized")` leaves Fp8Weight /
Mxfp4Weight values in the Params; the matmuls dequantize them per use inside the traced function (quant.dense) or,
for routed experts on GPU / TPU, read the MXFP4 storage in the fp4 grouped kernel; nothing dequantized is kept
in the state. Within a training step, a dequantized weight the backward pass needs (for the input gradient) is a
residual of the forward unless the block is rematerialised: train with cfg.remat = "block" (tiny fixture, fp32,
batch 2 x 64, adapter gradient: 82 MB of temporaries without remat, 41 MB with; its quantized weights take 31 MB
dequantized to fp32).
The adapter factors are `LoraParam` variables, a Variable type of their own (not an nnx.Param), so
`nnx.state(model, LoraParam)` is exactly the adapters: differentiate and optimise that state alone (split the
model with `nnx.split(model, LoraParam, ...)`) and the base, router, norms and embeddings get neither a gradient
nor optimizer state. The factors are fp32 (master copies), cast to the compute dtype at use.

Targets (LoraConfig.targets): the attention projections wq_a, wq_b, wkv, wo_a, wo_b of every attention layer
(backbone, MTP block, drafter stages), "shared_experts" (w1, w2, w3) and, optionally, "experts": the routed
experts' w1, w2, w3 with one (a, b) pair per expert (a leading expert axis, the weight's own). wo_a is stored
[groups * o_lora_rank, in / groups] and applied group-wise; its adapter is one on that stored matrix, applied the
same way (rows of group j read group j's heads), so merging stays W + scale b a.

Sharding: a factor takes the logical axes of its weight (a: the leading axes, "lora_rank", the input axis; b: the
leading axes, the output axis, "lora_rank"); "lora_rank" is in no rule set, so it is replicated and the rest
follows the existing rules: `sharding.shard_model(model, mesh, rules, LoraParam)` places the adapters alone
(the quantized base is placed by load_hub_state's mesh / rules).

The adapter sees the same input as the base matmul, including qat's FP8 rounding of it, so `merge` (W + scale b a
written into the Params as dense fp32) computes the adapted model's function up to fp32 rounding. Exporting it in
the release layout re-quantizes the merged weights (checkpoint.hub_tensors re-encodes dense values: a rounding
error the size of quantizing any dense weight, measured in docs/training.md). `save_adapters` / `load_adapters`
write and read the adapters alone in PEFT's layout (names: `peft_module`).

Dropout (LoraConfig.dropout) acts on the adapter's input only, in training only. The forward takes no rng, and an
nnx Dropout's rng counter would not advance inside the blocks (model.run_blocks runs each on a merged copy and
returns no state), so the mask's key is state instead: a train step calls `set_dropout_keys(model, key)` on the
model it merged, which gives each adapter a `LoraKey` variable; quant.weight passes it to `Adapted`, whose
`adapter_input` draws the mask. The keys are inputs of every block (a rematerialised block redraws the same mask)
and are never in a checkpoint; a model without keys (eval, generation, export) applies no dropout.
Under expert parallelism (a mesh with more than one device, moe_impl "expert_parallel") routed-expert adapters are
merged into dense expert weights before the exchange (correct, but a dense weight gradient per layer). A model
with adapters attached is not a hub / Orbax model tree: merge (or drop) them before export_hub_state, and
model.with_config rebuilds the tree without them (attach again, then update).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.attention import Attention
from v4jax.hub import SafetensorsFile, hub_to_hf, path_to_hub, staged_folder, write_safetensors
from v4jax.model import Transformer
from v4jax.moe import MoE
from v4jax.quant import Adapted, dense

ATTENTION_TARGETS = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")
EXPERT_TARGETS = ("shared_experts", "experts")
EXPERT_WEIGHTS = ("w1", "w2", "w3")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank and alpha (scale alpha / rank), the weights to adapt: attention projection names and
    "shared_experts" / "experts" (all three SwiGLU weights; "experts" = the routed ones, per expert), and the
    dropout rate of the adapters' input in training."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ATTENTION_TARGETS + ("shared_experts",)
    dropout: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout {self.dropout}: must be at least 0 and below 1")
        unknown = sorted(set(self.targets) - set(ATTENTION_TARGETS + EXPERT_TARGETS))
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are unknown: choose from {ATTENTION_TARGETS + EXPERT_TARGETS}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank}: must be at least 1")


class LoraParam(nnx.Variable):
    """An adapter factor: the only trainable state of a LoRA run."""


class LoraKey(nnx.Variable):
    """The PRNG key of an adapter's dropout mask, set by `set_dropout_keys` inside a train step (never trained,
    never checkpointed)."""


def _axes(var) -> tuple:
    md = var.get_metadata()  # flax renamed the key across versions
    return tuple(md.get("out_sharding") or md.get("sharding_names") or md.get("sharding"))


class Lora(nnx.Module):
    """The factors a [.., rank, in] ~ N(0, 1 / in) and b [.., out, rank] = 0 of one weight Variable."""

    def __init__(self, var: nnx.Variable, rank: int, alpha: float, *, rngs: nnx.Rngs, dropout: float = 0.0):
        shape, axes = tuple(var.get_value().shape), _axes(var)
        lead, (out, inp) = shape[:-2], shape[-2:]
        a = jax.random.normal(rngs.params(), lead + (rank, inp), jnp.float32) / math.sqrt(inp)
        self.a = LoraParam(a, out_sharding=axes[:-2] + ("lora_rank", axes[-1]), eager_sharding=False)
        self.b = LoraParam(jnp.zeros(lead + (out, rank), jnp.float32), out_sharding=axes[:-1] + ("lora_rank",),
                           eager_sharding=False)
        self.scale, self.alpha, self.dropout = alpha / rank, alpha, dropout


def targets(model: nnx.Module, cfg: LoraConfig) -> list[tuple[str, nnx.Module, str]]:
    """(weight's parameter path, owner module, weight name) of every weight `cfg` adapts in `model`."""
    out = []
    for path, m in nnx.iter_modules(model):
        at = ".".join(map(str, path))
        if isinstance(m, Attention):
            out += [(f"{at}.{n}", m, n) for n in ATTENTION_TARGETS if n in cfg.targets]
        elif isinstance(m, MoE):
            for key in EXPERT_TARGETS:
                ex = getattr(m, key)
                if key in cfg.targets and ex is not None:
                    out += [(f"{at}.{key}.{n}", ex, n) for n in EXPERT_WEIGHTS]
    return out


def attach(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Attach a fresh adapter beside every targeted weight of `model` (in place; load the base first); returns it."""
    for _, owner, name in targets(model, cfg):
        if hasattr(owner, f"{name}_lora"):
            raise ValueError(f"{type(owner).__name__}.{name} already has a LoRA adapter")
        setattr(owner, f"{name}_lora", Lora(getattr(owner, name), cfg.rank, cfg.alpha, rngs=rngs,
                                             dropout=cfg.dropout))
    return model


def adapters(model: nnx.Module) -> list[tuple[nnx.Module, str, Lora]]:
    """(owner, weight name, adapter) of every adapter attached to `model`."""
    return [(m, name[: -len("_lora")], lora) for _, m in list(nnx.iter_modules(model))
            for name, lora in vars(m).items() if isinstance(lora, Lora) and name.endswith("_lora")]


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> nnx.Module:
    """Give every adapter with a dropout rate its mask key for one forward pass (fold_in(key, its index)), in
    place: a train step calls it on the model it merged, with a key of (seed, step, micro-batch). The keys are
    part of the model's state from then on, so a rematerialised block redraws the same masks; a model never
    given keys (eval, generation, export) applies no dropout. Returns the model."""
    for i, (_, _, lora) in enumerate(adapters(model)):
        if lora.dropout:
            lora.dropout_key = LoraKey(jax.random.fold_in(key, i))
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its weight (W + scale b a as a dense fp32 Param value) and remove the adapters (in
    place): the plain model that computes what the adapted one did; returns it."""
    for owner, name, lora in adapters(model):
        var = getattr(owner, name)
        var.set_value(Adapted(dense(var), lora.a[...], lora.b[...], lora.scale).merged())
        delattr(owner, f"{name}_lora")
    return model


def abstract_adapted(model_cfg, cfg: LoraConfig) -> Transformer:
    """model.abstract_model with `cfg`'s adapters attached: shapes, dtypes and logical axes, nothing allocated."""
    return nnx.eval_shape(lambda: attach(Transformer(model_cfg, rngs=nnx.Rngs(0)), cfg, nnx.Rngs(0)))


def adapter_param_count(model_cfg, cfg: LoraConfig) -> int:
    """The number of adapter parameters `cfg` gives a model of config `model_cfg` (abstract: nothing allocated)."""
    model = abstract_adapted(model_cfg, cfg)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, LoraParam)))


# ---- adapters alone on disk, PEFT-style --------------------------------------------------------------------

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
EVERY = LoraConfig(targets=ATTENTION_TARGETS + EXPERT_TARGETS)  # to find every adaptable weight


class AdapterMismatch(ValueError):
    """An adapter folder that does not fit the model it is loaded onto."""


def peft_module(path: str, expert: int | None = None) -> str:
    """The module name an adapter on the weight at v4jax parameter `path` is saved under: HF transformers' name
    for that weight (architecture §5.3; `model.layers.3.self_attn.q_a_proj`), so PEFT can put it on the HF model. Routed
    experts (HF stacks them in one tensor, which PEFT's LoRA does not adapt) get one module per expert, named as
    the shared expert's projections: `model.layers.3.mlp.experts.<e>.gate_proj` (w1), `.up_proj` (w3),
    `.down_proj` (w2). The MTP block and the DSpark drafter stages, absent from HF, keep their hub names
    (`mtp.0.attn.wq_a`, `mtp.0.ffn.experts.<e>.w1`)."""
    name = _hf_name(path) or path_to_hub(path.replace(".experts.", ".shared_experts."))
    module = name.removesuffix(".weight")
    return module if expert is None else module.replace(".shared_experts.", f".experts.{expert}.")


def _hf_name(path: str) -> str | None:
    """HF transformers' name of the weight at `path` (routed experts: as the shared expert's), None for the MTP
    block and the DSpark drafter, which HF does not have."""
    hf = hub_to_hf({path_to_hub(path.replace(".experts.", ".shared_experts.")): None}, n_layers=sys.maxsize)
    return next(iter(hf), None)


def _peft_tensors(path: str, shape: tuple) -> dict[str, tuple[str, int | None]]:
    """{PEFT tensor name: (factor "a" / "b", expert index or None)} of an adapter on the weight at `path` of
    shape `shape` ([.., out, in]; stacked routed experts: [experts, out, in])."""
    experts = [None] if len(shape) == 2 else list(range(shape[0]))
    return {f"base_model.model.{peft_module(path, e)}.lora_{f.upper()}.weight": (f, e)
            for e in experts for f in ("a", "b")}


def save_adapters(model: nnx.Module, out_dir, base: str | None = None) -> None:
    """Write the adapters of `model` alone, as PEFT does: ADAPTER_WEIGHTS (fp32, `base_model.model.<module>.
    lora_A.weight` [rank, in] = a and `.lora_B.weight` [out, rank] = b, module names by `peft_module`) and
    ADAPTER_CONFIG (r, lora_alpha, lora_dropout, target_modules: the exact module names; `base`: the base
    checkpoint's name or path). `out_dir` must not exist; it appears complete or not at all (written in a
    temp folder, then renamed)."""
    found = [(path, owner, name, getattr(owner, f"{name}_lora")) for path, owner, name in targets(model, EVERY)
             if hasattr(owner, f"{name}_lora")]
    if not found:
        raise ValueError("the model has no LoRA adapters to save: attach (lora.attach) or load them first")
    settings = {(lora.a.shape[-2], lora.alpha, lora.dropout) for *_, lora in found}
    if len(settings) > 1:
        raise ValueError(f"the adapters differ in (rank, alpha, dropout) {sorted(settings)}: one adapter_config.json "
                         "describes one setting; save them with one LoraConfig")
    tensors = {}
    for path, owner, name, lora in found:
        factors = {f: np.asarray(jax.device_get(getattr(lora, f)[...]), np.float32) for f in ("a", "b")}
        for key, (f, e) in _peft_tensors(path, getattr(owner, name).shape).items():
            tensors[key] = factors[f] if e is None else factors[f][e]
    (rank, alpha, dropout), = settings
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
              "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": False, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True,
              "target_modules": sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                                        for k in tensors})}
    if Path(out_dir).exists():
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another folder")
    with staged_folder(out_dir) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapters(model: nnx.Module, src) -> nnx.Module:
    """Attach the adapters of a folder written by `save_adapters` (or PEFT, with these module names) to `model`,
    a loaded base without adapters, in place; returns it. The targets follow from the tensor names; every
    name and shape is checked against the model first (AdapterMismatch lists the problems, nothing is
    attached unless all fit). Values keep their stored bits (fp32 as saved; BF16 / FP16 widened to fp32). A file
    from PEFT on HF transformers has no adapters for the MTP block (HF has none): those weights get zero adapters
    (b = 0), so the MTP block stays the base's."""
    src = Path(src)
    if not (src / ADAPTER_CONFIG).is_file() or not (src / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{src}: no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}: pass a folder written by "
                                "`python -m train.export ... --adapters-only` (or PEFT's save_pretrained)")
    if adapters(model):
        raise ValueError("the model already has LoRA adapters: load the adapters onto the base alone")
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    plain = (("peft_type", "LORA"), ("use_rslora", False), ("use_dora", False), ("bias", "none"))
    unsupported = {k: config[k] for k, ok in plain if config.get(k, ok) != ok}
    if unsupported:
        raise AdapterMismatch(f"{src / ADAPTER_CONFIG}: {unsupported}: only plain LoRA adapters load here "
                              "(peft_type LORA, scale lora_alpha / r, no bias, no DoRA)")
    stored = SafetensorsFile(src / ADAPTER_WEIGHTS)
    have = set(stored.keys())
    shapes = {path: getattr(owner, name).shape for path, owner, name in targets(model, EVERY)}
    names = {path: _peft_tensors(path, shape) for path, shape in shapes.items()}
    kinds = {path.split(".")[-2] if path.split(".")[-2] in EXPERT_TARGETS else path.split(".")[-1]
             for path in shapes if names[path].keys() & have}
    cfg = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=tuple(sorted(kinds)),
                     dropout=float(config.get("lora_dropout") or 0.0))
    wanted = {path: names[path] for path, _, _ in targets(model, cfg)}
    # PEFT on HF transformers cannot adapt the stages HF lacks (MTP block, drafter): a weight there whose adapter
    # is absent altogether keeps the fresh one (b = 0: it adds nothing).
    absent = {path for path, per_weight in wanted.items()
              if not per_weight.keys() & have and _hf_name(path) is None}
    every = {k for path, per_weight in wanted.items() if path not in absent for k in per_weight}
    missing, unexpected = sorted(every - have), sorted(have - {k for per_weight in wanted.values() for k in per_weight})
    problems = [f"missing {missing[:4]} ({len(missing)} in all)"] if missing else []
    problems += [f"not in this model {unexpected[:4]} ({len(unexpected)} in all)"] if unexpected else []
    for path, per_weight in wanted.items():
        out, inp = shapes[path][-2:]
        for k, (f, _) in per_weight.items():
            want = (cfg.rank, inp) if f == "a" else (out, cfg.rank)
            if k in have and stored.info(k)[1] != want:
                problems.append(f"{k} is {list(stored.info(k)[1])}, this model needs {list(want)}")
    if problems:
        raise AdapterMismatch(f"{src}: the adapters do not fit this model: {'; '.join(problems[:6])}. Load them "
                              "onto the base they were trained on (its config.json), with its rank r")
    attach(model, cfg, nnx.Rngs(0))
    for path, owner, name in targets(model, cfg):
        if path in absent:
            continue
        lora = getattr(owner, f"{name}_lora")
        for f in ("a", "b"):
            parts = [np.asarray(stored[k], np.float32) for k, (g, _) in wanted[path].items() if g == f]
            getattr(lora, f).set_value(jnp.asarray(parts[0] if len(shapes[path]) == 2 else np.stack(parts)))
    return model
