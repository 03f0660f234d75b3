"""Evaluate an LLM ranker against classical baselines on one task parquet.

    python -m eval.run_ranker_eval --config eval/configs/ranker/smollm2_movielens.yaml [key=value ...]

A thin recipe over :func:`recsys_slm.evaluation.evaluate_ranker` (the same as ``recsys-slm eval ranker``):
load the config (defaults, then YAML, then ``key=value`` overrides), evaluate, print the metrics table.
Outputs and metric definitions: ``docs/evaluation.md``.
"""

from __future__ import annotations

import sys

from recsys_slm.cli.common import run_recipe
from recsys_slm.evaluation.ranker_eval import RankerEvalConfig, evaluate_ranker
from recsys_slm.evaluation.report import text_table


def main(cfg: RankerEvalConfig) -> dict:
    """Run the evaluation, print the table, return the report (the content of ``report.json``)."""
    report = evaluate_ranker(cfg)
    print(text_table(report))
    print(f"\nwrote {cfg.out}")
    return report


def cli(argv: list[str] | None = None) -> int:
    return run_recipe(RankerEvalConfig, main, __doc__, argv, example="model=none max_records=200")


if __name__ == "__main__":
    sys.exit(cli())
