"""AdamW vs Muon for LoRA adapters (lora.optimizer), measured on the tiny LoRA chat task of scripts/lora_tiny.sh.

    .venv/bin/python -m bench.lora_optimizer [--steps 30] [--adamw 1e-2,3e-3,3e-2] [--muon 3e-2,1e-2,1e-1]

Each (optimizer, peak learning rate) pair is one `python -m train.pretrain configs/train/lora_tiny.yaml` run
(a subprocess) for --steps steps, with the config's schedule shape scaled to that length (warmup 5 steps, cosine
decay over the last 3/8 of the steps down to peak / 10) and no weight decay for either optimizer (the config's
adam_weight_decay 0). Then the main-head loss on the assistant tokens of 100 held-out conversations
(`train.chat synth --seed 1`, packed like the training rows) with the run's final adapters, and the wall time
per step (the median of the steps after the first, which includes compilation). Needs the data and the base of
scripts/lora_tiny.sh (data/lora-tiny); writes the held-out rows there and runs to runs/lora-optimizer/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train import chat, losses, pretrain
from v4jax.lora import LoraParam

DATA = Path("data/lora-tiny")
CONFIG = "configs/train/lora_tiny.yaml"
WEIGHTS = {"lm": 1.0, "mtp": 0.0, "balance": 0.0, "indexer": 0.0}


def heldout_rows() -> dict[str, np.ndarray]:
    """The held-out rows (made once): 100 conversations of another seed, packed into rows of 513 tokens."""
    if not (DATA / "heldout" / "meta.json").exists():
        chat.main(["synth", "--output", str(DATA / "heldout.jsonl"), "--n", "100", "--seed", "1"])
        chat.pack(DATA / "heldout.jsonl", DATA / "heldout", seq_len=512)
    return chat.load_shards(DATA / "heldout")[1]


@partial(jax.jit, static_argnums=0)
def _lm_loss(graphdef, adapters, base, tokens, segment_ids, loss_mask):
    model = nnx.merge(graphdef, adapters, base)
    return losses.objective(model, tokens, segment_ids, WEIGHTS, loss_mask)[1]["lm_loss"]


def heldout_loss(model, rows: dict[str, np.ndarray], chunk: int = 5) -> float:
    """The main head's mean loss over every held-out assistant token (chunks of rows, weighted by their targets)."""
    graphdef, adapters, base = nnx.split(model, LoraParam, ...)
    total = count = 0.0
    for i in range(0, len(rows["tokens"]), chunk):
        tok, seg, mask = (rows[k][i:i + chunk] for k in ("tokens", "segment_ids", "loss_mask"))
        n = float(np.sum((seg[:, 1:] == seg[:, :-1]) & (mask[:, 1:] != 0)))
        loss = _lm_loss(graphdef, adapters, base, jnp.asarray(tok, jnp.int32), jnp.asarray(seg), jnp.asarray(mask))
        total, count = total + n * float(loss), count + n
    return total / count


def overrides(optimizer: str, lr: float, steps: int, run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"lora.optimizer={optimizer}", f"schedule.peak_lr={lr}",
            f"schedule.final_lr={lr / 10}", f"schedule.decay_start={round(steps * 5 / 8)}",
            f"stages=[{{until_step: {steps}, batch_size: 2, seq_len: 512, attention: dense}}]",
            f"checkpoint.every={steps}", "optimizer.adam_weight_decay=0.0", "optimizer.muon_weight_decay=0.0"]


def one_run(optimizer: str, lr: float, steps: int, out: Path, rows) -> dict:
    run_dir = out / f"{optimizer}-{lr:g}"
    argv = [CONFIG, *overrides(optimizer, lr, steps, run_dir)]
    load, t0 = os.getloadavg()[0], time.perf_counter()
    with open(out / f"{optimizer}-{lr:g}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "train.pretrain", *argv], check=True, stdout=log, stderr=log)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = float(np.median([1024 / r["tokens_per_s"] for r in records if "tokens_per_s" in r]))
    last = [r["lm_loss"] for r in records[-5:]]
    return {"optimizer": optimizer, "peak_lr": lr, "steps": steps, "heldout": heldout_loss(
        pretrain.restore_run(argv)[0], rows), "train_last5": float(np.mean(last)), "s_per_step": step_s,
        "wall_s": wall, "load": (load, os.getloadavg()[0]), "skipped": sum(r["skipped"] for r in records)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--adamw", default="1e-2,3e-3,3e-2", help="AdamW peak learning rates (comma-separated; '' none)")
    ap.add_argument("--muon", default="3e-2,1e-2,1e-1", help="Muon peak learning rates (comma-separated; '' none)")
    ap.add_argument("--out", default="runs/lora-optimizer")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = heldout_rows()
    base = pretrain.load_config([CONFIG])
    print(f"held-out: {len(rows['tokens'])} rows; the base alone: "
          f"{heldout_loss(pretrain.build_model(base, pretrain.model_config(base)), rows):.3f}", flush=True)
    lrs = {k: [float(x) for x in getattr(args, k).split(",") if x] for k in ("adamw", "muon")}
    order = [(k, lr) for i in range(max(map(len, lrs.values()))) for k in lrs for lr in lrs[k][i:i + 1]]
    results = []
    for optimizer, lr in order:  # interleaved: the first lr of each, then the second, ...
        results.append(one_run(optimizer, lr, args.steps, out, rows))
        print(json.dumps(results[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| optimizer | peak lr | held-out loss | train loss, last 5 steps | s / step | load avg |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['optimizer']} | {r['peak_lr']:g} | {r['heldout']:.3f} | {r['train_last5']:.3f} | "
              f"{r['s_per_step']:.2f} | {r['load'][0]:.1f}-{r['load'][1]:.1f} |")


if __name__ == "__main__":
    main()
