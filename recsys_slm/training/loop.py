"""The training loop shared by teacher fine-tuning and distillation: one plain function, no global state.

``run_loop(cfg, task, work, run_facts)`` runs optimizer steps over ``task``'s records until ``max_steps`` (or
``epochs`` passes): gradient accumulation, AdamW with linear warm-up then linear decay, gradient clipping,
validation every ``eval_every`` steps with the best-validation-AUC weights kept, early stopping, resumable
checkpoints every ``checkpoint_every`` steps, JSONL metrics and a tqdm bar. What a step computes is the task's
business: ``task.micro_loss(batch_indices)`` returns a loss *summed* over the batch's records; the loop divides
by the step's record count, so accumulated gradients equal one big batch's mean.

Determinism: the epoch order is a pure function of ``(seed, epoch)`` (:func:`recsys_slm.ranker.batching.
epoch_batches`) and the learning rate a pure function of the step, so a resumed run recomputes exactly the
batches an uninterrupted one sees; RNG states travel in the checkpoint.

Work directory ``<out>.work/``: ``checkpoint-last/`` (trainable weights, optimizer, RNG, state), ``best-stepN/``
(best trainable weights) and ``metrics.jsonl``. The caller writes the final model and removes it.

The loop is usable as is inside a Ray Train worker (it touches no process-wide state besides seeding).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from recsys_slm.config import check, validate_fields
from recsys_slm.model_dir import atomic_dir
from recsys_slm.ranker.batching import epoch_batches, padding_fraction
from recsys_slm.ranker.checkpoint import (
    TRAINABLE_FILE,
    TrainState,
    load_checkpoint,
    load_trainable,
    read_checkpoint_info,
    save_checkpoint,
    save_trainable,
)

logger = logging.getLogger(__name__)

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
class LoopConfig:
    """Optimisation keys shared by every training stage (documented in ``docs/teacher.md``).

    Fields:
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
        seed (int): data order, sampling and initialisation. Default 0.
        max_train_records (int | None): train on a seeded random sample of this many records. Default None.
        device (str): "auto" (CUDA if available), "cpu", "cuda" or "cuda:N". Default "auto".
        precision (str): "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16". Master weights are fp32.
        resume (bool): continue from ``<out>.work/checkpoint-last`` when present. Default True.
        keep_checkpoints (bool): keep ``<out>.work/`` after success. Default False.
        progress (bool): show a tqdm progress bar. Default True.
    """

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


def autocast_dtype(cfg: LoopConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or on a bf16-capable CUDA device with precision=auto; None = plain fp32."""
    if cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context for plain fp32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def work_dir(out: Path) -> Path:
    """``<out>.work``: checkpoint, best weights and running metrics of an unfinished run."""
    return out.parent / f"{out.name}.work"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
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


@dataclass
class LoopTask:
    """What the loop trains.

    Attributes:
        model (torch.nn.Module): the module whose ``requires_grad`` parameters train and are checkpointed.
        lengths (np.ndarray): (N,) token counts of the N training records (for length bucketing).
        fingerprint (str): identifies the training data; a resume refuses a checkpoint with another.
        micro_loss: ``batch (np.ndarray of record indices) → (loss summed over the batch (scalar tensor),
            extra scalars to log, summed over the batch)``; called under ``autocast``.
        evaluate: ``() → dict`` with at least ``val_auc`` (model in eval mode for the call), or None.
        autocast: ``() → context manager`` wrapping forward passes.
        eval_keys (tuple[str, ...]): validation keys every metrics line carries (null between evaluations).
    """

    model: torch.nn.Module
    lengths: np.ndarray
    fingerprint: str
    micro_loss: Callable[[np.ndarray], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[], dict[str, float]] | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    eval_keys: tuple[str, ...] = ("val_auc", "val_logloss")


class LoopHooks:
    """Seams for running :func:`run_loop` data-parallel, one process per rank (Ray Train: see
    :mod:`recsys_slm.distributed.train`). Every default is the single-process behaviour.

    Attributes:
        work (Path | None): this process's work directory (None = the caller's ``<out>.work``).
        is_main (bool): only the main process writes the final model.
    """

    work: Path | None = None
    is_main: bool = True

    def start(self, model: torch.nn.Module) -> None:
        """Called once before the first step, after any resume (e.g. broadcast the main process's weights)."""

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """This process's records of a global micro-batch (the loop divides by the global record count)."""
        return batch

    def sync(self, params: list[torch.nn.Parameter], loss: float, extra: dict) -> tuple[float, dict]:
        """After a step's backward passes, before clipping: combine gradients and logged sums across processes."""
        return loss, extra

    def evaluate(self, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Run validation; every process must get the same result."""
        return fn()

    def checkpointed(self, work: Path, state: TrainState) -> None:
        """Called after each resumable checkpoint has been written to ``work``."""


@dataclass
class LoopResult:
    """Outcome of :func:`run_loop`: the final state, planned steps, early-stop flag, last validation."""

    state: TrainState
    total: int
    stopped_early: bool
    last_eval: dict[str, float] = field(default_factory=dict)
    padding_fraction: float = 0.0
    trainable_params: int = 0


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def best_dir(work: Path, step: int) -> Path:
    return work / f"best-step{step:07d}"


def _prune_best(work: Path, keep: set[int | None]) -> None:
    """Remove best-weight dirs except those of the steps in ``keep`` (the current best and the checkpoint's)."""
    names = {best_dir(work, s).name for s in keep if s is not None}
    for path in sorted(work.glob("best-step*")):
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
    cfg: LoopConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, work: Path, run_facts: dict
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
    state, _ = load_checkpoint(ckpt, model, optimizer)
    _prune_best(work, {state.best_step})
    _truncate_metrics(work / METRICS_FILE, state.step)
    logger.info("resumed from %s at step %d", ckpt, state.step)
    return state


def load_best(model: torch.nn.Module, work: Path, state: TrainState) -> None:
    """Load the best-validation trainable weights into ``model`` (no-op when nothing was validated)."""
    if state.best_step is not None:
        load_trainable(model, best_dir(work, state.best_step) / TRAINABLE_FILE)


def run_loop(
    cfg: LoopConfig,
    task: LoopTask,
    work: Path,
    run_facts: dict[str, Any],
    desc: str = "train",
    stop_after_step: int | None = None,
    hooks: LoopHooks | None = None,
) -> LoopResult:
    """Train ``task.model`` (see the module docstring).

    Args:
        cfg (LoopConfig): optimisation keys.
        task (LoopTask): model, data lengths and the per-batch loss.
        work (Path): the run's work directory (``<out>.work``).
        run_facts (dict): ``config`` (resolved config dict) and ``data_fingerprint``, stored in checkpoints and
            compared on resume.
        desc (str): progress-bar label.
        stop_after_step (int | None): test hook simulating a kill: raise ``KeyboardInterrupt`` right after this
            optimizer step (and after its checkpoint, if one was due).
        hooks (LoopHooks | None): data-parallel seams; None = single process.

    Raises:
        ValueError: a checkpoint from another config or data set is in the way (see ``resume``).
    """
    from tqdm.auto import tqdm

    hooks = hooks or LoopHooks()
    optimizer = build_optimizer(task.model, cfg)
    lengths = task.lengths
    batches_per_epoch = math.ceil(len(lengths) / cfg.batch_size)
    total = cfg.max_steps or math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    warmup = math.ceil(cfg.warmup_ratio * total)
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    state = _restore_or_start(cfg, task.model, optimizer, work, run_facts)

    epochs: dict[int, list[np.ndarray]] = {}

    def micro_batch(index: int) -> np.ndarray:
        epoch, pos = divmod(index, batches_per_epoch)
        if epoch not in epochs:
            epochs.clear()  # one epoch's order in memory at a time
            epochs[epoch] = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.bucket_batches)
        return epochs[epoch][pos]

    pad = padding_fraction(lengths, epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, cfg.bucket_batches))
    n_trainable = sum(p.numel() for p in trainable)
    logger.info("%s: %d train records (%.1f%% padding), %d steps, %.1fM trainable params",
                desc, len(lengths), 100 * pad, total, n_trainable / 1e6)  # fmt: skip
    metrics_path = work / METRICS_FILE
    task.model.train()
    segment_start, segment_elapsed = time.perf_counter(), state.elapsed_s
    window: list[float] = []
    window_extra: dict[str, list[float]] = {}
    last_eval: dict[str, float] = {}
    stopped_early = False
    hooks.start(task.model)
    bar = tqdm(total=total, initial=state.step, desc=desc, unit="step", disable=not cfg.progress)
    try:
        while state.step < total:
            step_start = time.perf_counter()
            lr = lr_at(state.step, cfg.lr, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [micro_batch(state.micro + k) for k in range(cfg.grad_accum)]
            n_records = sum(len(b) for b in batches)
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_extra = 0.0, {}
            for batch in batches:
                batch = hooks.shard(batch)
                if len(batch) == 0:
                    continue  # this rank holds none of the micro-batch; it still joins hooks.sync
                with task.autocast():
                    loss_sum, extra = task.micro_loss(batch)
                (loss_sum / n_records).backward()
                step_loss += float(loss_sum.detach())
                for key, value in extra.items():
                    step_extra[key] = step_extra.get(key, 0.0) + float(value)
            step_loss, step_extra = hooks.sync(trainable, step_loss, step_extra)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
            optimizer.step()
            state.step += 1
            state.micro += cfg.grad_accum
            state.train_s += time.perf_counter() - step_start
            window.append(step_loss / n_records)
            for key, value in step_extra.items():
                window_extra.setdefault(key, []).append(value / n_records)

            evaluated = task.evaluate is not None and cfg.eval_every > 0 and (
                state.step % cfg.eval_every == 0 or state.step == total
            )
            if evaluated:
                last_eval = hooks.evaluate(task.evaluate)
                if state.best_val_auc is None or last_eval["val_auc"] > state.best_val_auc:
                    state.best_val_auc, state.best_step, state.evals_since_best = (
                        last_eval["val_auc"],
                        state.step,
                        0,
                    )
                    with atomic_dir(best_dir(work, state.step)) as tmp:
                        save_trainable(task.model, tmp / TRAINABLE_FILE)
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
                    "loss": float(np.mean(window)) if window else None,
                    **{key: float(np.mean(v)) for key, v in window_extra.items()},
                    "lr": lr,
                    "grad_norm": grad_norm,
                    **{key: last_eval.get(key) if evaluated else None for key in task.eval_keys},
                    "elapsed_s": round(state.elapsed_s, 3),
                }
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                window, window_extra = [], {}
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
                save_checkpoint(work / CHECKPOINT_DIR, task.model, optimizer, state, run_facts)
                _prune_best(work, {state.best_step})
                hooks.checkpointed(work, state)
            if stop_after_step is not None and state.step == stop_after_step:
                raise KeyboardInterrupt(f"stop_after_step={stop_after_step} (test hook)")
            if stopped_early:
                logger.info("early stopping at step %d (best val AUC %.4f at step %s)", state.step,
                            state.best_val_auc, state.best_step)  # fmt: skip
                break
    finally:
        bar.close()
    return LoopResult(state, total, stopped_early, last_eval, pad, n_trainable)


def copy_metrics(work: Path, dest: Path) -> None:
    """Copy ``work/metrics.jsonl`` into a model directory (an empty file when nothing was logged)."""
    if (work / METRICS_FILE).is_file():
        shutil.copyfile(work / METRICS_FILE, dest / METRICS_FILE)
    else:
        (dest / METRICS_FILE).write_text("")
