"""Distillation throughput with Ray Train: samples/s for 1 vs 2 workers, the fixed start-up overhead, and the
student's quality against the single-process run (same config, same global batch and seed).

    # MovieLens-100K, the real teacher's cache (see docs/ray.md for the commands that make them)
    python -m bench.ray_distill --config pipelines/configs/distill/smollm2_movielens.yaml \\
        --runs runs/ray_distill --report docs/results/ray_distill/report.json --cpus 2 \\
        teacher=$RECSYS_SLM_HOME/runs/teacher/smollm2-135m-instruct \\
        teacher_cache=runs/distill/scores_smollm2_4k_4k.parquet "sources=[labelled]" objective.loss=binary_kl
    # tiny, self-contained version (synthetic log, tiny random teacher; about 3 minutes on 2 cores)
    python -m bench.ray_distill --tiny /tmp/ray_distill_tiny --cpus 2

Runs, in order: ``single`` (``recsys-slm distill``, one process, ``torch`` threads = ``--cpus``), then
``backend=ray`` with ``ray.workers=W`` and ``ray.cpus_per_worker=--cpus/W`` for each W of ``--workers`` (each in
a fresh local Ray, so ``ray_init_s`` is paid every time). Each run's output directory is kept (skip a run by
leaving its directory in place; ``--force`` reruns). The report holds per run: samples/s (records per second of
optimizer steps), s/step, the start-up overhead (``fit()`` → first optimizer step: worker start, process group,
model and data setup) and Ray's own init, wall time, test/val AUC, and each Ray run's AUC difference to the
single-process run, plus the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path


def _tiny_inputs(root: Path) -> list[str]:
    """A prepared synthetic log, a tiny teacher and its cache; returns the distill overrides that use them."""
    from bench.synthetic_log import generate
    from recsys_slm.data.prepare import DataPrepareConfig, prepare_dataset
    from recsys_slm.distill.teacher_cache import TeacherScoreConfig, score_task
    from recsys_slm.distill.transfer_set import TransferSetConfig, build_transfer_set
    from recsys_slm.models.tiny import build_tiny_causal_lm

    data, teacher, cache = root / "data", root / "teacher", root / "cache.parquet"
    prompt = {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400}
    if not (data / "tasks").is_dir():
        generate(root / "log", rows=3000, files=3, users=60, items=80, seed=0, single_file=True)
        prepare_dataset(DataPrepareConfig(dataset="logs", source=root / "log", out=data,
                                          pointwise={"history_len": 5, "max_records": 2000}))  # fmt: skip
    if not teacher.is_dir():
        build_tiny_causal_lm(teacher, seed=5, num_layers=4)
    if not cache.is_file():
        frame, _ = build_transfer_set(TransferSetConfig(data_dir=data, max_labelled=800))
        frame.to_parquet(root / "transfer.parquet", index=False)
        score_task(TeacherScoreConfig(model=str(teacher), task=root / "transfer.parquet", out=cache, data_dir=data,
                                      prompt=prompt, top_k=8, device="cpu"), progress=False)  # fmt: skip
    return [f"teacher={teacher}", f"teacher_cache={cache}", f"data_dir={data}", "student.num_layers=2",
            "batch_size=16", "max_steps=40", "eval_every=20", "eval_max_records=200", "checkpoint_every=20",
            "lr=1e-3", "device=cpu", *[f"prompt.{k}={v}" for k, v in prompt.items()]]  # fmt: skip


def _row(name: str, metrics: dict, config: dict, wall: float, cmd: str) -> dict:
    ray = metrics.get("ray") or {}
    global_batch = config["batch_size"] * config["grad_accum"]
    return {
        "run": name,
        "workers": ray.get("workers", 1),
        "cpus_per_worker": ray.get("cpus_per_worker"),
        "steps": metrics["steps"],
        "global_batch": global_batch,
        # the same formula for every run (nominal batches); Ray's exact record count is ray_samples_per_s
        "samples_per_s": round(metrics["steps"] * global_batch / metrics["train_time_s"], 3),
        "ray_samples_per_s": ray.get("samples_per_s"),
        "s_per_step": metrics.get("s_per_step"),
        "train_time_s": metrics.get("train_time_s"),
        "startup_s": ray.get("startup_s"),
        "ray_init_s": ray.get("ray_init_s"),
        "fit_s": ray.get("fit_s"),
        "wall_s": round(wall, 2),
        "test_auc": metrics.get("test_auc"),
        "best_val_auc": metrics.get("best_val_auc"),
        "command": cmd,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="distill YAML config")
    parser.add_argument(
        "--runs", type=Path, default=None, help="output directories (default RUNS=--tiny/runs)"
    )
    parser.add_argument("--report", type=Path, default=None, help="report JSON (default RUNS/report.json)")
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs for every run")
    parser.add_argument(
        "--tiny", type=Path, default=None, help="build tiny inputs in this directory and use them"
    )
    parser.add_argument("--force", action="store_true", help="rerun runs whose output exists")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import torch

    from recsys_slm.cli import main as cli
    from recsys_slm.model_dir import read_manifest, write_json_atomic

    overrides = list(args.overrides)
    if args.tiny is not None:
        overrides = _tiny_inputs(args.tiny) + overrides
    runs = args.runs or (args.tiny / "runs" if args.tiny else Path("runs/ray_distill"))
    report_path = args.report or runs / "report.json"
    base = ["distill", *(["--config", args.config] if args.config else []), "progress=false", *overrides]
    plan = [("single", [], args.cpus)]
    for w in (int(x) for x in args.workers.split(",")):
        share = args.cpus / w
        plan.append((f"ray_{w}w", ["--backend", "ray", f"ray.workers={w}", f"ray.cpus_per_worker={share:g}",
                                   f"ray.num_cpus={args.cpus}"], args.cpus))  # fmt: skip
    rows = []
    for name, extra, threads in plan:
        out = runs / name
        argv_run = [base[0], *extra[:2], "--out", str(out), *base[1:], *extra[2:]]
        cmd = "recsys-slm " + " ".join(shlex.quote(a) for a in argv_run)
        start = time.perf_counter()
        if args.force or not (out / "recsys_slm.json").is_file():
            torch.set_num_threads(threads)
            print(f"== {name}: {cmd}", flush=True)
            status = cli(argv_run)
            if status != 0:
                print(f"{name} failed with status {status}", file=sys.stderr)
                return status
        wall = time.perf_counter() - start
        manifest = read_manifest(out)
        rows.append(_row(name, manifest["metrics"], manifest["config"], wall, cmd))
    single = rows[0]
    for row in rows[1:]:
        for key in ("test_auc", "best_val_auc"):
            if row[key] is not None and single[key] is not None:
                row[f"{key}_diff_vs_single"] = round(row[key] - single[key], 5)
    report = {"cpus": args.cpus, "runs": rows, "note": "samples/s = training records per second of optimizer steps "
              "(validation excluded); startup_s = Ray Train fit() call to rank 0's first optimizer step"}  # fmt: skip
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report_path, report)
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k not in ("command", "out")}))
    print(f"report -> {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
