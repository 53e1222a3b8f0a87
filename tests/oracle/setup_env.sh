#!/usr/bin/env bash
# Create the HF-transformers oracle environment at <repo>/.venv-oracle (Python 3.11, CPU torch).
# Idempotent: re-running only installs what is missing.
#   bash tests/oracle/setup_env.sh
# torch is pinned to 2.13.0 because a CPU wheel of that version is available locally; any
# other version would download a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-oracle"

PY=""
if command -v pyenv >/dev/null 2>&1 && [ -x "$(pyenv root)/versions/3.11.7/bin/python" ]; then
  PY="$(pyenv root)/versions/3.11.7/bin/python"
elif command -v python3.11 >/dev/null 2>&1; then
  PY="$(command -v python3.11)"
else
  echo "setup_env.sh: no Python 3.11 found" >&2; exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi

# Fast path: everything importable and transformers knows deepseek_v4.
if "$VENV/bin/python" -P - <<'PYEOF' 2>/dev/null
import torch, numpy, ml_dtypes, transformers
from transformers import DeepseekV4ForCausalLM  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
PYEOF
then
  echo "setup_env.sh: $VENV is ready"; exit 0
fi

pip_install() {  # this machine's pip config lists local indexes that may be absent: hide that noise
  "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install --upgrade pip
pip_install "torch==2.13.0"
pip_install "transformers>=5.2" numpy ml_dtypes safetensors
"$VENV/bin/python" -P -c "import torch, transformers; from transformers import DeepseekV4ForCausalLM; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "setup_env.sh: $VENV is ready"
