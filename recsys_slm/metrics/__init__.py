"""Evaluation metrics, pure numpy: pointwise (AUC, log loss, accuracy) and candidate ranking (NDCG/Recall/MRR@K).

Definitions, the tie rule and the per-user average are written once in ``docs/evaluation.md``.
"""

from recsys_slm.metrics.classification import accuracy, auc, log_loss, pointwise_metrics
from recsys_slm.metrics.ranking import (
    DEFAULT_KS,
    candidate_ranks,
    mrr_at_k,
    ndcg_at_k,
    per_user_mean,
    rank_of_targets,
    ranking_metrics,
    recall_at_k,
)

__all__ = [
    "DEFAULT_KS",
    "accuracy",
    "auc",
    "candidate_ranks",
    "log_loss",
    "mrr_at_k",
    "ndcg_at_k",
    "per_user_mean",
    "pointwise_metrics",
    "rank_of_targets",
    "ranking_metrics",
    "recall_at_k",
]
