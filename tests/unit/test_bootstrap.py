"""Bootstrap intervals over users (recsys_slm.metrics.bootstrap) against naive numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys_slm.metrics.bootstrap import (
    _user_draws,
    mean_ci,
    paired_metric_ci,
    paired_ratio_ci,
    per_user_values,
)
from recsys_slm.metrics.classification import auc


def _naive_percentile(stat, arrays, n=4000, level=0.95, seed=123):
    """Textbook percentile bootstrap: draw users with replacement, recompute, take the tail percentiles."""
    rng = np.random.default_rng(seed)
    size = len(arrays[0])
    draws = [stat(*(a[idx] for a in arrays)) for idx in rng.integers(0, size, (n, size))]
    tail = (1 - level) / 2 * 100
    return np.percentile(draws, [tail, 100 - tail])


def test_per_user_values_average_each_users_queries():
    got = per_user_values([1.0, 0.0, 1.0, 1.0], ["u1", "u1", "u2", 3])
    assert got == {"u1": 0.5, "u2": 1.0, "3": 1.0}
    with pytest.raises(ValueError, match="3 user ids for 2 values"):
        per_user_values([1.0, 0.0], ["a", "b", "c"])


def test_mean_ci_matches_a_naive_percentile_bootstrap():
    rng = np.random.default_rng(0)
    x = (rng.random(900) < 0.12).astype(float)
    got = mean_ci(per_user_values(x, range(900)), n_resamples=4000)
    assert got["mean"] == pytest.approx(x.mean()) and got["users"] == 900 and got["level"] == 0.95
    lo, hi = _naive_percentile(lambda a: a.mean(), (x,))
    # two independent Monte-Carlo estimates of the same percentiles: agree to ~1/3 of a hit-rate s.e.
    se = math.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert got["low"] == pytest.approx(lo, abs=0.3 * se) and got["high"] == pytest.approx(hi, abs=0.3 * se)
    assert got["low"] < got["mean"] < got["high"]


def test_paired_ratio_matches_a_naive_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = (rng.random(900) < 0.15).astype(float)
    b = a.copy()
    flip = rng.choice(900, 60, replace=False)
    b[flip] = 1 - b[flip]
    users = [f"u{i}" for i in range(900)]
    got = paired_ratio_ci(per_user_values(a, users), per_user_values(b, users), n_resamples=4000)
    assert got["ratio"] == pytest.approx(b.mean() / a.mean()) and got["diff"] == pytest.approx(
        b.mean() - a.mean()
    )
    lo, hi = _naive_percentile(lambda x, y: y.mean() / x.mean(), (a, b))
    assert got["low"] == pytest.approx(lo, abs=0.02) and got["high"] == pytest.approx(hi, abs=0.02)
    dlo, dhi = _naive_percentile(lambda x, y: y.mean() - x.mean(), (a, b))
    assert got["diff_low"] == pytest.approx(dlo, abs=0.003) and got["diff_high"] == pytest.approx(
        dhi, abs=0.003
    )
    # pairing is what makes the interval narrow: resampling the two independently is ~4x wider here
    rng2 = np.random.default_rng(5)
    unpaired = [
        b[rng2.integers(0, 900, 900)].mean() / a[rng2.integers(0, 900, 900)].mean() for _ in range(2000)
    ]
    assert got["high"] - got["low"] < 0.5 * np.subtract(*np.percentile(unpaired, [97.5, 2.5]))


def test_paired_ratio_edge_cases():
    users = [f"u{i}" for i in range(30)]
    same = per_user_values([1.0, 0.0] * 15, users)
    got = paired_ratio_ci(same, same)
    assert (got["ratio"], got["low"], got["high"], got["diff"]) == (1.0, 1.0, 1.0, 0.0)
    zero = per_user_values([0.0] * 30, users)
    got = paired_ratio_ci(zero, same)
    assert math.isnan(got["ratio"]) and math.isnan(got["low"]) and got["diff"] == pytest.approx(0.5)
    # a resample that draws no hit of the reference has no ratio: the interval says so (NaN), not a number
    few = per_user_values([1.0, 0.0, 0.0], ["a", "b", "c"])
    assert math.isnan(paired_ratio_ci(few, few)["low"])
    # only shared users are compared
    got = paired_ratio_ci(per_user_values([1.0, 1.0], ["u0", "x"]), same)
    assert got["users"] == 1 and math.isnan(got["ratio"])


def test_paired_metric_ci_is_a_cluster_bootstrap_over_users():
    """Pinned against a loop over the same user draws: each drawn user brings all their records, for both models."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    users = np.repeat([f"u{i}" for i in range(25)], 12)
    y = (rng.random(users.size) < 0.4).astype(int)
    a = y + rng.normal(0, 1.0, users.size)
    b = y + rng.normal(0, 0.8, users.size)
    got = paired_metric_ci(auc, y, a, b, users, n_resamples=300, seed=7)
    assert got["base"] == pytest.approx(roc_auc_score(y, a)) and got["other"] == pytest.approx(
        roc_auc_score(y, b)
    )
    assert (
        got["ratio"] == pytest.approx(got["other"] / got["base"])
        and got["users"] == 25
        and got["records"] == 300
    )
    uniq = sorted(set(users.tolist()))
    ratios, diffs = [], []
    for draw in _user_draws(25, 300, 7):
        rows = np.concatenate([np.flatnonzero(users == uniq[i]) for i in draw])
        ra, rb = roc_auc_score(y[rows], a[rows]), roc_auc_score(y[rows], b[rows])
        ratios.append(rb / ra)
        diffs.append(rb - ra)
    assert [got["low"], got["high"]] == pytest.approx(np.percentile(ratios, [2.5, 97.5]).tolist())
    assert [got["diff_low"], got["diff_high"]] == pytest.approx(np.percentile(diffs, [2.5, 97.5]).tolist())
    # the same scorer twice: no difference in any resample
    same = paired_metric_ci(auc, y, a, a, users, n_resamples=200)
    assert (same["low"], same["high"], same["diff_low"], same["diff_high"]) == (1.0, 1.0, 0.0, 0.0)
    one = paired_metric_ci(auc, y[:12], a[:12], b[:12], users[:12])
    assert one["users"] == 1 and math.isnan(one["low"])
    with pytest.raises(ValueError, match="must match"):
        paired_metric_ci(auc, y, a[:-1], b, users)
