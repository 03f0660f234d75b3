"""Bootstrap confidence intervals for per-user averaged metrics, resampling users.

A retrieval or ranking metric here is a mean over users of each user's mean over queries
(:func:`recsys_slm.metrics.ranking.per_user_mean`), so the unit that is resampled is the user: every resample
draws U users with replacement and recomputes the statistic from their per-user values. Comparisons of two
configurations (a 64-d truncation vs the full dim, a student vs its teacher) are *paired*: the same drawn users
are used for both, which removes the between-user variance the two share and is what makes a few-point gap on
~1,000 users measurable at all.

The intervals are percentile intervals from :func:`scipy.stats.bootstrap` (Efron & Tibshirani, *An Introduction
to the Bootstrap*, 1993, ch. 13). For a ratio ``mean(b) / mean(a)`` a resample whose ``mean(a)`` is 0 gives
NaN and the interval is then NaN too (scipy's behaviour): too few hits to say anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from recsys_slm.metrics.ranking import user_means

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


def per_user_values(values, user_ids: Sequence) -> dict[str, float]:
    """Each user's mean of ``values`` over their queries, as user id (str) -> mean
    (:func:`recsys_slm.metrics.ranking.user_means`).

    Raises:
        ValueError: length mismatch.
    """
    users, means = user_means(values, user_ids)
    return {str(u): float(m) for u, m in zip(users, means, strict=True)}


def _interval(data: tuple[np.ndarray, ...], statistic, level: float, n_resamples: int, seed: int):
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap

    with warnings.catch_warnings():
        # NaN resamples (no reference hit) make the interval NaN, which the docstrings promise; the warning
        # scipy adds says the same about BCa, a method not used here
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=n_resamples,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(
    per_user: dict[str, float],
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap interval of the mean over users.

    Args:
        per_user (dict[str, float]): :func:`per_user_values` output (U users).

    Returns:
        dict: ``mean`` (the plain mean over users), ``low``, ``high``, ``level``, ``users``.
    """
    x = np.asarray(list(per_user.values()), dtype=np.float64)
    out = {"mean": float(x.mean()) if x.size else math.nan, "level": level, "users": int(x.size)}
    if x.size < 2:
        return {**out, "low": math.nan, "high": math.nan}
    low, high = _interval((x,), lambda a, axis=-1: a.mean(axis=axis), level, n_resamples, seed)
    return {**out, "low": low, "high": high}


def paired_ratio_ci(
    base: dict[str, float],
    other: dict[str, float],
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """``mean(other) / mean(base)`` over the users both have, with a paired percentile bootstrap interval.

    Args:
        base (dict[str, float]): per-user values of the reference (e.g. the full-dim index or the teacher).
        other (dict[str, float]): per-user values of the configuration compared with it.

    Returns:
        dict: ``ratio``, ``low``, ``high``, ``diff`` (``mean(other) - mean(base)``), ``diff_low``, ``diff_high``,
        ``level``, ``users`` (the users in both). NaN where the base mean is 0 or fewer than 2 users are shared.
    """
    shared = sorted(set(base) & set(other))
    a = np.asarray([base[u] for u in shared], dtype=np.float64)
    b = np.asarray([other[u] for u in shared], dtype=np.float64)
    out: dict[str, float] = {"level": level, "users": len(shared)}
    if len(shared) < 2:
        return {**out, "ratio": math.nan, "low": math.nan, "high": math.nan, "diff": math.nan,
                "diff_low": math.nan, "diff_high": math.nan}  # fmt: skip
    base_mean, other_mean = float(a.mean()), float(b.mean())
    out["ratio"] = other_mean / base_mean if base_mean > 0 else math.nan
    out["diff"] = other_mean - base_mean

    def ratio(x, y, axis=-1):
        den = x.mean(axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, y.mean(axis=axis) / np.where(den > 0, den, 1.0), np.nan)

    if base_mean > 0:
        out["low"], out["high"] = _interval((a, b), ratio, level, n_resamples, seed)
    else:
        out["low"] = out["high"] = math.nan
    out["diff_low"], out["diff_high"] = _interval(
        (a, b), lambda x, y, axis=-1: y.mean(axis=axis) - x.mean(axis=axis), level, n_resamples, seed
    )
    return out


def paired_metric_ci(
    metric,
    labels,
    base_scores,
    other_scores,
    user_ids: Sequence,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """``metric(other) / metric(base)`` and ``metric(other) - metric(base)`` for a metric over *records* (e.g.
    AUC), with paired percentile intervals from a cluster bootstrap: users are drawn with replacement and each
    drawn user brings all of their records, for both scorers at once.

    Records of one user are correlated (the same history in every prompt), so resampling records as if they
    were independent would give intervals that are too narrow; with few users the interval is honestly wide.

    Args:
        metric (callable (labels (R,), scores (R,)) -> float): e.g. :func:`recsys_slm.metrics.classification.auc`.
        labels (array (N,)): the records' labels.
        base_scores / other_scores (array (N,)): the two scorers' scores of the same records.
        user_ids (sequence (N,)): each record's user.

    Returns:
        dict: ``base``, ``other`` (the metric on all records), ``ratio``, ``low``, ``high``, ``diff``,
        ``diff_low``, ``diff_high``, ``level``, ``users``, ``records``.

    Raises:
        ValueError: length mismatch.
    """
    y = np.asarray(labels)
    a = np.asarray(base_scores, dtype=np.float64)
    b = np.asarray(other_scores, dtype=np.float64)
    users = np.asarray([str(u) for u in user_ids], dtype=object)
    if not (y.shape[0] == a.shape[0] == b.shape[0] == users.shape[0]):
        raise ValueError(
            f"{y.shape[0]} labels, {a.shape[0]} and {b.shape[0]} scores, {users.shape[0]} user ids: must match"
        )
    _, inverse = np.unique(users, return_inverse=True)
    by_user = [np.flatnonzero(inverse == u) for u in range(int(inverse.max()) + 1)] if users.size else []
    m_a, m_b = float(metric(y, a)), float(metric(y, b))
    out: dict[str, float] = {
        "base": m_a,
        "other": m_b,
        "level": level,
        "users": len(by_user),
        "records": int(y.size),
    }
    out["ratio"] = m_b / m_a if m_a > 0 else math.nan
    out["diff"] = m_b - m_a
    if len(by_user) < 2:
        return {**out, "low": math.nan, "high": math.nan, "diff_low": math.nan, "diff_high": math.nan}

    def both(idx) -> tuple[float, float]:
        rows = np.concatenate([by_user[int(i)] for i in idx])
        return float(metric(y[rows], a[rows])), float(metric(y[rows], b[rows]))

    draws = np.array([both(idx) for idx in _user_draws(len(by_user), n_resamples, seed)])
    tail = (1 - level) / 2 * 100
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(draws[:, 0] > 0, draws[:, 1] / draws[:, 0], np.nan)
    diffs = draws[:, 1] - draws[:, 0]
    # a resample with one class only has no AUC (NaN): then, as in scipy, the interval is NaN
    out["low"], out["high"] = (float(v) for v in np.percentile(ratios, [tail, 100 - tail]))
    out["diff_low"], out["diff_high"] = (float(v) for v in np.percentile(diffs, [tail, 100 - tail]))
    return out


def _user_draws(n_users: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_users) user indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n_users, (n_resamples, n_users))
