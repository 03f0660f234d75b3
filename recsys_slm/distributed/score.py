"""``recsys-slm teacher score --backend ray``: the teacher cache written by a pool of Ray actors.

The input (a pointwise task / transfer-set parquet, a directory of them, or records ingested from raw interaction
logs by :mod:`recsys_slm.distributed.ingest` when ``ray.interactions`` is set) is cut into **output shards** of
``chunk_records`` consecutive rows per file, planned from the parquet footers on the driver (no data read there).
A Ray Data pipeline ``from_items(pending shards).map_batches(_ShardScorer, concurrency=actors)`` hands the shards
to an actor pool; each actor loads the teacher once (CPU or GPU actors: ``ray.cpus_per_actor``,
``ray.gpus_per_actor``), reads its rows itself, renders the prompts exactly as ``teacher score`` does, computes the
answer-position outputs with the same function (:func:`recsys_slm.distill.teacher_cache.answer_position_outputs`)
and writes ``OUT.parts/part-NNNNN.parquet`` atomically. A rerun skips every finished shard (resumable by output
shard). The driver then streams the parts, in input order, into ``OUT``: the same columns and ``recsys_slm``
metadata as the single-process cache (so ``distill`` reads it unchanged), plus a ``ray`` key describing the
shard plan. Two differences: ``fingerprint`` hashes the per-shard fingerprints, and the input columns keep
their parquet types (the single-process path round-trips through pandas).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys_slm.distributed.config import RayConfig

logger = logging.getLogger(__name__)

PART_METADATA_KEY = b"recsys_slm_part"


def teacher_schema():
    """Arrow types of the teacher columns (as the single-process cache stores them)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("teacher_logit_yes", pa.float32()),
            ("teacher_logit_no", pa.float32()),
            ("teacher_score", pa.float32()),
            ("teacher_p_yes", pa.float64()),
            ("teacher_topk_ids", pa.list_(pa.int32())),
            ("teacher_topk_logprobs", pa.list_(pa.float32())),
        ]
    )


def read_rows(path: str, start: int, stop: int):
    """Rows ``[start, stop)`` of a local parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    groups, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > start and offset < stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups).slice(start - first, stop - start).combine_chunks()


def plan_shards(files: list[str], chunk: int, max_records: int | None) -> list[dict[str, Any]]:
    """Output shards: ``chunk`` consecutive rows of one file each, in input order, up to ``max_records``."""
    import pyarrow.parquet as pq

    shards, remaining = [], max_records
    for path in files:
        n = pq.ParquetFile(path).metadata.num_rows
        if remaining is not None:
            n = min(n, remaining)
            remaining -= n
        for start in range(0, n, chunk):
            shards.append({"shard": len(shards), "path": path, "start": start, "stop": min(n, start + chunk)})
        if remaining == 0:
            break
    return shards


def task_files(task: Path) -> list[str]:
    """The parquet files of a task: the file itself, or every parquet file under a directory (sorted)."""
    from recsys_slm.distributed.ingest import resolve_files

    task = Path(task).expanduser()
    if not task.exists():
        raise FileNotFoundError(f"task file {task} not found")
    return resolve_files([str(task)])[1]


def _check_columns(path: str) -> None:
    import pyarrow.parquet as pq

    from recsys_slm.distill.teacher_cache import REQUIRED_TASK_COLUMNS

    names = pq.read_schema(path).names
    missing = [c for c in REQUIRED_TASK_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)}; a pointwise task or transfer set has "
            f"{', '.join(REQUIRED_TASK_COLUMNS)}"
        )


class _ShardScorer:
    """A Ray Data actor holding the teacher: scores whole output shards and writes their part files."""

    def __init__(self, cfg, prompt, parts: str, cwd: str, threads: int) -> None:
        import torch

        from recsys_slm.data.prompts import PromptRenderer
        from recsys_slm.device import resolve_device
        from recsys_slm.distill.cross_tokenizer import ignored_ids
        from recsys_slm.distributed.ingest import load_catalog
        from recsys_slm.model_dir import data_dir_or_default, read_manifest
        from recsys_slm.models.loading import load_causal_lm
        from recsys_slm.ranker.ranker import Ranker, RankerConfig

        if Path(cwd).is_dir():
            os.chdir(cwd)  # relative paths in the config mean what they meant on the driver
        torch.set_num_threads(threads)
        self.cfg, self.parts = cfg, Path(parts)
        data_dir = data_dir_or_default(cfg.data_dir)
        users = data_dir / "users.parquet"
        catalog = load_catalog(str(data_dir / "items.parquet"), str(users) if users.exists() else None)
        device = resolve_device(cfg.device)
        model, tokenizer = load_causal_lm(cfg.model, device=device)
        if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
            model = model.to(torch.bfloat16)
        model.eval()
        rows_in_head = model.get_output_embeddings().weight.shape[0]
        self.ignore = ignored_ids(rows_in_head, tokenizer, name=f"teacher {cfg.model}")
        renderer = PromptRenderer(prompt, tokenizer, catalog.items, catalog.users)
        self.ranker = Ranker(model, tokenizer, renderer, RankerConfig(cfg.batch_size, False, prompt))
        manifest = read_manifest(cfg.model) if Path(str(cfg.model)).expanduser().is_dir() else None
        self.meta = {
            "teacher_stage": (manifest or {}).get("stage"),
            "tokenizer_len": len(tokenizer),
            "vocab_rows": int(rows_in_head),
            "ignored_ids": len(self.ignore),
        }

    def score(self, path: str, start: int, stop: int):
        """The part table of rows ``[start, stop)`` of ``path``: input columns + teacher columns."""
        import pyarrow as pa

        from recsys_slm.distill.teacher_cache import (
            TEACHER_COLUMNS,
            _chunk_frame,
            answer_position_outputs,
            sequences_fingerprint,
        )

        table = read_rows(path, start, stop)
        table = table.drop_columns(
            [c for c in TEACHER_COLUMNS if c in table.column_names]
        )  # re-scoring a cache
        frame = table.select(["user_id", "item_id", "history_item_ids", "history_labels"]).to_pandas()
        renderer = self.ranker.renderer
        sequences = [
            self.ranker.encode(
                renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id, r.user_id)
            )
            for r in frame.itertuples()
        ]
        order = np.argsort(
            [len(s) for s in sequences], kind="stable"
        )  # similar lengths per batch: less padding
        outputs = answer_position_outputs(self.ranker.scorer, [sequences[i] for i in order], self.cfg.top_k,
                                          self.cfg.temperature, self.ignore)  # fmt: skip
        teacher = _chunk_frame(outputs, order).sort_values("_row").drop(columns="_row")
        columns = pa.Table.from_pandas(
            teacher.reset_index(drop=True), schema=teacher_schema(), preserve_index=False
        )
        for name in columns.column_names:
            table = table.append_column(name, columns[name])
        part_meta = {**self.meta, "rows": len(frame), "fingerprint": sequences_fingerprint(sequences)}
        return table.replace_schema_metadata({PART_METADATA_KEY: json.dumps(part_meta).encode()})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import pyarrow.parquet as pq

        done = []
        for row in batch.itertuples():
            start = time.perf_counter()
            part = self.parts / f"part-{int(row.shard):05d}.parquet"
            table = self.score(row.path, int(row.start), int(row.stop))
            tmp = part.with_name(part.name + f".{os.getpid()}.tmp")
            pq.write_table(table, tmp)
            tmp.replace(part)
            done.append(
                {"shard": int(row.shard), "rows": table.num_rows, "seconds": time.perf_counter() - start}
            )
        return pd.DataFrame(done)


def _identity(cfg, prompt, prompt_source: str, files: list[str], shards: list[dict]) -> dict[str, Any]:
    from recsys_slm.config import config_to_dict
    from recsys_slm.distill.teacher_cache import CACHE_FORMAT_VERSION

    return {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher": str(cfg.model),
        "prompt_source": prompt_source,
        "prompt": config_to_dict(prompt),
        "top_k": cfg.top_k,
        "temperature": cfg.temperature,
        "data_dir": str(cfg.data_dir) if cfg.data_dir is not None else None,
        "precision": cfg.precision,
        "files": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
        "chunk_records": cfg.chunk_records,
        "shards": len(shards),
        "records": sum(s["stop"] - s["start"] for s in shards),
    }


def _labelled_auc_stream(out: Path) -> dict:
    """``teacher_auc_labelled`` from the label and score columns only."""
    import pyarrow.parquet as pq

    from recsys_slm.distill.teacher_cache import _labelled_auc

    names = pq.read_schema(out).names
    if "label" not in names:
        return {}
    return _labelled_auc(pq.read_table(out, columns=["label", "teacher_score"]).to_pandas())


def _assemble(out: Path, parts: Path, shards: list[dict], identity: dict, task: str) -> dict[str, Any]:
    """Stream the parts, in input order, into ``out`` (atomic) with the cache metadata; return the metadata."""
    import pyarrow.parquet as pq

    from recsys_slm.distill.teacher_cache import METADATA_KEY

    paths = [parts / f"part-{s['shard']:05d}.parquet" for s in shards]
    part_metas = [json.loads(pq.read_schema(p).metadata[PART_METADATA_KEY]) for p in paths]
    first = part_metas[0]
    digest = hashlib.sha256("".join(m["fingerprint"] for m in part_metas).encode()).hexdigest()[:16]
    meta = {
        "format_version": identity["format_version"],
        "teacher": identity["teacher"],
        "teacher_stage": first["teacher_stage"],
        "tokenizer_len": first["tokenizer_len"],
        "vocab_rows": first["vocab_rows"],
        "ignored_ids": first["ignored_ids"],
        "prompt_source": identity["prompt_source"],
        "prompt": identity["prompt"],
        "top_k": identity["top_k"],
        "temperature": identity["temperature"],
        "records": sum(m["rows"] for m in part_metas),
        "fingerprint": digest,
        "task": task,
        "ray": identity,
    }
    schema = pq.read_schema(paths[0]).with_metadata({METADATA_KEY: json.dumps(meta).encode()})
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema) as writer:
        for path in paths:  # one part in memory at a time
            table = pq.read_table(path)
            try:
                table = table.replace_schema_metadata(None).cast(schema.remove_metadata())
            except Exception as exc:
                raise ValueError(f"{path}: its columns differ from the first part's ({exc}); the task files must "
                                 "share one schema") from exc  # fmt: skip
            writer.write_table(table)
    tmp.replace(out)
    return meta


def score_task_ray(
    cfg, ray_cfg: RayConfig, progress: bool = True, stop_after_shards: int | None = None
) -> dict:
    """Score ``cfg.task`` (or the ingested ``ray.interactions``) with a Ray actor pool and write ``cfg.out``.

    Args:
        cfg (TeacherScoreConfig): the single-process config (model, task, out, prompt, top_k, temperature,
            batch_size, chunk_records = rows per output shard, max_records, device, precision).
        ray_cfg (RayConfig): cluster and actor keys.
        progress (bool): log one line per finished shard.
        stop_after_shards (int | None): test hook simulating a kill: raise ``KeyboardInterrupt`` after this
            many shards finished in this run.

    Returns:
        dict: ``out``, ``records``, ``scored_now``, ``seconds``, ``records_per_s``, ``actors``, ``shards``,
        ``shards_done_before``, the cache metadata, ``teacher_auc_labelled`` and ``ingest`` (when ingesting).
    """
    from recsys_slm.distill.teacher_cache import _stored_meta
    from recsys_slm.distributed.ingest import IngestConfig, finished_ingest, ingest_records
    from recsys_slm.distributed.session import check_fits, cluster_totals, ray_session, unwrap_ray_error
    from recsys_slm.evaluation.ranker_eval import resolve_prompt
    from recsys_slm.model_dir import data_dir_or_default, read_manifest

    out = Path(cfg.out).expanduser().resolve()
    run_dir = out.parent / f"{out.name}.ray"
    data_dir = data_dir_or_default(cfg.data_dir).resolve()
    cfg = replace(cfg, data_dir=data_dir)
    manifest = read_manifest(cfg.model) if Path(str(cfg.model)).expanduser().is_dir() else None
    prompt, prompt_source = resolve_prompt(cfg.prompt, manifest)

    with _LazySession(lambda: ray_session(ray_cfg, run_dir)) as session:
        ingest = None
        if ray_cfg.interactions:
            users = data_dir / "users.parquet"
            ingest_cfg = IngestConfig(
                interactions=list(ray_cfg.interactions), items=str(data_dir / "items.parquet"),
                users=str(users) if users.exists() else None, history_len=ray_cfg.history_len,
                like_threshold=ray_cfg.like_threshold, on_invalid=ray_cfg.on_invalid,
            )  # fmt: skip
            ingest = finished_ingest(ingest_cfg, Path(cfg.task))
            if ingest is None:
                session.ensure()
                try:
                    ingest = ingest_records(ingest_cfg, Path(cfg.task))
                except Exception as exc:
                    raise unwrap_ray_error(exc) from None
            logger.info("ingested %s rows from %d files into %d records (%.0f rows/s)", ingest["rows"],
                        ingest["files"], ingest["records"], ingest["rows_per_s"] or 0)  # fmt: skip
        files = task_files(Path(cfg.task))
        _check_columns(files[0])
        shards = plan_shards(files, cfg.chunk_records, cfg.max_records)
        if not shards:
            raise ValueError(f"{cfg.task}: no records to score")
        identity = _identity(cfg, prompt, prompt_source, files, shards)
        task_name = str(Path(cfg.task).expanduser().resolve())
        base = {"out": str(out), "shards": len(shards), **({"ingest": ingest} if ingest else {})}
        if out.is_file() and (_stored_meta(out) or {}).get("ray") == identity:
            logger.info("%s already holds these teacher outputs; not rescoring", out)
            meta = _stored_meta(out)
            return {**base, "records": meta["records"], "scored_now": 0, "seconds": 0.0, "records_per_s": None,
                    "actors": 0, "shards_done_before": len(shards), **meta, **_labelled_auc_stream(out)}  # fmt: skip
        parts = out.parent / f"{out.name}.parts"
        meta_file = parts / "meta.json"
        if parts.is_dir() and (not meta_file.is_file() or json.loads(meta_file.read_text()) != identity):
            shutil.rmtree(parts)  # parts of another teacher / task / prompt / shard plan: start over
        parts.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(identity, sort_keys=True))
        pending = [s for s in shards if not (parts / f"part-{s['shard']:05d}.parquet").is_file()]
        done_before = len(shards) - len(pending)
        scored, actors, start = 0, 0, time.perf_counter()
        if pending:
            session.ensure()
            import ray.data

            totals = cluster_totals()
            fit = int(totals["CPU"] // ray_cfg.cpus_per_actor)
            if ray_cfg.gpus_per_actor > 0:
                fit = min(fit, int(totals["GPU"] // ray_cfg.gpus_per_actor))
            actors = min(ray_cfg.actors or max(1, fit), len(pending))
            check_fits("teacher actors", actors, ray_cfg.cpus_per_actor, ray_cfg.gpus_per_actor,
                       "ray.actors / ray.cpus_per_actor / ray.gpus_per_actor")  # fmt: skip
            logger.info("scoring %d of %d shards with %d actor(s) (%s)", len(pending), len(shards), actors,
                        session.info.address)  # fmt: skip
            ds = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
                _ShardScorer,
                fn_constructor_kwargs={"cfg": cfg, "prompt": prompt, "parts": str(parts), "cwd": os.getcwd(),
                                       "threads": max(1, int(ray_cfg.cpus_per_actor))},
                batch_size=1, batch_format="pandas", concurrency=actors, num_cpus=ray_cfg.cpus_per_actor,
                num_gpus=ray_cfg.gpus_per_actor,
            )  # fmt: skip
            finished = 0
            try:
                for row in ds.iter_rows():
                    finished += 1
                    scored += int(row["rows"])
                    if progress:
                        elapsed = time.perf_counter() - start
                        logger.info("shard %d: %d rows in %.1f s; %d/%d shards, %.2f rows/s overall", row["shard"],
                                    row["rows"], row["seconds"], done_before + finished, len(shards),
                                    scored / elapsed)  # fmt: skip
                    if stop_after_shards is not None and finished >= stop_after_shards:
                        raise KeyboardInterrupt(f"stop_after_shards={stop_after_shards} (test hook)")
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                raise unwrap_ray_error(exc) from None
        seconds = time.perf_counter() - start
        meta = _assemble(out, parts, shards, identity, task_name)
        shutil.rmtree(parts, ignore_errors=True)
        summary = {**base, "records": meta["records"], "scored_now": scored, "seconds": round(seconds, 2),
                   "records_per_s": round(scored / seconds, 3) if scored and seconds > 0 else None,
                   "actors": actors, "shards_done_before": done_before, **meta}  # fmt: skip
        summary.update(_labelled_auc_stream(out))
        return summary


class _LazySession:
    """Enter a Ray session only when something needs Ray (a finished cache is returned without starting it)."""

    def __init__(self, factory) -> None:
        self.factory, self.ctx, self.info = factory, None, None

    def ensure(self) -> None:
        if self.ctx is None:
            self.ctx = self.factory()
            self.info = self.ctx.__enter__()

    def __enter__(self) -> _LazySession:
        return self

    def __exit__(self, *exc) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
