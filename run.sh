#!/usr/bin/env bash
# The main job: bootstrap .venv (Python 3.12), tokenise the embedded corpus (the Python standard library, once,
# into data/stdlib), train the tiny model with configs/train/tiny.yaml, then sample text from it.
# Arguments are key=value overrides of the run config (e.g. `bash run.sh run_dir=runs/other`). Running it again
# resumes from runs/tiny's checkpoints (a finished run just samples again); delete runs/tiny for a fresh run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
PY=.venv/bin/python
[ -f data/stdlib/meta.json ] || "$PY" -m train.data stdlib --output data/stdlib
"$PY" -m train.pretrain configs/train/tiny.yaml "$@"
"$PY" -m infer.cli configs/train/tiny.yaml "$@" --prompt "def " --max-new-tokens 160 --temperature 0.8
