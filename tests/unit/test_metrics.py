"""Metrics pinned to hand-computed cases and to naive definitions (pairwise AUC, sort-based ranking)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys_slm.metrics import (
    accuracy,
    auc,
    candidate_ranks,
    log_loss,
    mrr_at_k,
    ndcg_at_k,
    per_user_mean,
    pointwise_metrics,
    rank_of_targets,
    ranking_metrics,
    recall_at_k,
)

# ------------------------------------------------------------------------------------------- pointwise


def naive_auc(labels, scores) -> float:
    """AUC from its definition: P(s_pos > s_neg) + 0.5 P(s_pos == s_neg) over all (pos, neg) pairs."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_computed():
    # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, 0.1) win, (0.8, 0.4) win -> 3/4.
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_ties_get_half_credit():
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert auc([0, 1, 1, 0], [3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.5)
    # pos 2 vs neg {1, 2}: win + tie = 1.5; pos 1 vs neg {1, 2}: tie + loss = 0.5 -> 2 / 4.
    assert auc([1, 1, 0, 0], [2, 1, 1, 2]) == pytest.approx(0.5)
    assert auc([1, 0, 0], [2, 2, 1]) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_naive_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=60)
    scores = rng.integers(0, 6, size=60).astype(float)  # few distinct values: many ties
    assert auc(labels, scores) == pytest.approx(naive_auc(labels, scores), abs=1e-12)


def test_auc_single_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="entries"):
        auc([0, 1], [0.1])


def test_log_loss_hand_computed_and_clipped():
    expected = -(math.log(0.8) + math.log(0.7)) / 2
    assert log_loss([1, 0], [0.8, 0.3]) == pytest.approx(expected)
    # p = 0 for a positive is clipped to 1e-7 instead of giving infinity.
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert log_loss([0], [1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_accuracy_threshold_is_inclusive():
    assert accuracy([1, 0], [0.5, 0.49]) == 1.0
    assert accuracy([1, 0, 1, 0], [0.9, 0.9, 0.1, 0.1]) == 0.5
    assert accuracy([1, 0], [0.6, 0.6], threshold=0.7) == 0.5


def test_pointwise_metrics_keys_and_non_probability_scores():
    m = pointwise_metrics([0, 1, 1], [1.0, 5.0, 3.0], prefix="val_")
    assert set(m) == {"val_auc", "val_log_loss", "val_accuracy", "val_n", "val_positive_rate"}
    assert m["val_auc"] == 1.0 and m["val_n"] == 3
    assert math.isnan(m["val_log_loss"]) and math.isnan(m["val_accuracy"])


# ------------------------------------------------------------------------------------------- ranking


def naive_ranks(scores, item_ids):
    """Sort by (score desc, item_id asc) with Python's sort: the documented tie rule, written plainly."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), str(item_ids[j])))
    ranks = [0] * len(scores)
    for position, j in enumerate(order, start=1):
        ranks[j] = position
    return ranks


def naive_query_metrics(ranks_rel, k):
    """Binary NDCG/Recall/MRR@k of one query from the relevant items' ranks, written from the definitions."""
    dcg = sum(1 / math.log2(r + 1) for r in ranks_rel if r <= k)
    idcg = sum(1 / math.log2(i + 1) for i in range(1, min(len(ranks_rel), k) + 1))
    first = min(ranks_rel)
    return dcg / idcg, sum(r <= k for r in ranks_rel) / len(ranks_rel), (1 / first if first <= k else 0.0)


def test_single_target_hand_computed():
    # Ranking: b (0.9), c (0.5), a (0.1): the target c is at rank 2.
    ranks = rank_of_targets([[0.1, 0.9, 0.5]], [[0, 0, 1]], [["a", "b", "c"]])
    assert [r.tolist() for r in ranks] == [[2]]
    assert ndcg_at_k(ranks, 1)[0] == 0.0
    assert ndcg_at_k(ranks, 5)[0] == pytest.approx(1 / math.log2(3))
    assert recall_at_k(ranks, 1)[0] == 0.0 and recall_at_k(ranks, 2)[0] == 1.0
    assert mrr_at_k(ranks, 1)[0] == 0.0 and mrr_at_k(ranks, 5)[0] == 0.5


def test_ties_broken_by_item_id_ascending_regardless_of_input_order():
    # All scores equal: order is a, b, c by id, so the target c is at rank 3 whatever the input order.
    for ids, labels in (
        (["b", "a", "c"], [0, 0, 1]),
        (["c", "b", "a"], [1, 0, 0]),
        (["a", "c", "b"], [0, 1, 0]),
    ):
        assert rank_of_targets([[1.0, 1.0, 1.0]], [labels], [ids])[0].tolist() == [3]
    # Partial tie: 0.7 > 0.5 = 0.5; among the tied pair "x" < "y".
    assert candidate_ranks([0.5, 0.7, 0.5], ["y", "z", "x"]).tolist() == [3, 1, 2]


def test_tie_rule_uses_string_order_not_numeric():
    # "10" < "9" as strings: with equal scores item "10" ranks first.
    assert candidate_ranks([0.0, 0.0], ["9", "10"]).tolist() == [2, 1]


def test_k_cutoffs_single_target():
    ranks = [np.array([1]), np.array([5]), np.array([6]), np.array([10]), np.array([11])]
    assert recall_at_k(ranks, 1).tolist() == [1, 0, 0, 0, 0]
    assert recall_at_k(ranks, 5).tolist() == [1, 1, 0, 0, 0]
    assert recall_at_k(ranks, 10).tolist() == [1, 1, 1, 1, 0]
    assert mrr_at_k(ranks, 5).tolist() == pytest.approx([1, 0.2, 0, 0, 0])
    assert mrr_at_k(ranks, 10).tolist() == pytest.approx([1, 0.2, 1 / 6, 0.1, 0])
    assert ndcg_at_k(ranks, 10).tolist() == pytest.approx(
        [1, 1 / math.log2(6), 1 / math.log2(7), 1 / math.log2(11), 0]
    )


def test_multiple_relevant_idcg_over_min_r_k():
    ranks = [np.array([1, 3])]
    assert recall_at_k(ranks, 2)[0] == 0.5
    assert mrr_at_k(ranks, 2)[0] == 1.0
    # k = 1: one ideal hit, one actual hit.
    assert ndcg_at_k(ranks, 1)[0] == pytest.approx(1.0)
    # k = 2: DCG = 1; IDCG = 1 + 1/log2(3).
    assert ndcg_at_k(ranks, 2)[0] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    # k = 5: DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3).
    assert ndcg_at_k(ranks, 5)[0] == pytest.approx(1.5 / (1 + 1 / math.log2(3)))


@pytest.mark.parametrize("seed", range(4))
def test_ranking_metrics_match_naive_reference(seed):
    rng = np.random.default_rng(seed)
    scores, labels, ids = [], [], []
    for _ in range(30):
        n = int(rng.integers(3, 25))
        ids.append([str(x) for x in rng.choice(1000, size=n, replace=False)])
        scores.append(rng.integers(0, 4, size=n).astype(float))  # heavy ties
        y = np.zeros(n, dtype=int)
        y[rng.choice(n, size=int(rng.integers(1, 3)), replace=False)] = 1
        labels.append(y)
    got = ranking_metrics(scores, labels, ids, ks=(1, 5, 10))
    for k in (1, 5, 10):
        per_query = []
        for s, y, i in zip(scores, labels, ids, strict=True):
            r = naive_ranks(s, i)
            per_query.append(naive_query_metrics([r[j] for j in range(len(y)) if y[j]], k))
        ndcg, recall, mrr = (float(np.mean(v)) for v in zip(*per_query, strict=True))
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12)
        assert got[f"recall@{k}"] == pytest.approx(recall, abs=1e-12)
        assert got[f"mrr@{k}"] == pytest.approx(mrr, abs=1e-12)


def test_ranking_metrics_keys_prefix_and_per_user_average():
    # Queries: u (hit at 1), u (miss), v (hit at 1). Per user: u = 0.5, v = 1 -> 0.75 (per query it is 2/3).
    scores = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    labels = [[1, 0], [1, 0], [1, 0]]
    ids = [["a", "b"]] * 3
    m = ranking_metrics(scores, labels, ids, ks=(1,), user_ids=["u", "u", "v"], prefix="test_")
    assert set(m) == {"test_ndcg@1", "test_recall@1", "test_mrr@1"}
    assert m["test_recall@1"] == pytest.approx(0.75)
    assert ranking_metrics(scores, labels, ids, ks=(1,))["recall@1"] == pytest.approx(2 / 3)
    assert per_user_mean([1.0, 0.0, 1.0], ["u", "u", "v"]) == pytest.approx(0.75)


def test_ranking_rejects_undefined_queries():
    with pytest.raises(ValueError, match="no relevant"):
        rank_of_targets([[0.1, 0.2]], [[0, 0]], [["a", "b"]])
    with pytest.raises(ValueError, match="duplicate"):
        candidate_ranks([0.1, 0.2], ["a", "a"])
    with pytest.raises(ValueError, match="NaN"):
        candidate_ranks([0.1, float("nan")], ["a", "b"])
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k([np.array([1])], 0)


def test_ranking_metrics_agree_with_ranx_on_tie_free_runs():
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(7)
    scores, labels, ids, run, qrels = [], [], [], {}, {}
    for q in range(20):
        n = 20
        item_ids = [f"i{x}" for x in rng.choice(500, size=n, replace=False)]
        s = rng.permutation(n).astype(float)  # distinct scores: ranx and recsys_slm must agree exactly
        y = np.zeros(n, dtype=int)
        y[int(rng.integers(n))] = 1
        scores.append(s)
        labels.append(y)
        ids.append(item_ids)
        run[f"q{q}"] = {i: float(v) for i, v in zip(item_ids, s, strict=True)}
        qrels[f"q{q}"] = {i: int(r) for i, r in zip(item_ids, y, strict=True) if r}
    ours = ranking_metrics(scores, labels, ids, ks=(1, 5, 10))
    theirs = ranx.evaluate(
        ranx.Qrels(qrels), ranx.Run(run), ["ndcg@10", "mrr@10", "recall@10", "ndcg@5", "recall@1"]
    )
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-9), key
