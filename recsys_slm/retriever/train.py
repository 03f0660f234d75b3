"""Fine-tune and distil two-tower sentence-transformers retrievers on an interaction log.

* :func:`train_retriever` — (user text, liked item text) pairs from :func:`recsys_slm.retriever.texts.training_pairs`,
  in-batch negatives with ``MultipleNegativesRankingLoss`` (cross-entropy of ``scale · cos`` over the batch's
  items), optionally wrapped in ``MatryoshkaLoss`` over a dim ladder, ``Matryoshka2dLoss`` (ladder + adaptive
  layers) or ``AdaptiveLayerLoss`` (layers only). Trained with ``SentenceTransformerTrainer`` and a no-duplicates
  batch sampler (a batch never holds the same text twice, so no positive doubles as another row's negative).
* :func:`distill_retriever` — a student (a smaller sentence-transformers model, e.g. all-MiniLM-L6-v2, or a pruned
  copy of the teacher) learns from a trained teacher's embeddings of the same pairs:
  :class:`~recsys_slm.retriever.losses.RetrieverDistillLoss` = embedding matching (cosine or MSE, projected to the
  teacher's width when it differs) + score distillation over in-batch candidates (listwise KL or margin-MSE) +
  optionally the contrastive loss on the true pairs, the score terms over the Matryoshka ladder.

Outputs (atomic): a sentence-transformers directory that ``SentenceTransformer(path, truncate_dim=d)`` loads, with a
``recsys_slm.json`` manifest (stage ``retriever_train`` / ``retriever_distill``, resolved config, parent model,
metrics: steps, s/step, train loss, val Recall/NDCG@10 at every ladder dim) whose ``retriever`` section records
the texts config (the eval reads it), the embedding dim and the Matryoshka ladder. Config keys:
``docs/retriever.md``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recsys_slm.config import check, config_to_dict, validate_fields
from recsys_slm.model_dir import atomic_dir, data_dir_or_default, read_manifest, write_manifest
from recsys_slm.retriever.texts import (
    RetrieverTextConfig,
    RetrieverTexts,
    Split,
    eval_queries,
    resolve_like_threshold,
    training_pairs,
)

logger = logging.getLogger(__name__)

TRAIN_STAGE = "retriever_train"
DISTILL_STAGE = "retriever_distill"


@dataclass
class MatryoshkaConfig:
    """Matryoshka / 2D-Matryoshka training (``matryoshka.*`` keys).

    Fields:
        dims (list[int]): the ladder, e.g. [768, 512, 256, 128, 64, 32]; [] = off. Dims above the model's
            dimension are dropped and the model's own dimension is always included.
        weights (list[float] | None): one weight per entry of ``dims`` (default 1 each).
        adaptive_layers (bool): also train every layer's output to be usable (2D Matryoshka with ``dims``,
            ``AdaptiveLayerLoss`` without). Train only (not distill). Default False.
        n_layers_per_step (int): adaptive layers sampled per step (the 2DMSE paper uses 1). Default 1.
        n_dims_per_step (int): ladder dims sampled per step, -1 = all. Default -1 (Matryoshka2dLoss uses 1 when
            -1 is given, as in the paper).
    """

    dims: list[int] = field(default_factory=list)
    weights: list[float] | None = None
    adaptive_layers: bool = False
    n_layers_per_step: int = 1
    n_dims_per_step: int = -1

    def __post_init__(self) -> None:
        validate_fields(self)
        check(all(d >= 1 for d in self.dims), "dims", f"must be positive, got {self.dims}")
        check(len(set(self.dims)) == len(self.dims), "dims", f"must be distinct, got {self.dims}")
        check(
            self.weights is None or len(self.weights) == len(self.dims),
            "weights",
            f"needs one weight per dim ({len(self.dims)} dims), got {self.weights}",
        )
        check(
            self.n_layers_per_step >= 1 or self.n_layers_per_step == -1,
            "n_layers_per_step",
            "must be >= 1 or -1",
        )
        check(
            self.n_dims_per_step >= 1 or self.n_dims_per_step == -1, "n_dims_per_step", "must be >= 1 or -1"
        )

    def ladder(self, model_dim: int) -> tuple[list[int], list[float]]:
        """(dims, weights) clipped to ``model_dim`` (which is always included), largest first; ([], []) when off."""
        if not self.dims:
            return [], []
        weights = self.weights or [1.0] * len(self.dims)
        kept = {d: w for d, w in zip(self.dims, weights, strict=True) if d <= model_dim}
        kept.setdefault(model_dim, 1.0)
        dims = sorted(kept, reverse=True)
        return dims, [float(kept[d]) for d in dims]


@dataclass
class RetrieverDistillSection:
    """Distillation settings (``distill.*`` keys; used by ``recsys-slm retriever distill`` only).

    Fields:
        teacher (str | None): the trained teacher (retriever directory or encoder spec). Required for distill.
        embedding_loss (str): ``cosine`` (1 − cos, sentence-transformers EmbedDistillLoss), ``mse``
            (MSELoss) or ``none``; projected to the teacher's width by a trained Linear when widths differ.
            Default cosine.
        embedding_weight (float): Default 1.0.
        score_loss (str): ``listwise_kl`` (KL between teacher and student softmax over in-batch candidates),
            ``margin_mse`` (in-batch margin-MSE) or ``none``. Default listwise_kl.
        score_weight (float): Default 1.0.
        temperature (float): student softmax temperature τ_s of listwise KL. Default 0.05.
        teacher_temperature (float | None): τ_t; None = τ_s.
        label_weight (float): weight of the in-batch contrastive loss on the true pairs. Default 0.0.
        teacher_batch_size (int): batch size when encoding the pairs with the teacher. Default 64.
    """

    teacher: str | None = None
    embedding_loss: Literal["cosine", "mse", "none"] = "cosine"
    embedding_weight: float = 1.0
    score_loss: Literal["listwise_kl", "margin_mse", "none"] = "listwise_kl"
    score_weight: float = 1.0
    temperature: float = 0.05
    teacher_temperature: float | None = None
    label_weight: float = 0.0
    teacher_batch_size: int = 64

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(
            self.teacher_temperature is None or self.teacher_temperature > 0,
            "teacher_temperature",
            f"must be > 0 or null, got {self.teacher_temperature}",
        )
        for key in ("embedding_weight", "score_weight", "label_weight"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        check(
            self.teacher_batch_size > 0, "teacher_batch_size", f"must be > 0, got {self.teacher_batch_size}"
        )


@dataclass
class RetrieverTrainConfig:
    """``recsys-slm retriever train`` / ``distill`` (one config; ``distill.*`` is read by distill only).

    Fields:
        model (str): the encoder to fine-tune (train) or the student (distill): a packaged name
            (``all-mpnet-base-v2``, ``all-minilm-l6-v2``), a sentence-transformers directory or a hub id.
        data_dir (Path | None): prepared data directory; default ``$RECSYS_SLM_HOME/data/movielens-100k``.
        out (Path | None): output model directory (replaced atomically). Required.
        split (str): ``leave_one_out`` or ``temporal`` (see :mod:`recsys_slm.retriever.texts`).
        texts (RetrieverTextConfig): user/item texts. Distill: left at the defaults, the teacher's are used.
        max_pairs (int | None): sample at most this many training pairs. Default None (all).
        max_pairs_per_user (int | None): keep each user's most recent pairs only. Default None.
        epochs (float): passes over the pairs. Default 1.0.
        max_steps (int | None): stop after this many optimizer steps (overrides epochs). Default None.
        batch_size (int): pairs per step = in-batch candidates per user. Default 32.
        lr (float): AdamW peak learning rate (linear warmup then linear decay). Default 2e-5.
        warmup_ratio (float): Default 0.1.
        weight_decay (float): Default 0.01.
        scale (float): MultipleNegativesRankingLoss scale (1 / temperature). Default 20.0.
        logq_correction (bool): subtract log q_j (item j's share of the training pairs) from every in-batch logit,
            the sampling-bias correction of Yi et al. (RecSys 2019): plain in-batch negatives penalise popular
            items, which costs Recall@K on a popularity-skewed log. In distill it corrects the contrastive term
            (``distill.label_weight``). Default True.
        max_seq_length (int | None): encoder token limit (user texts are cut at the end: disliked titles first).
            None = the model's own. Default 256.
        seed (int): Default 0.
        device (str): auto, cpu, cuda. Default auto.
        log_every (int): log the loss every N steps. Default 10.
        val_eval (bool): after training, exact-search Recall@10 / NDCG@10 on the val targets at every ladder dim
            (manifest metrics). Default True.
        val_max_queries (int | None): first N val queries only. Default None.
        matryoshka (MatryoshkaConfig): ladder and adaptive layers.
        distill (RetrieverDistillSection): teacher and distillation losses.
    """

    model: str = "all-mpnet-base-v2"
    data_dir: Path | None = None
    out: Path | None = None
    split: Split = "leave_one_out"
    texts: RetrieverTextConfig = field(default_factory=RetrieverTextConfig)
    max_pairs: int | None = None
    max_pairs_per_user: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    scale: float = 20.0
    logq_correction: bool = True
    max_seq_length: int | None = 256
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    val_eval: bool = True
    val_max_queries: int | None = None
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
    distill: RetrieverDistillSection = field(default_factory=RetrieverDistillSection)

    def __post_init__(self) -> None:
        validate_fields(self)
        check(bool(self.model.strip()), "model", "required: a packaged encoder name or a model directory")
        check(self.max_pairs is None or self.max_pairs > 0, "max_pairs", "must be positive or null")
        check(
            self.max_pairs_per_user is None or self.max_pairs_per_user > 0,
            "max_pairs_per_user",
            "must be positive or null",
        )
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(
            self.max_steps is None or self.max_steps > 0,
            "max_steps",
            f"must be positive or null, got {self.max_steps}",
        )
        check(self.batch_size >= 2, "batch_size", f"must be >= 2 (in-batch negatives), got {self.batch_size}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.scale > 0, "scale", f"must be > 0, got {self.scale}")
        check(
            self.max_seq_length is None or self.max_seq_length >= 8, "max_seq_length", "must be >= 8 or null"
        )
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(
            self.val_max_queries is None or self.val_max_queries > 0,
            "val_max_queries",
            "must be positive or null",
        )

    def resolved_data_dir(self) -> Path:
        return data_dir_or_default(self.data_dir)


# ---------------------------------------------------------------------------------------------- shared


def _prepare(cfg: RetrieverTrainConfig, texts_cfg: RetrieverTextConfig):
    """Load the log, resolve the like threshold, build texts and the training pairs."""
    from recsys_slm.config import ConfigError
    from recsys_slm.data.schema import InteractionLog

    if cfg.out is None:
        raise ConfigError("config key 'out': required: the output model directory")
    data_dir = cfg.resolved_data_dir()
    if not (data_dir / "interactions.parquet").is_file():
        raise FileNotFoundError(
            f"{data_dir} is not a prepared data directory (no interactions.parquet); run recsys-slm data prepare "
            "or set data_dir=DIR"
        )
    log = InteractionLog.load(data_dir)
    threshold = resolve_like_threshold(texts_cfg, data_dir)
    texts_cfg = RetrieverTextConfig(**{**config_to_dict(texts_cfg), "like_threshold": threshold})
    texts = RetrieverTexts(log, texts_cfg, threshold)
    pairs = training_pairs(log, texts, data_dir, cfg.split, cfg.max_pairs_per_user, cfg.max_pairs, cfg.seed)
    if len(pairs) < 2:
        raise ValueError(
            f"only {len(pairs)} training pairs in {data_dir} (liked interactions before the held-out targets); "
            "in-batch negatives need at least 2"
        )
    return data_dir, log, texts, texts_cfg, pairs


def _load(spec: str, cfg: RetrieverTrainConfig):
    from recsys_slm.models.loading import load_sentence_encoder

    model = load_sentence_encoder(spec, device=cfg.device)
    if cfg.max_seq_length is not None:
        model.max_seq_length = int(cfg.max_seq_length)
    return model


def _training_args(cfg: RetrieverTrainConfig, output_dir: str):
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    from recsys_slm.device import resolve_device

    device = resolve_device(cfg.device)
    return SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        warmup_steps=float(cfg.warmup_ratio),  # a float < 1 is a ratio of the total steps (Transformers v5)
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        report_to=[],
        logging_steps=cfg.log_every,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _fit(model, args, dataset, loss) -> dict[str, Any]:
    """Run the trainer; returns steps, seconds, s/step, mean and last logged train loss."""
    from sentence_transformers import SentenceTransformerTrainer

    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    logged = [h for h in trainer.state.log_history if "loss" in h]
    steps = int(out.global_step)
    return {
        "steps": steps,
        "train_seconds": seconds,
        "s_per_step": seconds / steps if steps else None,
        "train_loss": float(out.training_loss),
        "last_logged_loss": float(logged[-1]["loss"]) if logged else None,
        "loss_curve": [{"step": int(h["step"]), "loss": float(h["loss"])} for h in logged],
    }


def val_metrics(
    model, log, texts: RetrieverTexts, data_dir: Path, split: Split, dims: list[int],
    max_queries: int | None = None, batch_size: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """Exact-search Recall@10 / NDCG@10 on the val targets at every dim of ``dims`` (same rules as the eval)."""
    from recsys_slm.retriever.evaluate import exact_target_ranks, exclusion_mask, retrieval_metrics, truncate

    real = log.items[~log.items["is_placeholder"].to_numpy(dtype=bool)]
    item_ids = [str(i) for i in real["item_id"]]
    queries = eval_queries(log, texts, data_dir, split, "val", "all", max_queries)
    queries = queries.subset(queries.frame["target_item_id"].isin(set(item_ids)).to_numpy())
    if len(queries.frame) == 0:
        return {"queries": 0}
    kw = dict(
        batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    items = model.encode(texts.item_texts(item_ids), **kw)
    q = model.encode(queries.frame["text"].tolist(), **kw)
    excluded = exclusion_mask(queries.exclude, item_ids)
    out: dict[str, Any] = {"queries": len(queries.frame)}
    for d in dims:
        scores = truncate(q, d) @ truncate(items, d).T
        ranks = exact_target_ranks(scores, item_ids, queries.frame["target_item_id"].tolist(), excluded)
        m = retrieval_metrics(ranks, [10], queries.frame["user_id"].tolist())
        out[f"d{d}"] = {"recall@10": m["recall@10"], "ndcg@10": m["ndcg@10"]}
    return out


def _save(model, cfg, stage: str, texts_cfg, ladder: list[int], metrics: dict, extra: dict | None = None,
          projection=None) -> Path:  # fmt: skip
    dim = int(model.get_embedding_dimension())
    with atomic_dir(cfg.out) as tmp:
        model.save(str(tmp))
        if projection is not None:
            from safetensors.torch import save_model

            save_model(projection, str(tmp / "distill_projection.safetensors"))
        write_manifest(
            tmp,
            stage,
            config=config_to_dict(cfg),
            parent=cfg.model,
            metrics=metrics,
            extra={
                "retriever": {
                    "embedding_dim": dim,
                    "matryoshka_dims": ladder or [dim],
                    "adaptive_layers": bool(cfg.matryoshka.adaptive_layers)
                    if stage == TRAIN_STAGE
                    else False,
                    "similarity": "cosine",
                    "split": cfg.split,
                    "texts": config_to_dict(texts_cfg),
                    **(extra or {}),
                }
            },
        )
    return Path(cfg.out)


# ---------------------------------------------------------------------------------------------- train


def item_log_q(item_ids) -> np.ndarray:
    """(P,) log of each pair's item share among the P pairs — the logQ correction's sampling probabilities."""
    import pandas as pd

    items = pd.Series(item_ids)
    return np.log(items.map(items.value_counts(normalize=True)).to_numpy(dtype=np.float64))


def build_train_loss(model, cfg: RetrieverTrainConfig) -> tuple[Any, list[int]]:
    """MNRL (logQ-corrected when ``cfg.logq_correction``), wrapped per ``cfg.matryoshka``; returns (loss, ladder).

    With the correction the dataset's ``label`` column carries each pair's log q (:func:`item_log_q`).
    """
    from sentence_transformers.sentence_transformer import losses

    from recsys_slm.retriever.losses import LogQCorrectedMNRLoss

    if cfg.logq_correction:
        base = LogQCorrectedMNRLoss(model, scale=cfg.scale)
    else:
        base = losses.MultipleNegativesRankingLoss(model, scale=cfg.scale)
    m = cfg.matryoshka
    dims, weights = m.ladder(int(model.get_embedding_dimension()))
    if dims and m.adaptive_layers:
        loss = losses.Matryoshka2dLoss(
            model, base, dims, weights, n_layers_per_step=m.n_layers_per_step,
            n_dims_per_step=m.n_dims_per_step if m.n_dims_per_step != -1 else 1,
        )  # fmt: skip
    elif dims:
        loss = losses.MatryoshkaLoss(model, base, dims, weights, n_dims_per_step=m.n_dims_per_step)
    elif m.adaptive_layers:
        loss = losses.AdaptiveLayerLoss(model, base, n_layers_per_step=m.n_layers_per_step)
    else:
        loss = base
    return loss, dims


def train_retriever(cfg: RetrieverTrainConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` with in-batch negatives on the log's (user text, liked item text) pairs.

    Returns:
        dict: out, pairs, steps, s_per_step, train_loss, val metrics per ladder dim, embedding_dim, ladder.

    Raises:
        ConfigError: ``out`` missing.
        FileNotFoundError: the data directory is not prepared.
        ValueError: fewer than 2 training pairs.
    """
    from datasets import Dataset

    data_dir, log, texts, texts_cfg, pairs = _prepare(cfg, cfg.texts)
    model = _load(cfg.model, cfg)
    loss, ladder = build_train_loss(model, cfg)
    columns = {"anchor": pairs["anchor"].tolist(), "positive": pairs["positive"].tolist()}
    if cfg.logq_correction:
        columns["label"] = item_log_q(pairs["item_id"]).tolist()
    dataset = Dataset.from_dict(columns)
    with tempfile.TemporaryDirectory(prefix="recsys-slm-retriever-") as tmp:
        fit = _fit(model, _training_args(cfg, tmp), dataset, loss)
    model.eval()
    dim = int(model.get_embedding_dimension())
    dims = ladder or [dim]
    val = (
        val_metrics(model, log, texts, data_dir, cfg.split, dims, cfg.val_max_queries)
        if cfg.val_eval
        else None
    )
    metrics = {"pairs": len(pairs), "users": int(pairs["user_id"].nunique()), **fit, "val": val}
    _save(model, cfg, TRAIN_STAGE, texts_cfg, ladder, metrics)
    return {"out": str(cfg.out), "embedding_dim": dim, "ladder": dims, **metrics}


# ---------------------------------------------------------------------------------------------- distill


def _teacher_texts(cfg: RetrieverTrainConfig, teacher_path) -> tuple[RetrieverTextConfig, str]:
    from recsys_slm.retriever.evaluate import resolve_texts

    manifest = read_manifest(teacher_path) if isinstance(teacher_path, Path) else None
    return resolve_texts(cfg.texts, manifest)


def distill_retriever(cfg: RetrieverTrainConfig) -> dict[str, Any]:
    """Train the student ``cfg.model`` from the teacher ``cfg.distill.teacher`` (see the module docstring).

    The teacher encodes every training pair once (normalised, full dim); its embeddings are the labels of the
    embedding term and define the in-batch target distributions of the score term.

    Returns:
        dict: out, pairs, steps, s_per_step, train_loss, teacher_encode_seconds, student/teacher dims,
        val metrics of the student (per ladder dim) and of the teacher (full dim).

    Raises:
        ConfigError: ``distill.teacher`` or ``out`` missing.
    """
    import torch
    from datasets import Dataset

    from recsys_slm.config import ConfigError
    from recsys_slm.models.loading import resolve_model_path
    from recsys_slm.retriever.losses import RetrieverDistillLoss

    d = cfg.distill
    if not d.teacher:
        raise ConfigError("config key 'distill.teacher': required: the trained teacher retriever directory")
    teacher_path = resolve_model_path(d.teacher)
    texts_cfg, texts_source = _teacher_texts(cfg, teacher_path)
    data_dir, log, texts, texts_cfg, pairs = _prepare(cfg, texts_cfg)
    teacher = _load(d.teacher, cfg)
    kw = dict(
        batch_size=d.teacher_batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    start = time.perf_counter()
    anchors = pairs["anchor"].tolist()
    uniq_a = list(dict.fromkeys(anchors))
    uniq_p = list(dict.fromkeys(pairs["positive"].tolist()))
    emb_a = teacher.encode(uniq_a, **kw)
    emb_p = teacher.encode(uniq_p, **kw)
    teacher_s = time.perf_counter() - start
    pos_a = {t: i for i, t in enumerate(uniq_a)}
    pos_p = {t: i for i, t in enumerate(uniq_p)}
    t_anchor = torch.from_numpy(np.asarray(emb_a[[pos_a[t] for t in anchors]], dtype=np.float32))
    t_pos = torch.from_numpy(np.asarray(emb_p[[pos_p[t] for t in pairs["positive"]]], dtype=np.float32))
    teacher_dim = int(emb_a.shape[1])
    teacher_val = (
        val_metrics(teacher, log, texts, data_dir, cfg.split, [teacher_dim], cfg.val_max_queries)
        if cfg.val_eval
        else None
    )
    del teacher

    student = _load(cfg.model, cfg)
    student_dim = int(student.get_embedding_dimension())
    if cfg.matryoshka.adaptive_layers:
        logger.warning("matryoshka.adaptive_layers is ignored by distill (train-only)")
    ladder, weights = cfg.matryoshka.ladder(student_dim)
    loss = RetrieverDistillLoss(
        student, t_anchor, t_pos,
        embedding_loss=d.embedding_loss, embedding_weight=d.embedding_weight,
        score_loss=d.score_loss, score_weight=d.score_weight,
        temperature=d.temperature, teacher_temperature=d.teacher_temperature,
        label_weight=d.label_weight, scale=cfg.scale,
        matryoshka_dims=ladder or None, matryoshka_weights=weights or None,
        log_q=torch.from_numpy(item_log_q(pairs["item_id"])) if cfg.logq_correction else None,
    )  # fmt: skip
    dataset = Dataset.from_dict(
        {"anchor": anchors, "positive": pairs["positive"].tolist(), "label": list(range(len(pairs)))}
    )
    with tempfile.TemporaryDirectory(prefix="recsys-slm-retriever-distill-") as tmp:
        fit = _fit(student, _training_args(cfg, tmp), dataset, loss)
    student.eval()
    dims = ladder or [student_dim]
    val = (
        val_metrics(student, log, texts, data_dir, cfg.split, dims, cfg.val_max_queries)
        if cfg.val_eval
        else None
    )
    metrics = {
        "pairs": len(pairs),
        "users": int(pairs["user_id"].nunique()),
        "teacher_encode_seconds": teacher_s,
        "teacher_texts_encoded": len(uniq_a) + len(uniq_p),
        **fit,
        "val": val,
        "teacher_val": teacher_val,
    }
    extra = {
        "teacher": str(teacher_path),
        "teacher_dim": teacher_dim,
        "texts_source": texts_source,
        "projection": (
            {"file": "distill_projection.safetensors", "in": student_dim, "out": teacher_dim}
            if loss.projection is not None
            else None
        ),
    }
    _save(student, cfg, DISTILL_STAGE, texts_cfg, ladder, metrics, extra, projection=loss.projection)
    return {
        "out": str(cfg.out),
        "embedding_dim": student_dim,
        "teacher_dim": teacher_dim,
        "ladder": dims,
        **metrics,
    }


def steps_per_epoch(pairs: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the no-duplicates sampler can make a few more, smaller batches)."""
    return math.ceil(pairs / batch_size)
