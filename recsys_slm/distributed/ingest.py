"""Ray Data ingestion: interaction logs as any number of parquet files → validated rows → pointwise records.

Two streamed stages, neither of which gathers the log on the driver:

1. **read + validate**: one Ray Data task per file (local paths, directories, or any pyarrow filesystem URI
   such as ``s3://bucket/logs/``) streams it in record batches tagged with their path; each batch is checked by
   :func:`recsys_slm.data.schema.validate_log`, the single-process validation itself, once per source file in
   the batch, so errors name the file and the column exactly as ``recsys-slm data prepare`` does (row numbers
   are positions within the batch read from that file). Known item / user ids come from the catalogue
   (``items``/``users`` tables), validated once on the driver. ``on_invalid="drop"`` drops and counts rows per
   reason instead of raising.
2. **records**: ``groupby("user_id").map_groups`` gathers each user's events (from every file), checks
   duplicate events across files with the same validation, and builds TALLRec pointwise records with
   :func:`recsys_slm.data.tasks.build_pointwise_task` (every interaction with at least ``history_len`` earlier
   ones becomes a record: user, item, timestamp, label, rating, history ids and like labels). These (user,
   history, item) pairs are what the teacher scores; prompts are rendered from them by whoever tokenises.

:func:`ingest_records` writes the records as parquet files into a directory, atomically (a rerun reuses a
finished directory with the same inputs), and reports rows/s.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from recsys_slm.data.schema import InteractionLog, validate_log

logger = logging.getLogger(__name__)

PATH_COLUMN = "path"  # the source file of each row, added by read_file_batches
RECORD_COLUMNS = (
    "user_id", "item_id", "timestamp", "label", "rating", "history_item_ids", "history_labels", "source",
)  # fmt: skip
META_FILE = "_ingest.json"


def record_schema():
    """Arrow schema of the pointwise records (the layout of ``tasks/pointwise/*.parquet`` plus ``source``)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("timestamp", pa.int64()),
            ("label", pa.int8()),
            ("rating", pa.float64()),
            ("history_item_ids", pa.list_(pa.string())),
            ("history_labels", pa.list_(pa.int64())),
            ("source", pa.string()),
        ]
    )


@dataclass
class IngestConfig:
    """What to ingest.

    Attributes:
        interactions (list[str]): parquet files, directories (searched recursively for ``*.parquet``) or
            pyarrow URIs (``s3://``, ``gs://``, ``hdfs://``, ``file://``), all on one filesystem.
        items (str): the items table (parquet/CSV path or URI): item ids, titles.
        users (str | None): the users table, when there is one (unknown user ids are then errors).
        history_len (int): history per record.
        like_threshold (float): liked when ``rating > like_threshold`` (rows without a rating use ``label``).
        rating_scale (tuple[float, float] | None): inclusive allowed ratings; None skips the check.
        on_invalid ("error" | "drop"): raise on bad rows, or drop and count them.
    """

    interactions: list[str]
    items: str
    users: str | None = None
    history_len: int = 10
    like_threshold: float = 3.0
    rating_scale: tuple[float, float] | None = None
    on_invalid: Literal["error", "drop"] = "error"


# ------------------------------------------------------------------------------------------------ files
def resolve_files(specs: list[str]):
    """Expand files / directories / URIs into a sorted list of parquet files on one filesystem.

    Returns:
        tuple[pyarrow.fs.FileSystem, list[str]]: the filesystem and the file paths on it.

    Raises:
        FileNotFoundError: a path does not exist or a directory holds no parquet file.
        ValueError: no input, or inputs on different filesystems.
    """
    import pyarrow.fs as pafs

    if not specs:
        raise ValueError("no interaction-log input given")
    fs_type, fs, files = None, None, []
    for spec in specs:
        spec = str(spec)
        if "://" in spec:
            this_fs, path = pafs.FileSystem.from_uri(spec)
        else:
            this_fs, path = pafs.LocalFileSystem(), str(Path(spec).expanduser().resolve())
        if fs_type is not None and this_fs.type_name != fs_type:
            raise ValueError(
                f"interaction-log inputs must share one filesystem: {spec} is on {this_fs.type_name}, not {fs_type}"
            )
        fs_type, fs = this_fs.type_name, this_fs
        info = this_fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{spec}: file not found")
        if info.type == pafs.FileType.Directory:
            found = [
                f.path
                for f in this_fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if f.type == pafs.FileType.File
                and f.base_name.endswith((".parquet", ".pq"))
                and not f.base_name.startswith(("_", "."))
            ]
            if not found:
                raise FileNotFoundError(f"{spec}: no parquet files in this directory")
            files += sorted(found)
        else:
            files.append(path)
    return fs, files


def count_rows(fs, files: list[str]) -> int:
    """Rows of the parquet ``files`` from their footers (no data read)."""
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        with fs.open_input_file(path) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def read_any(spec: str) -> pd.DataFrame:
    """A small table (items, users) from a local path (parquet/CSV/TSV, as the schema reads them) or a URI."""
    from recsys_slm.data.schema import read_table

    if "://" not in str(spec):
        return read_table(spec)
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = pafs.FileSystem.from_uri(str(spec))
    return pq.read_table(path, filesystem=fs).to_pandas()


def load_catalog(items: str, users: str | None = None) -> InteractionLog:
    """Validate the items (and users) tables once, with an empty interactions table.

    Returns:
        InteractionLog: normalised ``items`` / ``users`` (no interactions).

    Raises:
        DataValidationError: the tables break the schema (the message names the files).
    """
    empty = pd.DataFrame(
        {
            "user_id": pd.Series([], dtype=object),
            "item_id": pd.Series([], dtype=object),
            "timestamp": pd.Series([], dtype="int64"),
            "rating": pd.Series([], dtype="float64"),
        }
    )
    files = {"interactions": "interactions", "items": str(items)}
    users_frame = None
    if users is not None:
        files["users"] = str(users)
        users_frame = read_any(users)
    return validate_log(empty, read_any(items), users_frame, files=files)


# ------------------------------------------------------------------------------------------------ stages
class _Counts:
    """A Ray actor summing dropped-row counts per reason across tasks (drop mode only)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def validate_batch(
    batch: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame | None,
    files: dict[str, str],
    rating_scale: tuple[float, float] | None,
    on_invalid: str,
    counter=None,
) -> pd.DataFrame:
    """Stage 1 on one batch: :func:`validate_log` per source file; the ``path`` column is kept.

    Raises:
        DataValidationError: naming the source file (and the items/users files) and the columns.
    """
    out, dropped = [], {}
    for path, part in batch.groupby(PATH_COLUMN, sort=False):
        log = validate_log(
            part.drop(columns=PATH_COLUMN).reset_index(drop=True), items, users,
            files={**files, "interactions": str(path)}, rating_scale=rating_scale, on_invalid=on_invalid,
        )  # fmt: skip
        for key, value in log.dropped.items():
            dropped[key] = dropped.get(key, 0) + value
        out.append(log.interactions.assign(**{PATH_COLUMN: str(path)}))
    if dropped and counter is not None:
        # wait for the actor: a fire-and-forget call can still be in flight when the driver reads the totals
        # (calls from different processes are not ordered), and the count would be lost
        import ray

        ray.get(counter.add.remote(dropped))
    if not out:
        return batch.iloc[:0]
    return pd.concat(out, ignore_index=True)


def user_records(group: pd.DataFrame, history_len: int, like_threshold: float, on_invalid: str, counter=None):
    """Stage 2 on one user's events: cross-file duplicate check, then the user's pointwise records.

    Returns:
        pyarrow.Table: the records in :func:`record_schema` (possibly empty).

    Raises:
        DataValidationError: duplicate (user_id, item_id, timestamp) events, naming the files involved.
    """
    import pyarrow as pa

    from recsys_slm.data.tasks import PointwiseTaskConfig, build_pointwise_task

    paths = sorted(set(group[PATH_COLUMN].astype(str)))
    inter = group.drop(columns=PATH_COLUMN).reset_index(drop=True)
    if inter.duplicated(subset=["user_id", "item_id", "timestamp"]).any():
        # The schema's own rule and wording; only the user's items are needed as the catalogue here.
        ids = pd.unique(inter["item_id"])
        catalogue = pd.DataFrame({"item_id": ids, "title": ids})
        log = validate_log(inter, catalogue, None, files={"interactions": " + ".join(paths), "items": "items"},
                           on_invalid=on_invalid)  # fmt: skip
        if log.dropped and counter is not None:
            import ray

            ray.get(counter.add.remote(log.dropped))  # waited for, as in validate_batch
        inter = log.interactions
    log = InteractionLog(interactions=inter, items=pd.DataFrame({"item_id": [], "title": []}))
    task_cfg = PointwiseTaskConfig(
        history_len=history_len,
        like_threshold=like_threshold,
        max_records=max(1, len(inter)),
        split=(1.0, 0.0, 0.0),
    )
    records = build_pointwise_task(log, task_cfg)[0]["train"].assign(source="labelled")
    if records.empty:  # too short a history: no record (an empty frame has no list dtypes to convert)
        return record_schema().empty_table()
    return pa.Table.from_pandas(records[list(RECORD_COLUMNS)], schema=record_schema(), preserve_index=False)


def read_file_batches(batch: dict[str, Any], filesystem, batch_rows: int):
    """Read every file named in ``batch["path"]`` in ``batch_rows``-row record batches, tagging each with its path.

    A generator UDF: Ray Data packs the yielded frames into blocks of at most ``target_max_block_size``
    (128 MiB by default) and streams them out, so a read task holds at most about one block of its file, never
    the whole file set.

    Yields:
        pandas.DataFrame: the file's columns plus ``path``.

    Raises:
        ValueError: a file is not parquet (the message names it).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in batch[PATH_COLUMN]:
        with filesystem.open_input_file(str(path)) as fh:
            try:
                reader = pq.ParquetFile(fh)
            except pa.ArrowException as exc:  # pyarrow's message does not say which file
                raise ValueError(f"interactions file {path}: not a readable parquet file ({exc})") from None
            for record_batch in reader.iter_batches(batch_size=batch_rows):
                yield record_batch.to_pandas().assign(**{PATH_COLUMN: str(path)})


def read_validated(cfg: IngestConfig, catalog: InteractionLog | None = None, counter=None,
                   batch_rows: int = 65_536):  # fmt: skip
    """Stage 1 as a lazy Ray Dataset of validated, normalised rows (plus the ``path`` column).

    One read task per file (:func:`read_file_batches`, fused with the validation), streaming ``batch_rows`` rows
    at a time. Not ``ray.data.read_parquet``: Ray 2.60's parquet reader (DataSource V2) plans a log of many
    ~1 MB files as a single read task — no parallelism, and blocks of up to 1.5M rows (measured,
    docs/ray.md) — while this plan bounds memory per task by the block size and spreads files over every CPU.

    Returns:
        tuple[ray.data.Dataset, list[str], pyarrow.fs.FileSystem]: the dataset, the files and their filesystem.
    """
    import ray.data

    fs, files = resolve_files(cfg.interactions)
    catalog = catalog or load_catalog(cfg.items, cfg.users)
    # Only the ids are needed to check references: keep the per-batch validation cheap for big catalogues.
    items = catalog.items[["item_id", "title"]]
    users = catalog.users[["user_id"]] if catalog.users is not None else None
    names = {"items": str(cfg.items), **({"users": str(cfg.users)} if cfg.users else {})}
    ds = ray.data.from_items([{PATH_COLUMN: f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(
        read_file_batches, batch_size=1, fn_kwargs={"filesystem": fs, "batch_rows": batch_rows}
    )
    ds = ds.map_batches(
        validate_batch,
        batch_format="pandas",
        batch_size=None,  # one read batch at a time: a batch never spans files, so errors name one file
        fn_kwargs={"items": items, "users": users, "files": names, "rating_scale": cfg.rating_scale,
                   "on_invalid": cfg.on_invalid, "counter": counter},
    )  # fmt: skip
    return ds, files, fs


def pointwise_records(cfg: IngestConfig, catalog: InteractionLog | None = None, counter=None):
    """Stages 1 + 2 as a lazy Ray Dataset of pointwise records (:func:`record_schema`)."""
    ds, files, fs = read_validated(cfg, catalog, counter)
    # One shuffle partition per ~250k rows (4..200): Ray's default 200 costs seconds on a small log.
    partitions = int(min(200, max(4, count_rows(fs, files) // 250_000)))
    records = ds.groupby("user_id", num_partitions=partitions).map_groups(
        user_records,
        batch_format="pandas",
        fn_kwargs={"history_len": cfg.history_len, "like_threshold": cfg.like_threshold,
                   "on_invalid": cfg.on_invalid, "counter": counter},
    )  # fmt: skip
    return records, files, fs


def _identity(cfg: IngestConfig, files: list[str], fs) -> dict[str, Any]:
    infos = fs.get_file_info(files)
    return {
        "files": [[f, i.size, i.mtime_ns] for f, i in zip(files, infos, strict=True)],
        "items": str(cfg.items),
        "users": cfg.users,
        "history_len": cfg.history_len,
        "like_threshold": cfg.like_threshold,
        "rating_scale": list(cfg.rating_scale) if cfg.rating_scale else None,
        "on_invalid": cfg.on_invalid,
    }


def finished_ingest(cfg: IngestConfig, out_dir: str | Path) -> dict[str, Any] | None:
    """The summary of ``out_dir`` when it already holds these inputs' records (no Ray needed), else None."""
    meta_path = Path(out_dir).expanduser().resolve() / META_FILE
    if not meta_path.is_file():
        return None
    fs, files = resolve_files(cfg.interactions)
    done = json.loads(meta_path.read_text())
    return {**done["summary"], "reused": True} if done.get("identity") == _identity(cfg, files, fs) else None


def ingest_records(cfg: IngestConfig, out_dir: str | Path) -> dict[str, Any]:
    """Ingest the log into pointwise-record parquet files in ``out_dir`` (needs a Ray session).

    The directory is written as ``<out_dir>.tmp`` and renamed when complete; a rerun with the same inputs
    (paths, sizes, modification times, keys) returns the finished directory's summary at once.

    Returns:
        dict: ``out``, ``files``, ``rows`` (input rows), ``records``, ``dropped`` (per reason, drop mode),
        ``seconds``, ``rows_per_s``, ``reused``.

    Raises:
        DataValidationError: a file breaks the schema (the first failing batch's problems).
    """
    import ray

    out_dir = Path(out_dir).expanduser().resolve()
    done = finished_ingest(cfg, out_dir)
    if done is not None:
        logger.info("%s already holds these records; not re-ingesting", out_dir)
        return done
    fs, files = resolve_files(cfg.interactions)
    identity = _identity(cfg, files, fs)
    catalog = load_catalog(cfg.items, cfg.users)
    counter = ray.remote(num_cpus=0)(_Counts).remote() if cfg.on_invalid == "drop" else None
    rows = count_rows(fs, files)
    start = time.perf_counter()
    records, _, _ = pointwise_records(cfg, catalog, counter)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        records.write_parquet(str(tmp))
    except Exception as exc:  # Ray wraps the task's error: surface the schema's own
        from recsys_slm.distributed.session import unwrap_ray_error

        shutil.rmtree(tmp, ignore_errors=True)
        raise unwrap_ray_error(exc) from None
    seconds = time.perf_counter() - start
    n_records = count_rows(*resolve_files([str(tmp)])) if any(tmp.glob("*.parquet")) else 0
    dropped = ray.get(counter.get.remote()) if counter is not None else {}
    summary = {
        "out": str(out_dir),
        "files": len(files),
        "rows": rows,
        "records": n_records,
        "dropped": dropped,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
    }
    (tmp / META_FILE).write_text(json.dumps({"identity": identity, "summary": summary}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return {**summary, "reused": False}
