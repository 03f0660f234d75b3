"""Ray backends end to end on tiny models, in one local 2-CPU Ray (marked ``ray``).

A multi-file parquet interaction log is ingested with Ray Data, scored by a Ray actor pool (killed after one
shard, then resumed through the CLI) and distilled by 2 Ray Train workers; the student equals the single-process
one, also when a worker process is SIGKILLed mid-run. Every Ray job runs under a deadline: on 2 CPUs with two
1-CPU training workers the pipeline must finish, never wait forever.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from recsys_slm.cli import main
from recsys_slm.config import from_dict
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.data.schema import DataValidationError
from recsys_slm.distill.teacher_cache import TeacherScoreConfig, read_teacher_cache, score_task
from recsys_slm.distill.trainer import DistillConfig, distill
from recsys_slm.distributed.config import RayConfig
from recsys_slm.distributed.ingest import IngestConfig, ingest_records
from recsys_slm.model_dir import read_manifest

pytestmark = pytest.mark.ray

PROMPT = {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400}
KEYS = ["user_id", "item_id", "timestamp"]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM raises in the main thread after ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"no result within {seconds} s: the Ray job hangs")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray with 2 CPUs for the module (the 2-core trap configuration)."""
    from recsys_slm.distributed.session import ray_session

    run = tmp_path_factory.mktemp("ray_run")
    with ray_session(RayConfig(num_cpus=2), run) as info:
        yield info


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from recsys_slm.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("t") / "teacher", seed=5, num_layers=4)


@pytest.fixture(scope="module")
def log_dir(tiny_data_dir, tmp_path_factory) -> Path:
    """The tiny log's interactions as 3 parquet files, rows shuffled so every user spans files."""
    inter = pd.read_parquet(tiny_data_dir / "interactions.parquet").sample(frac=1.0, random_state=0)
    out = tmp_path_factory.mktemp("logs")
    for i in range(3):
        inter.iloc[i::3].to_parquet(out / f"part-{i}.parquet", index=False)
    return out


@pytest.fixture(scope="module")
def records(ray_local, log_dir, tiny_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    cfg = IngestConfig(interactions=[str(log_dir)], items=str(tiny_data_dir / "items.parquet"),
                       users=str(tiny_data_dir / "users.parquet"), history_len=3)  # fmt: skip
    with deadline(240):
        summary = ingest_records(cfg, tmp_path_factory.mktemp("rec") / "records")
    return Path(summary["out"]), summary


def _read_dir(path: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(path.glob("*.parquet"))], ignore_index=True)


def test_ingestion_builds_the_pointwise_records_of_the_whole_log(records, tiny_data_dir, ray_local):
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.data.tasks import PointwiseTaskConfig, build_pointwise_task

    path, summary = records
    assert (
        summary["files"] == 3
        and summary["rows"] == 120
        and summary["records"] == 90
        and summary["rows_per_s"]
    )
    got = _read_dir(path).sort_values(KEYS).reset_index(drop=True)
    log = InteractionLog.load(tiny_data_dir)
    frames, _ = build_pointwise_task(
        log, PointwiseTaskConfig(history_len=3, max_records=10_000, split=(1, 0, 0))
    )
    want = frames["train"].sort_values(KEYS).reset_index(drop=True)
    assert got[KEYS].equals(want[KEYS].astype(got[KEYS].dtypes.to_dict()))
    assert got["label"].tolist() == want["label"].tolist() and set(got["source"]) == {"labelled"}
    assert [list(x) for x in got["history_item_ids"]] == [list(x) for x in want["history_item_ids"]]


def test_ingestion_errors_name_the_file_and_column(ray_local, log_dir, tiny_data_dir, tmp_path):
    bad = pd.read_parquet(log_dir / "part-1.parquet")
    bad.loc[bad.index[:2], "item_id"] = "no-such-item"
    bad.to_parquet(tmp_path / "bad.parquet", index=False)
    (tmp_path / "logs").mkdir()
    for name in ("part-0.parquet", "part-2.parquet"):
        (tmp_path / "logs" / name).write_bytes((log_dir / name).read_bytes())
    (tmp_path / "bad.parquet").rename(tmp_path / "logs" / "part-1.parquet")
    cfg = IngestConfig(
        interactions=[str(tmp_path / "logs")], items=str(tiny_data_dir / "items.parquet"), history_len=3
    )
    with deadline(180), pytest.raises(DataValidationError) as info:
        ingest_records(cfg, tmp_path / "records")
    message = str(info.value)
    assert "part-1.parquet, column 'item_id'" in message and "'no-such-item'" in message
    assert not (tmp_path / "records").exists()
    dropped = ingest_records(IngestConfig(**{**cfg.__dict__, "on_invalid": "drop"}), tmp_path / "records")
    assert dropped["dropped"] == {"unknown_item": 2} and dropped["records"] < 90


def test_read_file_batches_streams_each_file_in_bounded_batches(log_dir):
    """The ingestion reader (no Ray needed): every row once, in batches of at most batch_rows, tagged by file."""
    import pyarrow.fs as pafs

    from recsys_slm.distributed.ingest import PATH_COLUMN, read_file_batches

    files = sorted(str(p) for p in log_dir.glob("*.parquet"))
    batches = list(read_file_batches({PATH_COLUMN: np.array(files)}, pafs.LocalFileSystem(), batch_rows=7))
    assert all(len(b) <= 7 for b in batches) and len(batches) == sum(-(-len(pd.read_parquet(f)) // 7) for f in files)
    for f in files:
        got = pd.concat([b for b in batches if b[PATH_COLUMN].iloc[0] == f], ignore_index=True)
        assert set(got[PATH_COLUMN]) == {f}
        pd.testing.assert_frame_equal(got.drop(columns=PATH_COLUMN), pd.read_parquet(f))
    (log_dir.parent / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable parquet file"):
        list(read_file_batches({PATH_COLUMN: [str(log_dir.parent / "broken.parquet")]}, pafs.LocalFileSystem(), 7))


@pytest.fixture(scope="module")
def ray_cache(ray_local, records, log_dir, teacher_dir, tiny_data_dir, tmp_path_factory) -> dict:
    """The Ray-scored cache of the log's records (already ingested there: reused): the first run stops after
    one shard, the rerun (through the CLI) resumes."""
    from recsys_slm.distributed.score import score_task_ray

    out = tmp_path_factory.mktemp("cache") / "scores.parquet"
    cfg = TeacherScoreConfig(model=str(teacher_dir), task=records[0], out=out, data_dir=tiny_data_dir,
                             prompt=PromptConfig(**PROMPT), top_k=8, batch_size=8, chunk_records=16, device="cpu")  # fmt: skip
    with deadline(240), pytest.raises(KeyboardInterrupt):
        score_task_ray(
            cfg, RayConfig(actors=1, interactions=[str(log_dir)], history_len=3), stop_after_shards=1
        )
    parts = sorted((out.parent / f"{out.name}.parts").glob("part-*.parquet"))
    args = ["teacher", "score", "--backend", "ray", "--model", str(teacher_dir), "--task", str(records[0]),
            "--out", str(out), f"data_dir={tiny_data_dir}", "top_k=8", "batch_size=8", "chunk_records=16",
            "device=cpu", f"ray.interactions=[{log_dir}]", "ray.history_len=3",
            *[f"prompt.{k}={v}" for k, v in PROMPT.items()]]  # fmt: skip
    printed = io.StringIO()
    with deadline(240), contextlib.redirect_stdout(printed):
        assert main(args) == 0  # the rerun resumes
    return {"out": out, "parts_after_kill": len(parts), "args": args, "printed": printed.getvalue()}


def test_scoring_resumes_by_shard_and_matches_the_local_cache(ray_cache, records, teacher_dir, tiny_data_dir,
                                                             tmp_path, capsys):  # fmt: skip
    printed = ray_cache["printed"]
    summary = json.loads(printed[printed.index("{") :])
    assert 1 <= ray_cache["parts_after_kill"] == summary["shards_done_before"] < summary["shards"]
    assert summary["records"] == 90 and 0 < summary["scored_now"] < 90 and summary["records_per_s"] > 0
    assert summary["ingest"]["reused"] and summary["ingest"]["records"] == 90
    assert "rec/s" in printed
    # The same format as the single-process cache, and the same numbers.
    _read_dir(records[0]).to_parquet(tmp_path / "records.parquet", index=False)
    local = tmp_path / "local.parquet"
    score_task(TeacherScoreConfig(model=str(teacher_dir), task=tmp_path / "records.parquet", out=local,
                                  data_dir=tiny_data_dir, prompt=PromptConfig(**PROMPT), top_k=8, batch_size=8,
                                  device="cpu"), progress=False)  # fmt: skip
    ray_frame, ray_meta = read_teacher_cache(ray_cache["out"])
    local_frame, local_meta = read_teacher_cache(local)
    assert list(ray_frame.columns) == list(local_frame.columns)
    for key in (
        "format_version",
        "teacher",
        "tokenizer_len",
        "vocab_rows",
        "prompt",
        "top_k",
        "temperature",
        "records",
    ):
        assert ray_meta[key] == local_meta[key], key
    ray_frame, local_frame = (f.sort_values(KEYS).reset_index(drop=True) for f in (ray_frame, local_frame))
    np.testing.assert_allclose(ray_frame["teacher_score"], local_frame["teacher_score"], atol=1e-4)
    np.testing.assert_array_equal(
        np.stack(ray_frame["teacher_topk_ids"]), np.stack(local_frame["teacher_topk_ids"])
    )
    with deadline(60):  # complete and unchanged: returned at once, Ray not needed
        assert main(ray_cache["args"]) == 0
    assert '"scored_now": 0' in capsys.readouterr().out


def _cfg(teacher, cache, data_dir, out, **kw) -> DistillConfig:
    values = dict(
        teacher=str(teacher), teacher_cache=cache, data_dir=data_dir, out=out, prompt=PROMPT,
        student={"num_layers": 2}, batch_size=4, max_steps=6, eval_every=3, eval_max_records=18, checkpoint_every=2,
        lr=1e-3, warmup_ratio=0.0, device="cpu", progress=False,
    )  # fmt: skip
    values.update(kw)
    return from_dict(DistillConfig, values)


@pytest.fixture(scope="module")
def single(ray_cache, teacher_dir, tiny_data_dir, tmp_path_factory) -> dict:
    """The single-process reference run on the Ray-written cache."""
    out = tmp_path_factory.mktemp("single") / "student"
    summary = distill(_cfg(teacher_dir, ray_cache["out"], tiny_data_dir, out))
    return {"summary": summary, "weights": load_file(str(out / "model.safetensors"))}


def _assert_same_student(out: Path, single: dict, atol: float = 2e-4) -> None:
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(single["weights"])
    for key, value in single["weights"].items():
        torch.testing.assert_close(got[key], value, atol=atol, rtol=1e-3)


def test_two_workers_match_the_single_process_student_without_hanging(ray_local, ray_cache, single, teacher_dir,
                                                                      tiny_data_dir, tmp_path, capsys):  # fmt: skip
    out = tmp_path / "student"
    args = ["distill", "--backend", "ray", "--out", str(out), f"teacher={teacher_dir}",
            f"teacher_cache={ray_cache['out']}", f"data_dir={tiny_data_dir}", "student.num_layers=2", "batch_size=4",
            "max_steps=6", "eval_every=3", "eval_max_records=18", "checkpoint_every=2", "lr=1e-3", "warmup_ratio=0",
            "device=cpu", "progress=false", "ray.workers=2", "ray.cpus_per_worker=1",
            *[f"prompt.{k}={v}" for k, v in PROMPT.items()]]  # fmt: skip
    start = time.perf_counter()
    with deadline(420):
        assert main(args) == 0
    assert "ray: 2 workers" in capsys.readouterr().out
    manifest = read_manifest(out)
    m, ref = manifest["metrics"], single["summary"]
    assert m["steps"] == ref["steps"] == 6 and m["train_records"] == ref["train_records"]
    for key in ("best_val_auc", "final_val_auc", "test_auc"):
        assert m[key] == pytest.approx(ref[key], abs=1e-3), key
    _assert_same_student(out, single)
    ray_stats = m["ray"]
    assert (
        ray_stats["workers"] == 2 and ray_stats["restored_from_step"] == 0 and ray_stats["samples_per_s"] > 0
    )
    assert 0 < ray_stats["startup_s"] < time.perf_counter() - start
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 6 and lines[-1]["loss"] == pytest.approx(_last_loss(single), rel=1e-3)
    assert not out.with_name("student.work").exists() and not out.with_name("student.ray").exists()


def _last_loss(single: dict) -> float:
    out = Path(single["summary"]["out"])
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]["loss"]


def test_a_killed_worker_is_replaced_and_training_continues_from_the_checkpoint(ray_local, ray_cache, single,
                                                                                teacher_dir, tiny_data_dir, tmp_path):  # fmt: skip
    from recsys_slm.distributed.train import distill_ray

    out = tmp_path / "student"
    cfg = _cfg(teacher_dir, ray_cache["out"], tiny_data_dir, out)
    with deadline(480):
        summary = distill_ray(cfg, RayConfig(workers=2, max_failures=1), fault={"rank": 1, "after_step": 2})
    assert summary["ray"]["restored_from_step"] == 2 and summary["steps"] == 6
    _assert_same_student(out, single)


def test_resources_that_cannot_fit_fail_at_once(ray_local, ray_cache, teacher_dir, tiny_data_dir, tmp_path):
    from recsys_slm.distributed.session import RayResourceError
    from recsys_slm.distributed.train import distill_ray

    cfg = _cfg(teacher_dir, ray_cache["out"], tiny_data_dir, tmp_path / "s")
    with (
        deadline(30),
        pytest.raises(RayResourceError, match=r"3 training workers × 1 CPU = 3 CPUs.*has 2.*ray\.workers"),
    ):
        distill_ray(cfg, RayConfig(workers=3))


def test_a_local_ray_writes_only_under_the_run_dir(tmp_path):
    """A fresh HOME and system temp dir stay empty: no ~/.ray/auth_token, no /tmp/ray, no short-path symlink left."""
    import hashlib
    import os
    import subprocess
    import sys

    home, systmp, run = tmp_path / "home", tmp_path / "systmp", tmp_path / ("deep" * 12) / "student.ray"
    home.mkdir()
    systmp.mkdir()
    code = (
        "import ray.data\n"
        "from pathlib import Path\n"
        "from recsys_slm.distributed.config import RayConfig\n"
        "from recsys_slm.distributed.session import ray_session\n"
        f"with ray_session(RayConfig(num_cpus=1), Path({str(run)!r})) as info:\n"
        "    assert info.started and ray.data.range(10).map_batches(lambda b: b).count() == 10\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), TMPDIR=str(systmp))
    with deadline(180):
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=170)
    assert not any(home.iterdir()), list(home.iterdir())
    assert not any(systmp.iterdir()), list(systmp.iterdir())  # the deep TMPDIR's short link went to /tmp
    assert not list(Path("/tmp").glob(f"rsr-{hashlib.sha1(str(run / 'tmp').encode()).hexdigest()[:10]}"))
    assert any((run / "tmp").glob("session_*/logs"))
