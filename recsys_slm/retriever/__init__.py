"""Two-tower text retriever: texts from interaction logs, training and distillation with Matryoshka heads, FAISS
indexes and retrieval evaluation (the candidate generator of a retrieve → rank system).

Submodules:
    texts: :class:`RetrieverTextConfig`, :class:`RetrieverTexts`, :func:`training_pairs`, :func:`eval_queries`.
    train: :class:`RetrieverTrainConfig`, :func:`train_retriever`, :func:`distill_retriever`.
    losses: :class:`ListwiseKLLoss`, :class:`RetrieverDistillLoss`, :func:`listwise_kl`, :func:`inbatch_margin_mse`.
    index: :class:`RetrievalIndex`, :class:`IndexMismatchError`, :func:`check_factory`.
    evaluate: :class:`RetrievalEvalConfig`, :func:`evaluate_retrieval`, :func:`retrieve_candidates` (=
        :func:`encode_candidate_source` + :func:`write_candidates`).

Names are re-exported lazily so importing this package does not import faiss, torch or sentence-transformers.
Guide: ``docs/retriever.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RetrieverTextConfig": "texts",
    "RetrieverTexts": "texts",
    "training_pairs": "texts",
    "eval_queries": "texts",
    "RetrieverTrainConfig": "train",
    "MatryoshkaConfig": "train",
    "RetrieverDistillSection": "train",
    "train_retriever": "train",
    "distill_retriever": "train",
    "ListwiseKLLoss": "losses",
    "RetrieverDistillLoss": "losses",
    "listwise_kl": "losses",
    "inbatch_margin_mse": "losses",
    "RetrievalIndex": "index",
    "IndexMismatchError": "index",
    "check_factory": "index",
    "RetrievalEvalConfig": "evaluate",
    "evaluate_retrieval": "evaluate",
    "retrieve_candidates": "evaluate",
    "encode_candidate_source": "evaluate",
    "write_candidates": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
