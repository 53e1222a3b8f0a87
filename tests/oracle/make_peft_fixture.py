"""Writes tests/fixtures/peft/: LoRA adapters made by HF PEFT on HF transformers' DeepseekV4ForCausalLM over the
tiny Flash-like checkpoint (tests/flashlike_fixture.py), and the logits of that model with the adapters merged.
tests/test_lora.py loads the folder with v4jax.lora.load_adapters and compares: the check that the adapters-only
layout v4jax writes and reads is PEFT's own (tensor names, a / b orientation, the scale lora_alpha / r, the
grouped wo_a).

    bash tests/oracle/setup_env.sh && .venv-oracle/bin/pip install peft
    .venv-oracle/bin/python -P tests/oracle/make_peft_fixture.py          # from the repo root; rerunnable

What runs: PEFT's get_peft_model with rank 4, alpha 8 on every attention layer's q_a_proj, q_b_proj, kv_proj,
o_a_proj, o_b_proj and the shared experts' gate / up / down projections; every lora_A / lora_B set to seeded
normal values (PEFT zero-initialises B: the adapters would do nothing); save_pretrained writes
adapter_model.safetensors + adapter_config.json; merge_and_unload folds W + (alpha / r) B A into each weight
(PEFT's unmerged forward cannot run HF's grouped o_a_proj: it returns [.., groups, out / groups]), and the logits
of the merged model on the ids default_rng(SEED + 1) [1, SEQ] are kept every STRIDE-th position, beside the
logits without adapters (the size of the adapters' effect).

Out: adapter_model.safetensors, adapter_config.json (PEFT's), ref.npz {input_ids, positions, peft_logits,
base_logits} and meta.json (versions, seed).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import peft
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the fixture writer
import hf_logits  # noqa: E402  (also puts the repo root on sys.path)
from flashlike_fixture import CONFIG, write_flashlike  # noqa: E402
from make_flashlike_fixture import SEED  # noqa: E402
from v4jax import hub  # noqa: E402  (numpy-only module)

OUT = os.path.join(os.path.dirname(HERE), "fixtures", "peft")
SEQ, STRIDE, RANK, ALPHA = 160, 4, 4, 8.0
TARGETS = ["self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj", "self_attn.o_a_proj",
           "self_attn.o_b_proj", "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]


def main() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with open(CONFIG) as f:
        hf = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        write_flashlike(os.path.join(tmp, "flashlike"), SEED)
        state = hub.dequantize_hub_state(hub.load_hub_checkpoint(os.path.join(tmp, "flashlike")))
    ids = np.random.default_rng(SEED + 1).integers(0, hf["vocab_size"], (1, SEQ), dtype=np.int64)
    positions = np.arange(0, SEQ, STRIDE)

    model = hf_logits.build_model(hf)
    hf_logits.load_weights(model, state, hf["num_hidden_layers"])
    base = hf_logits.logits_for(model, ids)[:, positions]

    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    wrapped = peft.get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    os.makedirs(OUT, exist_ok=True)
    wrapped.save_pretrained(OUT)  # adapter_model.safetensors, adapter_config.json (and a README.md)
    readme = os.path.join(OUT, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    merged = wrapped.merge_and_unload()
    logits = hf_logits.logits_for(merged, ids)[:, positions]

    np.savez_compressed(os.path.join(OUT, "ref.npz"), input_ids=ids, positions=positions,
                        peft_logits=logits.astype(np.float32), base_logits=base.astype(np.float32))
    meta = {"seed": SEED, "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "peft": peft.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "adapter_effect_rel_rms": float(np.linalg.norm(logits - base) / np.linalg.norm(base))}
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {OUT}: {sorted(os.listdir(OUT))}; adapter effect {meta['adapter_effect_rel_rms']:.3f} (rel. RMS)")


if __name__ == "__main__":
    main()
