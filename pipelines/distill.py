"""Distil a teacher ranker into a smaller student: the same job as ``recsys-slm distill``.

    python -m pipelines.distill --config pipelines/configs/distill/smollm2_movielens.yaml [key=value ...]

Needs the teacher directory and (for the off-policy default) its cache from ``recsys-slm teacher score``. Writes
``out`` (a ``from_pretrained`` directory with the best-validation-AUC weights, ``recsys_slm.json`` recording the
lineage, and ``metrics.jsonl``); an interrupted run resumes from ``<out>.work/checkpoint-last`` when restarted
with the same config. See ``docs/distillation.md``.
"""

from __future__ import annotations

import sys
from typing import Any

from recsys_slm.cli.common import run_recipe
from recsys_slm.cli.distill import distill_and_print
from recsys_slm.distill.trainer import DistillConfig


def main(cfg: DistillConfig) -> dict[str, Any]:
    """Distil and return the run summary (the manifest metrics plus ``out``)."""
    return distill_and_print(cfg)


def cli(argv: list[str] | None = None) -> int:
    return run_recipe(DistillConfig, main, __doc__, argv, example="objective.loss=sft student.num_layers=8")


if __name__ == "__main__":
    sys.exit(cli())
