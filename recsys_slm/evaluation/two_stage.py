"""Two-stage system evaluation: retriever top-k → LLM ranker re-ranks → NDCG@K / Recall@K of the whole system.

Users run retrieval → ranking as one system, so the number that matters is the metric of the final list over
*all* held-out users, for every pairing of a retriever stage with a ranker stage (e.g. teacher vs compressed
retriever × teacher vs compressed ranker). For each retriever variant (model × Matryoshka dim) the retriever's
top-``k`` per leave-one-out query is written as a candidate task (the retriever encoded once, then
:func:`recsys_slm.retriever.evaluate.write_candidates` per dim,
``missing_target=drop``); every ranker re-ranks it (:func:`recsys_slm.evaluation.ranker_eval.evaluate_ranker`),
as do the classical baselines and the retriever's own order. A user whose target the retriever missed scores 0
at every cut-off, so with one query per user

    system metric@K = (metric@K averaged over the users whose target was retrieved) × (retrieved users / users),

which equals the per-user average over all users with the missed ones at 0 (``system_metric_factor``). The
``oracle`` row (a ranker that always puts the target first) is the ceiling the retriever leaves: its system
NDCG@K = Recall@K = the retriever's hit rate at ``k``.

Cells (one retrieval, one ranker on one retrieval) are cached under ``<OUT>.cells/`` while the grid runs and kept
in ``OUT/cells/``; a rerun reuses every cell whose inputs (model identity, keys, data) are unchanged, so a killed
grid resumes and adding a ranker computes only the new column.

Every row also carries a bootstrap interval of its headline system NDCG@K over users (``ci``) and its ratio to
the primary row (the first retriever at its first dim re-ranked by the first ranker), paired over the same
users (``vs_primary``): on the ~100 users a CPU budget allows, one target is ±0.01 NDCG, and the intervals say
which differences the grid can resolve (:mod:`recsys_slm.metrics.bootstrap`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys_slm.config import check, config_to_dict, validate_fields
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.metrics.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    mean_ci,
    paired_ratio_ci,
    per_user_values,
)
from recsys_slm.metrics.ranking import metrics_from_ranks, ndcg_at_k, rank_of_targets
from recsys_slm.model_dir import (
    atomic_dir,
    code_version,
    config_hash,
    data_dir_or_default,
    data_identity,
    model_identity,
    write_json_atomic,
)

CELL_FILE = "cell.json"
SKIPPED_FILE = "skipped.json"
RETRIEVER_ORDER = "retriever_order"
ORACLE = "oracle"


@dataclass
class TwoStageConfig:
    """``recsys-slm eval system``: the (retriever stage × ranker stage) grid.

    Fields:
        retrievers (list[str]): retriever directories or encoder specs (each ``--retriever`` adds one). Required.
        rankers (list[str]): ranker model directories / packaged names (each ``--ranker`` adds one). May be
            empty (then only the retriever order and the baselines re-rank).
        out (Path | None): output directory (replaced atomically). Required.
        data_dir (Path | None): prepared data; default ``$RECSYS_SLM_HOME/data/movielens-100k``.
        k (int): candidates retrieved per user, re-ranked by the ranker. Default 20.
        dims (list[int | None]): Matryoshka dims of each retriever, null = its full dim; [] = [null]; a dim
            above a retriever's width is skipped with a note (``null`` already asks for the full width; eval
            retrieval instead evaluates such a dim at full width, because its ladder has no ``null``). Default [].
        index (str): faiss factory string of the retrieval index. Default Flat.
        split (str): val or test (leave-one-out targets of ``tasks/candidates/<split>.parquet``). Default test.
        max_queries (int | None): first N users only (CPU budgets). Default None.
        ks (list[int]): cut-offs of the system metrics. Default [1, 5, 10].
        baselines (bool): also re-rank with the ranker eval's classical baselines. Default True.
        batch_size (int): ranker prompts per forward. Default 16.
        encode_batch_size (int): retriever encoding batch. Default 64.
        device (str): "auto", "cpu", "cuda", ... for both stages. Default "auto".
        nprobe (int), ef_search (int): IVF / HNSW search knobs. Defaults 8 / 64.
        prompt (PromptConfig): ranker prompt; left at the default, each ranker's manifest prompt is used.
        bootstrap_resamples (int): user resamples for ``ci`` / ``vs_primary``; 0 = none. Default 2000.
        ci_level (float): their confidence level, in (0, 1). Default 0.95.
    """

    retrievers: list[str] = field(default_factory=list)
    rankers: list[str] = field(default_factory=list)
    out: Path | None = None
    data_dir: Path | None = None
    k: int = 20
    dims: list[int | None] = field(default_factory=list)
    index: str = "Flat"
    split: Literal["val", "test"] = "test"
    max_queries: int | None = None
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    baselines: bool = True
    batch_size: int = 16
    encode_batch_size: int = 64
    device: str = "auto"
    nprobe: int = 8
    ef_search: int = 64
    prompt: PromptConfig = field(default_factory=PromptConfig)
    bootstrap_resamples: int = DEFAULT_RESAMPLES
    ci_level: float = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        validate_fields(self)
        check(
            self.bootstrap_resamples == 0 or self.bootstrap_resamples >= 100,
            "bootstrap_resamples",
            f"must be 0 (no intervals) or >= 100, got {self.bootstrap_resamples}",
        )
        check(0 < self.ci_level < 1, "ci_level", f"must be in (0, 1), got {self.ci_level}")
        check(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        check(
            all(d is None or d >= 1 for d in self.dims), "dims", f"must be positive or null, got {self.dims}"
        )
        check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "ks", f"needs cut-offs >= 1, got {self.ks}")
        check(len(set(self.ks)) == len(self.ks), "ks", f"cut-offs must be distinct, got {self.ks}")
        check(self.max_queries is None or self.max_queries > 0, "max_queries", "must be positive or null")
        for key in ("batch_size", "encode_batch_size"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")

    def resolved_data_dir(self) -> Path:
        return data_dir_or_default(self.data_dir)


def _tags(specs: list[str]) -> list[str]:
    """Short unique names: the directory / spec basename, suffixed ``-2``, ``-3`` ... on a clash."""
    tags: list[str] = []
    for spec in specs:
        base = Path(spec.rstrip("/")).name or spec
        tag, n = base, 1
        while tag in tags:
            n += 1
            tag = f"{base}-{n}"
        tags.append(tag)
    return tags


def _cell(work: Path, previous: Path | None, kind: str, key: dict[str, Any], compute) -> Path:
    """The directory of one cell: reused from ``work`` or a previous ``OUT/cells`` when its key matches, else
    computed by ``compute(directory)`` (which writes it atomically) and marked complete with ``cell.json``."""
    name = f"{kind}-{config_hash(key)}"
    target = work / name
    if (target / CELL_FILE).is_file():
        return target
    if previous is not None and (previous / name / CELL_FILE).is_file():
        shutil.copytree(previous / name, target, dirs_exist_ok=True)
        return target
    compute(target)
    write_json_atomic(target / CELL_FILE, {"kind": kind, "key": key})
    return target


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _scaled(metrics: dict[str, float], factor: float) -> dict[str, float]:
    """Per-user metrics over the retrieved users → over all users (the missed ones score 0)."""
    return {k: float(v) * factor for k, v in metrics.items()}


def evaluate_two_stage(config: TwoStageConfig) -> dict[str, Any]:
    """Run the grid and write ``OUT/{report.json, summary.md, two_stage.png, cells/}``.

    Returns:
        dict: the report — ``retrievers`` (per variant: model, dim, k, hit rate, factor, retrieval metrics),
        ``rankers``, ``grid`` (per retriever variant × re-ranker: ``system`` metrics over all users,
        ``reranked`` metrics over the retrieved users, ``throughput``), ``config``, ``notes``.
    """
    from recsys_slm.evaluation import report as report_mod
    from recsys_slm.evaluation.ranker_eval import RankerEvalConfig, evaluate_ranker
    from recsys_slm.retriever.evaluate import DimensionError, encode_candidate_source, write_candidates

    check(len(config.retrievers) > 0, "retrievers", "required: at least one retriever (--retriever DIR)")
    check(config.out is not None, "out", "required: the output directory (--out DIR)")
    data_dir = config.resolved_data_dir()
    if not (data_dir / "tasks" / "candidates").is_dir():
        raise FileNotFoundError(
            f"data_dir {data_dir} holds no tasks/candidates/; run recsys-slm data prepare or pass --data-dir DIR"
        )
    out = Path(config.out).expanduser().resolve()
    work = out.parent / f".{out.name}.cells"
    work.mkdir(parents=True, exist_ok=True)
    previous = out / "cells" if (out / "cells").is_dir() else None
    data_id = data_identity(data_dir)
    notes: list[str] = []
    retrievers: list[dict[str, Any]] = []
    grid: list[dict[str, Any]] = []
    ranker_tags = _tags(config.rankers)
    rankers_info: dict[str, dict[str, Any]] = {}
    head_k = int(_headline_key(config.ks).split("@")[1])
    per_user: dict[int, dict[str, float]] = {}  # grid row -> user -> system NDCG@head_k (0 when not retrieved)

    # one encoding per retriever, shared by its dims (variants come grouped by retriever: keep only the current one)
    sources: dict[str, Any] = {}

    def _retrieve(spec: str, dim: int | None, directory: Path) -> None:
        if spec not in sources:
            sources.clear()
            sources[spec] = encode_candidate_source(
                spec, data_dir, split=config.split, batch_size=config.encode_batch_size, device=config.device,
                max_queries=config.max_queries,
            )  # fmt: skip
        try:
            write_candidates(sources[spec], directory, k=config.k, dim=dim, index=config.index,
                             missing_target="drop", nprobe=config.nprobe, ef_search=config.ef_search)  # fmt: skip
        except DimensionError as exc:  # remembered as a cell, so a rerun does not encode again to learn it
            write_json_atomic(
                directory / SKIPPED_FILE, {"reason": f"the model's embedding dimension is {exc.full}"}
            )

    variants = [(spec, tag, d) for spec, tag in zip(config.retrievers, _tags(config.retrievers), strict=True)
                for d in (config.dims or [None])]  # fmt: skip
    for spec, tag, dim in variants:
        r_key = {"retriever": model_identity(spec), "dim": dim, "k": config.k, "index": config.index,
                 "split": config.split, "max_queries": config.max_queries, "nprobe": config.nprobe,
                 "ef_search": config.ef_search, "data": data_id}  # fmt: skip
        cand = _cell(
            work, previous, "retrieval", r_key, lambda d, spec=spec, dim=dim: _retrieve(spec, dim, d)
        )
        if (cand / SKIPPED_FILE).is_file():  # a dim above this model's width: null is its full-width cell
            notes.append(f"{tag}: dim {dim} skipped ({_read_json(cand / SKIPPED_FILE)['reason']})")
            continue
        stats = _read_json(cand / "retrieval.json")
        vtag = tag if dim is None else f"{tag}@{stats['dim']}"
        factor = float(stats["system_metric_factor"] or 0.0)
        retrievers.append({"tag": vtag, "model": spec, "dim": stats["dim"], "k": stats["k"], "index": config.index,
                           "users": stats["records"], "retrieved": stats["target_retrieved"],
                           "hit_rate": stats["hit_rate"], "system_metric_factor": factor,
                           "retrieval_metrics": stats["retrieval_metrics"], "encoder": stats.get("encoder"),
                           "cell": f"cells/{cand.name}"})  # fmt: skip
        task = cand / f"{config.split}.parquet"
        frame = pd.read_parquet(task)
        users = frame["user_id"].astype(str).tolist()
        n_ranked = len(frame)
        universe = stats.get("query_users")  # absent from cells written before it was recorded
        if universe is None and config.bootstrap_resamples:
            notes.append(f"{vtag}: no intervals (its retrieval cell predates query_users; delete it to redo)")

        def row(name: str, kind: str, reranked: dict[str, float], vtag=vtag, factor=factor, n=n_ranked,
                ranks: list[np.ndarray] | None = None, universe=universe, users=users, **extra: Any) -> None:
            grid.append({"retriever": vtag, "ranker": name, "kind": kind, "system": _scaled(reranked, factor),
                         "reranked": reranked, "ranked_users": n, **extra})  # fmt: skip
            if universe is not None and ranks is not None:
                per_user[len(grid) - 1] = system_per_user(ranks, users, universe, head_k)

        if len(frame) == 0:
            notes.append(
                f"{vtag}: the retriever found no target in its top-{config.k}; every system metric is 0"
            )
            zero = {f"{m}@{k}": 0.0 for m in ("ndcg", "recall", "mrr") for k in config.ks}
            for name, kind in [(RETRIEVER_ORDER, RETRIEVER_ORDER), *((t, "ranker") for t in ranker_tags)]:
                row(name, kind, zero, ranks=[])
            continue
        # The retriever's own order: its scores, ranked under the same tie rule as every ranker.
        ids = [[str(i) for i in c] for c in frame["candidate_item_ids"]]
        labels = [np.asarray(c, dtype=np.int64) for c in frame["candidate_labels"]]
        scores = [np.asarray(s, dtype=np.float64) for s in frame["retriever_scores"]]
        for name, by in ((RETRIEVER_ORDER, scores), (ORACLE, [lab.astype(np.float64) for lab in labels])):
            ranks = rank_of_targets(by, labels, ids)
            row(name, name, metrics_from_ranks(ranks, config.ks, users), ranks=ranks)
        if config.baselines:
            b_key = {"retrieval": cand.name, "ks": config.ks}
            b_dir = _cell(
                work,
                previous,
                "baselines",
                b_key,
                lambda d, task=task: evaluate_ranker(
                    RankerEvalConfig(
                        model=None, task=task, out=d, data_dir=data_dir, ks=config.ks, baselines=True
                    )
                ),
            )
            b_report = _read_json(b_dir / "report.json")
            b_pred = pd.read_parquet(b_dir / "predictions.parquet")
            for name, m in b_report["metrics"].items():
                col = "rank" if name == b_report["primary_method"] else f"rank_{name}"
                row(name, "baseline", m, cell=f"cells/{b_dir.name}", ranks=target_ranks(b_pred, col))
        for spec_r, rtag in zip(config.rankers, ranker_tags, strict=True):
            k_key = {"ranker": model_identity(spec_r), "retrieval": cand.name, "ks": config.ks,
                     "prompt": config_to_dict(config.prompt)}  # fmt: skip
            k_dir = _cell(
                work,
                previous,
                "ranker",
                k_key,
                lambda d, spec_r=spec_r, task=task: evaluate_ranker(
                    RankerEvalConfig(
                        model=spec_r,
                        task=task,
                        out=d,
                        data_dir=data_dir,
                        ks=config.ks,
                        baselines=False,
                        batch_size=config.batch_size,
                        device=config.device,
                        prompt=config.prompt,
                    )
                ),
            )
            k_report = _read_json(k_dir / "report.json")
            rankers_info.setdefault(rtag, {"tag": rtag, "model": spec_r, **(k_report.get("model") or {})})
            row(rtag, "ranker", k_report["metrics"][k_report["primary_method"]], cell=f"cells/{k_dir.name}",
                throughput=k_report.get("throughput"),
                ranks=target_ranks(pd.read_parquet(k_dir / "predictions.parquet"), "rank"))  # fmt: skip

    if config.bootstrap_resamples and per_user:
        attach_intervals(grid, per_user, config.bootstrap_resamples, config.ci_level)

    report: dict[str, Any] = {
        "data": {"data_dir": str(data_dir)},
        "split": config.split,
        "k": config.k,
        "ks": config.ks,
        "retrievers": retrievers,
        "rankers": [
            rankers_info.get(t, {"tag": t, "model": s})
            for s, t in zip(config.rankers, ranker_tags, strict=True)
        ],  # fmt: skip
        "grid": grid,
        "notes": notes,
        "config": config_to_dict(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
    }
    report = report_mod.json_safe(report)
    key = _headline_key(config.ks)
    with atomic_dir(out) as tmp:
        (tmp / "summary.md").write_text(markdown_summary(report))
        plot_system(tmp / "two_stage.png", report["grid"], key)
        report["files"] = ["report.json", "summary.md", "two_stage.png", "cells/"]
        write_json_atomic(tmp / "report.json", report)
        work.rename(tmp / "cells")
    return report


def target_ranks(predictions: pd.DataFrame, rank_col: str) -> list[np.ndarray]:
    """Per record (in record order) the ranks of its relevant candidates from a ranker eval's
    ``predictions.parquet`` (``record``, ``label``, and ``rank`` or ``rank_<method>``)."""
    hits = predictions.loc[predictions["label"] == 1, ["record", rank_col]]
    by_record = hits.groupby("record")[rank_col].apply(lambda r: np.asarray(r, dtype=np.float64))
    n = int(predictions["record"].max()) + 1 if len(predictions) else 0
    return [by_record.get(i, np.empty(0)) for i in range(n)]


def system_per_user(
    ranks: list[np.ndarray], users: list[str], universe: list[str], k: int
) -> dict[str, float]:
    """Each asked user's system NDCG@k: from the re-ranked ranks when the retriever found the target, else 0.

    Args:
        ranks (R arrays): ranks of the relevant candidates of each re-ranked record (``users[i]``'s).
        users (list[str] (R,)): the user of each re-ranked record.
        universe (list[str]): every user the retriever was asked for (``query_users`` of the retrieval).
    """
    got = per_user_values(ndcg_at_k(ranks, k), users) if len(ranks) else {}
    return {str(u): got.get(str(u), 0.0) for u in universe}


def attach_intervals(
    grid: list[dict[str, Any]], per_user: dict[int, dict[str, float]], n_resamples: int, level: float
) -> None:
    """Add ``ci`` and ``vs_primary`` (paired over users) to the grid rows in place. The primary row is the first
    ranker row (first retriever variant × first ranker), else the first row."""
    rows = sorted(per_user)
    primary = next((i for i in rows if grid[i]["kind"] == "ranker"), rows[0])
    p = grid[primary]
    ref = {"retriever": p["retriever"], "ranker": p["ranker"]}
    for i in rows:
        grid[i]["ci"] = mean_ci(per_user[i], level=level, n_resamples=n_resamples)
        grid[i]["vs_primary"] = {
            **ref, **paired_ratio_ci(per_user[primary], per_user[i], level=level, n_resamples=n_resamples)
        }  # fmt: skip


def plot_system(path: str | Path, grid: list[dict[str, Any]], key: str) -> Path:
    """Horizontal bars: each row's system ``key`` (oracle rows left out), grouped by retriever, coloured by kind,
    with the bootstrap interval as an error bar when the row has one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = [g for g in grid if g["kind"] != ORACLE]
    colours = {RETRIEVER_ORDER: "C0", "ranker": "C3", "baseline": "C7"}
    fig = Figure(figsize=(8, 1.2 + 0.24 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))[::-1]
    values = [g["system"].get(key, 0.0) for g in rows]
    err = None
    if rows and all("ci" in g for g in rows):

        def half(v: float, bound: float | None) -> float:  # an undefined bound (None/NaN) draws no bar
            return abs(v - bound) if bound is not None and np.isfinite(bound) else 0.0

        err = np.array([[half(v, g["ci"]["low"]), half(v, g["ci"]["high"])]
                        for v, g in zip(values, rows, strict=True)]).T  # fmt: skip
    ax.barh(y, values, xerr=err, color=[colours.get(g["kind"], "C2") for g in rows], error_kw={"linewidth": 0.8})
    ax.set_yticks(y, [f"{g['retriever']} → {g['ranker']}" for g in rows], fontsize=7)
    for i in range(1, len(rows)):  # a line between retrievers
        if rows[i]["retriever"] != rows[i - 1]["retriever"]:
            ax.axhline(y[i] + 0.5, color="grey", linewidth=0.5)
    level = f" ({rows[0]['ci']['level']:.0%} bootstrap interval)" if err is not None else ""
    ax.set_xlabel(f"system {key} over all users{level}")
    ax.legend(handles=[Patch(color=c, label=k.replace("_", " ")) for k, c in colours.items()], fontsize=7,
              loc="lower right")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _headline_key(ks: list[int]) -> str:
    return "ndcg@10" if 10 in ks else f"ndcg@{max(ks)}"


def text_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the grid: one row per retriever variant × re-ranker, system metrics over all users."""
    key = _headline_key(report["ks"])
    rkey = key.replace("ndcg", "recall")
    mkey = key.replace("ndcg", "mrr")
    hits = {r["tag"]: r for r in report["retrievers"]}
    header = ["retriever", "re-ranker", f"system {key}", f"system {rkey}", f"system {mkey}",
              f"hit rate@{report['k']}", "ranked users", "prompts/s"]  # fmt: skip
    rows = []
    for g in report["grid"]:
        thr = (g.get("throughput") or {}).get("prompts_per_s")
        r = hits[g["retriever"]]
        rows.append([g["retriever"], g["ranker"], f"{g['system'].get(key, 0.0):.4f}",
                     f"{g['system'].get(rkey, 0.0):.4f}", f"{g['system'].get(mkey, 0.0):.4f}",
                     f"{r['hit_rate']:.4f}" if r["hit_rate"] is not None else "-",
                     f"{g['ranked_users']}/{r['users']}", f"{thr:.1f}" if thr else "-"])  # fmt: skip
    return header, rows


def markdown_summary(report: dict[str, Any]) -> str:
    header, rows = text_rows(report)
    lines = [
        f"# Two-stage system evaluation ({report['split']}, top-{report['k']} re-ranked)",
        "",
        "System metrics are over all users: a user whose target the retriever missed scores 0. `oracle` is the "
        "ceiling the retriever leaves (target first whenever retrieved); `retriever_order` keeps the retriever's "
        "ranking.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += interval_lines(report)
    lines += [f"- note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def interval_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: each row's system NDCG@K with its bootstrap interval and its paired ratio to the primary row."""
    rows = [g for g in report["grid"] if "ci" in g]
    if not rows:
        return []
    key = _headline_key(report["ks"])
    ref = rows[0]["vs_primary"]

    def ci(d: dict[str, Any], point: str) -> str:
        return f"{d[point]:.4f} [{d['low']:.4f}, {d['high']:.4f}]" if d.get(point) is not None else "-"

    return [
        "",
        f"## system {key}: {rows[0]['ci']['level']:.0%} intervals (bootstrap over users)",
        "",
        f"Ratios are to `{ref['retriever']} → {ref['ranker']}`, paired (the same resampled users for both); "
        "an interval that spans 1 means these users cannot tell the two apart.",
        "",
        f"| retriever | re-ranker | system {key} [CI] | ÷ primary [CI] |",
        "|---|---|---|---|",
        *(f"| {g['retriever']} | {g['ranker']} | {ci(g['ci'], 'mean')} | {ci(g['vs_primary'], 'ratio')} |"
          for g in rows),  # fmt: skip
        "",
    ]
