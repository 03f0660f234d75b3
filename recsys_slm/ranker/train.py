"""Teacher fine-tuning: train a causal LM as a pointwise Yes/No ranker (TALLRec protocol).

Each training record is a rendered prompt (see :mod:`recsys_slm.data.prompts`) ending where the verbalizer token
is read, and a 0/1 label. The model's score is

    s = logit(" Yes") − logit(" No") = h · (W_yes − W_no)        h: final hidden state at the last prompt token

and the loss is binary cross-entropy with logits, ``BCE(σ(s), y)``. This is exactly the cross-entropy over the
two verbalizer tokens, ``−log softmax([l_yes, l_no])[y == 0]``, because ``softmax([a, b])[0] = σ(a − b)``. Only
the (B, 2) verbalizer logits are ever formed: full-vocabulary logits at every position (B × L × 49,152 for
SmolLM2) would dominate memory (7.9 GB at 8 × 256) although the loss reads two numbers per prompt.

Optimisation: AdamW (no weight decay on biases and norm weights), linear warm-up then linear decay to zero,
gradient accumulation, gradient clipping. Frozen: the embeddings and the first ``freeze_layers`` decoder layers
(no activations are kept for them, so memory and time drop too), or, with ``lora.enabled``, everything but LoRA
adapters on the remaining layers (merged into the weights before saving).

Outputs (see ``docs/teacher.md``): ``out/`` is a plain ``from_pretrained`` directory (best-validation-AUC
weights + tokenizer + ``recsys_slm.json`` + ``metrics.jsonl``), written atomically; ``<out>.work/`` holds the
resumable checkpoint and best weights while training runs and is removed on success.

References:
    TALLRec (Bao et al., RecSys'23, arXiv 2305.00447); LoRA (Hu et al., ICLR'22, arXiv 2106.09685).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from recsys_slm.config import ConfigError, check, config_to_dict, validate_fields
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.model_dir import atomic_dir, cache_home, write_manifest
from recsys_slm.ranker.batching import (
    EncodedRecords,
    collate,
    encode_records,
    epoch_batches,
    padding_fraction,
)
from recsys_slm.ranker.checkpoint import (
    TRAINABLE_FILE,
    TrainState,
    load_checkpoint,
    load_trainable,
    read_checkpoint_info,
    save_checkpoint,
    save_trainable,
)
from recsys_slm.ranker.verbalizer import VerbalizerScorer

logger = logging.getLogger(__name__)

STAGE = "teacher_train"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint-last"
# Keys that may change between a killed run and its restart without invalidating the checkpoint. Changing
# max_steps/epochs changes the length of the linear-decay schedule from the resumed step on.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "epochs", "eval_every", "checkpoint_every", "early_stopping_patience", "log_every", "progress",
     "resume", "keep_checkpoints", "device", "eval_batch_size"}
)  # fmt: skip
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class TeacherLoraConfig:
    """LoRA adapters (via peft) instead of full fine-tuning of the unfrozen layers.

    Fields:
        enabled (bool): train LoRA adapters only. Default False.
        r (int): adapter rank. Default 8.
        alpha (int): scaling numerator (update scaled by alpha / r). Default 16.
        dropout (float): dropout on the adapter input, in [0, 1). Default 0.05.
        target_modules (list[str]): module names to adapt. Default ["q_proj", "v_proj"].
    """

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.r > 0, "r", f"must be > 0, got {self.r}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(
            len(self.target_modules) > 0,
            "target_modules",
            "must name at least one module, e.g. [q_proj, v_proj]",
        )


@dataclass
class TeacherTrainConfig:
    """Config of ``recsys-slm teacher train``. Every key is described in ``docs/teacher.md``.

    Fields:
        model (str): packaged name, local directory or hub id of the causal LM. Default "smollm2-135m-instruct".
        data_dir (Path | None): prepared data directory; default ``$RECSYS_SLM_HOME/data/movielens-100k``.
        out (Path | None): output model directory; default ``$RECSYS_SLM_HOME/runs/teacher/<model name>``.
        prompt (PromptConfig): prompt templates and verbalizer (the same config must be used for scoring).
        freeze_layers (int): freeze the first k decoder layers. Default 20.
        freeze_embeddings (bool): freeze the token (and position) embeddings and the output head. Default True.
        lora (TeacherLoraConfig): LoRA adapters instead of full fine-tuning of the unfrozen layers.
        lr (float): peak learning rate. Default 1e-4.
        weight_decay (float): AdamW decoupled weight decay (not on biases / norms). Default 0.0.
        warmup_ratio (float): share of steps with linear warm-up, in [0, 1). Default 0.05.
        max_grad_norm (float): gradient clipping norm. Default 1.0.
        batch_size (int): records per micro-batch. Default 16.
        grad_accum (int): micro-batches per optimizer step. Default 1.
        max_steps (int): optimizer steps; 0 = ``epochs`` full passes over the data. Default 0.
        epochs (int): passes over the training records when ``max_steps`` is 0. Default 1.
        bucket_batches (int): batches per length-sorted mega-batch; 0 = no length bucketing. Default 50.
        eval_every (int): validate every N steps (and after the last step); 0 = never. Default 100.
        eval_max_records (int | None): validate on the first N val records; None = all. Default 500.
        eval_batch_size (int): prompts per validation forward. Default 32.
        early_stopping_patience (int): stop after this many evaluations without a better val AUC; 0 = off.
        checkpoint_every (int): write the resumable checkpoint every N steps; 0 = never. Default 50.
        log_every (int): write a metrics.jsonl line every N steps (evaluation steps always log). Default 10.
        seed (int): data order, sampling and LoRA initialisation. Default 0.
        max_train_records (int | None): train on a seeded random sample of this many records. Default None.
        device (str): "auto" (CUDA if available), "cpu", "cuda" or "cuda:N". Default "auto".
        precision (str): "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16". Master weights are fp32.
        resume (bool): continue from ``<out>.work/checkpoint-last`` when present. Default True.
        keep_checkpoints (bool): keep ``<out>.work/`` after success. Default False.
        progress (bool): show a tqdm progress bar. Default True.
    """

    model: str = "smollm2-135m-instruct"
    data_dir: Path | None = None
    out: Path | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    freeze_layers: int = 20
    freeze_embeddings: bool = True
    lora: TeacherLoraConfig = field(default_factory=TeacherLoraConfig)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 0
    epochs: int = 1
    bucket_batches: int = 50
    eval_every: int = 100
    eval_max_records: int | None = 500
    eval_batch_size: int = 32
    early_stopping_patience: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    max_train_records: int | None = None
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    resume: bool = True
    keep_checkpoints: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        validate_fields(self)
        check(bool(self.model.strip()), "model", "must name a model (packaged name, directory or hub id)")
        check(self.freeze_layers >= 0, "freeze_layers", f"must be >= 0, got {self.freeze_layers}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        for key in ("batch_size", "grad_accum", "epochs", "eval_batch_size", "log_every"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("max_steps", "bucket_batches", "eval_every", "early_stopping_patience", "checkpoint_every",
                    "seed"):  # fmt: skip
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("eval_max_records", "max_train_records"):
            value = getattr(self, key)
            check(value is None or value > 0, key, f"must be > 0 or null (= all records), got {value}")
        check(
            self.early_stopping_patience == 0 or self.eval_every > 0,
            "early_stopping_patience",
            "needs validation: set eval_every > 0 (or early_stopping_patience=0)",
        )
        check(
            bool(_DEVICE.match(self.device)), "device", f"one of auto, cpu, cuda, cuda:N; got {self.device!r}"
        )
        check(
            not (self.lora.enabled and not self.freeze_embeddings),
            "freeze_embeddings",
            "must be true with lora.enabled (LoRA trains only the adapters)",
        )

    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else cache_home() / "data" / "movielens-100k"

    def resolved_out(self) -> Path:
        if self.out is not None:
            return self.out
        return cache_home() / "runs" / "teacher" / Path(self.model.rstrip("/")).name


def work_dir(out: Path) -> Path:
    """``<out>.work``: checkpoint, best weights and running metrics of an unfinished run."""
    return out.parent / f"{out.name}.work"


# --------------------------------------------------------------------------------------------- model set-up


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder block list of a Hugging Face causal LM (Llama/Qwen2/Mistral/Gemma: ``model.layers``;
    GPT-2: ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``).

    Raises:
        ValueError: the architecture keeps its blocks elsewhere.
    """
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (freeze_layers needs them)")


def prepare_trainable(model: torch.nn.Module, cfg: TeacherTrainConfig) -> torch.nn.Module:
    """Apply the freeze / LoRA setup; returns the module to train (``model`` itself or a peft wrapper).

    Full fine-tuning: embeddings (all ``nn.Embedding`` modules and the output head, tied or not) and the first
    ``freeze_layers`` blocks get ``requires_grad=False``; everything else trains. LoRA: peft freezes every base
    weight and adds adapters to ``lora.target_modules`` of blocks ``freeze_layers`` … n−1 only.

    Raises:
        ConfigError: ``freeze_layers`` exceeds the number of decoder layers (the message names the key).
    """
    layers = decoder_layers(model)
    n = len(layers)
    check(
        cfg.freeze_layers <= n,
        "freeze_layers",
        f"must be <= the model's {n} decoder layers, got {cfg.freeze_layers}",
    )
    if cfg.lora.enabled:
        check(cfg.freeze_layers < n, "freeze_layers", f"leaves no layer for LoRA adapters (model has {n})")
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            layers_to_transform=list(range(cfg.freeze_layers, n)),
            bias="none",
        )
        try:
            return get_peft_model(model, lora)
        except ValueError as exc:  # peft's message when no module matched
            raise ConfigError(f"config key 'lora.target_modules': {exc}") from None
    frozen: list[torch.nn.Parameter] = []
    if cfg.freeze_embeddings:
        frozen += [p for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()]
        head = model.get_output_embeddings()
        if head is not None:
            frozen += list(head.parameters())
    for layer in layers[: cfg.freeze_layers]:
        frozen += list(layer.parameters())
    for param in frozen:
        param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("config key 'freeze_layers': nothing left to train (all parameters are frozen)")
    return model


def build_optimizer(model: torch.nn.Module, cfg: TeacherTrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, biases and norm gains (1-D tensors) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step: int, peak: float, total_steps: int, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``peak``, then linear decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# ------------------------------------------------------------------------------------------------ loss, eval


def pointwise_loss(
    scorer: VerbalizerScorer, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed BCE-with-logits of ``s = logit_yes − logit_no`` against 0/1 labels.

    Args:
        scorer (VerbalizerScorer): wraps the (trainable) causal LM; only its two verbalizer rows are used.
        input_ids (torch.Tensor): (B, L) int64, left- or right-padded.
        attention_mask (torch.Tensor): (B, L), 1 on real tokens.
        labels (torch.Tensor): (B,) float 0/1.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: the loss summed over the batch (scalar, float32) and the scores
        ``s`` (B,) float32. Divide by the record count of the optimizer step to get the mean.
    """
    hidden = scorer.last_hidden(input_ids, attention_mask)  # (B, H)
    logits = scorer.verbalizer_logits(hidden)  # (B, 2) float32
    scores = logits[:, 0] - logits[:, 1]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels.float(), reduction="sum")
    return loss, scores


def evaluate(
    scorer: VerbalizerScorer, records: EncodedRecords, autocast: contextlib.AbstractContextManager
) -> dict:
    """Validation AUC and log loss of the scores ``s`` (model put in eval mode for the call).

    Returns:
        dict: ``val_auc`` (ROC AUC of s), ``val_logloss`` (mean BCE of σ(s)), ``val_records``.
    """
    from sklearn.metrics import roc_auc_score

    order = np.argsort(records.lengths, kind="stable")  # similar lengths per batch: less padding
    was_training = scorer.model.training
    scorer.model.eval()
    try:
        with autocast:
            logits = scorer.score_token_ids([records.sequences[i] for i in order])
    finally:
        scorer.model.train(was_training)
    scores = np.empty(len(records), dtype=np.float64)
    scores[order] = (logits[:, 0] - logits[:, 1]).double().numpy()
    y = records.labels.astype(np.float64)
    logloss = float(np.mean(np.logaddexp(0.0, scores) - y * scores))  # = BCE(σ(s), y), overflow-free
    return {"val_auc": float(roc_auc_score(y, scores)), "val_logloss": logloss, "val_records": len(records)}


# -------------------------------------------------------------------------------------------------- training


@dataclass
class _Run:
    """Everything a training run holds in memory (built by :func:`_setup`)."""

    model: torch.nn.Module  # what trains: the HF model or its peft wrapper
    hf_model: torch.nn.Module  # the HF causal LM inside (LoRA layers injected when LoRA is on)
    tokenizer: Any
    scorer: VerbalizerScorer
    train: EncodedRecords
    val: EncodedRecords | None
    device: torch.device
    autocast_dtype: torch.dtype | None
    excluded_candidate_targets: int = 0  # train records dropped because they are held-out candidate targets


def _autocast(run: _Run) -> contextlib.AbstractContextManager:
    if run.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.device.type, dtype=run.autocast_dtype)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_frames(cfg: TeacherTrainConfig):
    import pandas as pd

    from recsys_slm.data.events import candidate_target_events, task_events
    from recsys_slm.data.schema import InteractionLog

    data_dir = cfg.resolved_data_dir()
    task = data_dir / "tasks" / "pointwise"
    if not (task / "train.parquet").is_file():
        raise FileNotFoundError(
            f"{task / 'train.parquet'} not found: data_dir={data_dir} is not a prepared data directory "
            "(run `recsys-slm data prepare` first, or set data_dir=DIR)"
        )
    log = InteractionLog.load(data_dir)
    train = pd.read_parquet(task / "train.parquet")
    # The leave-one-out candidate targets are held out for evaluation; some are also pointwise train records
    # (116 of 942 test targets on MovieLens-100K). Training on them would inflate the candidate-task metrics.
    held_out = task_events(train).isin(candidate_target_events(data_dir))
    excluded = int(held_out.sum())
    train = train.loc[~held_out]
    if cfg.max_train_records is not None and cfg.max_train_records < len(train):
        # A seeded sample covers the whole training period; head() would keep only its oldest slice.
        train = train.sample(n=cfg.max_train_records, random_state=cfg.seed).sort_index()
    val = None
    if cfg.eval_every > 0:
        val = pd.read_parquet(task / "val.parquet")
        if cfg.eval_max_records is not None:
            val = val.head(cfg.eval_max_records)
    return log, train, val, excluded


def _setup(cfg: TeacherTrainConfig) -> _Run:
    from recsys_slm.data.prompts import PromptRenderer
    from recsys_slm.device import resolve_device
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    device = resolve_device(cfg.device)
    if cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        autocast_dtype = torch.bfloat16
    else:
        autocast_dtype = None
    log, train_frame, val_frame, excluded = _load_frames(cfg)
    # fp32 master weights on every device: AdamW updates of ~1e-4 × w vanish in bf16 weights.
    model, tokenizer = load_causal_lm(cfg.model, device=device, dtype=torch.float32)
    renderer = PromptRenderer(cfg.prompt, tokenizer, log.items, log.users)
    ranker = Ranker(model, tokenizer, renderer, RankerConfig(cfg.eval_batch_size, False, cfg.prompt))
    train = encode_records(train_frame, renderer, ranker.encode)
    if len(train) == 0:
        raise ValueError(f"no training records in {cfg.resolved_data_dir()}/tasks/pointwise/train.parquet")
    val = None
    if val_frame is not None:
        val = encode_records(val_frame, renderer, ranker.encode)
        if len(set(val.labels.tolist())) < 2:
            raise ConfigError(
                f"config key 'eval_max_records': the {len(val)} validation records hold only one label, so AUC is "
                "undefined; validate on more records (or set eval_every=0)"
            )
    _seed_everything(cfg.seed)  # LoRA initialisation draws from the torch RNG
    trainable = prepare_trainable(model, cfg)
    hf_model = trainable.get_base_model() if cfg.lora.enabled else trainable
    hf_model.config.use_cache = False  # training never reuses a KV cache; don't build one
    scorer = VerbalizerScorer(
        hf_model, tokenizer, cfg.prompt.yes_token, cfg.prompt.no_token, batch_size=cfg.eval_batch_size
    )
    return _Run(trainable, hf_model, tokenizer, scorer, train, val, device, autocast_dtype, excluded)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def _best_dirs(work: Path) -> list[Path]:
    return sorted(work.glob("best-step*"))


def _best_dir(work: Path, step: int) -> Path:
    return work / f"best-step{step:07d}"


def _prune_best(work: Path, keep: set[int | None]) -> None:
    """Remove best-weight dirs except those of the steps in ``keep`` (the current best and the checkpoint's)."""
    names = {_best_dir(work, s).name for s in keep if s is not None}
    for path in _best_dirs(work):
        if path.name not in names:
            shutil.rmtree(path, ignore_errors=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after the checkpoint being resumed (those steps are re-run)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line half-written when the run was killed
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    tmp.replace(path)


def _restore_or_start(
    cfg: TeacherTrainConfig, run: _Run, optimizer: torch.optim.Optimizer, work: Path, run_facts: dict
) -> TrainState:
    """Load ``<out>.work/checkpoint-last`` when resuming, else start a clean work directory."""
    ckpt = work / CHECKPOINT_DIR
    info = read_checkpoint_info(ckpt) if cfg.resume else None
    if info is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return TrainState()
    ours, theirs = _comparable(run_facts["config"]), _comparable(info["config"])
    changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if changed:
        raise ValueError(
            f"{ckpt} was written with a different config ({', '.join(changed)} changed); restart from scratch "
            f"with resume=false, or delete {work}"
        )
    if info["data_fingerprint"] != run_facts["data_fingerprint"]:
        raise ValueError(f"{ckpt} was written for different training data; resume=false starts afresh")
    state, _ = load_checkpoint(ckpt, run.model, optimizer)
    _prune_best(work, {state.best_step})
    _truncate_metrics(work / METRICS_FILE, state.step)
    logger.info("resumed from %s at step %d", ckpt, state.step)
    return state


def train_teacher(cfg: TeacherTrainConfig, stop_after_step: int | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` as a pointwise ranker and write the best model to ``cfg.resolved_out()``.

    Args:
        cfg (TeacherTrainConfig): the resolved config.
        stop_after_step (int | None): test hook simulating a kill: raise ``KeyboardInterrupt`` right after
            this optimizer step (and after its checkpoint, if one was due). None in normal use.

    Returns:
        dict: the manifest metrics plus ``out`` (str): best/final val AUC, steps, timings, record counts.

    Raises:
        ConfigError: a value that only the model or data can reject (e.g. ``freeze_layers`` too large).
        FileNotFoundError: ``data_dir`` is not a prepared data directory.
        ValueError: a checkpoint from another config or data set is in the way (see ``resume``).
    """
    from tqdm.auto import tqdm

    out = cfg.resolved_out().expanduser().resolve()
    work = work_dir(out)
    _seed_everything(cfg.seed)
    run = _setup(cfg)
    optimizer = build_optimizer(run.model, cfg)
    lengths = run.train.lengths
    batches_per_epoch = math.ceil(len(run.train) / cfg.batch_size)
    total = cfg.max_steps or math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    warmup = math.ceil(cfg.warmup_ratio * total)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    run_facts = {"config": config_to_dict(cfg), "data_fingerprint": run.train.fingerprint()}
    state = _restore_or_start(cfg, run, optimizer, work, run_facts)

    epochs: dict[int, list[np.ndarray]] = {}

    def micro_batch(index: int) -> np.ndarray:
        epoch, pos = divmod(index, batches_per_epoch)
        if epoch not in epochs:
            epochs.clear()  # one epoch's order in memory at a time
            epochs[epoch] = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.bucket_batches)
        return epochs[epoch][pos]

    pad = padding_fraction(lengths, epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, cfg.bucket_batches))
    n_trainable = sum(p.numel() for p in trainable)
    logger.info(
        "teacher: %d train records (%.1f%% padding), %d steps, %.1fM trainable params",
        len(run.train), 100 * pad, total, n_trainable / 1e6,
    )  # fmt: skip
    metrics_path = work / METRICS_FILE
    run.model.train()
    segment_start, segment_elapsed = time.perf_counter(), state.elapsed_s
    window: list[float] = []
    last_eval: dict[str, float] = {}
    stopped_early = False
    bar = tqdm(total=total, initial=state.step, desc="teacher", unit="step", disable=not cfg.progress)
    try:
        while state.step < total:
            step_start = time.perf_counter()
            lr = lr_at(state.step, cfg.lr, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [micro_batch(state.micro + k) for k in range(cfg.grad_accum)]
            n_records = sum(len(b) for b in batches)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for batch in batches:
                ids, mask = collate([run.train.sequences[i] for i in batch], run.scorer.pad_id)
                labels = torch.from_numpy(run.train.labels[batch]).to(run.device)
                with _autocast(run):
                    loss_sum, _ = pointwise_loss(run.scorer, ids.to(run.device), mask.to(run.device), labels)
                # Dividing by the step's record count makes accumulated gradients equal one big batch's mean.
                (loss_sum / n_records).backward()
                step_loss += float(loss_sum.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
            optimizer.step()
            state.step += 1
            state.micro += cfg.grad_accum
            state.train_s += time.perf_counter() - step_start
            window.append(step_loss / n_records)

            evaluated = run.val is not None and (state.step % cfg.eval_every == 0 or state.step == total)
            if evaluated:
                last_eval = evaluate(run.scorer, run.val, _autocast(run))
                if state.best_val_auc is None or last_eval["val_auc"] > state.best_val_auc:
                    state.best_val_auc, state.best_step, state.evals_since_best = (
                        last_eval["val_auc"],
                        state.step,
                        0,
                    )
                    with atomic_dir(_best_dir(work, state.step)) as tmp:
                        save_trainable(run.model, tmp / TRAINABLE_FILE)
                    # Keep the best the last checkpoint points at until the next checkpoint supersedes it.
                    ckpt_info = read_checkpoint_info(work / CHECKPOINT_DIR)
                    _prune_best(work, {state.step, ckpt_info["state"]["best_step"] if ckpt_info else None})
                else:
                    state.evals_since_best += 1
                stopped_early = 0 < cfg.early_stopping_patience <= state.evals_since_best
            state.elapsed_s = segment_elapsed + (time.perf_counter() - segment_start)
            if evaluated or state.step % cfg.log_every == 0 or state.step == total:
                record = {
                    "step": state.step,
                    "epoch": round(state.micro / batches_per_epoch, 4),
                    "loss": float(np.mean(window)),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "val_auc": last_eval["val_auc"] if evaluated else None,
                    "val_logloss": last_eval["val_logloss"] if evaluated else None,
                    "elapsed_s": round(state.elapsed_s, 3),
                }
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                window = []
            bar.update(1)
            bar.set_postfix(
                loss=f"{step_loss / n_records:.4f}",
                val_auc=f"{last_eval['val_auc']:.4f}" if last_eval else "-",
                refresh=False,
            )
            if (
                not stopped_early
                and state.step < total
                and cfg.checkpoint_every
                and state.step % cfg.checkpoint_every == 0
            ):
                save_checkpoint(work / CHECKPOINT_DIR, run.model, optimizer, state, run_facts)
                _prune_best(work, {state.best_step})
            if stop_after_step is not None and state.step == stop_after_step:
                raise KeyboardInterrupt(f"stop_after_step={stop_after_step} (test hook)")
            if stopped_early:
                logger.info("early stopping at step %d (best val AUC %.4f at step %s)", state.step,
                            state.best_val_auc, state.best_step)  # fmt: skip
                break
    finally:
        bar.close()
    return _finish(cfg, run, state, out, work, total, stopped_early, last_eval, pad, n_trainable)


def _finish(
    cfg: TeacherTrainConfig,
    run: _Run,
    state: TrainState,
    out: Path,
    work: Path,
    total: int,
    stopped_early: bool,
    last_eval: dict[str, float],
    pad: float,
    n_trainable: int,
) -> dict[str, Any]:
    """Load the best weights, merge LoRA, and write ``out`` atomically with its manifest and metrics."""
    if state.best_step is not None:
        load_trainable(run.model, _best_dir(work, state.best_step) / TRAINABLE_FILE)
    final = run.model.merge_and_unload() if cfg.lora.enabled else run.model
    final.eval()
    final.config.use_cache = True
    for param in final.parameters():
        param.requires_grad_(True)  # a saved model carries no trace of the training-time freeze
    metrics = {
        "best_val_auc": state.best_val_auc,
        "best_step": state.best_step if state.best_step is not None else state.step,
        "final_val_auc": last_eval.get("val_auc"),
        "final_val_logloss": last_eval.get("val_logloss"),
        "steps": state.step,
        "planned_steps": total,
        "stopped_early": stopped_early,
        "epochs_seen": round(state.micro * cfg.batch_size / len(run.train), 4),
        "train_records": len(run.train),
        "excluded_candidate_targets": run.excluded_candidate_targets,
        "val_records": len(run.val) if run.val is not None else 0,
        "history_items_dropped": run.train.history_dropped,
        "padding_fraction": round(pad, 4),
        "trainable_params": n_trainable,
        "train_time_s": round(state.train_s, 2),
        "s_per_step": round(state.train_s / max(1, state.step), 4),
        "elapsed_s": round(state.elapsed_s, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "device": str(run.device),
        "autocast": str(run.autocast_dtype).removeprefix("torch.") if run.autocast_dtype else "fp32",
    }
    if run.device.type == "cuda":
        metrics["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    with atomic_dir(out) as tmp:
        final.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        if (work / METRICS_FILE).is_file():
            shutil.copyfile(work / METRICS_FILE, tmp / METRICS_FILE)
        else:
            (tmp / METRICS_FILE).write_text("")
        write_manifest(tmp, STAGE, config=config_to_dict(cfg), parent=cfg.model, metrics=metrics)
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return {**metrics, "out": str(out)}
