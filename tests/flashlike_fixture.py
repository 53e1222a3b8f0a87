"""The tiny Flash-like checkpoint of the parity tests, in the released layout, written by the project's own writer:
tests/fixtures/flashlike/config.json (a tiny V4 with Flash's layer plan, compress_ratios [0, 4, 128, 4, 128, 4, 0]
with the MTP layer last, 2 hash layers, YaRN from 256 positions, FP8 / UE8M0 128x128 blocks and MXFP4 experts,
vocab 1024) with v4jax.hub.random_hub_tensors' weights for the seed in tests/fixtures/flashlike/ref.npz:

    config.json, model-00001-of-00002.safetensors (main), model-00002-of-00002.safetensors (the MTP block alone),
    model.safetensors.index.json

The weights are not stored (about 8 MB; written in a fraction of a second). ref.npz holds what DeepSeek's official
inference code and HF transformers compute from this checkpoint (tests/oracle/make_flashlike_fixture.py).
tests/conftest.py writes it once per test process; by hand:

    .venv/bin/python tests/flashlike_fixture.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from v4jax import hub  # noqa: E402  (numpy-only module)

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "flashlike")
CONFIG = os.path.join(FIXTURE_DIR, "config.json")
REF = os.path.join(FIXTURE_DIR, "ref.npz")


def reference_seed() -> int:
    """The seed the stored reference outputs were computed with."""
    return int(np.load(REF)["seed"])


def write_flashlike(out_dir, seed: int | None = None) -> None:
    """Writes the checkpoint into out_dir (which must not exist); seed defaults to the references' seed."""
    with open(CONFIG) as f:
        hf_config = json.load(f)
    hub.write_random_checkpoint(out_dir, hf_config, reference_seed() if seed is None else seed)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="the directory to create")
    ap.add_argument("--seed", type=int, help="random_hub_tensors' seed (default: the references')")
    args = ap.parse_args()
    write_flashlike(args.out_dir, args.seed)
    print(f"wrote {args.out_dir}")
