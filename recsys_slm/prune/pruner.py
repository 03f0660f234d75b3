"""``recsys-slm prune``: one-shot uniform structured pruning of a ranker (stage 2) with a before/after report.

Importance (``method``): ``magnitude``, ``activation`` (Minitron) or ``taylor`` (first-order, on the ranker's BCE
over the calibration records' labels) from :mod:`recsys_slm.prune.importance`; depth: ``layers_keep`` < 1 first
removes the blocks with the lowest Block Influence (ShortGPT);
calibration prompts are the task's own (``calibration_records`` pointwise train records rendered with the model's
prompt). Every layer keeps the same number of query heads (``heads_keep``; GQA-valid, ``head_mode``) and MLP
neurons (``neurons_keep``), so the output is a stock ``from_pretrained`` directory. Measured in the same run:
non-embedding parameters, forward latency on the calibration prompts (before/after), and, with ``eval_records``
> 0, validation AUC before and after pruning (no retraining).

Not built yet (issue [prune]): OSSCAR refit, SVD /
Compress-to-Impress, non-uniform widths as a registered model type, BERT-style encoders.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from recsys_slm.config import check, config_to_dict, expand_model_spec, validate_fields
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.model_dir import cache_home

STAGE = "prune"


@dataclass
class PruneConfig:
    """Keys of ``recsys-slm prune``.

    Fields:
        model (str): the model directory to prune.
        out (Path | None): output directory (required).
        data_dir (Path | None): prepared data (calibration and validation prompts).
        prompt (PromptConfig): default: the prompt in the model's manifest.
        method (str): magnitude | activation | taylor. Default "activation".
        layers_keep (float): share of decoder blocks kept (the highest Block Influence), rounded up. Default 1.
        heads_keep (float): share of query heads kept per layer, rounded to a GQA-valid count. Default 0.5.
        head_mode (str): kv_groups | query_heads (see ``uniform_head_plan``). Default "query_heads".
        neurons_keep (float): share of MLP neurons kept per layer. Default 0.5.
        calibration_records (int): train prompts for activation importance and latency. Default 64.
        eval_records (int): validation records scored before and after (0 = skip). Default 500.
        batch_size (int): prompts per forward. Default 16.
        seed (int): calibration sample seed. Default 0.
        device (str): "auto", "cpu", "cuda" or "cuda:N".
    """

    model: str = ""
    out: Path | None = None
    data_dir: Path | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    method: Literal["magnitude", "activation", "taylor"] = "activation"
    layers_keep: float = 1.0
    heads_keep: float = 0.5
    head_mode: Literal["kv_groups", "query_heads"] = "query_heads"
    neurons_keep: float = 0.5
    calibration_records: int = 64
    eval_records: int = 500
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        validate_fields(self)
        check(bool(self.model.strip()), "model", "must name the model directory to prune")
        self.model = expand_model_spec(self.model)
        check(self.out is not None, "out", "must name the output directory")
        for key in ("heads_keep", "neurons_keep", "layers_keep"):
            check(0 < getattr(self, key) <= 1, key, f"must be in (0, 1], got {getattr(self, key)}")
        check(self.calibration_records > 0, "calibration_records", f"must be > 0, got {self.calibration_records}")
        check(self.eval_records >= 0, "eval_records", f"must be >= 0, got {self.eval_records}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")


def _keep_count(total: int, share: float, unit: int) -> int:
    """``share × total`` rounded to the nearest positive multiple of ``unit``."""
    return max(unit, int(round(share * total / unit)) * unit)


def _latency(scorer, sequences: list[list[int]]) -> float:
    """Seconds per prompt of verbalizer scoring (one warm-up batch, then all)."""
    scorer.score_token_ids(sequences[: scorer.batch_size])
    start = time.perf_counter()
    scorer.score_token_ids(sequences)
    return (time.perf_counter() - start) / len(sequences)


def _auc(scorer, records) -> float:
    from sklearn.metrics import roc_auc_score

    logits = scorer.score_token_ids(records.sequences)
    return float(roc_auc_score(records.labels, (logits[:, 0] - logits[:, 1]).numpy()))


def _label_batches(calib: list[list[int]], frame, ranker, cfg: PruneConfig, device):
    """Calibration records as ``(input_ids, attention_mask, labels)`` batches for Taylor importance."""
    from recsys_slm.ranker.batching import collate

    labels = torch.as_tensor(frame["label"].to_numpy(dtype="float32"))
    for start in range(0, len(calib), cfg.batch_size):
        ids, mask = collate(calib[start : start + cfg.batch_size], ranker.scorer.pad_id)
        yield ids.to(device), mask.to(device), labels[start : start + cfg.batch_size].to(device)


def _verbalizer_bce(scorer):
    """The ranker's task loss: summed BCE of ``logit_yes − logit_no`` at the answer position (two head rows only)."""

    def loss(model, ids, mask, labels):
        logits = scorer.verbalizer_logits(scorer.last_hidden(ids, mask))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0] - logits[:, 1], labels, reduction="sum")

    return loss


def prune(cfg: PruneConfig) -> dict[str, Any]:
    """Prune ``cfg.model`` uniformly and write ``cfg.out`` (weights, tokenizer, ``recsys_slm.json``)."""
    import pandas as pd

    from recsys_slm.data.prompts import PromptRenderer
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.device import resolve_device
    from recsys_slm.distill.transfer_set import labelled_train_records
    from recsys_slm.evaluation.ranker_eval import resolve_prompt
    from recsys_slm.model_dir import atomic_dir, read_manifest, write_manifest
    from recsys_slm.models.layers import decoder_layers
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.prune.importance import (
        activation_scores,
        magnitude_scores,
        taylor_scores,
        uniform_head_plan,
        uniform_neuron_plan,
    )
    from recsys_slm.prune.structure import (
        attention_widths,
        check_supported,
        layer_widths,
        non_embedding_params,
        prune_attention_heads,
        prune_mlp_neurons,
        sync_config,
    )
    from recsys_slm.ranker.batching import encode_records
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    device = resolve_device(cfg.device)
    data_dir = cfg.data_dir if cfg.data_dir is not None else cache_home() / "data" / "movielens-100k"
    manifest = read_manifest(cfg.model) if Path(cfg.model).expanduser().is_dir() else None
    prompt, _ = resolve_prompt(cfg.prompt, manifest)
    model, tokenizer = load_causal_lm(cfg.model, device=device, dtype=torch.float32)
    model.eval()
    check_supported(model)
    log = InteractionLog.load(data_dir)
    ranker = Ranker(model, tokenizer, PromptRenderer(prompt, tokenizer, log.items, log.users),
                    RankerConfig(cfg.batch_size, False, prompt))  # fmt: skip
    calib_frame, _ = labelled_train_records(data_dir, cfg.calibration_records, cfg.seed)
    calib = encode_records(calib_frame, ranker.renderer, ranker.encode).sequences
    val = None
    if cfg.eval_records:
        val_frame = pd.read_parquet(Path(data_dir) / "tasks" / "pointwise" / "val.parquet").head(cfg.eval_records)
        val = encode_records(val_frame, ranker.renderer, ranker.encode)
    before = {"non_embedding_params": non_embedding_params(model), "widths": layer_widths(model)[0].__dict__}
    with torch.inference_mode():
        before["s_per_prompt"] = _latency(ranker.scorer, calib)
        if val is not None:
            before["val_auc"] = _auc(ranker.scorer, val)
    removed_layers: list[int] = []
    if cfg.layers_keep < 1:
        from recsys_slm.distill.student import block_influence, keep_layers, select_layers

        total = len(decoder_layers(model))
        bi = block_influence(model, calib, ranker.scorer.pad_id, cfg.batch_size)
        kept = select_layers(total, max(1, math.ceil(cfg.layers_keep * total)), "block_influence", bi)
        removed_layers = sorted(set(range(total)) - set(kept))
        keep_layers(model, kept)
    if cfg.method == "magnitude":
        head_scores, neuron_scores = magnitude_scores(model)
    elif cfg.method == "activation":
        head_scores, neuron_scores = activation_scores(model, calib, ranker.scorer.pad_id, cfg.batch_size)
    else:
        head_scores, neuron_scores = taylor_scores(model, _label_batches(calib, calib_frame, ranker, cfg, device),
                                                   _verbalizer_bce(ranker.scorer))  # fmt: skip
    heads, kv, _ = attention_widths(decoder_layers(model)[0].self_attn)
    unit = heads // kv if cfg.head_mode == "kv_groups" else kv
    keep_heads = min(heads, _keep_count(heads, cfg.heads_keep, unit))
    keep_neurons = max(1, int(round(cfg.neurons_keep * neuron_scores.shape[1])))
    head_plan = uniform_head_plan(head_scores, kv, keep_heads, cfg.head_mode)
    neuron_plan = uniform_neuron_plan(neuron_scores, keep_neurons)
    for layer, h_keep, n_keep in zip(decoder_layers(model), head_plan, neuron_plan, strict=True):
        prune_attention_heads(layer.self_attn, h_keep)
        prune_mlp_neurons(layer.mlp, n_keep)
    sync_config(model)
    after = {"non_embedding_params": non_embedding_params(model), "widths": layer_widths(model)[0].__dict__}
    with torch.inference_mode():
        after["s_per_prompt"] = _latency(ranker.scorer, calib)
        if val is not None:
            after["val_auc"] = _auc(ranker.scorer, val)
    metrics = {
        "method": cfg.method,
        "before": before,
        "after": after,
        "non_embedding_param_ratio": round(after["non_embedding_params"] / before["non_embedding_params"], 4),
        "forward_speedup": round(before["s_per_prompt"] / after["s_per_prompt"], 3),
        "kept_heads": head_plan,
        "removed_layers": removed_layers,
        "kept_neurons_per_layer": keep_neurons,
        "calibration_records": len(calib),
        "val_records": len(val) if val is not None else 0,
        "device": str(device),
    }
    out = Path(cfg.out).expanduser().resolve()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config = config_to_dict(cfg)
        config["prompt"] = config_to_dict(prompt)  # the prompt actually used, so the output scores with it
        write_manifest(tmp, STAGE, config=config, parent=str(cfg.model), metrics=metrics)
    return {**metrics, "out": str(out)}
