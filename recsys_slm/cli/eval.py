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
