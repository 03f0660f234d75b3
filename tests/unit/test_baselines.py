"""Baselines: fitted on training interactions only (no leak of val/test events), hand-computed scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_slm.config import ConfigError
from recsys_slm.evaluation.baselines import (
    BaselineConfig,
    ItemStats,
    fit_baselines,
    history_like_rate,
    task_events,
    training_interactions,
)

COLUMNS = ["user_id", "item_id", "timestamp", "rating"]
# Events before the cut-off T = 10, one train record at T, one val record at T (a tie), and test-period events of
# item "z", which exists only after the train period.
LOG = pd.DataFrame(
    [
        ("u1", "a", 1, 5.0),
        ("u1", "b", 2, 2.0),
        ("u2", "a", 3, 4.0),
        ("u2", "c", 4, 1.0),
        ("u3", "a", 5, 5.0),
        ("u3", "b", 6, 4.0),
        ("u1", "c", 10, 5.0),  # train record at T
        ("u2", "b", 10, 3.0),  # val record at T: same timestamp, not a train record
        ("u3", "z", 20, 5.0),  # test period only
        ("u1", "z", 21, 4.0),
    ],
    columns=COLUMNS,
)


def _records(rows, labels, histories):
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["label"] = labels
    frame["history_item_ids"] = [["a"] * len(h) for h in histories]
    frame["history_labels"] = histories
    return frame


TRAIN = _records(
    [("u2", "c", 4, 1.0), ("u3", "b", 6, 4.0), ("u1", "c", 10, 5.0)], [0, 0, 1], [[1, 0], [1, 1], [1, 0, 0]]
)
TEST = _records([("u3", "z", 20, 5.0), ("u2", "b", 10, 3.0)], [1, 0], [[1, 1, 0], []])


def test_training_interactions_cut_at_last_train_timestamp():
    fit = training_interactions(LOG, TRAIN)
    kept = set(zip(fit["user_id"], fit["item_id"], fit["timestamp"], strict=True))
    assert ("u1", "c", 10) in kept  # the train record at T
    assert ("u2", "b", 10) not in kept  # the val record tied at T
    assert not (fit["item_id"] == "z").any()
    assert len(fit) == 7


def test_test_only_item_gets_no_popularity():
    baselines, _ = fit_baselines(training_interactions(LOG, TRAIN), TRAIN)
    pop = baselines["popularity"].score_pointwise(TEST)
    # "z" only appears after the train period; "b" has 2 training events (its tied val event is not counted).
    assert pop.tolist() == [0.0, 2.0]
    # An unseen item gets exactly the prior mean from the rating baseline.
    mu = LOG.iloc[:7]["rating"].mean()
    assert baselines["item_mean_rating"].score_pointwise(TEST)[0] == pytest.approx(mu)


def test_exclude_drops_held_out_events():
    candidates = pd.DataFrame({"user_id": ["u1"], "target_item_id": ["a"], "timestamp": [1]})
    fit = training_interactions(LOG, TRAIN, exclude=task_events(candidates))
    assert int((fit["item_id"] == "a").sum()) == 2
    assert len(training_interactions(LOG, None)) == len(LOG)


def test_item_mean_rating_bayesian_prior_hand_computed():
    fit = training_interactions(LOG, TRAIN)
    mu = 26.0 / 7.0  # ratings 5, 2, 4, 1, 5, 4, 5
    baselines, _ = fit_baselines(fit, TRAIN, BaselineConfig(rating_prior_weight=5.0))
    frame = TEST.assign(item_id=["a", "b"])
    got = baselines["item_mean_rating"].score_pointwise(frame)
    assert got.tolist() == pytest.approx([(14 + 5 * mu) / 8, (6 + 5 * mu) / 7])
    # Zero prior weight = the plain mean.
    plain, _ = fit_baselines(fit, TRAIN, BaselineConfig(rating_prior_weight=0.0))
    assert plain["item_mean_rating"].score_pointwise(frame).tolist() == pytest.approx([14 / 3, 3.0])


def test_user_like_rate_smoothed_toward_train_rate():
    baselines, _ = fit_baselines(
        training_interactions(LOG, TRAIN), TRAIN, BaselineConfig(like_prior_weight=2.0)
    )
    p0 = 1 / 3  # train labels 0, 0, 1
    got = baselines["user_like_rate"].score_pointwise(TEST)
    assert got.tolist() == pytest.approx([(2 + 2 * p0) / 5, p0])  # empty history -> the prior
    assert history_like_rate([[1, 0]], prior=0.5, weight=0.0).tolist() == [0.5]


def test_leave_one_out_stats():
    stats = ItemStats.fit(training_interactions(LOG, TRAIN), prior_weight=0.0)
    assert stats.popularity(["c", "c"], own=np.array([1.0, 0.0])).tolist() == [1.0, 2.0]
    assert stats.mean_value(["c", "c"], own_value=np.array([5.0, np.nan])).tolist() == [1.0, 3.0]


def test_logreg_uses_leave_one_out_features_and_outputs_probabilities():
    fit = training_interactions(LOG, TRAIN)
    baselines, notes = fit_baselines(fit, TRAIN)
    assert notes == []
    lr = baselines["logreg"]
    # Train record (u1, c, 10) is in the fit set: its own event is removed from c's count (2 -> 1).
    assert lr.train_features[2, 0] == pytest.approx(np.log1p(1.0))
    p = lr.score_pointwise(TEST)
    assert p.shape == (2,) and np.all((p >= 0) & (p <= 1))
    assert lr.is_probability and not baselines["popularity"].is_probability


def test_score_candidates_aligned_with_candidate_lists():
    baselines, _ = fit_baselines(training_interactions(LOG, TRAIN), TRAIN)
    frame = pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "history_item_ids": [["a", "b"], ["c"]],
            "history_labels": [[1, 0], [1]],
            "candidate_item_ids": [["a", "z", "b"], ["c", "a"]],
            "candidate_labels": [[1, 0, 0], [0, 1]],
        }
    )
    pop = baselines["popularity"].score_candidates(frame)
    assert [s.tolist() for s in pop] == [[3.0, 0.0, 2.0], [2.0, 3.0]]
    rates = baselines["user_like_rate"].score_candidates(frame)
    assert all(np.unique(r).size == 1 for r in rates)  # constant within a user's list: ties everything
    lr = baselines["logreg"].score_candidates(frame)
    assert [len(s) for s in lr] == [3, 2]


def test_logreg_skipped_with_a_reason():
    fit = training_interactions(LOG, TRAIN)
    baselines, notes = fit_baselines(fit, None)
    assert "logreg" not in baselines and "no pointwise train split" in notes[0]
    baselines, notes = fit_baselines(fit, TRAIN.assign(label=1))
    assert "logreg" not in baselines and "single label class" in notes[0]


def test_label_only_logs_use_label_as_feedback():
    log = LOG.drop(columns="rating").assign(label=[1, 0, 1, 0, 1, 1, 1, 0, 1, 1])
    stats = ItemStats.fit(log.iloc[:7], prior_weight=0.0)
    assert not stats.uses_rating
    assert stats.mean_value(["a", "b"]).tolist() == pytest.approx([1.0, 0.5])


def test_baseline_config_validation():
    with pytest.raises(ConfigError, match="rating_prior_weight"):
        BaselineConfig(rating_prior_weight=-1)
    with pytest.raises(ConfigError, match="logreg_c"):
        BaselineConfig(logreg_c=0)
