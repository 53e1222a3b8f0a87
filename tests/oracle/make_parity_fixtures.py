"""Writes the HF-oracle parity fixtures tests/fixtures/parity/<name>/{config.json, ref.npz}.

One command (from the repo root; rerunnable, overwrites the fixtures):

    bash tests/oracle/setup_env.sh && .venv-oracle/bin/python tests/oracle/make_parity_fixtures.py

Each fixture is a tiny random DeepSeek-V4 whose weights are NOT stored: they are
`v4jax.hub.random_hub_checkpoint(config, seed)` (fp32, unquantized; rebuild them from config.json and
the npz's `seed`). ref.npz holds `input_ids` [B, T] int64, HF transformers' fp32 `logits` [B, T, V]
and `seed` (random_hub_checkpoint's; the ids come from default_rng(seed + 1)). config.json is HF
format (compress_ratios has L+1 entries, the last is the MTP layer); it carries no
quantization_config / expert_dtype (torch_dtype float32) because the random weights are plain fp32.

  tiny_flashlike: tests/fixtures/flashlike/config.json (Flash-like plan [0,4,128,4,128,4,0],
                  2 hash layers, YaRN original 256), vocab 512, B=2, T=576.
  tiny_prolike:   Pro-like plan [128,128,4,128,4,128,0], 3 hash layers, d=256, 4 heads x 128,
                  o_groups 2 x 64, window 32, 16 indexer heads x 128, top-16, 8 experts top-2,
                  routed scale 2.5, YaRN original 512, vocab 512, B=1, T=640.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import hf_logits  # noqa: E402  (also puts the repo root on sys.path)

FLASHLIKE_CONFIG = os.path.join(ROOT, "tests", "fixtures", "flashlike", "config.json")
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "parity")


def configs() -> dict:
    with open(FLASHLIKE_CONFIG) as f:
        base = json.load(f)
    for k in ("quantization_config", "expert_dtype"):
        base.pop(k, None)
    base["torch_dtype"] = "float32"

    flash = dict(base, vocab_size=512)

    pro = dict(base)
    pro.update(
        vocab_size=512, hidden_size=256, num_hidden_layers=6,
        compress_ratios=[128, 128, 4, 128, 4, 128, 0], num_hash_layers=3,
        num_attention_heads=4, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128,
        o_groups=2, o_lora_rank=64, sliding_window=32,
        index_n_heads=16, index_head_dim=128, index_topk=16,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
        routed_scaling_factor=2.5, max_position_embeddings=8192,
        rope_scaling=dict(base["rope_scaling"], original_max_position_embeddings=512),
    )
    # name: (config, seed, batch, seq_len)
    # Seeds picked (out of 1..8) so that no indexer / MoE top-k choice is a near tie: the k-th vs
    # (k+1)-th score gap is >= 2e-5 (indexer: relative to the top score), far above fp32 noise.
    return {"tiny_flashlike": (flash, 2, 2, 576), "tiny_prolike": (pro, 5, 1, 640)}


def main():
    for name, (cfg, seed, batch, seq) in configs().items():
        model = hf_logits.build_model(cfg)
        hf_logits.load_weights(model, hf_logits.hub_state(cfg, None, seed), cfg["num_hidden_layers"])
        ids = np.random.default_rng(seed + 1).integers(0, cfg["vocab_size"], (batch, seq), dtype=np.int64)
        logits = hf_logits.logits_for(model, ids).astype(np.float32)

        d = os.path.join(OUT_DIR, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        np.savez(os.path.join(d, "ref.npz"), input_ids=ids, logits=logits, seed=np.int64(seed))

        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        entropy = -(p * np.log(p + 1e-30)).sum(-1).mean()
        print(f"{name}: ids {ids.shape}, logits {logits.shape}, std {logits.std():.3f}, "
              f"mean entropy {entropy:.3f} nats (uniform {np.log(cfg['vocab_size']):.3f}), "
              f"npz {os.path.getsize(os.path.join(d, 'ref.npz')) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
