"""Model configuration for DeepSeek-V4 (architecture §2).

`ModelConfig` uses the field names of the official `inference/model.py` ModelArgs, so an official
`inference/config.json` loads field for field; `from_hf_config` maps the HF `config.json` names. A few fields
are ours (marked below): numerics (`qat`, dtypes) and implementation switches. Presets: `flash`, `pro`
(the released models) and `tiny` (every V4 feature at toy size, for tests and the demo).

`compress_ratios` has n_layers + n_mtp_layers entries, as in the released configs: 0 = sliding window only,
4 = CSA (overlapping compressor + lightning indexer), 128 = HCA. The MTP entries are 0.

Two checkpoint layouts share the backbone (architecture §8.2). The April preview (`flash`, `pro`) has one MTP
block (n_mtp_layers = 1). The GA checkpoints (`flash-0731`, `pro-0813`) set the `dspark_*` fields and hold a DSpark
drafter of n_mtp_layers stages (3) in the same `mtp.*` namespace; their HF `num_nextn_predict_layers` still says 1
and is not what counts: the stage count is `n_mtp_layers` (official config), else len(compress_ratios) - n_layers,
else the `mtp.N.` prefixes of the checkpoint index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration that cannot describe a V4 model; the message names the field and the fix."""


@contextlib.contextmanager
def cli_errors(prog: str, debug: bool = False):
    """The error handling of the command line tools: a ValueError (ConfigError, CheckpointMismatch,
    hub.CheckpointError, an argument check) or OSError (a missing, existing or unwritable path, a held lock) ends
    the command with `prog: message` on stderr and exit status 1, without a traceback unless `debug` or the
    environment sets V4JAX_DEBUG (to anything but 0)."""
    try:
        yield
    except (ValueError, OSError) as e:
        if debug or os.environ.get("V4JAX_DEBUG", "") not in ("", "0"):
            raise
        raise SystemExit(f"{prog}: {e}") from None


MOE_IMPLS = ("ragged", "expert_parallel", "dense")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- official ModelArgs fields (inference/model.py) ---
    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 2048
    n_layers: int = 43
    n_hash_layers: int = 3
    n_mtp_layers: int = 1
    n_heads: int = 64
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    norm_eps: float = 1e-6
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    compress_rope_theta: float = 160000.0
    original_seq_len: int = 65536
    rope_theta: float = 10000.0
    rope_factor: float = 16.0
    beta_fast: int = 32
    beta_slow: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # DSpark drafter (GA checkpoints; dspark_block_size 0 = the preview's MTP block instead)
    dspark_block_size: int = 0  # B: draft slots per block (anchor + B - 1 noise tokens)
    dspark_noise_token_id: int = 0  # the token filling the block after the anchor
    dspark_target_layer_ids: tuple[int, ...] = ()  # backbone layers whose outputs feed the drafter
    dspark_markov_rank: int = 0  # rank of the Markov (previous draft token) logit correction
    # checkpoint storage format (official names; they describe the released files, see architecture §5)
    dtype: str = "fp8"
    scale_fmt: str | None = "ue8m0"
    expert_dtype: str | None = "fp4"
    # --- v4jax fields ---
    qat: bool = False  # reproduce the official inference code's quantization simulation (architecture §3.8)
    compute_dtype: str = "bfloat16"  # activations; "float32" for parity tests
    param_dtype: str = "float32"  # master weights
    # The routed experts' path (v4jax/moe.py): "ragged" dropless grouped matmuls; "expert_parallel" the same per
    # device under a multi-device mesh (v4jax/expert_parallel.py; sharding.for_mesh picks it for a run's mesh);
    # "dense" every expert on every token (a reference for tests)
    moe_impl: str = "ragged"
    # Expert parallelism (moe_impl "expert_parallel"; tokens exchanged when the mesh's `expert` axis is > 1): rows each device
    # may send to each device holding experts, as a multiple of the balanced share n_local * k / expert_size;
    # None = n_local * k, the worst case, which never drops. Smaller saves memory; drops are counted (ep_dropped).
    moe_ep_capacity: float | None = None
    attn_chunk: int = 256  # queries per chunk in compressed attention: bounds memory to O(chunk * T)
    loss_chunk: int = 1024  # positions per chunk of the training loss's head + cross entropy (fp32 logits)
    csa_dense: bool = False  # CSA attends every visible compressed entry (the dense training phase, architecture §6.2)
    indexer_loss: bool = False  # CSA layers sow the V3.2 indexer KL loss; the indexer's inputs are detached
    # "auto": Pallas kernels where the backend has them (GPU, TPU), else the pure-jnp references; or force
    # "pallas", "reference", or "pallas_interpret" (the GPU kernels interpreted on any backend: slow, for tests)
    kernels: str = "auto"
    remat: str = "none"  # rematerialisation per block in training: "none", "block" (save only its input), "dots"
    scan_layers: bool = False  # run the repeating (CSA, HCA) block pairs as one lax.scan (faster compiles)
    # IndexCache (sglang's and vLLM's option, same names): some CSA layers skip their lightning
    # indexer and reuse a top-k computed before them. Number the main stack's CSA layers j = 0, 1, ... in layer
    # order; layer j computes its own top-k if index_topk_pattern[j] == "F" (without a pattern: if
    # j % index_topk_freq == 0), else ("S") it attends the top-k of the most recent computing CSA layer, for the
    # same queries of the same call (a cached step reuses the picks made in that step). The first CSA layer
    # computes. A reusing layer runs none of its indexer (no scores, no top-k, no indexer keys in its cache, no
    # indexer KL); its indexer weights stay in the tree (checkpoints load unchanged). The MTP block and the
    # drafter never reuse (they are window-only). Give the frequency or the pattern, not both (the pattern says
    # everything the frequency does). Default: every CSA layer computes.
    index_topk_freq: int = 1
    index_topk_pattern: str | None = None

    def __post_init__(self):
        for f in ("compress_ratios", "dspark_target_layer_ids"):
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))
        self.validate()

    # ---- derived ----
    @property
    def dspark(self) -> bool:
        """True for the GA layout: the mtp.* stages are a DSpark drafter, not the preview's MTP block."""
        return self.dspark_block_size > 0

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def csa_layers(self) -> tuple[int, ...]:
        """The main stack's CSA layers (compress ratio 4), in order."""
        return tuple(i for i, r in enumerate(self.compress_ratios[:self.n_layers]) if r == 4)

    @property
    def index_topk_roles(self) -> str:
        """One character per CSA layer of the main stack (csa_layers): "F" computes its indexer top-k, "S" reuses
        the most recent "F" layer's (IndexCache: index_topk_pattern, else index_topk_freq)."""
        if self.index_topk_pattern is not None:
            return self.index_topk_pattern
        return "".join("S" if j % self.index_topk_freq else "F" for j in range(len(self.csa_layers)))

    @property
    def index_cache(self) -> bool:
        """Whether some CSA layer reuses an earlier layer's top-k (IndexCache is on)."""
        return "S" in self.index_topk_roles

    def reuses_topk(self, layer: int) -> bool:
        """Whether `layer` (any index: MTP / drafter stages never do) attends a top-k computed by an earlier layer."""
        csa = self.csa_layers
        return layer in csa and self.index_topk_roles[csa.index(layer)] == "S"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation ----
    def validate(self) -> None:
        def bad(field, problem, fix):
            raise ConfigError(f"ModelConfig.{field}: {problem}. {fix}")

        for f in dataclasses.fields(self):  # types first: the checks below compare numbers
            value, optional = getattr(self, f.name), f.type.endswith(" | None")
            check, fix = _TYPES[f.type.removesuffix(" | None")]
            if not (check(value) or optional and value is None):
                hf = {ours: hf for hf, ours in _HF_NAMES.items() if hf != ours}.get(f.name)
                bad(f.name + (f" (HF config.json: {hf})" if hf else ""), f"is {value!r} ({type(value).__name__})", fix)
        for f in _POSITIVE:
            if getattr(self, f) < 1:
                bad(f, f"is {getattr(self, f)}", "Give a size of at least 1")
        n_ratios = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != n_ratios:
            bad("compress_ratios", f"has {len(self.compress_ratios)} entries but n_layers + n_mtp_layers = {n_ratios}",
                "Give one ratio per layer plus one per MTP layer or drafter stage (0 each: they are window-only)")
        for i, r in enumerate(self.compress_ratios):
            if r not in (0, 4, 128):
                bad("compress_ratios", f"entry {i} is {r}", "Use 0 (window only), 4 (CSA) or 128 (HCA)")
        for i in range(self.n_layers, n_ratios):
            if self.compress_ratios[i] != 0:
                bad("compress_ratios", f"MTP entry {i} is {self.compress_ratios[i]}",
                    "MTP / drafter stages are window-only: use 0")
        dspark_set = [f for f in ("dspark_block_size", "dspark_markov_rank", "dspark_target_layer_ids")
                      if getattr(self, f)]
        if self.dspark:
            if len(dspark_set) < 3:
                missing = sorted({"dspark_markov_rank", "dspark_target_layer_ids"} - set(dspark_set))
                bad(missing[0], "is missing or 0 while dspark_block_size is set",
                    "A GA (DSpark) config sets dspark_block_size, dspark_noise_token_id, dspark_target_layer_ids and "
                    "dspark_markov_rank together")
            if self.n_mtp_layers < 1:
                bad("n_mtp_layers", "is 0 with the dspark_* fields set", "The DSpark drafter needs at least one stage")
            for t in self.dspark_target_layer_ids:
                if not 0 <= t < self.n_layers:
                    bad("dspark_target_layer_ids", f"names layer {t}", f"Name backbone layers 0..{self.n_layers - 1}")
            if not 0 <= self.dspark_noise_token_id < self.vocab_size:
                bad("dspark_noise_token_id", f"is {self.dspark_noise_token_id}",
                    f"Use a token id below vocab_size {self.vocab_size}")
        elif dspark_set:
            bad("dspark_block_size", f"is 0 while {dspark_set} are set",
                "Set dspark_block_size (GA layout, e.g. 5) or drop the dspark_* fields (preview layout)")
        elif self.n_mtp_layers not in (0, 1):
            bad("n_mtp_layers", f"is {self.n_mtp_layers} without the dspark_* fields",
                "The preview layout has one MTP block (0 or 1); several stages are a GA DSpark drafter: set the "
                "dspark_* fields of its config")
        if self.n_heads % self.o_groups:
            bad("o_groups", f"{self.o_groups} does not divide n_heads = {self.n_heads}",
                "Choose o_groups so that n_heads is a multiple of it")
        if not 0 < self.rope_head_dim < self.head_dim or self.rope_head_dim % 2:
            bad("rope_head_dim", f"is {self.rope_head_dim} with head_dim {self.head_dim}",
                "Use an even rope_head_dim smaller than head_dim")
        if self.index_head_dim < self.rope_head_dim:
            bad("index_head_dim", f"{self.index_head_dim} < rope_head_dim {self.rope_head_dim}",
                "The indexer ropes its last rope_head_dim dims: make index_head_dim at least rope_head_dim")
        if not 0 < self.n_activated_experts <= self.n_routed_experts:
            bad("n_activated_experts", f"is {self.n_activated_experts} with {self.n_routed_experts} routed experts",
                "Activate between 1 and n_routed_experts experts")
        if not 0 <= self.n_hash_layers <= self.n_layers:
            bad("n_hash_layers", f"is {self.n_hash_layers} with n_layers {self.n_layers}", "Use 0..n_layers")
        if self.n_shared_experts not in (0, 1):
            bad("n_shared_experts", f"is {self.n_shared_experts}", "V4 has one shared expert; use 0 or 1")
        if self.score_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            bad("score_func", f"is {self.score_func!r}", "Use 'sqrtsoftplus' (V4), 'sigmoid' or 'softmax'")
        if self.window_size < 1 or self.index_topk < 1 or self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            bad("window_size/index_topk/hc_mult/hc_sinkhorn_iters", "must all be positive", "Fix the non-positive one")
        if self.moe_impl not in MOE_IMPLS:
            bad("moe_impl", f"is {self.moe_impl!r}", f"Use one of {MOE_IMPLS}")
        cap = self.moe_ep_capacity
        if cap is not None and not cap > 0:
            bad("moe_ep_capacity", f"is {self.moe_ep_capacity!r}",
                "Use a positive multiple of the balanced load (e.g. 2.0), or None for buffers that never drop")
        for f in ("compute_dtype", "param_dtype"):
            if getattr(self, f) not in ("float32", "bfloat16"):
                bad(f, f"is {getattr(self, f)!r}", "Use 'float32' or 'bfloat16'")
        if self.kernels not in ("auto", "pallas", "pallas_interpret", "reference"):
            bad("kernels", f"is {self.kernels!r}", "Use 'auto', 'pallas', 'pallas_interpret' or 'reference'")
        if self.remat not in ("none", "block", "dots"):
            bad("remat", f"is {self.remat!r}", "Use 'none', 'block' (recompute blocks) or 'dots' (keep matmuls)")
        if self.index_topk_freq < 1:
            bad("index_topk_freq", f"is {self.index_topk_freq}",
                "Use 1 (every CSA layer computes its top-k) or n > 1 (CSA layers 0, n, 2n, ... compute, "
                "the rest reuse)")
        pattern, n_csa = self.index_topk_pattern, len(self.csa_layers)
        if pattern is not None:
            if self.index_topk_freq != 1:
                bad("index_topk_pattern", f"is set together with index_topk_freq = {self.index_topk_freq}",
                    "Give one of them: the pattern alone (one F / S per CSA layer), or the frequency alone")
            if set(pattern) - {"F", "S"}:
                bad("index_topk_pattern", f"{pattern!r} has characters other than F and S",
                    "Write one F (computes its top-k) or S (reuses the previous F layer's) per CSA layer")
            if len(pattern) != n_csa:
                bad("index_topk_pattern", f"has {len(pattern)} characters but the model has {n_csa} CSA layers",
                    "Give one F or S per CSA layer (compress ratio 4) of the main stack, in layer order")
            if pattern and pattern[0] != "F":
                bad("index_topk_pattern", f"{pattern!r} starts with {pattern[0]!r}",
                    "The first CSA layer has no earlier top-k to reuse: start the pattern with F")
        if self.attn_chunk < 1 or self.loss_chunk < 1:
            bad("attn_chunk / loss_chunk", f"are {self.attn_chunk} / {self.loss_chunk}", "Use positive chunk sizes")
        if self.qat:
            # The simulation quantizes in fixed blocks (architecture §3.8): the dims must split into whole blocks.
            for f, v, b in (("dim", self.dim, 128), ("q_lora_rank", self.q_lora_rank, 128),
                            ("moe_inter_dim", self.moe_inter_dim, 128),
                            ("head_dim - rope_head_dim", self.nope_head_dim, 64)):
                if v % b:
                    bad(f, f"{v} is not a multiple of {b}", "qat=True quantizes in blocks of that size; resize or use qat=False")
            if self.index_head_dim & (self.index_head_dim - 1) or self.index_head_dim < 32:
                bad("index_head_dim", f"{self.index_head_dim} is not a power of two >= 32",
                    "qat=True applies a Hadamard transform and MXFP4 blocks of 32 to the indexer")

    # ---- loaders ----
    @classmethod
    def from_official_config(cls, source: dict | str | Path, **overrides) -> "ModelConfig":
        """Load an official `inference/config.json` (ModelArgs names). Runtime knobs (max_batch_size,
        max_seq_len) are ignored: caches are sized at call time."""
        d = _read(source)
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = {"max_batch_size", "max_seq_len", "scale_dtype"}
        unknown = sorted(set(d) - known - ignored)
        if unknown:
            raise ConfigError(f"official config: unknown fields {unknown}. Check the file is an inference/config.json")
        kw = {k: v for k, v in d.items() if k in known}
        kw = {**kw, **overrides}
        _require("official config", [f for f in _SIZE_FIELDS if f not in kw])
        if "n_mtp_layers" not in kw and _counts(kw["compress_ratios"], kw["n_layers"]):
            kw["n_mtp_layers"] = len(kw["compress_ratios"]) - kw["n_layers"]
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, source: dict | str | Path, **overrides) -> "ModelConfig":
        """Load an HF transformers `config.json` (model_type deepseek_v4)."""
        d = _read(source)
        if d.get("model_type", "deepseek_v4") != "deepseek_v4":
            raise ConfigError(f"HF config: model_type is {d.get('model_type')!r}, expected 'deepseek_v4'")
        if d.get("num_key_value_heads", 1) != 1:
            raise ConfigError("HF config: num_key_value_heads must be 1 (V4 shares one K=V head)")
        rs = d.get("rope_scaling") or {}
        kw: dict[str, Any] = {}
        for hf, ours in _HF_NAMES.items():
            if hf in d:
                kw[ours] = d[hf]
        for hf, ours in (("original_max_position_embeddings", "original_seq_len"), ("factor", "rope_factor"),
                         ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if hf in rs:
                kw[ours] = rs[hf]
        if not rs:
            kw["original_seq_len"] = 0  # no YaRN
        qc = d.get("quantization_config") or {}
        kw["dtype"] = "fp8" if qc.get("quant_method") == "fp8" else "bf16"
        kw["scale_fmt"] = qc.get("scale_fmt")
        kw["expert_dtype"] = d.get("expert_dtype")
        stages = hf_drafter_stages(d, source)
        if stages is not None:  # GA: the drafter's stage count is not num_nextn_predict_layers
            kw.update({f: d[f] for f in _DSPARK_FIELDS if f in d})
            kw["n_mtp_layers"] = stages
        hf_of = {ours: hf for hf, ours in _HF_NAMES.items()}
        _require("HF config", [hf_of[f] for f in _SIZE_FIELDS if f not in kw and f not in overrides])
        n_layers = overrides.get("n_layers", kw.get("n_layers"))
        if (stages is None and _counts(d.get("compress_ratios"), n_layers)
                and len(d["compress_ratios"]) - n_layers != kw.get("n_mtp_layers", cls.n_mtp_layers)):
            raise ConfigError(
                f"HF config: compress_ratios has {len(d['compress_ratios'])} entries for {kw.get('n_layers')} layers "
                f"and num_nextn_predict_layers {kw.get('n_mtp_layers')}: the layout is neither the preview's (one MTP "
                "block: n_layers + 1 entries) nor a GA checkpoint's (n_layers + stages entries and the dspark_* "
                "fields). Check the file is a DeepSeek-V4 config.json as released")
        return cls(**{**kw, **overrides})

    def to_official_dict(self) -> dict:
        """The official inference/config.json fields (what configs/model/*.json hold)."""
        ours = {"qat", "compute_dtype", "param_dtype", "moe_impl", "moe_ep_capacity", "attn_chunk", "loss_chunk",
                "csa_dense", "indexer_loss", "kernels", "remat", "scan_layers", "index_topk_freq", "index_topk_pattern"}
        if not self.dspark:
            ours |= set(_DSPARK_FIELDS)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ours}
        d["compress_ratios"] = list(self.compress_ratios)
        if self.dspark:
            d["dspark_target_layer_ids"] = list(self.dspark_target_layer_ids)
        return d

    def to_hf_config(self) -> dict:
        """The HF transformers `config.json` (model_type deepseek_v4) describing this model; from_hf_config
        reads it back to an equal config (v4jax's own fields excepted). Storage fields follow the release:
        dtype "fp8" writes its quantization_config, expert_dtype "fp4" marks MXFP4 experts."""
        d: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
                             "num_key_value_heads": 1, "hidden_act": "silu", "norm_topk_prob": True,
                             "topk_method": "noaux_tc", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
        d.update({hf: getattr(self, ours) for hf, ours in _HF_NAMES.items()})
        d["compress_ratios"] = list(self.compress_ratios)
        if self.dspark:  # as released: num_nextn_predict_layers stays 1, the stages follow from compress_ratios
            d["num_nextn_predict_layers"] = 1
            d.update({f: getattr(self, f) for f in _DSPARK_FIELDS})
            d["dspark_target_layer_ids"] = list(self.dspark_target_layer_ids)
        if self.original_seq_len:
            d["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": self.rope_factor,
                                 "original_max_position_embeddings": self.original_seq_len,
                                 "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                                 "rope_theta": self.rope_theta}
            d["max_position_embeddings"] = int(self.original_seq_len * self.rope_factor)
        if self.dtype == "fp8":
            d["quantization_config"] = dict(HF_FP8_QUANTIZATION, scale_fmt=self.scale_fmt)
        if self.expert_dtype:
            d["expert_dtype"] = self.expert_dtype
        return d

    # ---- presets ----
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_HF_NAMES = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers", "num_hash_layers": "n_hash_layers", "num_nextn_predict_layers": "n_mtp_layers",
    "num_attention_heads": "n_heads", "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts", "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale", "swiglu_limit": "swiglu_limit", "q_lora_rank": "q_lora_rank",
    "head_dim": "head_dim", "qk_rope_head_dim": "rope_head_dim", "rms_norm_eps": "norm_eps",
    "o_groups": "o_groups", "o_lora_rank": "o_lora_rank", "sliding_window": "window_size",
    "compress_ratios": "compress_ratios", "compress_rope_theta": "compress_rope_theta", "rope_theta": "rope_theta",
    "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim", "index_topk": "index_topk",
    "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps",
}

# The fields that set a shape (of a weight, the window ring or the indexer's selection): a config file must give
# each of them, as the released ones do; the dataclass defaults (Flash's values) are for presets only.
_SIZE_FIELDS = ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_heads", "n_routed_experts",
                "n_shared_experts", "n_activated_experts", "q_lora_rank", "head_dim", "rope_head_dim", "o_groups",
                "o_lora_rank", "window_size", "compress_ratios", "index_n_heads", "index_head_dim", "index_topk",
                "hc_mult")
_POSITIVE = ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts", "q_lora_rank",
             "head_dim", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ModelConfig field annotation -> (type check, what to give instead). JSON numbers: an int field takes no float
# (128.0 included) or bool, a float field takes ints.
_TYPES = {
    "int": (_is_int, "Give an integer (not a string, a fraction or true / false)"),
    "float": (lambda v: _is_int(v) or isinstance(v, float), "Give a number"),
    "str": (lambda v: isinstance(v, str), "Give a string"),
    "bool": (lambda v: isinstance(v, bool), "Give true or false"),
    "tuple[int, ...]": (lambda v: isinstance(v, tuple) and all(map(_is_int, v)), "Give a list of integers"),
}


def _counts(ratios, n_layers) -> bool:
    """Whether a stage count can be derived from these values (the type check in validate reports others)."""
    return isinstance(ratios, (list, tuple)) and _is_int(n_layers)


def _require(source: str, missing: list[str]) -> None:
    if missing:
        raise ConfigError(f"{source}: missing {missing}. Every field that sets a shape must be given (none is taken "
                          "from a preset): use the model's own config file as released, complete")


_DSPARK_FIELDS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")


def hf_drafter_stages(d: dict, source=None) -> int | None:
    """The DSpark drafter's stage count of an HF config.json dict, None for the preview layout (no dspark_* field):
    an explicit n_mtp_layers, else len(compress_ratios) - num_hidden_layers, else the `mtp.N.` prefixes of the
    checkpoint index beside `source` (the config file or its directory)."""
    if not any(k.startswith("dspark_") for k in d):
        return None
    if "n_mtp_layers" in d:
        return int(d["n_mtp_layers"])
    if "compress_ratios" in d and "num_hidden_layers" in d:
        return len(d["compress_ratios"]) - int(d["num_hidden_layers"])
    if source is not None and not isinstance(source, dict):
        index = Path(source) / "model.safetensors.index.json" if Path(source).is_dir() else \
            Path(source).with_name("model.safetensors.index.json")
        if index.exists():
            names = json.loads(index.read_text()).get("weight_map", {})
            return len({n.split(".")[1] for n in names if n.startswith("mtp.")})
    raise ConfigError("HF config: a GA (dspark_*) config without compress_ratios and no checkpoint index beside it: "
                      "the drafter's stage count is unknown. Give compress_ratios (n_layers + stages entries)")


# The release's quantization_config (FP8 e4m3, 128x128 blocks, dynamic activation scales; architecture §5.1).
HF_FP8_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                       "weight_block_size": [128, 128]}


def _read(source) -> dict:
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    return json.loads(path.read_text())


# Architecture §2.1/§2.2. Flash and Pro differ in width, depth, experts, top-k and the first two layers' type.
PRESETS: dict[str, dict] = {
    "flash": dict(),
    "pro": dict(
        dim=7168, moe_inter_dim=3072, n_layers=61, n_heads=128, n_routed_experts=384, route_scale=2.5,
        q_lora_rank=1536, o_groups=16, index_topk=1024, compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
    ),
    # The GA checkpoints (architecture §8.2): the preview backbone, a 3-stage DSpark drafter under mtp.*.
    "flash-0731": dict(
        compress_ratios=(0, 0) + (4, 128) * 20 + (4,) + (0, 0, 0), n_mtp_layers=3, dspark_block_size=5,
        dspark_noise_token_id=128799, dspark_target_layer_ids=(40, 41, 42), dspark_markov_rank=256,
    ),
    "pro-0813": dict(
        dim=7168, moe_inter_dim=3072, n_layers=61, n_heads=128, n_routed_experts=384, route_scale=2.5,
        q_lora_rank=1536, o_groups=16, index_topk=1024, compress_ratios=(128, 128) + (4, 128) * 29 + (4,) + (0, 0, 0),
        n_mtp_layers=3, dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=(58, 59, 60),
        dspark_markov_rank=512,
    ),
    # Every V4 feature at toy size: window-only (layer 0 and MTP), CSA (1, 3, 5), HCA (2, 4), two hash layers,
    # 4 output groups, top-k 8 < the 16+ compressed entries visible at test lengths; YaRN active from 256.
    "tiny": dict(
        vocab_size=1024, dim=128, moe_inter_dim=128, n_layers=6, n_hash_layers=2, n_heads=8, n_routed_experts=16,
        n_activated_experts=3, q_lora_rank=128, head_dim=128, o_groups=4, o_lora_rank=32, window_size=16,
        compress_ratios=(0, 4, 128, 4, 128, 4, 0), original_seq_len=256, index_n_heads=16, index_head_dim=128,
        index_topk=8, attn_chunk=128,
    ),
}
# tiny with a GA-style DSpark drafter: 3 stages fed by the last three layers, blocks of 4 slots.
PRESETS["tiny-dspark"] = dict(
    PRESETS["tiny"], compress_ratios=PRESETS["tiny"]["compress_ratios"] + (0, 0), n_mtp_layers=3, dspark_block_size=4,
    dspark_noise_token_id=1023, dspark_target_layer_ids=(3, 4, 5), dspark_markov_rank=32,
)

