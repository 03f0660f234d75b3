"""Forward speed of pruned rankers vs their parent, measured in one process on the same prompts.

    python -m bench.prune_speed --parent runs/teacher_v2 --run osscar=runs/prune/osscar --run svd_llm=runs/prune/svd_llm \\
        [--records 64] [--rounds 3] [--out docs/results/prune_movielens/speed.json]

``recsys-slm prune`` times the model before and after pruning inside its own run; when other jobs share the CPU
those two timings see different loads. This script loads the parent and every pruned directory (stock or the
registered compressed type) once, then times verbalizer scoring of the same calibration prompts (the seeded pointwise
train sample ``prune`` uses) model after model, ``--rounds`` times interleaved, and reports each model's median
seconds per prompt and its speedup over the parent — ratios from one run, plus the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", required=True, help="the unpruned model directory")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a pruned model directory")
    parser.add_argument("--records", type=int, default=64, help="calibration prompts timed per model")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None, help="prepared data (default $RECSYS_SLM_HOME/data/movielens-100k)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch

    from recsys_slm.data.prompts import PromptConfig, PromptRenderer
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.device import machine_info
    from recsys_slm.distill.transfer_set import labelled_train_records
    from recsys_slm.evaluation.ranker_eval import resolve_prompt
    from recsys_slm.model_dir import cache_home, read_manifest
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.prune.pruner import _latency
    from recsys_slm.prune.structure import non_embedding_params
    from recsys_slm.ranker.batching import encode_records
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    data_dir = Path(args.data_dir) if args.data_dir else cache_home() / "data" / "movielens-100k"
    prompt, _ = resolve_prompt(PromptConfig(), read_manifest(args.parent))
    log = InteractionLog.load(data_dir)
    frame, _ = labelled_train_records(data_dir, args.records, 0)
    models = {"parent": args.parent, **dict(spec.split("=", 1) for spec in args.run)}
    rankers, sizes = {}, {}
    for name, path in models.items():
        model, tokenizer = load_causal_lm(path, device="cpu", dtype=torch.float32)
        model.eval()
        renderer = PromptRenderer(prompt, tokenizer, log.items, log.users)
        rankers[name] = Ranker(model, tokenizer, renderer, RankerConfig(args.batch_size, False, prompt))
        sizes[name] = non_embedding_params(model)
    sequences = encode_records(frame, rankers["parent"].renderer, rankers["parent"].encode).sequences
    timings: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, ranker in rankers.items():
                timings[name].append(_latency(ranker.scorer, sequences))
    parent_s = statistics.median(timings["parent"])
    rows = {name: {"dir": models[name], "non_embedding_params": sizes[name],
                   "s_per_prompt": round(statistics.median(t), 5), "rounds": [round(x, 5) for x in t],
                   "speedup": round(parent_s / statistics.median(t), 3)} for name, t in timings.items()}  # fmt: skip
    report = {"machine": machine_info(), "records": len(sequences), "batch_size": args.batch_size, "models": rows}
    print(f"{report['machine']['cpu']}, {report['machine']['torch_threads']} threads, {len(sequences)} prompts")
    print("| model | non-emb. params | s/prompt (median) | speedup vs parent |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['non_embedding_params'] / 1e6:.1f}M | {r['s_per_prompt']:.4f} | {r['speedup']:.2f}× |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
