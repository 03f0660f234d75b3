"""Task builders: the TALLRec pointwise protocol worked out by hand, and leave-one-out candidates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_slm.config import ConfigError
from recsys_slm.data.schema import validate_log
from recsys_slm.data.tasks import (
    CandidateTaskConfig,
    PointwiseTaskConfig,
    build_candidate_task,
    build_pointwise_task,
    sample_negatives,
    save_task,
)

# ------------------------------------------------------------------------------------------ pointwise log
# u1: 13 interactions, items "1".."13"; items "7" and "6" share timestamp 150 and "7" comes first in the input,
#     so the stable sort puts "7" at position 5 and "6" at position 6.
#     position: 0   1   2   3   4   5   6   7   8   9   10  11  12
#     item:     1   2   3   4   5   7   6   8   9   10  11  12  13
#     ts:       100 110 120 130 140 150 150 170 180 190 200 210 220
#     rating:   5   1   4   2   5   3   4   5   1   5   2   4   5
#     like:     1   0   1   0   1   0   1   1   0   1   0   1   1      (rating > 3)
# u2: 12 interactions, items "20".."31" (position k → item 20+k)
#     ts:       105 115 125 135 145 155 165 175 185 195 205 220
#     rating:   4   4   1   5   2   5   3   4   4   1   5   2
#     like:     1   1   0   1   0   1   0   1   1   0   1   0
U1 = [
    ("1", 100, 5), ("2", 110, 1), ("3", 120, 4), ("4", 130, 2), ("5", 140, 5), ("7", 150, 3), ("6", 150, 4),
    ("8", 170, 5), ("9", 180, 1), ("10", 190, 5), ("11", 200, 2), ("12", 210, 4), ("13", 220, 5),
]  # fmt: skip
U2_TS = [105, 115, 125, 135, 145, 155, 165, 175, 185, 195, 205, 220]
U2_RATING = [4, 4, 1, 5, 2, 5, 3, 4, 4, 1, 5, 2]


def _pointwise_log():
    rows = [("u1", i, t, r) for i, t, r in U1]
    rows += [("u2", str(20 + k), t, r) for k, (t, r) in enumerate(zip(U2_TS, U2_RATING, strict=True))]
    # Scramble the input (reversed, users interleaved) but keep "7" before "6", the tie the sort must preserve.
    order = [r for pair in zip(rows[:13][::-1], rows[13:][::-1] + [None], strict=True) for r in pair if r]
    i7, i6 = order.index(rows[5]), order.index(rows[6])
    order[min(i7, i6)], order[max(i7, i6)] = rows[5], rows[6]
    inter = pd.DataFrame(order, columns=["user_id", "item_id", "timestamp", "rating"])
    items = pd.DataFrame({"item_id": sorted({r[1] for r in rows}), "title": "t"})
    return validate_log(inter, items)


def test_pointwise_by_hand():
    # Eligible records (position >= 3): u1 positions 3..12 (10) and u2 positions 3..11 (9) = 19.
    # Global order by (timestamp, user, position); the last 10 are, oldest first:
    #   u2@175 (27), u1@180 (9), u2@185 (28), u1@190 (10), u2@195 (29), u1@200 (11), u2@205 (30), u1@210 (12),
    #   u1@220 (13), u2@220 (31)   ← the timestamp tie at 220 is broken by user_id: u1 first.
    # Split int(10*0.8)=8 / int(10*0.1)=1 / rest 1.
    frames, stats = build_pointwise_task(_pointwise_log(), PointwiseTaskConfig(history_len=3, max_records=10))
    assert stats == {"eligible_records": 19, "kept": 10, "train": 8, "val": 1, "test": 1}
    train, val, test = frames["train"], frames["val"], frames["test"]
    assert list(zip(train["user_id"], train["item_id"], strict=True)) == [
        ("u2", "27"), ("u1", "9"), ("u2", "28"), ("u1", "10"), ("u2", "29"), ("u1", "11"), ("u2", "30"), ("u1", "12"),
    ]  # fmt: skip
    assert list(zip(val["user_id"], val["item_id"], strict=True)) == [("u1", "13")]
    assert list(zip(test["user_id"], test["item_id"], strict=True)) == [("u2", "31")]
    # u1 position 8 (item 9): history = positions 5..7 = items 7, 6, 8 (the stable tie order), likes 0, 1, 1.
    rec = train.iloc[1]
    assert rec["history_item_ids"] == ["7", "6", "8"] and rec["history_labels"] == [0, 1, 1]
    assert (rec["label"], rec["rating"], rec["timestamp"]) == (0, 1.0, 180)
    assert train.iloc[0]["history_item_ids"] == ["24", "25", "26"] and train.iloc[0]["history_labels"] == [
        0,
        1,
        0,
    ]
    assert val.iloc[0]["history_item_ids"] == ["10", "11", "12"] and val.iloc[0]["history_labels"] == [
        1,
        0,
        1,
    ]
    assert val.iloc[0]["label"] == 1
    assert test.iloc[0]["history_item_ids"] == ["28", "29", "30"] and test.iloc[0]["label"] == 0
    assert list(train.columns) == [
        "user_id", "item_id", "timestamp", "label", "rating", "history_item_ids", "history_labels",
    ]  # fmt: skip
    assert train["label"].dtype == np.int8


def test_pointwise_keeps_everything_when_max_records_is_large():
    frames, stats = build_pointwise_task(
        _pointwise_log(), PointwiseTaskConfig(history_len=3, max_records=1000)
    )
    # 19 records: int(15.2)=15 train, int(1.9)=1 val, 3 test.
    assert stats == {"eligible_records": 19, "kept": 19, "train": 15, "val": 1, "test": 3}
    assert frames["train"].iloc[0][["user_id", "item_id"]].tolist() == ["u1", "4"]


def test_pointwise_uses_label_when_no_rating():
    inter = pd.DataFrame(
        {"user_id": "u", "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3], "label": [1, 0, 1]}
    )
    log = validate_log(inter, pd.DataFrame({"item_id": ["a", "b", "c"], "title": "t"}))
    frames, stats = build_pointwise_task(log, PointwiseTaskConfig(history_len=2, split=(0.0, 0.0, 1.0)))
    rec = frames["test"].iloc[0]
    assert rec["label"] == 1 and np.isnan(rec["rating"]) and rec["history_labels"] == [1, 0]
    assert stats["test"] == 1 and stats["train"] == 0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"history_len": 0}, "history_len"),
        ({"max_records": -1}, "max_records"),
        ({"split": (0.8, 0.1, 0.2)}, "split"),
        ({"split": (1.1, -0.1, 0.0)}, "split"),
        ({"split": (0.5, 0.5)}, "split"),
    ],
)
def test_pointwise_config_validation(kwargs, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        PointwiseTaskConfig(**kwargs)


# ------------------------------------------------------------------------------------------ candidates
# Catalogue: items 1..8, placeholder "P", and "D" = a second listing of item 1 (canonical id "1").
# a: interacts with 1, 2, 3, 4 → allowed negatives are exactly 5, 6, 7, 8 (not D: duplicate of seen 1; not P).
# b: never likes anything → skipped_no_positive.
# c: one like → test only, skipped_no_val_positive.
# d: interacts with 1, 5, 6, 7, 8 → allowed: 2, 3, 4 (D excluded) = 3 < 4 → skipped_too_few_negatives.
def _candidate_log():
    inter = pd.DataFrame(
        [
            ("a", "1", 10, 5), ("a", "2", 20, 4), ("a", "3", 30, 2), ("a", "4", 40, 5),
            ("b", "1", 10, 1), ("b", "2", 11, 2),
            ("c", "5", 10, 2), ("c", "6", 20, 5), ("c", "7", 30, 1),
            ("d", "1", 1, 5), ("d", "5", 2, 5), ("d", "6", 3, 5), ("d", "7", 4, 5), ("d", "8", 5, 5),
        ],
        columns=["user_id", "item_id", "timestamp", "rating"],
    )  # fmt: skip
    ids = [str(i) for i in range(1, 9)] + ["P", "D"]
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"m{i}" for i in ids],
            "canonical_item_id": [str(i) for i in range(1, 9)] + ["P", "1"],
            "is_placeholder": [False] * 8 + [True, False],
        }
    )
    return validate_log(inter, items)


def test_candidates_by_hand():
    frames, stats = build_candidate_task(
        _candidate_log(), CandidateTaskConfig(num_negatives=4, history_len=2)
    )
    assert stats == {
        "users": 4,
        "test": 2,
        "val": 1,
        "skipped_no_positive": 1,
        "skipped_no_val_positive": 1,
        "skipped_too_few_negatives": 1,
    }
    test, val = frames["test"].set_index("user_id"), frames["val"].set_index("user_id")
    # a: likes at positions 0 (1), 1 (2), 3 (4) → test target 4, val target 2.
    assert test.loc["a", "target_item_id"] == "4" and test.loc["a", "timestamp"] == 40
    assert test.loc["a", "history_item_ids"] == ["2", "3"] and test.loc["a", "history_labels"] == [1, 0]
    assert val.loc["a", "target_item_id"] == "2"
    assert val.loc["a", "history_item_ids"] == ["1"] and val.loc["a", "history_labels"] == [1]
    for rec, target in ((test.loc["a"], "4"), (val.loc["a"], "2")):
        cands, labels = rec["candidate_item_ids"], rec["candidate_labels"]
        assert sorted(cands) == sorted(["5", "6", "7", "8", target])
        assert labels[cands.index(target)] == 1 and sum(labels) == 1
    assert test.loc["c", "target_item_id"] == "6" and test.loc["c", "history_item_ids"] == ["5"]
    assert "c" not in val.index and "b" not in test.index and "d" not in test.index
    assert set(test.loc["c", "candidate_item_ids"]) <= {"1", "2", "3", "4", "8", "D", "6"}
    assert "P" not in test.loc["c", "candidate_item_ids"]


def test_candidates_deterministic_and_seed_dependent():
    log = _candidate_log()
    cfg = CandidateTaskConfig(num_negatives=3, history_len=2, seed=7)
    a, _ = build_candidate_task(log, cfg)
    b, _ = build_candidate_task(log, cfg)
    for split in ("val", "test"):
        pd.testing.assert_frame_equal(a[split], b[split])
    runs = {
        tuple(
            build_candidate_task(log, CandidateTaskConfig(num_negatives=3, seed=s))[0]["test"][
                "candidate_item_ids"
            ][0]
        )
        for s in range(8)
    }
    assert len(runs) > 1  # the seed changes negatives and/or candidate order


def test_sample_negatives():
    pool = np.array(["a", "b", "c", "d", "e"])
    got = sample_negatives(np.random.default_rng(0), {"a", "c"}, pool, 3)
    assert sorted(got) == ["b", "d", "e"]
    assert sample_negatives(np.random.default_rng(1), set(), pool, 2) == sample_negatives(
        np.random.default_rng(1), set(), pool, 2
    )
    with pytest.raises(ValueError, match="only 1 items"):
        sample_negatives(np.random.default_rng(0), {"a", "b", "c", "d"}, pool, 2)


def test_save_task_roundtrip(tmp_path):
    frames, _ = build_candidate_task(_candidate_log(), CandidateTaskConfig(num_negatives=4))
    out = save_task(frames, tmp_path / "task")
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "val.parquet"]
    back = pd.read_parquet(out / "test.parquet")
    assert [list(x) for x in back["candidate_item_ids"]] == frames["test"]["candidate_item_ids"].tolist()
