"""Shared-prefix vs independent candidate scoring: items/s and speedup for N candidates per user, one run.

    .venv/bin/python -m bench.shared_prefix [--model smollm2-135m-instruct] [--users 3] [--n 20 50 100]

Uses the prepared MovieLens-100K data (``recsys-slm data prepare``) and its leave-one-out test users; for each
N, scores N candidates (the task's 20, topped up with other items) for each of ``--users`` users both ways,
checks the scores agree (max |Δ| printed) and prints items/s of each mode and the speedup. CPU: fp32 with the
machine's threads; CUDA + bf16 automatically when a GPU is present.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd
import torch

from recsys_slm.config import load_config
from recsys_slm.data.prepare import DataPrepareConfig
from recsys_slm.data.prompts import PromptConfig, PromptRenderer
from recsys_slm.data.schema import InteractionLog
from recsys_slm.models.loading import load_causal_lm
from recsys_slm.ranker.ranker import Ranker, RankerConfig


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--prompt-config", default="pipelines/configs/quickstart/smollm2_movielens.yaml")
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--n", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    data_dir = args.data_dir or DataPrepareConfig().resolved_out()
    log = InteractionLog.load(data_dir)
    task = pd.read_parquet(f"{data_dir}/tasks/candidates/test.parquet").head(args.users)
    from pipelines.quickstart import QuickstartConfig

    prompt_cfg: PromptConfig = load_config(QuickstartConfig, args.prompt_config).prompt
    model, tokenizer = load_causal_lm(args.model)
    renderer = PromptRenderer(prompt_cfg, tokenizer, log.items, log.users)
    rankers = {
        mode: Ranker(model, tokenizer, renderer, RankerConfig(args.batch_size, mode == "shared", prompt_cfg))
        for mode in ("independent", "shared")
    }
    all_items = log.items.loc[~log.items.get("is_placeholder", False), "item_id"].tolist()
    print(f"machine: {machine()}; model {args.model}; dtype {next(model.parameters()).dtype}; "
          f"batch {args.batch_size}; {args.users} users")
    rankers["shared"].score_candidates(list(task.iloc[0].history_item_ids), list(task.iloc[0].history_labels),
                                       all_items[:4], task.iloc[0].user_id)  # warm-up
    print(f"{'N':>4} {'independent items/s':>20} {'shared items/s':>15} {'speedup':>8} {'max |Δ score|':>14}")
    for n in args.n:
        seconds = {"independent": 0.0, "shared": 0.0}
        delta = 0.0
        for row in task.itertuples():
            cands = list(row.candidate_item_ids)
            extra = [i for i in all_items if i not in set(cands)][: max(0, n - len(cands))]
            cands = (cands + extra)[:n]
            scores = {}
            for mode, ranker in rankers.items():
                start = time.perf_counter()
                scores[mode] = ranker.score_candidates(list(row.history_item_ids), list(row.history_labels),
                                                       cands, row.user_id)
                seconds[mode] += time.perf_counter() - start
            delta = max(delta, float(np.abs(scores["shared"] - scores["independent"]).max()))
        items = n * len(task)
        ind, sh = items / seconds["independent"], items / seconds["shared"]
        print(f"{n:>4} {ind:>20.1f} {sh:>15.1f} {sh / ind:>7.2f}x {delta:>14.2e}")


if __name__ == "__main__":
    main()
