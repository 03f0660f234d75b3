"""A synthetic interaction log of any size (many parquet files, validated against the schema) and the Ray Data
ingestion benchmark on it: rows/s, and memory staying flat as the log grows.

    # write a 2M-row log as 20 files (+ items, users) and benchmark ingestion at 0.5M, 1M and 2M rows
    python -m bench.synthetic_log --out runs/synth --rows 2000000 --files 20 --bench 500000,1000000,2000000
    # tiny version (seconds)
    python -m bench.synthetic_log --out /tmp/synth --rows 60000 --files 6 --bench 15000,30000,60000

Layout: ``OUT/items.parquet``, ``OUT/users.parquet``, ``OUT/interactions/part-NNNNN.parquet`` (``--single-file``
also writes ``OUT/interactions.parquet``, the layout ``recsys-slm data prepare dataset=logs`` reads). Users and
items are drawn with Zipf-like popularity, ratings 1–5, timestamps strictly increasing (so no duplicate events);
the generator holds one file's rows at a time and checks every file with
:func:`recsys_slm.data.schema.validate_log` before writing it.

``--bench`` runs, for each prefix of the files holding about N rows, in a local Ray session (``--cpus``):

* ``validate``: read + per-batch schema validation (stage 1 of :mod:`recsys_slm.distributed.ingest`), streamed to
  the driver with ``iter_batches`` and counted (nothing kept);
* ``records``: stages 1 + 2 written as pointwise records (:func:`~recsys_slm.distributed.ingest.ingest_records`),

recording rows/s, the driver's peak private memory (USS) and RSS during that run (RSS also counts the
object-store pages the driver maps), the peak summed RSS of every process of the Ray session (all sampled every
0.25 s) and the peak object-store use. Each size runs in a fresh process unless ``--same-process``.
``--store-budget-mb`` caps Ray Data's object-store budget (``DataContext.execution_options.resource_limits``) and
``--object-store-mb`` the local Ray's object store; ``--stages`` picks the runs. Measured on a 2M-row log
(docs/BENCHMARKS.md): validation keeps the driver's private memory flat (204 → 214 MB from 0.5M to 2M rows) and
the object store under 50 MB. The ``records`` stage groups by user (an all-to-all shuffle), so its object-store
use grows with the data by nature; Ray spills it to disk past the object store.

Output: one JSON line per run and ``OUT/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Horror", "Sci-Fi", "Documentary"]


def write_catalog(out: Path, n_items: int, n_users: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 1])
    pd.DataFrame(
        {
            "item_id": [str(i) for i in range(n_items)],
            "title": [f"Movie {i}" for i in range(n_items)],
            "year": pd.array(rng.integers(1950, 2024, n_items), dtype="Int64"),
            "genres": [
                [GENRES[g] for g in rng.choice(len(GENRES), 2, replace=False)] for _ in range(n_items)
            ],
        }
    ).to_parquet(out / "items.parquet", index=False)
    pd.DataFrame(
        {
            "user_id": [str(u) for u in range(n_users)],
            "age": rng.integers(18, 70, n_users),
            "gender": rng.choice(["F", "M"], n_users),
            "occupation": rng.choice(["writer", "doctor", "student", "engineer"], n_users),
        }
    ).to_parquet(out / "users.parquet", index=False)


def _zipf_ids(rng: np.random.Generator, n: int, size: int, a: float = 1.1) -> np.ndarray:
    """``size`` ids in [0, n) with a Zipf-like popularity (rank r drawn ∝ 1 / (r + 1)^a)."""
    weights = 1.0 / np.arange(1, n + 1) ** a
    return rng.choice(n, size=size, p=weights / weights.sum())


def generate(out: str | Path, rows: int, files: int, users: int, items: int, seed: int = 0,
             single_file: bool = False, row_group: int = 100_000) -> dict:  # fmt: skip
    """Write the log (see the module docstring); return its summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_slm.data.schema import validate_log

    out = Path(out)
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    write_catalog(out, items, users, seed)
    catalog_items = pd.DataFrame({"item_id": [str(i) for i in range(items)], "title": "x"})
    catalog_users = pd.DataFrame({"user_id": [str(u) for u in range(users)]})
    per_file = -(-rows // files)
    start = time.perf_counter()
    written, single = 0, None
    for k in range(files):
        n = min(per_file, rows - written)
        if n <= 0:
            break
        rng = np.random.default_rng([seed, 2, k])
        frame = pd.DataFrame(
            {
                "user_id": _zipf_ids(rng, users, n, 0.6).astype(str),
                "item_id": _zipf_ids(rng, items, n).astype(str),
                "timestamp": 1_600_000_000
                + written
                + np.arange(n, dtype=np.int64),  # unique: no duplicate events
                "rating": rng.integers(1, 6, n).astype(np.float64),
            }
        )
        validate_log(frame, catalog_items, catalog_users, files={"interactions": f"part-{k:05d}.parquet"},
                     rating_scale=(1, 5))  # fmt: skip
        table = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table, out / "interactions" / f"part-{k:05d}.parquet", row_group_size=row_group)
        if single_file:
            single = single or pq.ParquetWriter(out / "interactions.parquet", table.schema)
            single.write_table(table)
        written += n
    if single is not None:
        single.close()
    return {"out": str(out), "rows": written, "files": files, "users": users, "items": items,
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


class _Sampler:
    """Peak RSS of this process and all its descendants (the local Ray session), sampled in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self.proc, self.interval, self.peak_all, self.peak_store = psutil.Process(), interval, 0, 0.0
        self.peak_driver = 0
        self.peak_driver_uss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil
        import ray

        while not self._stop.is_set():
            total = 0
            try:
                full = self.proc.memory_full_info()
                self.peak_driver = max(self.peak_driver, full.rss)
                self.peak_driver_uss = max(self.peak_driver_uss, full.uss)
            except psutil.Error:
                pass
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_all = max(self.peak_all, total)
            try:
                res, free = ray.cluster_resources(), ray.available_resources()
                used = res.get("object_store_memory", 0.0) - free.get("object_store_memory", 0.0)
                self.peak_store = max(self.peak_store, used)
            except Exception:  # noqa: BLE001 - sampling must never break the benchmark
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _prefix(files: list[Path], rows: int) -> list[Path]:
    import pyarrow.parquet as pq

    chosen, total = [], 0
    for f in files:
        if total >= rows:
            break
        chosen.append(f)
        total += pq.ParquetFile(f).metadata.num_rows
    return chosen


def bench(
    out: Path,
    sizes: list[int],
    cpus: int,
    history_len: int,
    store_budget_mb: float | None = None,
    object_store_mb: float | None = None,
    stages: tuple[str, ...] = ("validate", "records"),
) -> list[dict]:
    """Ingestion rows/s and memory per log size (see the module docstring)."""
    import ray

    from recsys_slm.distributed.config import RayConfig
    from recsys_slm.distributed.ingest import (
        IngestConfig,
        count_rows,
        ingest_records,
        read_validated,
        resolve_files,
    )
    from recsys_slm.distributed.session import ray_session

    files = sorted((out / "interactions").glob("part-*.parquet"))
    results = []
    with ray_session(RayConfig(num_cpus=cpus, object_store_mb=object_store_mb), out / "bench.ray") as session:
        if store_budget_mb is not None:
            from ray.data import DataContext, ExecutionResources

            DataContext.get_current().execution_options.resource_limits = ExecutionResources(
                object_store_memory=store_budget_mb * 2**20
            )
        for size in sizes:
            chosen = [str(f) for f in _prefix(files, size)]
            rows = count_rows(*resolve_files(chosen))
            cfg = IngestConfig(interactions=chosen, items=str(out / "items.parquet"), users=str(out / "users.parquet"),
                               history_len=history_len, rating_scale=(1, 5))  # fmt: skip
            for stage in stages:
                start = time.perf_counter()
                with _Sampler() as sampler:
                    if stage == "validate":
                        ds, _, _ = read_validated(cfg)
                        seen = sum(
                            len(b["user_id"])
                            for b in ds.iter_batches(batch_size=65_536, batch_format="numpy")
                        )
                        assert seen == rows, (seen, rows)
                        extra = {}
                    else:
                        target = out / "bench_records" / f"{size}"
                        shutil.rmtree(
                            target, ignore_errors=True
                        )  # else ingest_records reuses an earlier run's output
                        summary = ingest_records(cfg, target)
                        extra = {"records": summary["records"]}
                seconds = time.perf_counter() - start
                result = {
                    "stage": stage, "rows": rows, "files": len(chosen), "seconds": round(seconds, 2),
                    "rows_per_s": round(rows / seconds, 1), **extra,
                    "driver_peak_uss_mb": round(sampler.peak_driver_uss / 2**20, 1),
                    "driver_peak_rss_mb": round(sampler.peak_driver / 2**20, 1),
                    "driver_max_rss_so_far_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                    "all_processes_peak_rss_mb": round(sampler.peak_all / 2**20, 1),
                    "object_store_peak_mb": round(sampler.peak_store / 2**20, 1),
                    "cpus": cpus, "ray_init_s": session.init_s, "store_budget_mb": store_budget_mb,
                    "object_store_mb": object_store_mb,
                }  # fmt: skip
                print(json.dumps(result), flush=True)
                results.append(result)
        ray.shutdown()
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--users", type=int, default=None, help="default rows // 100")
    parser.add_argument("--items", type=int, default=None, help="default rows // 200, at least 50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single-file", action="store_true", help="also write OUT/interactions.parquet")
    parser.add_argument("--bench", default=None, help="comma-separated row counts to benchmark ingestion at")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--history-len", type=int, default=10)
    parser.add_argument("--reuse", action="store_true", help="skip generation when OUT/interactions exists")
    parser.add_argument(
        "--store-budget-mb", type=float, default=None, help="cap Ray Data's object-store budget"
    )
    parser.add_argument(
        "--object-store-mb", type=float, default=None, help="object-store size of the local Ray"
    )
    parser.add_argument(
        "--stages", default="validate,records", help="validate, records or both (comma-separated)"
    )
    parser.add_argument(
        "--same-process", action="store_true", help="all sizes in one Ray session (default: a fresh process each)"
    )
    args = parser.parse_args(argv)
    if not (args.reuse and (args.out / "interactions").is_dir()):
        users = args.users or max(10, args.rows // 100)
        items = args.items or max(50, args.rows // 200)
        print(
            json.dumps(generate(args.out, args.rows, args.files, users, items, args.seed, args.single_file))
        )
    if args.bench:
        sizes = [int(x) for x in args.bench.split(",")]
        if len(sizes) > 1 and not args.same_process:
            bench_fresh(args, sizes, argv if argv is not None else sys.argv[1:])
        else:
            bench(args.out, sizes, args.cpus, args.history_len, args.store_budget_mb, args.object_store_mb,
                  tuple(args.stages.split(",")))  # fmt: skip
    return 0


def bench_fresh(args, sizes: list[int], argv: list[str]) -> list[dict]:
    """Each size in its own Python process (so no run inherits another's memory high-water mark)."""
    import subprocess

    results = []
    for size in sizes:
        cmd = [sys.executable, "-m", "bench.synthetic_log", *_without_bench(argv), "--reuse", "--bench", str(size)]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
        results += json.loads((args.out / "bench.json").read_text())
    for r in results:
        r["process"] = "fresh per size"
    (args.out / "bench.json").write_text(json.dumps(results, indent=1))
    return results


def _without_bench(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--bench":
            skip = True
        elif not a.startswith("--bench="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
