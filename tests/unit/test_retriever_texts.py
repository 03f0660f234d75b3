"""Retriever texts: user/item rendering, no leakage of the held-out target, split rules, exclusions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_slm.config import ConfigError
from recsys_slm.data.events import candidate_target_events, event_index
from recsys_slm.data.schema import InteractionLog, validate_log
from recsys_slm.data.tasks import user_sequences
from recsys_slm.retriever.texts import (
    RetrieverTextConfig,
    RetrieverTexts,
    eval_queries,
    resolve_like_threshold,
    temporal_cutoff,
    training_pairs,
)


@pytest.fixture(scope="module")
def setup(tiny_data_dir):
    log = InteractionLog.load(tiny_data_dir)
    cfg = RetrieverTextConfig()
    return log, RetrieverTexts(log, cfg, resolve_like_threshold(cfg, tiny_data_dir))


def _titles(log):
    return dict(zip(log.items["item_id"], log.items["title"], strict=True))


def test_item_and_user_text_format(setup):
    log, texts = setup
    assert texts.item_text("0") == "Toy Story (1980), Drama"
    # oldest first in, most recent first out; liked before disliked; profile from the users table
    text = texts.user_text(["0", "1", "2", "3"], [1, 0, 1, 0], user_id="3")
    assert text == "User: 23, F, doctor. Liked: Four Rooms; Toy Story. Disliked: Get Shorty; GoldenEye."
    assert texts.user_text([], [], user_id=None) == "Liked: none. Disliked: none."
    with pytest.raises(KeyError, match="'999' is not in the items table"):
        texts.user_text(["999"], [1])


def test_user_text_is_bounded(setup):
    log, _ = setup
    ids = [str(i) for i in range(16)]
    short = RetrieverTexts(log, RetrieverTextConfig(max_history=3, profile=""), 3.0)
    assert short.user_text(ids, [1] * 16) == "Liked: Forrest Gump; Jurassic Park; Braveheart. Disliked: none."
    capped = RetrieverTexts(log, RetrieverTextConfig(max_chars=60, profile=""), 3.0)
    text = capped.user_text(ids, [1] * 16)
    assert len(text) <= 60 and text.startswith("Liked: Forrest Gump; Jurassic Park")  # oldest dropped first
    no_dislikes = RetrieverTexts(log, RetrieverTextConfig(include_disliked=False, profile=""), 3.0)
    assert "GoldenEye" not in no_dislikes.user_text(["0", "1"], [1, 0])


def test_config_errors_name_the_key(setup):
    log, _ = setup
    with pytest.raises(ConfigError, match="config key 'user_template'"):
        RetrieverTextConfig(user_template="{profile}{candidate}")
    with pytest.raises(ConfigError, match="config key 'max_history'"):
        RetrieverTextConfig(max_history=-1)
    with pytest.raises(ValueError, match="texts.item_template uses \\['plot'\\]"):
        RetrieverTexts(log, RetrieverTextConfig(item_template="{title}: {plot}"), 3.0)
    with pytest.raises(ValueError, match="texts.profile uses \\['income'\\]"):
        RetrieverTexts(log, RetrieverTextConfig(profile="{income}"), 3.0)


def test_eval_queries_never_contain_the_target(setup, tiny_data_dir):
    log, texts = setup
    titles = _titles(log)
    seq = user_sequences(log, 3.0)
    for split in ("test", "val"):
        q = eval_queries(log, texts, tiny_data_dir, eval_split=split)
        assert len(q.frame) == len(
            pd.read_parquet(tiny_data_dir / "tasks" / "candidates" / f"{split}.parquet")
        )
        for row, excluded in zip(q.frame.itertuples(), q.exclude, strict=True):
            # every user rates an item once in the fixture, so the target's title must not be in the text
            assert titles[row.target_item_id] not in row.text
            user = seq[seq["user_id"] == row.user_id]
            before = user[user["timestamp"] < row.timestamp]
            # the text is built from the most recent interactions before the target only
            latest = titles[before["item_id"].iloc[-1]] if len(before) else None
            assert latest is None or latest in row.text
            after = user[user["timestamp"] > row.timestamp]["item_id"].map(titles)
            assert not any(t in row.text for t in after)
            assert row.target_item_id not in excluded
            assert set(user["item_id"]) - {row.target_item_id} <= excluded  # exclude_seen="all"


def test_training_pairs_stop_before_the_held_out_targets(setup, tiny_data_dir):
    log, texts = setup
    titles = _titles(log)
    pairs = training_pairs(log, texts, tiny_data_dir)
    assert len(pairs) > 10
    held = candidate_target_events(tiny_data_dir)
    assert not event_index(pairs).isin(held).any()
    seq = user_sequences(log, 3.0)
    first_held = seq[event_index(seq).isin(held)].groupby("user_id")["pos"].min()
    for row in pairs.itertuples():
        assert row.pos < first_held[row.user_id]
        assert titles[row.item_id] not in row.anchor  # the positive is never in its own user text
        assert row.positive == texts.item_text(row.item_id)
    liked = seq.set_index(["user_id", "item_id"])["like"]
    assert all(liked[(u, i)] == 1 for u, i in zip(pairs["user_id"], pairs["item_id"], strict=True))
    capped = training_pairs(log, texts, tiny_data_dir, max_pairs_per_user=1, max_pairs=4, seed=1)
    assert len(capped) == 4 and capped["user_id"].is_unique


def test_temporal_split(setup, tiny_data_dir):
    log, texts = setup
    cutoff = temporal_cutoff(tiny_data_dir)
    pairs = training_pairs(log, texts, tiny_data_dir, split="temporal")
    assert len(pairs) and (pairs["timestamp"] < cutoff).all()
    q = eval_queries(log, texts, tiny_data_dir, split="temporal")
    test = pd.read_parquet(tiny_data_dir / "tasks" / "pointwise" / "test.parquet")
    assert len(q.frame) == int((test["label"] == 1).sum())
    assert (q.frame["timestamp"] >= cutoff).all()


def test_exclusion_modes_and_duplicate_listings():
    interactions = pd.DataFrame(
        {
            "user_id": ["u"] * 4,
            "item_id": ["a", "b", "c", "d"],
            "timestamp": [1, 2, 3, 4],
            "rating": [5.0, 5, 5, 1],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "a2", "e", "p"],
            "title": ["A", "B", "C", "D", "A", "E", "unknown"],
            "canonical_item_id": ["a", "b", "c", "d", "a", "e", "p"],
            "is_placeholder": [False] * 6 + [True],
        }
    )
    log = validate_log(interactions, items)
    texts = RetrieverTexts(log, RetrieverTextConfig(profile=""), 3.0)
    import tempfile
    from pathlib import Path

    from recsys_slm.data.tasks import CandidateTaskConfig, build_candidate_task, save_task

    with tempfile.TemporaryDirectory() as tmp:
        frames, _ = build_candidate_task(log, CandidateTaskConfig(num_negatives=1))
        save_task(frames, Path(tmp) / "tasks" / "candidates")
        got = {}
        for mode in ("all", "before", "none"):
            got[mode] = eval_queries(log, texts, tmp, exclude_seen=mode).exclude[0]
    # test target = c (last liked); d comes after it
    assert got["all"] == {"a", "a2", "b", "d", "p"}
    assert got["before"] == {"a", "a2", "b", "p"}
    assert got["none"] == {"p"}  # placeholders are never retrievable
    assert np.all(["c" not in g for g in got.values()])
