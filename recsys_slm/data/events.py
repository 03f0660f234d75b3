"""Event keys: an interaction is identified by (user_id, item_id, timestamp).

Held-out events (evaluation records, leave-one-out targets) are excluded by these keys wherever training data,
item statistics or baselines are built, so nothing a model is evaluated on leaks into what it learns from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

EVENT_KEY = ("user_id", "item_id", "timestamp")


def event_index(frame: pd.DataFrame, item_col: str = "item_id") -> pd.MultiIndex:
    """(user_id, item_id, timestamp) of every row as a MultiIndex with normalised dtypes (str, str, int64)."""
    return pd.MultiIndex.from_arrays(
        [
            frame["user_id"].astype(str).to_numpy(),
            frame[item_col].astype(str).to_numpy(),
            frame["timestamp"].to_numpy(dtype=np.int64),
        ],
        names=EVENT_KEY,
    )


def task_events(frame: pd.DataFrame) -> pd.MultiIndex:
    """The (user_id, item_id, timestamp) events a task frame holds out: pointwise records or candidate targets."""
    return event_index(frame, "target_item_id" if "target_item_id" in frame.columns else "item_id")


def candidate_target_events(data_dir: str | Path) -> pd.MultiIndex:
    """The held-out targets of every split of a prepared candidate task (``DIR/tasks/candidates/*.parquet``)."""
    files = sorted((Path(data_dir) / "tasks" / "candidates").glob("*.parquet"))
    frames = [task_events(pd.read_parquet(f, columns=["user_id", "target_item_id", "timestamp"])) for f in files]
    if not frames:
        return event_index(pd.DataFrame({"user_id": [], "item_id": [], "timestamp": np.array([], dtype=np.int64)}))
    return frames[0].append(frames[1:]) if len(frames) > 1 else frames[0]
