#!/usr/bin/env bash
# Evaluate the fine-tuned SmolLM2 teacher (and, with ZERO_SHOT=1, the zero-shot model) on the MovieLens-100K
# pointwise and candidate test splits, and copy the small evidence files into docs/results/teacher_movielens/.
#
#   bash bench/teacher_movielens.sh TEACHER_DIR [RUNS_DIR]
#
# Needs the prepared data (recsys-slm data prepare) and a teacher from
#   recsys-slm teacher train --config pipelines/configs/teacher/smollm2_movielens.yaml --out TEACHER_DIR
set -euo pipefail
TEACHER=${1:?usage: bench/teacher_movielens.sh TEACHER_DIR [RUNS_DIR]}
RUNS=${2:-runs/teacher_movielens}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
CFG="$ROOT/eval/configs/ranker/smollm2_movielens.yaml"
DATA="${RECSYS_SLM_HOME:-$HOME/.cache/recsys_slm}/data/movielens-100k"
EVIDENCE="$ROOT/docs/results/teacher_movielens"
cd "$ROOT"

run() {  # model task out
    "$PY" -m eval.run_ranker_eval --config "$CFG" "model=$1" "task=$DATA/tasks/$2/test.parquet" "out=$3"
}
run "$TEACHER" pointwise "$RUNS/teacher_pointwise_test"
run "$TEACHER" candidates "$RUNS/teacher_candidates_test"
if [ "${ZERO_SHOT:-0}" = 1 ]; then
    run smollm2-135m-instruct pointwise "$RUNS/zeroshot_pointwise_test"
    run smollm2-135m-instruct candidates "$RUNS/zeroshot_candidates_test"
fi

mkdir -p "$EVIDENCE/pointwise" "$EVIDENCE/candidates"
cp "$RUNS/teacher_pointwise_test/"{report.json,predictions.parquet,summary.md,roc.png} "$EVIDENCE/pointwise/"
cp "$RUNS/teacher_candidates_test/"{report.json,run.trec,qrels.trec,summary.md,ranking.png} "$EVIDENCE/candidates/"
cp "$TEACHER/recsys_slm.json" "$EVIDENCE/teacher_manifest.json"
cp "$TEACHER/metrics.jsonl" "$EVIDENCE/teacher_metrics.jsonl"
if [ "${ZERO_SHOT:-0}" = 1 ]; then
    cp "$RUNS/zeroshot_pointwise_test/report.json" "$EVIDENCE/pointwise/zeroshot_report.json"
    cp "$RUNS/zeroshot_candidates_test/report.json" "$EVIDENCE/candidates/zeroshot_report.json"
fi
echo "evidence in $EVIDENCE"
