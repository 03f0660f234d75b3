"""Human-readable evaluation outputs: the Markdown summary, the CLI table and PNG plots.

Plots use matplotlib's object API with the Agg canvas (``Figure`` + ``FigureCanvasAgg``), so no display is
needed and pyplot's global backend state is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

POINTWISE_COLUMNS = ("auc", "log_loss", "accuracy")


def json_safe(value: Any) -> Any:
    """Plain JSON data: NaN/inf → None, numpy scalars/arrays → Python, Paths → str, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def metric_columns(report: dict[str, Any]) -> list[str]:
    """Metric keys shown in tables: AUC/log loss/accuracy, or NDCG/Recall/MRR at every k."""
    if report["task"]["kind"] == "pointwise":
        return list(POINTWISE_COLUMNS)
    ks = report["config"]["ks"]
    return [f"{name}@{k}" for name in ("ndcg", "recall", "mrr") for k in ks]


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the method × metric table, primary method first."""
    cols = metric_columns(report)
    rows = [[method] + [_fmt(m.get(c)) for c in cols] for method, m in report["metrics"].items()]
    return ["method", *cols], rows


def text_table(report: dict[str, Any]) -> str:
    """A compact fixed-width table of every method's metrics (for the terminal)."""
    header, rows = metrics_rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Method names left-aligned, numbers right-aligned.
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), *(line(r) for r in rows)])


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def markdown_summary(report: dict[str, Any]) -> str:
    """``summary.md``: task and data sizes, the metrics table (model vs baselines), throughput and notes."""
    task, data = report["task"], report["data"]
    lines = [
        f"# Ranker evaluation: {task['kind']} task",
        "",
        f"- task file: `{task['path']}` ({task['records']:,} of {task['records_in_file']:,} records"
        + (f", {task['candidates']:,} candidates" if task["kind"] == "candidates" else "")
        + ")",
        f"- data: `{data['data_dir']}` ({data['interactions']:,} interactions, {data['users']:,} users, "
        f"{data['items']:,} items)",
    ]
    model = report.get("model")
    if model:
        lines.append(f"- model: `{model['spec']}` ({model['params']:,} parameters, {model['device']})")
    else:
        lines.append("- model: none (baselines only)")
    if report.get("baselines_fit"):
        fit = report["baselines_fit"]
        lines.append(
            f"- baselines fitted on {fit['interactions']:,} training interactions"
            + (
                f" (before t={fit['cutoff_timestamp']} plus the train records)"
                if fit.get("cutoff_timestamp")
                else ""
            )
        )
    header, rows = metrics_rows(report)
    lines += ["", f"## Metrics (primary: {report['primary_method']}, {report['primary_metric']})", ""]
    lines += _md_table(header, rows)
    thr = report.get("throughput")
    if thr:
        lines += ["", "## Throughput", ""]
        lines += _md_table(
            ["prompts", "prompts/s (forward)", "prompts/s (wall)", "batches", "batch p50 ms", "batch p99 ms"],
            [
                [
                    f"{thr['prompts']:,}",
                    _fmt(thr["prompts_per_s"]),
                    _fmt(thr["wall_prompts_per_s"]),
                    str(thr["batches"]),
                    _fmt(thr["batch_latency_ms"]["p50"]),
                    _fmt(thr["batch_latency_ms"]["p99"]),
                ]
            ],
        )
    if report.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in report["notes"])]
    lines += [
        "",
        "Metric definitions, the tie rule and the file formats: `docs/evaluation.md`.",
        "",
    ]
    return "\n".join(lines)


def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_roc(path: str | Path, labels: np.ndarray, scores: dict[str, np.ndarray]) -> Path | None:
    """ROC curve of every method on one axes; returns None (no file) when labels hold a single class."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        return None
    fig = _new_figure((5.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_ranking_bars(path: str | Path, metrics: dict[str, dict[str, float]], keys: Sequence[str]) -> Path:
    """Grouped bar chart: one group per method, one bar per metric key (e.g. ndcg@10, recall@10)."""
    fig = _new_figure((max(5.0, 1.3 * len(metrics) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(metrics))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        values = [metrics[m].get(key) for m in metrics]
        ax.bar(
            x + i * width,
            [v if v is not None and math.isfinite(v) else 0.0 for v in values],
            width,
            label=key,
        )
    ax.set_xticks(x + width * (len(keys) - 1) / 2)
    ax.set_xticklabels(list(metrics), rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15)  # headroom so the legend never covers a bar at 1.0
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title("candidate ranking")
    ax.legend(fontsize=8, ncol=len(keys), loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
