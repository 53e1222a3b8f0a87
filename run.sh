#!/usr/bin/env bash
# The main job: bootstrap .venv (Python 3.12), then `python -m v4jax` with any arguments passed through.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec .venv/bin/python -m v4jax "$@"
