"""Interaction-log schema: every rule gives a clear error (file, column, row count) and drop mode counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_slm.data.schema import (
    DataValidationError,
    InteractionLog,
    Problem,
    read_table,
    validate_log,
    validate_paths,
)


def _error(*args, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        validate_log(*args, **kwargs)
    return info.value


def test_valid_log_is_normalised(small_tables):
    inter, items, users = small_tables
    log = validate_log(inter, items, users, rating_scale=(1, 5))
    assert (log.n_interactions, log.n_users, log.n_items) == (6, 3, 4)
    assert log.dropped == {}
    assert log.interactions["user_id"].tolist() == ["1", "1", "2", "2", "3", "3"]  # int ids → str
    assert log.interactions["timestamp"].dtype == np.int64
    assert log.interactions["rating"].dtype == np.float64
    # Optional item columns are always present after validation.
    assert list(log.items.columns[:7]) == [
        "item_id",
        "title",
        "year",
        "genres",
        "text",
        "canonical_item_id",
        "is_placeholder",
    ]
    assert log.items["canonical_item_id"].tolist() == ["10", "11", "12", "13"]
    assert not log.items["is_placeholder"].any()
    assert log.items["text"].tolist()[:3] == ["Alpha (1995), Drama", "Beta", "Gamma (1980), Comedy, Drama"]


def test_problem_str_names_file_column_and_rows():
    p = Problem(
        "interactions.parquet",
        "timestamp",
        3,
        "3 rows have null timestamps (e.g. rows 4, 17, 20)",
        [4, 17, 20],
    )
    assert (
        str(p)
        == "interactions.parquet, column 'timestamp': 3 rows have null timestamps (e.g. rows 4, 17, 20)"
    )
    assert str(Problem("items.parquet", None, 0, "unreadable")) == "items.parquet: unreadable"


def test_missing_required_column_lists_present_columns(small_tables):
    inter, items, _ = small_tables
    err = _error(inter.drop(columns=["timestamp"]), items, files={"interactions": "interactions.parquet"})
    (p,) = err.problems
    assert (p.file, p.column) == ("interactions.parquet", "timestamp")
    assert "missing required column" in str(err)
    assert "user_id, item_id, rating" in str(err)


def test_missing_feedback_column(small_tables):
    inter, items, _ = small_tables
    err = _error(inter.drop(columns=["rating"]), items)
    assert "'rating'" in str(err) and "'label'" in str(err)


def test_string_timestamps_are_a_dtype_error(small_tables):
    inter, items, _ = small_tables
    inter = inter.assign(timestamp=["2020-01-01"] * len(inter))
    err = _error(
        inter, items, files={"interactions": "log.csv"}, on_invalid="drop"
    )  # fatal even in drop mode
    (p,) = err.problems
    assert (p.file, p.column) == ("log.csv", "timestamp")
    assert "wrong dtype str" in p.message and "integer seconds" in p.message


def test_datetime_and_integral_float_timestamps_are_converted(small_tables):
    inter, items, _ = small_tables
    dt = inter.assign(timestamp=pd.to_datetime(inter["timestamp"], unit="s"))
    assert validate_log(dt, items).interactions["timestamp"].tolist() == inter["timestamp"].tolist()
    fl = inter.assign(timestamp=inter["timestamp"].astype(float))
    assert validate_log(fl, items).interactions["timestamp"].dtype == np.int64
    frac = inter.assign(timestamp=inter["timestamp"] + 0.5)
    assert "fractional seconds" in str(_error(frac, items))


def test_null_ids_and_timestamps_counted_with_examples(small_tables):
    inter, items, _ = small_tables
    inter = inter.astype({"timestamp": float, "user_id": object})
    inter.loc[[1, 4], "timestamp"] = np.nan
    inter.loc[5, "user_id"] = None
    err = _error(inter, items, files={"interactions": "interactions.parquet"})
    messages = [str(p) for p in err.problems]
    assert (
        "interactions.parquet, column 'timestamp': 2 rows have null timestamps (e.g. rows 1, 4)" in messages
    )
    assert "interactions.parquet, column 'user_id': 1 row has null user ids (e.g. row 5)" in messages


def test_duplicate_events(small_tables):
    inter, items, _ = small_tables
    inter = pd.concat([inter, inter.iloc[[0, 2]]], ignore_index=True)
    err = _error(inter, items)
    (p,) = err.problems
    assert p.rows == 2 and p.examples == [6, 7]
    assert "(user_id, item_id, timestamp)" in p.message


def test_unknown_items_count_rows_and_distinct_ids(small_tables):
    inter, items, _ = small_tables
    inter = pd.concat(
        [
            inter,
            pd.DataFrame(
                {"user_id": [1, 2, 3], "item_id": [99, 99, 98], "timestamp": [1, 2, 3], "rating": 3.0}
            ),
        ],
        ignore_index=True,
    )
    err = _error(inter, items, files={"interactions": "i.parquet", "items": "items.parquet"})
    (p,) = err.problems
    assert (p.file, p.column, p.rows) == ("i.parquet", "item_id", 3)
    assert (
        "3 rows reference 2 item ids missing from items.parquet: '99', '98' (e.g. rows 6, 7, 8)" == p.message
    )


def test_unknown_users_when_users_table_given(small_tables):
    inter, items, users = small_tables
    err = _error(inter, items, users.iloc[:2])
    (p,) = err.problems
    assert p.column == "user_id" and p.rows == 2 and "'3'" in p.message


def test_ratings_outside_scale_report_min_max(small_tables):
    inter, items, _ = small_tables
    inter.loc[[0, 3], "rating"] = [7.0, 0.0]
    err = _error(inter, items, rating_scale=(1, 5))
    (p,) = err.problems
    assert p.rows == 2 and p.column == "rating"
    assert "outside the declared scale [1, 5] (found min 0, max 7)" in p.message
    validate_log(inter, items)  # no scale declared: no check


def test_bad_labels(small_tables):
    inter, items, _ = small_tables
    inter = inter.drop(columns=["rating"]).assign(label=[1, 0, 2, 1, -1, 0])
    err = _error(inter, items)
    (p,) = err.problems
    assert p.rows == 2 and p.column == "label" and "not in {0, 1} (found -1, 2)" in p.message
    ok = validate_log(inter.assign(label=[True, False, True, True, False, False]), items)
    assert ok.interactions["label"].tolist() == [1, 0, 1, 1, 0, 0]


def test_float_label_is_a_dtype_error(small_tables):
    inter, items, _ = small_tables
    err = _error(inter.assign(label=0.5), items)
    assert err.problems[0].column == "label" and "wrong dtype float64" in err.problems[0].message


def test_duplicate_item_ids_raise_even_in_drop_mode(small_tables):
    inter, items, _ = small_tables
    items = pd.concat([items, items.iloc[[1]]], ignore_index=True)
    err = _error(inter, items, files={"items": "items.parquet"}, on_invalid="drop")
    (p,) = err.problems
    assert (p.file, p.column, p.rows) == ("items.parquet", "item_id", 2)
    assert p.message == "2 rows share 1 duplicated item id: '11'; item ids must be unique"


def test_duplicate_user_ids_and_null_titles(small_tables):
    inter, items, users = small_tables
    items.loc[2, "title"] = None
    users = pd.concat([users, users.iloc[[0]]], ignore_index=True)
    err = _error(inter, items, users)
    cols = {(p.file, p.column) for p in err.problems}
    assert ("items", "title") in cols and ("users", "user_id") in cols


def test_all_problems_listed_at_once(small_tables):
    inter, items, _ = small_tables
    inter = inter.astype({"timestamp": float})
    inter.loc[0, "timestamp"] = np.nan
    inter.loc[1, "item_id"] = 99
    inter.loc[2, "rating"] = 9.0
    items = items.drop(columns=["title"])
    err = _error(inter, items, rating_scale=(1, 5))
    text = str(err)
    assert text.startswith("4 problems in the interaction log:")
    assert len(text.splitlines()) == 5  # header + one line per problem
    for needle in (
        "column 'title': missing",
        "null timestamps",
        "missing from items",
        "outside the declared scale",
    ):
        assert needle in text


def test_drop_mode_counts_per_reason(small_tables):
    inter, items, _ = small_tables
    extra = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3, None],
            "item_id": [10, 99, 12, 13, 10],
            "timestamp": [100.0, 5.0, np.nan, 400.0, 1.0],
            "rating": [5.0, 3.0, 3.0, 6.0, 2.0],
        }
    )
    inter = pd.concat([inter, extra], ignore_index=True)
    log = validate_log(inter, items, rating_scale=(1, 5), on_invalid="drop")
    assert log.dropped == {
        "null_user_id": 1,
        "null_timestamp": 1,
        "duplicate_event": 1,
        "unknown_item": 1,
        "rating_out_of_scale": 1,
    }
    assert log.n_interactions == 6
    assert log.interactions.index.tolist() == list(range(6))


def test_drop_mode_null_title_cascades_to_interactions(small_tables):
    inter, items, _ = small_tables
    items.loc[0, "title"] = None  # item 10 has two interactions
    log = validate_log(inter, items, on_invalid="drop")
    assert log.dropped == {"null_title": 1, "unknown_item": 2}
    assert "10" not in set(log.items["item_id"])


def test_save_load_roundtrip(small_tables, tmp_path):
    inter, items, users = small_tables
    log = validate_log(inter, items, users)
    log.save(tmp_path / "log")
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == [
        "interactions.parquet",
        "items.parquet",
        "users.parquet",
    ]
    back = InteractionLog.load(tmp_path / "log", rating_scale=(1, 5))
    pd.testing.assert_frame_equal(back.interactions, log.interactions)
    assert back.items["genres"].tolist() == log.items["genres"].tolist()
    assert back.items["year"].dtype == "Int64" and back.n_users == 3


def test_load_names_the_parquet_file(small_tables, tmp_path):
    inter, items, _ = small_tables
    inter = inter.astype({"timestamp": float})
    inter.loc[[0, 2, 3], "timestamp"] = np.nan
    inter.to_parquet(tmp_path / "interactions.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataValidationError) as info:
        InteractionLog.load(tmp_path)
    assert f"{tmp_path / 'interactions.parquet'}, column 'timestamp': 3 rows have null timestamps" in str(
        info.value
    )
    assert "(e.g. rows 0, 2, 3)" in str(info.value)


def test_read_table_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_table(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataValidationError, match="bad.parquet: cannot be read as parquet"):
        read_table(bad)


def test_validate_paths_csv_with_pipe_genres(tmp_path):
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp,rating\n1,a,10,4\n2,a,11,2\n")
    (tmp_path / "items.tsv").write_text("item_id\ttitle\tgenres\na\tAlpha\tDrama|Comedy\n")
    log = validate_paths(tmp_path / "inter.csv", tmp_path / "items.tsv", rating_scale=(1, 5))
    assert log.items["genres"].tolist() == [["Drama", "Comedy"]]
    (tmp_path / "inter2.csv").write_text("user_id,item_id,timestamp,rating\n1,b,10,4\n")
    with pytest.raises(DataValidationError, match=r"inter2\.csv, column 'item_id': 1 row "):
        validate_paths(tmp_path / "inter2.csv", tmp_path / "items.tsv")


def test_error_mode_reports_every_rule_a_row_breaks(small_tables):
    inter, items, _ = small_tables
    inter.loc[0, ["item_id", "rating"]] = [99, 9.0]  # unknown item AND out of scale
    err = _error(inter, items, rating_scale=(1, 5))
    assert {p.column for p in err.problems} == {"item_id", "rating"}
    log = validate_log(inter, items, rating_scale=(1, 5), on_invalid="drop")
    assert log.dropped == {"unknown_item": 1}  # drop mode counts a row once, under its first reason


def test_canonical_ids_must_exist(small_tables):
    inter, items, _ = small_tables
    ok = validate_log(inter, items.assign(canonical_item_id=["10", "10", None, "13"]))
    assert ok.items["canonical_item_id"].tolist() == ["10", "10", "12", "13"]
    err = _error(inter, items.assign(canonical_item_id=["10", "77", "12", "13"]), on_invalid="drop")
    assert "at 1 item id not in the table: '77'" in str(err)


def test_null_labels_read_back_as_float_are_droppable_rows(small_tables):
    """Parquet stores an int column with nulls as float64: nulls are row problems, not a fatal dtype error."""
    inter, items, _ = small_tables
    inter = inter.drop(columns="rating").assign(label=[1.0, None, 0.0, 1.0, 0.0, 1.0])
    err = _error(inter, items)
    assert [(p.column, p.rows) for p in err.problems] == [("label", 1)]
    log = validate_log(inter, items, on_invalid="drop")
    assert log.dropped == {"bad_label": 1} and str(log.interactions["label"].dtype) == "int8"
