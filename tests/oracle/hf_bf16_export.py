"""HF transformers loads a BF16 export written by `v4jax-convert to-hub --weights bfloat16` with its own
conversion mapping (`from_pretrained` on the hub-named shards), and records its fp32 logits.

Runs in the oracle environment; the whole fixture is rebuilt by tests/oracle/make_hf_export_fixture.sh:

    .venv-oracle/bin/python tests/oracle/hf_bf16_export.py --export DIR --ids IDS.npy --tokens 128 \
        --out tests/fixtures/hf_bf16_export/ref.npz

ref.npz holds `input_ids` [1, T], HF's fp32 `logits` [1, T, V] and `digest` (v4jax.hub.checkpoint_digest of
the export HF loaded): tests/test_convert.py rebuilds the export, checks the digest, and compares our logits.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
# Imported before the repository goes on sys.path: its `kernels` package would stand in for the hub package of
# that name, which transformers probes for at import.
from transformers import DeepseekV4ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from v4jax import hub  # noqa: E402  (numpy-only module)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="directory written by v4jax-convert to-hub --weights bfloat16")
    ap.add_argument("--ids", required=True, help="int64 .npy [B, T]")
    ap.add_argument("--tokens", type=int, default=128, help="use the first T positions of --ids")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        args.export, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    # HF builds no MTP block, so the mtp.* tensors are its only unexpected keys; nothing may be missing.
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    if info["missing_keys"] or unexpected or info.get("mismatched_keys"):
        raise SystemExit(f"hf_bf16_export: HF did not load the export cleanly: missing {info['missing_keys']}, "
                         f"unexpected {unexpected}, mismatched {info.get('mismatched_keys')}")
    for name, buf in model.named_buffers():  # HF initialises tid2eid to zeros: the export must replace it
        if name.endswith("tid2eid"):
            assert int(buf.abs().sum()) > 0, f"{name} was not loaded"
    ids = np.load(args.ids)[:, : args.tokens].astype(np.int64)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, input_ids=ids, logits=logits, digest=np.array(hub.checkpoint_digest(args.export)))
    print(f"hf_bf16_export: wrote {args.out}: logits {logits.shape}, std {logits.std():.3f}")


if __name__ == "__main__":
    main()
