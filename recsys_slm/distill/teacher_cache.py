"""Off-policy teacher cache: score a pointwise task or transfer set once, store what distillation reads.

``recsys-slm teacher score --model DIR --task PATH --out PARQUET`` runs the teacher over every record and writes
the input columns plus, per record (the answer position = the last prompt token, where " Yes"/" No" is read):

* ``teacher_logit_yes``, ``teacher_logit_no`` (float32), ``teacher_score`` = yes − no, ``teacher_p_yes`` = σ(score):
  everything the ranker objectives (binary KL, listwise KL, margin-MSE) need;
* ``teacher_topk_ids`` (list<int32>, k) and ``teacher_topk_logprobs`` (list<float32>, k): the top-k of the
  full next-token distribution ``log_softmax(z / T)`` at the answer position, for token-level KD
  (:func:`recsys_slm.distill.losses.topk_distill_loss`) and cross-tokenizer KD (ULD / GOLD). Embedding rows
  the tokenizer can never produce (Qwen2.5: 271 filler ids between ``len(tokenizer)`` and 151,936) are masked
  before the softmax, so they never enter the top-k.

Storage per record: 4 float32 scalars (16 B) + k × (4 + 4) B of top-k in memory; on disk parquet compresses
it (the default k = 20 costs ≈ 176 B per record before compression; 8,000 records ≈ 1.4 MB).

The parquet's schema metadata ``recsys_slm`` holds the teacher (path, manifest stage, tokenizer length, vocab
rows), the prompt, k, the temperature and a fingerprint of the token ids scored, so a distillation run can
refuse a cache made with another prompt or tokenizer.

Records are scored length-sorted in chunks of ``chunk_records``; each finished chunk is written to
``<out>.parts/`` so an interrupted run resumes where it stopped; the final file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from recsys_slm.config import check, config_to_dict, validate_fields
from recsys_slm.data.prompts import PromptConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
METADATA_KEY = b"recsys_slm"
TEACHER_COLUMNS = (
    "teacher_logit_yes",
    "teacher_logit_no",
    "teacher_score",
    "teacher_p_yes",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
)
REQUIRED_TASK_COLUMNS = ("user_id", "item_id", "history_item_ids", "history_labels")


@dataclass
class TeacherScoreConfig:
    """Config of ``recsys-slm teacher score`` (keys in ``docs/distillation.md``).

    Fields:
        model (str): teacher model directory (or packaged name / hub id).
        task (Path): parquet of pointwise records or a transfer set (user_id, item_id, history_item_ids,
            history_labels; other columns are carried through).
        out (Path): output parquet.
        data_dir (Path | None): prepared data directory (item and user tables for prompts).
        prompt (PromptConfig): prompt; the default is replaced by the one in the teacher's manifest.
        top_k (int): answer-position top-k to store; 0 stores none. Default 20.
        temperature (float): temperature of the stored top-k log-probs (distil at the same T). Default 1.0.
        batch_size (int): prompts per forward. Default 16.
        chunk_records (int): records per resumable part file. Default 1024.
        max_records (int | None): score only the first N records. Default None (all).
        device (str): "auto", "cpu", "cuda" or "cuda:N". Default "auto".
        precision (str): "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16".
    """

    model: str = ""
    task: Path | None = None
    out: Path | None = None
    data_dir: Path | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    top_k: int = 20
    temperature: float = 1.0
    batch_size: int = 16
    chunk_records: int = 1024
    max_records: int | None = None
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        validate_fields(self)
        check(bool(self.model.strip()), "model", "must name the teacher model directory")
        check(self.task is not None, "task", "must name a task parquet (e.g. DATA/tasks/pointwise/train.parquet)")
        check(self.out is not None, "out", "must name the output parquet")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        for key in ("batch_size", "chunk_records"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        check(
            self.max_records is None or self.max_records > 0,
            "max_records",
            f"must be > 0 or null (= all records), got {self.max_records}",
        )


def read_task(path: Path, max_records: int | None = None) -> pd.DataFrame:
    """Load a task/transfer-set parquet and check its columns (the error names the file and the columns)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    frame = pd.read_parquet(path)
    missing = [c for c in REQUIRED_TASK_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)}; a pointwise task or transfer set has "
            f"{', '.join(REQUIRED_TASK_COLUMNS)}"
        )
    if max_records is not None:
        frame = frame.head(max_records)
    return frame.reset_index(drop=True)


def sequences_fingerprint(sequences: list[list[int]]) -> str:
    """A short hash of the token ids scored (a distillation run compares it with its own encoding)."""
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        digest.update(b";")
    return digest.hexdigest()[:16]


@torch.inference_mode()
def answer_position_outputs(
    scorer, sequences: list[list[int]], top_k: int, temperature: float, ignore_ids: list[int]
) -> dict[str, np.ndarray]:
    """Teacher outputs at the answer position of each sequence (one forward per batch).

    Args:
        scorer (VerbalizerScorer): the teacher's scorer (eval mode).
        sequences: N token-id lists.
        top_k (int): how many of the answer-position distribution to keep (0 = none).
        temperature (float): ``log_softmax(z / T)`` for the top-k.
        ignore_ids (list[int]): vocabulary rows masked to −inf before the softmax.

    Returns:
        dict: ``logits`` (N, 2) float32 [yes, no]; ``topk_ids`` (N, k) int32; ``topk_logprobs`` (N, k) float32.
    """
    from recsys_slm.distill.cross_tokenizer import mask_logits
    from recsys_slm.ranker.batching import collate

    head = scorer.model.get_output_embeddings()
    logits_out, ids_out, lp_out = [], [], []
    for start in range(0, len(sequences), scorer.batch_size):
        chunk = sequences[start : start + scorer.batch_size]
        ids, mask = collate(chunk, scorer.pad_id)
        hidden = scorer.last_hidden(ids.to(scorer.device), mask.to(scorer.device))  # (B, H)
        logits_out.append(scorer.verbalizer_logits(hidden).cpu())
        if top_k:
            full = head(hidden.to(head.weight.dtype)).float()  # (B, V): one row per prompt, never (B, L, V)
            cap = getattr(scorer.model.config, "final_logit_softcapping", None)
            if cap:
                full = torch.tanh(full / cap) * cap
            full = mask_logits(full, ignore_ids or None)
            logprobs = torch.log_softmax(full / temperature, dim=-1)
            values, index = logprobs.topk(top_k, dim=-1)
            ids_out.append(index.to(torch.int32).cpu())
            lp_out.append(values.cpu())
    n = len(sequences)
    return {
        "logits": torch.cat(logits_out).numpy() if logits_out else np.zeros((0, 2), np.float32),
        "topk_ids": torch.cat(ids_out).numpy() if ids_out else np.zeros((n, 0), np.int32),
        "topk_logprobs": torch.cat(lp_out).numpy() if lp_out else np.zeros((n, 0), np.float32),
    }


def _chunk_frame(outputs: dict[str, np.ndarray], rows: np.ndarray) -> pd.DataFrame:
    logits = outputs["logits"]
    score = logits[:, 0] - logits[:, 1]
    return pd.DataFrame(
        {
            "_row": rows,
            "teacher_logit_yes": logits[:, 0],
            "teacher_logit_no": logits[:, 1],
            "teacher_score": score,
            "teacher_p_yes": 1.0 / (1.0 + np.exp(-score.astype(np.float64))),
            "teacher_topk_ids": list(outputs["topk_ids"]),
            "teacher_topk_logprobs": list(outputs["topk_logprobs"]),
        }
    )


def score_task(cfg: TeacherScoreConfig, progress: bool = True) -> dict:
    """Score ``cfg.task`` with the teacher and write ``cfg.out`` (see the module docstring).

    Returns:
        dict: records, seconds, records/s, the metadata written, and AUC of the teacher on labelled rows.

    Raises:
        FileNotFoundError / ValueError: missing task file or columns; vocab/tokenizer disagreement.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from recsys_slm.data.prompts import PromptRenderer
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.device import resolve_device
    from recsys_slm.distill.cross_tokenizer import ignored_ids
    from recsys_slm.evaluation.ranker_eval import resolve_prompt
    from recsys_slm.model_dir import data_dir_or_default, read_manifest
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    out = Path(cfg.out).expanduser().resolve()
    frame = read_task(cfg.task, cfg.max_records)
    frame = frame.drop(columns=[c for c in TEACHER_COLUMNS if c in frame.columns])  # re-scoring a cache
    data_dir = data_dir_or_default(cfg.data_dir)
    log = InteractionLog.load(data_dir)
    device = resolve_device(cfg.device)
    manifest = read_manifest(cfg.model) if Path(str(cfg.model)).expanduser().is_dir() else None
    prompt, prompt_source = resolve_prompt(cfg.prompt, manifest)
    model, tokenizer = load_causal_lm(cfg.model, device=device)
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        model = model.to(torch.bfloat16)
    model.eval()
    rows_in_head = model.get_output_embeddings().weight.shape[0]
    ignore = ignored_ids(rows_in_head, tokenizer, name=f"teacher {cfg.model}")
    ranker = Ranker(model, tokenizer, PromptRenderer(prompt, tokenizer, log.items, log.users),
                    RankerConfig(cfg.batch_size, False, prompt))  # fmt: skip
    sequences = [
        ranker.encode(ranker.renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id, r.user_id))
        for r in frame.itertuples()
    ]
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher": str(cfg.model),
        "teacher_stage": (manifest or {}).get("stage"),
        "tokenizer_len": len(tokenizer),
        "vocab_rows": int(rows_in_head),
        "ignored_ids": len(ignore),
        "prompt_source": prompt_source,
        "prompt": config_to_dict(prompt),
        "top_k": cfg.top_k,
        "temperature": cfg.temperature,
        "records": len(frame),
        "fingerprint": sequences_fingerprint(sequences),
        "task": str(Path(cfg.task).expanduser().resolve()),
    }
    if out.is_file() and _stored_meta(out) == meta:
        logger.info("%s already holds these teacher outputs; not rescoring", out)
        return {"out": str(out), "records": len(frame), "scored_now": 0, "seconds": 0.0, "records_per_s": None,
                **meta, **_labelled_auc(pd.read_parquet(out))}  # fmt: skip
    parts = out.parent / f"{out.name}.parts"
    meta_file = parts / "meta.json"
    if parts.is_dir() and (not meta_file.is_file() or json.loads(meta_file.read_text()) != meta):
        shutil.rmtree(parts)  # parts of another teacher/task/prompt: start over
    parts.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, sort_keys=True))
    order = np.argsort([len(s) for s in sequences], kind="stable")  # similar lengths per batch: less padding
    chunks = [order[i : i + cfg.chunk_records] for i in range(0, len(order), cfg.chunk_records)]
    start = time.perf_counter()
    scored = 0
    bar = tqdm(total=len(frame), desc="teacher score", unit="rec", disable=not progress)
    for k, rows in enumerate(chunks):
        part = parts / f"part-{k:05d}.parquet"
        if not part.is_file():
            outputs = answer_position_outputs(ranker.scorer, [sequences[i] for i in rows], cfg.top_k,
                                              cfg.temperature, ignore)  # fmt: skip
            tmp = part.with_suffix(".tmp")
            _chunk_frame(outputs, rows).to_parquet(tmp, index=False)
            tmp.replace(part)
            scored += len(rows)
        bar.update(len(rows))
    bar.close()
    seconds = time.perf_counter() - start
    teacher = pd.concat([pd.read_parquet(parts / f"part-{k:05d}.parquet") for k in range(len(chunks))])
    teacher = teacher.set_index("_row").sort_index()
    result = pd.concat([frame, teacher.reset_index(drop=True)], axis=1)
    table = pa.Table.from_pandas(result, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(meta).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    shutil.rmtree(parts, ignore_errors=True)
    summary = {"out": str(out), "records": len(frame), "scored_now": scored, "seconds": round(seconds, 2),
               "records_per_s": round(scored / seconds, 3) if scored and seconds > 0 else None, **meta}  # fmt: skip
    summary.update(_labelled_auc(result))
    return summary


def _stored_meta(path: Path) -> dict | None:
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _labelled_auc(frame: pd.DataFrame) -> dict:
    """``teacher_auc_labelled``: ROC AUC of teacher_score on rows with a 0/1 label (empty if undefined)."""
    if "label" not in frame.columns:
        return {}
    labelled = frame["label"].notna().to_numpy()
    y = frame.loc[labelled, "label"].astype(int)
    if y.nunique() < 2:
        return {}
    from sklearn.metrics import roc_auc_score

    return {"teacher_auc_labelled": float(roc_auc_score(y, frame.loc[labelled, "teacher_score"]))}


def read_teacher_cache(path: Path) -> tuple[pd.DataFrame, dict]:
    """Load a teacher cache parquet and its metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a teacher cache (no metadata or missing teacher columns), or its format
            version is unknown.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher cache {path} not found (write it with `recsys-slm teacher score`)")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a teacher cache: no '{METADATA_KEY.decode()}' schema metadata")
    meta = json.loads(raw)
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"{path}: teacher cache format {meta.get('format_version')}, expected {CACHE_FORMAT_VERSION}")
    frame = table.to_pandas()
    missing = [c for c in TEACHER_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing teacher column(s) {', '.join(missing)}")
    return frame, meta
