"""``evaluate_ranker``: score a task parquet with an LLM ranker and classical baselines; write a report directory.

    recsys-slm eval ranker --model DIR --task DATA/tasks/candidates/test.parquet --out OUT

Any task parquet in the documented schema can be evaluated; its kind is read from its columns:

* **pointwise** (user_id, item_id, timestamp, label, history_item_ids, history_labels): the model's score is
  ``logit_yes - logit_no`` (used for AUC; it never saturates the way P(yes) does in float32) and its probability
  ``p_yes`` (log loss, accuracy).
* **candidates** (user_id, target_item_id, timestamp, history_item_ids, history_labels, candidate_item_ids,
  candidate_labels): each candidate scored by the model, ranked under the tie rule of
  :mod:`recsys_slm.metrics.ranking`, NDCG/Recall/MRR at every k.

Outputs (written atomically into ``out``): ``report.json``, ``predictions.parquet``, ``summary.md``, a plot
(``roc.png`` or ``ranking.png``) and, for candidate tasks, ``run.trec`` + ``qrels.trec`` (plus one run per
method under ``runs/``). Formats: ``docs/evaluation.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys_slm.config import ConfigError, check, config_to_dict, from_dict, validate_fields
from recsys_slm.data.events import candidate_target_events
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.evaluation import exports
from recsys_slm.evaluation import report as report_mod
from recsys_slm.evaluation.baselines import (
    BaselineConfig,
    fit_baselines,
    task_events,
    training_interactions,
)
from recsys_slm.metrics.classification import pointwise_metrics
from recsys_slm.metrics.ranking import DEFAULT_KS, candidate_ranks, rank_of_targets, ranking_metrics
from recsys_slm.model_dir import atomic_dir, code_version, read_manifest, write_json_atomic

TaskKind = Literal["pointwise", "candidates"]
MODEL_METHOD = "model"
POINTWISE_COLUMNS = ("user_id", "item_id", "label", "history_item_ids", "history_labels")
CANDIDATE_COLUMNS = (
    "user_id",
    "history_item_ids",
    "history_labels",
    "candidate_item_ids",
    "candidate_labels",
)
TIE_RULE = "score descending, then item_id ascending (Python string order)"


@dataclass
class RankerEvalConfig:
    """Evaluation of one ranker (and/or the baselines) on one task parquet.

    Fields:
        model (str | None): packaged model name, model directory or hub id; None or "none" = baselines only.
            Default None.
        task (Path | None): the task parquet (pointwise or candidates, detected from its columns). Required.
        out (Path | None): output directory (replaced atomically). Required.
        data_dir (Path | None): prepared data directory (interactions/items/users parquet); default: the
            directory holding ``tasks/`` when the task file is ``DIR/tasks/<kind>/<split>.parquet``.
        batch_size (int): prompts per forward pass. Default 16.
        shared_prefix (bool): candidate tasks score a user's candidates with one prefix pass + KV-cache reuse.
            Default True.
        max_records (int | None): evaluate only the first N records of the task file (quick runs). Default None.
        baselines (bool): fit and report the classical baselines. Default True.
        ks (list[int]): ranking cut-offs. Default [1, 5, 10].
        device (str): "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ... Default "auto".
        prompt (PromptConfig): prompt templates and verbalizer; must match what the model was trained with.
        baseline_fit (BaselineConfig): baseline priors and regularisation.
    """

    model: str | None = None
    task: Path | None = None
    out: Path | None = None
    data_dir: Path | None = None
    batch_size: int = 16
    shared_prefix: bool = True
    max_records: int | None = None
    baselines: bool = True
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    device: str = "auto"
    prompt: PromptConfig = field(default_factory=PromptConfig)
    baseline_fit: BaselineConfig = field(default_factory=BaselineConfig)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.model is not None and self.model.strip().lower() in ("", "none"):
            self.model = None
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(
            self.max_records is None or self.max_records > 0,
            "max_records",
            f"must be a positive integer or null, got {self.max_records}",
        )
        check(len(self.ks) > 0, "ks", "needs at least one cut-off")
        check(all(k >= 1 for k in self.ks), "ks", f"cut-offs must be >= 1, got {self.ks}")
        check(len(set(self.ks)) == len(self.ks), "ks", f"cut-offs must be distinct, got {self.ks}")
        check(
            self.model is not None or self.baselines,
            "baselines",
            "model is none and baselines is false: nothing to evaluate",
        )


# ---------------------------------------------------------------------------------------------- inputs


def detect_task_kind(columns, source: str = "task") -> TaskKind:
    """``"candidates"`` or ``"pointwise"`` from a task frame's columns.

    Raises:
        ValueError: neither column set is complete (the message lists what each kind needs).
    """
    cols = set(columns)
    if set(CANDIDATE_COLUMNS) <= cols:
        return "candidates"
    if set(POINTWISE_COLUMNS) <= cols:
        return "pointwise"
    raise ValueError(
        f"{source}: cannot tell the task kind from its columns ({', '.join(sorted(map(str, cols)))}); "
        f"pointwise needs {', '.join(POINTWISE_COLUMNS)}; candidates needs {', '.join(CANDIDATE_COLUMNS)}"
    )


def resolve_data_dir(task: Path, data_dir: Path | None) -> Path:
    """``data_dir``, or DIR when ``task`` is ``DIR/tasks/<kind>/<split>.parquet``.

    Raises:
        ConfigError: no ``data_dir`` and the task file is not inside a prepared data directory.
    """
    if data_dir is not None:
        return Path(data_dir)
    resolved = Path(task).resolve()
    if resolved.parent.parent.name == "tasks":
        return resolved.parents[2]
    raise ConfigError(
        f"config key 'data_dir': not given and the task file {task} is not under DIR/tasks/<kind>/; "
        "pass data_dir=DIR (the directory holding interactions.parquet and items.parquet)"
    )


def load_task(path: Path, max_records: int | None = None) -> tuple[pd.DataFrame, TaskKind, int]:
    """Read a task parquet, detect its kind and keep the first ``max_records`` rows.

    Returns:
        tuple: (frame with a fresh 0..n-1 index, kind, number of records in the file).

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    frame = pd.read_parquet(path)
    kind = detect_task_kind(frame.columns, str(path))
    n_file = len(frame)
    if max_records is not None:
        frame = frame.head(max_records)
    return frame.reset_index(drop=True), kind, n_file


def baseline_training_data(
    interactions: pd.DataFrame, data_dir: Path, eval_frame: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, Any]]:
    """The baselines' training interactions and the pointwise train split (see :mod:`.baselines`).

    Excluded events: the evaluated records (or targets) themselves and the targets of
    ``DIR/tasks/candidates/{val,test}.parquet``; the time cut-off comes from ``DIR/tasks/pointwise/train.parquet``.

    Returns:
        tuple: (fit interactions, train records or None, info dict for the report).
    """
    train_path = data_dir / "tasks" / "pointwise" / "train.parquet"
    train = pd.read_parquet(train_path) if train_path.is_file() else None
    exclude = candidate_target_events(data_dir)
    has_time = "timestamp" in eval_frame.columns
    if has_time:
        exclude = exclude.append(task_events(eval_frame))
    fit = training_interactions(interactions, train, exclude)
    info = {
        "interactions": len(fit),
        "train_records": len(train) if train is not None else 0,
        "cutoff_timestamp": int(train["timestamp"].max()) if train is not None and len(train) else None,
        "excluded_events": int(exclude.unique().size),
        # Without timestamps the evaluated events cannot be matched, so they may be in the baselines' fit data.
        "evaluated_events_excluded": has_time,
    }
    return fit, train, info


# ---------------------------------------------------------------------------------------------- scoring


def throughput_stats(timings, wall_seconds: float) -> dict[str, Any]:
    """Throughput and per-call latency from ``Ranker.timings`` (one entry per forward / shared-prefix call).

    Returns:
        dict: prompts, batches, forward_seconds, prompts_per_s (forward time only), wall_seconds,
        wall_prompts_per_s (including prompt rendering and tokenisation), batch_latency_ms {p50, p99, mean}.
    """
    prompts = int(sum(t.prompts for t in timings))
    seconds = float(sum(t.seconds for t in timings))
    lat = np.asarray([t.seconds for t in timings], dtype=np.float64) * 1000.0
    return {
        "prompts": prompts,
        "batches": len(timings),
        "forward_seconds": seconds,
        "prompts_per_s": prompts / seconds if seconds > 0 else None,
        "wall_seconds": wall_seconds,
        "wall_prompts_per_s": prompts / wall_seconds if wall_seconds > 0 else None,
        "batch_latency_ms": {
            "p50": float(np.percentile(lat, 50)) if lat.size else None,
            "p99": float(np.percentile(lat, 99)) if lat.size else None,
            "mean": float(lat.mean()) if lat.size else None,
        },
    }


def resolve_prompt(configured: PromptConfig, manifest: dict | None) -> tuple[PromptConfig, str]:
    """The prompt to score with: the configured one, unless it is the default and the model directory's manifest
    records the prompt the model was trained with (a ranker scored with another prompt gives silently wrong
    metrics). Returns (prompt, source) with source "config" or "model manifest".
    """
    trained = ((manifest or {}).get("config") or {}).get("prompt")
    if trained and configured == PromptConfig():
        return from_dict(PromptConfig, trained), "model manifest"
    return configured, "config"


def _score_with_model(config: RankerEvalConfig, log, frame: pd.DataFrame, kind: TaskKind):
    """Load the ranker and score ``frame``; returns (scores, probs, model info, throughput)."""
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    manifest = read_manifest(config.model) if Path(str(config.model)).expanduser().is_dir() else None
    prompt, prompt_source = resolve_prompt(config.prompt, manifest)
    ranker_cfg = RankerConfig(batch_size=config.batch_size, shared_prefix=config.shared_prefix, prompt=prompt)
    ranker = Ranker.load(config.model, ranker_cfg, log.items, log.users, device=config.device)
    params = list(ranker.model.parameters())
    info = {
        "spec": str(config.model),
        "architecture": type(ranker.model).__name__,
        "params": int(sum(p.numel() for p in params)),
        "device": str(params[0].device),
        "dtype": str(params[0].dtype).replace("torch.", ""),
        "stage": manifest.get("stage") if manifest else None,
        "prompt_source": prompt_source,
        "prompt": config_to_dict(prompt),
    }
    start = time.perf_counter()
    if kind == "pointwise":
        out = ranker.score_pointwise(frame)
        scores, probs = out["logit_diff"].to_numpy(np.float64), out["p_yes"].to_numpy(np.float64)
        info["prompt_tokens_mean"] = float(out["n_tokens"].mean()) if len(out) else None
        info["history_kept_mean"] = float(out["history_kept"].mean()) if len(out) else None
    else:
        scores = [np.asarray(s, dtype=np.float64) for s in ranker.score_candidate_task(frame)]
        probs = None
    thr = throughput_stats(ranker.timings, time.perf_counter() - start)
    thr.update(
        batch_size=config.batch_size, shared_prefix=config.shared_prefix if kind == "candidates" else None
    )
    return scores, probs, info, thr


# ---------------------------------------------------------------------------------------------- main


def evaluate_ranker(config: RankerEvalConfig) -> dict[str, Any]:
    """Score ``config.task`` with the model and/or baselines and write the report directory ``config.out``.

    Returns:
        dict: the content of ``report.json``.

    Raises:
        ConfigError: ``task`` or ``out`` missing, or ``data_dir`` cannot be derived.
        FileNotFoundError: the task file or the data directory's tables are missing.
        ValueError: the task file matches neither schema, or a candidate list has no target.
    """
    from recsys_slm.data.schema import InteractionLog

    check(
        config.task is not None,
        "task",
        "required: the task parquet to evaluate (e.g. DIR/tasks/candidates/test.parquet)",
    )
    check(config.out is not None, "out", "required: the output directory")
    frame, kind, n_file = load_task(config.task, config.max_records)
    if kind == "candidates":
        # Fail before the (slow) model pass on a list without a target or with duplicate ids.
        ids_list = [[str(i) for i in c] for c in frame["candidate_item_ids"]]
        rank_of_targets([np.zeros(len(c)) for c in ids_list], list(frame["candidate_labels"]), ids_list)
    data_dir = resolve_data_dir(config.task, config.data_dir)
    log = InteractionLog.load(data_dir)
    notes: list[str] = []

    scores: dict[str, Any] = {}
    probs: dict[str, np.ndarray | None] = {}
    model_info = throughput = None
    if config.model is not None:
        scores[MODEL_METHOD], probs[MODEL_METHOD], model_info, throughput = _score_with_model(
            config, log, frame, kind
        )

    fit_info = None
    if config.baselines:
        fit, train, fit_info = baseline_training_data(log.interactions, data_dir, frame)
        baselines, fit_notes = fit_baselines(fit, train, config.baseline_fit)
        notes += fit_notes
        if kind == "candidates" and "user_like_rate" in baselines:
            notes.append(
                "user_like_rate is constant within a candidate list: its ranking is the tie rule alone"
            )
        for name, b in baselines.items():
            if kind == "pointwise":
                scores[name] = b.score_pointwise(frame)
                probs[name] = scores[name] if b.is_probability else None
            else:
                scores[name] = b.score_candidates(frame)
                probs[name] = None

    primary = (
        MODEL_METHOD if MODEL_METHOD in scores else ("logreg" if "logreg" in scores else next(iter(scores)))
    )
    order = [primary, *(m for m in scores if m != primary)]
    scores = {m: scores[m] for m in order}

    task_info: dict[str, Any] = {
        "path": str(config.task),
        "kind": kind,
        "records": len(frame),
        "records_in_file": n_file,
        "users": int(frame["user_id"].nunique()),
    }
    metrics: dict[str, dict[str, float]] = {}
    ranks: dict[str, list[np.ndarray]] = {}
    if kind == "pointwise":
        labels = frame["label"].to_numpy(dtype=np.int64)
        task_info["positive_rate"] = float(labels.mean()) if len(labels) else None
        for m in order:
            metrics[m] = pointwise_metrics(labels, scores[m], probs[m])
        primary_metric = "auc"
    else:
        ids_list = [[str(i) for i in c] for c in frame["candidate_item_ids"]]
        labels_list = [np.asarray(c, dtype=np.int64) for c in frame["candidate_labels"]]
        task_info["candidates"] = int(sum(len(c) for c in ids_list))
        for m in order:
            metrics[m] = ranking_metrics(
                scores[m], labels_list, ids_list, config.ks, frame["user_id"].astype(str)
            )
            ranks[m] = [candidate_ranks(s, ids) for s, ids in zip(scores[m], ids_list, strict=True)]
        primary_metric = "ndcg@10" if 10 in config.ks else f"ndcg@{max(config.ks)}"

    report: dict[str, Any] = {
        "task": task_info,
        "data": {
            "data_dir": str(data_dir),
            "interactions": log.n_interactions,
            "users": log.n_users,
            "items": log.n_items,
        },
        "model": model_info,
        "primary_method": primary,
        "primary_metric": primary_metric,
        "metrics": metrics,
        "baselines_fit": fit_info,
        "throughput": throughput,
        "tie_rule": TIE_RULE,
        "notes": notes,
        "config": config_to_dict(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
    }

    with atomic_dir(config.out) as tmp:
        files = _write_outputs(tmp, report, frame, kind, primary, scores, probs, ranks)
        report["files"] = sorted(files)
        (tmp / "summary.md").write_text(report_mod.markdown_summary(report))
        write_json_atomic(tmp / "report.json", report_mod.json_safe(report))
    return report_mod.json_safe(report)


def _write_outputs(tmp: Path, report, frame, kind, primary, scores, probs, ranks) -> list[str]:
    """predictions.parquet, TREC files and the plot; returns the written file names (plus the two to come)."""
    files = ["report.json", "summary.md", "predictions.parquet"]
    if kind == "pointwise":
        exports.pointwise_predictions(frame, primary, scores, probs).to_parquet(
            tmp / "predictions.parquet", index=False
        )
        roc = report_mod.plot_roc(tmp / "roc.png", frame["label"].to_numpy(dtype=np.int64), scores)
        if roc is not None:
            files.append("roc.png")
        else:
            report["notes"].append("roc.png not written: the labels hold a single class")
        return files
    qids = exports.query_ids(frame["user_id"].astype(str).tolist())
    exports.candidate_predictions(frame, qids, primary, scores, ranks).to_parquet(
        tmp / "predictions.parquet", index=False
    )
    ids_list = [[str(i) for i in c] for c in frame["candidate_item_ids"]]
    if exports.trec_safe(qids) and all(exports.trec_safe(ids) for ids in ids_list):
        (tmp / "runs").mkdir()
        for m in scores:
            exports.write_trec_run(
                tmp / "runs" / f"{m}.trec", qids, ids_list, ranks[m], exports.sanitize_tag(m)
            )
            files.append(f"runs/{m}.trec")
        exports.write_trec_run(
            tmp / "run.trec", qids, ids_list, ranks[primary], exports.sanitize_tag(primary)
        )
        exports.write_trec_qrels(tmp / "qrels.trec", qids, ids_list, frame["candidate_labels"])
        files += ["run.trec", "qrels.trec"]
    else:
        report["notes"].append(
            "TREC files not written: some user or item ids are empty or contain whitespace"
        )
    k = report["primary_metric"].split("@")[1]
    report_mod.plot_ranking_bars(tmp / "ranking.png", report["metrics"], [f"ndcg@{k}", f"recall@{k}"])
    files.append("ranking.png")
    return files
