"""Pruning plans: how many heads and neurons each layer keeps, from ratios or a parameter budget.

* **Uniform** plans keep the same widths in every layer (a stock config expresses them).
  :func:`budget_widths` turns a total non-embedding parameter budget into the largest uniform keep share that fits,
  counting parameters from the tensors (per query head, per KV head, per neuron), so biases (Qwen2) and GQA are
  exact.
* **Non-uniform** plans (:func:`global_plan`) let important layers keep more: scores are standardised per layer
  (zero mean, unit variance, as FLAP does to make layers comparable; An et al. 2024, arXiv 2312.11983) and the
  best units are chosen globally under the same total. The result needs the registered model type
  (:mod:`recsys_slm.models.compressed`) or ``uniformize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from recsys_slm.models.layers import decoder_layers
from recsys_slm.prune.structure import attention_widths, non_embedding_params

HeadMode = Literal["kv_groups", "query_heads"]


@dataclass(frozen=True)
class UnitParams:
    """Parameters one unit of structure costs in a layer (weights + biases)."""

    per_query_head: int  # q_proj rows (+ bias) and o_proj columns of one query head
    per_kv_head: int  # k_proj and v_proj rows (+ biases) of one KV head
    per_neuron: int  # gate row, up row, down column (+ biases)


def unit_params(layer: nn.Module) -> UnitParams:
    """Measure :class:`UnitParams` of a Llama-style decoder layer from its tensors."""
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv, hd = attention_widths(attn)

    def rows(linear: nn.Linear, units: int) -> int:
        n = linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)
        return n // units

    per_q = rows(attn.q_proj, heads) + attn.o_proj.weight.numel() // heads
    per_kv = rows(attn.k_proj, kv) + rows(attn.v_proj, kv)
    width = mlp.gate_proj.out_features
    per_n = rows(mlp.gate_proj, width) + rows(mlp.up_proj, width) + mlp.down_proj.weight.numel() // width
    return UnitParams(per_q, per_kv, per_n)


def predict_non_embedding(model: nn.Module, keep_heads: int, keep_kv: int, keep_neurons: int) -> int:
    """Non-embedding parameters after keeping ``keep_heads`` query heads, ``keep_kv`` KV heads and
    ``keep_neurons`` neurons in every layer (exact for the operators in :mod:`recsys_slm.prune.structure`)."""
    total = non_embedding_params(model)
    for layer in decoder_layers(model):
        u = unit_params(layer)
        heads, kv, _ = attention_widths(layer.self_attn)
        width = layer.mlp.gate_proj.out_features
        total -= u.per_query_head * (heads - keep_heads) + u.per_kv_head * (kv - keep_kv)
        total -= u.per_neuron * (width - keep_neurons)
    return total


def uniform_counts(model: nn.Module, heads_keep: float, neurons_keep: float, head_mode: HeadMode) -> tuple[int, int, int]:
    """(query heads, KV heads, neurons) kept per layer for keep shares; heads go to the nearest count that is
    GQA-valid (a multiple of the unit ``head_mode`` removes) and divides ``hidden_size`` (a stock config needs it)."""
    heads, kv, _ = attention_widths(decoder_layers(model)[0].self_attn)
    width = decoder_layers(model)[0].mlp.gate_proj.out_features
    unit = heads // kv if head_mode == "kv_groups" else kv
    hidden = decoder_layers(model)[0].self_attn.o_proj.out_features
    # stock configs (transformers 5) refuse hidden_size % num_attention_heads != 0 even with an explicit head_dim
    valid = [k for k in range(unit, heads + 1, unit) if hidden % k == 0] or [heads]
    keep_heads = min(valid, key=lambda k: (abs(k - heads_keep * heads), -k))
    keep_kv = keep_heads // (heads // kv) if head_mode == "kv_groups" else kv
    return keep_heads, keep_kv, max(1, int(round(neurons_keep * width)))


def budget_widths(model: nn.Module, budget: int, head_mode: HeadMode, step: float = 0.005) -> tuple[float, int, int, int]:
    """The largest share ``s`` (heads and neurons both kept at ``s``) whose uniform plan has ≤ ``budget``
    non-embedding parameters.

    Returns:
        tuple: (share, query heads, KV heads, neurons) per layer.

    Raises:
        ValueError: even the narrowest plan (one GQA unit of heads, one neuron) exceeds ``budget``; the message
            gives the smallest reachable count.
    """
    share = 1.0
    while share > 0:
        counts = uniform_counts(model, share, share, head_mode)
        if predict_non_embedding(model, *counts) <= budget:
            return round(share, 4), *counts
        share -= step
    smallest = predict_non_embedding(model, *uniform_counts(model, 1e-9, 1e-9, head_mode))
    raise ValueError(f"param_budget: {budget:,} non-embedding parameters cannot be reached by width pruning "
                     f"(the narrowest uniform plan has {smallest:,}); lower layers_keep too")  # fmt: skip


def _standardise(scores: torch.Tensor) -> torch.Tensor:
    """Per-row (per layer) zero mean, unit variance (FLAP's cross-layer normalisation)."""
    scores = scores.double()
    return (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp(min=1e-12)


def global_plan(head_scores: torch.Tensor, neuron_scores: torch.Tensor, kv_heads: int, total_heads: int,
                total_neurons: int, head_mode: HeadMode) -> tuple[list[list[int]], list[list[int]]]:  # fmt: skip
    """Non-uniform plan: the best ``total_heads`` heads and ``total_neurons`` neurons over all layers.

    Heads are chosen in GQA units (a whole KV group for ``kv_groups``; one query head from *every* group of a layer
    for ``query_heads``, scored by the unit's mean standardised score), so every layer stays GQA-valid; each layer
    keeps at least one unit and one neuron.

    Args:
        head_scores (torch.Tensor): (L, n_heads) importance.
        neuron_scores (torch.Tensor): (L, intermediate) importance.
        kv_heads (int): KV heads per layer.
        total_heads (int): query heads kept over all layers (rounded down to whole units).
        total_neurons (int): neurons kept over all layers.
        head_mode (str): kv_groups | query_heads.

    Returns:
        tuple: kept query heads per layer, kept neurons per layer (sorted indices).
    """
    layers, n = head_scores.shape
    group = n // kv_heads
    z = _standardise(head_scores).reshape(layers, kv_heads, group)
    units: list[tuple[float, int, list[int]]] = []  # (score, layer, heads)
    for i in range(layers):
        if head_mode == "kv_groups":
            units += [(float(z[i, g].mean()), i, [g * group + j for j in range(group)]) for g in range(kv_heads)]
        else:
            # rank r = the r-th best query head of every group: units must be taken in rank order per layer
            order = z[i].argsort(dim=1, descending=True)  # (kv, group)
            for r in range(group):
                heads = [g * group + int(order[g, r]) for g in range(kv_heads)]
                units.append((float(z[i].gather(1, order[:, r : r + 1]).mean()), i, heads))
    unit_size = group if head_mode == "kv_groups" else kv_heads
    budget_units = max(layers, total_heads // unit_size)
    kept: list[list[int]] = [[] for _ in range(layers)]
    taken = 0
    # every layer first keeps its best unit (a layer needs one head), then the best remaining units globally;
    # query_heads units of one layer are in decreasing rank order already, so taking them by score keeps ranks
    # contiguous per layer (the r-th unit is never taken before the (r-1)-th, whose mean score is higher)
    by_layer = [[u for u in units if u[1] == i] for i in range(layers)]
    for i in range(layers):
        best = max(by_layer[i], key=lambda u: u[0])
        kept[i] += best[2]
        units.remove(best)
        taken += 1
    for _score, i, heads in sorted(units, key=lambda u: -u[0]):
        if taken >= budget_units:
            break
        kept[i] += heads
        taken += 1
    zn = _standardise(neuron_scores)
    flat = zn.flatten()
    keep_mask = torch.zeros_like(flat, dtype=torch.bool)
    keep_mask[zn.argmax(1) + torch.arange(layers) * zn.shape[1]] = True
    remaining = max(0, total_neurons - layers)
    order = flat.masked_fill(keep_mask, float("-inf")).argsort(descending=True)[:remaining]
    keep_mask[order] = True
    neurons = [sorted(torch.nonzero(row).flatten().tolist()) for row in keep_mask.reshape(layers, -1)]
    return [sorted(k) for k in kept], neurons
