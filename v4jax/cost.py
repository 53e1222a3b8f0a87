"""What a V4 token costs: forward FLOPs from the config and KV bytes from the cache pytrees (performance.md
§1.2-1.4, §5 rows 1-5), beside the baselines DeepSeek compares V4 with.

FLOPs per token (performance.md §1.3's accounting, itemised): 2 per weight of every matrix the token goes
through (read off the abstract parameter tree: routed experts count k of E, the embedding table counts
nothing, the MTP block and its second pass through the head only with mtp=True), the mHC stream mixing,
2 * heads * (qk dim + v dim) per key a query attends (window, top-k or every visible compressed entry) and
2 * index_heads * index_head_dim per compressed key the lightning indexer scans. `position="last"` costs the
token at position `context` (a decode step), "mean" averages over positions 1..context (prefill, training). A CSA
layer that reuses another's top-k (IndexCache) counts no indexer: neither its weights nor its scan (nor, measured
from its cache, its keys).

KV bytes are measured, not typed: the per-slot bytes of every leaf of Transformer.init_cache's pytree
(jax.eval_shape: shapes only) for a storage format of v4jax.kv_cache, split into payload and block-scale
bytes (the paper's "FP8 NoPE, BF16 RoPE, FP4 indexer key" precision counts payload only). The baselines build
their caches the same way from small explicit configs:

    V32_BASELINE   DeepSeek-V3.2-Exp: V3's MLA (absorbed decode) + DSA lightning indexer, top-k 2048
    mla_baseline   the same attention without the indexer (DeepSeek-V3), any depth
    gqa_baseline   grouped-query attention, 8 KV heads of 128 (performance.md §1.1's "GQA-8" yardstick)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import kv_cache
from v4jax.config import ModelConfig
from v4jax.model import abstract_model, model_variables


@dataclasses.dataclass(frozen=True)
class CacheBytes:
    """Cache size of one sequence: per_token is what every further token adds (compressed entries and indexer
    keys), per_sequence the fixed rest: window rings, compressor states and the lengths."""

    per_token: float
    per_sequence: int
    window: int  # the window rings of all layers, MTP included (part of per_sequence)
    compressor_state: int  # the compressors' partial-window fp32 state (part of per_sequence)


def _nbytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


_shapes = functools.lru_cache(maxsize=4)(abstract_model)  # read only here (init_cache, variables): cached


def cache_bytes(cfg, kv_format: str | None = None, index_format: str | None = None) -> CacheBytes:
    """Measure Transformer.init_cache's pytree for one sequence (shapes only, nothing allocated) at two lengths
    that are multiples of every compress ratio: the growth per token is exact, the rest is fixed."""
    model = _shapes(cfg)
    unit = math.lcm(*(r for r in cfg.compress_ratios if r), 1)
    short, long = (jax.eval_shape(lambda n=n: model.init_cache(1, n, kv_format, index_format))
                   for n in (unit, 2 * unit))
    per_token = (_nbytes(long) - _nbytes(short)) / unit
    layers = (*short.layers, *([short.mtp] if short.mtp is not None else []))
    return CacheBytes(per_token=per_token, per_sequence=round(_nbytes(short) - per_token * unit),
                      window=_nbytes([c.window for c in layers]),
                      compressor_state=_nbytes([(c.state, c.index_state) for c in layers]))


POSITIONS = ("last", "mean")


def _visible(context: int, position: str) -> np.ndarray:
    """Tokens a query sees (itself included): just `context` for the last token, else every 1..context."""
    if position not in POSITIONS:
        raise ValueError(f"position={position!r}: use 'last' (a decode step) or 'mean' (prefill/training average)")
    if context < 1:
        raise ValueError(f"context={context}: the token count must be at least 1")
    return np.array([context]) if position == "last" else np.arange(1, context + 1)


# ---- V4 FLOPs ------------------------------------------------------------------------------------------------
def _part(path: str) -> str | None:
    """Which cost item a weight belongs to (None: not a matmul weight)."""
    leaf = path.rsplit(".", 1)[-1]
    if path == "embed" or leaf in ("ape", "base", "scale", "attn_sink", "bias") or "norm" in leaf:
        return None  # a gather, additive or elementwise weights
    if ".compressor." in path:
        return "compressors"
    if ".indexer." in path:
        return "indexer_proj"
    if ".ffn." in path:
        return "moe"
    if leaf == "fn":
        return "mhc"
    return "head" if path == "head" else "projections"  # attention q/kv/o and MTP's e_proj / h_proj


def attention_keys(cfg: ModelConfig, ratio: int, t: np.ndarray, dense_csa: bool = False):
    """(keys attended, compressed keys scanned by the indexer) per query for visible-token counts t."""
    keys = np.minimum(t, cfg.window_size).astype(np.float64)
    visible = t // ratio if ratio else 0 * t
    csa_topk = ratio == 4 and not dense_csa
    keys = keys + (np.minimum(visible, cfg.index_topk) if csa_topk else visible)
    return keys, (visible if csa_topk else 0 * t).astype(np.float64)


def layer_attention_flops(cfg: ModelConfig, ratio: int, context: int, position: str = "mean",
                          dense_csa: bool = False) -> dict[str, float]:
    """Core attention and indexer-scan FLOPs of one layer of compress ratio `ratio` per query."""
    keys, scanned = attention_keys(cfg, ratio, _visible(context, position), dense_csa)
    return {"attention": 2 * cfg.n_heads * 2 * cfg.head_dim * float(keys.mean()),
            "indexer_scan": 2 * cfg.index_n_heads * cfg.index_head_dim * float(scanned.mean())}


def dense_attention_flops(cfg: ModelConfig, context: int, position: str = "mean") -> float:
    """The same heads attending every earlier token (dense causal attention) per query."""
    return 2 * cfg.n_heads * 2 * cfg.head_dim * float(_visible(context, position).mean())


def forward_flops(cfg: ModelConfig, context: int, position: str = "last", mtp: bool = False,
                  dense_csa: bool = False) -> dict[str, float]:
    """Forward FLOPs of one token, by item: projections (attention and MTP), compressors, indexer_proj (the
    indexer's query and weight projections), indexer_scan, attention (core), moe (router + shared + k
    routed experts), mhc, head. `mtp` adds the MTP block and its head pass (training counts them),
    `dense_csa` the dense phase of CSA (every visible entry attended; the indexer's projections still run,
    its scan is not counted)."""
    mtp = mtp and cfg.n_mtp_layers > 0
    parts = dict.fromkeys(("projections", "compressors", "indexer_proj", "indexer_scan", "attention", "moe",
                           "mhc", "head"), 0.0)
    skipped = tuple(f"layers.{i}.attn.indexer." for i in range(cfg.n_layers) if cfg.reuses_topk(i))
    for path, var in model_variables(_shapes(cfg)).items():
        part = _part(path)
        if (not isinstance(var, nnx.Param) or part is None or (path.startswith("mtp.") and not mtp)
                or path.startswith(skipped)):
            continue
        n = math.prod(var.shape)
        if ".experts.w" in path and len(var.shape) == 3:  # routed: k of E experts
            n *= cfg.n_activated_experts / cfg.n_routed_experts
        parts[part] += 2 * n * (2 if path == "head" and mtp else 1)
    blocks = cfg.n_layers + (cfg.n_mtp_layers if mtp else 0)
    hc, d = cfg.hc_mult, cfg.dim
    # per mHC site: collapse (hc * d MACs), the comb mix (hc^2 * d) and the post spread (hc * d); one head collapse
    parts["mhc"] += 2 * blocks * 2 * (2 * hc + hc * hc) * d + 2 * hc * d * (2 if mtp else 1)
    for i, ratio in enumerate(cfg.compress_ratios[:blocks]):
        for k, v in layer_attention_flops(cfg, ratio, context, position, dense_csa and ratio == 4).items():
            parts[k] += 0.0 if k == "indexer_scan" and cfg.reuses_topk(i) else v
    return parts


# ---- baselines -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MLABaseline:
    """A DeepSeek-V3-family model: MLA attention (decoded in absorbed form: one shared 576-dim latent key of
    which the first 512 dims are the value), a MoE FFN after `n_dense_layers` dense ones, and optionally
    V3.2's DSA lightning indexer (index_topk > 0). Defaults: DeepSeek-V3.2-Exp's config.json [P] (HF
    deepseek-ai/DeepSeek-V3.2-Exp; performance.md §1.3: 61 layers, top-k 2048, indexer 64 x 128)."""

    name: str = "V3.2"
    n_layers: int = 61
    dim: int = 7168
    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    rope_head_dim: int = 64
    v_head_dim: int = 128
    n_dense_layers: int = 3
    dense_inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_routed_experts: int = 256
    n_activated_experts: int = 8
    n_shared_experts: int = 1
    vocab_size: int = 129280
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048  # 0: no indexer (V3): every earlier token is attended

    def active_params(self) -> dict[str, float]:
        """Matrix weights one token goes through (no embedding table; the head counts), by item."""
        h, d = self.n_heads, self.dim
        attn = (d * self.q_lora_rank + self.q_lora_rank * h * (self.qk_nope_head_dim + self.rope_head_dim)
                + d * (self.kv_lora_rank + self.rope_head_dim) + self.kv_lora_rank * h * (self.qk_nope_head_dim
                + self.v_head_dim) + h * self.v_head_dim * d)
        # V3.2's indexer: wq_b from the query latent, wk + weights_proj from the hidden state
        index = (self.q_lora_rank * self.index_n_heads * self.index_head_dim + d * self.index_head_dim
                 + d * self.index_n_heads) if self.index_topk else 0
        n_moe = self.n_layers - self.n_dense_layers
        experts = self.n_activated_experts + self.n_shared_experts
        ffn = (self.n_dense_layers * 3 * d * self.dense_inter_dim
               + n_moe * (3 * d * self.moe_inter_dim * experts + self.n_routed_experts * d))
        return {"projections": self.n_layers * attn, "indexer_proj": self.n_layers * index, "moe": ffn,
                "head": self.vocab_size * d}

    def forward_flops(self, context: int, position: str = "last") -> dict[str, float]:
        """Forward FLOPs per token by item, the accounting of forward_flops (performance.md §1.3)."""
        t = _visible(context, position)
        keys = np.minimum(t, self.index_topk) if self.index_topk else t
        latent = self.kv_lora_rank + self.rope_head_dim  # absorbed: QK over 576 dims, PV over 512
        parts = {k: 2.0 * v for k, v in self.active_params().items()}
        parts["attention"] = self.n_layers * 2 * self.n_heads * (latent + self.kv_lora_rank) * float(keys.mean())
        scan = 2 * self.index_n_heads * self.index_head_dim * float(t.mean()) if self.index_topk else 0.0
        parts["indexer_scan"] = self.n_layers * scan
        return parts

    def init_cache(self, batch: int, max_len: int, kv_format: str, index_format: str) -> dict:
        """Per layer the latent cache [b, max_len, 576] and (V3.2) the indexer keys [b, max_len, 128].
        kv_format "fp8" is FlashMLA's V3.2 entry (656 B: 512 e4m3 + four fp32 scales, one per 128, + 64 BF16
        rope dims); index_format "fp8" vLLM's 132 B key (kv_cache.Fp8Keys)."""
        kv_cache.check_formats(kv_format, index_format)
        shape = (batch, max_len)
        if kv_format == "fp8":
            latent = {"nope": jnp.zeros((*shape, self.kv_lora_rank), jnp.float8_e4m3fn),
                      "scale": jnp.zeros((*shape, self.kv_lora_rank // 128), jnp.float32),
                      "rope": jnp.zeros((*shape, self.rope_head_dim), jnp.bfloat16)}
        else:
            latent = jnp.zeros((*shape, self.kv_lora_rank + self.rope_head_dim), kv_cache.PLAIN[kv_format])
        layer = {"latent": latent}
        if self.index_topk:
            layer["index_keys"] = kv_cache.empty_index_keys(index_format, shape, self.index_head_dim)
        return {"layers": [layer] * self.n_layers}


def mla_baseline(n_layers: int) -> MLABaseline:
    """DeepSeek-V3's MLA cache (no indexer) at another depth, for equal-depth comparisons."""
    return MLABaseline(name=f"MLA ({n_layers} layers)", n_layers=n_layers, index_topk=0)


@dataclasses.dataclass(frozen=True)
class GQABaseline:
    """Grouped-query attention: K and V of n_kv_heads heads per token and layer (performance.md §1.1-1.2: 8
    heads of 128 in BF16, 4 KiB per token per layer)."""

    n_layers: int
    n_kv_heads: int = 8
    head_dim: int = 128

    @property
    def name(self) -> str:
        return f"GQA-{self.n_kv_heads} ({self.n_layers} layers)"

    def init_cache(self, batch: int, max_len: int, kv_format: str, index_format: str) -> dict:
        if kv_format not in kv_cache.PLAIN:
            raise ValueError(f"GQABaseline stores plain K/V: kv_format must be one of {tuple(kv_cache.PLAIN)}")
        kv = jnp.zeros((batch, max_len, self.n_kv_heads, self.head_dim), kv_cache.PLAIN[kv_format])
        return {"layers": [{"k": kv, "v": kv}] * self.n_layers}


def gqa_baseline(n_layers: int) -> GQABaseline:
    return GQABaseline(n_layers)


V32_BASELINE = MLABaseline()


# ---- KV bytes ------------------------------------------------------------------------------------------------
def _is_scale(path) -> bool:
    last = path[-1] if path else None
    return getattr(last, "name", getattr(last, "key", None)) == "scale"


def slot_bytes(tree, payload_only: bool = False) -> float:
    """Bytes of one slot ([b, slots, ...] leaves: one batch row, one slot) summed over the leaves;
    payload_only leaves out the block-scale leaves."""
    if tree is None:
        return 0.0
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return float(sum(math.prod(a.shape[2:]) * jnp.dtype(a.dtype).itemsize for p, a in leaves
                     if not (payload_only and _is_scale(p))))


@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One attention layer's cache, per slot and per original token (one sequence)."""

    ratio: int  # 0 window-only, 4 CSA, 128 HCA; -1 for a baseline layer
    entry: float  # bytes of a window slot / compressed entry (baseline: a token's cache row)
    entry_payload: float  # the same without scale bytes
    index_key: float  # bytes of an indexer key (0 if none)
    index_key_payload: float
    window_slots: int  # fixed slots per sequence (V4's window ring)

    def per_token(self, payload_only: bool = False) -> float:
        e, k = (self.entry_payload, self.index_key_payload) if payload_only else (self.entry, self.index_key)
        if self.ratio < 0:
            return e + k
        return (e / self.ratio if self.ratio else 0.0) + (k / 4 if k else 0.0)

    def window_bytes(self, payload_only: bool = False) -> float:
        return self.window_slots * (self.entry_payload if payload_only else self.entry)


@functools.lru_cache(maxsize=64)
def kv_layers(model, kv_format: str | None = None, index_format: str | None = None,
              mtp: bool = False) -> tuple[LayerKV, ...]:
    """The cache layout of a V4 ModelConfig (measured from Transformer.init_cache) or a baseline (its
    init_cache), one LayerKV per layer; V4's MTP block only with mtp=True. Cached: configs are frozen."""
    if isinstance(model, ModelConfig):
        plain = {"float32": "fp32", "bfloat16": "bf16"}[model.compute_dtype]
        kv_format, index_format = kv_format or plain, index_format or plain
        unit = math.lcm(*(r for r in model.compress_ratios if r), 1)
        tm = _shapes(model)
        cache = jax.eval_shape(lambda: tm.init_cache(1, unit, kv_format, index_format))
        caches = (*cache.layers, *([cache.mtp] if mtp and cache.mtp is not None else []))
        return tuple(LayerKV(r, slot_bytes(c.window), slot_bytes(c.window, True), slot_bytes(c.index_keys),
                             slot_bytes(c.index_keys, True), jax.tree.leaves(c.window)[0].shape[1])
                     for r, c in zip(model.compress_ratios, caches))
    cache = jax.eval_shape(lambda: model.init_cache(1, 1, kv_format or "bf16", index_format or "bf16"))
    out = []
    for layer in cache["layers"]:
        keys = layer.get("index_keys")
        rest = {k: v for k, v in layer.items() if k != "index_keys"}
        out.append(LayerKV(-1, slot_bytes(rest), slot_bytes(rest, True), slot_bytes(keys), slot_bytes(keys, True), 0))
    return tuple(out)


def kv_bytes_per_token(model, kv_format=None, index_format=None, payload_only: bool = False) -> float:
    """Cache bytes each further token adds, whole model (one sequence)."""
    return sum(layer.per_token(payload_only) for layer in kv_layers(model, kv_format, index_format))


def kv_bytes(model, context: int, kv_format=None, index_format=None, payload_only: bool = False) -> float:
    """Cache bytes of one sequence of `context` tokens: per-token growth plus V4's window rings (compressor
    states, fp32 partial windows of a few MB, are not KV and are left out, as in performance.md §1.2)."""
    layers = kv_layers(model, kv_format, index_format)
    return sum(lay.per_token(payload_only) * context + lay.window_bytes(payload_only) for lay in layers)


def decode_read_bytes(model, context: int, kv_format=None, index_format=None) -> dict[str, float]:
    """Cache bytes one decode step reads at `context` tokens (performance.md §1.4), by item: window (the
    ring), entries (the top-k of CSA, every HCA entry; a baseline's attended rows), index_keys (every
    compressed key the indexer scans; a baseline's indexer scans every token)."""
    out = {"window": 0.0, "entries": 0.0, "index_keys": 0.0}
    topk = getattr(model, "index_topk", 0)
    for lay in kv_layers(model, kv_format, index_format):
        if lay.ratio < 0:  # baseline: all tokens, or the indexer's top-k of them
            out["entries"] += lay.entry * (min(context, topk) if topk and lay.index_key else context)
            out["index_keys"] += lay.index_key * context
            continue
        out["window"] += lay.entry * min(context, lay.window_slots)
        n = context // lay.ratio if lay.ratio else 0
        out["entries"] += lay.entry * (min(n, topk) if lay.ratio == 4 else n)
        out["index_keys"] += lay.index_key * n
    return out
