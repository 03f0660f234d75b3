"""Transfer sets for ranker distillation: the labelled train records plus teacher-labelled user × item pairs.

Hinton et al. (2015, arXiv 1503.02531) distil on a *transfer set*; it need not carry human labels, because the
teacher supplies the targets. A recommender log has far more plausible (user, item) pairs than rated ones, so
the transfer set can be enlarged with pairs nobody labelled: for a sampled train record (user u at time t with
history h) we keep (u, t, h) and swap the item for one u never interacted with, drawn with probability
proportional to its popularity among the train records (so the extra pairs look like exposures a feed would
make, not like uniformly random obscure titles). The teacher then scores these pairs (``recsys-slm teacher
score``), and a KD objective trains on the teacher's P(yes) alone; hard-label terms skip rows without a label.

Output columns: those of the pointwise task (``user_id, item_id, timestamp, label, rating, history_item_ids,
history_labels``) plus ``source`` ("labelled" | "teacher_labelled"). ``label`` and ``rating`` are null on the
teacher-labelled rows.

Held-out data never enters: records whose event is a leave-one-out candidate target are dropped from the base
(as in teacher training), and an extra pair never uses an item the user interacted with at any time (nor a
second listing of such an item, nor a placeholder item).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_slm.config import check, validate_fields
from recsys_slm.model_dir import data_dir_or_default

SOURCE_LABELLED = "labelled"
SOURCE_TEACHER = "teacher_labelled"


@dataclass
class TransferSetConfig:
    """How to build a transfer set (``recsys-slm distill transfer-set``; keys in ``docs/distillation.md``).

    Fields:
        data_dir (Path | None): prepared data directory; default ``$RECSYS_SLM_HOME/data/movielens-100k``.
        max_labelled (int | None): keep a seeded random sample of this many labelled train records; None = all.
        extra_pairs (int): teacher-labelled (unrated) user × item pairs to add. Default 0.
        seed (int): sampling seed. Default 0.
    """

    data_dir: Path | None = None
    max_labelled: int | None = None
    extra_pairs: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        validate_fields(self)
        check(
            self.max_labelled is None or self.max_labelled > 0,
            "max_labelled",
            f"must be > 0 or null (= all records), got {self.max_labelled}",
        )
        check(self.extra_pairs >= 0, "extra_pairs", f"must be >= 0, got {self.extra_pairs}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")

    def resolved_data_dir(self) -> Path:
        return data_dir_or_default(self.data_dir)


def labelled_train_records(data_dir: Path, max_records: int | None = None, seed: int = 0) -> tuple[pd.DataFrame, int]:
    """The pointwise train records minus held-out candidate targets, optionally a seeded sample.

    Returns:
        tuple[pd.DataFrame, int]: the records (original index order) and how many were excluded as held-out
        candidate targets (116 of 942 test targets on MovieLens-100K are also pointwise train records).

    Raises:
        FileNotFoundError: ``data_dir`` is not a prepared data directory.
    """
    from recsys_slm.data.events import candidate_target_events, task_events

    path = Path(data_dir) / "tasks" / "pointwise" / "train.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: data_dir={data_dir} is not a prepared data directory "
            "(run `recsys-slm data prepare` first, or set data_dir=DIR)"
        )
    train = pd.read_parquet(path)
    held_out = task_events(train).isin(candidate_target_events(data_dir))
    train = train.loc[~held_out]
    if max_records is not None and max_records < len(train):
        # A seeded sample spans the whole training period; head() would keep only its oldest slice.
        train = train.sample(n=max_records, random_state=seed).sort_index()
    return train, int(held_out.sum())


def teacher_labelled_pairs(
    base: pd.DataFrame, interactions: pd.DataFrame, items: pd.DataFrame, n: int, seed: int
) -> pd.DataFrame:
    """``n`` unrated (user, item) pairs, each reusing the context of a base record drawn uniformly.

    Args:
        base (pd.DataFrame): labelled records (user_id, timestamp, history_item_ids, history_labels, ...).
        interactions (pd.DataFrame): the full log (user_id, item_id): every item a user ever touched is excluded.
        items (pd.DataFrame): item table with item_id, canonical_item_id, is_placeholder.
        n (int): pairs to draw.
        seed (int): the generator seed.

    Returns:
        pd.DataFrame: ``n`` rows with base's columns, ``label``/``rating`` null, distinct (user, item) pairs.

    Raises:
        ValueError: the base is empty while ``n`` > 0.
    """
    if n == 0:
        return base.iloc[:0].assign(label=pd.array([], dtype="Int8"), rating=np.array([], dtype=float))
    if len(base) == 0:
        raise ValueError("cannot draw teacher-labelled pairs: the labelled base set is empty")
    rng = np.random.default_rng(seed)
    canon = dict(zip(items["item_id"].astype(str), items["canonical_item_id"].astype(str), strict=True))
    real = items.loc[~items["is_placeholder"].to_numpy(dtype=bool), "item_id"].astype(str)
    # Popularity among the labelled records; +1 so every real item can be drawn.
    counts = base["item_id"].astype(str).value_counts()
    pool = np.asarray(sorted(real))
    weights = np.asarray([counts.get(i, 0) + 1.0 for i in pool])
    pool_canon = np.asarray([canon[i] for i in pool])
    seen_canon = (
        interactions.assign(canon=interactions["item_id"].astype(str).map(canon))
        .groupby(interactions["user_id"].astype(str))["canon"]
        .agg(set)
        .to_dict()
    )
    rows, used = [], set()
    picks = rng.integers(0, len(base), size=n)
    for row in picks:
        record = base.iloc[int(row)]
        user = str(record["user_id"])
        allowed = ~np.isin(pool_canon, list(seen_canon.get(user, set())))
        p = weights * allowed
        for _ in range(20):  # a re-draw only when the pair was already drawn for this user
            item = str(pool[rng.choice(len(pool), p=p / p.sum())])
            if (user, item) not in used:
                break
        else:
            continue
        used.add((user, item))
        rows.append({**record.to_dict(), "item_id": item})
    extra = pd.DataFrame(rows, columns=base.columns)
    extra["label"] = pd.array([pd.NA] * len(extra), dtype="Int8")
    extra["rating"] = np.nan
    return extra


def build_transfer_set(cfg: TransferSetConfig) -> tuple[pd.DataFrame, dict]:
    """Labelled base records + ``extra_pairs`` teacher-labelled pairs, with a ``source`` column.

    Returns:
        tuple[pd.DataFrame, dict]: the transfer set (fresh RangeIndex) and a summary (counts per source,
        held-out records excluded, seed).
    """
    from recsys_slm.data.schema import InteractionLog

    data_dir = cfg.resolved_data_dir()
    base, excluded = labelled_train_records(data_dir, cfg.max_labelled, cfg.seed)
    log = InteractionLog.load(data_dir)
    extra = teacher_labelled_pairs(base, log.interactions, log.items, cfg.extra_pairs, cfg.seed + 1)
    base = base.assign(label=base["label"].astype("Int8"), source=SOURCE_LABELLED)
    extra = extra.assign(source=SOURCE_TEACHER)
    frame = pd.concat([base, extra], ignore_index=True)
    summary = {
        "labelled": int(len(base)),
        "teacher_labelled": int(len(extra)),
        "teacher_labelled_requested": int(cfg.extra_pairs),
        "excluded_candidate_targets": excluded,
        "seed": cfg.seed,
        "data_dir": str(data_dir),
    }
    return frame, summary
