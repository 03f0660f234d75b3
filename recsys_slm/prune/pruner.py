"""``recsys-slm prune``: one-shot structured pruning of a ranker (stage 2) with a before/after report.

Selection (``method``): ``magnitude``, ``activation`` (Minitron) or ``taylor`` (first-order, on the ranker's BCE
over the calibration records' labels) from :mod:`recsys_slm.prune.importance`, or ``osscar`` (greedy
reconstruction-based removal with a least-squares refit, :mod:`recsys_slm.prune.osscar`); depth: ``layers_keep`` < 1
first removes the blocks with the lowest Block Influence (ShortGPT). Widths come from ratios or a total
``param_budget`` (:mod:`recsys_slm.prune.plan`), the same in every layer (a stock ``from_pretrained`` directory) or
chosen globally (``uniform=false``: the registered compressed type, or ``uniformize`` back to stock). Optionally the
projections are then factored (``low_rank``: SVD-LLM or Compress-to-Impress, :mod:`recsys_slm.prune.low_rank`).
Calibration prompts are the task's own (``calibration_records`` pointwise train records rendered with the model's
prompt). Measured in the same run: non-embedding parameters, forward latency on the calibration prompts
(before/after), and, with ``eval_records`` > 0, validation AUC before and after pruning (no retraining).
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
from recsys_slm.model_dir import data_dir_or_default

STAGE = "prune"


@dataclass
class LowRankConfig:
    """``low_rank.*`` keys: factor projections into ``LowRankLinear`` after width pruning.

    Fields:
        method (str): none | svd_llm (activation-whitened truncated SVD, SVD-LLM) | cti (Compress-to-Impress:
            singular-value gradients of the task loss on ``samples`` calibration records). Default "none".
        kinds (list[str]): projection names to factor (q_proj … down_proj). Default: all seven.
        keep_ratio (float | None): per-matrix parameter share kept (rank cap). Default 0.5.
        energy (float | None): svd_llm only, instead of keep_ratio: smallest rank keeping this share of the
            whitened σ².
        candidates (list[float]): cti: ``max_fraction`` values tried (trailing share of components whose
            positive σ-gradient marks them for removal); the lowest task loss wins. Default [0.25, 0.5, 0.75].
        samples (int): cti: calibration records in the gradient pass (≤ 100, the method's budget). Default 64.
    """

    method: Literal["none", "svd_llm", "cti"] = "none"
    kinds: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"])  # fmt: skip
    keep_ratio: float | None = 0.5
    energy: float | None = None
    candidates: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    samples: int = 64

    def __post_init__(self) -> None:
        validate_fields(self)
        check(bool(self.kinds), "low_rank.kinds", "must name at least one projection")
        if self.method == "svd_llm":
            check((self.keep_ratio is None) != (self.energy is None), "low_rank.keep_ratio",
                  "give exactly one of low_rank.keep_ratio or low_rank.energy (set the other to null)")  # fmt: skip
        if self.method == "cti":
            check(self.keep_ratio is not None, "low_rank.keep_ratio", "cti needs a rank cap for compression")
            check(self.energy is None, "low_rank.energy", "only applies to svd_llm")
            check(bool(self.candidates) and all(0 < c <= 1 for c in self.candidates), "low_rank.candidates",
                  f"must be a non-empty list of shares in (0, 1], got {self.candidates}")  # fmt: skip
            check(0 < self.samples <= 100, "low_rank.samples", f"must be in [1, 100], got {self.samples}")
        if self.keep_ratio is not None:
            check(0 < self.keep_ratio < 1, "low_rank.keep_ratio", f"must be in (0, 1), got {self.keep_ratio}")
        if self.energy is not None:
            check(0 < self.energy <= 1, "low_rank.energy", f"must be in (0, 1], got {self.energy}")


@dataclass
class PruneConfig:
    """Keys of ``recsys-slm prune``.

    Fields:
        model (str): the model directory to prune.
        out (Path | None): output directory (required).
        data_dir (Path | None): prepared data (calibration and validation prompts).
        prompt (PromptConfig): default: the prompt in the model's manifest.
        method (str): magnitude | activation | taylor | osscar (reconstruction-based selection with a
            least-squares refit of o_proj / down_proj, layer by layer). Default "activation".
        layers_keep (float): share of decoder blocks kept (the highest Block Influence), rounded up. Default 1.
        heads_keep (float): share of query heads kept per layer, rounded to a GQA-valid count. Default 0.5.
        head_mode (str): kv_groups | query_heads (see ``uniform_head_plan``). Default "query_heads".
        neurons_keep (float): share of MLP neurons kept per layer. Default 0.5.
        param_budget (float | None): share of the input's non-embedding parameters to keep; when set it replaces
            ``heads_keep``/``neurons_keep`` by the largest common share that fits (after ``layers_keep``).
        uniform (bool): the same widths in every layer (stock config). False: heads and neurons are chosen over all
            layers at once (per-layer standardised scores, FLAP) and the output is the registered model type
            unless ``uniformize`` is set. Default True.
        uniformize (str): none | pad | shrink: convert a non-uniform result to a stock directory (pad: exact,
            loses the savings of narrow layers; shrink: cut every layer to the narrowest, lossy). Default "none".
        low_rank (LowRankConfig): optional low-rank factorisation after width pruning (SVD-LLM or
            Compress-to-Impress); the output is then the registered compressed model type.
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
    method: Literal["magnitude", "activation", "taylor", "osscar"] = "activation"
    layers_keep: float = 1.0
    heads_keep: float = 0.5
    head_mode: Literal["kv_groups", "query_heads"] = "query_heads"
    neurons_keep: float = 0.5
    param_budget: float | None = None
    uniform: bool = True
    uniformize: Literal["none", "pad", "shrink"] = "none"
    low_rank: LowRankConfig = field(default_factory=LowRankConfig)
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
        if self.param_budget is not None:
            check(0 < self.param_budget < 1, "param_budget", f"must be in (0, 1), got {self.param_budget}")
        check(self.uniform or self.method != "osscar", "uniform",
              "osscar refits layer by layer with the same widths everywhere; use uniform=true")  # fmt: skip
        check(not self.uniform or self.uniformize == "none" or False, "uniformize",
              "only applies to non-uniform plans (uniform=false); a uniform plan is stock already")  # fmt: skip
        check(self.calibration_records > 0, "calibration_records", f"must be > 0, got {self.calibration_records}")
        check(self.eval_records >= 0, "eval_records", f"must be >= 0, got {self.eval_records}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")


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


def _importance(cfg: PruneConfig, model, calib, calib_frame, ranker, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads (L, n_heads), neurons (L, intermediate)) scores of ``cfg.method``."""
    from recsys_slm.prune.importance import activation_scores, magnitude_scores, taylor_scores

    if cfg.method == "magnitude":
        return magnitude_scores(model)
    if cfg.method == "activation":
        return activation_scores(model, calib, ranker.scorer.pad_id, cfg.batch_size)
    return taylor_scores(model, _label_batches(calib, calib_frame, ranker, cfg, device), _verbalizer_bce(ranker.scorer))


def _finish_structure(model, cfg: PruneConfig):
    """Uniform widths: write them into the stock config. Non-uniform: the registered compressed type, or a stock
    model again when ``cfg.uniformize`` asks for it."""
    from recsys_slm.models.compressed import needs_compressed, to_compressed, uniformize
    from recsys_slm.prune.structure import sync_config

    if cfg.uniformize != "none":
        return uniformize(model, mode=cfg.uniformize)
    if needs_compressed(model):
        return to_compressed(model)
    sync_config(model)
    return model


def _low_rank(cfg: PruneConfig, model, calib, calib_frame, ranker, device) -> dict[str, Any]:
    """Factor the ``cfg.low_rank.kinds`` projections in place; returns the method's report."""
    from recsys_slm.prune.low_rank import (
        CTICandidate,
        apply_low_rank,
        cti_select,
        input_grams,
        linear_targets,
        select_ranks,
    )

    lr = cfg.low_rank
    targets = linear_targets(model, lr.kinds)
    if lr.method == "svd_llm":
        grams = input_grams(model, targets, calib, ranker.scorer.pad_id, cfg.batch_size)
        ranks = select_ranks(targets, lr.keep_ratio, lr.energy, grams)
        report = apply_low_rank(model, ranks, grams)
        del grams
        return {"method": "svd_llm", **report}
    candidates = [CTICandidate(max_fraction=f, keep_ratio=lr.keep_ratio) for f in lr.candidates]
    batches = list(_label_batches(calib[: lr.samples], calib_frame.head(lr.samples), ranker, cfg, device))
    report = cti_select(model, targets, batches, _verbalizer_bce(ranker.scorer), candidates, max_samples=lr.samples)
    report.pop("ranking", None)  # one entry per matrix: kept in the trials' module lists instead
    return {"method": "cti", **report}


def prune(cfg: PruneConfig) -> dict[str, Any]:
    """Prune ``cfg.model`` and write ``cfg.out`` (weights, tokenizer, ``recsys_slm.json``) atomically."""
    import pandas as pd

    from recsys_slm.data.prompts import PromptRenderer
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.device import resolve_device
    from recsys_slm.distill.transfer_set import labelled_train_records
    from recsys_slm.evaluation.ranker_eval import resolve_prompt
    from recsys_slm.model_dir import atomic_dir, read_manifest, write_manifest
    from recsys_slm.models.layers import decoder_layers
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.prune.importance import uniform_head_plan, uniform_neuron_plan
    from recsys_slm.prune.plan import budget_widths, global_plan, uniform_counts
    from recsys_slm.prune.structure import (
        attention_widths,
        check_prunable,
        layer_widths,
        non_embedding_params,
        prune_attention_heads,
        prune_mlp_neurons,
        sync_config,
    )
    from recsys_slm.ranker.batching import encode_records
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    device = resolve_device(cfg.device)
    data_dir = data_dir_or_default(cfg.data_dir)
    manifest = read_manifest(cfg.model) if Path(cfg.model).expanduser().is_dir() else None
    prompt, _ = resolve_prompt(cfg.prompt, manifest)
    model, tokenizer = load_causal_lm(cfg.model, device=device, dtype=torch.float32)
    model.eval()
    check_prunable(model)
    log = InteractionLog.load(data_dir)
    ranker = Ranker(model, tokenizer, PromptRenderer(prompt, tokenizer, log.items, log.users),
                    RankerConfig(cfg.batch_size, False, prompt))  # fmt: skip
    calib_frame, _ = labelled_train_records(data_dir, cfg.calibration_records, cfg.seed)
    calib = encode_records(calib_frame, ranker.renderer, ranker.encode).sequences
    val = None
    if cfg.eval_records:
        val_frame = pd.read_parquet(Path(data_dir) / "tasks" / "pointwise" / "val.parquet").head(cfg.eval_records)
        val = encode_records(val_frame, ranker.renderer, ranker.encode)
    before = {"non_embedding_params": non_embedding_params(model), "widths": [w.__dict__ for w in layer_widths(model)]}
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
    _, kv, _ = attention_widths(decoder_layers(model)[0].self_attn)
    share = None
    if cfg.param_budget is not None:
        share, keep_heads, _, keep_neurons = budget_widths(model, int(cfg.param_budget * before["non_embedding_params"]),
                                                           cfg.head_mode)  # fmt: skip
    else:
        keep_heads, _, keep_neurons = uniform_counts(model, cfg.heads_keep, cfg.neurons_keep, cfg.head_mode)
    osscar_report = None
    if cfg.method == "osscar":
        from recsys_slm.prune.osscar import osscar_prune

        osscar_report = osscar_prune(model, calib, ranker.scorer.pad_id, cfg.batch_size, keep_heads, keep_neurons,
                                     head_mode=cfg.head_mode)  # fmt: skip
        head_plan = [sorted(int(h) for h in row["kept_heads"]) for row in osscar_report["layers"]]
    else:
        head_scores, neuron_scores = _importance(cfg, model, calib, calib_frame, ranker, device)
        if cfg.uniform:
            head_plan = uniform_head_plan(head_scores, kv, keep_heads, cfg.head_mode)
            neuron_plan = uniform_neuron_plan(neuron_scores, keep_neurons)
        else:
            n_layers = len(decoder_layers(model))
            head_plan, neuron_plan = global_plan(head_scores, neuron_scores, kv, keep_heads * n_layers,
                                                 keep_neurons * n_layers, cfg.head_mode)  # fmt: skip
        for layer, h_keep, n_keep in zip(decoder_layers(model), head_plan, neuron_plan, strict=True):
            prune_attention_heads(layer.self_attn, h_keep)
            prune_mlp_neurons(layer.mlp, n_keep)
    low_rank_report = None
    if cfg.low_rank.method != "none":
        if cfg.uniform:
            sync_config(model)  # uniform widths go into the config; the factors make it the registered type below
        low_rank_report = _low_rank(cfg, model, calib, calib_frame, ranker, device)
    model = _finish_structure(model, cfg)
    ranker = Ranker(model, tokenizer, ranker.renderer, RankerConfig(cfg.batch_size, False, prompt))
    after = {"non_embedding_params": non_embedding_params(model), "widths": [w.__dict__ for w in layer_widths(model)]}
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
        "kept_neurons_per_layer": [w["intermediate"] for w in after["widths"]],
        "keep_share": share,
        "model_type": model.config.model_type,
        "osscar": osscar_report,
        "low_rank": low_rank_report,
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
