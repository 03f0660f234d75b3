"""Classical baselines for the ranker tasks, fitted on training data only.

Four scorers, each with ``score_pointwise(frame) -> (N,)`` and ``score_candidates(frame) -> list[(N_i,)]``:

* ``popularity``: the item's interaction count in the training interactions.
* ``item_mean_rating``: the item's mean rating shrunk toward the global mean by a Bayesian prior of
  ``rating_prior_weight`` pseudo-ratings, ``(sum + m * mu) / (n + m)``; unseen items get ``mu``. Logs without
  ratings use the 0/1 ``label`` instead.
* ``user_like_rate``: the share of liked items in the record's own ``history_labels`` (available at inference),
  shrunk toward the training like-rate ``p0`` by ``like_prior_weight`` pseudo-labels. It is constant across one
  user's candidates, so on candidate tasks it ties everything and the tie rule alone orders the list
  (it is reported anyway, as a sanity floor).
* ``logreg``: scikit-learn logistic regression on the three features above (``log1p(popularity)``, item mean
  rating, user like-rate; standardised), fitted on the pointwise train split.

"Fitted on train only" (:func:`training_interactions`): popularity and mean ratings come from the interactions
strictly before the last pointwise train record's timestamp ``T``, plus the train records themselves. The
pointwise split is chronological, so every val/test record is at or after ``T`` and is a different event:
none is counted. Events listed in ``exclude`` are dropped as well; evaluation passes the held-out targets of the
candidate tasks (whose leave-one-out split is per user, so a target may predate ``T``) and the records of the
task being evaluated, so no evaluated label ever feeds its own feature. When fitting the logistic regression each
train record's own event is subtracted from its item's count and rating sum (leave-one-out features), otherwise
the model would learn from features that contain the label and that test records never have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys_slm.config import check, validate_fields
from recsys_slm.data.events import event_index, task_events  # noqa: F401  (task_events: re-export)


@dataclass
class BaselineConfig:
    """Fields: rating_prior_weight (float, 5.0): pseudo-ratings at the global mean added to every item's mean;
    like_prior_weight (float, 2.0): pseudo-labels at the training like-rate added to every history like-rate;
    logreg_c (float, 1.0): inverse L2 regularisation strength of the logistic regression."""

    rating_prior_weight: float = 5.0
    like_prior_weight: float = 2.0
    logreg_c: float = 1.0

    def __post_init__(self) -> None:
        validate_fields(self)
        check(
            self.rating_prior_weight >= 0,
            "rating_prior_weight",
            f"must be >= 0, got {self.rating_prior_weight}",
        )
        check(self.like_prior_weight >= 0, "like_prior_weight", f"must be >= 0, got {self.like_prior_weight}")
        check(self.logreg_c > 0, "logreg_c", f"must be > 0, got {self.logreg_c}")


def training_interactions(
    interactions: pd.DataFrame,
    train_records: pd.DataFrame | None = None,
    exclude: pd.MultiIndex | None = None,
) -> pd.DataFrame:
    """The interactions baselines may be fitted on (see the module docstring for the rule).

    Args:
        interactions (pd.DataFrame): the full log (user_id, item_id, timestamp, rating and/or label).
        train_records (pd.DataFrame | None): the pointwise train split; None or empty = no time cut-off.
        exclude (pd.MultiIndex | None): (user_id, item_id, timestamp) events to drop, e.g. from
            :func:`task_events`.

    Returns:
        pd.DataFrame: the kept rows of ``interactions`` (index reset).
    """
    events = event_index(interactions)
    keep = np.ones(len(interactions), dtype=bool)
    if train_records is not None and len(train_records):
        cutoff = int(train_records["timestamp"].max())
        keep &= (interactions["timestamp"].to_numpy(dtype=np.int64) < cutoff) | events.isin(
            event_index(train_records)
        )
    if exclude is not None and len(exclude):
        keep &= ~events.isin(exclude)
    return interactions.loc[keep].reset_index(drop=True)


def _feedback(interactions: pd.DataFrame) -> pd.Series:
    """The value averaged per item: ``rating``, or the 0/1 ``label`` when the log has no ratings."""
    if "rating" in interactions.columns and interactions["rating"].notna().any():
        return interactions["rating"].astype(float)
    if "label" in interactions.columns:
        return interactions["label"].astype(float)
    return pd.Series(np.nan, index=interactions.index)


@dataclass
class ItemStats:
    """Per-item counts and feedback sums of the training interactions.

    Attributes:
        count (pd.Series): interactions per item_id.
        value_sum (pd.Series): sum of the feedback value per item_id (rows with a value only).
        value_n (pd.Series): rows with a feedback value per item_id.
        global_mean (float): mean feedback over all training rows (the prior mean ``mu``).
        prior_weight (float): pseudo-observations ``m`` at ``mu``.
        uses_rating (bool): False when the label replaced the rating.
    """

    count: pd.Series
    value_sum: pd.Series
    value_n: pd.Series
    global_mean: float
    prior_weight: float
    uses_rating: bool

    @classmethod
    def fit(cls, interactions: pd.DataFrame, prior_weight: float) -> ItemStats:
        value = _feedback(interactions)
        items = interactions["item_id"].astype(str)
        has = value.notna()
        mean = float(value[has].mean()) if has.any() else 0.0
        return cls(
            count=items.value_counts(),
            value_sum=value[has].groupby(items[has]).sum(),
            value_n=items[has].value_counts(),
            global_mean=mean,
            prior_weight=prior_weight,
            uses_rating="rating" in interactions.columns and interactions["rating"].notna().any(),
        )

    def popularity(self, item_ids, own: np.ndarray | None = None) -> np.ndarray:
        """Counts (N,) float; ``own`` (N,) bool subtracts each row's own event (leave-one-out)."""
        c = self.count.reindex(pd.Index(item_ids, dtype=object)).fillna(0).to_numpy(dtype=np.float64)
        return c - own if own is not None else c

    def mean_value(self, item_ids, own_value: np.ndarray | None = None) -> np.ndarray:
        """Bayesian mean (N,); ``own_value`` (N,) (NaN = none) is removed from the item's sum first."""
        idx = pd.Index(item_ids, dtype=object)
        s = self.value_sum.reindex(idx).fillna(0).to_numpy(dtype=np.float64)
        n = self.value_n.reindex(idx).fillna(0).to_numpy(dtype=np.float64)
        if own_value is not None:
            has = ~np.isnan(own_value)
            s = s - np.where(has, own_value, 0.0)
            n = n - has
        m = self.prior_weight
        denom = n + m
        # With m = 0 an unseen item has no mean: fall back to the prior mean rather than dividing by zero.
        return np.where(
            denom > 0, (s + m * self.global_mean) / np.where(denom > 0, denom, 1.0), self.global_mean
        )


def history_like_rate(history_labels, prior: float, weight: float) -> np.ndarray:
    """Smoothed like-rate (N,) of each record's history: ``(sum + weight * prior) / (len + weight)``."""
    out = np.empty(len(history_labels), dtype=np.float64)
    for i, labels in enumerate(history_labels):
        h = np.asarray(labels if labels is not None else [], dtype=np.float64)
        denom = h.size + weight
        out[i] = (h.sum() + weight * prior) / denom if denom > 0 else prior
    return out


class Baseline:
    """A scorer of (item, user like-rate) pairs; subclasses implement :meth:`score_items`.

    Attributes:
        name (str): key in reports.
        is_probability (bool): scores are P(like) in [0, 1] (log loss / accuracy are reported).
    """

    name = "baseline"
    is_probability = False

    def __init__(self, stats: ItemStats, like_prior: float, like_prior_weight: float):
        self.stats = stats
        self.like_prior = like_prior
        self.like_prior_weight = like_prior_weight

    def user_rate(self, frame: pd.DataFrame) -> np.ndarray:
        """History like-rate (N,) of each row of a task frame."""
        return history_like_rate(frame["history_labels"], self.like_prior, self.like_prior_weight)

    def score_items(self, item_ids: np.ndarray, user_rate: np.ndarray) -> np.ndarray:
        """Scores (N,) for N (item, user like-rate) pairs."""
        raise NotImplementedError

    def score_pointwise(self, frame: pd.DataFrame) -> np.ndarray:
        """Scores (N,) of a pointwise frame (item_id, history_labels)."""
        return self.score_items(frame["item_id"].astype(str).to_numpy(dtype=object), self.user_rate(frame))

    def score_candidates(self, frame: pd.DataFrame) -> list[np.ndarray]:
        """Per row, scores (N_i,) aligned with ``candidate_item_ids``; all rows scored in one call."""
        lengths = [len(c) for c in frame["candidate_item_ids"]]
        if not lengths:
            return []
        items = np.asarray([str(i) for c in frame["candidate_item_ids"] for i in c], dtype=object)
        rates = np.repeat(self.user_rate(frame), lengths)
        flat = self.score_items(items, rates)
        return np.split(flat, np.cumsum(lengths)[:-1])


class PopularityBaseline(Baseline):
    """Score = the item's interaction count in the training interactions."""

    name = "popularity"

    def score_items(self, item_ids, user_rate):
        return self.stats.popularity(item_ids)


class ItemMeanRatingBaseline(Baseline):
    """Score = the item's Bayesian mean rating ``(sum + m * mu) / (n + m)``."""

    name = "item_mean_rating"

    def score_items(self, item_ids, user_rate):
        return self.stats.mean_value(item_ids)


class UserLikeRateBaseline(Baseline):
    """Score = P(like) estimated from the record's own history labels (same for every candidate of a user)."""

    name = "user_like_rate"
    is_probability = True

    def score_items(self, item_ids, user_rate):
        return np.asarray(user_rate, dtype=np.float64)


def _features(popularity: np.ndarray, mean_value: np.ndarray, user_rate: np.ndarray) -> np.ndarray:
    """Feature matrix (N, 3): log1p(popularity), item mean, user like-rate."""
    return np.column_stack([np.log1p(np.maximum(popularity, 0.0)), mean_value, user_rate])


class LogisticRegressionBaseline(Baseline):
    """Logistic regression on the three baseline features; scores are P(like)."""

    name = "logreg"
    is_probability = True

    def fit(
        self, train_records: pd.DataFrame, fit_interactions: pd.DataFrame, c: float
    ) -> LogisticRegressionBaseline:
        """Fit on the pointwise train split with leave-one-out item features.

        Raises:
            ValueError: the train labels hold a single class.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        y = train_records["label"].to_numpy(dtype=np.int64)
        if np.unique(y).size < 2:
            raise ValueError(
                "the pointwise train split has a single label class; logistic regression needs both"
            )
        items = train_records["item_id"].astype(str).to_numpy(dtype=object)
        # Only records that really are in the fit set carry their own event in the item statistics.
        own = event_index(train_records).isin(event_index(fit_interactions))
        if self.stats.uses_rating and "rating" in train_records.columns:
            raw = train_records["rating"].to_numpy(dtype=np.float64)
        elif self.stats.uses_rating:
            raw = np.full(len(train_records), np.nan)
        else:
            raw = train_records["label"].to_numpy(dtype=np.float64)
        x = _features(
            self.stats.popularity(items, own.astype(np.float64)),
            self.stats.mean_value(items, np.where(own, raw, np.nan)),
            self.user_rate(train_records),
        )
        self.train_features = (
            x  # (N_train, 3), kept so tests and users can inspect the leave-one-out features
        )
        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
        self.model.fit(x, y)
        return self

    def score_items(self, item_ids, user_rate):
        x = _features(self.stats.popularity(item_ids), self.stats.mean_value(item_ids), user_rate)
        return self.model.predict_proba(x)[:, 1]


def fit_baselines(
    fit_interactions: pd.DataFrame,
    train_records: pd.DataFrame | None,
    config: BaselineConfig | None = None,
) -> tuple[dict[str, Baseline], list[str]]:
    """Fit every baseline.

    Args:
        fit_interactions (pd.DataFrame): training interactions from :func:`training_interactions`.
        train_records (pd.DataFrame | None): the pointwise train split (like-rate prior and logistic regression);
            None = no logistic regression and a like-rate prior of 0.5.
        config (BaselineConfig | None): priors and regularisation (defaults when None).

    Returns:
        tuple[dict[str, Baseline], list[str]]: baselines by name (popularity, item_mean_rating, user_like_rate,
        logreg when it could be fitted) and notes on what was skipped and why.
    """
    config = config or BaselineConfig()
    notes: list[str] = []
    stats = ItemStats.fit(fit_interactions, config.rating_prior_weight)
    have_train = train_records is not None and len(train_records) > 0
    prior = float(train_records["label"].mean()) if have_train else 0.5
    args = (stats, prior, config.like_prior_weight)
    baselines: dict[str, Baseline] = {
        b.name: b
        for b in (PopularityBaseline(*args), ItemMeanRatingBaseline(*args), UserLikeRateBaseline(*args))
    }
    if not have_train:
        notes.append("logreg skipped: no pointwise train split to fit it on")
    else:
        try:
            baselines["logreg"] = LogisticRegressionBaseline(*args).fit(
                train_records, fit_interactions, config.logreg_c
            )
        except ValueError as exc:
            notes.append(f"logreg skipped: {exc}")
    return baselines, notes
