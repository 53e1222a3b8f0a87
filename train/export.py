"""Export a training run's latest checkpoint as a released-layout safetensors checkpoint (spec §5), so that a
model pretrained or fine-tuned by train/pretrain.py can be served by other engines or loaded by HF transformers.

    python -m train.export CONFIG.yaml [key=value ...] --out DIR [--weights release|bfloat16] [--shard-gb 4]

CONFIG and overrides are the run's own (as given to train.pretrain). `release` re-encodes the weights to the
release's FP8 (128x128 UE8M0 blocks) and MXFP4 experts with minimal power-of-two scales; `bfloat16` stores them
as BF16. DIR appears only when complete (written in a temp directory, then renamed).
"""

from __future__ import annotations

import argparse

from train.cli import InputError, run
from train.sample import restore_run
from v4jax.convert import export_model
from v4jax.lora import adapters


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="+", help="run config YAML and key=value overrides, as for train.pretrain")
    ap.add_argument("--out", required=True, help="the safetensors directory to write (must not exist)")
    ap.add_argument("--weights", default="release", choices=["release", "bfloat16"])
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--debug", action="store_true", help="show the traceback of a known error too")
    args = ap.parse_args(argv)
    model, _, meta = restore_run(args.config)
    if adapters(model):
        raise InputError("the run trained LoRA adapters: exporting them (merged into the base and re-quantized, or "
                         "alone) is not implemented yet; its checkpoints hold the adapters, its init the base")
    export_model(model, args.out, args.weights, int(args.shard_gb * 1e9))
    print(f"train.export: wrote step {meta['step']} to {args.out}")


if __name__ == "__main__":
    run(main, "train.export")
