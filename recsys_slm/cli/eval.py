"""``recsys-slm eval ranker``: evaluate an LLM ranker (and/or classical baselines) on a task parquet."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from recsys_slm.cli import retriever as retriever_cmd
from recsys_slm.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate rankers against classical baselines")
    esub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)

    rk = esub.add_parser(
        "ranker",
        help="score a pointwise or candidate task parquet; write metrics, predictions, TREC files and plots",
        description="Writes OUT/{report.json,predictions.parquet,summary.md} and roc.png (pointwise) or "
        "ranking.png + run.trec + qrels.trec + runs/*.trec (candidates), atomically. The task kind is read "
        "from the parquet's columns. Definitions and formats: docs/evaluation.md.",
    )
    rk.add_argument(
        "--model",
        default=None,
        help="packaged model name, model directory or hub id; 'none' = baselines only",
    )
    rk.add_argument("--task", default=None, help="task parquet, e.g. DIR/tasks/candidates/test.parquet")
    rk.add_argument("--out", default=None, help="output directory (replaced atomically)")
    rk.add_argument(
        "--data-dir",
        default=None,
        help="prepared data directory (default: DIR when the task is DIR/tasks/<kind>/<split>.parquet)",
    )
    add_config_args(rk, "max_records=500 batch_size=32")
    rk.set_defaults(func=run_ranker)
    retriever_cmd.register_eval(esub)  # recsys-slm eval retrieval (recsys_slm/cli/retriever.py)

    sy = esub.add_parser(
        "system",
        help="two-stage system eval: every retriever's top-k re-ranked by every ranker; NDCG/Recall@K over all users",
        description="Writes OUT/{report.json,summary.md,two_stage.png,cells/} atomically; finished cells are reused "
        "on a rerun. Definitions: docs/evaluation.md (two-stage system).",
    )
    sy.add_argument(
        "--retriever", action="append", default=None, help="retriever directory or encoder; repeat"
    )
    sy.add_argument("--ranker", action="append", default=None, help="ranker model directory; repeat")
    sy.add_argument("--out", default=None, help="output directory (replaced atomically)")
    sy.add_argument(
        "--data-dir", default=None, help="prepared data directory (default: the MovieLens-100K cache)"
    )
    add_config_args(sy, "k=20 dims=[null,64] max_queries=200")
    sy.set_defaults(func=run_system)


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given on the command line, as config fields (applied after --config and key=value overrides)."""
    values: dict[str, Any] = {}
    if args.model is not None:
        values["model"] = args.model
    for key in ("task", "out", "data_dir"):
        if getattr(args, key) is not None:
            values[key] = Path(getattr(args, key))
    return values


def run_ranker(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.evaluation.ranker_eval import RankerEvalConfig, evaluate_ranker
    from recsys_slm.evaluation.report import text_table

    cfg = load_config(RankerEvalConfig, args.config, args.overrides)
    # dataclasses.replace re-runs __post_init__, so flag values are validated like config values. Flags are
    # applied as Python values, not parsed as YAML, so any path spelling is taken literally.
    cfg = dataclasses.replace(cfg, **_flag_values(args))
    report = evaluate_ranker(cfg)
    task = report["task"]
    print(
        f"evaluated {task['kind']} task {task['path']}: {task['records']:,} records, {task['users']:,} users"
        + (f", {task['candidates']:,} candidates" if task["kind"] == "candidates" else "")
    )
    model = report["model"]
    if model:
        print(f"  model {model['spec']}: {model['params']:,} params on {model['device']} ({model['dtype']})")
    thr = report["throughput"]
    if thr and thr["prompts_per_s"]:
        lat = thr["batch_latency_ms"]
        print(
            f"  {thr['prompts']:,} prompts, {thr['prompts_per_s']:.1f} prompts/s (forward), "
            f"batch latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms"
        )
    print()
    print(text_table(report))
    for note in report["notes"]:
        print(f"  note: {note}")
    print(f"\nwrote {cfg.out} ({', '.join(report['files'])})")
    return 0


def run_system(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.evaluation.two_stage import TwoStageConfig, evaluate_two_stage, text_rows

    cfg = load_config(TwoStageConfig, args.config, args.overrides)
    values: dict[str, Any] = {}
    if args.retriever:
        values["retrievers"] = list(cfg.retrievers) + list(args.retriever)
    if args.ranker:
        values["rankers"] = list(cfg.rankers) + list(args.ranker)
    for key in ("out", "data_dir"):
        if getattr(args, key) is not None:
            values[key] = Path(getattr(args, key))
    cfg = dataclasses.replace(cfg, **values)
    report = evaluate_two_stage(cfg)
    header, rows = text_rows(report)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for note in report["notes"]:
        print(f"  note: {note}")
    print(f"\nwrote {cfg.out} ({', '.join(report['files'])})")
    return 0
