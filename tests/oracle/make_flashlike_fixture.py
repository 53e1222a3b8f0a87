"""Writes tests/fixtures/flashlike/{ref.npz, meta.json}: what HF transformers and DeepSeek's official inference code
compute from the tiny Flash-like checkpoint in the released layout (tests/flashlike_fixture.py writes it from
tests/fixtures/flashlike/config.json and a seed; the weights are not stored). Read by tests/test_model.py and
tests/test_config.py.

One command (from the repo root; rerunnable, overwrites ref.npz and meta.json). Place the official code first:

    bash tests/oracle/setup_env.sh
    # inference/model.py of the public mirror yafengge/DeepSeek-V4-Flash (not committed here), e.g.
    mkdir -p /tmp/official && git --git-dir=<that mirror's git dir> \\
        show 2b2bebc1776b2cf88ca36f0b5b6f816ae0f5892f:inference/model.py > /tmp/official/model.py
    .venv-oracle/bin/python tests/oracle/make_flashlike_fixture.py --official /tmp/official/model.py [--seed N]

What runs, on the ids default_rng(seed + 1) [1, 320] (320 > YaRN's 256 original positions, two HCA entries):
  1. HF transformers' DeepseekV4ForCausalLM, fp32, the checkpoint dequantized (tests/oracle/hf_logits.py);
  2. the official Transformer on CPU in fp32 (weights dequantized, max_seq_len 320), its GPU kernels replaced by
     tests/oracle/dspark_cpu_kernels.py, the head keeping every position:
     - simulation off: the logits, and the MTP block applied to the last layer's output with the same ids;
     - simulation on (the official QAT numerics, written here from inference/kernel.py): activations into every
       FP8 / FP4 weight's matmul rounded to FP8 e4m3 in 1x128 blocks with power-of-two scales (act_quant, then
       the GEMM on the dequantized operands), the KV's non-RoPE dims rounded to FP8 in 1x64 blocks, the indexer's
       Hadamard-rotated q and k rounded to MXFP4 (e2m1, 1x32 blocks, power-of-two scales); recorded per block:
       the input / output streams, the MoE routes and the indexer's picks.

ref.npz (compressed), trimmed to what the tests read:
  seed, input_ids [1, 320]           the checkpoint's seed (tests/flashlike_fixture.py) and the ids
  hf_logits [1, 320, V]              HF, fp32, every position
  positions [P]                      every 3rd position (all phases of the ratios 4 and 128 and the window 16)
  official_logits [1, P, V]          official, simulation off, at `positions`
  official_mtp_logits [1, P, V]      official MTP block, simulation off, at `positions` (HF has no MTP)
  qat_streams [L + 1, 1, T, hc, d]   simulation on, the first T = 192 positions: entry i is block i's input,
                                     entry i + 1 its output (fp32; the run is causal, so these are the 320-token
                                     run's first positions)
  qat_route_idx [L, T, k]            the experts each token's MoE picked (hash layers included)
  qat_index_topk [L, T, index_topk]  CSA layers: the compressed entries the indexer picked (-1: none); other
                                     layers all -1
meta.json: the official ModelArgs (as a release's inference/config.json would give them), the official file's
sha256, the checkpoint's hub.checkpoint_digest (the tests check it after writing the checkpoint), the smallest
top-k gaps (the seed is picked so that no indexer / MoE choice is a near tie) and the references' agreement.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.overrides import TorchFunctionMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the fixture writer
import dspark_cpu_kernels as K  # noqa: E402
import hf_logits  # noqa: E402  (also puts the repo root on sys.path)
from flashlike_fixture import CONFIG, FIXTURE_DIR, write_flashlike  # noqa: E402
from v4jax import hub  # noqa: E402  (numpy-only module)

OFFICIAL_REPO, OFFICIAL_PATH = "yafengge/DeepSeek-V4-Flash", "inference/model.py"
OFFICIAL_COMMIT = "2b2bebc1776b2cf88ca36f0b5b6f816ae0f5892f"
# The checkpoint's seed: picked (of 0..5) so that no indexer / MoE top-k choice of either official run is a near
# tie (see meta.json's gaps).
SEED = 5
SEQ, STRIDE, QAT_TOKENS = 320, 3, 192


# ----------------------------------------------------------------------------- the official code on the CPU
def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(x)) exactly (the kernels' fast_round_scale), x > 0 and normal."""
    m, e = torch.frexp(x)  # x = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), e - (m == 0.5).to(e.dtype))


def fp8_round_trip(x: torch.Tensor, block: int, round_scale: bool) -> torch.Tensor:
    """act_quant's quantize + dequantize: per 1 x block, s = amax / 448 (amax >= 1e-4; a power of two rounded up
    when the scale format is ue8m0), x / s clamped to +-448 and cast to e4m3, times s."""
    xb = x.float().unflatten(-1, (-1, block))
    s = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
    if round_scale:
        s = pow2_ceil(s)
    q = (xb / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s
    return q.flatten(-2).to(x.dtype)


def fp4_round_trip(x: torch.Tensor, block: int) -> torch.Tensor:
    """fp4_act_quant's quantize + dequantize: per 1 x block, s = 2 ** ceil(log2(amax / 6)) (amax >= 6 * 2^-126),
    x / s clamped to +-6 and rounded to e2m1 (nearest, ties to even), times s."""
    xb = x.float().unflatten(-1, (-1, block))
    s = pow2_ceil(xb.abs().amax(-1, keepdim=True).clamp(min=6 * 2.0 ** -126) / 6.0)
    y = (xb / s).clamp(-6.0, 6.0).numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return (torch.from_numpy(y) * s).flatten(-2).to(x.dtype)


def load_official(path: str):
    sys.modules["kernel"] = K  # inference/model.py: `from kernel import act_quant, ..., hc_split_sinkhorn`
    spec = importlib.util.spec_from_file_location("official_model", path)
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    rt.rotate_activation = K.hadamard_rotate  # fast_hadamard_transform is bf16 / CUDA only
    rt.ParallelHead.get_logits = lambda self, x: F.linear(x.float(), self.weight)  # every position, not the last
    return rt


def set_simulation(rt, on: bool) -> None:
    """The official module's quantization calls: the QAT round trips (on) or identities (off)."""
    def act_quant(x, block_size=128, scale_fmt=None, scale_dtype=None, inplace=False):
        assert inplace  # the only direct call: the KV's non-RoPE dims
        return x.copy_(fp8_round_trip(x, block_size, scale_fmt is not None)) if on else x

    def fp4_act_quant(x, block_size=32, inplace=False):
        assert inplace
        return x.copy_(fp4_round_trip(x, block_size)) if on else x

    def linear(x, weight, bias=None):  # inference/model.py's linear() with its fp8_gemm / fp4_gemm on dequantized
        assert bias is None            # weights: the activations' FP8 round trip, then an fp32 matmul
        if on and getattr(weight, "released_quantized", False):
            x = fp8_round_trip(x, rt.block_size, rt.scale_fmt is not None)
        return F.linear(x, weight)

    rt.act_quant, rt.fp4_act_quant, rt.linear = act_quant, fp4_act_quant, linear


def official_args(hf: dict) -> dict:
    """HF config.json -> the official ModelArgs fields, as a release's inference/config.json states them."""
    rs = hf["rope_scaling"]
    return dict(
        max_batch_size=1, max_seq_len=SEQ, dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4", scale_dtype="fp8",
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], moe_inter_dim=hf["moe_intermediate_size"],
        n_layers=hf["num_hidden_layers"], n_hash_layers=hf["num_hash_layers"],
        n_mtp_layers=hf["num_nextn_predict_layers"], n_heads=hf["num_attention_heads"],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
        n_activated_experts=hf["num_experts_per_tok"], score_func=hf["scoring_func"],
        route_scale=hf["routed_scaling_factor"], swiglu_limit=hf["swiglu_limit"], q_lora_rank=hf["q_lora_rank"],
        head_dim=hf["head_dim"], rope_head_dim=hf["qk_rope_head_dim"], norm_eps=hf["rms_norm_eps"],
        o_groups=hf["o_groups"], o_lora_rank=hf["o_lora_rank"], window_size=hf["sliding_window"],
        compress_ratios=list(hf["compress_ratios"]), compress_rope_theta=hf["compress_rope_theta"],
        original_seq_len=rs["original_max_position_embeddings"], rope_theta=hf["rope_theta"],
        rope_factor=rs["factor"], beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"],
        index_n_heads=hf["index_n_heads"], index_head_dim=hf["index_head_dim"], index_topk=hf["index_topk"],
        hc_mult=hf["hc_mult"], hc_sinkhorn_iters=hf["hc_sinkhorn_iters"], hc_eps=hf["hc_eps"])


def build(rt, args: dict, state: dict, quantized: set):
    """The official Transformer with every weight in fp32 (bf16 storage, then .float()); the weights the release
    stores as FP8 / FP4 are marked for the simulation's activation rounding."""
    torch.set_default_dtype(torch.float32)
    model = rt.Transformer(rt.ModelArgs(**dict(args, dtype="bf16", expert_dtype=None,
                                               compress_ratios=tuple(args["compress_ratios"]))))
    model.float()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    sd = {k: v.to(torch.int32) if k.endswith("tid2eid") else v for k, v in sd.items()}
    want = model.state_dict()
    tied = {f"mtp.{i}.{m}.weight" for i in range(args["n_mtp_layers"]) for m in ("embed", "head")}
    missing, unexpected = sorted(set(want) - set(sd) - tied), sorted(set(sd) - set(want))
    bad = [k for k in set(sd) & set(want) if sd[k].shape != want[k].shape]
    if missing or unexpected or bad:
        raise SystemExit(f"make_flashlike_fixture: state mismatch: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, shapes {bad[:10]}")
    model.load_state_dict(sd, strict=False)
    for name, mod in model.named_modules():
        if isinstance(mod, rt.Linear) and f"{name}.weight" in quantized:
            mod.weight.released_quantized = True
    return model


class TopkGaps(TorchFunctionMode):
    """Records the smallest k-th vs (k+1)-th score gap of every top-k among more than k candidates: the MoE
    gates' (k = moe_k, absolute) and the indexer's (relative to the row's top score). Results are unchanged."""

    def __init__(self, moe_k: int):
        super().__init__()
        self.moe_k, self.gaps = moe_k, {"moe": np.inf, "indexer": np.inf}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.topk, torch.topk):
            scores = args[0].float()
            k = args[1] if len(args) > 1 else kwargs["k"]
            if scores.size(-1) > k:
                top = scores.topk(k + 1, dim=-1).values
                ok = torch.isfinite(top[..., k])
                gap = top[..., k - 1] - top[..., k]
                kind = "moe" if k == self.moe_k else "indexer"
                if kind == "indexer":
                    gap = gap / top[..., 0].abs()
                if ok.any():
                    self.gaps[kind] = min(self.gaps[kind], float(gap[ok].min()))
        return func(*args, **kwargs)


@torch.inference_mode()
def run_official(rt, model, ids: np.ndarray, moe_k: int) -> dict:
    n = len(model.layers)
    rec = {"h": [None] * (n + 1), "route": [None] * n, "topk": {}}
    hooks = []
    for i, layer in enumerate(model.layers):
        def block_hook(_m, inp, out, i=i):
            rec["h"][i], rec["h"][i + 1] = inp[0].clone(), out.clone()
        hooks.append(layer.register_forward_hook(block_hook))
        hooks.append(layer.ffn.gate.register_forward_hook(
            lambda _m, _inp, out, i=i: rec["route"].__setitem__(i, out[1].clone())))
        if getattr(layer.attn, "indexer", None) is not None:
            hooks.append(layer.attn.indexer.register_forward_hook(
                lambda _m, _inp, out, i=i: rec["topk"].__setitem__(i, out.clone())))
    tok = torch.from_numpy(ids)
    gaps = TopkGaps(moe_k)
    try:
        with gaps:
            logits = model(tok, 0)
            mtp = model.mtp[0](rec["h"][n], 0, tok)
    finally:
        for h in hooks:
            h.remove()
    return dict(logits=logits.numpy(), mtp=mtp.numpy(), h=[h.numpy() for h in rec["h"]],
                route=[r.numpy() for r in rec["route"]], topk={i: t.numpy() for i, t in rec["topk"].items()},
                gaps=gaps.gaps)


def rel_err(a, b) -> np.ndarray:
    return hf_logits.rel_err_per_position(a, b)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="the official inference/model.py")
    ap.add_argument("--seed", type=int, default=SEED, help=f"the checkpoint's seed (default {SEED})")
    ap.add_argument("--out", default=FIXTURE_DIR)
    args = ap.parse_args(argv)
    seed = args.seed
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    with open(CONFIG) as f:
        hf = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "flashlike")
        write_flashlike(ckpt, seed)
        raw = hub.load_hub_checkpoint(ckpt)
        quantized = {n[: -len(".scale")] + ".weight" for n in raw if n.endswith(".scale")}
        state = hub.dequantize_hub_state(raw)
        digest = hub.checkpoint_digest(ckpt)
    ids = np.random.default_rng(seed + 1).integers(0, hf["vocab_size"], (1, SEQ), dtype=np.int64)

    model = hf_logits.build_model(hf)
    hf_logits.load_weights(model, state, hf["num_hidden_layers"])
    hf_out = hf_logits.logits_for(model, ids).astype(np.float32)

    rt = load_official(args.official)
    oargs = official_args(hf)
    runs = {}
    for sim in (False, True):
        set_simulation(rt, sim)
        runs[sim] = run_official(rt, build(rt, oargs, state, quantized), ids, hf["num_experts_per_tok"])
    plain, qat = runs[False], runs[True]

    pos = np.arange(0, SEQ, STRIDE)
    T, L = QAT_TOKENS, hf["num_hidden_layers"]
    topk = np.full((L, T, hf["index_topk"]), -1, np.int16)
    for i, t in qat["topk"].items():  # the official offset (entries follow the SEQ window rows) removed
        topk[i] = np.where(t[0, :T] >= 0, t[0, :T] - SEQ, -1)
    out = dict(
        seed=np.int64(seed), input_ids=ids, hf_logits=hf_out, positions=pos,
        official_logits=plain["logits"][:, pos], official_mtp_logits=plain["mtp"][:, pos],
        qat_streams=np.stack([h[:, :T] for h in qat["h"]]).astype(np.float32),
        qat_route_idx=np.stack([r.reshape(1, SEQ, -1)[0, :T] for r in qat["route"]]).astype(np.int16),
        qat_index_topk=topk)
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "ref.npz"), **out)

    hf_vs_official = rel_err(plain["logits"], hf_out)[0]
    report = {
        "hf_vs_official_simulation_off": {"max": float(hf_vs_official.max()),
                                          "argmax": int(hf_vs_official.argmax()),
                                          "median": float(np.median(hf_vs_official))},
        "mtp_vs_main_logits_min": float(rel_err(plain["mtp"], plain["logits"]).min()),
        "simulation_on_vs_off_logits_median": float(np.median(rel_err(qat["logits"], plain["logits"]))),
        "min_topk_gaps": {"simulation_off": plain["gaps"], "simulation_on": qat["gaps"]},
    }
    meta = {
        "what": "reference outputs of the tiny Flash-like released-layout checkpoint (tests/flashlike_fixture.py): "
                "HF transformers and DeepSeek's official inference code, CPU, fp32",
        "official": {"repo": OFFICIAL_REPO, "commit": OFFICIAL_COMMIT, "path": OFFICIAL_PATH,
                     "sha256": hashlib.sha256(open(args.official, "rb").read()).hexdigest(),
                     "kernels": "tests/oracle/dspark_cpu_kernels.py (sparse_attn, hc_split_sinkhorn, an fp32 "
                                "Hadamard for rotate_activation); act_quant / fp4_act_quant / the FP8 and FP4 GEMMs "
                                "as written in tests/oracle/make_flashlike_fixture.py"},
        "model_args": oargs,
        "weights": {"generator": "tests/flashlike_fixture.py write_flashlike(dir, seed)", "seed": seed,
                    "checkpoint_digest": digest},
        "ids": f"numpy default_rng({seed} + 1).integers(0, {hf['vocab_size']}, (1, {SEQ}))",
        "positions": f"every {STRIDE}rd of {SEQ}", "qat_tokens": T,
        "report": report,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": ".venv-oracle/bin/python tests/oracle/make_flashlike_fixture.py --official /tmp/official/model.py",
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    size = os.path.getsize(os.path.join(args.out, "ref.npz"))
    print(json.dumps(report, indent=1))
    print(f"wrote {args.out}: ref.npz {size / 2**20:.2f} MiB, seed {seed}, checkpoint digest {digest[:16]}")


if __name__ == "__main__":
    main()
