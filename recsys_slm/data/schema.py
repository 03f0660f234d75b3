"""The interaction-log schema (parquet tables) and its validation.

An interaction log is three tables (see ``docs/data.md`` for the full table of columns):

* ``interactions``: one row per event. Required ``user_id``, ``item_id``, ``timestamp`` (integer seconds since
  the epoch) and at least one feedback column: ``rating`` (numeric) and/or ``label`` (0/1).
* ``items``: one row per item. Required ``item_id``, ``title``; optional ``year`` (nullable int), ``genres``
  (list of str), ``text`` (one-line description), ``canonical_item_id`` (the id of the listing this item
  duplicates, itself otherwise) and ``is_placeholder`` (bool: not a real item, never a negative).
* ``users`` (optional): ``user_id`` plus any attribute columns.

:func:`validate_log` checks every rule, collects *all* problems and raises one :class:`DataValidationError`
listing them (or, with ``on_invalid="drop"``, drops the offending rows and counts them per reason). The
returned :class:`InteractionLog` holds normalised frames: ids as ``str``, ``timestamp`` as ``int64``, ``rating``
as ``float64``, ``label`` as ``int8``, and items always carrying every optional column (filled with defaults),
so downstream code can rely on one layout.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "interactions": ("user_id", "item_id", "timestamp"),
    "items": ("item_id", "title"),
    "users": ("user_id",),
}

# How many example rows / ids a problem message quotes.
_MAX_EXAMPLES = 3

# Order in which row-level rules run. In drop mode a row is dropped (and counted) under the first rule it
# breaks; in error mode rows stay for the later rules so every problem is reported.
DROP_REASONS = (
    "null_item_id_in_items",
    "null_title",
    "null_user_id_in_users",
    "null_user_id",
    "null_item_id",
    "null_timestamp",
    "duplicate_event",
    "unknown_item",
    "unknown_user",
    "null_rating",
    "rating_out_of_scale",
    "bad_label",
)


@dataclass
class Problem:
    """One validation finding.

    Attributes:
        file (str): the table's file name as shown to the user (e.g. ``"interactions.parquet"``).
        column (str | None): the offending column, None for table-level problems.
        rows (int): how many rows are affected (0 for structural problems such as a missing column).
        message (str): human-readable description, including the count and a few examples.
        examples (list): up to three example row positions (0-based) or ids.
    """

    file: str
    column: str | None
    rows: int
    message: str
    examples: list = field(default_factory=list)

    def __str__(self) -> str:
        where = f"{self.file}, column '{self.column}'" if self.column is not None else self.file
        return f"{where}: {self.message}"


class DataValidationError(ValueError):
    """The interaction log breaks the schema. ``.problems`` holds every problem found, one per message line."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} in the interaction log:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass
class InteractionLog:
    """A validated interaction log.

    Attributes:
        interactions (pd.DataFrame): columns ``user_id`` (str), ``item_id`` (str), ``timestamp`` (int64 seconds),
            ``rating`` (float64) and/or ``label`` (int8), plus any extra columns from the input.
        items (pd.DataFrame): ``item_id`` (str), ``title`` (str), ``year`` (Int64), ``genres`` (list[str]),
            ``text`` (str), ``canonical_item_id`` (str), ``is_placeholder`` (bool), plus extra columns.
        users (pd.DataFrame | None): ``user_id`` (str) plus attribute columns.
        dropped (dict[str, int]): rows dropped by ``on_invalid="drop"``, per reason (see ``DROP_REASONS``).
        notes (dict[str, int]): data quirks an importer fixed (e.g. ``{"placeholder_items": 1}``).
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def n_interactions(self) -> int:
        return len(self.interactions)

    @property
    def n_users(self) -> int:
        """Users in the users table when there is one, else distinct users in interactions."""
        if self.users is not None:
            return int(self.users["user_id"].nunique())
        return int(self.interactions["user_id"].nunique())

    @property
    def n_items(self) -> int:
        return len(self.items)

    def save(self, directory: str | Path) -> Path:
        """Write ``interactions.parquet``, ``items.parquet`` and (if present) ``users.parquet`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.interactions.to_parquet(directory / INTERACTIONS_FILE, index=False)
        self.items.to_parquet(directory / ITEMS_FILE, index=False)
        if self.users is not None:
            self.users.to_parquet(directory / USERS_FILE, index=False)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        rating_scale: tuple[float, float] | None = None,
        on_invalid: Literal["error", "drop"] = "error",
    ) -> InteractionLog:
        """Read the parquet tables written by :meth:`save` (users optional) and validate them.

        Raises:
            FileNotFoundError: ``interactions.parquet`` or ``items.parquet`` is missing.
            DataValidationError: the tables break the schema.
        """
        directory = Path(directory)
        users_path = directory / USERS_FILE
        return validate_paths(
            directory / INTERACTIONS_FILE,
            directory / ITEMS_FILE,
            users_path if users_path.exists() else None,
            rating_scale=rating_scale,
            on_invalid=on_invalid,
        )


# ---------------------------------------------------------------------------------------------- reading files


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table from parquet (``.parquet``/``.pq``), ``.csv`` or ``.tsv``.

    CSV/TSV cannot hold lists: a ``genres`` column there is read as ``|``-separated text and split later.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        DataValidationError: the file exists but cannot be parsed (one problem naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", quoting=csv.QUOTE_MINIMAL)
        return pd.read_parquet(path)
    except Exception as exc:  # any parser error: report it against the file, not as a traceback
        kind = suffix.lstrip(".") or "parquet"
        raise DataValidationError(
            [Problem(str(path), None, 0, f"cannot be read as {kind}: {type(exc).__name__}: {exc}")]
        ) from exc


def validate_paths(
    interactions_path: str | Path,
    items_path: str | Path,
    users_path: str | Path | None = None,
    rating_scale: tuple[float, float] | None = None,
    on_invalid: Literal["error", "drop"] = "error",
) -> InteractionLog:
    """Read and validate tables from files; messages name the files by the paths given (used by the CLI).

    Raises:
        FileNotFoundError: a file does not exist.
        DataValidationError: a file is unreadable or the tables break the schema.
    """
    files = {"interactions": str(interactions_path), "items": str(items_path)}
    interactions = read_table(interactions_path)
    items = read_table(items_path)
    users = None
    if users_path is not None:
        files["users"] = str(users_path)
        users = read_table(users_path)
    return validate_log(
        interactions, items, users, files=files, rating_scale=rating_scale, on_invalid=on_invalid
    )


# ---------------------------------------------------------------------------------------------- helpers


def _examples(index: pd.Index | np.ndarray) -> list:
    return [int(i) if isinstance(i, (int, np.integer)) else i for i in list(index[:_MAX_EXAMPLES])]


def _rows_phrase(n: int) -> str:
    return f"{n} row{'s' if n != 1 else ''}"


def _quote_ids(ids: list) -> str:
    """``'99', '98', '97', …`` (at most three ids quoted)."""
    shown = ", ".join(repr(i) for i in ids[:_MAX_EXAMPLES])
    return shown + (", …" if len(ids) > _MAX_EXAMPLES else "")


def _agree(what: str, n: int) -> str:
    """Singular verb for one row: "1 row has …", "1 row references …"."""
    if n != 1:
        return what
    verb, _, rest = what.partition(" ")
    singular = {"have": "has", "share": "shares"}.get(verb, verb + "s")
    return f"{singular} {rest}"


def _eg_rows(examples: list) -> str:
    label = "row" if len(examples) == 1 else "rows"
    return f" (e.g. {label} {', '.join(str(e) for e in examples)})" if examples else ""


def _dtype_name(s: pd.Series) -> str:
    if s.dtype == object:
        kind = pd.api.types.infer_dtype(s, skipna=True)
        return f"object ({kind})"
    return str(s.dtype)


def _is_null_id(s: pd.Series) -> pd.Series:
    """Null ids: missing values and empty / whitespace-only strings."""
    null = s.isna()
    if s.dtype == object or pd.api.types.is_string_dtype(s):
        null |= s.astype(object).map(lambda v: isinstance(v, str) and not v.strip()).astype(bool)
    return null


def _id_dtype_ok(s: pd.Series) -> bool:
    """Ids may be integers, strings, or floats holding whole numbers (an int column with nulls)."""
    if pd.api.types.is_bool_dtype(s):
        return False
    if pd.api.types.is_integer_dtype(s) or pd.api.types.is_string_dtype(s):
        return True
    if pd.api.types.is_float_dtype(s):
        v = s.dropna().to_numpy(dtype=float)
        return bool(np.all(np.mod(v, 1) == 0))
    if s.dtype == object:
        return all(
            isinstance(v, (str, int, np.integer)) and not isinstance(v, bool) for v in s.dropna().tolist()
        )
    return False


def _id_to_str(s: pd.Series) -> pd.Series:
    """Cast a valid, null-free id column to str (``12``, ``12.0`` and ``"12"`` all become ``"12"``)."""
    if pd.api.types.is_float_dtype(s):
        s = s.astype("int64")
    return s.map(lambda v: str(int(v)) if isinstance(v, (int, np.integer)) else str(v)).astype(str)


def _timestamp_kind(s: pd.Series) -> str | None:
    """'datetime', 'int' or 'float' for an accepted timestamp dtype, None otherwise."""
    if pd.api.types.is_datetime64_any_dtype(s):
        return "datetime"
    if pd.api.types.is_bool_dtype(s):
        return None
    if pd.api.types.is_integer_dtype(s):
        return "int"
    if pd.api.types.is_float_dtype(s):
        return "float"
    return None


def _timestamp_to_int(s: pd.Series) -> pd.Series:
    """Null-free timestamps → int64 seconds since the epoch (datetimes are floored to whole seconds, UTC)."""
    if pd.api.types.is_datetime64_any_dtype(s):
        if getattr(s.dt, "tz", None) is not None:
            s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        return ((s - pd.Timestamp(0)) // pd.Timedelta(seconds=1)).astype("int64")
    return s.astype("int64")


def _as_list(v: Any) -> Any:
    """A genres cell as a list of str: parquet gives numpy arrays, CSV gives ``|``-separated text."""
    if isinstance(v, np.ndarray):
        return [str(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    if isinstance(v, str):
        return [g for g in v.split("|") if g]
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return []
    return v  # anything else is flagged by the dtype check


def _item_text(title: str, year: Any, genres: list[str]) -> str:
    """One readable line describing an item: ``"The Lion King (1994), Animation, Children's, Musical"``."""
    head = title if pd.isna(year) else f"{title} ({int(year)})"
    return ", ".join([head, *genres])


class _Checker:
    """Runs the checks, accumulating problems; row-level rules drop rows from the working copies."""

    def __init__(self, files: dict[str, str], drop: bool):
        self.files = files
        self.drop = drop
        self.problems: list[Problem] = []
        self.dropped: dict[str, int] = {}
        self.broken: dict[str, set[str]] = {"interactions": set(), "items": set(), "users": set()}
        self.fatal = False  # a structural problem: raise even in drop mode

    def add(
        self,
        table: str,
        column: str | None,
        rows: int,
        message: str,
        examples: list | None = None,
        fatal: bool = True,
    ) -> None:
        self.problems.append(Problem(self.files[table], column, rows, message, examples or []))
        self.fatal |= fatal

    def structural(
        self, table: str, df: pd.DataFrame, column: str, ok: Callable[[pd.Series], bool], expected: str
    ) -> None:
        """Fatal dtype check: records a problem and marks the column broken (later row checks skip it)."""
        if column in df.columns and not ok(df[column]):
            self.add(table, column, 0, f"wrong dtype {_dtype_name(df[column])}; expected {expected}")
            self.broken[table].add(column)

    def usable(self, table: str, df: pd.DataFrame | None, *columns: str) -> bool:
        return df is not None and all(c in df.columns and c not in self.broken[table] for c in columns)

    def rows(
        self,
        table: str,
        df: pd.DataFrame,
        mask: pd.Series,
        reason: str,
        column: str | None,
        what: str,
        always_remove: bool = False,
    ) -> pd.DataFrame:
        """Record the rows flagged by ``mask`` as one problem; return the working copy for the next rules.

        In drop mode the rows leave the working copy (so each dropped row counts under one reason). In error
        mode they stay, so later rules still see them and every problem is reported, except rows removed with
        ``always_remove`` (null keys: later rules cannot interpret those rows).
        """
        n = int(mask.sum())
        if n == 0:
            return df
        ex = _examples(df.index[mask.to_numpy()])
        self.add(table, column, n, f"{_rows_phrase(n)} {_agree(what, n)}{_eg_rows(ex)}", ex, fatal=False)
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        return df[~mask.to_numpy()] if (self.drop or always_remove) else df


# ---------------------------------------------------------------------------------------------- validation


def validate_log(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame | None = None,
    *,
    files: dict[str, str] | None = None,
    rating_scale: tuple[float, float] | None = None,
    on_invalid: Literal["error", "drop"] = "error",
) -> InteractionLog:
    """Check an interaction log against the schema and return it normalised.

    Every rule is checked and all problems are reported together. Structural problems (missing required
    columns, wrong dtypes, duplicate ``item_id`` in items, duplicate ``user_id`` in users) always raise.
    Row-level problems (null ids/timestamps/titles, duplicate events, unknown items or users, null or
    out-of-scale ratings, labels not in {0, 1}) raise with ``on_invalid="error"``; with ``"drop"`` the rows are
    removed and counted per reason in ``InteractionLog.dropped``, each row under the first rule it breaks (rules
    run in the order of ``DROP_REASONS``). In error mode every rule sees every row with non-null keys, so a row
    breaking two rules is reported twice. Row numbers in messages are 0-based positions in the input table.

    Args:
        interactions (pd.DataFrame): events; see the module docstring for the columns.
        items (pd.DataFrame): item catalogue.
        users (pd.DataFrame | None): user attributes, optional.
        files (dict[str, str] | None): table name → file name used in messages (default: the table names).
        rating_scale (tuple[float, float] | None): inclusive (min, max) allowed ratings; None skips the check.
        on_invalid ("error" | "drop"): raise on row-level problems, or drop and count the rows.

    Returns:
        InteractionLog: validated, normalised tables (index reset) and the ``dropped`` counts.

    Raises:
        DataValidationError: listing every problem found.
        ValueError: ``on_invalid`` or ``rating_scale`` is malformed.
    """
    if on_invalid not in ("error", "drop"):
        raise ValueError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
    if rating_scale is not None and (len(rating_scale) != 2 or rating_scale[0] > rating_scale[1]):
        raise ValueError(f"rating_scale must be (min, max) with min <= max, got {rating_scale!r}")
    names = {"interactions": "interactions", "items": "items", "users": "users", **(files or {})}
    chk = _Checker(names, drop=on_invalid == "drop")
    # Positional index so row numbers in messages are 0-based positions in the given table.
    inter = interactions.reset_index(drop=True)
    itm = items.reset_index(drop=True)
    usr = users.reset_index(drop=True) if users is not None else None

    # --- structural: required columns, feedback column, dtypes -------------------------------------------
    for table, df in (("interactions", inter), ("items", itm), ("users", usr)):
        if df is None:
            continue
        present = ", ".join(map(str, df.columns)) or "none"
        for col in REQUIRED_COLUMNS[table]:
            if col not in df.columns:
                chk.add(table, col, 0, f"missing required column (columns present: {present})")
                chk.broken[table].add(col)
    if "rating" not in inter.columns and "label" not in inter.columns:
        chk.add(
            "interactions",
            None,
            0,
            "needs a feedback column: 'rating' (numeric) and/or 'label' (0/1) "
            f"(columns present: {', '.join(map(str, inter.columns)) or 'none'})",
        )
    id_expected = "integer or string ids"
    chk.structural("interactions", inter, "user_id", _id_dtype_ok, id_expected)
    chk.structural("interactions", inter, "item_id", _id_dtype_ok, id_expected)
    chk.structural(
        "interactions",
        inter,
        "timestamp",
        lambda s: _timestamp_kind(s) is not None,
        "integer seconds since the epoch (int, whole-number float) or datetime64",
    )
    if chk.usable("interactions", inter, "timestamp") and _timestamp_kind(inter["timestamp"]) == "float":
        frac = inter["timestamp"].notna() & (np.mod(inter["timestamp"].fillna(0), 1) != 0)
        if frac.any():
            ex = _examples(inter.index[frac.to_numpy()])
            chk.add(
                "interactions",
                "timestamp",
                int(frac.sum()),
                f"{_rows_phrase(int(frac.sum()))} have fractional seconds; expected whole seconds{_eg_rows(ex)}",
                ex,
            )
            chk.broken["interactions"].add("timestamp")
    chk.structural(
        "interactions",
        inter,
        "rating",
        lambda s: pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s),
        "a numeric rating",
    )
    chk.structural(
        "interactions",
        inter,
        "label",
        # Parquet/CSV store an integer column holding nulls as float64: accept whole-number floats so that
        # null labels become row-level problems (droppable) instead of a fatal dtype error.
        lambda s: (
            pd.api.types.is_integer_dtype(s)
            or pd.api.types.is_bool_dtype(s)
            or (pd.api.types.is_float_dtype(s) and bool(np.all(np.mod(s.dropna().to_numpy(), 1) == 0)))
        ),
        "0/1 integers or booleans",
    )
    chk.structural("items", itm, "item_id", _id_dtype_ok, id_expected)
    chk.structural(
        "items",
        itm,
        "title",
        lambda s: (
            pd.api.types.is_string_dtype(s) or pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty")
        ),
        "strings",
    )
    chk.structural(
        "items",
        itm,
        "year",
        lambda s: (
            not pd.api.types.is_bool_dtype(s)
            and (
                pd.api.types.is_integer_dtype(s)
                or (
                    pd.api.types.is_float_dtype(s)
                    and bool(np.all(np.mod(s.dropna().to_numpy(float), 1) == 0))
                )
            )
        ),
        "a nullable integer year",
    )
    if "genres" in itm.columns:
        itm["genres"] = itm["genres"].map(_as_list)
        chk.structural(
            "items",
            itm,
            "genres",
            lambda s: all(isinstance(v, list) and all(isinstance(g, str) for g in v) for v in s),
            "a list of strings per item",
        )
    chk.structural(
        "items",
        itm,
        "text",
        lambda s: (
            pd.api.types.is_string_dtype(s) or pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty")
        ),
        "strings",
    )
    chk.structural("items", itm, "canonical_item_id", _id_dtype_ok, id_expected)
    chk.structural("items", itm, "is_placeholder", pd.api.types.is_bool_dtype, "booleans")
    if usr is not None:
        chk.structural("users", usr, "user_id", _id_dtype_ok, id_expected)

    # --- items: null ids / titles (row-level), duplicate ids (structural) --------------------------------
    known_items: set[str] | None = None
    if chk.usable("items", itm, "item_id"):
        itm = chk.rows(
            "items",
            itm,
            _is_null_id(itm["item_id"]),
            "null_item_id_in_items",
            "item_id",
            "have null item ids",
            always_remove=True,
        )
        itm = itm.assign(item_id=_id_to_str(itm["item_id"]))
        dup = itm["item_id"].duplicated(keep=False)
        if dup.any():
            ids = list(dict.fromkeys(itm.loc[dup, "item_id"]))
            chk.add(
                "items",
                "item_id",
                int(dup.sum()),
                f"{_rows_phrase(int(dup.sum()))} {_agree('share', int(dup.sum()))} {len(ids)} duplicated item "
                f"id{'s' if len(ids) != 1 else ''}: {_quote_ids(ids)}; item ids must be unique",
                ids[:_MAX_EXAMPLES],
            )
        if chk.usable("items", itm, "title"):
            # In drop mode an item without a title goes, and so do its interactions (as unknown items).
            itm = chk.rows("items", itm, _is_null_id(itm["title"]), "null_title", "title", "have null titles")
        known_items = set(itm["item_id"])
        if chk.usable("items", itm, "canonical_item_id"):
            canon = itm["canonical_item_id"][~_is_null_id(itm["canonical_item_id"])]
            stray = list(dict.fromkeys(c for c in _id_to_str(canon) if c not in known_items))
            if stray:
                n = int(_id_to_str(canon).isin(stray).sum())
                chk.add(
                    "items",
                    "canonical_item_id",
                    n,
                    f"{_rows_phrase(n)} {_agree('point', n)} at {len(stray)} item id{'s' if len(stray) != 1 else ''} "
                    f"not in the table: {_quote_ids(stray)}; a canonical id must be one of the item ids",
                    stray[:_MAX_EXAMPLES],
                )

    # --- users: null ids (row-level), duplicate ids (structural) -----------------------------------------
    known_users: set[str] | None = None
    if usr is not None and chk.usable("users", usr, "user_id"):
        usr = chk.rows(
            "users",
            usr,
            _is_null_id(usr["user_id"]),
            "null_user_id_in_users",
            "user_id",
            "have null user ids",
            always_remove=True,
        )
        usr = usr.assign(user_id=_id_to_str(usr["user_id"]))
        dup = usr["user_id"].duplicated(keep=False)
        if dup.any():
            ids = list(dict.fromkeys(usr.loc[dup, "user_id"]))
            chk.add(
                "users",
                "user_id",
                int(dup.sum()),
                f"{_rows_phrase(int(dup.sum()))} {_agree('share', int(dup.sum()))} {len(ids)} duplicated user "
                f"id{'s' if len(ids) != 1 else ''}: {_quote_ids(ids)}; user ids must be unique",
                ids[:_MAX_EXAMPLES],
            )
        known_users = set(usr["user_id"])

    # --- interactions: row-level rules, in DROP_REASONS order --------------------------------------------
    if chk.usable("interactions", inter, "user_id"):
        inter = chk.rows(
            "interactions",
            inter,
            _is_null_id(inter["user_id"]),
            "null_user_id",
            "user_id",
            "have null user ids",
            always_remove=True,
        )
    if chk.usable("interactions", inter, "item_id"):
        inter = chk.rows(
            "interactions",
            inter,
            _is_null_id(inter["item_id"]),
            "null_item_id",
            "item_id",
            "have null item ids",
            always_remove=True,
        )
    if chk.usable("interactions", inter, "timestamp"):
        inter = chk.rows(
            "interactions",
            inter,
            inter["timestamp"].isna(),
            "null_timestamp",
            "timestamp",
            "have null timestamps",
            always_remove=True,
        )
    keys_ok = chk.usable("interactions", inter, "user_id", "item_id", "timestamp")
    if keys_ok:
        inter = inter.assign(
            user_id=_id_to_str(inter["user_id"]),
            item_id=_id_to_str(inter["item_id"]),
            timestamp=_timestamp_to_int(inter["timestamp"]),
        )
        dup = inter.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first")
        inter = chk.rows(
            "interactions",
            inter,
            dup,
            "duplicate_event",
            None,
            "repeat an earlier (user_id, item_id, timestamp) event",
        )
    if known_items is not None and chk.usable("interactions", inter, "item_id"):
        ids = _id_to_str(inter["item_id"])
        unknown = ~ids.isin(known_items)
        if unknown.any():
            distinct = list(dict.fromkeys(ids[unknown]))
            what = (
                f"reference {len(distinct)} item id{'s' if len(distinct) != 1 else ''} missing from "
                f"{names['items']}: {_quote_ids(distinct)}"
            )
            inter = chk.rows("interactions", inter, unknown, "unknown_item", "item_id", what)
    if known_users is not None and chk.usable("interactions", inter, "user_id"):
        ids = _id_to_str(inter["user_id"])
        unknown = ~ids.isin(known_users)
        if unknown.any():
            distinct = list(dict.fromkeys(ids[unknown]))
            what = (
                f"reference {len(distinct)} user id{'s' if len(distinct) != 1 else ''} missing from "
                f"{names['users']}: {_quote_ids(distinct)}"
            )
            inter = chk.rows("interactions", inter, unknown, "unknown_user", "user_id", what)
    has_label = "label" in inter.columns
    if chk.usable("interactions", inter, "rating"):
        # A missing rating is fine when a label carries the feedback; without a label the row says nothing.
        if not has_label:
            inter = chk.rows(
                "interactions", inter, inter["rating"].isna(), "null_rating", "rating", "have null ratings"
            )
        if rating_scale is not None:
            lo, hi = rating_scale
            r = inter["rating"]
            out = r.notna() & ((r < lo) | (r > hi))
            if out.any():
                what = (
                    f"have ratings outside the declared scale [{lo:g}, {hi:g}] "
                    f"(found min {r[out].min():g}, max {r[out].max():g})"
                )
                inter = chk.rows("interactions", inter, out, "rating_out_of_scale", "rating", what)
    if chk.usable("interactions", inter, "label"):
        lab = inter["label"]
        if pd.api.types.is_bool_dtype(lab):
            lab = lab.astype("Int8")  # True/False → 1/0 (nullable, so a missing value stays missing)
        bad = ~lab.isin([0, 1]) | lab.isna()
        if bad.any():
            found = sorted({str(v) for v in lab[bad].tolist()})[:_MAX_EXAMPLES]
            what = f"have labels not in {{0, 1}} (found {', '.join(found)})"
            inter = chk.rows("interactions", inter, bad, "bad_label", "label", what)

    if chk.fatal or (chk.problems and on_invalid == "error"):
        raise DataValidationError(chk.problems)

    return InteractionLog(
        interactions=_finish_interactions(inter),
        items=_finish_items(itm),
        users=usr.reset_index(drop=True) if usr is not None else None,
        dropped={k: v for k, v in chk.dropped.items() if v},
    )


def _finish_interactions(inter: pd.DataFrame) -> pd.DataFrame:
    """Final dtypes for a valid interactions table; required columns first."""
    inter = inter.reset_index(drop=True)
    if "rating" in inter.columns:
        inter["rating"] = inter["rating"].astype("float64")
    if "label" in inter.columns:
        inter["label"] = inter["label"].astype("int8")
    first = [c for c in ("user_id", "item_id", "timestamp", "rating", "label") if c in inter.columns]
    return inter[first + [c for c in inter.columns if c not in first]]


def _finish_items(itm: pd.DataFrame) -> pd.DataFrame:
    """Final dtypes for a valid items table, filling optional columns with defaults.

    Defaults: ``year`` null, ``genres`` empty, ``text`` = "Title (Year), genre, …", ``canonical_item_id`` = the
    item's own id, ``is_placeholder`` False.
    """
    itm = itm.reset_index(drop=True).copy()
    itm["title"] = itm["title"].astype(str)
    itm["year"] = (
        itm["year"].astype("Int64") if "year" in itm.columns else pd.array([pd.NA] * len(itm), "Int64")
    )
    if "genres" not in itm.columns:
        itm["genres"] = [[] for _ in range(len(itm))]
    if "text" not in itm.columns:
        itm["text"] = [
            _item_text(t, y, g) for t, y, g in zip(itm["title"], itm["year"], itm["genres"], strict=True)
        ]
    else:
        # Fill gaps in a partially written text column instead of leaving nulls downstream.
        fallback = [
            _item_text(t, y, g) for t, y, g in zip(itm["title"], itm["year"], itm["genres"], strict=True)
        ]
        itm["text"] = [fb if pd.isna(t) else str(t) for t, fb in zip(itm["text"], fallback, strict=True)]
    if "canonical_item_id" in itm.columns:
        canon = itm["canonical_item_id"]
        missing = _is_null_id(canon).to_numpy()
        filled = canon.astype(object).copy()
        filled[missing] = itm["item_id"][missing]  # no canonical id given: the item is its own listing
        itm["canonical_item_id"] = _id_to_str(filled)
    else:
        itm["canonical_item_id"] = itm["item_id"]
    itm["is_placeholder"] = itm["is_placeholder"].astype(bool) if "is_placeholder" in itm.columns else False
    first = ["item_id", "title", "year", "genres", "text", "canonical_item_id", "is_placeholder"]
    return itm[first + [c for c in itm.columns if c not in first]]
