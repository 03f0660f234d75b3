"""Evaluation outputs other tools can read: ``predictions.parquet`` and TREC ``run`` / ``qrels`` files.

TREC formats (whitespace-separated, one line per candidate)::

    run.trec:   qid Q0 docno rank score runtag
    qrels.trec: qid 0 docno rel

``qid`` is the user id (or ``<user_id>_<record>`` when a user has several records in the task), ``docno`` the
item id, ``rel`` the 0/1 candidate label. trec_eval and pytrec_eval ignore the rank column and re-sort by
score, breaking ties by docno *descending*, while recsys_slm breaks them by item id ascending. So the score
column is not the model score but ``N + 1 - rank`` (N candidates in the query): strictly decreasing in our
rank, it makes every tool reproduce recsys_slm's ranking and numbers exactly. The raw scores are in
``predictions.parquet``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

_WHITESPACE = re.compile(r"\s")


def query_ids(user_ids: Sequence[str]) -> list[str]:
    """TREC query ids: the user id when every user has one record, else ``<user_id>_<record>`` for all rows."""
    users = [str(u) for u in user_ids]
    if len(set(users)) == len(users):
        return users
    return [f"{u}_{i}" for i, u in enumerate(users)]


def trec_safe(ids) -> bool:
    """True when no id is empty or contains whitespace (TREC files are whitespace-separated)."""
    return all(str(i) and not _WHITESPACE.search(str(i)) for i in ids)


def _write_lines_atomic(path: Path, lines: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(lines))
    os.replace(tmp, path)


def write_trec_run(
    path: str | Path,
    qids: Sequence[str],
    item_ids_list: Sequence[Sequence[str]],
    ranks_list: Sequence[np.ndarray],
    run_tag: str,
) -> Path:
    """Write a TREC run: per query, candidates in rank order with score ``N + 1 - rank``.

    Args:
        path (Path): output file.
        qids (Q str): query ids (:func:`query_ids`).
        item_ids_list (Q sequences (N_q,)): candidate ids per query.
        ranks_list (Q arrays (N_q,)): 1-based rank of each candidate
            (:func:`recsys_slm.metrics.candidate_ranks`).
        run_tag (str): the runtag column (no whitespace).

    Raises:
        ValueError: an id or the run tag contains whitespace.
    """
    if not trec_safe([run_tag]):
        raise ValueError(f"run tag {run_tag!r} must be non-empty without whitespace")
    _check_ids(qids, item_ids_list)
    lines = []
    for qid, ids, ranks in zip(qids, item_ids_list, ranks_list, strict=True):
        n = len(ids)
        for j in np.argsort(np.asarray(ranks), kind="stable"):
            rank = int(ranks[j])
            lines.append(f"{qid} Q0 {ids[j]} {rank} {n + 1 - rank} {run_tag}\n")
    path = Path(path)
    _write_lines_atomic(path, lines)
    return path


def write_trec_qrels(
    path: str | Path, qids: Sequence[str], item_ids_list: Sequence[Sequence[str]], labels_list: Sequence
) -> Path:
    """Write TREC qrels: every candidate with its 0/1 label (judged non-relevant candidates included)."""
    _check_ids(qids, item_ids_list)
    lines = [
        f"{qid} 0 {item} {int(rel)}\n"
        for qid, ids, labels in zip(qids, item_ids_list, labels_list, strict=True)
        for item, rel in zip(ids, labels, strict=True)
    ]
    path = Path(path)
    _write_lines_atomic(path, lines)
    return path


def _check_ids(qids: Sequence[str], item_ids_list: Sequence[Sequence[str]]) -> None:
    if not trec_safe(qids) or not all(trec_safe(ids) for ids in item_ids_list):
        raise ValueError(
            "query or item ids contain whitespace or are empty; they cannot be written as TREC files"
        )


def sanitize_tag(name: str) -> str:
    """A run tag from a method or model name: whitespace and slashes become ``_``."""
    return re.sub(r"[\s/\\]+", "_", str(name)).strip("_") or "run"


def pointwise_predictions(
    frame: pd.DataFrame,
    primary: str,
    scores: dict[str, np.ndarray],
    probs: dict[str, np.ndarray | None],
) -> pd.DataFrame:
    """One row per record: record, user_id, item_id, label, score, p_yes, then ``score_<method>`` per other method.

    Args:
        frame (pd.DataFrame): the evaluated pointwise records (N rows).
        primary (str): the method whose scores fill ``score`` / ``p_yes`` (the model when evaluated).
        scores (dict[str, array (N,)]): ranking score per method (the model's is logit_yes - logit_no).
        probs (dict[str, array (N,) | None]): P(like) per method; None when the method is not a probability.
    """
    out = pd.DataFrame(
        {
            "record": np.arange(len(frame), dtype=np.int64),
            "user_id": frame["user_id"].astype(str).to_numpy(),
            "item_id": frame["item_id"].astype(str).to_numpy(),
            "label": frame["label"].to_numpy(dtype=np.int64),
            "score": np.asarray(scores[primary], dtype=np.float64),
            "p_yes": np.asarray(probs[primary], dtype=np.float64)
            if probs.get(primary) is not None
            else np.nan,
        }
    )
    for name, values in scores.items():
        if name != primary:
            out[f"score_{name}"] = np.asarray(values, dtype=np.float64)
    return out


def _cat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p) for p in parts]) if len(parts) else np.zeros(0)


def candidate_predictions(
    frame: pd.DataFrame,
    qids: Sequence[str],
    primary: str,
    scores: dict[str, list[np.ndarray]],
    ranks: dict[str, list[np.ndarray]],
) -> pd.DataFrame:
    """One row per (record, candidate): record, qid, user_id, item_id, label, score, rank, then
    ``score_<method>`` and ``rank_<method>`` per other method. Rows keep the task's candidate order."""
    lengths = [len(c) for c in frame["candidate_item_ids"]]
    out = pd.DataFrame(
        {
            "record": np.repeat(np.arange(len(frame), dtype=np.int64), lengths),
            "qid": np.repeat(np.asarray(qids, dtype=object), lengths),
            "user_id": np.repeat(frame["user_id"].astype(str).to_numpy(dtype=object), lengths),
            "item_id": np.asarray([str(i) for c in frame["candidate_item_ids"] for i in c], dtype=object),
            "label": np.asarray([int(v) for c in frame["candidate_labels"] for v in c], dtype=np.int64),
            "score": _cat(scores[primary]).astype(np.float64),
            "rank": _cat(ranks[primary]).astype(np.int64),
        }
    )
    for name in scores:
        if name != primary:
            out[f"score_{name}"] = _cat(scores[name]).astype(np.float64)
            out[f"rank_{name}"] = _cat(ranks[name]).astype(np.int64)
    return out
