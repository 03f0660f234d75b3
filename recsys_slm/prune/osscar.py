"""OSSCAR: one-shot structured pruning by layer-wise reconstruction, with a least-squares refit of what is kept.

Meng, Behdin, Wang, Mazumder, "OSSCAR: One-Shot Structured Pruning in Vision and Language Models with
Combinatorial Optimization", ICML 2024, arXiv 2403.12983; the LLM recipe follows LinkedIn's FMCHISEL
(``pruning/osscar``, see docs/reference methods §1.2).

Only the two matrices whose **input channels** are the pruned units are optimised; removing an input channel
of them lets the matching output rows upstream go too, so the result is a smaller dense model:

* MLP: ``down_proj`` (W: out × I); group = one intermediate neuron = one column (gate/up rows go with it).
* attention: ``o_proj`` (W: hidden × n·d); group = one query head = a ``head_dim``-wide column block (its
  q_proj rows go with it), or one whole KV group (``g = n / n_kv`` query heads; its k/v rows go too).

With ``X`` (N × I) the module's input at the N real calibration tokens and ``H = XᵀX`` (float64; damped
``H += damp · mean(diag H) · I`` before it is inverted), replacing ``W`` by ``W'`` that is zero outside the kept
columns K costs ``E(W') = ‖X Wᵀ − X_K W'_Kᵀ‖²_F = tr((W − W') H (W − W')ᵀ)``. For a fixed K the optimum is the
least-squares refit ``W'_K = W H[:, K] H[K, K]⁻¹`` (:func:`refit`). Choosing K is combinatorial; OSSCAR
eliminates groups greedily, backwards, with the optimal-brain-surgeon formulas (Hinv = H_K⁻¹ of the current
support K, W_K its refit weights, g a group's columns)::

    Δ_g   = tr( W_g (Hinv_gg)⁻¹ W_gᵀ )                   error increase of removing g (and refitting the rest)
    W_K  ← W_K  − W_g (Hinv_gg)⁻¹ Hinv_{g,:}              the refit of K \\ g
    Hinv ← Hinv − Hinv_{:,g} (Hinv_gg)⁻¹ Hinv_{g,:}       (H_{K\\g})⁻¹ (block downdate; rows/cols g become 0)

(single neuron: ``Δ_i = ‖W_{:,i}‖² / Hinv_ii``; FMCHISEL writes the objective with a factor ½). Several groups
can be removed per step (``chunk``): the downdate over their union is exact, only the choice is approximate (the
Δ's are not re-evaluated inside a chunk), trading quality for fewer O(I²) steps; FMCHISEL's ``update_iter``.
After the greedy, the kept support is refit from scratch (no accumulated round-off).

GQA: ``head_mode="kv_groups"`` eliminates whole KV groups (smaller KV cache); ``"query_heads"`` eliminates query
heads under a per-KV-group quota, so every group keeps the same number (what :func:`prune_attention_heads`
accepts). Widths are the same in every layer, so :func:`sync_config` gives a stock config.

Sequential (what OSSCAR does): layer by layer, attention then MLP, each module's H is collected from the model
with everything before it already pruned and refit, so the refit also compensates upstream errors. Cost: one
calibration pass per pruned sublayer (2·L passes; each pass stops right after the hooked module, so passes for
early layers are cheaper). ``sequential=False``: one pass on the dense model for all 2·L Hessians, held in
memory together (L · (I² + (n·d)²) · 8 bytes). H is accumulated batch by batch in hooks; X is never stored.

Not modelled: biases of o_proj / down_proj (absent in Llama/Qwen2/Mistral) are kept unchanged, not refit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
from torch import nn

from recsys_slm.models.layers import decoder_layers
from recsys_slm.prune.structure import (
    attention_widths,
    check_supported,
    layer_widths,
    prune_attention_heads,
    prune_mlp_neurons,
    sync_config,
)

HeadMode = Literal["kv_groups", "query_heads"]
MAX_NEURON_STEPS = 128  # default neuron_chunk: remove the neurons of a layer in at most this many greedy steps


class _Captured(Exception):
    """Raised by the last hook of a batch: the rest of the forward is not needed."""


# ------------------------------------------------------------------------------------------------ statistics
@torch.no_grad()
def gram_of_input(model: nn.Module, modules: Sequence[nn.Module], sequences: Sequence[Sequence[int]], pad_id: int,
                  batch_size: int = 8) -> tuple[list[torch.Tensor], int]:  # fmt: skip
    """``H = XᵀX`` of the input of each of ``modules`` (Linear layers inside ``model``) over the real tokens of
    the calibration ``sequences`` (token-id lists; padding excluded), accumulated per batch in float64.

    Each batch's forward is cut short once every module has seen its input (later layers are not run).

    Returns:
        tuple[list[torch.Tensor], int]: one (I_m, I_m) float64 tensor per module (I_m = ``in_features``, on the
        module's device), and N, the number of real tokens.
    """
    from recsys_slm.models.calibration import calibration_forward

    if not modules:
        raise ValueError("modules must name at least one module")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(sequences) == 0:
        raise ValueError("sequences must hold at least one calibration sequence")
    grams = [torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device) for m in modules]
    state: dict[str, Any] = {"seen": set()}

    def hook(k: int):
        def accumulate(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0][state["mask"]].to(grams[k].device, torch.float64)  # (n_real, I): real tokens only
            grams[k].addmm_(x.T, x)
            state["seen"].add(k)
            if len(state["seen"]) == len(modules):
                raise _Captured

        return accumulate

    def on_batch(mask: torch.Tensor) -> None:
        state["mask"], state["seen"] = mask.bool(), set()

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(modules)]
    tokens = 0
    try:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            try:  # one batch per call: the early stop must not end the loop over batches
                calibration_forward(model, batch, pad_id, len(batch), [], on_batch)
            except _Captured:
                pass
            if len(state["seen"]) != len(modules):
                raise ValueError("some modules never ran in the calibration forward (are they inside model?)")
            tokens += sum(len(s) for s in batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams, tokens


def damp_gram(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` (a float64 copy; (I, I)). Makes H invertible (fewer tokens than columns,
    dead neurons) and regularises the refit towards the original weights (ridge)."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    H = H.to(torch.float64).clone()
    scale = float(H.diagonal().mean())
    H.diagonal().add_(damp * (scale if scale > 0 else 1.0))
    return H


# ------------------------------------------------------------------------------------------------ solver
def _cholesky(H: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"{what} is not positive definite (singular inputs); damp it (damp_gram, damp > 0)")
    return L


def refit(W: torch.Tensor, H: torch.Tensor, kept_columns: Sequence[int]) -> torch.Tensor:
    """Least-squares refit of the kept input columns: ``W_K' = W H[:, K] H[K, K]⁻¹``, the minimiser of
    ``‖X Wᵀ − X_K W_K'ᵀ‖²`` when ``H = XᵀX``.

    Args:
        W: (out, I) weight of the linear layer.
        H: (I, I) Gram matrix of its input (damped or not; ``H[K, K]`` must be positive definite).
        kept_columns: the columns K to keep (any order; the result follows sorted order).

    Returns:
        torch.Tensor: (out, |K|) float64 refit weights, columns in sorted K order.
    """
    K = torch.as_tensor(sorted(int(c) for c in kept_columns), dtype=torch.long, device=H.device)
    H = H.to(torch.float64)
    W = W.detach().to(H.device, torch.float64)
    L = _cholesky(H[K][:, K], "H[K, K]")
    # H[K,K] W_K'ᵀ = H[K,:] Wᵀ (normal equations)
    return torch.cholesky_solve(H[K] @ W.T, L).T


def relative_error(W: torch.Tensor, H: torch.Tensor, kept_columns: Sequence[int], W_kept: torch.Tensor) -> float:
    """``‖X Wᵀ − X_K W_keptᵀ‖² / ‖X Wᵀ‖²`` computed from ``H = XᵀX`` (I, I); W (out, I), W_kept (out, |K|) with
    columns in sorted K order. Pass the undamped H to measure the calibration error itself."""
    H = H.to(torch.float64)
    W = W.detach().to(H.device, torch.float64)
    K = torch.as_tensor(sorted(int(c) for c in kept_columns), dtype=torch.long, device=H.device)
    D = W.clone()
    D[:, K] -= W_kept.to(D)
    total = float(((W @ H) * W).sum())  # tr(W H Wᵀ) = ‖X Wᵀ‖²
    return float(((D @ H) * D).sum()) / total if total > 0 else 0.0


def greedy_group_removal(W: torch.Tensor, H: torch.Tensor, groups: Sequence[Sequence[int]], n_remove: int,
                         quota: Sequence[int] | None = None, chunk: int = 1) -> tuple[list[int], torch.Tensor]:  # fmt: skip
    """Backward greedy elimination of ``n_remove`` column groups of W with OBS updates (module docstring).

    Args:
        W: (out, I) weight; its input columns are grouped.
        H: (I, I) Gram matrix of the input, already damped (must be positive definite).
        groups: G disjoint lists of column indices, all of the same length s. Columns in no group are kept.
        n_remove: groups to remove, in [0, G).
        quota: optional bucket label per group (length G, e.g. the KV head of each query head): every bucket
            then loses exactly ``n_remove / n_buckets`` groups (must divide; GQA "same count per group").
        chunk: groups removed per greedy step (1 = exact greedy; larger is faster and approximate).

    Returns:
        tuple[list[int], torch.Tensor]: the kept group indices (sorted) and the (out, |K|) float64 refit of W on
        the kept columns K (all columns minus the removed groups' columns, sorted).
    """
    G = len(groups)
    if not 0 <= n_remove < G:
        raise ValueError(f"n_remove must be in [0, {G}) (at least one of the {G} groups is kept), got {n_remove}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"groups must be non-empty and of equal size, got sizes {sorted(sizes)}")
    idx = torch.as_tensor([[int(c) for c in g] for g in groups], dtype=torch.long, device=H.device)  # (G, s)
    n_in = W.shape[1]
    if H.shape != (n_in, n_in) or idx.unique().numel() != idx.numel() or int(idx.min()) < 0 or int(idx.max()) >= n_in:
        raise ValueError(f"H must be ({n_in}, {n_in}) and groups distinct column indices in [0, {n_in})")
    left: dict[int, int] | None = None
    bucket: list[int] = []
    if quota is not None:
        bucket = [int(b) for b in quota]
        names = sorted(set(bucket))
        if len(bucket) != G or n_remove % len(names):
            raise ValueError(f"quota needs one bucket per group ({G}) and n_remove ({n_remove}) divisible by the "
                             f"{len(names)} buckets")  # fmt: skip
        left = {b: n_remove // len(names) for b in names}
        short = [b for b in names if bucket.count(b) <= left[b]]
        if short:
            raise ValueError(f"quota: buckets {short} have too few groups to lose {n_remove // len(names)} each")

    H = H.to(torch.float64)
    Wc = W.detach().to(H.device, torch.float64).clone()  # current refit weights (removed columns are 0)
    # (H_K)⁻¹ embedded in I × I (removed rows/cols 0); cholesky_solve(I) because cholesky_inverse is slow on CPU
    eye = torch.eye(n_in, dtype=torch.float64, device=H.device)
    Hinv = torch.cholesky_solve(eye, _cholesky(H, "H"))
    alive = torch.ones(G, dtype=torch.bool, device=H.device)
    removed = 0
    while removed < n_remove:
        cand = alive.nonzero().squeeze(1)  # (C,)
        cols = idx[cand]  # (C, s)
        if cols.shape[1] == 1:  # single columns: Δ = ‖W_i‖² / Hinv_ii, no gather of W, no batched solve
            delta = Wc.pow(2).sum(0)[cols[:, 0]] / Hinv.diagonal()[cols[:, 0]]
        else:
            Wg = Wc[:, cols].permute(1, 2, 0)  # (C, s, out)
            Hgg = Hinv[cols[:, :, None], cols[:, None, :]]  # (C, s, s)
            delta = (Wg * torch.linalg.solve(Hgg, Wg)).sum((1, 2))
        picked: list[int] = []
        for c in delta.argsort().tolist():
            g = int(cand[c])
            if left is not None and left[bucket[g]] == 0:
                continue
            picked.append(g)
            if left is not None:
                left[bucket[g]] -= 1
            if len(picked) == min(chunk, n_remove - removed):
                break
        S = idx[picked].reshape(-1)  # union of the picked groups' columns
        B = Hinv.index_select(0, S)  # (|S|, I), a copy: Hinv changes in place below
        # (Hinv_SS)⁻¹ Hinv_{S,:}; the |S| × |S| inverse is small, and inv + matmul is much faster on CPU than
        # solve with I right-hand sides
        A_inv_B = torch.linalg.inv(B.index_select(1, S)) @ B
        Wc.addmm_(Wc.index_select(1, S), A_inv_B, alpha=-1)  # in place: no I × I temporaries
        Hinv.addmm_(B.T, A_inv_B, alpha=-1)
        # exact zeros (they are 0 up to round-off); index_fill_ is much faster than indexed assignment
        Wc.index_fill_(1, S, 0.0)
        Hinv.index_fill_(0, S, 0.0).index_fill_(1, S, 0.0)
        alive[picked] = False
        removed += len(picked)

    kept_groups = alive.nonzero().squeeze(1).tolist()
    drop = set(idx[~alive].reshape(-1).tolist())
    kept_columns = [c for c in range(n_in) if c not in drop]
    return kept_groups, refit(W, H, kept_columns)  # exact refit from scratch, not the downdated Wc


# ------------------------------------------------------------------------------------------------ model
def _head_groups(heads: int, kv_heads: int, head_dim: int, keep_heads: int,
                 mode: HeadMode) -> tuple[list[list[int]], int, list[int] | None, int]:  # fmt: skip
    """(o_proj column groups, groups to remove, quota buckets or None, query heads per group) for ``mode``."""
    g = heads // kv_heads
    if mode == "kv_groups":
        cols = [list(range(k * g * head_dim, (k + 1) * g * head_dim)) for k in range(kv_heads)]
        return cols, kv_heads - keep_heads // g, None, g
    cols = [list(range(h * head_dim, (h + 1) * head_dim)) for h in range(heads)]
    return cols, heads - keep_heads, [h // g for h in range(heads)], 1


def _check_arguments(model: nn.Module, keep_heads: int, keep_neurons: int, head_mode: str, damp: float,
                     batch_size: int, sequences: Sequence[Sequence[int]]) -> None:  # fmt: skip
    check_supported(model)
    widths = set(layer_widths(model))
    if len(widths) != 1:
        raise ValueError(f"OSSCAR keeps uniform widths: the model's layers already differ ({sorted(widths, key=str)})")
    w = widths.pop()
    group = w.heads // w.kv_heads
    if head_mode == "kv_groups":
        if keep_heads % group or not 0 < keep_heads <= w.heads:
            raise ValueError(f"head_mode kv_groups keeps whole groups of {group} query heads: keep_heads must be a "
                             f"multiple of {group} in [{group}, {w.heads}], got {keep_heads}")  # fmt: skip
    elif head_mode == "query_heads":
        if keep_heads % w.kv_heads or not 0 < keep_heads <= w.heads:
            raise ValueError(f"head_mode query_heads keeps the same count in each of {w.kv_heads} KV groups: "
                             f"keep_heads must be a multiple of {w.kv_heads} in [{w.kv_heads}, {w.heads}], "
                             f"got {keep_heads}")  # fmt: skip
    else:
        raise ValueError(f"head_mode must be 'kv_groups' or 'query_heads', got {head_mode!r}")
    if not 0 < keep_neurons <= w.intermediate:
        raise ValueError(f"keep_neurons must be in [1, {w.intermediate}], got {keep_neurons}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(sequences) == 0 or any(len(s) == 0 for s in sequences):
        raise ValueError("sequences must be non-empty token-id lists")


@torch.no_grad()
def _prune_linear_input(linear: nn.Linear, H: torch.Tensor, groups: list[list[int]], n_remove: int,
                        quota: list[int] | None, damp: float, chunk: int) -> tuple[list[int], torch.Tensor, float, float]:  # fmt: skip
    """Greedy + refit on one o_proj/down_proj: (kept groups, refit (out, |K|) in the weight's dtype, relative
    error without refit, with refit), errors measured with the undamped H."""
    W = linear.weight.detach()
    kept, W_new = greedy_group_removal(W, damp_gram(H, damp), groups, n_remove, quota, chunk)
    K = sorted(c for g in kept for c in groups[g])
    before = relative_error(W, H, K, W.to(H.device, torch.float64)[:, K])
    after = relative_error(W, H, K, W_new)
    return kept, W_new.to(W.device, W.dtype), before, after


def osscar_prune(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int, keep_heads: int,
                 keep_neurons: int, head_mode: HeadMode = "query_heads", sequential: bool = True, damp: float = 0.01,
                 *, neuron_chunk: int | None = None, head_chunk: int = 1) -> dict[str, Any]:  # fmt: skip
    """Prune every decoder layer of a Llama-style causal LM in place to ``keep_heads`` query heads and
    ``keep_neurons`` MLP neurons with OSSCAR (greedy reconstruction + refit of o_proj / down_proj), then write the
    uniform widths into the config (:func:`sync_config`).

    Args:
        model: Llama / SmolLM2 / Qwen2 / Mistral causal LM (uniform widths).
        sequences: calibration prompts as token-id lists (only real tokens count).
        pad_id: padding id for batching.
        batch_size: sequences per calibration forward.
        keep_heads: query heads kept per layer; GQA-valid for ``head_mode`` (a multiple of the group size for
            kv_groups, of the KV head count for query_heads).
        keep_neurons: MLP intermediate neurons kept per layer, in [1, intermediate].
        head_mode: "query_heads" (same count removed inside every KV group; KV heads stay) or "kv_groups".
        sequential: collect each sublayer's H from the model pruned so far (2·L calibration passes) instead of one
            pass on the dense model (which holds all 2·L Hessians at once).
        damp: H dampening, a fraction of mean(diag H).
        neuron_chunk: neurons removed per greedy step (default: ``ceil(removed / 128)``, at most 128 steps).
        head_chunk: head groups removed per greedy step (default 1, exact greedy).

    Returns:
        dict: ``layers`` (per layer: ``layer``, ``kept_heads`` (original query-head indices), ``kept_kv_heads``,
        ``kept_neurons`` (count), ``attn_error_before_refit`` / ``attn_error_after_refit`` /
        ``mlp_error_before_refit`` / ``mlp_error_after_refit``: relative reconstruction errors
        ``‖XWᵀ − X_K W_Kᵀ‖² / ‖XWᵀ‖²`` on the calibration tokens (X from the model pruned so far when
        sequential), "before" = same selection without refit; 0.0 where nothing was removed), ``widths`` (the synced config widths), ``calibration_passes``, ``tokens``
        (real tokens per pass) and the arguments ``head_mode``, ``sequential``, ``damp``.

    Raises:
        ValueError: unsupported architecture, non-uniform widths, or a bad argument (the message names it).
    """
    _check_arguments(model, keep_heads, keep_neurons, head_mode, damp, batch_size, sequences)
    layers = decoder_layers(model)
    heads, kv_heads, head_dim = attention_widths(layers[0].self_attn)
    intermediate = layers[0].mlp.gate_proj.out_features
    head_cols, n_head_remove, head_quota, per_group = _head_groups(heads, kv_heads, head_dim, keep_heads, head_mode)
    n_neuron_remove = intermediate - keep_neurons
    if neuron_chunk is None:
        neuron_chunk = max(1, math.ceil(n_neuron_remove / MAX_NEURON_STEPS))
    neuron_cols = [[i] for i in range(intermediate)]
    passes, tokens = 0, 0

    def gram(modules: list[nn.Module]) -> list[torch.Tensor]:
        nonlocal passes, tokens
        grams, tokens = gram_of_input(model, modules, sequences, pad_id, batch_size)
        passes += 1
        return grams

    pre: list[torch.Tensor] = []
    if not sequential and (n_head_remove or n_neuron_remove):  # one pass on the dense model for every module
        pre = gram([m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)])

    rows = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        row: dict[str, Any] = {"layer": i}
        kept_heads = list(range(heads))
        attn_err = (0.0, 0.0)
        if n_head_remove:
            H = pre[2 * i] if pre else gram([attn.o_proj])[0]
            kept, W_new, *attn_err = _prune_linear_input(attn.o_proj, H, head_cols, n_head_remove, head_quota,
                                                         damp, head_chunk)  # fmt: skip
            kept_heads = [g * per_group + j for g in kept for j in range(per_group)]
            prune_attention_heads(attn, kept_heads)
            attn.o_proj.weight.data.copy_(W_new)  # columns of the kept heads, in the same sorted order
            del H
        mlp_err = (0.0, 0.0)
        if n_neuron_remove:
            H = pre[2 * i + 1] if pre else gram([mlp.down_proj])[0]
            kept, W_new, *mlp_err = _prune_linear_input(mlp.down_proj, H, neuron_cols, n_neuron_remove, None,
                                                        damp, neuron_chunk)  # fmt: skip
            prune_mlp_neurons(mlp, kept)
            mlp.down_proj.weight.data.copy_(W_new)
            del H
        if pre:  # free this layer's Hessians early
            pre[2 * i] = pre[2 * i + 1] = torch.empty(0)
        row.update(kept_heads=kept_heads, kept_kv_heads=sorted({h // (heads // kv_heads) for h in kept_heads}),
                   kept_neurons=mlp.gate_proj.out_features, attn_error_before_refit=attn_err[0],
                   attn_error_after_refit=attn_err[1], mlp_error_before_refit=mlp_err[0],
                   mlp_error_after_refit=mlp_err[1])  # fmt: skip
        rows.append(row)
    widths = sync_config(model)
    return {"method": "osscar", "head_mode": head_mode, "sequential": sequential, "damp": damp,
            "calibration_passes": passes, "tokens": tokens, "widths": asdict(widths), "layers": rows}  # fmt: skip
