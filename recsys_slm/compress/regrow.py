"""Regrowth: re-add a share of the attention heads and MLP neurons that pruning removed, without changing the
model's function, so re-distillation can trade a little size for quality.

``regrow(model, fraction, donor=...)`` widens every decoder layer in place:

* **heads**: ``round(fraction × removed / kv_heads)`` new query heads in *every* KV group (GQA-valid: the same
  number per group, so query head h still reads KV head ``h // group``), capped so no layer exceeds the original
  head count. A new head's ``q_proj`` rows (and q bias) come from a removed head of the same KV group in ``donor``
  (``init="copy"``, highest ``‖W_q‖·‖W_o‖`` first) or are drawn at random (``init="random"``, or when the group has
  no removed head left); its ``o_proj`` **columns are zero**, so the layer's output is unchanged. No KV heads are
  added (k/v rows stay as they are).
* **neurons**: ``round(fraction × removed)`` new MLP neurons; ``gate_proj``/``up_proj`` rows copied from the
  donor's removed neurons (highest ``‖gate_i‖·‖up_i‖·‖down_{:,i}‖`` first) or random; ``down_proj`` **columns
  zero**.

At the start the regrown model computes the pruned model's function (the zero columns add exact zeros; only the
float accumulation order of the wider matmuls changes: 0 on the tiny test models, ~4e-5 on SmolLM2 logits);
the gradient reaches the zero columns at once (their inputs are non-zero), so training grows them.

Removed units are found by matching weights: pruning slices rows out of the donor (the model it was pruned from),
so every kept head / neuron equals one donor row bit for bit. The donor must have the same layers as the model
(after any layer removal: pass the donor with the same blocks kept). Without a donor, give the original widths
(``original_heads``, ``original_intermediate``) and the new rows are random.

Uniform widths are written into the config with :func:`recsys_slm.prune.structure.sync_config`
(``num_attention_heads``, explicit ``head_dim``, ``intermediate_size``), so ``save_pretrained`` stays stock-loadable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from recsys_slm.models.layers import decoder_layers
from recsys_slm.prune.structure import attention_widths, check_supported, layer_widths, sync_config


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def regrow_counts(heads: int, kv_heads: int, intermediate: int, original_heads: int, original_intermediate: int,
                  fraction: float) -> tuple[int, int]:  # fmt: skip
    """(query heads added per KV group, neurons added) for one layer.

    Heads: ``round(fraction × (original − current) / kv_heads)`` per group, at most ``(original − current) //
    kv_heads`` (never more heads than the original layer had). Neurons: ``round(fraction × (original − current))``.
    """
    removed_heads = max(0, original_heads - heads)
    per_group = min(removed_heads // kv_heads, _round_half_up(fraction * removed_heads / kv_heads))
    neurons = _round_half_up(fraction * max(0, original_intermediate - intermediate))
    return per_group, neurons


def _blocks(weight: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split rows into consecutive blocks of ``size`` rows."""
    return list(weight.split(size, dim=0))


def _key(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().numpy().tobytes()


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _random_rows(n: int, like: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    rows = torch.randn(n, like.shape[1], generator=generator, dtype=torch.float32) * std
    return rows.to(device=like.device, dtype=like.dtype)


def _regrow_attention(attn: nn.Module, per_group: int, donor_attn: nn.Module | None, init: str, std: float | None,
                      generator: torch.Generator) -> dict[str, int]:  # fmt: skip
    heads, kv, hd = attention_widths(attn)
    g = heads // kv
    if per_group == 0:
        return {"added": 0, "copied": 0, "random": 0}
    q_w, o_w = attn.q_proj.weight.data, attn.o_proj.weight.data  # (H·hd, D), (D, H·hd)
    q_b = attn.q_proj.bias.data if attn.q_proj.bias is not None else None
    q_blocks = _blocks(q_w, hd)
    qb_blocks = _blocks(q_b, hd) if q_b is not None else None
    o_cols = list(o_w.split(hd, dim=1))
    k_blocks = _blocks(attn.k_proj.weight.data, hd)
    # Donor heads of each model KV group that the model no longer has, best first.
    candidates: list[list[int]] = [[] for _ in range(kv)]
    if donor_attn is not None and init == "copy":
        d_heads, d_kv, d_hd = attention_widths(donor_attn)
        if d_hd != hd:
            raise ValueError(f"donor head_dim {d_hd} differs from the model's {hd}")
        d_g = d_heads // d_kv
        d_q = _blocks(donor_attn.q_proj.weight.data, hd)
        d_o = list(donor_attn.o_proj.weight.data.split(hd, dim=1))
        d_k = {_key(b): j for j, b in enumerate(_blocks(donor_attn.k_proj.weight.data, hd))}
        present = {_key(b) for b in q_blocks}
        for j in range(kv):
            dj = d_k.get(_key(k_blocks[j]))
            if dj is None:
                continue  # the group's keys changed (the model was trained after pruning): random rows
            removed = [h for h in range(dj * d_g, (dj + 1) * d_g) if _key(d_q[h]) not in present]
            removed.sort(key=lambda h: -float(d_q[h].float().norm() * d_o[h].float().norm()))
            candidates[j] = removed
    if std is None:
        std = float(q_w.float().std())
    new_q, new_qb, new_o = [], [], []
    copied = drawn = 0
    for j in range(kv):
        for h in range(j * g, (j + 1) * g):
            new_q.append(q_blocks[h])
            new_o.append(o_cols[h])
            if qb_blocks is not None:
                new_qb.append(qb_blocks[h])
        for i in range(per_group):
            if i < len(candidates[j]):
                dh = candidates[j][i]
                new_q.append(_blocks(donor_attn.q_proj.weight.data, hd)[dh].to(q_w))
                if qb_blocks is not None:
                    d_b = donor_attn.q_proj.bias
                    new_qb.append(_blocks(d_b.data, hd)[dh].to(q_b) if d_b is not None else torch.zeros_like(qb_blocks[0]))
                copied += 1
            else:
                new_q.append(_random_rows(hd, q_w, std, generator))
                if qb_blocks is not None:
                    new_qb.append(torch.zeros_like(qb_blocks[0]))
                drawn += 1
            new_o.append(torch.zeros_like(o_cols[0]))
    attn.q_proj = _new_linear(torch.cat(new_q), torch.cat(new_qb) if qb_blocks is not None else None)
    o_bias = attn.o_proj.bias.data if attn.o_proj.bias is not None else None
    attn.o_proj = _new_linear(torch.cat(new_o, dim=1), o_bias)
    attn.num_key_value_groups = g + per_group
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, kv * (g + per_group))
    return {"added": kv * per_group, "copied": copied, "random": drawn}


def _regrow_mlp(mlp: nn.Module, n_new: int, donor_mlp: nn.Module | None, init: str, std: float | None,
                generator: torch.Generator) -> dict[str, int]:  # fmt: skip
    if n_new == 0:
        return {"added": 0, "copied": 0, "random": 0}
    gate, up, down = mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data
    chosen: list[int] = []
    if donor_mlp is not None and init == "copy":
        present = {_key(r) for r in gate}
        d_gate, d_up, d_down = (donor_mlp.gate_proj.weight.data, donor_mlp.up_proj.weight.data,
                                donor_mlp.down_proj.weight.data)  # fmt: skip
        removed = [i for i in range(d_gate.shape[0]) if _key(d_gate[i]) not in present]
        score = d_gate.float().norm(dim=1) * d_up.float().norm(dim=1) * d_down.float().norm(dim=0)
        removed.sort(key=lambda i: -float(score[i]))
        chosen = removed[:n_new]
    n_random = n_new - len(chosen)
    rows: dict[str, list[torch.Tensor]] = {"gate_proj": [], "up_proj": []}
    for name, weight in (("gate_proj", gate), ("up_proj", up)):
        if chosen:
            idx = torch.as_tensor(chosen, dtype=torch.long, device=getattr(donor_mlp, name).weight.device)
            rows[name].append(getattr(donor_mlp, name).weight.data.index_select(0, idx).to(weight))
        if n_random:
            rows[name].append(_random_rows(n_random, weight, std if std is not None else float(weight.float().std()),
                                           generator))  # fmt: skip
    for name, weight in (("gate_proj", gate), ("up_proj", up)):
        linear = getattr(mlp, name)
        bias = None
        if linear.bias is not None:
            extra = torch.zeros(n_new, dtype=linear.bias.dtype, device=linear.bias.device)
            if chosen and getattr(donor_mlp, name).bias is not None:
                idx = torch.as_tensor(chosen, dtype=torch.long, device=linear.bias.device)
                extra[: len(chosen)] = getattr(donor_mlp, name).bias.data.index_select(0, idx).to(extra)
            bias = torch.cat([linear.bias.data, extra])
        setattr(mlp, name, _new_linear(torch.cat([weight, *rows[name]]), bias))
    zeros = torch.zeros(down.shape[0], n_new, dtype=down.dtype, device=down.device)
    d_bias = mlp.down_proj.bias.data if mlp.down_proj.bias is not None else None
    mlp.down_proj = _new_linear(torch.cat([down, zeros], dim=1), d_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = mlp.gate_proj.out_features
    return {"added": n_new, "copied": len(chosen), "random": n_random}


@torch.no_grad()
def regrow(
    model: nn.Module,
    fraction: float,
    *,
    donor: nn.Module | None = None,
    original_heads: int | None = None,
    original_intermediate: int | None = None,
    init: Literal["copy", "random"] = "copy",
    init_std: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Re-add ``fraction`` of the removed query heads and MLP neurons to every layer, in place (module docstring).

    Args:
        model: a pruned Llama-style causal LM (uniform widths).
        fraction (float): share of the removed units to re-add, in [0, 1]; 0 changes nothing.
        donor: the model it was pruned from, with the same decoder layers (source of the original widths and, with
            ``init="copy"``, of the new units' input rows).
        original_heads / original_intermediate (int | None): the original widths when there is no donor.
        init (str): "copy" (donor rows where available, else random) or "random".
        init_std (float | None): std of random rows; None = the std of the layer's existing q / gate / up weights.
        seed (int): seed of the random rows (a local generator; the global RNG is untouched).

    Returns:
        dict: ``heads_added_per_layer``, ``neurons_added_per_layer``, ``params_added``, ``widths_before``,
        ``widths_after``, counts of copied and random heads / neurons, ``fraction``, ``init``.

    Raises:
        ValueError: fraction outside [0, 1]; no donor and no original widths; a donor with other layers; an
            unsupported architecture or non-uniform widths.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    check_supported(model)
    layers: Sequence[nn.Module] = decoder_layers(model)
    widths = layer_widths(model)
    if len(set(widths)) != 1:
        raise ValueError(f"regrow needs uniform layer widths; got {sorted({str(w) for w in widths})}")
    donor_layers = None
    if donor is not None:
        check_supported(donor)
        donor_layers = decoder_layers(donor)
        if len(donor_layers) != len(layers):
            raise ValueError(
                f"the donor has {len(donor_layers)} decoder layers and the model {len(layers)}; pass the donor "
                "with the same blocks kept (recsys_slm.distill.student.keep_layers)"
            )
        d_widths = layer_widths(donor)
        original_heads = original_heads if original_heads is not None else d_widths[0].heads
        original_intermediate = original_intermediate if original_intermediate is not None else d_widths[0].intermediate
    if original_heads is None or original_intermediate is None:
        raise ValueError("regrow needs the original widths: pass donor= or original_heads= and original_intermediate=")
    before = widths[0]
    per_group, n_neurons = regrow_counts(before.heads, before.kv_heads, before.intermediate, original_heads,
                                         original_intermediate, fraction)  # fmt: skip
    params_before = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(seed)
    totals = {"heads_copied": 0, "heads_random": 0, "neurons_copied": 0, "neurons_random": 0}
    for i, layer in enumerate(layers):
        d_layer = donor_layers[i] if donor_layers is not None else None
        a = _regrow_attention(layer.self_attn, per_group, d_layer.self_attn if d_layer is not None else None, init,
                              init_std, generator)  # fmt: skip
        m = _regrow_mlp(layer.mlp, n_neurons, d_layer.mlp if d_layer is not None else None, init, init_std, generator)
        totals["heads_copied"] += a["copied"]
        totals["heads_random"] += a["random"]
        totals["neurons_copied"] += m["copied"]
        totals["neurons_random"] += m["random"]
    after = sync_config(model)
    return {
        "fraction": fraction,
        "init": init,
        "heads_added_per_layer": before.kv_heads * per_group,
        "neurons_added_per_layer": n_neurons,
        "params_added": sum(p.numel() for p in model.parameters()) - params_before,
        "widths_before": before.__dict__,
        "widths_after": after.__dict__,
        "original": {"heads": original_heads, "intermediate": original_intermediate},
        **totals,
    }
