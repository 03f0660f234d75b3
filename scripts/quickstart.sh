#!/usr/bin/env bash
# Runs the main job on the embedded default (MovieLens-100K + SmolLM2-135M-Instruct), setting up .venv/ first.
# Extra arguments are key=value config overrides, e.g.  scripts/quickstart.sh num_prompts=3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pipelines.quickstart --config pipelines/configs/quickstart/smollm2_movielens.yaml "$@"
