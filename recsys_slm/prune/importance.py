"""Importance of attention heads and MLP neurons, and GQA-valid uniform keep plans.

* **magnitude**: head h: ``‖[W_q rows of h ; W_o columns of h]‖_F``; neuron i: ``‖[gate_i ; up_i ; down_{:,i}]‖_2``.
* **activation** (Minitron, Muralidharan et al. 2024, arXiv 2407.14679): run calibration prompts and read the
  input of ``o_proj`` (per head: the L2 norm of its head_dim slice) and of ``down_proj`` (per neuron: ``|x|``) at
  every real token; aggregate **mean over the sequence, then L2 over the batch**:
  ``F(u) = sqrt(Σ_b (mean_{s ∈ tokens_b} a_{b,s,u})²)``.

Scores are per layer: ``heads (L, n_heads)``, ``neurons (L, intermediate)``. :func:`uniform_head_plan` and
:func:`uniform_neuron_plan` turn them into the same widths in every layer (what a stock config can express).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from recsys_slm.models.layers import decoder_layers
from recsys_slm.prune.structure import attention_widths


def magnitude_scores(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads (L, n_heads), neurons (L, intermediate)) weight-norm importance (see the module docstring)."""
    heads, neurons = [], []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        n, _, hd = attention_widths(attn)
        q = attn.q_proj.weight.detach().float().reshape(n, hd, -1)  # (n, hd, H)
        o = attn.o_proj.weight.detach().float().reshape(-1, n, hd).transpose(0, 1)  # (n, H, hd)
        heads.append((q.pow(2).sum((1, 2)) + o.pow(2).sum((1, 2))).sqrt())
        gate, up = mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float()
        down = mlp.down_proj.weight.detach().float()
        neurons.append((gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt())
    return torch.stack(heads), torch.stack(neurons)


@torch.no_grad()
def activation_scores(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int,
                      batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Minitron activation importance over calibration ``sequences`` (token-id lists; real tokens only).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: heads (L, n_heads) and neurons (L, intermediate), float64.
    """
    from recsys_slm.models.calibration import calibration_forward

    layers = decoder_layers(model)
    per_row_heads: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer: (B, n_heads) sequence means
    per_row_neurons: list[list[torch.Tensor]] = [[] for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def hooks(i: int):
        n, _, hd = attention_widths(layers[i].self_attn)

        def o_in(module, args):
            x = args[0].float()  # (B, S, n·hd)
            norms = x.reshape(*x.shape[:2], n, hd).norm(dim=-1)  # (B, S, n)
            per_row_heads[i].append(_seq_mean(norms, state["mask"]))

        def down_in(module, args):
            per_row_neurons[i].append(_seq_mean(args[0].float().abs(), state["mask"]))

        return o_in, down_in

    handles = []
    for i, layer in enumerate(layers):
        o_hook, d_hook = hooks(i)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(d_hook))
    calibration_forward(model, sequences, pad_id, batch_size, handles,
                        lambda mask: state.__setitem__("mask", mask.double()))  # fmt: skip
    heads = torch.stack([torch.cat(rows).pow(2).sum(0).sqrt() for rows in per_row_heads])
    neurons = torch.stack([torch.cat(rows).pow(2).sum(0).sqrt() for rows in per_row_neurons])
    return heads, neurons


def _seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, U) values, (B, S) mask → (B, U) mean over each row's real tokens (float64)."""
    values = values.double() * mask[..., None]
    return values.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def uniform_neuron_plan(scores: torch.Tensor, keep: int) -> list[list[int]]:
    """The ``keep`` highest-scoring neurons of every layer (sorted indices per layer)."""
    if not 0 < keep <= scores.shape[1]:
        raise ValueError(f"keep must be in [1, {scores.shape[1]}], got {keep}")
    return [sorted(row.topk(keep).indices.tolist()) for row in scores]


def uniform_head_plan(scores: torch.Tensor, kv_heads: int, keep_heads: int,
                      mode: Literal["kv_groups", "query_heads"] = "kv_groups") -> list[list[int]]:  # fmt: skip
    """GQA-valid kept query heads per layer, the same count in every layer.

    Args:
        scores (torch.Tensor): (L, n_heads) head importance.
        kv_heads (int): KV heads per layer (groups of ``n_heads / kv_heads`` query heads).
        keep_heads (int): query heads to keep per layer.
        mode (str): "kv_groups": keep the ``keep_heads / g`` groups with the highest summed score (removes KV
            heads too: smaller KV cache); "query_heads": keep the ``keep_heads / kv_heads`` best query heads inside
            every group (KV heads stay).

    Raises:
        ValueError: ``keep_heads`` is not a multiple of what ``mode`` removes in one unit.
    """
    n = scores.shape[1]
    group = n // kv_heads
    plans = []
    for row in scores:
        if mode == "kv_groups":
            if keep_heads % group or not 0 < keep_heads <= n:
                raise ValueError(f"kv_groups keeps whole groups of {group} query heads: keep_heads must be a multiple of {group} in [{group}, {n}], got {keep_heads}")
            sums = row.reshape(kv_heads, group).sum(1)
            groups = sorted(sums.topk(keep_heads // group).indices.tolist())
            plans.append([g * group + j for g in groups for j in range(group)])
        else:
            if keep_heads % kv_heads or not 0 < keep_heads <= n:
                raise ValueError(f"query_heads keeps the same count in each of {kv_heads} groups: keep_heads must be a multiple of {kv_heads} in [{kv_heads}, {n}], got {keep_heads}")
            per = keep_heads // kv_heads
            blocks = row.reshape(kv_heads, group)
            plans.append(sorted(g * group + j for g in range(kv_heads) for j in blocks[g].topk(per).indices.tolist()))
    return plans


def taylor_scores(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  loss_fn) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """First-order Taylor importance on the task loss (LLM-Pruner, Ma et al. 2023, arXiv 2305.11627):
    ``I(group) = |Σ_{w ∈ group} (∂L/∂w) · w|``, the first-order estimate of the loss change when the group is
    removed. Groups: head h = its q_proj rows and o_proj columns; neuron i = gate row i, up row i, down column i.

    Args:
        model: the causal LM (its parameters get gradients; they are cleared again on return).
        batches: ``(input_ids, attention_mask, labels)`` calibration batches.
        loss_fn: ``(model, input_ids, attention_mask, labels) → scalar loss`` (summed over the batch), e.g. the
            ranker's BCE on the verbalizer score.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: heads (L, n_heads) and neurons (L, intermediate), float32.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deployed function
    try:
        for ids, mask, labels in batches:
            loss_fn(model, ids, mask, labels).backward()
        heads, neurons = [], []
        for layer in decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            n, _, hd = attention_widths(attn)
            qg = (attn.q_proj.weight.grad * attn.q_proj.weight).detach().float().reshape(n, hd, -1).sum((1, 2))
            og = (attn.o_proj.weight.grad * attn.o_proj.weight).detach().float().reshape(-1, n, hd).sum((0, 2))
            heads.append((qg + og).abs())
            gate = (mlp.gate_proj.weight.grad * mlp.gate_proj.weight).detach().float().sum(1)
            up = (mlp.up_proj.weight.grad * mlp.up_proj.weight).detach().float().sum(1)
            down = (mlp.down_proj.weight.grad * mlp.down_proj.weight).detach().float().sum(0)
            neurons.append((gate + up + down).abs())
        return torch.stack(heads), torch.stack(neurons)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
