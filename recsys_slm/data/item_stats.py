"""Train-period item statistics, added to the items table so prompts (and baselines) can state them.

A title alone tells a small LM little about an item; the classical signals that rank well on MovieLens are the
item's popularity and mean rating. ``data prepare`` therefore adds, per item, statistics computed only from
events that precede everything a model is trained or evaluated on:

* events with ``timestamp < cutoff``, where ``cutoff`` is the timestamp of the *first* pointwise train record.
  Train, val and test records all come at or after it, so no record's own rating is counted in the statistics
  its prompt shows (counting train records would put their labels into their own prompts, and train prompts
  would then differ in kind from test prompts), and
* minus the candidate task's val/test target events (leave-one-out targets are per user and may be older
  than ``cutoff``; counting them would leak the answer into the candidate prompt).

Added columns: ``stats_count`` (int64: ratings in the window), ``stats_mean_rating`` (float64, NaN if none),
``stats_like_rate`` (float64: share of likes, NaN if none) and ``rating_summary`` (str: e.g. "average rating
4.1/5 from 312 ratings" or "no ratings yet"), usable in ``prompt.candidate_template``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys_slm.data.events import event_index

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
    exclude_events: pd.MultiIndex | None = None,
    scale_max: float | None = None,
) -> pd.DataFrame:
    """Return ``items`` with the STATS_COLUMNS computed from interactions strictly before ``cutoff``.

    Args:
        items (pd.DataFrame): items table (``item_id``).
        interactions (pd.DataFrame): user_id, item_id, timestamp and ``rating`` (or ``label`` when there is no
            rating; the mean rating is then NaN and only the like rate is filled).
        cutoff (int): first timestamp NOT included (exclusive).
        like_threshold (float): a like is ``rating > like_threshold``.
        exclude_events (pd.MultiIndex | None): (user_id, item_id, timestamp) events left out (held-out targets,
            see :func:`recsys_slm.data.events.task_events`).
        scale_max (float | None): top of the rating scale, shown in ``rating_summary`` ("4.1/5").

    Returns:
        pd.DataFrame: a copy of ``items`` with the four columns added (replaced if present).
    """
    keep = interactions["timestamp"].to_numpy(dtype=np.int64) < cutoff
    if exclude_events is not None and len(exclude_events):
        keep &= ~event_index(interactions).isin(exclude_events)
    window = interactions.loc[keep]
    # Decide on the whole log, not the window: an empty window must not fall back to a missing label column.
    has_rating = "rating" in interactions.columns and interactions["rating"].notna().any()
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
