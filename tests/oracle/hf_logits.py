"""HF transformers oracle: fp32 CPU logits of `DeepseekV4ForCausalLM` for a hub-format checkpoint.

Runs in the oracle environment (Python 3.11 + torch CPU + transformers >= 5.2x):

    bash tests/oracle/setup_env.sh
    .venv/bin/python tests/flashlike_fixture.py /tmp/flashlike   # e.g. the tests' released-layout checkpoint
    .venv-oracle/bin/python tests/oracle/hf_logits.py \
        --config /tmp/flashlike/config.json --weights /tmp/flashlike \
        --ids IDS.npy --out /tmp/logits.npy [--compare REFERENCE_LOGITS.npy]

`--weights DIR` reads a released-layout checkpoint (FP8 / MXFP4 are dequantized in numpy by
v4jax.hub); `--random-seed N` uses `v4jax.hub.random_hub_checkpoint(config, N)` instead.
The weights go in through `load_state_dict(strict=True)` after `hub.hub_to_hf`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
# Imported before the repository goes on sys.path: its `kernels` package would stand in for the hub package of
# that name, which transformers probes for at import.
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from v4jax import hub  # noqa: E402  (numpy-only module)


def build_model(hf_config: dict):
    cfg = dict(hf_config)
    # The oracle loads already-dequantized fp32 weights: no quantizer, no bf16.
    for k in ("quantization_config", "expert_dtype", "torch_dtype", "dtype", "architectures", "model_type"):
        cfg.pop(k, None)
    config = DeepseekV4Config(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(config).to(torch.float32).eval()
    return model


def hub_state(hf_config: dict, weights_dir: str | None, seed: int | None) -> dict:
    """Hub-named fp32/int64 numpy state (dequantized if the checkpoint is quantized)."""
    if weights_dir is not None:
        return hub.dequantize_hub_state(hub.load_hub_checkpoint(weights_dir))
    return hub.random_hub_checkpoint(hf_config, seed)


def load_weights(model, state: dict, n_layers: int) -> None:
    hf = hub.hub_to_hf(state, n_layers)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()}
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad_shape = [(k, tuple(sd[k].shape), tuple(want[k].shape)) for k in sorted(set(sd) & set(want))
                 if tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or bad_shape:
        raise SystemExit("hf_logits: state_dict mismatch\n"
                         f"  missing ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected ({len(unexpected)}): {unexpected[:20]}\n"
                         f"  shape mismatches ({len(bad_shape)}): {bad_shape[:20]}")
    model.load_state_dict(sd, strict=True)
    # tid2eid is a persistent buffer that HF initialises to zeros: make sure ours replaced it.
    for k, v in sd.items():
        if k.endswith("tid2eid"):
            got = model.get_buffer(k)
            assert got.dtype == torch.long and torch.equal(got, v.long()), k


@torch.no_grad()
def logits_for(model, ids: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), use_cache=False)
    return out.logits.float().numpy()


def rel_err_per_position(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a - b|| / ||b|| over the vocab axis, for every (batch, position)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="HF-format config.json")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="hub-format checkpoint directory")
    src.add_argument("--random-seed", type=int, help="use hub.random_hub_checkpoint(config, seed)")
    ap.add_argument("--ids", required=True, help="int64 .npy of shape [B, T]")
    ap.add_argument("--out", required=True, help="where to save fp32 logits [B, T, V] (.npy)")
    ap.add_argument("--compare", help="optional reference logits .npy: print per-position rel. error")
    args = ap.parse_args(argv)

    with open(args.config) as f:
        hf_config = json.load(f)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build_model(hf_config)
    load_weights(model, hub_state(hf_config, args.weights, args.random_seed), model.config.num_hidden_layers)
    ids = np.load(args.ids)
    logits = logits_for(model, ids)
    np.save(args.out, logits.astype(np.float32))
    print(f"hf_logits: wrote {args.out} {logits.shape}")
    if args.compare:
        err = rel_err_per_position(logits, np.load(args.compare))
        worst = np.unravel_index(np.argmax(err), err.shape)
        print(f"hf_logits: rel err per position: max {err.max():.3e} at {tuple(int(i) for i in worst)}, "
              f"median {np.median(err):.3e}")


if __name__ == "__main__":
    main()
