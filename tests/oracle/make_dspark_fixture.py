"""Writes the DSpark drafter oracle fixture tests/fixtures/dspark/{ref.npz, meta.json} (tests/test_dspark_oracle.py).

The oracle is an independent implementation of DeepSeek's 0731 reference drafter, run on CPU in fp32 with the
quantization simulation off: RelicLLM's port of the reference `DSparkBlock` (lvyufeng/RelicLLM
src/models/deepseek_v4/dspark.py @179ac778), imported as is from a directory given on the command line, on top
of the official DeepSeek-V4 `inference/model.py` (Attention, Block, MoE, mHC, ParallelHead; RelicLLM's
`runtime.py` is a port of that file, and the DSpark module only uses its plain code paths), whose GPU kernels are
replaced by tests/oracle/dspark_cpu_kernels.py. Neither source is committed; both are read at generation time.

One command (from the repo root; rerunnable, overwrites the fixture). Place the sources first:

    bash tests/oracle/setup_env.sh
    # the port: RelicLLM's file at commit 179ac778adbe0c131ccccabefd9b7903fb7fd452, unmodified, at
    #   /tmp/relicllm/src/models/deepseek_v4/dspark.py  (meta.json records the sha256 the fixture was made with)
    # the official inference code: inference/model.py of the public mirror yafengge/DeepSeek-V4-Flash, e.g.
    mkdir -p /tmp/official && git --git-dir=<that mirror's git dir> \
        show 2b2bebc1776b2cf88ca36f0b5b6f816ae0f5892f:inference/model.py > /tmp/official/model.py
    .venv-oracle/bin/python tests/oracle/make_dspark_fixture.py --port /tmp/relicllm --runtime /tmp/official/model.py

What runs (per case: a batch of equal-length random prompts; the port takes one start_pos per batch):
  1. the target (official Transformer, the tiny GA config's 6 layers) prefills the prompt at start_pos 0; forward
     hooks keep the outputs of dspark_target_layer_ids averaged over the hc streams -> main_hidden [b, L, 3 d];
     the anchor is the target's greedy next token (argmax of its last logits);
  2. the rings: main_x = main_norm(main_proj(main_hidden)) and every stage's `attn.write_main_kv(main_x, 0)`
     (RelicLLM's DSparkLoop.prefill);
  3. one greedy block (RelicLLM's DSparkLoop._draft): stage0.forward_embed(main_hidden[:, -1:], anchor), each
     stage at start_pos L - 1 (the block sits at positions L .. L + B - 1), then last.forward_head(x, anchor)
     -> draft tokens, Markov-corrected logits [b, B, vocab], confidence logits [b, B].

Adapters (besides the kernels): the runtime module gets RelicLLM's `tp_world_size` (1) and its
`ParallelHead.get_logits(x, keep_all_positions)` signature (the official one keeps only the last position), and
`rotate_activation` (fast_hadamard_transform, bf16 only) becomes an fp32 Hadamard; the port's
`get_dspark_topk_idxs` builds its indices with device="cuda", which a TorchFunctionMode maps to the CPU.

Model and weights: the project's tiny GA checkpoint, tests/ga_fixture.py `write_ga_fixture(dir, seed)` (preset
tiny-dspark in the released FP8 / MXFP4 layout, v4jax.hub's random weights), written to a temporary directory and
not stored. The official ModelArgs come from its inference/config.json (as the reference generate.py does), the
weights from v4jax.hub.dequantize_hub_state (fp32). ref.npz keeps the seed, meta.json the checkpoint's
hub.checkpoint_digest, which the test checks after rebuilding it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the project's GA fixture writer
import dspark_cpu_kernels as K  # noqa: E402
from ga_fixture import write_ga_fixture  # noqa: E402
from v4jax import hub  # noqa: E402  (numpy-only module)

OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "dspark")
PORT_REPO, PORT_COMMIT, PORT_PATH = "lvyufeng/RelicLLM", "179ac778adbe0c131ccccabefd9b7903fb7fd452", \
    "src/models/deepseek_v4/dspark.py"
RUNTIME_REPO, RUNTIME_PATH = "yafengge/DeepSeek-V4-Flash", "inference/model.py"
RUNTIME_COMMIT = "2b2bebc1776b2cf88ca36f0b5b6f816ae0f5892f"  # the mirror's last change to inference/model.py
# write_ga_fixture's seed: picked (of 0..7) so that no choice is a near tie: MoE k-th vs (k+1)-th biased score
# >= 2.5e-4 (seed 0: 2.3e-5), draft and anchor top-2 logit gaps >= 9e-3; fp32 disagreement is ~1e-6.
SEED = 1
# name: (batch, prompt length). Window 16: the ring is partly filled, exactly full, and wrapped (29 = 16 + 13);
# every length keeps the CSA layers' compressed entries (L // 4 <= 7) within index_topk 8, so no indexer choice.
CASES = {"short": (2, 11), "full": (2, 16), "wrap": (2, 29)}


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- loading the port
def _package(name: str, path: str | None) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [path] if path else []
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)
    return mod


def load_port(port_dir: str, runtime_path: str):
    """-> (runtime module = the official inference/model.py, RelicLLM's dspark module), kernels on the CPU."""
    sys.modules["kernel"] = K  # inference/model.py: `from kernel import act_quant, ..., hc_split_sinkhorn`
    src = os.path.join(port_dir, "src")
    _package("src", src)
    _package("src.models", os.path.join(src, "models"))
    _package("src.models.deepseek_v4", os.path.join(src, "models", "deepseek_v4"))
    _package("src.kernels", None)
    sys.modules["src.kernels.ops"] = K
    sys.modules["src.kernels"].ops = K
    spec = importlib.util.spec_from_file_location("src.models.deepseek_v4.runtime", runtime_path)
    rt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rt
    spec.loader.exec_module(rt)
    sys.modules["src.models.deepseek_v4"].runtime = rt

    # RelicLLM's runtime names the tensor-parallel size tp_world_size and lets the head keep every position;
    # with one rank and no env switches its get_logits is exactly this (see the module docstring).
    rt.tp_world_size, rt.tp_rank = 1, 0

    def get_logits(self, x, keep_all_positions: bool = False):
        if not keep_all_positions:
            x = x[:, -1]
        return F.linear(x.float(), self.weight)

    rt.ParallelHead.get_logits = get_logits
    rt.rotate_activation = K.hadamard_rotate
    ds = importlib.import_module("src.models.deepseek_v4.dspark")
    return rt, ds


class CudaToCpu(TorchFunctionMode):
    """Factory calls with device='cuda' (the port's get_dspark_topk_idxs) build CPU tensors instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


DSPARK_KEYS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")


def model_args(rt, official: dict, batch: int, max_seq_len: int):
    """The official ModelArgs from the checkpoint's inference/config.json (as generate.py: ModelArgs(**config)),
    with bf16 storage (the weights go in as fp32 after .float()), no FP8 scales and no MTP block: the preview
    ModelArgs has neither n_mtp_layers > 1 nor the dspark_* keys, which the DSpark stages read as attributes."""
    fields = {f.name for f in dataclasses.fields(rt.ModelArgs)}
    kw = {k: v for k, v in official.items() if k in fields and k not in DSPARK_KEYS}
    kw.update(max_batch_size=batch, max_seq_len=max_seq_len, dtype="bf16", scale_fmt=None, expert_dtype=None,
              scale_dtype="fp32", n_mtp_layers=0, compress_ratios=tuple(official["compress_ratios"]))
    unknown = sorted(set(official) - fields - set(DSPARK_KEYS))
    if unknown:
        raise SystemExit(f"make_dspark_fixture: inference/config.json keys the official ModelArgs lacks: {unknown}")
    args = rt.ModelArgs(**kw)
    for k in DSPARK_KEYS:
        setattr(args, k, official[k])
    return args


def build(rt, ds, official: dict, state: dict, batch: int, max_seq_len: int):
    """The official Transformer with RelicLLM's DSpark stages attached (as its attach_dspark: layer ids
    n_layers + s, embed / head tied to the target's), every weight loaded in fp32."""
    torch.set_default_dtype(torch.float32)
    args = model_args(rt, official, batch, max_seq_len)
    n_stages = official["n_mtp_layers"]
    assert n_stages == len(official["compress_ratios"]) - official["n_layers"]
    model = rt.Transformer(args)
    model.mtp = torch.nn.ModuleList()
    for s in range(n_stages):
        blk = ds.DSparkBlock(args.n_layers + s, args, s, n_stages)
        blk.embed, blk.head = model.embed, model.head
        model.mtp.append(blk)
    model.float()  # bf16 storage -> fp32 (complex rope tables and int tid2eid are left alone)

    sd = {}
    for k, v in state.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        sd[k] = t.to(torch.int32) if k.endswith("tid2eid") else t
    want = model.state_dict()
    tied = {f"mtp.{s}.{m}.weight" for s in range(n_stages) for m in ("embed", "head")}
    missing = sorted(set(want) - set(sd) - tied)
    unexpected = sorted(set(sd) - set(want))
    bad = [(k, tuple(sd[k].shape), tuple(want[k].shape)) for k in set(sd) & set(want)
           if tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or bad:
        raise SystemExit(f"make_dspark_fixture: state mismatch: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, shapes {bad[:10]}")
    model.load_state_dict(sd, strict=False)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, (k, v.dtype)
    return model, args


@torch.inference_mode()
def run_case(model, cfg: dict, ids: np.ndarray) -> dict:
    b, L = ids.shape
    targets = list(cfg["dspark_target_layer_ids"])
    captured = {}
    hooks = [model.layers[i].register_forward_hook(
        lambda _m, _inp, out, i=i: captured.__setitem__(i, out.mean(dim=2))) for i in targets]
    tok = torch.from_numpy(ids.astype(np.int64))
    with CudaToCpu():
        try:
            target_logits = model(tok, 0)  # [b, vocab], the last position
        finally:
            for h in hooks:
                h.remove()
        main_hidden = torch.cat([captured[i] for i in targets], dim=-1)  # [b, L, 3 d]
        anchor = target_logits.argmax(dim=-1)
        stage0, last = model.mtp[0], model.mtp[-1]
        main_x = stage0.main_norm(stage0.main_proj(main_hidden))
        for st in model.mtp:
            st.attn.write_main_kv(main_x, 0)
        x, main_x_last, draft_ids = stage0.forward_embed(main_hidden[:, -1:], anchor)
        for st in model.mtp:
            x = st(x, L - 1, draft_ids, main_x_last)
        out_ids, logits, conf = last.forward_head(x, anchor)
    return dict(ids=ids.astype(np.int64), target_logits=target_logits.float().numpy(),
                main_hidden=main_hidden.float().numpy(), anchor=anchor.numpy().astype(np.int64),
                draft_tokens=out_ids[:, 1:].numpy().astype(np.int64), draft_logits=logits.float().numpy(),
                confidence=conf.float().numpy())


GATE_GAPS: list[float] = []


def watch_gates(rt) -> None:
    """Records, for every score-routed MoE gate call, the smallest gap between the k-th and (k+1)-th biased
    score (a near tie there would make the routing, and the comparison, fragile). The routing is unchanged."""
    forward = rt.Gate.forward

    def watched(self, x, input_ids=None):
        if not self.hash and self.score_func == "sqrtsoftplus":
            scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt() + self.bias
            top = scores.topk(self.topk + 1, dim=-1).values
            GATE_GAPS.append(float((top[..., -2] - top[..., -1]).min()))
        return forward(self, x, input_ids)

    rt.Gate.forward = watched


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", required=True, help="directory holding src/models/deepseek_v4/dspark.py (RelicLLM)")
    ap.add_argument("--runtime", required=True, help="the official inference/model.py")
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--seed", type=int, default=SEED, help=f"write_ga_fixture's seed (default {SEED})")
    args = ap.parse_args(argv)
    seed = args.seed

    port_file = os.path.join(args.port, PORT_PATH)
    if not os.path.isfile(port_file):
        raise SystemExit(f"make_dspark_fixture: no {port_file}: put {PORT_REPO}@{PORT_COMMIT[:8]} {PORT_PATH} there")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rt, ds = load_port(args.port, args.runtime)
    watch_gates(rt)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "tiny-0731")
        write_ga_fixture(ckpt, seed)
        with open(os.path.join(ckpt, "inference", "config.json")) as f:
            official = json.load(f)
        state = hub.dequantize_hub_state(hub.load_hub_checkpoint(ckpt))
        digest = hub.checkpoint_digest(ckpt)
    V, B = official["vocab_size"], official["dspark_block_size"]

    out = {"seed": np.int64(seed)}
    report = {}
    for name, (batch, L) in CASES.items():
        model, _ = build(rt, ds, official, state, batch, max_seq_len=64)
        ids = np.random.default_rng(seed * 100 + L).integers(0, V, (batch, L), dtype=np.int64)
        GATE_GAPS.clear()
        r = run_case(model, official, ids)
        assert r["draft_logits"].shape == (batch, B, V) and r["confidence"].shape == (batch, B)
        for k, v in r.items():
            out[f"{name}_{k}"] = v
        srt = np.sort(r["draft_logits"], axis=-1)
        tgt = np.sort(r["target_logits"], axis=-1)
        report[name] = dict(batch=batch, prompt_len=L, anchor=r["anchor"].tolist(),
                            draft_tokens=r["draft_tokens"].tolist(),
                            confidence=np.round(r["confidence"], 4).tolist(),
                            min_top2_gap_draft=float((srt[..., -1] - srt[..., -2]).min()),
                            min_top2_gap_anchor=float((tgt[..., -1] - tgt[..., -2]).min()),
                            min_moe_topk_gap=min(GATE_GAPS))
        print(f"{name}: ids {ids.shape} anchor {r['anchor'].tolist()} drafts {r['draft_tokens'].tolist()} "
              f"gaps: draft top-2 {report[name]['min_top2_gap_draft']:.3g}, anchor top-2 "
              f"{report[name]['min_top2_gap_anchor']:.3g}, MoE k/k+1 {report[name]['min_moe_topk_gap']:.3g}")

    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "ref.npz"), **out)
    meta = {
        "what": "DSpark drafter oracle: RelicLLM's port of the 0731 reference DSparkBlock on the official "
                "inference/model.py, CPU, fp32, quantization simulation off",
        "port": {"repo": PORT_REPO, "commit": PORT_COMMIT, "path": PORT_PATH, "sha256": sha256_file(port_file),
                 "used_unmodified": True},
        "runtime": {"repo": RUNTIME_REPO, "commit": RUNTIME_COMMIT, "path": RUNTIME_PATH,
                    "sha256": sha256_file(args.runtime),
                    "why": "RelicLLM's src/models/deepseek_v4/runtime.py (the port's base classes) is its port of "
                           "this file; with no env switches and one rank its Attention / Block / MoE / "
                           "ParallelHead / RMSNorm / rope code paths are this file's. It also pulls in CUDA "
                           "extensions, a CPU MoE server and GGUF loaders, so the official file is used instead."},
        "stubs": {
            "kernel / src.kernels.ops": "tests/oracle/dspark_cpu_kernels.py: act_quant / fp4_act_quant "
                                         "(inplace) no-ops = quantization simulation off; sparse_attn = gather + "
                                         "softmax with the sink; hc_split_sinkhorn in torch; fp8/fp4 GEMMs "
                                         "unreachable (fp32 weights)",
            "rotate_activation": "fp32 Hadamard (the official one needs fast_hadamard_transform and bf16); only "
                                 "the indexer uses it and no case selects among more than index_topk entries",
            "ParallelHead.get_logits": "RelicLLM's signature (keep_all_positions), same math",
            "tp_world_size": "1 (RelicLLM's runtime global)",
            "device='cuda' in get_dspark_topk_idxs": "mapped to the CPU by a TorchFunctionMode",
        },
        "weights": {"generator": "tests/ga_fixture.py write_ga_fixture(dir, seed) (preset tiny-dspark, released "
                                 "FP8 / MXFP4 layout), dequantized to fp32 by v4jax.hub.dequantize_hub_state",
                    "seed": seed, "checkpoint_digest": digest, "n_tensors": len(state)},
        "official_config": official,
        "cases": report,
        "torch": torch.__version__,
        "command": ".venv-oracle/bin/python tests/oracle/make_dspark_fixture.py --port /tmp/relicllm "
                   "--runtime /tmp/official/model.py",
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    size = os.path.getsize(os.path.join(args.out, "ref.npz"))
    print(f"wrote {args.out}: ref.npz {size / 2**20:.2f} MiB, checkpoint digest {digest[:16]}")


if __name__ == "__main__":
    main()
