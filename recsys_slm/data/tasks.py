"""Deterministic task builders on an :class:`~recsys_slm.data.schema.InteractionLog`.

Two protocols (exact rules in ``docs/data.md``):

* **pointwise** (TALLRec): "will the user like this item?" given the ``history_len`` previous interactions and
  whether each was liked; the latest ``max_records`` records, split chronologically 8:1:1.
* **candidate** (leave-one-out ranking): the user's last liked item (test) or second-to-last liked item (val)
  hidden among ``num_negatives`` unseen items; the model must rank the target first.

Ordering rule shared by both: a user's interactions are sorted by ``timestamp`` with a *stable* sort, so
interactions with equal timestamps keep their order in the input table.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_slm.config import check, validate_fields
from recsys_slm.data.schema import InteractionLog

SPLITS = ("train", "val", "test")


@dataclass
class PointwiseTaskConfig:
    """TALLRec-style pointwise task.

    Attributes:
        history_len (int): previous interactions shown per record; users need more than this many.
        like_threshold (float): an interaction is liked when ``rating > like_threshold``.
        max_records (int): keep only the latest records (by timestamp) across all users.
        split (tuple[float, float, float]): train/val/test fractions, chronological, summing to 1.
    """

    history_len: int = 10
    like_threshold: float = 3.0
    max_records: int = 10000
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.history_len >= 1, "history_len", f"must be a positive integer, got {self.history_len}")
        check(self.max_records >= 1, "max_records", f"must be a positive integer, got {self.max_records}")
        check(
            len(self.split) == 3, "split", f"needs three fractions (train, val, test), got {list(self.split)}"
        )
        check(all(f >= 0 for f in self.split), "split", f"fractions must be >= 0, got {list(self.split)}")
        check(
            abs(sum(self.split) - 1.0) <= 1e-6, "split", f"fractions must sum to 1, got {sum(self.split):g}"
        )


@dataclass
class CandidateTaskConfig:
    """Leave-one-out candidate ranking task.

    Attributes:
        num_negatives (int): unseen items sampled per target (candidates = target + negatives).
        history_len (int): at most this many interactions before the target are shown.
        like_threshold (float): positives are ``rating > like_threshold``.
        seed (int): seed of ``numpy.random.default_rng`` for negatives and candidate order.
    """

    num_negatives: int = 19
    history_len: int = 10
    like_threshold: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        validate_fields(self)
        check(
            self.num_negatives >= 1, "num_negatives", f"must be a positive integer, got {self.num_negatives}"
        )
        check(self.history_len >= 1, "history_len", f"must be a positive integer, got {self.history_len}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


# ---------------------------------------------------------------------------------------------- shared


def like_labels(interactions: pd.DataFrame, like_threshold: float) -> np.ndarray:
    """Binary feedback per row (int8): ``rating > like_threshold``; rows without a rating use ``label``.

    Raises:
        ValueError: a row has neither a rating nor a label.
    """
    n = len(interactions)
    rating = (
        interactions["rating"]
        if "rating" in interactions.columns
        else pd.Series(np.nan, index=interactions.index)
    )
    liked = (rating > like_threshold).to_numpy()
    if "label" in interactions.columns:
        use_label = rating.isna().to_numpy()
        liked = np.where(use_label, interactions["label"].to_numpy() == 1, liked)
    elif rating.isna().any():
        raise ValueError(f"{int(rating.isna().sum())} of {n} interactions have neither a rating nor a label")
    return liked.astype(np.int8)


def user_sequences(log: InteractionLog, like_threshold: float) -> pd.DataFrame:
    """Interactions sorted per user by time, with a ``like`` column and the position in the user's sequence.

    Sort keys: ``user_id`` (string order), then ``timestamp``; the sort is stable, so interactions with equal
    timestamps keep their input order.

    Returns:
        pd.DataFrame: columns user_id, item_id, timestamp, rating (NaN if absent), like (int8), pos (int64:
        0-based position in the user's sequence); index 0..n-1.
    """
    inter = log.interactions
    seq = pd.DataFrame(
        {
            "user_id": inter["user_id"].to_numpy(),
            "item_id": inter["item_id"].to_numpy(),
            "timestamp": inter["timestamp"].to_numpy(dtype=np.int64),
            "rating": inter["rating"].to_numpy(dtype=float) if "rating" in inter.columns else np.nan,
            "like": like_labels(inter, like_threshold),
        }
    )
    # Two stable sorts = lexicographic (user_id, timestamp) with input order breaking ties.
    seq = (
        seq.sort_values("timestamp", kind="stable")
        .sort_values("user_id", kind="stable")
        .reset_index(drop=True)
    )
    seq["pos"] = seq.groupby("user_id", sort=False).cumcount().astype(np.int64)
    return seq


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """``n_train = int(n*f0)``, ``n_val = int(n*f1)``, test = the rest (1e-9 guards 0.7*10 = 6.999…)."""
    n_train = int(n * fractions[0] + 1e-9)
    n_val = int(n * fractions[1] + 1e-9)
    return n_train, n_val, n - n_train - n_val


# ---------------------------------------------------------------------------------------------- pointwise


def build_pointwise_task(
    log: InteractionLog, cfg: PointwiseTaskConfig
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """TALLRec protocol: one record per interaction that has at least ``history_len`` earlier ones.

    Rules: per user, interactions sorted by timestamp (stable; see :func:`user_sequences`); the interaction at
    position k >= history_len becomes a record whose history is positions k-history_len … k-1 (oldest first)
    with their like labels. Records are then sorted globally by (timestamp, user_id, k), stably, and the last
    ``max_records`` kept; in that order the first ``int(n*split[0])`` are train, the next ``int(n*split[1])``
    val, the rest test.

    Returns:
        tuple[dict[str, pd.DataFrame], dict[str, int]]: frames ``train``/``val``/``test`` with columns user_id,
        item_id, timestamp, label (int8), rating (float, NaN if absent), history_item_ids (list[str]),
        history_labels (list[int]); and stats ``eligible_records``, ``kept``, ``train``, ``val``, ``test``.
    """
    h = cfg.history_len
    seq = user_sequences(log, cfg.like_threshold)
    eligible = seq[seq["pos"] >= h]
    kept = eligible.sort_values(["timestamp", "user_id", "pos"], kind="stable").tail(cfg.max_records)
    items = seq["item_id"].to_numpy()
    likes = seq["like"].to_numpy()
    # Row r of `seq` at position pos has its history at rows r-h … r-1 (same user, since pos >= h).
    rows = kept.index.to_numpy()
    hist_items = [items[r - h : r].tolist() for r in rows]
    hist_labels = [likes[r - h : r].astype(int).tolist() for r in rows]
    records = pd.DataFrame(
        {
            "user_id": kept["user_id"].to_numpy(),
            "item_id": kept["item_id"].to_numpy(),
            "timestamp": kept["timestamp"].to_numpy(dtype=np.int64),
            "label": kept["like"].to_numpy(dtype=np.int8),
            "rating": kept["rating"].to_numpy(dtype=float),
            "history_item_ids": hist_items,
            "history_labels": hist_labels,
        }
    )
    n_train, n_val, n_test = _split_sizes(len(records), cfg.split)
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, len(records)),
    }
    frames = {name: records.iloc[a:b].reset_index(drop=True) for name, (a, b) in bounds.items()}
    stats = {
        "eligible_records": len(eligible),
        "kept": len(records),
        "train": n_train,
        "val": n_val,
        "test": n_test,
    }
    return frames, stats


# ---------------------------------------------------------------------------------------------- candidates


def _in_set(pool: np.ndarray, ids: set[str]) -> np.ndarray:
    """Boolean mask of ``pool`` entries in ``ids``. Compared as Python strings: casting ``ids`` to the pool's
    fixed-width string dtype would truncate longer ids and match unrelated items."""
    return np.fromiter((str(x) in ids for x in pool), dtype=bool, count=len(pool))


def sample_negatives(rng: np.random.Generator, excluded: set[str], pool: np.ndarray, n: int) -> list[str]:
    """Draw ``n`` distinct items uniformly from ``pool`` minus ``excluded``.

    The draw is one ``rng.choice(..., replace=False)`` over the allowed items in ``pool`` order, so a fixed
    pool order and seed give a fixed result. (The retriever stage can replace this with a retriever's top-K
    "hard" negatives; keep the same exclusion rules when doing so.)

    Args:
        rng (np.random.Generator): the random generator (advanced by the call).
        excluded (set[str]): ids that must not be drawn (seen items, their duplicate listings, ...).
        pool (np.ndarray[str]): candidate ids, shape (n_pool,), in a fixed order.
        n (int): how many to draw.

    Raises:
        ValueError: fewer than ``n`` items are allowed.
    """
    pool = np.asarray(pool)
    allowed = pool[~_in_set(pool, excluded)] if excluded else pool
    if len(allowed) < n:
        raise ValueError(f"only {len(allowed)} items are allowed as negatives, {n} requested")
    picked = rng.choice(len(allowed), size=n, replace=False)
    return [str(x) for x in allowed[picked]]


def build_candidate_task(
    log: InteractionLog, cfg: CandidateTaskConfig
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Leave-one-out candidate ranking records: per user one ``test`` and one ``val`` record.

    Rules: per user (users in sorted string order; interactions sorted as in :func:`user_sequences`) the last
    liked interaction is the test target and the second-to-last liked one the val target. History = up to
    ``history_len`` interactions strictly before the target in the sequence, oldest first, with like labels.
    Negatives are drawn by :func:`sample_negatives` from the item catalogue (sorted ids) minus placeholder
    items, items the user ever interacted with (also after the target) and every item whose
    ``canonical_item_id`` equals that of an item the user interacted with (so a second listing of a seen
    movie is never a negative). One ``default_rng(seed)`` serves all users in order: per user, test negatives,
    test shuffle, val negatives, val shuffle. The candidate list (target + negatives) is shuffled so the
    target's position is random.

    Users are skipped and counted: no liked interaction (``skipped_no_positive``); fewer allowed items than
    ``num_negatives`` (``skipped_too_few_negatives``, both records); exactly one liked interaction gives a test
    record only (``skipped_no_val_positive``).

    Returns:
        tuple[dict[str, pd.DataFrame], dict[str, int]]: frames ``val``/``test`` with columns user_id,
        target_item_id, timestamp, history_item_ids (list[str]), history_labels (list[int]),
        candidate_item_ids (list[str]), candidate_labels (list[int], 1 for the target); stats ``users``,
        ``test``, ``val``, ``skipped_no_positive``, ``skipped_no_val_positive``, ``skipped_too_few_negatives``.
    """
    seq = user_sequences(log, cfg.like_threshold)
    items = log.items
    canon = dict(zip(items["item_id"], items["canonical_item_id"], strict=True))
    real = items[~items["is_placeholder"].to_numpy(dtype=bool)]
    pool = np.array(sorted(real["item_id"]), dtype=str)
    # canonical id → every listing sharing it, to exclude duplicates of seen items.
    listings: dict[str, list[str]] = {}
    for item_id, c in canon.items():
        listings.setdefault(c, []).append(item_id)
    rng = np.random.default_rng(cfg.seed)
    out: dict[str, list[dict]] = {"val": [], "test": []}
    stats = {
        "users": 0,
        "test": 0,
        "val": 0,
        "skipped_no_positive": 0,
        "skipped_no_val_positive": 0,
        "skipped_too_few_negatives": 0,
    }
    for user_id, user in seq.groupby("user_id", sort=True):
        stats["users"] += 1
        u_items = user["item_id"].to_numpy()
        u_likes = user["like"].to_numpy()
        u_ts = user["timestamp"].to_numpy()
        positives = np.flatnonzero(u_likes == 1)
        if len(positives) == 0:
            stats["skipped_no_positive"] += 1
            continue
        excluded = set(u_items)
        for c in {canon.get(i, i) for i in u_items}:
            excluded.update(listings.get(c, ()))
        if int((~_in_set(pool, excluded)).sum()) < cfg.num_negatives:
            stats["skipped_too_few_negatives"] += 1
            continue
        targets = [("test", positives[-1])]
        if len(positives) >= 2:
            targets.append(("val", positives[-2]))
        else:
            stats["skipped_no_val_positive"] += 1
        for split, k in targets:
            negatives = sample_negatives(rng, excluded, pool, cfg.num_negatives)
            candidates = [str(u_items[k]), *negatives]
            labels = [1] + [0] * len(negatives)
            order = rng.permutation(len(candidates))
            lo = max(0, k - cfg.history_len)
            out[split].append(
                {
                    "user_id": str(user_id),
                    "target_item_id": str(u_items[k]),
                    "timestamp": int(u_ts[k]),
                    "history_item_ids": [str(i) for i in u_items[lo:k]],
                    "history_labels": u_likes[lo:k].astype(int).tolist(),
                    "candidate_item_ids": [candidates[i] for i in order],
                    "candidate_labels": [labels[i] for i in order],
                }
            )
            stats[split] += 1
    columns = [
        "user_id",
        "target_item_id",
        "timestamp",
        "history_item_ids",
        "history_labels",
        "candidate_item_ids",
        "candidate_labels",
    ]
    frames = {}
    for split, rows in out.items():
        df = pd.DataFrame(rows, columns=columns)
        df["timestamp"] = df["timestamp"].astype(np.int64)
        frames[split] = df
    return frames, stats


# ---------------------------------------------------------------------------------------------- output


def save_task(frames: dict[str, pd.DataFrame], out_dir: str | Path) -> Path:
    """Write ``{split}.parquet`` for every split in ``frames`` into ``out_dir`` (created if needed).

    Each file is written to a temporary name and renamed, so a crash never leaves a truncated parquet.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, df in frames.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{split}.", suffix=".parquet", dir=out_dir)
        os.close(fd)
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, out_dir / f"{split}.parquet")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out_dir
