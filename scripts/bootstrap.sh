#!/usr/bin/env bash
# Make <repo>/.venv: a Python 3.12 virtual environment with v4jax installed editable, plus its test extras.
# Versions: scripts/constraints.txt (the tested set). Re-installs only when pyproject.toml or the constraints
# changed since the last successful install (hash stamp in .venv).
#   bash scripts/bootstrap.sh      (run.sh and test.sh call it; call it, do not source it: it exits)
# Python 3.12 is looked for in: $V4JAX_PYTHON, $(pyenv root)/versions/3.12.*, python3.12 on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.v4jax-pyproject.sha256"

die() { echo "bootstrap: $*" >&2; exit 1; }
is_312() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
NEED="v4jax needs Python 3.12: install it (pyenv install 3.12) or set V4JAX_PYTHON"

# ---- find Python 3.12 -----------------------------------------------------------------------------------
PY=""
if [ -n "${V4JAX_PYTHON:-}" ]; then
  # An explicit choice is never silently replaced by another interpreter.
  is_312 "$(command -v "$V4JAX_PYTHON" || echo "$V4JAX_PYTHON")" ||
    die "V4JAX_PYTHON=$V4JAX_PYTHON is not a Python 3.12 interpreter. $NEED"
  PY="$(command -v "$V4JAX_PYTHON" || echo "$V4JAX_PYTHON")"
else
  if command -v pyenv >/dev/null 2>&1; then
    for p in $(ls -d "$(pyenv root)"/versions/3.12.*/bin/python 2>/dev/null | sort -V -r); do
      if is_312 "$p"; then PY="$p"; break; fi
    done
  fi
  if [ -z "$PY" ] && command -v python3.12 >/dev/null 2>&1 && is_312 "$(command -v python3.12)"; then
    PY="$(command -v python3.12)"
  fi
  [ -n "$PY" ] || die "$NEED"
fi

# ---- create / refresh .venv (serialized: run.sh and test.sh may start together) -------------------------
mkdir -p "$VENV"
if command -v flock >/dev/null 2>&1; then
  exec 9<"$VENV"
  flock 9
fi
if ! is_312 "$VENV/bin/python"; then
  [ -e "$VENV/bin/python" ] && echo "bootstrap: $VENV is not a Python 3.12 venv; recreating it" >&2
  "$PY" -m venv --clear "$VENV" || die "could not create $VENV with $PY"
fi

CONSTRAINTS="$ROOT/scripts/constraints.txt"
hash="$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(b"".join(open(p, "rb").read() for p in sys.argv[1:])).hexdigest())' \
  "$ROOT/pyproject.toml" "$CONSTRAINTS")"
version="$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$hash" ]; then
  echo "bootstrap: .venv up to date (Python $version)" >&2
  exit 0
fi

log="$VENV/pip-install.log"
if ! (cd "$ROOT" && "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" -e ".[test]") >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  die "pip install -c scripts/constraints.txt -e \".[test]\" failed; full log: $log"
fi
echo "$hash" >"$STAMP"
echo "bootstrap: installed v4jax and its dependencies into .venv (Python $version)" >&2
