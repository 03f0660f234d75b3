#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv/ in the repo root and installs recsys_slm with pinned
# dependencies. Called by scripts/quickstart.sh and scripts/test.sh; cheap to run again (it reinstalls only
# when pyproject.toml or constraints.txt changed). pip's output goes to .venv/setup.log (shown on failure).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.recsys_slm_installed"
LOG="$VENV/setup.log"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv at $VENV"
    "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "[setup] installing pinned dependencies into $VENV (first time: a few minutes; log: $LOG)"
    start=$(date +%s)
    # torch first and pinned to the CPU build: otherwise a dependency pulls a multi-GB CUDA build.
    if ! { "$VENV/bin/pip" install torch==2.13.0 \
           && "$VENV/bin/pip" install -c "$ROOT/constraints.txt" -e "$ROOT[dev]"; } > "$LOG" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -n 30
        echo "[setup] pip install failed; full log: $LOG" >&2
        exit 1
    fi
    echo "$want" > "$STAMP"
    echo "[setup] done in $(( $(date +%s) - start )) s"
fi
