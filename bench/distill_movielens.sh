#!/usr/bin/env bash
# Every MovieLens-100K distillation run reported in docs/BENCHMARKS.md, then the report in
# docs/results/distill_movielens/. Measured on 2 CPU cores: scoring 8,000 prompts 2,134 s, each 250-step student
# ≈ 18 min with its validations and test pass; the Qwen steps (teacher ≈ 25 s/step on a shared CPU, its cache)
# are not measured end to end yet.
#
#   bash bench/distill_movielens.sh TEACHER_DIR [RUNS_DIR]
#
# TEACHER_DIR: the fine-tuned SmolLM2 teacher (recsys-slm teacher train --config
# pipelines/configs/teacher/smollm2_movielens.yaml --out TEACHER_DIR). Each step is skipped when its output exists,
# so a rerun continues where a previous one stopped (and every step resumes by itself when killed).
set -euo pipefail
TEACHER=${1:?usage: bench/distill_movielens.sh TEACHER_DIR [RUNS_DIR]}
R=${2:-runs/distill}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLI="$ROOT/.venv/bin/recsys-slm"
CFG="$ROOT/pipelines/configs/distill/smollm2_movielens.yaml"
cd "$ROOT"
mkdir -p "$R"

# 1. Transfer sets: 4,000 labelled records + 4,000 teacher-labelled pairs; the first 2,000-record sample (a subset).
[ -f "$R/transfer_4k_4k.parquet" ] || "$CLI" data transfer-set --out "$R/transfer_4k_4k.parquet" max_labelled=4000 extra_pairs=4000
[ -f "$R/transfer_2k.parquet" ] || "$CLI" data transfer-set --out "$R/transfer_2k.parquet" max_labelled=2000
# 2. SmolLM2 teacher cache (reused when complete).
"$CLI" teacher score --model "$TEACHER" --task "$R/transfer_4k_4k.parquet" --out "$R/scores_smollm2_4k_4k.parquet"

student() {  # name, then overrides
    local name=$1; shift
    [ -f "$R/$name/recsys_slm.json" ] || "$CLI" distill --config "$CFG" --out "$R/$name" progress=false "$@"
}
S=(teacher="$TEACHER" teacher_cache="$R/scores_smollm2_4k_4k.parquet")
# 3. Same-tokenizer students, 10 of 30 layers, 250 steps of 16: soft labels vs hard labels vs enlarged transfer set.
student kd_binary "${S[@]}" "sources=[labelled]" objective.loss=binary_kl
student sft "${S[@]}" "sources=[labelled]" objective.loss=sft
student kd_binary_enlarged "${S[@]}" "sources=[labelled,teacher_labelled]" objective.loss=binary_kl

# 3b. Kill and resume: rerun kd_binary, SIGKILL it past its step-150 checkpoint, rerun the same command, and compare
#     the final metrics with the uninterrupted run (docs/results/distill_movielens/kd_resume.json).
if [ ! -f "$R/kd_resume/recsys_slm.json" ]; then
    ARGS=(--config "$CFG" --out "$R/kd_resume" "${S[@]}" progress=false "sources=[labelled]" objective.loss=binary_kl)
    "$CLI" distill "${ARGS[@]}" > "$R/kd_resume.log" 2>&1 &
    PID=$!
    until grep -q '"step": 150' "$R/kd_resume.work/checkpoint-last/state.json" 2>/dev/null; do sleep 5; done
    sleep 60; kill -9 "$PID"; wait "$PID" 2>/dev/null || true
    "$CLI" distill "${ARGS[@]}"
fi
"$ROOT/.venv/bin/python" -m bench.compare_runs "$R/kd_binary" "$R/kd_resume" --out docs/results/distill_movielens/kd_resume.json

# 4. Cross-tokenizer: a Qwen2.5-Coder-0.5B teacher (100 steps on CPU), 2,000-record transfer set, students from
#    the base SmolLM2 (10 layers), 125 steps; the same-tokenizer references use the SmolLM2 teacher's cache.
Q=$R/teacher_qwen
[ -f "$Q/recsys_slm.json" ] || "$CLI" teacher train --config pipelines/configs/teacher/qwen_coder_movielens.yaml --out "$Q" max_steps=100 eval_max_records=200 progress=false
"$CLI" teacher score --model "$Q" --task "$R/transfer_2k.parquet" --out "$R/scores_qwen_2k.parquet"
X=(student.source=smollm2-135m-instruct "sources=[labelled]" max_steps=125)
student x_uld teacher="$Q" teacher_cache="$R/scores_qwen_2k.parquet" "${X[@]}" objective.loss=uld objective.kd_weight=0.5
student x_gold teacher="$Q" teacher_cache="$R/scores_qwen_2k.parquet" "${X[@]}" objective.loss=gold objective.kd_weight=0.5
student s2k_binary "${S[@]}" "${X[@]}" objective.loss=binary_kl transfer_set="$R/transfer_2k.parquet"
student x_binary teacher="$Q" teacher_cache="$R/scores_qwen_2k.parquet" "${X[@]}" objective.loss=binary_kl
student s2k_sft "${S[@]}" "${X[@]}" objective.loss=sft transfer_set="$R/transfer_2k.parquet"

# 5. The report: every run's config and metrics, and student vs teacher scoring speed in one process.
runs=()
for name in kd_binary sft kd_binary_enlarged x_uld x_gold s2k_binary x_binary s2k_sft; do
    [ -f "$R/$name/recsys_slm.json" ] && runs+=(--run "$name=$R/$name")
done
"$ROOT/.venv/bin/python" -m bench.distill_report --teacher "$TEACHER" "${runs[@]}" --out docs/results/distill_movielens
