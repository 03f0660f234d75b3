"""Evaluation of LLM rankers against classical baselines: metrics, exports (predictions, TREC) and reports.

Entry point: :func:`evaluate_ranker` with a :class:`RankerEvalConfig` (``recsys-slm eval ranker`` on the
command line). Definitions and file formats: ``docs/evaluation.md``.
"""

from recsys_slm.evaluation.baselines import BaselineConfig, fit_baselines, training_interactions
from recsys_slm.evaluation.ranker_eval import RankerEvalConfig, detect_task_kind, evaluate_ranker

__all__ = [
    "BaselineConfig",
    "RankerEvalConfig",
    "detect_task_kind",
    "evaluate_ranker",
    "fit_baselines",
    "training_interactions",
]
