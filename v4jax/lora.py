"""LoRA adapters on a frozen (possibly quantized) DeepSeek-V4 (issue 17, item 1: the library side).

An adapter on a weight W [.., out, in] is a pair of factors a [.., rank, in] (random) and b [.., out, rank] (zero at
the start, so the adapted model starts equal to the base); the layer then computes with W + (alpha / rank) * b @ a.

Where they live: `attach` puts a `Lora` module beside each targeted weight of the built model, as the attribute
`<weight>_lora` of the module that owns it (`layers.3.attn.wq_a` gets `layers.3.attn.wq_a_lora.{a,b}`). The model
reads every targeted weight through `quant.weight(owner, name)`, which returns a `quant.Adapted` (base, a, b,
scale) when such an attribute exists; `quant.linear`, the grouped output projection (attention `_output`) and the
grouped expert matmuls (`moe.grouped_ffn`) add scale * (x a^T) b^T to the base product. The sum W + scale b a is
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
the release layout means re-quantizing the merged weights (checkpoint.hub_tensors re-encodes dense values; lossy,
as the sum is off the FP8 / FP4 grid; not covered here).

Not here yet: dropout on the adapter input. The model's forward takes no rng and no train/eval flag, and an nnx
Dropout's rng counter would not advance inside the blocks (model.run_blocks runs each on a merged copy and returns
no state, for remat and scan), so every step would reuse the same masks; it needs an rng argument threaded through
Transformer.hidden to the blocks.
Under expert parallelism (a mesh with more than one device, moe_impl "ragged") routed-expert adapters are
merged into dense expert weights before the exchange (correct, but a dense weight gradient per layer). A model
with adapters attached is not a hub / Orbax model tree: merge (or drop) them before export_hub_state, and
model.with_config rebuilds the tree without them (attach again, then update).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.attention import Attention
from v4jax.model import Transformer
from v4jax.moe import MoE
from v4jax.quant import Adapted, dense

ATTENTION_TARGETS = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")
EXPERT_TARGETS = ("shared_experts", "experts")
EXPERT_WEIGHTS = ("w1", "w2", "w3")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank and alpha (scale alpha / rank), and the weights to adapt: attention projection names and
    "shared_experts" / "experts" (all three SwiGLU weights; "experts" = the routed ones, per expert)."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ATTENTION_TARGETS + ("shared_experts",)

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(ATTENTION_TARGETS + EXPERT_TARGETS))
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are unknown: choose from {ATTENTION_TARGETS + EXPERT_TARGETS}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank}: must be at least 1")


class LoraParam(nnx.Variable):
    """An adapter factor: the only trainable state of a LoRA run."""


def _axes(var) -> tuple:
    md = var.get_metadata()  # flax renamed the key across versions
    return tuple(md.get("out_sharding") or md.get("sharding_names") or md.get("sharding"))


class Lora(nnx.Module):
    """The factors a [.., rank, in] ~ N(0, 1 / in) and b [.., out, rank] = 0 of one weight Variable."""

    def __init__(self, var: nnx.Variable, rank: int, alpha: float, *, rngs: nnx.Rngs):
        shape, axes = tuple(var.get_value().shape), _axes(var)
        lead, (out, inp) = shape[:-2], shape[-2:]
        a = jax.random.normal(rngs.params(), lead + (rank, inp), jnp.float32) / math.sqrt(inp)
        self.a = LoraParam(a, out_sharding=axes[:-2] + ("lora_rank", axes[-1]), eager_sharding=False)
        self.b = LoraParam(jnp.zeros(lead + (out, rank), jnp.float32), out_sharding=axes[:-1] + ("lora_rank",),
                           eager_sharding=False)
        self.scale = alpha / rank


def targets(model: nnx.Module, cfg: LoraConfig) -> list[tuple[nnx.Module, str]]:
    """(owner module, weight name) of every weight `cfg` adapts in `model`."""
    out = []
    for _, m in nnx.iter_modules(model):
        if isinstance(m, Attention):
            out += [(m, n) for n in ATTENTION_TARGETS if n in cfg.targets]
        elif isinstance(m, MoE):
            for key in EXPERT_TARGETS:
                ex = getattr(m, key)
                if key in cfg.targets and ex is not None:
                    out += [(ex, n) for n in EXPERT_WEIGHTS]
    return out


def attach(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Attach a fresh adapter beside every targeted weight of `model` (in place; load the base first); returns it."""
    for owner, name in targets(model, cfg):
        if hasattr(owner, f"{name}_lora"):
            raise ValueError(f"{type(owner).__name__}.{name} already has a LoRA adapter")
        setattr(owner, f"{name}_lora", Lora(getattr(owner, name), cfg.rank, cfg.alpha, rngs=rngs))
    return model


def adapters(model: nnx.Module) -> list[tuple[nnx.Module, str, Lora]]:
    """(owner, weight name, adapter) of every adapter attached to `model`."""
    return [(m, name[: -len("_lora")], lora) for _, m in list(nnx.iter_modules(model))
            for name, lora in vars(m).items() if isinstance(lora, Lora) and name.endswith("_lora")]


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its weight (W + scale b a as a dense fp32 Param value) and remove the adapters (in
    place): the plain model that computes what the adapted one did; returns it."""
    for owner, name, lora in adapters(model):
        var = getattr(owner, name)
        var.set_value(Adapted(dense(var), lora.a[...], lora.b[...], lora.scale).merged())
        delattr(owner, f"{name}_lora")
    return model


def adapter_param_count(model_cfg, cfg: LoraConfig) -> int:
    """The number of adapter parameters `cfg` gives a model of config `model_cfg` (abstract: nothing allocated)."""
    model = nnx.eval_shape(lambda: attach(Transformer(model_cfg, rngs=nnx.Rngs(0)), cfg, nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, LoraParam)))
