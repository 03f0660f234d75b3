#!/usr/bin/env bash
# The main job: compress the default ranker (SmolLM2-135M teacher fine-tuned on MovieLens-100K) with a preset of
# pipelines/configs/compress/ (default: quick), setting up .venv/ first. The data and the teacher are prepared on the
# first run and cached under $RECSYS_SLM_HOME. Extra arguments are key=value overrides, e.g.
#   scripts/compress.sh                                  # quick preset -> $RECSYS_SLM_HOME/runs/compress/quick
#   scripts/compress.sh full teacher=runs/teacher_v2     # the headline preset with an existing teacher
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
preset=quick
if [[ $# -gt 0 && "$1" != *=* ]]; then
    preset="$1"
    shift
fi
config="$ROOT/pipelines/configs/compress/$preset.yaml"
if [[ ! -f "$config" ]]; then
    echo "scripts/compress.sh: no preset $preset ($config); presets: $(cd "$ROOT/pipelines/configs/compress" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
fi
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
out="${RECSYS_SLM_HOME:-$HOME/.cache/recsys_slm}/runs/compress/$preset"
exec "$ROOT/.venv/bin/python" -m pipelines.compress --config "$config" "out=$out" "$@"
