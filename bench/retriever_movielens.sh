#!/usr/bin/env bash
# The MovieLens-100K retriever runs reported in docs/BENCHMARKS.md ("Two-tower retriever"), reduced for a 2-core
# CPU: the mpnet teacher is fine-tuned (logQ-corrected in-batch softmax, the configs' default) on 8,000 sampled
# pairs (250 steps of 32; a full epoch is 1,672 steps ≈ 10 h on this CPU) with user texts of the 10 most recent
# titles (half the tokens of the default 20), the MiniLM student distilled on 9,600 pairs (900 steps of 32, 3
# passes, weight 3 on its 64-d head; ≈ 22 min + 13 min of teacher encoding).
# On a GPU drop max_pairs/max_steps/texts.max_history.
#
#   bash bench/retriever_movielens.sh RANKER_TEACHER_DIR COMPRESSED_RANKER_DIR [RUNS_DIR]
#
# The two ranker directories are for the two-stage grid (e.g. runs/teacher_v2 and runs/compress_full/03_redistill).
# Each step is skipped when its output exists, so a rerun continues where a previous one stopped.
set -euo pipefail
RANKER_T=${1:?usage: bench/retriever_movielens.sh RANKER_TEACHER_DIR COMPRESSED_RANKER_DIR [RUNS_DIR]}
RANKER_S=${2:?usage: bench/retriever_movielens.sh RANKER_TEACHER_DIR COMPRESSED_RANKER_DIR [RUNS_DIR]}
R=${3:-runs/retriever}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLI="$ROOT/.venv/bin/recsys-slm"
CFG="$ROOT/pipelines/configs/retriever"
cd "$ROOT"
mkdir -p "$R"
LADDER='dims=[768,512,256,128,64,32]'
INDEXES='indexes=[Flat,HNSW32,SQ8,"IVF32,Flat","IVF32,PQ16"]'

# 1. The packaged encoders as they are (baselines): every Matryoshka dim × index.
[ -f "$R/eval_base/report.json" ] || "$CLI" eval retrieval --model all-minilm-l6-v2 --model all-mpnet-base-v2 \
    --out "$R/eval_base" "$LADDER" "$INDEXES"
# 2. Teacher: all-mpnet-base-v2 fine-tuned with in-batch negatives + the Matryoshka ladder (reduced).
[ -f "$R/mpnet_teacher/recsys_slm.json" ] || "$CLI" retriever train --config "$CFG/mpnet_teacher.yaml" \
    --out "$R/mpnet_teacher" max_pairs=8000 max_steps=250 batch_size=32 lr=5.0e-5 texts.max_history=10 \
    'matryoshka.weights=[1,1,1,1,2,1]'
# 3. Student: all-MiniLM-L6-v2 distilled from it (cosine embedding matching + listwise KL + contrastive).
[ -f "$R/minilm_student/recsys_slm.json" ] || "$CLI" retriever distill --config "$CFG/minilm_student.yaml" \
    --teacher "$R/mpnet_teacher" --out "$R/minilm_student" max_pairs=9600 max_steps=900 epochs=3 batch_size=32 \
    'matryoshka.weights=[1,1,1,3,1]'
# 4. The sweep over all four encoders (one run, so the speeds compare).
[ -f "$R/eval_full/report.json" ] || "$CLI" eval retrieval --model "$R/mpnet_teacher" --model "$R/minilm_student" \
    --model all-minilm-l6-v2 --model all-mpnet-base-v2 --out "$R/eval_full" "$LADDER" "$INDEXES"
# 5. Two-stage system: each retriever's top-20 (full dim and 64-d) re-ranked by the teacher and the compressed ranker,
#    all 942 test users (≈ 23 min on 2 cores, mostly the SmolLM2 teacher ranker; max_queries=N for less).
[ -f "$R/system/report.json" ] || "$CLI" eval system --retriever "$R/mpnet_teacher" --retriever "$R/minilm_student" \
    --ranker "$RANKER_T" --ranker "$RANKER_S" --out "$R/system" k=20 'dims=[null,64]'
