"""Distillation of a pointwise LLM ranker (stages 1 and 3): teacher → smaller student.

``distill(cfg)`` builds the student (:mod:`recsys_slm.distill.student`), reads the transfer set with the teacher's
outputs (off-policy: a cache written once by ``recsys-slm teacher score``; or online: the teacher runs on each
batch), trains with :class:`~recsys_slm.distill.objective.RankerObjective` in the shared loop
(:func:`recsys_slm.training.loop.run_loop`: accumulation, AdamW + warm-up/decay, validation AUC with the best
checkpoint, resumable checkpoints, JSONL metrics), evaluates the best weights on the pointwise test split, and
writes a plain ``from_pretrained`` directory with a ``recsys_slm.json`` manifest recording the lineage
(teacher, kept layers, transfer set, teacher cache) and the metrics.

On-policy distillation (GKD) and sequence-level KD need the teacher online and generation; see
:mod:`recsys_slm.distill.on_policy`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys_slm.config import ConfigError, check, config_to_dict, expand_model_spec, from_dict
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.distill.objective import TOKEN_LOSSES, ObjectiveConfig, RankerObjective
from recsys_slm.distill.on_policy import OnPolicyConfig
from recsys_slm.distill.student import StudentConfig
from recsys_slm.model_dir import cache_home, data_dir_or_default
from recsys_slm.training.loop import (
    LoopConfig,
    LoopHooks,
    LoopTask,
    load_best,
    run_loop,
    seed_everything,
    work_dir,
)

logger = logging.getLogger(__name__)

STAGE = "distill"
ONLINE_TOP_K = 20  # top-k the online teacher hands token-level losses (as the cache's default)


@dataclass
class DistillConfig(LoopConfig):
    """Config of ``recsys-slm distill`` (every key in ``docs/distillation.md``).

    Optimisation keys are those of :class:`~recsys_slm.training.loop.LoopConfig`. Own fields:
        teacher (str): the teacher model directory (student source by default; runs online without a cache).
        teacher_cache (Path | None): parquet from ``recsys-slm teacher score`` (off-policy). None = online teacher.
        transfer_set (Path | None): the records to train on (a pointwise task or ``data transfer-set`` parquet);
            None = the teacher cache's records, or the pointwise train split for an online teacher. With a cache,
            each record's teacher outputs are looked up in it by (user_id, item_id, timestamp).
        sources (list[str]): transfer-set sources to train on: "labelled", "teacher_labelled". Default both.
        data_dir (Path | None): prepared data directory (item/user tables, val/test splits).
        out (Path | None): output model directory; default ``$RECSYS_SLM_HOME/runs/distill/student``.
        prompt (PromptConfig): prompt; the default is replaced by the cache's / teacher manifest's prompt.
        student (StudentConfig): how the student is made.
        objective (ObjectiveConfig): the loss.
        on_policy (OnPolicyConfig): GKD / sequence-level KD completion term (needs the teacher model and the same
            tokenizer; see :mod:`recsys_slm.distill.on_policy`).
        freeze_embeddings (bool): keep the student's token embeddings and output head fixed (the verbalizer rows
            stay the teacher's). Default True.
        test_eval (bool): score the pointwise test split with the best weights at the end. Default True.
    """

    lr: float = 2e-4
    teacher: str = ""
    teacher_cache: Path | None = None
    transfer_set: Path | None = None
    sources: list[str] = field(default_factory=lambda: ["labelled", "teacher_labelled"])
    data_dir: Path | None = None
    out: Path | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    freeze_embeddings: bool = True
    test_eval: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.teacher.strip()), "teacher", "must name the teacher model directory")
        self.teacher = expand_model_spec(self.teacher)
        allowed = {"labelled", "teacher_labelled"}
        bad = sorted(set(self.sources) - allowed)
        check(not bad and bool(self.sources), "sources", f"must be a non-empty subset of {sorted(allowed)}, got {self.sources}")
        check(
            not (self.objective.loss == "sft" and self.sources == ["teacher_labelled"]),
            "sources",
            "objective.loss=sft needs human labels: include 'labelled'",
        )

    def resolved_data_dir(self) -> Path:
        return data_dir_or_default(self.data_dir)

    def resolved_out(self) -> Path:
        return self.out if self.out is not None else cache_home() / "runs" / "distill" / "student"


@dataclass
class _Targets:
    """Training records and the teacher's outputs, row-aligned."""

    frame: pd.DataFrame
    labels: np.ndarray  # (N,) float32, NaN = no human label
    teacher_score: np.ndarray | None  # (N,) float32 (None only for online teachers, filled per batch)
    topk_ids: np.ndarray | None  # (N, k) int64
    topk_logprobs: np.ndarray | None  # (N, k) float32
    meta: dict


def _load_targets(cfg: DistillConfig) -> _Targets:
    """Cache (off-policy) or transfer set (online), filtered to ``sources`` and sampled to max_train_records."""
    from recsys_slm.distill.teacher_cache import read_task, read_teacher_cache
    from recsys_slm.distill.transfer_set import SOURCE_LABELLED, labelled_train_records

    if cfg.teacher_cache is not None:
        frame, meta = read_teacher_cache(cfg.teacher_cache)
        if cfg.transfer_set is not None:
            frame = _restrict_to(frame, read_task(cfg.transfer_set), cfg.teacher_cache, cfg.transfer_set)
    elif cfg.transfer_set is not None:
        frame, meta = read_task(cfg.transfer_set), {}
    else:
        frame, _ = labelled_train_records(cfg.resolved_data_dir())
        meta = {}
    if "source" not in frame.columns:
        frame = frame.assign(source=SOURCE_LABELLED)
    frame = frame.loc[frame["source"].isin(cfg.sources)]
    if cfg.max_train_records is not None and cfg.max_train_records < len(frame):
        frame = frame.sample(n=cfg.max_train_records, random_state=cfg.seed).sort_index()
    frame = frame.reset_index(drop=True)
    if len(frame) == 0:
        raise ValueError(f"no training records left after sources={cfg.sources} (check the transfer set's 'source' column)")
    labels = pd.to_numeric(frame["label"], errors="coerce").to_numpy(dtype=np.float32) if "label" in frame else (
        np.full(len(frame), np.nan, dtype=np.float32))  # fmt: skip
    if cfg.objective.loss == "sft" and np.isnan(labels).all():
        raise ValueError("objective.loss=sft but no training record has a human label")
    if cfg.teacher_cache is None:
        return _Targets(frame, labels, None, None, None, meta)
    topk_ids = np.stack(frame["teacher_topk_ids"].to_numpy()) if meta.get("top_k") else None
    topk_lp = np.stack(frame["teacher_topk_logprobs"].to_numpy()) if meta.get("top_k") else None
    if cfg.objective.loss in TOKEN_LOSSES and topk_ids is None:
        raise ConfigError(
            f"config key 'objective.loss': {cfg.objective.loss} needs teacher top-k, but {cfg.teacher_cache} was "
            "written with top_k=0; rescore with top_k > 0"
        )
    return _Targets(frame, labels, frame["teacher_score"].to_numpy(np.float32), topk_ids, topk_lp, meta)


def _restrict_to(cache: pd.DataFrame, records: pd.DataFrame, cache_path: Path, records_path: Path) -> pd.DataFrame:
    """The cache rows of ``records`` (matched on user_id, item_id, timestamp), in the records' order.

    Raises:
        ValueError: some records are not in the cache (count and examples named).
    """
    from recsys_slm.data.events import event_index

    cache_keys = event_index(cache)
    if cache_keys.has_duplicates:
        cache, cache_keys = cache.loc[~cache_keys.duplicated()], cache_keys[~cache_keys.duplicated()]
    position = cache_keys.get_indexer(event_index(records))
    missing = np.flatnonzero(position < 0)
    if len(missing):
        examples = records.iloc[missing[:3]][["user_id", "item_id", "timestamp"]].to_dict("records")
        raise ValueError(
            f"{len(missing)} of {len(records)} records of transfer_set {records_path} are not in teacher_cache "
            f"{cache_path} (matched on user_id, item_id, timestamp), e.g. {examples}; score them first"
        )
    return cache.iloc[position].reset_index(drop=True)


def _resolve_prompt(cfg: DistillConfig, meta: dict) -> tuple[PromptConfig, str]:
    from recsys_slm.evaluation.ranker_eval import resolve_prompt
    from recsys_slm.model_dir import read_manifest

    if meta.get("prompt") and cfg.prompt == PromptConfig():
        return from_dict(PromptConfig, meta["prompt"]), "teacher cache"
    manifest = read_manifest(cfg.teacher) if Path(cfg.teacher).expanduser().is_dir() else None
    return resolve_prompt(cfg.prompt, manifest)


def _freeze_embeddings(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(False)


def distill(
    cfg: DistillConfig, stop_after_step: int | None = None, hooks: LoopHooks | None = None
) -> dict[str, Any]:
    """Train the student and write it to ``cfg.resolved_out()`` (see the module docstring).

    Args:
        cfg (DistillConfig): the resolved config.
        stop_after_step (int | None): test hook simulating a kill after this optimizer step.
        hooks (LoopHooks | None): data-parallel seams (one process per rank, see
            :mod:`recsys_slm.distributed.train`); None = single process.

    Returns:
        dict: the manifest metrics plus ``out`` (a non-main rank returns only ``steps`` and ``planned_steps``).

    Raises:
        ConfigError: a key only the models or the cache can reject (token_kd across tokenizers, ...).
        FileNotFoundError / ValueError: missing data, cache or teacher; a checkpoint of another config.
    """
    from recsys_slm.data.prompts import PromptRenderer
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.device import resolve_device
    from recsys_slm.distill.cross_tokenizer import ignored_ids
    from recsys_slm.distill.student import build_student
    from recsys_slm.ranker.batching import collate, encode_records
    from recsys_slm.ranker.ranker import Ranker, RankerConfig
    from recsys_slm.ranker.train import (
        check_val_labels,
        evaluate,
        load_val_frame,
        run_stats,
        save_model_dir,
    )
    from recsys_slm.training.loop import autocast_context, autocast_dtype

    out = cfg.resolved_out().expanduser().resolve()
    work = hooks.work if hooks is not None and hooks.work is not None else work_dir(out)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data_dir = cfg.resolved_data_dir()
    log = InteractionLog.load(data_dir)
    targets = _load_targets(cfg)
    prompt, prompt_source = _resolve_prompt(cfg, targets.meta)

    def encode_frame(frame, tokenizer):
        renderer = PromptRenderer(prompt, tokenizer, log.items, log.users)
        ranker = Ranker(None, tokenizer, renderer, RankerConfig(cfg.eval_batch_size, False, prompt))
        return [
            ranker.encode(renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id, r.user_id))
            for r in frame.itertuples()
        ]

    # Block Influence calibration needs token ids before the student exists: tokenize with the source's tokenizer.
    calibration = None
    if cfg.student.init == "teacher_layers" and cfg.student.selection == "block_influence":
        from recsys_slm.models.loading import load_tokenizer

        calibration = encode_frame(targets.frame.head(cfg.student.calibration_records),
                                   load_tokenizer(cfg.student.source or cfg.teacher))  # fmt: skip
    model, tokenizer, lineage = build_student(cfg.student, cfg.teacher, calibration, device=device)
    student_rows = model.get_output_embeddings().weight.shape[0]
    student_ignore = ignored_ids(student_rows, tokenizer, name="student")
    renderer = PromptRenderer(prompt, tokenizer, log.items, log.users)
    ranker = Ranker(model, tokenizer, renderer, RankerConfig(cfg.eval_batch_size, False, prompt))
    sequences = encode_frame(targets.frame, tokenizer)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))

    teacher_tok = None
    on_policy = cfg.on_policy.enabled
    if cfg.objective.loss in TOKEN_LOSSES or cfg.teacher_cache is None or on_policy or cfg.objective.hidden_weight > 0:
        from recsys_slm.models.loading import load_tokenizer

        teacher_tok = load_tokenizer(cfg.teacher)
    online = None
    hidden_term = cfg.objective.hidden_weight > 0
    if (cfg.teacher_cache is None and cfg.objective.loss != "sft") or on_policy or hidden_term:
        online = _OnlineTeacher(cfg, prompt, teacher_tok, device, encode_frame(targets.frame, teacher_tok))
    if on_policy and teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            "config key 'on_policy.enabled': the completion term compares token ids, but the teacher and student "
            f"tokenizers differ ({len(teacher_tok)} vs {len(tokenizer)} tokens)"
        )
    teacher_rows = online.vocab_rows if online is not None else int(targets.meta.get("vocab_rows") or 0)
    teacher_ignore, gold, answer_ids = [], None, None
    if cfg.objective.loss in TOKEN_LOSSES:
        teacher_ignore = ignored_ids(teacher_rows, teacher_tok, name=f"teacher {cfg.teacher}")
        if cfg.objective.loss == "token_kd" and teacher_tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                "config key 'objective.loss': token_kd compares token ids, but the teacher and student "
                f"tokenizers differ ({len(teacher_tok)} vs {len(tokenizer)} tokens); use uld or gold"
            )
        if cfg.objective.loss == "gold":
            from recsys_slm.distill.cross_tokenizer import GoldLoss, GoldLossConfig
            from recsys_slm.ranker.verbalizer import verbalizer_token_ids

            gold = GoldLoss(tokenizer, teacher_tok, GoldLossConfig(beta=cfg.objective.beta))
            answer_ids = (
                verbalizer_token_ids(tokenizer, prompt.yes_token, prompt.no_token),
                verbalizer_token_ids(teacher_tok, prompt.yes_token, prompt.no_token),
            )
    objective = RankerObjective(cfg.objective, gold, teacher_rows, teacher_ignore, student_ignore, answer_ids)
    hidden_pairs, hidden_loss = None, None
    if hidden_term:
        hidden_pairs, hidden_loss = _hidden_plan(cfg, model, online.scorer.model, lineage)

    if cfg.freeze_embeddings:
        _freeze_embeddings(model)
    model.config.use_cache = False
    model.train()
    val_frame = load_val_frame(data_dir, cfg)
    val = None
    if val_frame is not None:
        val = encode_records(val_frame, renderer, ranker.encode)
        check_val_labels(val)
    dtype = autocast_dtype(cfg, device)

    def autocast():
        return autocast_context(device, dtype)

    scorer = ranker.scorer
    head = model.get_output_embeddings()
    needs_full = cfg.objective.loss in TOKEN_LOSSES

    def teacher_targets(batch: np.ndarray):
        if targets.teacher_score is not None:
            t_score = torch.from_numpy(targets.teacher_score[batch]).to(device)
            t_ids = torch.from_numpy(targets.topk_ids[batch]).to(device) if needs_full else None
            t_lp = torch.from_numpy(targets.topk_logprobs[batch]).to(device) if needs_full else None
            return t_score, t_ids, t_lp
        if online is not None:
            return online.outputs(batch, needs_full)
        return None, None, None

    def micro_loss(batch: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        labels = torch.from_numpy(targets.labels[batch]).to(device)
        if on_policy:
            return on_policy_loss(batch, labels)
        ids, mask = collate([sequences[i] for i in batch], scorer.pad_id)
        if hidden_term:
            states = answer_states(model, ids.to(device), mask.to(device))  # per layer output: (B, H)
            hidden = states[-1]
        else:
            hidden = scorer.last_hidden(ids.to(device), mask.to(device))  # (B, H)
        verbal = scorer.verbalizer_logits(hidden)  # (B, 2)
        full = head(hidden).float() if needs_full else None  # (B, V_S): answer position only
        loss, parts = objective(verbal, full, labels, *teacher_targets(batch))
        if hidden_term:
            t_ids, t_mask = collate([online.sequences[i] for i in batch], online.scorer.pad_id)
            with torch.no_grad():
                t_states = answer_states(online.scorer.model, t_ids.to(device), t_mask.to(device))
            term = sum(hidden_loss(states[s], t_states[t]) for s, t in hidden_pairs) * len(batch)
            loss = loss + cfg.objective.hidden_weight * term
            parts["hidden"] = float(term.detach())
        return loss, parts

    def on_policy_loss(batch: np.ndarray, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        from recsys_slm.distill.on_policy import (
            completion_token_loss,
            hidden_states,
            layout,
            sample_completions,
        )

        op = cfg.on_policy
        prompts = [sequences[i] for i in batch]
        t_score, t_ids, t_lp = teacher_targets(batch)
        eos = {i for i in (tokenizer.eos_token_id, teacher_tok.eos_token_id) if i is not None}
        sampled = op.mode == "gkd" and bool(torch.rand(()) < op.student_fraction)
        if sampled:
            completions = sample_completions(model, prompts, op.max_new_tokens, op.temperature, eos, scorer.pad_id)
        elif op.mode == "sequence_kd":
            completions = sample_completions(online.scorer.model, prompts, op.max_new_tokens, 0.0, eos, scorer.pad_id)
        else:  # the data's completion: the answer word of the label (the teacher's sign where there is none)
            teacher_positive = t_score > 0 if t_score is not None else torch.zeros_like(labels, dtype=torch.bool)
            positive = torch.where(torch.isnan(labels), teacher_positive, labels > 0.5).tolist()
            completions = [[scorer.yes_id if p else scorer.no_id] for p in positive]
        ids, mask, cmask, width_p = layout(prompts, completions, scorer.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        m = cmask.shape[1]
        hidden = hidden_states(model, ids, mask)  # (B, P + m, H)
        answer = hidden[:, width_p - 1]
        verbal = scorer.verbalizer_logits(answer)
        full = head(answer).float() if needs_full else None
        student_comp = head(hidden[:, width_p - 1 : width_p - 1 + m]).float()  # (B, m, V)
        with torch.no_grad():
            t_hidden = hidden_states(online.scorer.model, ids, mask)[:, width_p - 1 : width_p - 1 + m]
            teacher_comp = online.scorer.model.get_output_embeddings()(t_hidden).float()
        token = completion_token_loss(student_comp, teacher_comp, ids[:, width_p:], cmask, op)
        main, parts = objective(verbal, full, labels, t_score, t_ids, t_lp)
        return main + op.weight * token, {**parts, "on_policy": float(token.detach()),
                                          "student_sampled": float(sampled) * len(batch)}  # fmt: skip

    task = LoopTask(
        model=model,
        lengths=lengths,
        fingerprint=_fingerprint(sequences, targets),
        micro_loss=micro_loss,
        evaluate=(lambda: evaluate(scorer, val, autocast())) if val is not None else None,
        autocast=autocast,
    )
    run_facts = {"config": config_to_dict(cfg), "data_fingerprint": task.fingerprint}
    result = run_loop(cfg, task, work, run_facts, desc="distill", stop_after_step=stop_after_step, hooks=hooks)
    if hooks is not None and not hooks.is_main:
        return {"steps": result.state.step, "planned_steps": result.total}
    load_best(model, work, result.state)
    test_metrics = _test_eval(data_dir, renderer, ranker, autocast()) if cfg.test_eval else {}
    state = result.state
    counts = targets.frame["source"].value_counts().to_dict()
    metrics = {
        "best_val_auc": state.best_val_auc,
        "best_step": state.best_step if state.best_step is not None else state.step,
        "final_val_auc": result.last_eval.get("val_auc"),
        **test_metrics,
        "steps": state.step,
        "planned_steps": result.total,
        "stopped_early": result.stopped_early,
        "epochs_seen": round(state.micro * cfg.batch_size / len(lengths), 4),
        "train_records": len(lengths),
        "train_records_by_source": {str(k): int(v) for k, v in counts.items()},
        "val_records": len(val) if val is not None else 0,
        "student_params": lineage["params"],
        "teacher_params": lineage["source_params"] if cfg.student.source is None else None,
        "prompt_source": prompt_source,
        **run_stats(result, cfg, device, dtype),
    }
    extra = {
        "lineage": {
            "teacher": str(cfg.teacher),
            "student": lineage,
            "teacher_cache": str(cfg.teacher_cache) if cfg.teacher_cache else None,
            "teacher_cache_meta": {k: v for k, v in targets.meta.items() if k != "prompt"} or None,
            "objective": config_to_dict(cfg.objective),
        }
    }
    config = config_to_dict(cfg)
    config["prompt"] = config_to_dict(prompt)  # the prompt actually trained with (maybe the cache's), so evals reuse it
    save_model_dir(out, model, tokenizer, work, STAGE, config, str(cfg.teacher), metrics, extra)
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return {**metrics, "out": str(out)}


def answer_states(model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states at each row's last real token: index 0 the embeddings, i the output of block i (HF's
    ``output_hidden_states`` convention; the last entry is after the final norm, as the head reads it)."""
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
    last = mask.long().cumsum(-1).argmax(-1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    return [h[rows, last] for h in out.hidden_states]


def _hidden_plan(cfg: DistillConfig, student, teacher, lineage: dict):
    """Layer pairs and the loss of the intermediate-state term. A layer-subset student of the teacher pairs its
    block j with the teacher block it was copied from; any other student uses TinyBERT's uniform map."""
    from recsys_slm.distill.ranker_losses import HiddenStateLoss, uniform_layer_map

    s_width, t_width = student.config.hidden_size, teacher.config.hidden_size
    if s_width != t_width:
        raise ConfigError(
            f"config key 'objective.hidden_weight': student and teacher widths differ ({s_width} vs {t_width}); the "
            "trainer supports the intermediate-state term for equal widths only (a learned projection is not wired in)"
        )
    kept = lineage.get("kept_layers")
    if kept is not None and cfg.student.source is None:
        pairs = [(j + 1, i + 1) for j, i in enumerate(kept)]
    else:
        pairs = uniform_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    return pairs, HiddenStateLoss(s_width, t_width, cfg.objective.hidden_kind)


def _fingerprint(sequences: list[list[int]], targets: _Targets) -> str:
    """Hash of the student's token ids, labels and teacher scores: a resume refuses other training data."""
    import hashlib

    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes() + b";")
    digest.update(np.nan_to_num(targets.labels, nan=-1.0).tobytes())
    if targets.teacher_score is not None:
        digest.update(targets.teacher_score.tobytes())
    return digest.hexdigest()[:16]


def _test_eval(data_dir: Path, renderer, ranker, autocast) -> dict[str, float]:
    """AUC and log loss of the best weights on the pointwise test split (all records)."""
    from recsys_slm.ranker.batching import encode_records
    from recsys_slm.ranker.train import evaluate

    test = pd.read_parquet(Path(data_dir) / "tasks" / "pointwise" / "test.parquet")
    records = encode_records(test, renderer, ranker.encode)
    result = evaluate(ranker.scorer, records, autocast)
    return {"test_auc": result["val_auc"], "test_logloss": result["val_logloss"], "test_records": len(records)}


class _OnlineTeacher:
    """The teacher run on each batch instead of a cache (same outputs as ``teacher score``)."""

    def __init__(self, cfg: DistillConfig, prompt: PromptConfig, tokenizer, device, sequences) -> None:
        from recsys_slm.distill.cross_tokenizer import ignored_ids
        from recsys_slm.models.loading import load_causal_lm
        from recsys_slm.ranker.verbalizer import VerbalizerScorer

        model, _ = load_causal_lm(cfg.teacher, device=device, dtype=torch.float32)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.scorer = VerbalizerScorer(model, tokenizer, prompt.yes_token, prompt.no_token, cfg.batch_size)
        self.sequences = sequences
        self.vocab_rows = model.get_output_embeddings().weight.shape[0]
        self.ignore = ignored_ids(self.vocab_rows, tokenizer, name="teacher")
        self.top_k = ONLINE_TOP_K
        self.temperature = 1.0
        self.device = device

    def outputs(self, batch: np.ndarray, need_topk: bool):
        from recsys_slm.distill.teacher_cache import answer_position_outputs

        out = answer_position_outputs(self.scorer, [self.sequences[i] for i in batch],
                                      self.top_k if need_topk else 0, self.temperature, self.ignore)  # fmt: skip
        logits = torch.from_numpy(out["logits"]).to(self.device)
        score = logits[:, 0] - logits[:, 1]
        if not need_topk:
            return score, None, None
        return (score, torch.from_numpy(out["topk_ids"]).long().to(self.device),
                torch.from_numpy(out["topk_logprobs"]).to(self.device))  # fmt: skip
