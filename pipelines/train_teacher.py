"""Fine-tune the teacher ranker: the same job as ``recsys-slm teacher train``.

    python -m pipelines.train_teacher --config pipelines/configs/teacher/smollm2_movielens.yaml [key=value ...]

Needs a prepared data directory (``recsys-slm data prepare``; default ``$RECSYS_SLM_HOME/data/movielens-100k``).
Writes ``out`` (a ``from_pretrained`` directory holding the best-validation-AUC weights, ``recsys_slm.json`` and
``metrics.jsonl``); an interrupted run resumes from ``<out>.work/checkpoint-last`` when restarted with the same
config. See ``docs/teacher.md``.
"""

from __future__ import annotations

import sys
from typing import Any

from recsys_slm.cli.common import run_recipe
from recsys_slm.cli.teacher import train_and_print
from recsys_slm.ranker.train import TeacherTrainConfig


def main(cfg: TeacherTrainConfig) -> dict[str, Any]:
    """Train and return the run summary (the manifest metrics plus ``out``)."""
    return train_and_print(cfg)


def cli(argv: list[str] | None = None) -> int:
    return run_recipe(TeacherTrainConfig, main, __doc__, argv, example="lr=5e-5 max_steps=200")


if __name__ == "__main__":
    sys.exit(cli())
