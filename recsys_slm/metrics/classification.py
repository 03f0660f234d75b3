"""Pointwise (binary preference) metrics: AUC, log loss, accuracy. Pure numpy, plus scikit-learn for AUC.

Inputs are flat arrays with one entry per record: ``labels`` (N,) in {0, 1}; ``scores`` (N,) any real numbers
where larger means "more likely liked"; ``probs`` (N,) probabilities P(label = 1) in [0, 1].

References:
    TALLRec (Bao et al., RecSys'23, arXiv 2305.00447): AUC of P("Yes") on the binary preference task.
"""

from __future__ import annotations

import math

import numpy as np

LOG_LOSS_EPS = 1e-7


def _as_labels(labels) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, found {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    return y.astype(np.int64)


def _as_values(values, n: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"{name} has {v.shape[0]} entries, labels have {n}")
    if np.isnan(v).any():
        raise ValueError(f"{name} contains {int(np.isnan(v).sum())} NaN value(s)")
    return v


def auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative).

    Tied (positive, negative) pairs count one half, so a constant scorer gets exactly 0.5.

    Args:
        labels (array (N,)): 0/1 labels.
        scores (array (N,)): real-valued scores, larger = more likely positive.

    Returns:
        float: AUC in [0, 1], or NaN when ``labels`` hold only one class (AUC is undefined then).

    Raises:
        ValueError: labels not in {0, 1}, length mismatch or NaN scores.
    """
    from sklearn.metrics import roc_auc_score

    y = _as_labels(labels)
    s = _as_values(scores, y.shape[0], "scores")
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, s))


def log_loss(labels, probs, eps: float = LOG_LOSS_EPS) -> float:
    """Mean binary cross-entropy ``-[y log p + (1-y) log(1-p)]`` with ``p`` clipped to ``[eps, 1-eps]``.

    Clipping keeps one over-confident wrong answer (p = 0 for a positive) from making the mean infinite.

    Args:
        labels (array (N,)): 0/1 labels.
        probs (array (N,)): P(label = 1).
        eps (float): clip margin, default 1e-7.

    Returns:
        float: mean log loss in nats (NaN for empty input).
    """
    y = _as_labels(labels)
    p = np.clip(_as_values(probs, y.shape[0], "probs"), eps, 1.0 - eps)
    if y.size == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def accuracy(labels, probs, threshold: float = 0.5) -> float:
    """Fraction of records whose prediction ``probs >= threshold`` equals the label.

    Args:
        labels (array (N,)): 0/1 labels.
        probs (array (N,)): P(label = 1); a record is predicted positive when ``probs >= threshold``.
        threshold (float): decision threshold, default 0.5.

    Returns:
        float: accuracy in [0, 1] (NaN for empty input).
    """
    y = _as_labels(labels)
    p = _as_values(probs, y.shape[0], "probs")
    if y.size == 0:
        return math.nan
    return float(np.mean((p >= threshold).astype(np.int64) == y))


def pointwise_metrics(
    labels, scores, probs=None, prefix: str = "", threshold: float = 0.5
) -> dict[str, float]:
    """All pointwise metrics of one scorer as ``{f"{prefix}{name}": value}``.

    Args:
        labels (array (N,)): 0/1 labels.
        scores (array (N,)): ranking scores used for AUC (e.g. the logit difference, which never saturates).
        probs (array (N,) | None): probabilities for log loss and accuracy; None for scorers that are not
            probabilities (popularity, mean rating): those two metrics are then NaN.
        prefix (str): prepended to every key.
        threshold (float): accuracy threshold.

    Returns:
        dict[str, float]: ``auc``, ``log_loss``, ``accuracy``, ``n`` (records) and ``positive_rate``.
    """
    y = _as_labels(labels)
    out = {
        "auc": auc(y, scores),
        "log_loss": log_loss(y, probs) if probs is not None else math.nan,
        "accuracy": accuracy(y, probs, threshold) if probs is not None else math.nan,
        "n": int(y.size),
        "positive_rate": float(y.mean()) if y.size else math.nan,
    }
    return {f"{prefix}{k}": v for k, v in out.items()}
