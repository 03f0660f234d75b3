"""Item statistics shown in prompts: only events before the first train record, minus held-out targets."""

from __future__ import annotations

import math

import pandas as pd

from recsys_slm.data.events import event_index, task_events
from recsys_slm.data.item_stats import add_item_statistics

ITEMS = pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"]})
LOG = pd.DataFrame(
    {
        "user_id": ["1", "2", "3", "1", "2", "3"],
        "item_id": ["a", "a", "b", "b", "a", "c"],
        "timestamp": [10, 20, 30, 40, 50, 60],
        "rating": [5.0, 2.0, 4.0, 1.0, 5.0, 3.0],
    }
)


def test_window_is_strictly_before_cutoff_and_excludes_held_out_events():
    held_out = task_events(pd.DataFrame({"user_id": ["2"], "target_item_id": ["a"], "timestamp": [20]}))
    out = add_item_statistics(ITEMS, LOG, cutoff=40, exclude_events=held_out, scale_max=5)
    # window: ts < 40 → (1,a,5) (2,a,2) (3,b,4); (2,a,20) held out → a: [5], b: [4], c: none
    assert out["stats_count"].tolist() == [1, 1, 0]
    assert out["stats_mean_rating"].tolist()[:2] == [5.0, 4.0] and math.isnan(out["stats_mean_rating"][2])
    assert out["stats_like_rate"].tolist()[:2] == [1.0, 1.0]
    assert out["rating_summary"].tolist() == [
        "average rating 5.0/5 from 1 rating", "average rating 4.0/5 from 1 rating", "no ratings yet",
    ]  # fmt: skip


def test_label_only_logs_and_an_empty_window():
    labels = LOG.drop(columns="rating").assign(label=[1, 0, 1, 0, 1, 0])
    out = add_item_statistics(ITEMS, labels, cutoff=35)
    assert out["rating_summary"].tolist() == ["liked in 50% of 2 ratings", "liked in 100% of 1 rating", "no ratings yet"]
    empty = add_item_statistics(ITEMS, LOG, cutoff=0)  # regression: used to fall back to a missing 'label' column
    assert empty["stats_count"].tolist() == [0, 0, 0] and set(empty["rating_summary"]) == {"no ratings yet"}


def test_event_index_normalises_dtypes():
    frame = pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3.0]})
    assert list(event_index(frame)) == [("1", "2", 3)]
