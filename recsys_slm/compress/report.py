"""The compression report: per-model size, quality and speed, written as ``report.json``, ``report.md`` and
``quality_vs_cost.png`` (schema in ``docs/compress.md``).

Quality (AUC on the pointwise test task, NDCG@10 on the candidate task) comes from the ranker evaluation harness
(:func:`recsys_slm.evaluation.ranker_eval.evaluate_ranker`), run by the pipeline. Speed is measured here by
:func:`measure_speed`, for every model **in the same process, one after the other**, on the same prompts:

* ``items_per_s``: prompts scored per second of forward time, ``speed_batch_size`` prompts per forward
  (after one warm-up batch), over the first ``speed_records`` pointwise test records;
* ``latency_p50_ms`` / ``latency_p99_ms``: percentiles of the wall time of one single-prompt call (batch 1,
  ``latency_requests`` calls), the latency of scoring one (user, item) pair;
* ``batch_latency_p50_ms`` / ``batch_latency_p99_ms``: the same for the batched calls.

Plots use matplotlib's object API on the Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from recsys_slm.model_dir import code_version, read_manifest, write_json_atomic

METRIC_KEYS = ("auc", "ndcg@10", "items_per_s", "latency_p50_ms", "latency_p99_ms")
PLOT_FILE = "quality_vs_cost.png"
# The targets for the final student against the teacher (shown in the report, pass or miss).
TARGETS = {"non_embedding_param_ratio_max": 1 / 3, "auc_ratio_min": 0.97, "speedup_min": 2.0}


def machine() -> dict[str, Any]:
    """This process's machine (:func:`recsys_slm.device.machine_info`)."""
    from recsys_slm.device import machine_info

    return machine_info()


def model_sizes(model) -> dict[str, Any]:
    """Total parameters (tied weights once), non-embedding parameters, decoder layers and widths."""
    from recsys_slm.prune.structure import layer_widths, non_embedding_params

    sizes: dict[str, Any] = {
        "params": int(sum(p.numel() for p in model.parameters())),
        "non_embedding_params": int(non_embedding_params(model)),
    }
    try:
        widths = layer_widths(model)
        sizes["layers"] = len(widths)
        distinct = {w for w in widths}
        sizes["widths"] = widths[0].__dict__ if len(distinct) == 1 else [w.__dict__ for w in widths]
    except (AttributeError, ValueError):
        sizes["layers"] = getattr(model.config, "num_hidden_layers", None)
        sizes["widths"] = None
    return sizes


def measure_speed(spec: str, records, log, prompt, batch_size: int, latency_requests: int,
                  device: str = "auto") -> dict[str, Any]:  # fmt: skip
    """Load ``spec`` and time verbalizer scoring of ``records`` (see the module docstring).

    Args:
        spec: model directory (or packaged name).
        records (pd.DataFrame): pointwise records (user_id, item_id, history_item_ids, history_labels, label).
        log: the :class:`~recsys_slm.data.schema.InteractionLog` (item and user tables for the prompts).
        prompt (PromptConfig): the prompt.
        batch_size (int): prompts per forward for items/s.
        latency_requests (int): single-prompt calls for the latency percentiles.
        device (str): "auto", "cpu", "cuda", ...

    Returns:
        dict: items_per_s, latency_p50_ms, latency_p99_ms, batch_latency_p50_ms, batch_latency_p99_ms, prompts,
        prompt_tokens_mean, plus :func:`model_sizes`.
    """
    import torch

    from recsys_slm.data.prompts import PromptRenderer
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.ranker.batching import encode_records
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    model, tokenizer = load_causal_lm(spec, device=device)
    ranker = Ranker(model, tokenizer, PromptRenderer(prompt, tokenizer, log.items, log.users),
                    RankerConfig(batch_size, False, prompt))  # fmt: skip
    sequences = encode_records(records, ranker.renderer, ranker.encode).sequences
    scorer = ranker.scorer
    cuda = next(model.parameters()).device.type == "cuda"

    def timed(chunk) -> float:
        start = time.perf_counter()
        scorer.score_token_ids(chunk)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(sequences[:batch_size])  # warm-up (allocations, kernel selection)
        batches = [timed(sequences[i : i + batch_size]) for i in range(0, len(sequences), batch_size)]
        singles = [timed([s]) for s in sequences[:latency_requests]]
    batch_ms = np.asarray(batches) * 1000.0
    single_ms = np.asarray(singles) * 1000.0
    out = {
        "items_per_s": len(sequences) / float(sum(batches)) if batches else None,
        "latency_p50_ms": float(np.percentile(single_ms, 50)) if single_ms.size else None,
        "latency_p99_ms": float(np.percentile(single_ms, 99)) if single_ms.size else None,
        "batch_latency_p50_ms": float(np.percentile(batch_ms, 50)) if batch_ms.size else None,
        "batch_latency_p99_ms": float(np.percentile(batch_ms, 99)) if batch_ms.size else None,
        "prompts": len(sequences),
        "prompt_tokens_mean": float(np.mean([len(s) for s in sequences])) if sequences else None,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        **model_sizes(model),
    }
    return out


def _train_summary(model_dir: str) -> dict[str, Any] | None:
    """Training / pruning figures from a stage directory's manifest (None for the teacher or a missing one)."""
    path = Path(model_dir).expanduser()
    manifest = read_manifest(path) if path.is_dir() else None
    if not manifest:
        return None
    m = manifest.get("metrics") or {}
    out = {"stage": manifest.get("stage"), "parent": manifest.get("parent"),
           "record": manifest.get("compress")}  # fmt: skip
    for key in ("steps", "planned_steps", "best_val_auc", "best_step", "final_val_auc", "s_per_step",
                "train_time_s", "train_records", "non_embedding_param_ratio", "forward_speedup", "method",
                "heads_added_per_layer", "neurons_added_per_layer", "params_added"):  # fmt: skip
        if key in m:
            out[key] = m[key]
    if manifest.get("stage") == "prune":
        out["val_auc_before"] = (m.get("before") or {}).get("val_auc")
        out["val_auc_after"] = (m.get("after") or {}).get("val_auc")
    return out


def _entry(name: str, model_dir: str, quality: dict[str, Any], speed: dict[str, Any], eval_dir: Path) -> dict:
    model_q = quality.get("model", {})
    metrics = {
        "auc": model_q.get("auc"),
        "ndcg@10": model_q.get("ndcg@10"),
        "items_per_s": speed.get("items_per_s"),
        "latency_p50_ms": speed.get("latency_p50_ms"),
        "latency_p99_ms": speed.get("latency_p99_ms"),
        "batch_latency_p50_ms": speed.get("batch_latency_p50_ms"),
        "batch_latency_p99_ms": speed.get("batch_latency_p99_ms"),
    }
    for key in ("log_loss", "accuracy", "recall@10", "mrr@10", "ndcg@1"):
        if key in model_q:
            metrics[key] = model_q[key]
    return {
        "name": name,
        "model_dir": str(model_dir),
        "params": speed.get("params"),
        "non_embedding_params": speed.get("non_embedding_params"),
        "layers": speed.get("layers"),
        "widths": speed.get("widths"),
        "metrics": metrics,
        "eval_dir": str(eval_dir),
        "train": _train_summary(model_dir),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def auc_intervals(eval_dirs: dict[str, Path], final: str, reference: str, others: list[str],
                  n_resamples: int) -> dict[str, Any]:  # fmt: skip
    """Paired cluster-bootstrap intervals (users resampled) of the final model's test AUC against ``reference``
    (ratio and difference) and against each of ``others`` (difference), from the ``pointwise/predictions.parquet``
    each evaluation wrote. ``{"unavailable": reason}`` when a file is missing or the records differ (then the
    comparison is not paired).
    """
    import pandas as pd

    from recsys_slm.metrics.bootstrap import paired_metric_ci
    from recsys_slm.metrics.classification import auc

    frames = {}
    for name in [final, reference, *others]:
        path = Path(eval_dirs[name]) / "pointwise" / "predictions.parquet"
        if not path.is_file():
            return {"unavailable": f"{path} is missing"}
        frames[name] = pd.read_parquet(path, columns=["user_id", "label", "score"])
    base = frames[final]
    for name, f in frames.items():
        if len(f) != len(base) or not (f["label"].to_numpy() == base["label"].to_numpy()).all():
            return {"unavailable": f"{name}'s pointwise records differ from {final}'s"}
    labels, users = base["label"].to_numpy(), base["user_id"].astype(str).tolist()
    out = {"method": "paired cluster bootstrap over users (recsys_slm.metrics.bootstrap.paired_metric_ci)"}
    for name in [reference, *others]:
        out[name] = paired_metric_ci(auc, labels, frames[name]["score"], base["score"], users,
                                     n_resamples=n_resamples)  # fmt: skip
    return out


def final_checks(stages: list[dict], ablations: list[dict], intervals: dict[str, Any] | None = None) -> dict[str, Any]:
    """The final student against the teacher and the ablations, with the issue's targets (met, and by how much).

    With ``intervals`` (:func:`auc_intervals`), the AUC checks carry ``interval``: the 95% interval of the ratio
    (vs the teacher) or of the difference (vs an ablation)."""
    by = {s["name"]: s for s in stages}
    teacher, final = by.get("teacher"), by.get("redistill")
    if teacher is None or final is None:
        return {}
    t, f = teacher["metrics"], final["metrics"]
    ratios = {
        "non_embedding_param_ratio": _ratio(final["non_embedding_params"], teacher["non_embedding_params"]),
        "param_ratio": _ratio(final["params"], teacher["params"]),
        "auc_ratio": _ratio(f["auc"], t["auc"]),
        "ndcg@10_ratio": _ratio(f["ndcg@10"], t["ndcg@10"]),
        "speedup": _ratio(f["items_per_s"], t["items_per_s"]),
        "latency_p50_ratio": _ratio(f["latency_p50_ms"], t["latency_p50_ms"]),
    }
    checks = []

    def add(name: str, value: float | None, target: float, higher_is_better: bool) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        checks.append({"check": name, "value": value, "target": target, "met": met,
                       "margin": None if value is None else (value - target if higher_is_better else target - value)})  # fmt: skip

    add("non_embedding_params / teacher <= 1/3", ratios["non_embedding_param_ratio"],
        TARGETS["non_embedding_param_ratio_max"], False)  # fmt: skip
    intervals = intervals or {}
    add("test AUC / teacher >= 0.97", ratios["auc_ratio"], TARGETS["auc_ratio_min"], True)
    if "teacher" in intervals:
        checks[-1]["interval"] = [intervals["teacher"]["low"], intervals["teacher"]["high"]]
    add("items/s / teacher >= 2", ratios["speedup"], TARGETS["speedup_min"], True)
    for a in ablations:
        add(f"test AUC - ablation {a['name']} > 0", None if f["auc"] is None or a["metrics"]["auc"] is None
            else f["auc"] - a["metrics"]["auc"], 0.0, True)  # fmt: skip
        if checks[-1]["met"] is not None:
            checks[-1]["met"] = checks[-1]["value"] > 0
        if a["name"] in intervals:
            checks[-1]["interval"] = [intervals[a["name"]]["diff_low"], intervals[a["name"]]["diff_high"]]
    return {"name": "redistill", "vs_teacher": ratios, "checks": checks, "intervals": intervals}


def build_report(run, models, quality: dict[str, dict], baselines: dict[str, dict], prompt,
                 records: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Measure every model's speed in this process and assemble the report (schema: ``docs/compress.md``)."""
    from recsys_slm.config import config_to_dict
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.evaluation.ranker_eval import load_task

    cfg = run.cfg
    e = cfg.eval
    log = InteractionLog.load(run.data_dir)
    frame, _, _ = load_task(run.pointwise_task(), e.speed_records)
    speeds = {}
    for m in models:
        run.log(f"speed {m.name}: {len(frame)} prompts, batch {e.speed_batch_size}; {e.latency_requests} single calls")
        speeds[m.name] = measure_speed(m.model_dir, frame, log, prompt, e.speed_batch_size, e.latency_requests,
                                       cfg.device)  # fmt: skip
    stages = [_entry(m.name, m.model_dir, quality[m.name], speeds[m.name], run.out / "eval" / m.name)
              for m in models if m.kind == "stage"]  # fmt: skip
    ablations = [_entry(m.name, m.model_dir, quality[m.name], speeds[m.name], run.out / "eval" / m.name)
                 for m in models if m.kind == "ablation"]  # fmt: skip
    baseline_rows = [
        {"name": name, "metrics": {k: v for k, v in values.items()}}
        for name, values in baselines.items() if not name.startswith("_")
    ]  # fmt: skip
    notes = [cfg.note] if cfg.note else []
    intervals = {}
    names = {s["name"] for s in stages}
    if e.bootstrap_resamples and e.pointwise and {"teacher", "redistill"} <= names:
        intervals = auc_intervals({m.name: run.out / "eval" / m.name for m in models}, "redistill", "teacher",
                                  [a["name"] for a in ablations], e.bootstrap_resamples)  # fmt: skip
    if "unavailable" in intervals:  # said, not silently left out
        notes.append(f"no AUC intervals: {intervals.pop('unavailable')}")
    records_by_kind = (quality.get("teacher") or {}).get("_records", {})
    if records.get("regrow") is not None:
        notes.append(f"redistill starts from the pruned model with {cfg.regrow:.0%} of the removed heads/neurons "
                     f"re-added ({cfg.regrow_init} init, function-preserving): see {run.out / '02_regrow'}")  # fmt: skip
    return {
        "teacher": str(cfg.teacher),
        "stages": stages,
        "ablations": ablations,
        "baselines": baseline_rows,
        "final": final_checks(stages, ablations, intervals),
        "redistill_teacher_source": cfg.redistill["teacher_source"],
        "eval": {
            "pointwise_task": str(run.pointwise_task()) if e.pointwise else None,
            "candidates_task": str(run.candidates_task()) if e.candidates else None,
            "records": records_by_kind,
            "speed": {"records": len(frame), "batch_size": e.speed_batch_size, "latency_requests": e.latency_requests,
                      "same_process": True},  # fmt: skip
            "machine": machine(),
        },
        "stage_records": records,
        "run": {"ran": run.ran, "skipped": run.skipped, "from_stage": run.from_step},
        "notes": notes,
        "prompt": config_to_dict(prompt),
        "config": config_to_dict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
    }


# ------------------------------------------------------------------------------------------------- output
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _millions(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}M"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): every stage, ablation and baseline with size, quality and speed."""
    header = ["model", "kind", "params", "non-emb params", "AUC", "NDCG@10", "items/s", "p50 ms", "p99 ms"]
    rows = []
    for kind in ("stages", "ablations"):
        for s in report[kind]:
            m = s["metrics"]
            rows.append([s["name"], kind[:-1], _millions(s["params"]), _millions(s["non_embedding_params"]),
                         _fmt(m["auc"]), _fmt(m["ndcg@10"]), _fmt(m["items_per_s"], 2), _fmt(m["latency_p50_ms"], 1),
                         _fmt(m["latency_p99_ms"], 1)])  # fmt: skip
    for b in report["baselines"]:
        m = b["metrics"]
        rows.append([b["name"], "baseline", "–", "–", _fmt(m.get("auc")), _fmt(m.get("ndcg@10")), "–", "–", "–"])
    return header, rows


def text_table(report: dict[str, Any]) -> str:
    """Fixed-width per-model table for the terminal."""
    header, rows = table_rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: notes, the per-model table, the final student against the teacher, the plot."""
    header, rows = table_rows(report)
    ev = report["eval"]
    lines = ["# Compression report", ""]
    lines += [f"> {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    lines += [
        f"- teacher: `{report['teacher']}`",
        f"- re-distillation teacher: {report['redistill_teacher_source']}",
        f"- AUC: `{ev['pointwise_task']}` ({ev['records'].get('pointwise', '–')} records); NDCG@10: "
        f"`{ev['candidates_task']}` ({ev['records'].get('candidates', '–')} lists)",
        f"- speed: {ev['speed']['records']} pointwise prompts at batch {ev['speed']['batch_size']} (items/s), "
        f"{ev['speed']['latency_requests']} single-prompt calls (latency p50/p99), every model in one process on "
        f"{ev['machine']['cpu']} (torch threads: {ev['machine']['torch_threads']}"
        + (f", GPU {ev['machine']['gpu']}" if ev["machine"]["gpu"] else "") + ")",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    final = report.get("final") or {}
    if final:
        lines += ["## Final student vs teacher", "", "| check | value | 95% interval | target | met |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for c in final["checks"]:
            met = "–" if c["met"] is None else ("yes" if c["met"] else f"**no** (by {_fmt(abs(c['margin']))})")
            ci = f"[{_fmt(c['interval'][0])}, {_fmt(c['interval'][1])}]" if c.get("interval") else "–"
            lines.append(f"| {c['check']} | {_fmt(c['value'])} | {ci} | {_fmt(c['target'])} | {met} |")
        if final.get("intervals"):
            lines += ["", "Intervals: paired bootstrap over users (each drawn user brings all their records, "
                      "for both models), so they are wide when the task has few users."]  # fmt: skip
        lines.append("")
    lines += [f"![quality vs cost]({PLOT_FILE})", "", "Schema and definitions: `docs/compress.md`.", ""]
    return "\n".join(lines)


def plot_quality_vs_cost(path: str | Path, report: dict[str, Any]) -> Path:
    """Two panels: test AUC vs non-embedding parameters (log) and vs items/s; stages joined in pipeline order,
    ablations as separate markers, baselines as horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    panels = [("non_embedding_params", "non-embedding parameters", True), ("items_per_s", "items/s (same process, same prompts)", False)]
    for k, (key, label, log_x) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)

        def x_of(entry: dict, key: str = key) -> float | None:
            return entry.get(key) if key == "non_embedding_params" else entry["metrics"].get(key)

        pts = [(x_of(s), s["metrics"]["auc"], s["name"]) for s in report["stages"]]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color="tab:blue", label="pipeline stages")
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        abl = [(x_of(a), a["metrics"]["auc"], a["name"]) for a in report["ablations"]]
        abl = [p for p in abl if p[0] is not None and p[1] is not None]
        if abl:
            ax.scatter([p[0] for p in abl], [p[1] for p in abl], marker="s", color="tab:orange", label="ablations")
            for x, y, name in abl:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        for i, b in enumerate(report["baselines"]):
            if b["metrics"].get("auc") is not None:
                ax.axhline(b["metrics"]["auc"], linestyle=":", linewidth=0.8, color=f"C{(i + 2) % 10}",
                           label=f"baseline {b['name']}")  # fmt: skip
        if log_x and (pts or abl):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test AUC")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("quality vs cost")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_report(out: str | Path, report: dict[str, Any]) -> None:
    """``OUT/report.json``, ``OUT/report.md`` and ``OUT/quality_vs_cost.png``, each via a temporary file + rename."""
    from recsys_slm.evaluation.report import json_safe

    out = Path(out)
    tmp_png = out / f".{PLOT_FILE}.tmp.png"
    plot_quality_vs_cost(tmp_png, report)
    tmp_png.replace(out / PLOT_FILE)
    tmp_md = out / ".report.md.tmp"
    tmp_md.write_text(markdown(report))
    tmp_md.replace(out / "report.md")
    write_json_atomic(out / "report.json", json_safe(report))
