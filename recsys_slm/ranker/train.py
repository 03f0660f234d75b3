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
import logging
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_slm.config import ConfigError, check, config_to_dict, validate_fields
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.model_dir import atomic_dir, cache_home, data_dir_or_default, write_manifest
from recsys_slm.models.layers import decoder_layers
from recsys_slm.ranker.batching import EncodedRecords, collate, encode_records
from recsys_slm.ranker.verbalizer import VerbalizerScorer
from recsys_slm.training.loop import (
    LoopConfig,
    LoopTask,
    autocast_context,
    autocast_dtype,
    copy_metrics,
    load_best,
    run_loop,
    seed_everything,
    work_dir,
)

logger = logging.getLogger(__name__)

STAGE = "teacher_train"
__all__ = ["STAGE", "TeacherLoraConfig", "TeacherTrainConfig", "decoder_layers", "evaluate", "pointwise_loss",
           "prepare_trainable", "train_teacher", "work_dir"]  # fmt: skip


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
class TeacherTrainConfig(LoopConfig):
    """Config of ``recsys-slm teacher train``. Every key is described in ``docs/teacher.md``.

    The optimisation keys (lr, batch_size, grad_accum, max_steps, epochs, eval_every, checkpoint_every, seed,
    device, precision, resume, ...) are those of :class:`recsys_slm.training.loop.LoopConfig`. Own fields:
        model (str): packaged name, local directory or hub id of the causal LM. Default "smollm2-135m-instruct".
        data_dir (Path | None): prepared data directory; default ``$RECSYS_SLM_HOME/data/movielens-100k``.
        out (Path | None): output model directory; default ``$RECSYS_SLM_HOME/runs/teacher/<model name>``.
        prompt (PromptConfig): prompt templates and verbalizer (the same config must be used for scoring).
        freeze_layers (int): freeze the first k decoder layers. Default 20.
        freeze_embeddings (bool): freeze the token (and position) embeddings and the output head. Default True.
        lora (TeacherLoraConfig): LoRA adapters instead of full fine-tuning of the unfrozen layers.
    """

    model: str = "smollm2-135m-instruct"
    data_dir: Path | None = None
    out: Path | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    freeze_layers: int = 20
    freeze_embeddings: bool = True
    lora: TeacherLoraConfig = field(default_factory=TeacherLoraConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.model.strip()), "model", "must name a model (packaged name, directory or hub id)")
        check(self.freeze_layers >= 0, "freeze_layers", f"must be >= 0, got {self.freeze_layers}")
        check(
            not (self.lora.enabled and not self.freeze_embeddings),
            "freeze_embeddings",
            "must be true with lora.enabled (LoRA trains only the adapters)",
        )

    def resolved_data_dir(self) -> Path:
        return data_dir_or_default(self.data_dir)

    def resolved_out(self) -> Path:
        if self.out is not None:
            return self.out
        return cache_home() / "runs" / "teacher" / Path(self.model.rstrip("/")).name


# --------------------------------------------------------------------------------------------- model set-up


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

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.autocast_dtype)


def load_val_frame(data_dir: Path, cfg: LoopConfig):
    """The pointwise validation records used during training (None when ``eval_every`` is 0)."""
    import pandas as pd

    if cfg.eval_every == 0:
        return None
    val = pd.read_parquet(Path(data_dir) / "tasks" / "pointwise" / "val.parquet")
    return val.head(cfg.eval_max_records) if cfg.eval_max_records is not None else val


def check_val_labels(val: EncodedRecords) -> None:
    """AUC needs both labels among the validation records (the error names the key to change)."""
    if len(set(val.labels.tolist())) < 2:
        raise ConfigError(
            f"config key 'eval_max_records': the {len(val)} validation records hold only one label, so AUC is "
            "undefined; validate on more records (or set eval_every=0)"
        )


def _setup(cfg: TeacherTrainConfig) -> _Run:
    from recsys_slm.data.prompts import PromptRenderer
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.device import resolve_device
    from recsys_slm.distill.transfer_set import labelled_train_records
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    device = resolve_device(cfg.device)
    data_dir = cfg.resolved_data_dir()
    # Held-out leave-one-out candidate targets are excluded (116 of 942 test targets on MovieLens-100K are also
    # pointwise train records): training on them would inflate the candidate-task metrics.
    train_frame, excluded = labelled_train_records(data_dir, cfg.max_train_records, cfg.seed)
    log = InteractionLog.load(data_dir)
    val_frame = load_val_frame(data_dir, cfg)
    # fp32 master weights on every device: AdamW updates of ~1e-4 × w vanish in bf16 weights.
    model, tokenizer = load_causal_lm(cfg.model, device=device, dtype=torch.float32)
    renderer = PromptRenderer(cfg.prompt, tokenizer, log.items, log.users)
    ranker = Ranker(model, tokenizer, renderer, RankerConfig(cfg.eval_batch_size, False, cfg.prompt))
    train = encode_records(train_frame, renderer, ranker.encode)
    if len(train) == 0:
        raise ValueError(f"no training records in {data_dir}/tasks/pointwise/train.parquet")
    val = None
    if val_frame is not None:
        val = encode_records(val_frame, renderer, ranker.encode)
        check_val_labels(val)
    seed_everything(cfg.seed)  # LoRA initialisation draws from the torch RNG
    trainable = prepare_trainable(model, cfg)
    hf_model = trainable.get_base_model() if cfg.lora.enabled else trainable
    hf_model.config.use_cache = False  # training never reuses a KV cache; don't build one
    scorer = VerbalizerScorer(
        hf_model, tokenizer, cfg.prompt.yes_token, cfg.prompt.no_token, batch_size=cfg.eval_batch_size
    )
    return _Run(trainable, hf_model, tokenizer, scorer, train, val, device, autocast_dtype(cfg, device), excluded)


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
    out = cfg.resolved_out().expanduser().resolve()
    work = work_dir(out)
    seed_everything(cfg.seed)
    run = _setup(cfg)

    def micro_loss(batch: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = collate([run.train.sequences[i] for i in batch], run.scorer.pad_id)
        labels = torch.from_numpy(run.train.labels[batch]).to(run.device)
        loss_sum, _ = pointwise_loss(run.scorer, ids.to(run.device), mask.to(run.device), labels)
        return loss_sum, {}

    task = LoopTask(
        model=run.model,
        lengths=run.train.lengths,
        fingerprint=run.train.fingerprint(),
        micro_loss=micro_loss,
        evaluate=(lambda: evaluate(run.scorer, run.val, run.autocast())) if run.val is not None else None,
        autocast=run.autocast,
    )
    run_facts = {"config": config_to_dict(cfg), "data_fingerprint": task.fingerprint}
    result = run_loop(cfg, task, work, run_facts, desc="teacher", stop_after_step=stop_after_step)
    load_best(run.model, work, result.state)
    final = run.model.merge_and_unload() if cfg.lora.enabled else run.model
    state = result.state
    metrics = {
        "best_val_auc": state.best_val_auc,
        "best_step": state.best_step if state.best_step is not None else state.step,
        "final_val_auc": result.last_eval.get("val_auc"),
        "final_val_logloss": result.last_eval.get("val_logloss"),
        "steps": state.step,
        "planned_steps": result.total,
        "stopped_early": result.stopped_early,
        "epochs_seen": round(state.micro * cfg.batch_size / len(run.train), 4),
        "train_records": len(run.train),
        "excluded_candidate_targets": run.excluded_candidate_targets,
        "val_records": len(run.val) if run.val is not None else 0,
        "history_items_dropped": run.train.history_dropped,
        **run_stats(result, cfg, run.device, run.autocast_dtype),
    }
    save_model_dir(out, final, run.tokenizer, work, STAGE, config_to_dict(cfg), cfg.model, metrics)
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return {**metrics, "out": str(out)}


def run_stats(result, cfg: LoopConfig, device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """Cost figures of a finished loop for the manifest: padding, trainable params, times, peak memory."""
    state = result.state
    stats = {
        "padding_fraction": round(result.padding_fraction, 4),
        "trainable_params": result.trainable_params,
        "train_time_s": round(state.train_s, 2),
        "s_per_step": round(state.train_s / max(1, state.step), 4),
        "elapsed_s": round(state.elapsed_s, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "device": str(device),
        "autocast": str(dtype).removeprefix("torch.") if dtype else "fp32",
    }
    if device.type == "cuda":
        stats["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return stats


def save_model_dir(out: Path, model: torch.nn.Module, tokenizer, work: Path, stage: str, config: dict,
                   parent: str, metrics: dict, extra: dict | None = None) -> None:  # fmt: skip
    """Write a plain ``from_pretrained`` directory atomically: weights (safetensors), tokenizer, metrics.jsonl
    and the ``recsys_slm.json`` manifest. The saved model carries no trace of the training-time freeze."""
    model.eval()
    model.config.use_cache = True
    for param in model.parameters():
        param.requires_grad_(True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_metrics(work, tmp)
        write_manifest(tmp, stage, config=config, parent=parent, metrics=metrics, extra=extra)
