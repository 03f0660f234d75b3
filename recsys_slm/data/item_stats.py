"""Train-period item statistics, added to the items table so prompts (and baselines) can state them.

A title alone tells a small LM little about an item; the classical signals that rank well on MovieLens are the
item's popularity and mean rating. ``data prepare`` therefore adds, per item, statistics computed only from
events a model may see at training time:

* events with ``timestamp <= cutoff``, where ``cutoff`` is the timestamp of the last pointwise *train* record
  (val and test records all come later in the chronological split, so none of them is counted), and
* minus the candidate task's val/test target events (leave-one-out targets are per user and may be older
  than ``cutoff``; counting them would leak the answer into the candidate prompt).

Added columns: ``stats_count`` (int64: ratings in the window), ``stats_mean_rating`` (float64, NaN if none),
``stats_like_rate`` (float64: share of likes, NaN if none) and ``rating_summary`` (str: e.g. "average rating
4.1/5 from 312 ratings" or "no ratings yet"), usable in ``prompt.candidate_template``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

STATS_COLUMNS = ("stats_count", "stats_mean_rating", "stats_like_rate", "rating_summary")


def _summary(count: int, mean_rating: float, like_rate: float, scale_max: float | None) -> str:
    if count == 0:
        return "no ratings yet"
    noun = "rating" if count == 1 else "ratings"
    if np.isnan(mean_rating):  # label-only logs
        return f"liked in {like_rate:.0%} of {count} {noun}"
    out_of = f"/{scale_max:g}" if scale_max is not None else ""
    return f"average rating {mean_rating:.1f}{out_of} from {count} {noun}"


def add_item_statistics(
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    cutoff: int,
    like_threshold: float = 3.0,
    exclude_events: Iterable[tuple[str, str, int]] = (),
    scale_max: float | None = None,
) -> pd.DataFrame:
    """Return ``items`` with the STATS_COLUMNS computed from interactions up to ``cutoff``.

    Args:
        items (pd.DataFrame): items table (``item_id``).
        interactions (pd.DataFrame): user_id, item_id, timestamp and ``rating`` (or ``label`` when there is no
            rating; the mean rating is then NaN and only the like rate is filled).
        cutoff (int): last timestamp included (inclusive).
        like_threshold (float): a like is ``rating > like_threshold``.
        exclude_events (Iterable[tuple[str, str, int]]): (user_id, item_id, timestamp) events left out (held-out
            targets).
        scale_max (float | None): top of the rating scale, shown in ``rating_summary`` ("4.1/5").

    Returns:
        pd.DataFrame: a copy of ``items`` with the four columns added (replaced if present).
    """
    window = interactions[interactions["timestamp"] <= cutoff]
    excluded = pd.DataFrame(list(exclude_events), columns=["user_id", "item_id", "timestamp"])
    if len(excluded):
        excluded["timestamp"] = excluded["timestamp"].astype(window["timestamp"].dtype)
        keys = ["user_id", "item_id", "timestamp"]
        marker = window[keys].merge(excluded.drop_duplicates(), on=keys, how="left", indicator=True)["_merge"]
        window = window[(marker == "left_only").to_numpy()]
    has_rating = "rating" in window.columns and window["rating"].notna().any()
    liked = window["rating"] > like_threshold if has_rating else window["label"].astype(bool)
    grouped = pd.DataFrame({"item_id": window["item_id"].astype(str), "liked": liked.astype(float)})
    if has_rating:
        grouped["rating"] = window["rating"].astype(float)
    stats = grouped.groupby("item_id").agg(
        stats_count=("liked", "size"),
        stats_like_rate=("liked", "mean"),
        **({"stats_mean_rating": ("rating", "mean")} if has_rating else {}),
    )
    out = items.drop(columns=[c for c in STATS_COLUMNS if c in items.columns]).copy()
    joined = out[["item_id"]].astype(str).join(stats, on="item_id")
    out["stats_count"] = joined["stats_count"].fillna(0).astype("int64").to_numpy()
    out["stats_mean_rating"] = (
        joined["stats_mean_rating"].astype(float).to_numpy() if has_rating else np.full(len(out), np.nan)
    )
    out["stats_like_rate"] = joined["stats_like_rate"].astype(float).to_numpy()
    out["rating_summary"] = [
        _summary(int(c), float(m), float(r), scale_max)
        for c, m, r in zip(out["stats_count"], out["stats_mean_rating"], out["stats_like_rate"])
    ]
    return out


def candidate_target_events(frames: dict[str, pd.DataFrame]) -> list[tuple[str, str, int]]:
    """(user_id, item_id, timestamp) of every candidate-task target, across splits."""
    events: list[tuple[str, str, int]] = []
    for frame in frames.values():
        events += list(zip(frame["user_id"].astype(str), frame["target_item_id"].astype(str), frame["timestamp"]))
    return events
