"""Candidate-ranking metrics with binary relevance: NDCG@K, Recall@K (= HitRate@K with one target), MRR@K.

Definitions (one query = one candidate list of one user; R = its relevant candidates, ``label == 1``; r = the
1-based rank of a candidate after sorting):

* ``recall@k = |{i in R : r_i <= k}| / |R|`` — with one target this is HitRate@K.
* ``mrr@k = 1 / min_{i in R} r_i`` if that rank is ``<= k``, else 0.
* ``ndcg@k = DCG@k / IDCG@k`` with ``DCG@k = sum_{i in R, r_i <= k} 1 / log2(r_i + 1)`` and ``IDCG@k`` the DCG of
  ``min(|R|, k)`` relevant items at ranks 1, 2, ...; with one target ``ndcg@k = 1 / log2(r + 1)`` if r <= k.
* Averages are per user: each user's queries are averaged first, then users are averaged with equal weight
  (the standard leave-one-out tasks have one query per user, so this is the plain mean over queries).

**Tie rule.** Candidates are sorted by score descending, then by ``item_id`` ascending in Python string
order (Unicode code points, so ``"10" < "9"``). The rule is deterministic and does not depend on candidate
order in the input. trec_eval breaks ties the other way (docno *descending*), so the TREC export writes
strictly decreasing scores derived from these ranks (see :mod:`recsys_slm.evaluation.exports`).

References:
    LlamaRec (Yue et al., arXiv 2311.02089): Recall/NDCG/MRR @{1, 5, 10} on 20 leave-one-out candidates.
    RecBole ``recbole/evaluator/metrics.py``: binary NDCG with IDCG over min(|R|, K) ideal hits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
METRIC_NAMES = ("ndcg", "recall", "mrr")


def candidate_ranks(scores, item_ids) -> np.ndarray:
    """1-based rank of every candidate of one query under the tie rule (score desc, then item_id asc).

    Args:
        scores (array (N,)): candidate scores, larger = better.
        item_ids (sequence (N,) of str): candidate ids, unique within the query.

    Returns:
        np.ndarray (N,) int64: ``ranks[j]`` is the rank of candidate ``j`` (1 = best); a permutation of 1..N.

    Raises:
        ValueError: length mismatch, NaN scores or duplicate item ids.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ids = np.asarray([str(i) for i in item_ids], dtype=object)
    if s.shape[0] != ids.shape[0]:
        raise ValueError(f"{s.shape[0]} scores for {ids.shape[0]} candidates")
    if np.isnan(s).any():
        raise ValueError("candidate scores contain NaN; cannot rank")
    if len(set(ids.tolist())) != ids.shape[0]:
        raise ValueError("duplicate item ids in one candidate list; each candidate must appear once")
    # Rank of each id in string order, so lexsort needs only numeric keys (last key = primary key).
    id_order = np.argsort(ids, kind="stable")
    id_codes = np.empty(ids.shape[0], dtype=np.int64)
    id_codes[id_order] = np.arange(ids.shape[0])
    order = np.lexsort((id_codes, -s))
    ranks = np.empty(s.shape[0], dtype=np.int64)
    ranks[order] = np.arange(1, s.shape[0] + 1)
    return ranks


def rank_of_targets(
    scores_list: Sequence, labels_list: Sequence, item_ids_list: Sequence
) -> list[np.ndarray]:
    """Ranks of the relevant candidates of every query.

    Args:
        scores_list (Q sequences (N_q,)): candidate scores per query.
        labels_list (Q sequences (N_q,)): 0/1 relevance per candidate (1 = held-out target).
        item_ids_list (Q sequences (N_q,)): candidate ids per query (break score ties).

    Returns:
        list[np.ndarray]: per query, the sorted 1-based ranks of its relevant candidates, shape (|R_q|,).

    Raises:
        ValueError: mismatched lengths, or a query without any relevant candidate (its metrics are undefined).
    """
    if not (len(scores_list) == len(labels_list) == len(item_ids_list)):
        raise ValueError(
            f"got {len(scores_list)} score lists, {len(labels_list)} label lists, {len(item_ids_list)} id lists"
        )
    out = []
    for q, (scores, labels, ids) in enumerate(zip(scores_list, labels_list, item_ids_list, strict=True)):
        y = np.asarray(labels).reshape(-1)
        if y.shape[0] != len(ids):
            raise ValueError(f"query {q}: {y.shape[0]} labels for {len(ids)} candidates")
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"query {q}: labels must be 0/1")
        if not y.any():
            raise ValueError(f"query {q}: no relevant candidate (label 1); ranking metrics are undefined")
        ranks = candidate_ranks(scores, ids)
        out.append(np.sort(ranks[y == 1]))
    return out


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def recall_at_k(ranks_list: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Per-query recall@k = hits in the top k / |R|, shape (Q,). ``ranks_list`` from :func:`rank_of_targets`."""
    _check_k(k)
    return np.array([np.count_nonzero(np.asarray(r) <= k) / len(r) for r in ranks_list], dtype=np.float64)


def mrr_at_k(ranks_list: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Per-query reciprocal rank of the first relevant candidate if it is in the top k, else 0; shape (Q,)."""
    _check_k(k)
    return np.array([1.0 / np.min(r) if np.min(r) <= k else 0.0 for r in ranks_list], dtype=np.float64)


def ndcg_at_k(ranks_list: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Per-query binary NDCG@k (log2(rank + 1) discount, IDCG over min(|R|, k) hits); shape (Q,)."""
    _check_k(k)
    out = np.empty(len(ranks_list), dtype=np.float64)
    for q, r in enumerate(ranks_list):
        r = np.asarray(r)
        dcg = float(np.sum(1.0 / np.log2(r[r <= k] + 1.0)))
        idcg = float(np.sum(1.0 / np.log2(np.arange(1, min(len(r), k) + 1) + 1.0)))
        out[q] = dcg / idcg
    return out


def user_means(values, user_ids: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Each user's mean over their queries.

    Args:
        values (array (Q,)): one value per query.
        user_ids (sequence (Q,)): the user of each query.

    Returns:
        (np.ndarray (U,) of str, np.ndarray (U,) float64): the users (sorted, as str) and their means.

    Raises:
        ValueError: length mismatch.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    users = np.asarray([str(u) for u in user_ids], dtype=object)
    if users.shape[0] != v.shape[0]:
        raise ValueError(f"{users.shape[0]} user ids for {v.shape[0]} values")
    uniq, inverse = np.unique(users, return_inverse=True)
    n = len(uniq)
    return uniq, np.bincount(inverse, weights=v, minlength=n) / np.bincount(inverse, minlength=n)


def per_user_mean(values, user_ids: Sequence | None = None) -> float:
    """Mean over users of the mean over each user's queries (plain mean when ``user_ids`` is None).

    Args:
        values (array (Q,)): one value per query.
        user_ids (sequence (Q,) | None): the user of each query.

    Returns:
        float: the per-user average, NaN for no queries.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return math.nan
    if user_ids is None:
        return float(v.mean())
    return float(np.mean(user_means(v, user_ids)[1]))


_PER_QUERY = {"ndcg": ndcg_at_k, "recall": recall_at_k, "mrr": mrr_at_k}


def ranking_metrics(
    scores_list: Sequence,
    labels_list: Sequence,
    item_ids_list: Sequence,
    ks: Sequence[int] = DEFAULT_KS,
    user_ids: Sequence | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """NDCG, Recall and MRR at every k, averaged per user, as ``{f"{prefix}{name}@{k}": value}``.

    Args:
        scores_list (Q sequences (N_q,)): candidate scores per query.
        labels_list (Q sequences (N_q,)): 0/1 relevance per candidate.
        item_ids_list (Q sequences (N_q,)): candidate ids per query (tie-breaking).
        ks (sequence of int): cut-offs, default (1, 5, 10).
        user_ids (sequence (Q,) | None): user of each query, for the per-user average.
        prefix (str): prepended to every key.

    Returns:
        dict[str, float]: e.g. ``{"ndcg@1": ..., "ndcg@5": ..., "recall@10": ..., "mrr@10": ...}``.
    """
    return metrics_from_ranks(rank_of_targets(scores_list, labels_list, item_ids_list), ks, user_ids, prefix)


def metrics_from_ranks(
    ranks: Sequence[np.ndarray], ks: Sequence[int] = DEFAULT_KS, user_ids: Sequence | None = None, prefix: str = ""
) -> dict[str, float]:
    """:func:`ranking_metrics` from already computed :func:`rank_of_targets` output."""
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        for k in ks:
            out[f"{prefix}{name}@{k}"] = per_user_mean(_PER_QUERY[name](ranks, k), user_ids)
    return out
