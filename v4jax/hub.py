"""The released DeepSeek-V4 checkpoint format (spec §5), in plain numpy + ml_dtypes.

What is here:
  * safetensors reading (memory-mapped, incl. the F8_E4M3 / F8_E8M0 types that the `safetensors`
    package's numpy front end cannot give back) and an atomic writer for the same format;
  * dequantization of the FP8 (128x128 UE8M0 block scales) and MXFP4 (1x32 UE8M0 scales) weights;
  * the hub-name -> HF-transformers-name mapping (`hub_to_hf`), incl. routed-expert stacking;
  * `random_hub_checkpoint`, an unquantized random checkpoint with every released tensor name.

This module must stay free of jax / torch / flax: the HF oracle imports it from its own
Python 3.11 torch environment (tests/oracle/).
"""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile

import ml_dtypes
import numpy as np

# safetensors dtype tag <-> numpy dtype.
_ST_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors I/O
def read_safetensors_header(path):
    """Returns (header dict without '__metadata__', byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # 8-byte little-endian header length
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """One .safetensors file; `f[name]` is a read-only memory-mapped array of the stored dtype."""

    def __init__(self, path):
        self.path = path
        self.header, self.data_offset = read_safetensors_header(path)
        size = os.path.getsize(path) - self.data_offset
        # np.memmap refuses empty maps; a file of only empty tensors then gets a dummy buffer.
        self._buf = (np.memmap(path, dtype=np.uint8, mode="r", offset=self.data_offset, shape=(size,))
                     if size > 0 else np.zeros(0, np.uint8))

    def keys(self):
        return list(self.header)

    def __contains__(self, name):
        return name in self.header

    def __getitem__(self, name):
        info = self.header[name]
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        return self._buf[begin:end].view(dtype).reshape(info["shape"])


def read_tensor(path, name):
    return SafetensorsFile(path)[name]


def load_hub_checkpoint(ckpt_dir):
    """All tensors of a checkpoint directory (sharded via model.safetensors.index.json, or a single
    model.safetensors), as raw memory-mapped arrays in their stored dtypes."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = ["model.safetensors"]
    out = {}
    for shard in shards:
        sf = SafetensorsFile(os.path.join(ckpt_dir, shard))
        for name in sf.keys():
            out[name] = sf[name]
    return out


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: array} in safetensors layout, atomically (temp file in the same dir + os.replace)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_NAMES:
            raise TypeError(f"{name}: dtype {a.dtype} has no safetensors tag")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data section starts 8-byte aligned
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for a in arrays:
                f.write(a.tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- dequantization
# e2m1 code -> value; bit 3 is the sign (codes 8..15 are the negatives of 0..7).
_E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def scale_to_f32(scale):
    """UE8M0 byte b -> 2^(b-127) (computed from the raw byte, not via ml_dtypes' conversion).
    Base models reportedly store F32 scales; those pass through."""
    if scale.dtype == np.float32:
        return scale
    e = np.asarray(scale).view(np.uint8).astype(np.int32) - 127
    return np.ldexp(np.float32(1.0), e).astype(np.float32)


def dequant_fp8(w, scale, block=128):
    """FP8 e4m3 [out, in] with a ceil(out/128) x ceil(in/128) block-scale grid -> fp32."""
    out_dim, in_dim = w.shape
    s = scale_to_f32(scale)
    assert s.shape == (-(-out_dim // block), -(-in_dim // block)), (w.shape, s.shape)
    s = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[:out_dim, :in_dim]
    return np.asarray(w).astype(np.float32) * s


def unpack_fp4(packed):
    """int8 [out, in/2] -> fp32 codes' values [out, in]; low nibble = element 2j, high = 2j+1."""
    b = np.asarray(packed).view(np.uint8)
    vals = np.stack([_E2M1[b & 0xF], _E2M1[b >> 4]], axis=-1)
    return vals.reshape(b.shape[0], 2 * b.shape[1])


def dequant_fp4(packed, scale, block=32):
    """MXFP4 [out, in/2] with one UE8M0 scale per 1x32 block along K ([out, in/32]) -> fp32."""
    v = unpack_fp4(packed)
    s = scale_to_f32(scale)
    assert s.shape == (v.shape[0], -(-v.shape[1] // block)), (v.shape, s.shape)
    return v * np.repeat(s, block, axis=1)[:, : v.shape[1]]


def dequantize_hub_state(raw):
    """Merges every `X.weight` with its `X.scale` into one fp32 `X.weight` (int8 weight = MXFP4,
    anything else = FP8 block); other float tensors -> fp32, integer tensors (tid2eid) unchanged."""
    out = {}
    for name, a in raw.items():
        if name.endswith(".scale"):
            if name[: -len(".scale")] + ".weight" not in raw:
                raise KeyError(f"{name} has no matching .weight")
            continue
        scale = raw.get(name[: -len(".weight")] + ".scale") if name.endswith(".weight") else None
        if scale is not None:
            out[name] = dequant_fp4(a, scale) if a.dtype == np.int8 else dequant_fp8(a, scale)
        elif np.issubdtype(a.dtype, np.integer):
            out[name] = np.array(a)
        else:
            out[name] = np.asarray(a).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- hub -> HF names
# Verified against transformers 5.23 modeling_deepseek_v4.py + conversion_mapping.py["deepseek_v4"].
_HF_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
# hub suffix after "layers.N."  ->  HF suffix after "model.layers.N."
_HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",  # same [g*d_g, n_h*c/g] layout
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    # CSA / HCA compressor
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    # CSA lightning indexer: HF nests it *inside* the compressor; weights_proj sits in a `scorer`.
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    # MoE
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",  # buffer (score-routed layers)
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",  # persistent int64 buffer (hash layers)
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_EXPERT_RE = re.compile(r"ffn\.experts\.(\d+)\.(w[123])\.weight$")


def hub_to_hf(state, n_layers):
    """Dequantized hub-named tensors -> HF DeepseekV4ForCausalLM state_dict names. `mtp.*` is dropped
    (HF has no MTP). Routed experts are stacked: gate_up_proj[e] = concat(w1[e], w3[e], axis=0)
    -> [E, 2I, d] (gate first, then up; no transpose, HF applies F.linear), down_proj = stack(w2)
    -> [E, d, I]."""
    out, experts, unknown = {}, {}, []
    for name, a in state.items():
        if name.startswith("mtp."):
            continue
        if name in _HF_TOP:
            out[_HF_TOP[name]] = a
            continue
        m = re.match(r"layers\.(\d+)\.(.+)$", name)
        if m is None or int(m.group(1)) >= n_layers:
            unknown.append(name)
            continue
        layer, suffix = int(m.group(1)), m.group(2)
        e = _EXPERT_RE.match(suffix)
        if e:
            experts.setdefault(layer, {})[(int(e.group(1)), e.group(2))] = a
        elif suffix in _HF_LAYER:
            out[f"model.layers.{layer}.{_HF_LAYER[suffix]}"] = a
        else:
            unknown.append(name)
    if unknown:
        raise KeyError(f"hub_to_hf: no HF name for {unknown[:10]} ({len(unknown)} in all)")
    for layer, ws in experts.items():
        n_exp = 1 + max(i for i, _ in ws)
        p = f"model.layers.{layer}.mlp.experts."
        out[p + "gate_up_proj"] = np.stack(
            [np.concatenate([ws[(i, "w1")], ws[(i, "w3")]], axis=0) for i in range(n_exp)])
        out[p + "down_proj"] = np.stack([ws[(i, "w2")] for i in range(n_exp)])
    return out


# ----------------------------------------------------------------------------- random checkpoint
def _layer_specs(cfg, prefix, ratio, hash_layer):
    """(name, shape, kind) for one block; kind picks the random distribution."""
    d, hc = cfg["hidden_size"], cfg.get("hc_mult", 4)
    nh, c, dc = cfg["num_attention_heads"], cfg["head_dim"], cfg["q_lora_rank"]
    g, dg = cfg["o_groups"], cfg["o_lora_rank"]
    n_exp, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    nih, ci = cfg["index_n_heads"], cfg["index_head_dim"]
    mix = (2 + hc) * hc
    s = [("attn_norm.weight", (d,), "norm"), ("ffn_norm.weight", (d,), "norm")]
    for site in ("attn", "ffn"):
        s += [(f"hc_{site}_fn", (mix, hc * d), "hc_fn"), (f"hc_{site}_base", (mix,), "hc_base"),
              (f"hc_{site}_scale", (3,), "hc_scale")]
    s += [("attn.attn_sink", (nh,), "sink"),
          ("attn.wq_a.weight", (dc, d), "mat"), ("attn.q_norm.weight", (dc,), "norm"),
          ("attn.wq_b.weight", (nh * c, dc), "mat"),
          ("attn.wkv.weight", (c, d), "mat"), ("attn.kv_norm.weight", (c,), "norm"),
          ("attn.wo_a.weight", (g * dg, nh * c // g), "mat"), ("attn.wo_b.weight", (d, g * dg), "mat")]
    if ratio:
        coff = 2 if ratio == 4 else 1  # CSA (overlapping windows) projects to 2 series
        s += [("attn.compressor.wkv.weight", (coff * c, d), "mat"),
              ("attn.compressor.wgate.weight", (coff * c, d), "mat"),
              ("attn.compressor.norm.weight", (c,), "norm"),
              ("attn.compressor.ape", (ratio, coff * c), "ape")]
    if ratio == 4:
        s += [("attn.indexer.compressor.wkv.weight", (2 * ci, d), "mat"),
              ("attn.indexer.compressor.wgate.weight", (2 * ci, d), "mat"),
              ("attn.indexer.compressor.norm.weight", (ci,), "norm"),
              ("attn.indexer.compressor.ape", (ratio, 2 * ci), "ape"),
              ("attn.indexer.wq_b.weight", (nih * ci, dc), "mat"),
              ("attn.indexer.weights_proj.weight", (nih, d), "mat")]
    s += [("ffn.gate.weight", (n_exp, d), "mat")]
    s += [("ffn.gate.tid2eid", (cfg["vocab_size"], cfg["num_experts_per_tok"]), "tid2eid") if hash_layer
          else ("ffn.gate.bias", (n_exp,), "gate_bias")]
    for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
        s.append((f"ffn.shared_experts.{w}.weight", shape, "mat"))
    for e in range(n_exp):
        for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            s.append((f"ffn.experts.{e}.{w}.weight", shape, "mat"))
    return [(prefix + n, shape, kind) for n, shape, kind in s]


def random_hub_checkpoint(hf_config, seed):
    """Deterministic random fp32 (int64 for tid2eid) weights under every released tensor name,
    unquantized (no `.scale`). Scales keep activations O(1) with non-trivial attention/routing."""
    cfg = hf_config
    d, hc, n_layers, vocab = cfg["hidden_size"], cfg.get("hc_mult", 4), cfg["num_hidden_layers"], cfg["vocab_size"]
    n_mtp = cfg.get("num_nextn_predict_layers", 1)
    ratios = list(cfg["compress_ratios"]) + [0] * (n_layers + n_mtp)
    n_hash = cfg.get("num_hash_layers", 0)
    specs = [("embed.weight", (vocab, d), "embed"), ("head.weight", (vocab, d), "mat"),
             ("norm.weight", (d,), "norm"), ("hc_head_fn", (hc, hc * d), "hc_fn"),
             ("hc_head_base", (hc,), "hc_base"), ("hc_head_scale", (1,), "hc_scale")]
    for i in range(n_layers):
        specs += _layer_specs(cfg, f"layers.{i}.", ratios[i], i < n_hash)
    for j in range(n_mtp):  # MTP blocks: score routing, compress ratio from the list's tail
        p = f"mtp.{j}."
        specs += [(p + "e_proj.weight", (d, d), "mat"), (p + "h_proj.weight", (d, d), "mat"),
                  (p + "enorm.weight", (d,), "norm"), (p + "hnorm.weight", (d,), "norm"),
                  (p + "norm.weight", (d,), "norm"), (p + "hc_head_fn", (hc, hc * d), "hc_fn"),
                  (p + "hc_head_base", (hc,), "hc_base"), (p + "hc_head_scale", (1,), "hc_scale")]
        specs += _layer_specs(cfg, p, ratios[n_layers + j], False)

    rng = np.random.default_rng(seed)
    sample = {  # kind -> sampler(shape); "mat" is [out, in]: unit-variance outputs for unit inputs
        "mat": lambda sh: rng.normal(0.0, sh[-1] ** -0.5, sh),
        "hc_fn": lambda sh: rng.normal(0.0, sh[-1] ** -0.5, sh),  # input is RMS-normalised -> mixes ~N(0,1)
        "embed": lambda sh: rng.normal(0.0, 1.0, sh),
        "norm": lambda sh: 1.0 + 0.1 * rng.normal(size=sh),
        "hc_base": lambda sh: rng.normal(0.0, 0.3, sh),
        "hc_scale": lambda sh: rng.uniform(0.5, 1.0, sh),
        "sink": lambda sh: rng.normal(0.0, 0.5, sh),
        "ape": lambda sh: rng.normal(0.0, 0.5, sh),
        "gate_bias": lambda sh: rng.normal(0.0, 0.1, sh),
    }
    out = {}
    for name, shape, kind in specs:
        if kind == "tid2eid":  # distinct experts per token: first k of a random permutation
            perm = np.argsort(rng.random((shape[0], cfg["n_routed_experts"])), axis=1)
            out[name] = perm[:, : shape[1]].astype(np.int64)
        else:
            out[name] = sample[kind](shape).astype(np.float32)
    return out
