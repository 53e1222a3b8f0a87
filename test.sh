#!/usr/bin/env bash
# The test command: bootstrap .venv (Python 3.12), then pytest on 2 workers (CI has 2 cores).
# Extra arguments go to pytest, e.g. `bash test.sh -k config` or `bash test.sh -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
rc=0
# A worker that dies (XLA:CPU's compiler has segfaulted, rarely, late in a long-lived worker: once in CI, once
# here, each time in a test that passes alone) gets its test run once more on a fresh worker; the summary counts it
# as "rerun". Failing assertions are never rerun: --only-rerun matches no exception, and crashes bypass it.
.venv/bin/python -m pytest -n 2 --reruns 1 --only-rerun "^only-worker-crashes-are-rerun$" tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit code 5); treating that as a failure. Check the -k / path arguments." >&2
  exit 1
fi
exit "$rc"
