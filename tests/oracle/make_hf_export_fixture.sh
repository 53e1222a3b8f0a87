#!/usr/bin/env bash
# Rebuilds tests/fixtures/hf_bf16_export/ref.npz: the tiny Flash-like checkpoint (tests/flashlike_fixture.py) through
# v4jax-convert (safetensors -> Orbax -> BF16 safetensors), loaded by HF transformers' own from_pretrained.
#   bash tests/oracle/make_hf_export_fixture.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
.venv/bin/python tests/flashlike_fixture.py "$TMP/flashlike"
.venv/bin/python -c "import numpy as np, sys; np.save(sys.argv[1], np.load(sys.argv[2])['input_ids'])" \
    "$TMP/ids.npy" tests/fixtures/flashlike/ref.npz
.venv/bin/python -m v4jax.convert to-orbax "$TMP/flashlike" "$TMP/orbax"
.venv/bin/python -m v4jax.convert to-hub --weights bfloat16 "$TMP/orbax" "$TMP/bf16"
bash tests/oracle/setup_env.sh
.venv-oracle/bin/python tests/oracle/hf_bf16_export.py --export "$TMP/bf16" --ids "$TMP/ids.npy" \
    --tokens 128 --out tests/fixtures/hf_bf16_export/ref.npz
