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

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


def per_user_values(values, user_ids: Sequence) -> dict[str, float]:
    """Each user's mean of ``values`` over their queries.

    Args:
        values (array (Q,)): one metric value per query.
        user_ids (sequence (Q,)): the user of each query.

    Returns:
        dict[str, float]: user id (as str) -> mean over that user's queries.

    Raises:
        ValueError: length mismatch.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    users = np.asarray([str(u) for u in user_ids], dtype=object)
    if users.shape[0] != v.shape[0]:
        raise ValueError(f"{users.shape[0]} user ids for {v.shape[0]} values")
    uniq, inverse = np.unique(users, return_inverse=True)
    means = np.bincount(inverse, weights=v, minlength=len(uniq)) / np.bincount(inverse, minlength=len(uniq))
    return {str(u): float(m) for u, m in zip(uniq, means, strict=True)}


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
