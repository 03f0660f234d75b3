#!/usr/bin/env bash
# Runs the test suite (sets up .venv/ first if needed). Extra arguments go to pytest, e.g.
#   scripts/test.sh -m "not integration"      # unit tests only, no PyPI downloads
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -m "not slow and not gpu" "$@"
