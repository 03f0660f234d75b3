"""Shared pytest fixtures. Plain conftest: add fixtures for other areas below, keep them small and offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# ------------------------------------------------------------------------------------------- data fixtures
# A tiny MovieLens-100K look-alike carrying every quirk the importers fix. Each entry: id, GroupLens title
# (with year), RecBole title, RecBole year token, genres.
ML_ITEMS = [
    ("1", "Toy Story (1995)", "Toy Story", "1995", ["Animation", "Children's", "Comedy"]),
    ("2", "Lion King, The (1994)", "Lion King, The", "1994", ["Animation", "Children's", "Musical"]),
    ("3", "unknown", "unkonwn", "unkonwn", ["unknown"]),  # the placeholder (id 267 in the real data)
    (
        "4",
        "Land Before Time III: The Time of the Great Giving (1995) (V)",
        "Land Before Time III: The Time of the Great Giving (1995)",
        "V",
        ["Animation", "Children's"],
    ),
    ("5", "Chasing Amy (1997)", "Chasing Amy", "1997", ["Drama", "Romance"]),
    ("7", "Cape Fear (1991)", "Cape Fear", "1991", ["Thriller"]),
    ("8", "Cape Fear (1962)", "Cape Fear", "1962", ["Film-Noir", "Thriller"]),  # a different film
    ("9", "Misérables, Les (1995)", "Misérables, Les", "1995", ["Drama", "War"]),
    (
        "10",
        "Star Maker, The (Uomo delle stelle, L') (1995)",
        "Star Maker, The (Uomo delle stelle, L')",
        "1995",
        ["Drama"],
    ),
    ("11", "Chasing Amy (1997)", "Chasing Amy", "1997", ["Drama", "Romance"]),  # duplicate listing of 5
]
ML_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror "
    "Musical Mystery Romance Sci-Fi Thriller War Western"
).split()
ML_USERS = [
    ("1", 24, "M", "technician", "85711"),
    ("2", 53, "F", "other", "94043"),
    ("3", 23, "M", "writer", "T8H1N"),
]
# user, item, rating, timestamp
ML_RATINGS = [
    ("1", "1", 5, 874965758),
    ("1", "2", 3, 876893171),
    ("1", "3", 4, 878542960),
    ("2", "5", 4, 888550871),
    ("2", "11", 2, 888551000),
    ("2", "9", 1, 888551234),
    ("3", "4", 5, 889237455),
    ("3", "10", 3, 889237500),
    ("3", "7", 4, 889237600),
    ("3", "8", 2, 889237700),
]


@pytest.fixture
def grouplens_dir(tmp_path: Path) -> Path:
    """A GroupLens-layout ``ml-100k`` folder (u.data, u.item latin-1, u.user) with the real quirks."""
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML_RATINGS))
    lines = []
    for item_id, gl_title, _, year, genres in ML_ITEMS:
        release = "" if gl_title == "unknown" else f"01-Jan-{year if year.isdigit() else 1995}"
        url = "" if gl_title == "unknown" else f"http://us.imdb.com/M/title-exact?{item_id}"
        flags = "|".join("1" if g in genres else "0" for g in ML_GENRES)
        lines.append(f"{item_id}|{gl_title}|{release}||{url}|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (folder / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in ML_USERS))
    return folder


@pytest.fixture
def recbole_dir(tmp_path: Path) -> Path:
    """A RecBole-layout folder (ml-100k.inter/.item/.user, ``name:type`` headers) with the same content."""
    folder = tmp_path / "recbole"
    folder.mkdir()
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ML_RATINGS]
    (folder / "ml-100k.inter").write_text("\n".join(inter) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{i}\t{title}\t{year}\t{' '.join(genres)}" for i, _, title, year, genres in ML_ITEMS]
    (folder / "ml-100k.item").write_text("\n".join(items) + "\n", encoding="utf-8")
    users = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    users += [f"{u}\t{a}\t{g}\t{o}\t{z}" for u, a, g, o, z in ML_USERS]
    (folder / "ml-100k.user").write_text("\n".join(users) + "\n")
    return folder


@pytest.fixture
def small_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A valid (interactions, items, users) triple: 3 users, 4 items, 6 ratings on a 1–5 scale."""
    interactions = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3, 3],
            "item_id": [10, 11, 10, 12, 13, 11],
            "timestamp": [100, 200, 150, 160, 300, 310],
            "rating": [5.0, 3.0, 4.0, 1.0, 2.0, 5.0],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["10", "11", "12", "13"],
            "title": ["Alpha", "Beta", "Gamma", "Delta"],
            "year": pd.array([1995, None, 1980, 2001], dtype="Int64"),
            "genres": [["Drama"], [], ["Comedy", "Drama"], ["Horror"]],
        }
    )
    users = pd.DataFrame({"user_id": ["1", "2", "3"], "age": [30, 40, 50]})
    return interactions, items, users


TINY_TITLES = ["Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "Babe", "Heat", "Fargo", "Alien",
               "Contact", "Titanic", "Scream", "Casablanca", "Braveheart", "Jurassic Park", "Forrest Gump"]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared data dir: 10 users × 12 ratings over 16 items; pointwise history 3 → 54/18/18 records.
    Treat as read-only."""
    from recsys_slm.data.prepare import DataPrepareConfig, prepare_dataset

    src = tmp_path_factory.mktemp("logs")
    rng = np.random.default_rng(0)
    genres = ["Drama", "Comedy", "Action", "Horror"]
    pd.DataFrame(
        {
            "item_id": [str(i) for i in range(len(TINY_TITLES))],
            "title": TINY_TITLES,
            "year": pd.array([1980 + i for i in range(len(TINY_TITLES))], dtype="Int64"),
            "genres": [[genres[i % 4]] for i in range(len(TINY_TITLES))],
        }
    ).to_parquet(src / "items.parquet")
    pd.DataFrame(
        {
            "user_id": [str(u) for u in range(10)],
            "age": [20 + u for u in range(10)],
            "gender": ["M", "F"] * 5,
            "occupation": ["writer", "doctor"] * 5,
        }
    ).to_parquet(src / "users.parquet")
    rows = []
    for u in range(10):
        for k, item in enumerate(rng.permutation(len(TINY_TITLES))[:12]):
            rows.append((str(u), str(item), 1000 * k + u, float(rng.integers(1, 6))))
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"]).to_parquet(
        src / "interactions.parquet"
    )
    out = tmp_path_factory.mktemp("prepared") / "data"
    cfg = DataPrepareConfig(
        dataset="logs",
        source=src,
        out=out,
        pointwise={"history_len": 3, "max_records": 1000, "split": [0.6, 0.2, 0.2]},
        candidates={"num_negatives": 3, "history_len": 3},
    )
    prepare_dataset(cfg)
    return out


# ------------------------------------------------------------------------------------------- model fixtures
# Tiny random models (recsys_slm.models.tiny): built once per session, offline, in about a second each.
@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama causal LM directory (seed 0) with the tiny ChatML tokenizer. Treat as read-only."""
    from recsys_slm.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentence-transformers directory (BERT, 64-d, mean pooling + normalize). Treat as read-only."""
    from recsys_slm.models.tiny import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder") / "model", seed=0)
