#!/usr/bin/env bash
# Runs the test suite (sets up .venv/ first if needed). Default: every test except `slow` and `gpu` ones.
# Extra arguments go to pytest; a -m you pass replaces the default selection, e.g.
#   scripts/test.sh -m "not integration and not slow and not gpu"   # unit tests only: no PyPI downloads
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
marker=(-m "not slow and not gpu")
for arg in "$@"; do
    case "$arg" in -m|-m*) marker=() ;; esac
done
exec "$ROOT/.venv/bin/python" -m pytest "${marker[@]}" "$@"
