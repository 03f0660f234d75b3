"""User and item texts for the two-tower retriever, and the (user text, item text) training pairs / eval queries.

Both towers are the same sentence-transformers encoder; what differs is the text it reads:

* **item text** — ``texts.item_template`` formatted from the item's row of the items table; the default ``"{text}"``
  is the one-line ``"Title (Year), Genre, Genre"`` that the schema fills in (the candidate text of the ranker
  prompts, see :mod:`recsys_slm.data.prompts`).
* **user text** — an optional profile from the users table, then the titles of the user's most recent
  ``max_history`` interactions **before the moment being predicted**: liked ones first (most recent first), then
  the disliked ones (most recent first). The text is bounded: history titles are dropped, oldest first, until it
  has at most ``max_chars`` characters (the encoder's own token limit truncates from the end, which is where the
  least useful titles are). Example::

      "User: 24, M, technician. Liked: Heat (1995); Fargo (1996). Disliked: Babe (1995)."

No leakage: a user text for a target at position ``k`` of the user's time-ordered sequence (see
:func:`recsys_slm.data.tasks.user_sequences`) is built from positions ``< k`` only, so the target (and anything
after it) is never in it. Training pairs stop before the user's first held-out event.

Splits (``split``):

* ``leave_one_out`` (default) — the held-out events are the prepared candidate task's val/test targets
  (``DATA/tasks/candidates/{val,test}.parquet``). Training pairs: every liked interaction strictly before the
  user's first held-out target. Queries: one per record of ``tasks/candidates/<split>.parquet``.
* ``temporal`` — a global time cut-off: ``T`` = the first timestamp of the pointwise val/test records
  (``DATA/tasks/pointwise``). Training pairs: liked interactions with ``timestamp < T`` that are not val/test
  records or candidate targets. Queries: the liked records of ``tasks/pointwise/<split>.parquet``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys_slm.config import check, validate_fields
from recsys_slm.data.events import candidate_target_events, event_index, task_events
from recsys_slm.data.schema import InteractionLog
from recsys_slm.data.tasks import user_sequences

Split = Literal["leave_one_out", "temporal"]
ExcludeSeen = Literal["all", "before", "none"]
AUTO = "auto"
_PROFILE_SKIP = ("user_id", "zip_code")
_USER_FIELDS = {"profile", "liked", "disliked"}


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


@dataclass
class RetrieverTextConfig:
    """How users and items become texts (``texts.*`` keys).

    Fields:
        item_template (str): item text, formatted from the items row (any column). Default ``"{text}"``
            ("Title (Year), Genre, ...").
        history_field (str): items column naming a history item in the user text. Default ``"title"``.
        max_history (int): at most this many most recent interactions feed the user text. Default 20.
        include_disliked (bool): list disliked history items after the liked ones. Default True.
        profile (str): ``"auto"`` (every users column except user_id and zip_code, "value, value, ..."), ``""``
            (none) or a template over users columns, e.g. ``"{age}-year-old {gender} {occupation}"``.
        user_template (str): fields ``{profile}`` (already followed by ". " when present), ``{liked}``,
            ``{disliked}``. Default ``"{profile}Liked: {liked}. Disliked: {disliked}."``.
        list_separator (str): between history titles. Default ``"; "``.
        empty_list (str): shown for an empty list. Default ``"none"``.
        max_chars (int): history titles are dropped (oldest first) until the user text fits. Default 1000.
        like_threshold (float | None): liked = ``rating > like_threshold``; None = the prepared data's
            ``candidates.like_threshold`` (3.0 on MovieLens).
    """

    item_template: str = "{text}"
    history_field: str = "title"
    max_history: int = 20
    include_disliked: bool = True
    profile: str = AUTO
    user_template: str = "{profile}Liked: {liked}. Disliked: {disliked}."
    list_separator: str = "; "
    empty_list: str = "none"
    max_chars: int = 1000
    like_threshold: float | None = None

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.max_history >= 0, "max_history", f"must be >= 0, got {self.max_history}")
        check(self.max_chars >= 1, "max_chars", f"must be >= 1, got {self.max_chars}")
        unknown = sorted(set(_fields(self.user_template)) - _USER_FIELDS)
        check(not unknown, "user_template", f"unknown field(s) {unknown}; allowed: {sorted(_USER_FIELDS)}")
        check(
            bool(_fields(self.item_template)),
            "item_template",
            "must use at least one items column, e.g. {text}",
        )


class _Strict(dict):
    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(str(v) for v in value)
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    return str(value)


class RetrieverTexts:
    """Renders item and user texts from an interaction log.

    Args:
        log (InteractionLog): the validated log (items and, for a profile, users).
        config (RetrieverTextConfig): templates and bounds.
        like_threshold (float): liked = ``rating > like_threshold`` (resolved; see :func:`resolve_like_threshold`).

    Raises:
        ValueError: a template uses a column the items/users table lacks, or a profile is requested and the log has
            no users table.
    """

    def __init__(self, log: InteractionLog, config: RetrieverTextConfig, like_threshold: float = 3.0):
        self.config = config
        self.like_threshold = float(like_threshold)
        items = log.items
        missing = sorted(set(_fields(config.item_template)) - set(items.columns))
        if missing:
            raise ValueError(
                f"texts.item_template uses {missing}, not columns of the items table "
                f"(columns: {', '.join(map(str, items.columns))})"
            )
        if config.history_field not in items.columns:
            raise ValueError(
                f"texts.history_field={config.history_field!r} is not a column of the items table "
                f"(columns: {', '.join(map(str, items.columns))})"
            )
        ids = items["item_id"].astype(str).tolist()
        rows = items.to_dict("records")
        self.item_ids: list[str] = ids
        self._item_text = {
            i: config.item_template.format_map(_Strict({k: _cell(v) for k, v in r.items()}))
            for i, r in zip(ids, rows, strict=True)
        }
        self._history_text = {i: _cell(r[config.history_field]) for i, r in zip(ids, rows, strict=True)}
        self._profiles: dict[str, str] = {}
        if config.profile:
            users = log.users
            if users is None:
                if config.profile != AUTO:
                    raise ValueError(
                        "texts.profile is set but the data has no users table; set texts.profile=''"
                    )
            else:
                if config.profile == AUTO:
                    cols = [c for c in users.columns if c not in _PROFILE_SKIP]
                    render = lambda r: "User: " + ", ".join(_cell(r[c]) for c in cols if _cell(r[c]))  # noqa: E731
                else:
                    missing = sorted(set(_fields(config.profile)) - set(users.columns))
                    if missing:
                        raise ValueError(
                            f"texts.profile uses {missing}, not columns of the users table "
                            f"(columns: {', '.join(map(str, users.columns))})"
                        )
                    render = lambda r: config.profile.format_map(  # noqa: E731
                        _Strict({k: _cell(v) for k, v in r.items()})
                    )
                self._profiles = {str(r["user_id"]): render(r) for r in users.to_dict("records")}

    # ------------------------------------------------------------------------------------------ items
    def item_text(self, item_id: str) -> str:
        """The text of one item. Raises KeyError naming an unknown id."""
        try:
            return self._item_text[str(item_id)]
        except KeyError:
            raise KeyError(f"item_id {item_id!r} is not in the items table") from None

    def item_texts(self, item_ids: Sequence[str]) -> list[str]:
        return [self.item_text(i) for i in item_ids]

    # ------------------------------------------------------------------------------------------ users
    def profile(self, user_id: str | None) -> str:
        if user_id is None or not self._profiles:
            return ""
        text = self._profiles.get(str(user_id), "")
        return f"{text}. " if text else ""

    def _render(self, profile: str, liked: list[str], disliked: list[str]) -> str:
        cfg = self.config
        return cfg.user_template.format(
            profile=profile,
            liked=cfg.list_separator.join(liked) or cfg.empty_list,
            disliked=cfg.list_separator.join(disliked) or cfg.empty_list,
        )

    def user_text(
        self, history_item_ids: Sequence[str], history_likes: Sequence[int], user_id: str | None = None
    ) -> str:
        """The user text from a history given **oldest first** (everything the caller passes must precede the
        moment being predicted). Uses the last ``max_history`` entries; liked titles first, most recent first.

        Raises:
            ValueError: ids and likes differ in length.
            KeyError: an unknown item id.
        """
        if len(history_item_ids) != len(history_likes):
            raise ValueError(f"{len(history_item_ids)} history items but {len(history_likes)} like labels")
        cfg = self.config
        n = len(history_item_ids)
        keep = min(n, cfg.max_history)
        recent = list(zip(history_item_ids[n - keep :], history_likes[n - keep :]))[::-1]  # most recent first
        entries = []
        for item_id, like in recent:
            if str(item_id) not in self._history_text:
                raise KeyError(f"history item_id {item_id!r} is not in the items table")
            entries.append((self._history_text[str(item_id)], int(like)))
        profile = self.profile(user_id)
        while True:
            liked = [t for t, y in entries if y]
            disliked = [t for t, y in entries if not y] if cfg.include_disliked else []
            text = self._render(profile, liked, disliked)
            if len(text) <= cfg.max_chars or not entries:
                return text[: cfg.max_chars]
            entries.pop()  # the oldest kept interaction goes first


# ---------------------------------------------------------------------------------------------- data


def resolve_like_threshold(config: RetrieverTextConfig, data_dir: str | Path | None) -> float:
    """``config.like_threshold``, else the prepared data's ``candidates.like_threshold``, else 3.0."""
    if config.like_threshold is not None:
        return float(config.like_threshold)
    if data_dir is not None:
        from recsys_slm.data.prepare import read_summary

        summary = read_summary(data_dir) or {}
        value = ((summary.get("config") or {}).get("candidates") or {}).get("like_threshold")
        if value is not None:
            return float(value)
    return 3.0


def _positions(seq: pd.DataFrame, events: pd.MultiIndex) -> np.ndarray:
    """Row numbers of ``seq`` (from :func:`user_sequences`) whose (user, item, timestamp) is in ``events``."""
    return np.flatnonzero(event_index(seq).isin(events)) if len(events) else np.zeros(0, dtype=np.int64)


def held_out_events(data_dir: str | Path, split: Split) -> pd.MultiIndex:
    """Events no training pair may use: candidate targets, plus pointwise val/test records for ``temporal``."""
    events = candidate_target_events(data_dir)
    if split == "temporal":
        for name in ("val", "test"):
            path = Path(data_dir) / "tasks" / "pointwise" / f"{name}.parquet"
            if path.is_file():
                events = events.append(
                    task_events(pd.read_parquet(path, columns=["user_id", "item_id", "timestamp"]))
                )
    return events


def temporal_cutoff(data_dir: str | Path) -> int:
    """First timestamp of the pointwise val/test records (the ``temporal`` split's cut-off).

    Raises:
        FileNotFoundError: the prepared directory has no pointwise val/test split.
    """
    stamps = []
    for name in ("val", "test"):
        path = Path(data_dir) / "tasks" / "pointwise" / f"{name}.parquet"
        if path.is_file():
            ts = pd.read_parquet(path, columns=["timestamp"])["timestamp"]
            if len(ts):
                stamps.append(int(ts.min()))
    if not stamps:
        raise FileNotFoundError(
            f"{data_dir}/tasks/pointwise/{{val,test}}.parquet missing or empty: split=temporal needs them "
            "(prepare the data with recsys-slm data prepare)"
        )
    return min(stamps)


def trainable_rows(seq: pd.DataFrame, data_dir: str | Path, split: Split) -> np.ndarray:
    """Boolean mask over ``seq`` (:func:`user_sequences`) of the interactions a model may learn from.

    ``leave_one_out``: rows before the user's first held-out event (candidate val/test targets). ``temporal``:
    rows before the cut-off that are not held out. Used for training pairs (liked rows) and for fitting the
    retrieval baselines (all rows).
    """
    held = held_out_events(data_dir, split)
    n = len(seq)
    allowed = np.ones(n, dtype=bool)
    held_rows = _positions(seq, held)
    allowed[held_rows] = False
    users = seq["user_id"].to_numpy()
    if split == "leave_one_out":
        # Nothing at or after the user's first held-out event trains.
        first_held = (
            pd.Series(seq["pos"].to_numpy()[held_rows], index=users[held_rows]).groupby(level=0).min()
        )
        limit = pd.Series(users).map(first_held).to_numpy(dtype=float)
        allowed &= seq["pos"].to_numpy() < np.nan_to_num(limit, nan=np.inf)
    else:
        allowed &= seq["timestamp"].to_numpy() < temporal_cutoff(data_dir)
    return allowed


def training_pairs(
    log: InteractionLog,
    texts: RetrieverTexts,
    data_dir: str | Path,
    split: Split = "leave_one_out",
    max_pairs_per_user: int | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """(user text, positive item text) pairs for in-batch-negative training.

    Rules (see the module docstring): a pair per liked interaction at position ``k`` of the user's sequence that is
    (leave_one_out) before the user's first held-out event, or (temporal) before the cut-off and not held out;
    the user text comes from positions ``< k``. Pairs with an empty history (a user's first interaction) are kept:
    the profile alone is the text. ``max_pairs_per_user`` keeps each user's most recent pairs;
    ``max_pairs`` then samples uniformly (``default_rng(seed)``), keeping the pairs' order.

    Returns:
        pd.DataFrame: columns user_id, item_id, timestamp, pos (position in the user's sequence), anchor (user
        text), positive (item text).
    """
    seq = user_sequences(log, texts.like_threshold)
    allowed = trainable_rows(seq, data_dir, split)
    users = seq["user_id"].to_numpy()
    allowed &= seq["like"].to_numpy() == 1
    items = seq["item_id"].to_numpy()
    likes = seq["like"].to_numpy()
    pos = seq["pos"].to_numpy()
    rows = np.flatnonzero(allowed)
    if max_pairs_per_user is not None:
        keep = pd.Series(rows).groupby(users[rows]).tail(max_pairs_per_user).to_numpy()
        rows = np.sort(keep)
    if max_pairs is not None and len(rows) > max_pairs:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_pairs, replace=False))
    anchors, positives = [], []
    h = texts.config.max_history
    for r in rows:
        lo = r - min(int(pos[r]), h)  # rows r-pos .. r-1 are the same user's earlier interactions
        anchors.append(texts.user_text(items[lo:r].tolist(), likes[lo:r].tolist(), users[r]))
        positives.append(texts.item_text(items[r]))
    return pd.DataFrame(
        {
            "user_id": users[rows].astype(str),
            "item_id": items[rows].astype(str),
            "timestamp": seq["timestamp"].to_numpy()[rows],
            "pos": pos[rows],
            "anchor": anchors,
            "positive": positives,
        }
    )


@dataclass
class Queries:
    """Evaluation queries: one per held-out target.

    Attributes:
        frame (pd.DataFrame): user_id, target_item_id, timestamp, history_item_ids, history_labels (the source
            task's own history columns, kept for the candidate file), text (the user text).
        exclude (list[set[str]]): per query, item ids removed from the ranking (never the target).
        source (Path): the task file the queries come from.
    """

    frame: pd.DataFrame
    exclude: list[set[str]]
    source: Path

    def subset(self, keep: np.ndarray) -> Queries:
        """The queries where ``keep`` (Q,) bool is True."""
        keep = np.asarray(keep, dtype=bool)
        return Queries(
            self.frame[keep].reset_index(drop=True),
            [e for e, k in zip(self.exclude, keep, strict=True) if k],
            self.source,
        )


def eval_queries(
    log: InteractionLog,
    texts: RetrieverTexts,
    data_dir: str | Path,
    split: Split = "leave_one_out",
    eval_split: Literal["val", "test"] = "test",
    exclude_seen: ExcludeSeen = "all",
    max_queries: int | None = None,
) -> Queries:
    """The held-out targets of ``eval_split`` as retrieval queries.

    The user text uses the user's interactions strictly before the target event. Excluded items:
    ``all`` — every other item the user interacted with (the candidate task's negative pool excludes the same);
    ``before`` — only items interacted with before the target (what a live system knows); both also exclude every
    listing sharing a ``canonical_item_id`` with an excluded item; ``none``. Placeholder items are always excluded; the target never is.

    Raises:
        FileNotFoundError: the task file is missing.
        ValueError: a target event is not in the interaction log.
    """
    data_dir = Path(data_dir)
    if split == "leave_one_out":
        path = data_dir / "tasks" / "candidates" / f"{eval_split}.parquet"
    else:
        path = data_dir / "tasks" / "pointwise" / f"{eval_split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"task file {path} does not exist; prepare the data with recsys-slm data prepare"
        )
    task = pd.read_parquet(path)
    if split == "temporal":
        task = task[task["label"].to_numpy() == 1].rename(columns={"item_id": "target_item_id"})
    task = task.reset_index(drop=True)
    if max_queries is not None:
        task = task.head(max_queries)
    seq = user_sequences(log, texts.like_threshold)
    events = event_index(seq)
    row_of = pd.Series(np.arange(len(seq)), index=events)
    row_of = row_of[~row_of.index.duplicated()]
    targets = event_index(task, "target_item_id")
    missing = ~targets.isin(row_of.index)
    if missing.any():
        ex = targets[missing][0]
        raise ValueError(
            f"{int(missing.sum())} target events of {path} are not in the interaction log (e.g. {ex})"
        )
    rows = row_of.reindex(targets).to_numpy(dtype=np.int64)
    items = seq["item_id"].to_numpy()
    likes = seq["like"].to_numpy()
    pos = seq["pos"].to_numpy()
    users = seq["user_id"].to_numpy()
    canon = dict(
        zip(log.items["item_id"].astype(str), log.items["canonical_item_id"].astype(str), strict=True)
    )
    listings: dict[str, set[str]] = {}
    for item_id, c in canon.items():
        listings.setdefault(c, set()).add(item_id)
    placeholders = set(log.items.loc[log.items["is_placeholder"].to_numpy(dtype=bool), "item_id"].astype(str))
    # seq is grouped by user: a user's rows run from r - pos[r] to (that start + the user's count).
    counts = seq.groupby("user_id", sort=False).size()
    h = texts.config.max_history
    text_list, exclude = [], []
    for r in rows:
        u = users[r]
        lo = r - min(int(pos[r]), h)
        text_list.append(texts.user_text(items[lo:r].tolist(), likes[lo:r].tolist(), u))
        target = str(items[r])
        start = r - int(pos[r])
        if exclude_seen == "none":
            seen: set[str] = set()
        elif exclude_seen == "before":
            seen = {str(i) for i in items[start:r]}
        else:
            seen = {str(i) for i in items[start : start + int(counts[u])]}
        if exclude_seen != "none":
            for c in {canon.get(i, i) for i in seen}:
                seen |= listings.get(c, set())
        seen |= placeholders
        seen.discard(target)
        exclude.append(seen)
    frame = pd.DataFrame(
        {
            "user_id": task["user_id"].astype(str).to_numpy(),
            "target_item_id": task["target_item_id"].astype(str).to_numpy(),
            "timestamp": task["timestamp"].to_numpy(dtype=np.int64),
            "history_item_ids": list(task["history_item_ids"]),
            "history_labels": list(task["history_labels"]),
            "text": text_list,
        }
    )
    return Queries(frame, exclude, path)
