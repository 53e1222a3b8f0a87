"""Export a training run's latest checkpoint as a released-layout safetensors checkpoint (architecture §5), so that a
model pretrained or fine-tuned by train/pretrain.py can be served by other engines or loaded by HF transformers;
or, for a LoRA run, its adapters alone.

    python -m train.export CONFIG.yaml [key=value ...] --out DIR [--weights release|bfloat16] [--shard-gb 4]
    python -m train.export CONFIG.yaml [key=value ...] --out DIR --adapters-only

CONFIG and overrides are the run's own (as given to train.pretrain). `release` re-encodes the weights to the
release's FP8 (128x128 UE8M0 blocks) and MXFP4 experts with minimal power-of-two scales; `bfloat16` stores them
as BF16. A LoRA run's adapters are merged into the base first (W + alpha / rank * b a), so the adapted weights
are re-quantized: a rounding error as large as quantizing any dense weight (docs/training.md, LoRA). With
--adapters-only the adapters are written alone, as PEFT does (adapter_model.safetensors + adapter_config.json,
v4jax.lora.save_adapters), for `v4jax-generate BASE --adapters DIR`. DIR appears only when complete (written in
a temp directory, then renamed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.cli import InputError, run
from train.pretrain import load_config, restore_run
from v4jax.convert import export_model
from v4jax.lora import adapters, merge, save_adapters


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="+", help="run config YAML and key=value overrides, as for train.pretrain")
    ap.add_argument("--out", required=True, help="the directory to write (must not exist)")
    ap.add_argument("--weights", default="release", choices=["release", "bfloat16"])
    ap.add_argument("--adapters-only", action="store_true",
                    help="a LoRA run: write its adapters alone (PEFT-style safetensors + adapter_config.json)")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--debug", action="store_true", help="show the traceback of a known error too")
    args = ap.parse_args(argv)
    if args.adapters_only and Path(args.out).exists():
        raise InputError(f"{args.out} already exists: remove it or choose another --out")
    model, _, meta = restore_run(args.config)
    if args.adapters_only:
        if not adapters(model):
            raise InputError("--adapters-only: the run trained no LoRA adapters (lora.enabled is false): export "
                             "the whole model without the flag")
        save_adapters(model, args.out, base=load_config(args.config)["init"])
        what = "the adapters of step"
    else:
        merge(model)  # a no-op unless the run trained adapters
        export_model(model, args.out, args.weights, int(args.shard_gb * 1e9))
        what = "step"
    print(f"train.export: wrote {what} {meta['step']} to {args.out}")


if __name__ == "__main__":
    run(main, "train.export")
