"""A tiny GA (DSpark) checkpoint in the released layout, written by the project's own writer: the `tiny-dspark`
preset (vocab 1024, dim 128, 6 layers + a 3-stage drafter; FP8 128-blocks and FP4 32-blocks tile every matrix)
with v4jax.hub.random_hub_tensors' weights, as DeepSeek's Flash-0731 repository holds its model:

    config.json               HF config as released (num_nextn_predict_layers 1, the dspark_* fields,
                              compress_ratios of n_layers + 3 entries)
    inference/config.json     the official ModelArgs (n_mtp_layers 3, the dspark_* fields)
    model-0000i-of-0000n.safetensors + model.safetensors.index.json
                              FP8 / MXFP4 / BF16 / F32 / I64 as released, the drafter's mtp.{0,1,2}.* alone in
                              the last shard

Tests generate it into a temporary directory (tests/test_ga_checkpoint.py); by hand:

    .venv/bin/python tests/ga_fixture.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from v4jax import hub  # noqa: E402
from v4jax.config import ModelConfig  # noqa: E402

SHARD_BYTES = 2 << 20  # a few main shards, as the release has many


def write_ga_fixture(out_dir, seed: int = 0) -> ModelConfig:
    """Writes the fixture into out_dir (which must not exist) -> the config it describes."""
    cfg = ModelConfig.preset("tiny-dspark")
    official = json.dumps(cfg.to_official_dict(), indent=2) + "\n"
    hub.write_random_checkpoint(out_dir, cfg.to_hf_config(), seed, SHARD_BYTES,
                                extra_files={os.path.join("inference", "config.json"): official})
    return cfg


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="the directory to create")
    ap.add_argument("--seed", type=int, default=0, help="random_hub_tensors' seed")
    args = ap.parse_args()
    write_ga_fixture(args.out_dir, args.seed)
    print(f"wrote {args.out_dir}")
