"""Retrieval evaluation: encoders × Matryoshka dims × FAISS indexes on held-out interactions.

    recsys-slm eval retrieval --model DIR [--model DIR2 ...] --out OUT [dims=[768,256,64]] [indexes=[Flat,HNSW32]]

For every model (a trained retriever directory, a packaged encoder name or any sentence-transformers directory):

1. the item texts and the query (user) texts are encoded once at full dimension (timed: encoder texts/s);
2. for every dim of ``dims`` (``[]`` = full only; a dim above the model's means its full dim) the embeddings are truncated
   to the first ``dim`` coordinates and re-normalised — exactly ``SentenceTransformer(path, truncate_dim=dim)``
   followed by L2 normalisation;
3. for every index of ``indexes`` a :class:`~recsys_slm.retriever.index.RetrievalIndex` is built (timed), every
   query searched in one batch, already-seen items removed, and each query's target ranked; query latency is
   measured one query at a time (``latency_queries`` queries, k = max(ks)).

Metrics (same definitions and tie rule as the ranker eval, :mod:`recsys_slm.metrics.ranking`): Recall@K, NDCG@K,
MRR@K and HitRate@K for K in ``ks``, per-user averaged. The retrieved list of a query is the index's top results
minus the excluded items, ordered by score descending then item id ascending; a target not in it has rank ∞.
Plus ``ann_recall@K``: the mean share of the exact (Flat) top-K found by the index (raw search, no exclusion).

Baselines on the same queries and exclusions: ``popularity`` (interaction count over the training interactions,
see :func:`recsys_slm.retriever.texts.trainable_rows`) and ``cooccurrence`` (item-item cosine co-occurrence over
the users' training interactions, summed over the query user's history).

Outputs (written atomically into ``out``): ``report.json``, ``summary.md``, ``pareto.png`` (Recall@10 vs bytes
per vector and vs query latency), ``run.trec`` + ``qrels.trec`` (the primary configuration: first model, full dim,
first index), ``runs/<tag>.trec`` per configuration (``trec_runs``). Formats: ``docs/retriever.md``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys_slm.config import check, config_to_dict, from_dict, validate_fields
from recsys_slm.metrics.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    mean_ci,
    paired_ratio_ci,
    per_user_values,
)
from recsys_slm.metrics.ranking import candidate_ranks, mrr_at_k, ndcg_at_k, per_user_mean, recall_at_k
from recsys_slm.model_dir import (
    atomic_dir,
    code_version,
    data_dir_or_default,
    read_manifest,
    write_json_atomic,
)
from recsys_slm.retriever.texts import (
    ExcludeSeen,
    Queries,
    RetrieverTextConfig,
    RetrieverTexts,
    Split,
    eval_queries,
    resolve_like_threshold,
    trainable_rows,
)

DEFAULT_KS = (10, 20, 50, 100)
DEFAULT_INDEXES = ("Flat", "HNSW32", "SQ8", "IVF32,Flat", "IVF32,PQ16")
TIE_RULE = (
    "score descending, then item_id ascending (Python string order); a target not retrieved has rank inf"
)
METRICS = ("recall", "ndcg", "mrr", "hit_rate")


@dataclass
class RetrievalEvalConfig:
    """Retrieval evaluation / sweep (``recsys-slm eval retrieval``).

    Fields:
        models (list[str]): encoders to evaluate: retriever directories, packaged names (``all-minilm-l6-v2``,
            ``all-mpnet-base-v2``) or sentence-transformers directories. ``--model`` flags add to it. Required.
        out (Path | None): output directory (replaced atomically). Required.
        data_dir (Path | None): prepared data directory; default ``$RECSYS_SLM_HOME/data/movielens-100k``.
        split (str): ``leave_one_out`` (targets of ``tasks/candidates/<eval_split>``) or ``temporal`` (liked
            records of ``tasks/pointwise/<eval_split>``). Default leave_one_out.
        eval_split (str): ``test`` or ``val``. Default test.
        dims (list[int]): Matryoshka dims to evaluate; [] = each model's full dim only; a dim above a model's
            width is evaluated at its full width (and listed under ``skipped``). Default [].
        layers (list[int]): also evaluate each model cut to its first N transformer layers (2D Matryoshka /
            adaptive-layer models; BERT-style ``encoder.layer`` stacks), reported as ``<model>@<N>L``. Default [].
        indexes (list[str]): faiss factory strings. Default Flat, HNSW32, SQ8, IVF32,Flat, IVF32,PQ16.
        ks (list[int]): cut-offs. Default [10, 20, 50, 100].
        exclude_seen (str): ``all`` (every other item the user interacted with, like the candidate task's
            negatives), ``before`` (items before the target) or ``none``. Default all.
        max_queries (int | None): first N queries only. Default None.
        batch_size (int): encoder batch size. Default 64.
        nprobe (int): IVF cells visited per query. Default 8.
        ef_search (int): HNSW search breadth. Default 64.
        latency_queries (int): queries timed one by one per configuration. Default 200.
        latency_threads (int | None): faiss OpenMP threads while timing them; None = faiss' default. Default 1.
        baselines (bool): popularity and co-occurrence. Default True.
        texts (RetrieverTextConfig): left at the defaults, each model's manifest texts (what it was trained with)
            are used.
        device (str): encoder device: auto, cpu, cuda. Default auto.
        trec_runs (str): ``primary`` (run.trec only), ``flat`` (+ runs/<tag>.trec for every Flat configuration),
            ``all`` (every configuration). Default flat.
        save_indexes (bool): also save every index under ``indexes/<tag>/``. Default False.
        seed (int): IVF/PQ k-means seed and latency-query sample. Default 0.
        bootstrap_resamples (int): resamples of users for the confidence intervals of the primary metric
            (``ci``, ``retained``, ``vs_primary`` in each result); 0 = none. Default 2000.
        ci_level (float): their confidence level, in (0, 1). Default 0.95.
    """

    models: list[str] = field(default_factory=list)
    out: Path | None = None
    data_dir: Path | None = None
    split: Split = "leave_one_out"
    eval_split: Literal["val", "test"] = "test"
    dims: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    indexes: list[str] = field(default_factory=lambda: list(DEFAULT_INDEXES))
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    exclude_seen: ExcludeSeen = "all"
    max_queries: int | None = None
    batch_size: int = 64
    nprobe: int = 8
    ef_search: int = 64
    latency_queries: int = 200
    latency_threads: int | None = 1
    baselines: bool = True
    texts: RetrieverTextConfig = field(default_factory=RetrieverTextConfig)
    device: str = "auto"
    trec_runs: Literal["primary", "flat", "all"] = "flat"
    save_indexes: bool = False
    seed: int = 0
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
        check(all(d >= 1 for d in self.dims), "dims", f"must be positive, got {self.dims}")
        check(all(n >= 1 for n in self.layers), "layers", f"must be positive, got {self.layers}")
        check(len(self.indexes) > 0, "indexes", "needs at least one faiss factory string, e.g. [Flat]")
        check(all(s.strip() for s in self.indexes), "indexes", f"empty factory string in {self.indexes}")
        bare = [s for s in self.indexes if re.fullmatch(r"\s*IVF\d+\s*", s)]
        check(
            not bare,
            "indexes",
            f"{bare}: an IVF index needs its storage after a comma (IVF64,Flat or IVF64,PQ16). On the command "
            "line quote it inside the list, e.g. 'indexes=[Flat,HNSW32,\"IVF64,PQ16\"]' (YAML splits unquoted "
            "commas)",
        )
        check(
            len(self.ks) > 0 and all(k >= 1 for k in self.ks),
            "ks",
            f"must be positive cut-offs, got {self.ks}",
        )
        check(len(set(self.ks)) == len(self.ks), "ks", f"must be distinct, got {self.ks}")
        check(self.max_queries is None or self.max_queries > 0, "max_queries", "must be positive or null")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.nprobe > 0, "nprobe", f"must be > 0, got {self.nprobe}")
        check(self.ef_search > 0, "ef_search", f"must be > 0, got {self.ef_search}")
        check(self.latency_queries >= 0, "latency_queries", f"must be >= 0, got {self.latency_queries}")
        check(
            self.latency_threads is None or self.latency_threads >= 1,
            "latency_threads",
            "must be >= 1 or null",
        )

    def resolved_data_dir(self) -> Path:
        return data_dir_or_default(self.data_dir)


# ---------------------------------------------------------------------------------------------- ranking


def id_codes(item_ids: list[str]) -> np.ndarray:
    """Position of every id in Python string order (the tie rule's secondary key)."""
    order = np.argsort(np.asarray(item_ids, dtype=object), kind="stable")
    codes = np.empty(len(item_ids), dtype=np.int64)
    codes[order] = np.arange(len(item_ids))
    return codes


def exclusion_mask(exclude: list[set[str]], item_ids: list[str]) -> np.ndarray:
    """(Q, N) bool: True where item ``j`` is excluded for query ``q``."""
    col = {i: j for j, i in enumerate(item_ids)}
    mask = np.zeros((len(exclude), len(item_ids)), dtype=bool)
    for q, ex in enumerate(exclude):
        cols = [col[i] for i in ex if i in col]
        mask[q, cols] = True
    return mask


def exact_target_ranks(
    scores: np.ndarray, item_ids: list[str], targets: list[str], excluded: np.ndarray
) -> np.ndarray:
    """Rank (1-based, float) of each query's target among its allowed items under the tie rule.

    ``rank = 1 + #{allowed j: s_j > s_t} + #{allowed j: s_j == s_t, id_j < id_t}`` — the position
    :func:`recsys_slm.metrics.ranking.candidate_ranks` gives the target over the allowed items.

    Args:
        scores (np.ndarray (Q, N)): every item's score per query.
        item_ids (list[str]): N ids (columns).
        targets (list[str]): Q target ids.
        excluded (np.ndarray (Q, N) bool): items removed per query (the target must not be).
    """
    col = {i: j for j, i in enumerate(item_ids)}
    t = np.array([col[x] for x in targets], dtype=np.int64)
    codes = id_codes(item_ids)
    q = np.arange(len(targets))
    st = scores[q, t][:, None]
    allowed = ~excluded
    better = (scores > st) | ((scores == st) & (codes[None, :] < codes[t][:, None]))
    return 1.0 + np.count_nonzero(better & allowed, axis=1).astype(np.float64)


def ranks_from_search(
    scores: np.ndarray,
    rows: np.ndarray,
    item_ids: list[str],
    exclude: list[set[str]],
    targets: list[str],
    k_max: int,
) -> tuple[np.ndarray, list[list[str]], list[np.ndarray]]:
    """Target ranks and the final top-``k_max`` lists from an index search.

    Per query: drop ``-1`` rows and excluded items, order the rest by the tie rule, keep the first ``k_max``.

    Returns:
        tuple: ranks (Q,) float (``inf`` when the target is not in the top ``k_max``), per-query ids (≤ k_max),
        per-query scores (same order).
    """
    ids_arr = np.asarray(item_ids, dtype=object)
    ranks = np.full(len(targets), np.inf)
    top_ids: list[list[str]] = []
    top_scores: list[np.ndarray] = []
    for q, target in enumerate(targets):
        r = rows[q]
        ok = r >= 0
        ids = ids_arr[r[ok]]
        s = np.asarray(scores[q][ok], dtype=np.float64)
        if exclude[q]:
            keep = np.fromiter((i not in exclude[q] for i in ids), dtype=bool, count=len(ids))
            ids, s = ids[keep], s[keep]
        if len(ids):
            order = np.argsort(candidate_ranks(s, ids), kind="stable")[:k_max]
            ids, s = ids[order], s[order]
        hit = np.flatnonzero(ids == target)
        if hit.size:
            ranks[q] = float(hit[0] + 1)
        top_ids.append([str(i) for i in ids])
        top_scores.append(s)
    return ranks, top_ids, top_scores


def retrieval_metrics(ranks: np.ndarray, ks: list[int], user_ids: list[str]) -> dict[str, float]:
    """Recall/NDCG/MRR/HitRate@k from target ranks (one target per query), per-user averaged."""
    ranks_list = [np.array([r]) for r in np.asarray(ranks, dtype=np.float64)]
    out: dict[str, float] = {}
    for k in ks:
        recall = recall_at_k(ranks_list, k)
        out[f"recall@{k}"] = per_user_mean(recall, user_ids)
        out[f"ndcg@{k}"] = per_user_mean(ndcg_at_k(ranks_list, k), user_ids)
        out[f"mrr@{k}"] = per_user_mean(mrr_at_k(ranks_list, k), user_ids)
        out[f"hit_rate@{k}"] = per_user_mean((np.asarray(ranks) <= k).astype(np.float64), user_ids)
    return out


# ---------------------------------------------------------------------------------------------- baselines


def baseline_scores(
    log, data_dir: Path, split: Split, queries: Queries, item_ids: list[str], like_threshold: float
) -> dict[str, np.ndarray]:
    """(Q, N) scores of ``popularity`` and ``cooccurrence``, fitted on the training interactions only.

    * popularity: interactions per item among the trainable rows.
    * cooccurrence: ``C[i, j] = |U_i ∩ U_j| / sqrt(|U_i| |U_j|)`` over users' trainable interactions (``C[i, i] = 0``);
      a query scores ``sum_{i in history} C[i, :]`` with the history = every item the user interacted with before
      the target. Ties (items never co-occurring) fall back to the tie rule.
    """
    from scipy import sparse

    from recsys_slm.data.tasks import user_sequences

    seq = user_sequences(log, like_threshold)
    col = {i: j for j, i in enumerate(item_ids)}
    n = len(item_ids)
    # column of every interaction's item; -1 for items outside the catalogue (placeholders)
    item_col = seq["item_id"].map(col).fillna(-1).to_numpy(dtype=np.int64)
    fit = seq[trainable_rows(seq, data_dir, split) & (item_col >= 0)]
    fit_cols = item_col[fit.index.to_numpy()]
    counts = np.bincount(fit_cols, minlength=n).astype(np.float64)
    users = pd.Index(fit["user_id"].unique())
    x = sparse.csr_matrix(
        (np.ones(len(fit)), (users.get_indexer(fit["user_id"]), fit_cols)),
        shape=(len(users), n),
    )
    x.data[:] = 1.0  # repeated interactions with one item count once
    co = (x.T @ x).toarray()
    deg = np.sqrt(np.diag(co).copy())
    np.fill_diagonal(co, 0.0)
    denom = np.outer(deg, deg)
    co = np.divide(co, denom, out=np.zeros_like(co), where=denom > 0)
    # history before each target (all of it, not only the texts' max_history)
    events = pd.MultiIndex.from_arrays(
        [seq["user_id"].to_numpy(), seq["item_id"].to_numpy(), seq["timestamp"].to_numpy()]
    )
    row_of = pd.Series(np.arange(len(seq)), index=events)
    row_of = row_of[~row_of.index.duplicated()]
    f = queries.frame
    qrows = row_of.reindex(
        pd.MultiIndex.from_arrays(
            [f["user_id"].to_numpy(), f["target_item_id"].to_numpy(), f["timestamp"].to_numpy()]
        )
    ).to_numpy(dtype=np.int64)
    pos = seq["pos"].to_numpy()
    h = np.zeros((len(f), n), dtype=np.float64)
    for q, r in enumerate(qrows):
        cols = item_col[r - int(pos[r]) : r]
        h[q, cols[cols >= 0]] = 1.0
    return {"popularity": np.broadcast_to(counts, (len(f), n)), "cooccurrence": h @ co}


# ---------------------------------------------------------------------------------------------- encoders


def resolve_texts(configured: RetrieverTextConfig, manifest: dict | None) -> tuple[RetrieverTextConfig, str]:
    """The configured texts, unless left at the defaults and the model's manifest records the training texts."""
    trained = ((manifest or {}).get("retriever") or {}).get("texts")
    if trained and configured == RetrieverTextConfig():
        return from_dict(RetrieverTextConfig, trained), "model manifest"
    return configured, "config"


@dataclass
class EncodedModel:
    """One model's embeddings of the catalogue and the queries (full dim, L2-normalised)."""

    spec: str
    path: Path | str
    items: np.ndarray
    queries: np.ndarray
    info: dict[str, Any]


def cut_layers(model, n_layers: int) -> int:
    """Keep the first ``n_layers`` transformer layers of a sentence-transformers model in place; returns the
    original depth. Equivalent to reading ``hidden_states[n_layers]`` (what AdaptiveLayerLoss trains).

    Raises:
        ValueError: the model has no BERT-style ``encoder.layer`` stack, or fewer layers than asked.
    """
    from torch import nn

    auto = getattr(model[0], "auto_model", None)
    layers = getattr(getattr(auto, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"layers=[{n_layers}] needs a BERT-style encoder (auto_model.encoder.layer); got {type(auto).__name__}"
        )
    depth = len(layers)
    if n_layers > depth:
        raise ValueError(f"layers=[{n_layers}] exceeds the model's {depth} transformer layers")
    auto.encoder.layer = nn.ModuleList(list(layers)[:n_layers])
    auto.config.num_hidden_layers = n_layers
    return depth


def encode_model(
    spec: str, log, queries_for, item_ids: list[str], config: RetrievalEvalConfig, like_threshold: float,
    n_layers: int | None = None,
) -> tuple[EncodedModel, Queries]:  # fmt: skip
    """Load ``spec`` (cut to ``n_layers`` layers when given), build its texts, encode items and queries; time both."""
    from recsys_slm.models.loading import load_sentence_encoder, resolve_model_path

    path = resolve_model_path(spec)
    manifest = read_manifest(path) if isinstance(path, Path) else None
    texts_cfg, source = resolve_texts(config.texts, manifest)
    texts = RetrieverTexts(log, texts_cfg, like_threshold)
    queries = queries_for(texts)
    model = load_sentence_encoder(path, device=config.device)
    depth = cut_layers(model, n_layers) if n_layers is not None else None
    item_texts = texts.item_texts(item_ids)
    kw = dict(
        batch_size=config.batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    start = time.perf_counter()
    items = model.encode(item_texts, **kw)
    item_s = time.perf_counter() - start
    start = time.perf_counter()
    q = model.encode(queries.frame["text"].tolist(), **kw)
    query_s = time.perf_counter() - start
    tok = model.tokenizer
    q_tokens = [len(tok(t, add_special_tokens=True)["input_ids"]) for t in queries.frame["text"].head(200)]
    params = sum(p.numel() for p in model.parameters())
    info = {
        "spec": spec if n_layers is None else f"{spec}@{n_layers}L",
        "path": str(path),
        "layers": n_layers,
        "full_layers": depth,
        "stage": (manifest or {}).get("stage"),
        "params": int(params),
        "embedding_dim": int(items.shape[1]),
        "max_seq_length": int(model.max_seq_length),
        "device": str(model.device),
        "texts_source": source,
        "texts": config_to_dict(texts_cfg),
        "encode": {
            "items": len(item_texts),
            "item_seconds": item_s,
            "items_per_s": len(item_texts) / item_s if item_s > 0 else None,
            "queries": len(queries.frame),
            "query_seconds": query_s,
            "queries_per_s": len(queries.frame) / query_s if query_s > 0 else None,
            "query_tokens_mean": float(np.mean(q_tokens)) if q_tokens else None,
            "batch_size": config.batch_size,
        },
        "matryoshka_dims": ((manifest or {}).get("retriever") or {}).get("matryoshka_dims"),
    }
    del model
    return EncodedModel(spec, path, items.astype(np.float32), q.astype(np.float32), info), queries


def truncate(x: np.ndarray, dim: int) -> np.ndarray:
    """First ``dim`` coordinates, re-normalised (Matryoshka inference)."""
    from recsys_slm.retriever.index import l2_normalize

    return l2_normalize(x[:, :dim])


def _tag(spec: str, dim: int, factory: str) -> str:
    from recsys_slm.evaluation.exports import sanitize_tag

    name = Path(str(spec)).name or str(spec)
    return sanitize_tag(f"{name}__d{dim}__{factory.replace(',', '-')}")


# ---------------------------------------------------------------------------------------------- main


def _latency(
    index, queries: np.ndarray, k: int, n: int, seed: int, threads: int | None = 1
) -> dict[str, Any]:
    """Single-query search latency over ``n`` sampled queries, with faiss limited to ``threads`` OpenMP threads
    (None = faiss' default): one query per call is what an online retriever does, and OpenMP hand-off costs on a
    busy machine otherwise dominate small indexes."""
    if n <= 0 or len(queries) == 0:
        return {"p50": None, "p99": None, "mean": None, "queries": 0, "threads": threads}
    import faiss

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(queries), size=min(n, len(queries)), replace=False)
    times = []
    before = faiss.omp_get_max_threads()
    try:
        if threads is not None:
            faiss.omp_set_num_threads(int(threads))
        for i in pick:
            q = queries[i : i + 1]
            start = time.perf_counter()
            index.search(q, k)
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        faiss.omp_set_num_threads(before)
    t = np.asarray(times)
    return {
        "p50": float(np.percentile(t, 50)),
        "p99": float(np.percentile(t, 99)),
        "mean": float(t.mean()),
        "queries": len(t),
        "threads": threads,
    }


def evaluate_retrieval(config: RetrievalEvalConfig) -> dict[str, Any]:
    """Run the sweep and write the report directory ``config.out``; returns the report.

    Raises:
        ConfigError: ``models`` or ``out`` missing.
        FileNotFoundError: the data directory or its task files are missing.
    """
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.evaluation import exports
    from recsys_slm.evaluation.report import json_safe
    from recsys_slm.retriever.index import RetrievalIndex

    check(len(config.models) > 0, "models", "required: at least one encoder (--model DIR or models=[...])")
    check(config.out is not None, "out", "required: the output directory")
    data_dir = config.resolved_data_dir()
    if not (data_dir / "interactions.parquet").is_file():
        raise FileNotFoundError(
            f"{data_dir} is not a prepared data directory (no interactions.parquet); run recsys-slm data prepare "
            "or pass data_dir=DIR"
        )
    log = InteractionLog.load(data_dir)
    like_threshold = resolve_like_threshold(config.texts, data_dir)
    real = log.items[~log.items["is_placeholder"].to_numpy(dtype=bool)]
    item_ids = [str(i) for i in real["item_id"]]
    k_max = max(config.ks)

    notes: list[str] = []
    retrievable = set(item_ids)

    def queries_for(texts: RetrieverTexts) -> Queries:
        qs = eval_queries(
            log, texts, data_dir, config.split, config.eval_split, config.exclude_seen, config.max_queries
        )
        keep = qs.frame["target_item_id"].isin(retrievable).to_numpy()
        if not keep.all():
            note = (
                f"{int((~keep).sum())} queries dropped: their target is a placeholder item (not retrievable)"
            )
            if note not in notes:
                notes.append(note)
        return qs.subset(keep)

    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    models_info: list[dict[str, Any]] = []
    runs: dict[str, tuple[list[str], list[list[str]]]] = {}
    primary: dict[str, Any] | None = None
    queries: Queries | None = None
    saved_indexes: dict[str, RetrievalIndex] = {}
    per_user: dict[str, dict[str, float]] = {}  # tag -> user -> primary metric (recall@min(ks))
    variants = [(spec, n) for spec in config.models for n in [None, *config.layers]]
    for m_i, (base_spec, n_layers) in enumerate(variants):
        try:
            enc, queries = encode_model(
                base_spec, log, queries_for, item_ids, config, like_threshold, n_layers
            )
        except ValueError as exc:
            if n_layers is None:
                raise
            skipped.append(
                {"model": base_spec, "dim": None, "index": None, "reason": f"layers {n_layers}: {exc}"}
            )
            continue
        spec = enc.info["spec"]
        models_info.append(enc.info)
        frame = queries.frame
        targets = frame["target_item_id"].tolist()
        users = frame["user_id"].tolist()
        full = enc.items.shape[1]
        # a dim above this model's width stands for its full width: a ladder such as [768, ..., 32] sweeps a
        # 384-d MiniLM at 384, ..., 32 next to a 768-d mpnet
        dims = list(dict.fromkeys(min(d, full) for d in config.dims)) or [full]
        for d in config.dims:
            if d > full:
                skipped.append({"model": spec, "dim": d, "index": None, "reason": f"model dim is {full}"})
        max_excluded = max((len(e) for e in queries.exclude), default=0)
        for dim in dims:
            items_d, queries_d = truncate(enc.items, dim), truncate(enc.queries, dim)
            exact = RetrievalIndex.build(items_d, item_ids, "Flat")
            _, exact_rows = exact.search(queries_d, k_max)
            for factory in config.indexes:
                try:
                    index = RetrievalIndex.build(
                        items_d, item_ids, factory, encoder_dir=enc.path if isinstance(enc.path, Path) else None,
                        embedding_dim=full, nprobe=config.nprobe, ef_search=config.ef_search, seed=config.seed,
                    )  # fmt: skip
                except ValueError as exc:
                    skipped.append({"model": spec, "dim": dim, "index": factory, "reason": str(exc)})
                    continue
                start = time.perf_counter()
                scores, rows = index.search(queries_d, min(len(item_ids), k_max + max_excluded))
                batch_s = time.perf_counter() - start
                ranks, top_ids, _ = ranks_from_search(scores, rows, item_ids, queries.exclude, targets, k_max)
                _, raw_rows = index.search(queries_d, k_max)
                ann = {}
                for k in config.ks:
                    kk = min(k, len(item_ids))
                    inter = [
                        len(set(a[:kk][a[:kk] >= 0].tolist()) & set(b[:kk][b[:kk] >= 0].tolist())) / kk
                        for a, b in zip(raw_rows, exact_rows, strict=True)
                    ]
                    ann[f"ann_recall@{k}"] = float(np.mean(inter)) if inter else None
                tag = _tag(spec, dim, factory)
                entry = {
                    "tag": tag,
                    "model": spec,
                    "model_index": m_i,
                    "dim": dim,
                    "full_dim": full,
                    "index": factory,
                    "metrics": retrieval_metrics(ranks, config.ks, users),
                    **ann,
                    "build_seconds": index.meta["build_seconds"],
                    "search_batch_seconds": batch_s,
                    "latency_ms": _latency(
                        index, queries_d, k_max, config.latency_queries, config.seed, config.latency_threads
                    ),
                    "bytes_per_vector": index.meta["serialized_bytes"] / max(index.ntotal, 1),
                    "code_bytes_per_vector": index.meta["code_bytes_per_vector"],
                    "float32_bytes_per_vector": 4 * dim,
                    "search_params": index.meta["search_params"],
                    "training_notes": index.meta["training_notes"],
                    "encoder_items_per_s": enc.info["encode"]["items_per_s"],
                    "encoder_queries_per_s": enc.info["encode"]["queries_per_s"],
                }
                results.append(entry)
                per_user[tag] = per_user_values(
                    recall_at_k([np.array([r]) for r in ranks], min(config.ks)), users
                )
                is_primary = primary is None and dim == full
                if is_primary:
                    primary = {"tag": tag, "model": spec, "dim": dim, "index": factory}
                want = (
                    config.trec_runs == "all"
                    or (config.trec_runs == "flat" and factory.strip().lower() == "flat")
                    or is_primary
                )
                if want:
                    runs[tag] = (exports.query_ids(users), top_ids)
                if config.save_indexes:
                    saved_indexes[tag] = index
    if primary is None and results:
        r = results[0]
        primary = {"tag": r["tag"], "model": r["model"], "dim": r["dim"], "index": r["index"]}

    if config.bootstrap_resamples and primary is not None:
        attach_intervals(results, per_user, primary["tag"], config.bootstrap_resamples, config.ci_level,
                         config.seed)  # fmt: skip

    baselines: dict[str, dict[str, float]] = {}
    if config.baselines and queries is not None:
        excluded = exclusion_mask(queries.exclude, item_ids)
        bscores = baseline_scores(log, data_dir, config.split, queries, item_ids, like_threshold)
        for name, s in bscores.items():
            ranks = exact_target_ranks(
                np.asarray(s), item_ids, queries.frame["target_item_id"].tolist(), excluded
            )
            ranks[ranks > k_max] = np.inf
            baselines[name] = retrieval_metrics(ranks, config.ks, queries.frame["user_id"].tolist())

    report: dict[str, Any] = {
        "data": {
            "data_dir": str(data_dir),
            "interactions": log.n_interactions,
            "users": log.n_users,
            "items": log.n_items,
            "catalogue": len(item_ids),
        },
        "queries": {
            "split": config.split,
            "eval_split": config.eval_split,
            "source": str(queries.source) if queries is not None else None,
            "count": len(queries.frame) if queries is not None else 0,
            "users": int(queries.frame["user_id"].nunique()) if queries is not None else 0,
            "exclude_seen": config.exclude_seen,
            "excluded_mean": float(np.mean([len(e) for e in queries.exclude]))
            if queries is not None
            else None,
        },
        "ks": list(config.ks),
        "primary": primary,
        "primary_metric": f"recall@{min(config.ks)}",
        "models": models_info,
        "results": results,
        "baselines": baselines,
        "skipped": skipped,
        "tie_rule": TIE_RULE,
        "notes": notes,
        "config": config_to_dict(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
    }
    with atomic_dir(config.out) as tmp:
        files = ["report.json", "summary.md"]
        if queries is not None and primary is not None:
            qids = exports.query_ids(queries.frame["user_id"].tolist())
            ids_ok = exports.trec_safe(qids) and exports.trec_safe(item_ids)
            if ids_ok:
                targets = [[t] for t in queries.frame["target_item_id"]]
                exports.write_trec_qrels(tmp / "qrels.trec", qids, targets, [[1]] * len(targets))
                for tag, (q, top) in runs.items():
                    ranks_list = [np.arange(1, len(t) + 1) for t in top]
                    if tag == primary["tag"]:
                        exports.write_trec_run(
                            tmp / "run.trec", q, top, ranks_list, exports.sanitize_tag(tag)
                        )
                        files += ["run.trec", "qrels.trec"]
                    (tmp / "runs").mkdir(exist_ok=True)
                    exports.write_trec_run(tmp / "runs" / f"{tag}.trec", q, top, ranks_list, tag)
                    files.append(f"runs/{tag}.trec")
            else:
                notes.append("TREC files not written: some user or item ids are empty or contain whitespace")
        if results:
            plot_pareto(tmp / "pareto.png", results, baselines, primary_metric=report["primary_metric"])
            files.append("pareto.png")
        for tag, index in saved_indexes.items():
            index.save(tmp / "indexes" / tag)
            files.append(f"indexes/{tag}/")
        report["files"] = sorted(files)
        safe = json_safe(report)
        (tmp / "summary.md").write_text(markdown_summary(safe))
        write_json_atomic(tmp / "report.json", safe)
    return json_safe(report)


def attach_intervals(
    results: list[dict[str, Any]],
    per_user: dict[str, dict[str, float]],
    primary_tag: str,
    n_resamples: int,
    level: float,
    seed: int = 0,
) -> None:
    """Add bootstrap intervals of the primary metric (recall@min(ks)) to each result, in place.

    Adds to each result:

    * ``ci``: the interval of its own metric;
    * ``retained``: its metric over the *same model's* full-dim exact (Flat) configuration — what a Matryoshka
      truncation or an ANN index keeps — paired over users (``reference`` = that tag; the full-dim
      configuration of the same index when no Flat one was run);
    * ``vs_primary``: its metric over the primary configuration's (a student vs the teacher), paired.

    Args:
        results (list[dict]): sweep entries (``tag``, ``model_index``, ``dim``, ``full_dim``, ``index``).
        per_user (dict[str, dict[str, float]]): tag -> user -> per-user primary metric.
        primary_tag (str): the primary configuration.
    """
    kw = {"level": level, "n_resamples": n_resamples, "seed": seed}
    full = {}
    for r in results:
        if r["dim"] == r["full_dim"]:
            key = (r["model_index"], r["index"].strip().lower())
            full.setdefault(key, r["tag"])
    for r in results:
        tag = r["tag"]
        r["ci"] = mean_ci(per_user[tag], **kw)
        ref = full.get((r["model_index"], "flat")) or full.get((r["model_index"], r["index"].strip().lower()))
        if ref is not None:
            r["retained"] = {"reference": ref, **paired_ratio_ci(per_user[ref], per_user[tag], **kw)}
        vs = paired_ratio_ci(per_user[primary_tag], per_user[tag], **kw)
        r["vs_primary"] = {"reference": primary_tag, **vs}


# ---------------------------------------------------------------------------------------------- reports


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def results_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per configuration and per baseline."""
    k = min(report["ks"])
    big = max(report["ks"])
    header = ["model", "dim", "index", f"recall@{k}", f"ndcg@{k}", f"recall@{big}", f"ann_recall@{k}",
              "bytes/vec", "p50 ms", "p99 ms", "build s", "enc q/s"]  # fmt: skip
    rows = []
    for r in report["results"]:
        m = r["metrics"]
        rows.append([
            Path(str(r["model"])).name, str(r["dim"]), r["index"], _fmt(m.get(f"recall@{k}")),
            _fmt(m.get(f"ndcg@{k}")), _fmt(m.get(f"recall@{big}")), _fmt(r.get(f"ann_recall@{k}"), 3),
            _fmt(float(r["code_bytes_per_vector"]), 1), _fmt(r["latency_ms"]["p50"], 3),
            _fmt(r["latency_ms"]["p99"], 3), _fmt(r["build_seconds"], 3), _fmt(r["encoder_queries_per_s"], 1),
        ])  # fmt: skip
    for name, m in report.get("baselines", {}).items():
        rows.append([name, "–", "–", _fmt(m.get(f"recall@{k}")), _fmt(m.get(f"ndcg@{k}")),
                     _fmt(m.get(f"recall@{big}")), "–", "–", "–", "–", "–", "–"])  # fmt: skip
    return header, rows


def text_table(report: dict[str, Any]) -> str:
    header, rows = results_table(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in [header, *rows]
    )


def markdown_summary(report: dict[str, Any]) -> str:
    q, data = report["queries"], report["data"]
    header, rows = results_table(report)
    lines = [
        "# Retrieval evaluation",
        "",
        f"- data: `{data['data_dir']}` ({data['interactions']:,} interactions, {data['users']:,} users, "
        f"{data['catalogue']:,} retrievable items)",
        f"- queries: {q['count']:,} held-out targets ({q['split']}, {q['eval_split']}) from `{q['source']}`; "
        f"excluded per query: {q['exclude_seen']} seen items (mean {_fmt(q['excluded_mean'], 1)})",
        f"- primary: {report['primary']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "bytes/vec = per-vector storage of the index (codes + ids + graph links; shared codebooks/centroids "
        "excluded); p50/p99 = one query at a time, k = max(ks); enc q/s = user texts encoded per second.",
    ]
    lines += interval_lines(report)
    if report.get("skipped"):
        lines += [
            "",
            "## Skipped",
            "",
            *(
                "- " + " ".join(str(v) for v in (s["model"], s["dim"] and f"dim {s['dim']}", s["index"]) if v)
                + f": {s['reason']}"
                for s in report["skipped"]
            ),
        ]
    lines += ["", "Definitions and formats: `docs/retriever.md`.", ""]
    return "\n".join(lines)


def _ci(d: dict[str, Any] | None, key: str, digits: int) -> str:
    if not d:
        return "–"
    return f"{_fmt(d.get(key), digits)} [{_fmt(d.get('low'), digits)}, {_fmt(d.get('high'), digits)}]"


def interval_lines(report: dict[str, Any]) -> list[str]:
    """Markdown section: the bootstrap intervals of the exact-index (Flat) rows; [] when none were computed."""
    rows = [r for r in report["results"] if "ci" in r]
    flat = [r for r in rows if r["index"].strip().lower() == "flat"]
    rows = flat or rows
    if not rows:
        return []
    metric = report["primary_metric"]
    level = rows[0]["ci"]["level"]
    primary = report["primary"]["tag"] if report.get("primary") else "–"
    return [
        "",
        f"## {metric}: {level:.0%} intervals (bootstrap over users)",
        "",
        f"| model | dim | index | {metric} [CI] | retained vs own full dim [CI] | vs primary [CI] |",
        "|---|---|---|---|---|---|",
        *(
            f"| {Path(str(r['model'])).name} | {r['dim']} | {r['index']} | {_ci(r['ci'], 'mean', 4)} | "
            f"{_ci(r.get('retained'), 'ratio', 3)} | {_ci(r.get('vs_primary'), 'ratio', 3)} |"
            for r in rows
        ),
        "",
        f"Ratios are paired (the same resampled users for both configurations); primary = `{primary}`. An "
        "interval that contains a threshold (e.g. 0.95) means these queries cannot tell the two apart at it.",
    ]


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points no other point beats (lower or equal x and higher or equal y, one strictly), by x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    front, best = [], -math.inf
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return front


def plot_pareto(
    path: str | Path,
    results: list[dict[str, Any]],
    baselines: dict[str, dict[str, float]],
    primary_metric: str,
) -> Path:
    """Two panels: ``primary_metric`` vs per-vector bytes (log x) and vs p50 query latency; Pareto fronts drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(11, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    markers = "osD^vP*Xh<>"
    models = list(dict.fromkeys(r["model"] for r in results))
    factories = list(dict.fromkeys(r["index"] for r in results))
    y = [r["metrics"].get(primary_metric) or 0.0 for r in results]
    panels = [
        ("code_bytes_per_vector", "bytes per vector (log)", lambda r: float(r["code_bytes_per_vector"])),
        ("latency", "query latency p50 (ms, log)", lambda r: float(r["latency_ms"]["p50"] or 0.0)),
    ]
    for p_i, (_, label, get) in enumerate(panels):
        ax = fig.add_subplot(1, 2, p_i + 1)
        x = [get(r) for r in results]
        for m_i, model in enumerate(models):
            for f_i, factory in enumerate(factories):
                pts = [i for i, r in enumerate(results) if r["model"] == model and r["index"] == factory]
                if not pts:
                    continue
                ax.scatter([x[i] for i in pts], [y[i] for i in pts], marker=markers[f_i % len(markers)],
                           color=f"C{m_i % 10}", s=28)  # fmt: skip
                for i in pts:
                    ax.annotate(
                        str(results[i]["dim"]),
                        (x[i], y[i]),
                        fontsize=6,
                        xytext=(2, 2),
                        textcoords="offset points",
                    )
        front = pareto_front(x, y)
        ax.step([x[i] for i in front], [y[i] for i in front], where="post", color="grey", linewidth=0.8)
        for b_i, (name, metrics) in enumerate(baselines.items()):
            v = metrics.get(primary_metric)
            if v is not None:
                ax.axhline(v, linestyle="--", linewidth=0.8, color=f"C{(len(models) + b_i) % 10}", label=name)
        if all(v > 0 for v in x):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(primary_metric)
        ax.set_title(f"{primary_metric} vs {label.split(' (')[0]}")
        if p_i == 1:
            # one entry per model (colour) and per index (marker), not per combination: a 4-model × 5-index
            # sweep would otherwise need 20 entries
            handles = [Line2D([], [], color=f"C{m_i % 10}", marker="o", linestyle="", label=Path(str(m)).name)
                       for m_i, m in enumerate(models)]  # fmt: skip
            handles += [Line2D([], [], color="grey", marker=markers[f_i % len(markers)], linestyle="", label=f)
                        for f_i, f in enumerate(factories)]  # fmt: skip
            handles += [h for h in ax.get_legend_handles_labels()[0]]  # the baselines' lines
            ax.legend(handles=handles, fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------- two-stage


class DimensionError(ValueError):
    """A Matryoshka dim above the encoder's width; ``full`` is the width."""

    def __init__(self, message: str, full: int) -> None:
        super().__init__(message)
        self.full = full


@dataclass
class RetrieveCandidatesConfig:
    """``recsys-slm retriever candidates`` (arguments of :func:`retrieve_candidates`).

    Fields:
        model (str | None): the retriever (directory or encoder spec). Required.
        data_dir (Path | None): prepared data directory; default ``$RECSYS_SLM_HOME/data/movielens-100k``.
        out (Path | None): output directory (``<split>.parquet`` + ``retrieval.json``). Required.
        k (int): candidates per user. Default 50.
        dim (int | None): Matryoshka dim; None = full. Default None.
        index (str): faiss factory string. Default Flat.
        split (str): val or test. Default test.
        missing_target (str): drop or append (see :func:`retrieve_candidates`). Default drop.
        texts (RetrieverTextConfig): left at the defaults, the model manifest's texts are used.
        batch_size (int), device (str), max_queries (int | None), nprobe (int), ef_search (int).
    """

    model: str | None = None
    data_dir: Path | None = None
    out: Path | None = None
    k: int = 50
    dim: int | None = None
    index: str = "Flat"
    split: Literal["val", "test"] = "test"
    missing_target: Literal["drop", "append"] = "drop"
    texts: RetrieverTextConfig = field(default_factory=RetrieverTextConfig)
    batch_size: int = 64
    device: str = "auto"
    max_queries: int | None = None
    nprobe: int = 8
    ef_search: int = 64

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        check(self.dim is None or self.dim >= 1, "dim", f"must be >= 1 or null, got {self.dim}")
        check(self.max_queries is None or self.max_queries > 0, "max_queries", "must be positive or null")

    def run(self) -> dict[str, Any]:
        check(self.model is not None, "model", "required: the retriever directory (--model DIR)")
        check(self.out is not None, "out", "required: the output directory (--out DIR)")
        data_dir = data_dir_or_default(self.data_dir)
        return retrieve_candidates(
            self.model, data_dir, self.out, k=self.k, dim=self.dim, index=self.index, split=self.split,
            missing_target=self.missing_target, texts=self.texts, batch_size=self.batch_size, device=self.device,
            max_queries=self.max_queries, nprobe=self.nprobe, ef_search=self.ef_search,
        )  # fmt: skip


@dataclass
class CandidateSource:
    """A retriever's encodings of the catalogue and of the leave-one-out queries: computed once, then cut into
    candidate tasks at any dim / index by :func:`write_candidates` (the two-stage grid reuses it across dims)."""

    model: str
    data_dir: Path
    split: Literal["val", "test"]
    enc: EncodedModel
    queries: Queries
    item_ids: list[str]


def encode_candidate_source(
    model: str,
    data_dir: str | Path,
    *,
    split: Literal["val", "test"] = "test",
    texts: RetrieverTextConfig | None = None,
    batch_size: int = 64,
    device: str = "auto",
    max_queries: int | None = None,
) -> CandidateSource:
    """Encode the catalogue (non-placeholder items) and the retrievable leave-one-out targets of ``split``."""
    from recsys_slm.data.schema import InteractionLog

    data_dir = Path(data_dir)
    log = InteractionLog.load(data_dir)
    cfg = RetrievalEvalConfig(
        models=[model], data_dir=data_dir, eval_split=split, exclude_seen="all",
        texts=texts or RetrieverTextConfig(), batch_size=batch_size, device=device, max_queries=max_queries,
    )  # fmt: skip
    like_threshold = resolve_like_threshold(cfg.texts, data_dir)
    real = log.items[~log.items["is_placeholder"].to_numpy(dtype=bool)]
    item_ids = [str(i) for i in real["item_id"]]
    retrievable = set(item_ids)

    def queries_for(t: RetrieverTexts) -> Queries:
        qs = eval_queries(log, t, data_dir, "leave_one_out", split, "all", max_queries)
        return qs.subset(qs.frame["target_item_id"].isin(retrievable).to_numpy())

    enc, queries = encode_model(model, log, queries_for, item_ids, cfg, like_threshold)
    return CandidateSource(model, data_dir, split, enc, queries, item_ids)


def retrieve_candidates(
    model: str,
    data_dir: str | Path,
    out: str | Path,
    *,
    k: int = 50,
    dim: int | None = None,
    index: str = "Flat",
    split: Literal["val", "test"] = "test",
    missing_target: Literal["drop", "append"] = "drop",
    texts: RetrieverTextConfig | None = None,
    batch_size: int = 64,
    device: str = "auto",
    max_queries: int | None = None,
    nprobe: int = 8,
    ef_search: int = 64,
) -> dict[str, Any]:
    """Stage 1 of the two-stage system: the retriever's top-``k`` as a candidate task the ranker eval accepts
    (:func:`encode_candidate_source` then :func:`write_candidates`).

    Queries are the leave-one-out targets of ``DATA/tasks/candidates/<split>.parquet``; the retrieved list
    excludes every item the user interacted with (and duplicate listings), as the candidate task's negatives do.
    Writes ``OUT/<split>.parquet`` with the candidate-task columns (user_id, target_item_id, timestamp,
    history_item_ids and history_labels copied from the source task record, candidate_item_ids in retrieval
    order, candidate_labels) plus ``retriever_scores``; and ``OUT/retrieval.json`` (hit rate, counts, config).

    A target the retriever misses has no relevant candidate, which the ranker eval refuses. ``missing_target``:
    ``drop`` the record (the system metric over all users is then the ranker's metric on the kept records ×
    ``kept / total``, since a missed user scores 0 — ``retrieval.json`` records the factor) or ``append`` the
    target as the last candidate (an oracle upper bound of the ranker stage; the list has k + 1 items).

    Evaluate stage 2 with ``recsys-slm eval ranker --model RANKER --task OUT/<split>.parquet --data-dir DATA``.

    Returns:
        dict: the content of ``retrieval.json``.
    """
    source = encode_candidate_source(model, data_dir, split=split, texts=texts, batch_size=batch_size,
                                     device=device, max_queries=max_queries)  # fmt: skip
    return write_candidates(source, out, k=k, dim=dim, index=index, missing_target=missing_target, nprobe=nprobe,
                            ef_search=ef_search)  # fmt: skip


def write_candidates(
    source: CandidateSource,
    out: str | Path,
    *,
    k: int = 50,
    dim: int | None = None,
    index: str = "Flat",
    missing_target: Literal["drop", "append"] = "drop",
    nprobe: int = 8,
    ef_search: int = 64,
) -> dict[str, Any]:
    """Write the candidate task of :func:`retrieve_candidates` from an encoded ``source`` at ``dim``.

    Raises:
        DimensionError: ``dim`` is above the encoder's width.
    """
    from recsys_slm.retriever.index import RetrievalIndex

    model, data_dir, split = source.model, source.data_dir, source.split
    enc, queries, item_ids = source.enc, source.queries, source.item_ids
    full = enc.items.shape[1]
    d = full if dim is None else int(dim)
    if d > full:
        raise DimensionError(f"dim={d} exceeds the model's embedding dimension {full}", full)
    idx = RetrievalIndex.build(
        truncate(enc.items, d), item_ids, index, encoder_dir=enc.path if isinstance(enc.path, Path) else None,
        embedding_dim=full, nprobe=nprobe, ef_search=ef_search,
    )  # fmt: skip
    max_excluded = max((len(e) for e in queries.exclude), default=0)
    frame = queries.frame
    targets = frame["target_item_id"].tolist()
    scores, rows = idx.search(truncate(enc.queries, d), min(len(item_ids), k + max_excluded))
    ranks, top_ids, top_scores = ranks_from_search(scores, rows, item_ids, queries.exclude, targets, k)
    out_rows = []
    dropped = appended = 0
    for q, (ids, s) in enumerate(zip(top_ids, top_scores, strict=True)):
        target = targets[q]
        ids, s = list(ids), [float(v) for v in s]
        if not np.isfinite(ranks[q]):
            if missing_target == "drop":
                dropped += 1
                continue
            ids.append(target)
            s.append(float("nan"))
            appended += 1
        out_rows.append(
            {
                "user_id": frame["user_id"].iloc[q],
                "target_item_id": target,
                "timestamp": int(frame["timestamp"].iloc[q]),
                "history_item_ids": [str(i) for i in frame["history_item_ids"].iloc[q]],
                "history_labels": [int(v) for v in frame["history_labels"].iloc[q]],
                "candidate_item_ids": ids,
                "candidate_labels": [int(i == target) for i in ids],
                "retriever_scores": s,
            }
        )
    out = Path(out)
    total = len(frame)
    kept = len(out_rows)
    stats = {
        "model": model,
        "model_path": str(enc.path),
        "data_dir": str(data_dir),
        "source_task": str(queries.source),
        "split": split,
        "k": k,
        "dim": d,
        "index": index,
        "records": total,
        "query_users": [str(u) for u in frame["user_id"]],  # every user asked (the system eval's universe)
        "written": kept,
        "target_retrieved": int(np.isfinite(ranks).sum()),
        "hit_rate": float(np.isfinite(ranks).mean()) if total else None,
        "missing_target": missing_target,
        "dropped": dropped,
        "appended": appended,
        "system_metric_factor": kept / total if total and missing_target == "drop" else None,
        "retrieval_metrics": retrieval_metrics(
            ranks, sorted({kk for kk in (10, 20, k) if kk <= k}), frame["user_id"].tolist()
        ),
        "encoder": enc.info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    df = pd.DataFrame(out_rows, columns=["user_id", "target_item_id", "timestamp", "history_item_ids",
                                         "history_labels", "candidate_item_ids", "candidate_labels",
                                         "retriever_scores"])  # fmt: skip
    df["timestamp"] = df["timestamp"].astype(np.int64)
    from recsys_slm.evaluation.report import json_safe

    with atomic_dir(out) as tmp:
        df.to_parquet(tmp / f"{split}.parquet", index=False)
        write_json_atomic(tmp / "retrieval.json", json_safe(stats))
    return json_safe(stats)
