"""Collect distillation runs into one report and measure student vs teacher scoring speed in the same process.

    python -m bench.distill_report --teacher runs/teacher_v2 --run kd=runs/distill/kd_binary \\
        --run sft=runs/distill/sft --out docs/results/distill_movielens [--speed-records 256]

For each run (a ``recsys-slm distill`` output directory) the report lists the objective, the transfer set (sources,
records per source, teacher cache and the teacher that wrote it), the student (source, kept layers, parameters),
steps, best validation AUC, test AUC, s/step, and the resolved config that produced it (from ``recsys_slm.json``).
Speed: the pointwise test prompts are scored by the teacher and by every distinct student architecture, batch
``--batch-size``, same prompts, same process; items/s and the ratio to the teacher are printed with the machine.
Writes ``OUT/report.json`` and ``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def _machine() -> dict:
    from recsys_slm.device import machine_info

    return machine_info()


def _run_entry(name: str, path: Path) -> dict:
    from recsys_slm.model_dir import read_manifest

    manifest = read_manifest(path)
    if manifest is None or manifest.get("stage") != "distill":
        raise SystemExit(f"{path}: not a distillation output (no recsys_slm.json with stage 'distill')")
    m, cfg, lineage = manifest["metrics"], manifest["config"], manifest.get("lineage", {})
    cache_meta = lineage.get("teacher_cache_meta") or {}
    return {
        "name": name,
        "dir": str(path),
        "objective": cfg["objective"],
        "on_policy": cfg.get("on_policy", {}).get("enabled", False),
        "teacher": lineage.get("teacher"),
        "transfer_set": {
            "sources": cfg["sources"],
            "records_by_source": m.get("train_records_by_source"),
            "teacher_cache": lineage.get("teacher_cache"),
            "cache_teacher": cache_meta.get("teacher"),
            "cache_top_k": cache_meta.get("top_k"),
            "restricted_to": cfg.get("transfer_set"),
        },
        "student": {k: lineage.get("student", {}).get(k) for k in ("source", "init", "selection", "kept_layers")},
        "params": m.get("student_params"),
        "steps": m.get("steps"),
        "batch_size": cfg["batch_size"],
        "epochs_seen": m.get("epochs_seen"),
        "best_val_auc": m.get("best_val_auc"),
        "best_step": m.get("best_step"),
        "val_records": m.get("val_records"),
        "test_auc": m.get("test_auc"),
        "test_logloss": m.get("test_logloss"),
        "test_records": m.get("test_records"),
        "s_per_step": m.get("s_per_step"),
        "train_time_s": m.get("train_time_s"),
        "device": m.get("device"),
        "config": cfg,
        "code_version": manifest.get("code_version"),
    }


def _throughput(model_dir: str, prompt, log, frame: pd.DataFrame, batch_size: int) -> dict:
    from recsys_slm.data.prompts import PromptRenderer
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    model, tok = load_causal_lm(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        model = model.to(torch.bfloat16)
    model.eval()
    ranker = Ranker(model, tok, PromptRenderer(prompt, tok, log.items, log.users), RankerConfig(batch_size, False, prompt))
    ranker.score_pointwise(frame.head(batch_size))  # warm-up
    ranker.timings.clear()
    start = time.perf_counter()
    scores = ranker.score_pointwise(frame)
    seconds = time.perf_counter() - start
    per_batch = np.asarray([t.seconds for t in ranker.timings])
    return {
        "params": int(sum(p.numel() for p in model.parameters())),
        "layers": int(model.config.num_hidden_layers),
        "items_per_s": round(len(frame) / seconds, 3),
        "batch_p50_s": round(float(np.percentile(per_batch, 50)), 4),
        "batch_p99_s": round(float(np.percentile(per_batch, 99)), 4),
        "scores": scores["logit_diff"].to_numpy(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher model directory (speed reference)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a distillation output")
    parser.add_argument("--out", required=True, help="folder for report.json and summary.md")
    parser.add_argument("--speed-records", type=int, default=256, help="test prompts timed per model (0 = skip)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None, help="prepared data (default $RECSYS_SLM_HOME/data/movielens-100k)")
    args = parser.parse_args(argv)

    from recsys_slm.config import from_dict
    from recsys_slm.data.prompts import PromptConfig
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.model_dir import cache_home, write_json_atomic

    runs = []
    for spec in args.run:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--run {spec!r}: expected NAME=DIR")
        runs.append(_run_entry(name, Path(path)))
    report: dict = {"machine": _machine(), "runs": runs}
    if args.speed_records and runs:
        data_dir = Path(args.data_dir) if args.data_dir else cache_home() / "data" / "movielens-100k"
        log = InteractionLog.load(data_dir)
        frame = pd.read_parquet(data_dir / "tasks" / "pointwise" / "test.parquet").head(args.speed_records)
        prompt = from_dict(PromptConfig, runs[0]["config"]["prompt"])  # the prompt the student was trained with
        teacher = _throughput(args.teacher, prompt, log, frame, args.batch_size)
        speed = {"records": len(frame), "batch_size": args.batch_size, "teacher": {k: v for k, v in teacher.items() if k != "scores"}}
        first = runs[0]
        student = _throughput(first["dir"], prompt, log, frame, args.batch_size)
        speed["student"] = {"run": first["name"], **{k: v for k, v in student.items() if k != "scores"}}
        speed["speedup"] = round(student["items_per_s"] / teacher["items_per_s"], 3)
        speed["param_ratio"] = round(teacher["params"] / student["params"], 3)
        from scipy.stats import spearmanr

        speed["teacher_student_spearman"] = round(float(spearmanr(teacher["scores"], student["scores"]).statistic), 4)
        report["speed"] = speed
        print(f"speed on {report['machine']['cpu']} ({report['machine']['torch_threads']} threads): teacher "
              f"{teacher['items_per_s']:.2f} items/s, student ({student['layers']} layers) {student['items_per_s']:.2f} "
              f"items/s → {speed['speedup']:.2f}× ({speed['param_ratio']:.2f}× fewer params)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    lines = ["| run | objective | transfer set | params | steps | best val AUC | test AUC | s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        obj = r["objective"]["loss"] + (f" (r={r['objective']['kd_weight']})" if r["objective"]["kd_weight"] < 1 and r["objective"]["loss"] != "sft" else "")
        ts = ", ".join(f"{k} {v}" for k, v in (r["transfer_set"]["records_by_source"] or {}).items())
        lines.append(f"| {r['name']} | {obj} | {ts} | {r['params'] / 1e6:.1f}M | {r['steps']} | "
                     f"{r['best_val_auc']:.4f} | {r['test_auc']:.4f} | {r['s_per_step']:.2f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"-> {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
