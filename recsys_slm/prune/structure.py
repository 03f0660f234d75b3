"""Structural operators that physically shrink a decoder LM: attention heads (GQA-aware) and MLP neurons.

Each operator slices the weight tensors (smaller matrices, fewer parameters, a faster forward; never zero
masks, Wanda's failure) and updates the module attributes the forward reads. Whole layers are removed by
:func:`recsys_slm.distill.student.keep_layers`. When every layer ends with the same widths, :func:`sync_config`
writes them into the config, so ``save_pretrained`` gives a directory that stock
``AutoModelForCausalLM.from_pretrained`` loads without recsys_slm. Non-uniform widths cannot be expressed by
the stock config (one ``num_attention_heads`` / ``intermediate_size`` for all layers); :func:`layer_widths`
reports them and :func:`sync_config` refuses, naming the layers that differ.

Architectures: Llama-style attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; optional q/k/v biases as
in Qwen2) and gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``): Llama, SmolLM2, Qwen2, Mistral.

GQA: query head h reads KV head ``h // g`` with ``g = n_heads / n_kv`` queries per group. A valid pruning keeps
whole KV groups, and the same number of query heads inside every kept group, so the module still maps query
heads to KV heads by integer division (Torch-Pruning#495 broke exactly this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from recsys_slm.models.layers import decoder_layers


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one decoder layer: query heads, KV heads, head dim, MLP neurons."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``index`` along ``dim`` of the weight (0 = output rows, 1 = input columns)."""
    weight = linear.weight.data.index_select(dim, index.to(linear.weight.device)).clone()
    bias = None
    if linear.bias is not None:
        bias = linear.bias.data.index_select(0, index.to(linear.bias.device)).clone() if dim == 0 else linear.bias.data.clone()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out


def attention_widths(attn: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a Llama-style attention module, read from its weights."""
    head_dim = attn.head_dim
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim


def check_supported(model: nn.Module) -> None:
    """Raise ValueError naming the architecture unless every layer has Llama-style attention and a gated MLP."""
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [name for name, ok in (
            ("self_attn.q_proj/k_proj/v_proj/o_proj", attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))),
            ("mlp.gate_proj/up_proj/down_proj", mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))),
        ) if not ok]  # fmt: skip
        if missing:
            raise ValueError(
                f"{type(model).__name__} is not supported by the pruning operators: layer {i} has no "
                f"{' and no '.join(missing)} (Llama, SmolLM2, Qwen2 and Mistral are)"
            )


def check_prunable(model: nn.Module) -> None:
    """:func:`check_supported`, plus: no low-rank factors and uniform widths (what width pruning starts from)."""
    check_supported(model)
    for i, layer in enumerate(decoder_layers(model)):
        factored = [n for n, m in layer.named_modules() if type(m).__name__ == "LowRankLinear"]
        if factored:
            raise ValueError(f"layer {i} has low-rank factored projections ({', '.join(factored)}): prune widths "
                             "before factoring, or uniformize the model first")  # fmt: skip
    widths = {(w.heads, w.kv_heads, w.intermediate) for w in layer_widths(model)}
    if len(widths) > 1:
        raise ValueError(f"the layers have different widths {sorted(widths)} (heads, kv heads, neurons): pruning "
                         "starts from uniform widths; uniformize the model first")  # fmt: skip


def layer_widths(model: nn.Module) -> list[LayerWidths]:
    """Per decoder layer widths (from the tensors, not the config)."""
    out = []
    for layer in decoder_layers(model):
        heads, kv, hd = attention_widths(layer.self_attn)
        out.append(LayerWidths(heads, kv, hd, layer.mlp.gate_proj.out_features))
    return out


def check_gqa_keep(keep_heads: Sequence[int], heads: int, kv_heads: int) -> tuple[list[int], int]:
    """Validate a set of kept query heads against GQA; returns (kept KV groups, queries per kept group).

    Raises:
        ValueError: out-of-range or duplicate heads, nothing kept, or groups keeping different numbers of
            query heads (the message lists the counts per group).
    """
    keep = sorted(int(h) for h in keep_heads)
    if not keep:
        raise ValueError("cannot remove every attention head of a layer (remove the layer instead)")
    if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= heads:
        raise ValueError(f"kept heads must be distinct indices in [0, {heads}), got {keep}")
    group = heads // kv_heads
    per_group: dict[int, int] = {}
    for h in keep:
        per_group[h // group] = per_group.get(h // group, 0) + 1
    counts = set(per_group.values())
    if len(counts) != 1:
        raise ValueError(
            f"GQA needs the same number of query heads in every kept KV group; got {per_group} "
            f"(group: query heads kept, {group} queries per group)"
        )
    return sorted(per_group), counts.pop()


def prune_attention_heads(attn: nn.Module, keep_heads: Sequence[int]) -> None:
    """Keep the query heads ``keep_heads`` (and the KV heads they read) of one attention module, in place.

    q_proj rows and o_proj columns of removed query heads go, k_proj/v_proj rows of KV groups with no kept query
    head go; ``num_key_value_groups`` is updated (the forward repeats each KV head that many times).
    """
    heads, kv_heads, hd = attention_widths(attn)
    groups, per_group = check_gqa_keep(keep_heads, heads, kv_heads)
    q_idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in sorted(keep_heads)])
    kv_idx = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
    attn.q_proj = _slice_linear(attn.q_proj, q_idx, 0)
    attn.k_proj = _slice_linear(attn.k_proj, kv_idx, 0)
    attn.v_proj = _slice_linear(attn.v_proj, kv_idx, 0)
    attn.o_proj = _slice_linear(attn.o_proj, q_idx, 1)
    attn.num_key_value_groups = per_group
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, len(groups) * per_group)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(groups)


def prune_mlp_neurons(mlp: nn.Module, keep: Sequence[int]) -> None:
    """Keep the intermediate neurons ``keep`` of a gated MLP, in place (gate/up rows and down columns together)."""
    index = torch.as_tensor(sorted(int(i) for i in keep), dtype=torch.long)
    width = mlp.gate_proj.out_features
    if len(index) == 0 or len(set(index.tolist())) != len(index) or int(index[0]) < 0 or int(index[-1]) >= width:
        raise ValueError(f"kept neurons must be distinct indices in [0, {width}) and at least one, got {len(index)}")
    mlp.gate_proj = _slice_linear(mlp.gate_proj, index, 0)
    mlp.up_proj = _slice_linear(mlp.up_proj, index, 0)
    mlp.down_proj = _slice_linear(mlp.down_proj, index, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(index)


def sync_config(model: nn.Module) -> LayerWidths:
    """Write the (uniform) layer widths into ``model.config`` so ``save_pretrained`` round-trips with stock classes.

    Sets ``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim`` (stock configs otherwise derive
    it as ``hidden_size // num_attention_heads``, which changes once heads are removed), ``intermediate_size`` and
    ``num_hidden_layers``.

    Raises:
        ValueError: the layers' widths differ (non-uniform pruning); the message lists the distinct widths.
    """
    widths = layer_widths(model)
    distinct = sorted(set(widths), key=str)
    if len(distinct) != 1:
        by = {str(w): [i for i, x in enumerate(widths) if x == w] for w in distinct}
        raise ValueError(f"layers have different widths, which a stock config cannot express: {by}")
    w = distinct[0]
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None)
    if hidden is not None and hidden % w.heads:
        ok = [k for k in range(w.kv_heads, hidden + 1, w.kv_heads) if hidden % k == 0 and k <= 4 * w.heads]
        raise ValueError(f"{w.heads} query heads: stock configs need hidden_size ({hidden}) divisible by "
                         f"num_attention_heads; keep one of {ok} per layer, or save as the registered compressed type")  # fmt: skip
    cfg.num_attention_heads = w.heads
    cfg.num_key_value_heads = w.kv_heads
    cfg.head_dim = w.head_dim
    cfg.intermediate_size = w.intermediate
    cfg.num_hidden_layers = len(widths)
    return w


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token/position embeddings and the output head (the count pruning targets)."""
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        skip |= {id(p) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
