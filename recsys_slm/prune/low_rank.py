"""Low-rank compression of decoder projections: SVD-LLM whitening and Compress-to-Impress (CTI).

Every target is an ``nn.Linear`` ``y = x Wᵀ + b`` with ``W (out, in)``; a rank-r replacement is a
:class:`~recsys_slm.models.low_rank.LowRankLinear` ``y = up(down(x))`` with ``up (out, r)``, ``down (r, in)``.
It saves parameters only when ``r·(in + out) < in·out``.

**SVD-LLM** (Wang, Zheng, Wan, Zhang 2024, arXiv 2403.07378), truncation-aware data whitening:

* calibration gram ``G = Σ_t x_t x_tᵀ = XᵀX (in, in)`` over the *real* (non-pad) tokens ``x_t`` of the layer input;
* Cholesky ``G = S Sᵀ`` (``S`` lower triangular). Because ``‖X(W − Ŵ)ᵀ‖_F² = tr((W − Ŵ) G (W − Ŵ)ᵀ)
  = ‖(W − Ŵ) S‖_F²``, truncating the SVD of the *whitened* matrix is the optimal rank-r fit of the layer's
  outputs on the calibration set (Eckart–Young in the whitened space);
* ``W S = U Σ Vᵀ``, keep ``r``: ``Ŵ = U_r Σ_r V_rᵀ S⁻¹``; dropping ``σ_i`` costs exactly ``σ_i²`` of output
  energy, so ``‖X(W − Ŵ)ᵀ‖_F = sqrt(Σ_{i ≥ r} σ_i²)`` and the smallest σ are truly the cheapest;
* factors (as in the paper's code): ``up = U_r √Σ_r``, ``down = √Σ_r V_rᵀ S⁻¹`` — the balanced split keeps both
  factors at similar magnitudes, which matters once they are stored in bf16/fp16;
* rank rules: budget ``r = ⌊keep·in·out / (in + out)⌋`` (the paper's ``k = ⌊m·n·ratio/(m+n)⌋``) or energy (the
  smallest r whose ``Σ_{i<r} σ_i² / Σ σ_i² ≥ energy``; with whitening this is the fraction of calibration output
  energy kept). The paper's optional parameter update / LoRA step is **not** implemented here.

**Compress-to-Impress** (Sreeram, Maalouf, Sharma, Rus 2025, arXiv 2510.20800; builds on LASER, Sharma et al.,
ICLR 2024): one gradient pass of the task loss on ≤ 100 samples, no optimizer step.

* ``W = Σ_i σ_i u_i v_iᵀ ⇒ ∂L/∂σ_i = ⟨G, u_i v_iᵀ⟩_F = u_iᵀ G v_i`` with ``G = ∂L/∂W`` (:func:`singular_value_gradients`);
* ``∂L/∂σ_i > 0`` means the loss wants ``σ_i`` smaller, so removing component i (``σ_i → 0``) is predicted, to first
  order, to *lower* the loss by ``σ_i · ∂L/∂σ_i``;
* our rule (the paper's exact per-matrix score was not found): a matrix's score is that predicted decrease summed
  over the components we would remove — those with a positive gradient among the trailing ``max_fraction`` of
  components (LASER drops "higher-order", small-σ components) — and matrices are ranked by it
  (:func:`rank_matrices`);
* the paper's aim is accuracy (a truncated matrix may be stored densely); ours is compression, so a candidate may
  also carry a parameter budget (``keep_ratio``) that caps the rank, dropping further smallest-σ components;
* row clustering (paper finding iii): rows of a matrix are clustered into ``k`` subspaces (projective k-lines, or
  contiguous blocks) and each cluster is truncated separately with its own σ-gradients. The result is stored as a
  **dense** ``nn.Linear`` (an accuracy variant: no parameter saving; the compressed model format has no
  per-cluster factor type);
* :func:`cti_select` evaluates candidate truncations of the top-ranked matrices on the same samples and keeps the
  one with the lowest task loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from recsys_slm.models.layers import decoder_layers
from recsys_slm.models.low_rank import LowRankLinear

DEFAULT_KINDS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------- targets


def linear_targets(model: nn.Module, kinds: Sequence[str] = DEFAULT_KINDS) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` projections of every decoder layer whose attribute name is in ``kinds``.

    Returns:
        dict[str, nn.Linear]: full module names (as in ``model.named_modules()``, e.g.
        ``"model.layers.0.self_attn.q_proj"``) → module, in layer order. Layers already replaced by
        :class:`LowRankLinear` are not ``nn.Linear`` and are therefore not listed.

    Raises:
        ValueError: ``kinds`` is empty or no decoder layer has such a projection (e.g. GPT-2's ``Conv1D``).
    """
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds must name at least one projection, e.g. 'q_proj'")
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    targets: dict[str, nn.Linear] = {}
    for i, layer in enumerate(layers):
        for sub, module in layer.named_modules():
            if isinstance(module, nn.Linear) and sub.rsplit(".", 1)[-1] in kinds:
                targets[f"{prefix}.{i}.{sub}"] = module
    if not targets:
        raise ValueError(f"no nn.Linear named {list(kinds)} in the decoder layers of {type(model).__name__}")
    return targets


def _parent_and_leaf(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` (setattr on the parent) and return what was there."""
    parent, leaf = _parent_and_leaf(model, name)
    old = getattr(parent, leaf)
    setattr(parent, leaf, module)
    return old


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------- SVD-LLM


@torch.no_grad()
def input_grams(model: nn.Module, targets: Mapping[str, nn.Linear], sequences: Sequence[Sequence[int]],
                pad_id: int, batch_size: int = 8) -> dict[str, torch.Tensor]:  # fmt: skip
    """SVD-LLM calibration grams ``XᵀX`` of each target's input over the real tokens of ``sequences``.

    Args:
        model: the causal LM (run through :func:`~recsys_slm.models.calibration.calibration_forward`).
        targets: name → ``nn.Linear`` (e.g. :func:`linear_targets`).
        sequences: calibration prompts as token-id lists.
        pad_id: padding id (pad positions are excluded through the attention mask, not by id).
        batch_size: prompts per forward.

    Returns:
        dict[str, torch.Tensor]: name → ``(in, in)`` float64 sum (not mean) of ``x xᵀ`` over real tokens, on the
        module's device. The scale does not matter to the whitening; damping is relative to it.
    """
    from recsys_slm.models.calibration import calibration_forward

    if not sequences:
        raise ValueError("input_grams needs at least one calibration sequence")
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
             for name, m in targets.items()}  # fmt: skip
    state: dict[str, Any] = {}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            mask = state["mask"]
            if x.shape[:2] != mask.shape:
                raise ValueError(
                    f"{name}: input of shape {tuple(x.shape)} does not match the token mask {tuple(mask.shape)}"
                )
            # q/k/v (and gate/up) read the very same tensor: compute its gram once per forward.
            last = state.get("last")
            if last is None or last[0] is not x:
                rows = x[mask].to(torch.float64)  # (tokens, in): real tokens only
                last = (x, rows.T @ rows)
                state["last"] = last
            grams[name] += last[1].to(grams[name].device)

        return hook

    def on_batch(mask: torch.Tensor) -> None:
        state["mask"] = mask.bool()
        state["last"] = None

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in targets.items()]
    try:
        calibration_forward(model, sequences, pad_id, batch_size, handles, on_batch)
    finally:
        state.clear()  # drop the cached activation
    return grams


class WhitenedSVD(NamedTuple):
    """SVD of the whitened weight ``W S = U diag(S) Vh`` (thin, ``k = min(out, in)``), all float64.

    Attributes:
        U: (out, k) left singular vectors.
        S: (k,) singular values, descending.
        Vh: (k, in) right singular vectors of the *whitened* matrix ``W S``.
        S_inv: (in, in) inverse of the Cholesky factor (``None``: no gram, plain SVD of W).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    S_inv: torch.Tensor | None


def whitening(gram: torch.Tensor, damp: float = 1e-6, tries: int = 5) -> torch.Tensor:
    """Lower Cholesky factor ``S`` of ``gram`` (in, in), float64 (``gram ≈ S Sᵀ``).

    A gram that is only semi-definite (dead input channels, fewer tokens than ``in``, rounding) gets
    ``λ·mean(diag)·I`` added with ``λ = damp, 10·damp, …`` (``tries`` steps). Damping changes which truncation is
    optimal only marginally and never the full-rank result (``W S S⁻¹ = W``).

    Raises:
        ValueError: the gram is not square, not finite, has a non-positive mean diagonal, or is still not
            positive definite after the largest damping.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (in, in), got {tuple(gram.shape)}")
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2  # accumulated sums are symmetric only up to rounding
    if not torch.isfinite(gram).all():
        raise ValueError("gram has non-finite entries")
    scale = float(gram.diagonal().mean())
    if not scale > 0:
        raise ValueError(f"gram has mean diagonal {scale}: the layer saw no (non-zero) calibration input")
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for step in range(tries):
        lam = damp * 10**step
        factor, info = torch.linalg.cholesky_ex(gram + lam * scale * eye)
        if int(info) == 0:
            return factor
    raise ValueError(f"gram is not positive definite even with damping {damp * 10 ** (tries - 1):g}·mean(diag); "
                     "it is not a gram of real activations (check the calibration hooks)")  # fmt: skip


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor | None, damp: float = 1e-6) -> WhitenedSVD:
    """SVD-LLM truncation-aware whitening: Cholesky ``S`` of ``gram``, thin SVD of ``W S`` (float64).

    Args:
        weight: (out, in) layer weight.
        gram: (in, in) ``XᵀX`` of the layer input (:func:`input_grams`), or ``None`` for a plain SVD of W.
        damp: relative damping for semi-definite grams (see :func:`whitening`).

    Returns:
        WhitenedSVD: ``(U (out, k), S (k,), Vh (k, in), S_inv (in, in) | None)`` with
        ``W = U diag(S) Vh S_inv`` (``S_inv = I`` when ``gram`` is None). Rank-r truncation:
        ``Ŵ = U[:, :r] diag(S[:r]) Vh[:r] S_inv``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be (out, in), got {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if gram is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return WhitenedSVD(U, S, Vh, None)
    if gram.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"gram must be ({w.shape[1]}, {w.shape[1]}) for a weight of shape {tuple(w.shape)}, got {tuple(gram.shape)}"
        )
    factor = whitening(gram.to(w.device), damp)
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    s_inv = torch.linalg.solve_triangular(factor, eye, upper=False)  # triangular inverse: stable, no pivoting
    U, S, Vh = torch.linalg.svd(w @ factor, full_matrices=False)
    return WhitenedSVD(U, S, Vh, s_inv)


def _low_rank_module(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, s_inv: torch.Tensor | None,
                     bias: torch.Tensor | None, like: torch.Tensor) -> LowRankLinear:  # fmt: skip
    """LowRankLinear with ``up = U √S`` (out, r) and ``down = √S Vh S_inv`` (r, in), in ``like``'s dtype/device."""
    root = S.clamp(min=0).sqrt()
    down = root[:, None] * Vh
    if s_inv is not None:
        down = down @ s_inv
    up = U * root[None, :]
    b = None if bias is None else bias.detach()
    return LowRankLinear.from_factors(up.to(like), down.to(like), None if b is None else b.to(like))


def factorize(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor | None, rank: int,
              damp: float = 1e-6) -> LowRankLinear:  # fmt: skip
    """Rank-``rank`` SVD-LLM factorisation of ``y = x Wᵀ + b``.

    Σ is split symmetrically: ``up = U_r √Σ_r`` (out, r), ``down = √Σ_r V_rᵀ S⁻¹`` (r, in) (balanced factors, as in
    the SVD-LLM code). ``gram=None`` gives the plain (unwhitened) truncated SVD.

    Returns:
        LowRankLinear: in the weight's dtype and device; the bias (out,) is kept on ``up``.

    Raises:
        ValueError: ``rank`` is not in ``[1, min(out, in)]``.
    """
    k = min(weight.shape)
    if not 1 <= rank <= k:
        raise ValueError(f"rank must be in [1, {k}] for a weight of shape {tuple(weight.shape)}, got {rank}")
    svd = whitened_svd(weight, gram, damp)
    return _low_rank_module(svd.U[:, :rank], svd.S[:rank], svd.Vh[:rank], svd.S_inv, bias, weight)


def rank_for_budget(out_features: int, in_features: int, keep_ratio: float) -> int:
    """The largest ``r`` with ``r·(in + out) ≤ keep_ratio·in·out`` (capped at ``min(in, out)``).

    Raises:
        ValueError: ``keep_ratio`` ≤ 0 or so small that not even rank 1 fits.
    """
    if not keep_ratio > 0:
        raise ValueError(f"keep_ratio must be > 0, got {keep_ratio}")
    # the small epsilon keeps e.g. 0.5·64·64/128 = 16 from rounding down to 15
    rank = min(math.floor(keep_ratio * in_features * out_features / (in_features + out_features) + 1e-9),
               min(in_features, out_features))  # fmt: skip
    if rank < 1:
        raise ValueError(f"keep_ratio {keep_ratio} leaves no rank for a ({out_features}, {in_features}) layer; "
                         f"rank 1 needs keep_ratio ≥ {(in_features + out_features) / (in_features * out_features):.4g}")  # fmt: skip
    return rank


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{i<r} σ_i² / Σ_i σ_i² ≥ energy`` (σ sorted descending, shape (k,)).

    With whitened singular values this is the fraction of calibration *output* energy kept. An all-zero σ gives 1.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if singular_values.ndim != 1 or singular_values.numel() == 0:
        raise ValueError(
            f"singular_values must be a non-empty 1-D tensor, got shape {tuple(singular_values.shape)}"
        )
    cum = singular_values.detach().to(torch.float64).pow(2).cumsum(0)
    if not cum[-1] > 0:
        return 1
    share = cum / cum[-1]  # the last entry is exactly 1: energy=1 keeps everything
    index = int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype, device=share.device))[0])
    return min(index + 1, singular_values.numel())


def select_ranks(targets: Mapping[str, nn.Linear], keep_ratio: float | None = None, energy: float | None = None,
                 grams: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:  # fmt: skip
    """Per-target ranks from exactly one rule: a uniform parameter budget (``keep_ratio``) or an energy share
    (``energy``, computed on the whitened spectrum when ``grams`` are given — an extra SVD per target)."""
    if (keep_ratio is None) == (energy is None):
        raise ValueError("give exactly one of keep_ratio or energy")
    ranks = {}
    for name, module in targets.items():
        if keep_ratio is not None:
            ranks[name] = rank_for_budget(module.out_features, module.in_features, keep_ratio)
        else:
            gram = None if grams is None else _gram_for(grams, name)
            ranks[name] = rank_for_energy(whitened_svd(module.weight, gram).S, energy)
    return ranks


def _gram_for(grams: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in grams:
        raise ValueError(f"grams has no entry for {name!r} (grams=None gives plain SVD for every layer)")
    return grams[name]


def _check_names(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    found, unknown, wrong = {}, [], []
    for name in names:
        module = modules.get(name)
        if module is None:
            unknown.append(name)
        elif not isinstance(module, nn.Linear):
            wrong.append(f"{name} ({type(module).__name__})")
        else:
            found[name] = module
    if unknown or wrong:
        parts = []
        if unknown:
            parts.append(f"unknown module names {unknown}")
        if wrong:
            parts.append(f"not nn.Linear: {wrong}")
        raise ValueError("; ".join(parts) + " (use linear_targets(model) for valid names)")
    return found


def apply_low_rank(model: nn.Module, ranks: Mapping[str, int], grams: Mapping[str, torch.Tensor] | None = None,
                   require_saving: bool = True, damp: float = 1e-6) -> dict[str, Any]:  # fmt: skip
    """Replace the named ``nn.Linear`` modules in place by rank-r SVD-LLM factorisations (:func:`factorize`).

    Args:
        model: the model to edit (``setattr`` on each module's parent).
        ranks: full module name → rank in ``[1, min(in, out)]``.
        grams: name → ``(in, in)`` gram (:func:`input_grams`): whitened SVD; every factorised name needs one.
            ``None``: plain SVD for all.
        require_saving: skip (and report) layers where ``r·(in + out) ≥ in·out`` (no parameter saving). ``False``
            factorises them anyway (e.g. to check that full rank is lossless).
        damp: relative damping for semi-definite grams.

    Returns:
        dict: ``replaced`` (name → ``rank``, ``in``, ``out``, ``params_before``, ``params_after``,
        ``rel_error`` = ``sqrt(Σ_{i≥r} σ_i² / Σ σ_i²)``: the relative output error on the calibration set when
        whitened, the relative weight error otherwise), ``skipped`` (name → reason), ``params_before`` /
        ``params_after`` (whole model).

    Raises:
        ValueError: unknown names or non-``nn.Linear`` modules (all listed), a rank out of range, a missing gram.
    """
    modules = _check_names(model, ranks)
    for name, rank in ranks.items():
        k = min(modules[name].weight.shape)
        if not 1 <= int(rank) <= k:
            raise ValueError(f"{name}: rank must be in [1, {k}], got {rank}")
    report: dict[str, Any] = {"replaced": {}, "skipped": {}, "params_before": _params(model)}
    for name, rank in ranks.items():
        module, rank = modules[name], int(rank)
        out_f, in_f = module.out_features, module.in_features
        if require_saving and rank * (in_f + out_f) >= in_f * out_f:
            report["skipped"][name] = (f"rank {rank}·({in_f}+{out_f}) = {rank * (in_f + out_f)} ≥ {in_f}·{out_f} = "
                                       f"{in_f * out_f}: no parameter saving")  # fmt: skip
            continue
        gram = None if grams is None else _gram_for(grams, name)
        try:
            svd = whitened_svd(module.weight, gram, damp)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        new = _low_rank_module(
            svd.U[:, :rank], svd.S[:rank], svd.Vh[:rank], svd.S_inv, module.bias, module.weight
        )
        energy = svd.S.pow(2)
        rel = float((energy[rank:].sum() / energy.sum()).sqrt()) if energy.sum() > 0 else 0.0
        before = _params(module)
        _swap(model, name, new)
        report["replaced"][name] = {"rank": rank, "in": in_f, "out": out_f, "params_before": before,
                                    "params_after": _params(new), "rel_error": rel}  # fmt: skip
    report["params_after"] = _params(model)
    return report


# ------------------------------------------------------------------------------------------- Compress-to-Impress


def singular_value_gradients(weight: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of the loss w.r.t. the singular values of ``weight`` (CTI, arXiv 2510.20800).

    ``W = U diag(σ) Vh ⇒ ∂L/∂σ_i = u_iᵀ G v_i`` (U, V held fixed), ``G = ∂L/∂W``.

    Args:
        weight: (out, in).
        grad: (out, in) ``∂L/∂W``.

    Returns:
        tuple: ``U (out, k)``, ``S (k,)`` descending, ``Vh (k, in)``, ``dsigma (k,)``; float64, ``k = min(out, in)``.
    """
    if weight.shape != grad.shape or weight.ndim != 2:
        raise ValueError(
            f"weight and grad must both be (out, in), got {tuple(weight.shape)} and {tuple(grad.shape)}"
        )
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    g = grad.detach().to(device=U.device, dtype=torch.float64)
    dsigma = ((U.T @ g) * Vh).sum(1)  # diag(Uᵀ G V) without forming the (k, k) product
    return U, S, Vh, dsigma


def _limit_batches(batches: Iterable[Batch], max_samples: int) -> list[Batch]:
    """The first ``max_samples`` rows of ``batches`` (the last batch cut), materialised (they are reused)."""
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    kept, seen = [], 0
    for ids, mask, labels in batches:
        take = min(ids.shape[0], max_samples - seen)
        kept.append((ids[:take], mask[:take], labels[:take]))
        seen += take
        if seen >= max_samples:
            break
    if not seen:
        raise ValueError("no calibration samples: batches is empty")
    return kept


def _target_gradients(model: nn.Module, targets: Mapping[str, nn.Linear], batches: Sequence[Batch],
                      loss_fn: LossFn) -> dict[str, torch.Tensor]:  # fmt: skip
    """``∂(Σ_batches loss)/∂W`` for each target weight (float32 clones); only target weights require grad during
    the pass, and every parameter's ``requires_grad``, ``.grad`` and the training mode are restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    old_grads = [p.grad for p in params]
    was_training = model.training
    weights = {name: module.weight for name, module in targets.items()}
    model.eval()  # no dropout: the gradient of the deployed function
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            # micro-batches accumulate into .grad: the same gradient as one backward of the summed loss
            for ids, mask, labels in batches:
                loss_fn(model, ids, mask, labels).backward()
        # a weight the loss does not reach has zero gradient (nothing to remove there)
        return {name: (w.grad.detach().float().clone() if w.grad is not None else torch.zeros_like(w, dtype=torch.float32))
                for name, w in weights.items()}  # fmt: skip
    finally:
        for p, flag, grad in zip(params, flags, old_grads, strict=True):
            p.grad = grad
            p.requires_grad_(flag)
        model.train(was_training)


def cti_scores(model: nn.Module, targets: Mapping[str, nn.Linear], batches: Iterable[Batch], loss_fn: LossFn,
               max_samples: int = 100) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Singular values and their loss gradients for every target from one gradient pass (no optimizer step).

    Args:
        model: the causal LM; its parameters' ``requires_grad`` / ``.grad`` / training mode are restored.
        targets: name → ``nn.Linear`` (e.g. :func:`linear_targets`).
        batches: ``(input_ids, attention_mask, labels)``; only the first ``max_samples`` rows are used.
        loss_fn: ``(model, input_ids, attention_mask, labels) → scalar loss`` summed over the batch.
        max_samples: rows used (the paper: 100 suffice).

    Returns:
        dict[str, tuple[torch.Tensor, torch.Tensor]]: name → ``(S (k,), dsigma (k,))`` float64, S descending.
    """
    batches = _limit_batches(batches, max_samples)
    grads = _target_gradients(model, targets, batches, loss_fn)
    scores = {}
    for name, module in targets.items():
        _, S, _, dsigma = singular_value_gradients(module.weight, grads.pop(name))
        scores[name] = (S, dsigma)
    return scores


def cti_keep_mask(S: torch.Tensor, dsigma: torch.Tensor, max_fraction: float = 0.5,
                  max_rank: int | None = None) -> torch.Tensor:  # fmt: skip
    """Which singular components a CTI truncation keeps, (k,) bool.

    1. Among the trailing ``⌊max_fraction·k⌋`` components (smallest σ; at most ``k − 1``), remove those with
       ``dsigma > 0`` (the loss wants them smaller).
    2. If more than ``max_rank`` remain, also remove the smallest-σ remaining ones (compression budget).
    """
    if not 0 <= max_fraction <= 1:
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
    if S.shape != dsigma.shape or S.ndim != 1:
        raise ValueError(f"S and dsigma must be (k,) vectors, got {tuple(S.shape)} and {tuple(dsigma.shape)}")
    k = S.numel()
    keep = torch.ones(k, dtype=torch.bool, device=S.device)
    tail = min(math.floor(max_fraction * k + 1e-9), k - 1)
    if tail:
        keep[k - tail :] = dsigma[k - tail :] <= 0
    if max_rank is not None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        kept = keep.nonzero().flatten()  # ascending index = descending σ
        keep[kept[max_rank:]] = False
    return keep


def cti_truncate(weight: torch.Tensor, bias: torch.Tensor | None, U: torch.Tensor, S: torch.Tensor,
                 Vh: torch.Tensor, dsigma: torch.Tensor, max_fraction: float = 0.5,
                 max_rank: int | None = None) -> nn.Module:  # fmt: skip
    """Drop the components chosen by :func:`cti_keep_mask` from ``W = U diag(S) Vh``.

    Args:
        weight: (out, in) the current weight (dtype/device of the result; copied as is when nothing is removed).
        bias: (out,) or None.
        U, S, Vh, dsigma: from :func:`singular_value_gradients` of this weight.
        max_fraction: at most this trailing fraction of components is eligible for removal.
        max_rank: rank cap (compression budget), e.g. :func:`rank_for_budget`.

    Returns:
        nn.Module: a :class:`LowRankLinear` (``up = U √Σ``, ``down = √Σ Vh``) when the kept rank saves parameters,
        else a dense ``nn.Linear`` holding the truncated matrix (LASER/CTI's accuracy use: same size).
    """
    out_f, in_f = weight.shape
    keep = cti_keep_mask(S, dsigma, max_fraction, max_rank)
    rank = int(keep.sum())
    if rank * (in_f + out_f) < in_f * out_f:
        return _low_rank_module(U[:, keep], S[keep], Vh[keep], None, bias, weight)
    dense = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        if bool(keep.all()):
            dense.weight.copy_(weight)  # nothing removed: exactly the original layer
        else:
            dense.weight.copy_((U[:, keep] * S[keep]) @ Vh[keep])
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def rank_matrices(scores: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  max_fraction: float = 0.5) -> list[tuple[str, float]]:  # fmt: skip
    """Matrices ordered by the first-order loss decrease of their CTI truncation, largest first.

    ``gain = Σ_{i removed} σ_i · ∂L/∂σ_i`` over the components :func:`cti_keep_mask` removes (no rank cap), i.e.
    ``L(W) − L(Ŵ)`` to first order (≥ 0; 0 when no tail component has a positive gradient).
    """
    ranked = []
    for name, (S, dsigma) in scores.items():
        removed = ~cti_keep_mask(S, dsigma, max_fraction)
        ranked.append((name, float((S[removed] * dsigma[removed]).sum())))
    return sorted(ranked, key=lambda item: -item[1])


def cluster_rows(weight: torch.Tensor, n_clusters: int, method: Literal["klines", "contiguous"] = "klines",
                 seed: int = 0, iters: int = 20) -> torch.Tensor:  # fmt: skip
    """Partition the rows of ``weight (out, in)`` into ``n_clusters`` groups, (out,) int64 labels.

    ``"klines"``: projective clustering with 1-D subspaces (k-lines; sign-invariant k-means on row directions):
    assign each row to the line ``c`` maximising ``|⟨r/‖r‖, c⟩|``, refit each line as the top right singular vector
    of its normalised rows; farthest-first initialisation from a seeded random row. ``"contiguous"``: equal blocks
    of consecutive rows (e.g. heads of q/k/v projections).
    """
    out_f = weight.shape[0]
    if not 1 <= n_clusters <= out_f:
        raise ValueError(f"n_clusters must be in [1, {out_f}], got {n_clusters}")
    if method == "contiguous":
        return torch.arange(out_f, device=weight.device) * n_clusters // out_f
    if method != "klines":
        raise ValueError(f"unknown cluster method {method!r}; choose 'klines' or 'contiguous'")
    rows = weight.detach().to(torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-30)
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(out_f, (1,), generator=gen))
    centers = [rows[first]]
    for _ in range(1, n_clusters):
        fit = (rows @ torch.stack(centers).T).abs().max(1).values  # |cos| to the nearest line
        centers.append(rows[int(fit.argmin())])
    centers_t = torch.stack(centers)
    labels = torch.full((out_f,), -1, dtype=torch.long, device=rows.device)
    for _ in range(iters):
        fit = (rows @ centers_t.T).abs()
        new = fit.argmax(1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(n_clusters):
            members = rows[labels == c]
            if members.shape[0] == 0:  # empty cluster: re-seed it with the worst-fitting row
                centers_t[c] = rows[int(fit.max(1).values.argmin())]
            else:
                centers_t[c] = torch.linalg.svd(members, full_matrices=False).Vh[0]
    return labels


def cti_cluster_truncate(weight: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor,
                         labels: torch.Tensor, max_fraction: float = 0.5,
                         keep_ratio: float | None = None) -> nn.Linear:  # fmt: skip
    """Row-clustered CTI truncation (paper finding iii): each cluster ``W_c`` of rows (with its gradient rows
    ``G_c``) gets its own SVD, σ-gradients and :func:`cti_keep_mask`; ``keep_ratio`` caps each cluster's rank at
    :func:`rank_for_budget` of ``(rows_c, in)`` (at least 1).

    Returns:
        nn.Linear: dense ``(out, in)`` with the truncated clusters (accuracy variant: no parameter saving).
    """
    out_f, in_f = weight.shape
    if labels.shape != (out_f,):
        raise ValueError(f"labels must be ({out_f},), got {tuple(labels.shape)}")
    new = torch.empty(out_f, in_f, dtype=torch.float64, device=weight.device)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        U, S, Vh, dsigma = singular_value_gradients(weight[rows], grad[rows])
        cap = None
        if keep_ratio is not None:
            cap = max(1, math.floor(keep_ratio * rows.numel() * in_f / (rows.numel() + in_f) + 1e-9))
        keep = cti_keep_mask(S, dsigma, max_fraction, cap)
        new[rows] = (U[:, keep] * S[keep]) @ Vh[keep]
    dense = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(new)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


@dataclass(frozen=True)
class CTICandidate:
    """One truncation setting tried by :func:`cti_select`.

    Attributes:
        max_fraction: trailing fraction of components eligible for removal (positive σ-gradient only).
        keep_ratio: parameter budget per matrix (rank cap :func:`rank_for_budget`); None: gradient rule only.
        n_clusters: > 1: row-clustered truncation (dense result, see :func:`cti_cluster_truncate`).
        cluster_method: "klines" or "contiguous".
    """

    max_fraction: float = 0.5
    keep_ratio: float | None = None
    n_clusters: int = 1
    cluster_method: Literal["klines", "contiguous"] = "klines"

    def __post_init__(self) -> None:
        if not 0 <= self.max_fraction <= 1:
            raise ValueError(f"CTICandidate.max_fraction must be in [0, 1], got {self.max_fraction}")
        if self.keep_ratio is not None and not self.keep_ratio > 0:
            raise ValueError(f"CTICandidate.keep_ratio must be > 0 or None, got {self.keep_ratio}")
        if self.n_clusters < 1:
            raise ValueError(f"CTICandidate.n_clusters must be >= 1, got {self.n_clusters}")


@torch.no_grad()
def _task_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn) -> float:
    """Mean per-sample task loss over ``batches`` (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        total = sum(float(loss_fn(model, ids, mask, labels)) for ids, mask, labels in batches)
    finally:
        model.train(was_training)
    return total / sum(ids.shape[0] for ids, _, _ in batches)


def cti_select(model: nn.Module, targets: Mapping[str, nn.Linear], batches: Iterable[Batch], loss_fn: LossFn,
               candidates: Sequence[float | CTICandidate], top_k: int | None = None, max_samples: int = 100,
               require_improvement: bool = False, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Compress-to-Impress search: one gradient pass, rank matrices, try candidates, keep the best in place.

    1. ``∂L/∂W`` of every target on the first ``max_samples`` rows (one pass, no optimizer step);
    2. rank targets by :func:`rank_matrices` (with the largest candidate ``max_fraction``), keep the ``top_k``
       (None: all);
    3. for each candidate, replace every selected matrix by its truncation, measure the mean task loss on the
       same rows, and put the original modules back;
    4. install the candidate with the lowest loss (with ``require_improvement``, only if it beats the unmodified
       model).

    Args:
        candidates: ``CTICandidate`` or a float ``f`` (shorthand for ``CTICandidate(max_fraction=f)``).
        top_k: how many of the ranked matrices each candidate truncates.
        seed: k-lines initialisation.

    Returns:
        dict: ``samples``, ``base_loss``, ``ranking`` ([(name, predicted gain)]), ``selected`` (names),
        ``trials`` (per candidate: ``candidate``, ``loss``, ``params_before``/``params_after`` of the selected
        modules, ``modules`` name → ``{"kind": "low_rank" | "dense" | "clustered", "rank"}``), ``best`` (trial
        index), ``applied`` (bool), ``params_after`` (whole model).
    """
    if not candidates:
        raise ValueError("cti_select needs at least one candidate")
    cands = [c if isinstance(c, CTICandidate) else CTICandidate(max_fraction=float(c)) for c in candidates]
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    current = _check_names(model, targets)
    moved = [name for name, module in targets.items() if current[name] is not module]
    if moved:
        raise ValueError(f"targets {moved} are not the modules the model holds under those names")
    batches = _limit_batches(batches, max_samples)
    samples = sum(ids.shape[0] for ids, _, _ in batches)
    grads = _target_gradients(model, targets, batches, loss_fn)
    scores = {}
    for name, module in targets.items():
        _, S, _, dsigma = singular_value_gradients(module.weight, grads[name])
        scores[name] = (S, dsigma)
    ranking = rank_matrices(scores, max(c.max_fraction for c in cands))
    selected = [name for name, _ in ranking[:top_k]]
    grads = {name: grads[name] for name in selected}  # free the rest
    decomps = {name: singular_value_gradients(targets[name].weight, grads[name]) for name in selected}
    originals = {name: targets[name] for name in selected}
    base_loss = _task_loss(model, batches, loss_fn)
    label_cache: dict[tuple[str, int, str], torch.Tensor] = {}

    def build(c: CTICandidate, name: str) -> tuple[nn.Module, dict[str, Any]]:
        module = originals[name]
        w, b = module.weight, module.bias
        if c.n_clusters > 1:
            key = (name, c.n_clusters, c.cluster_method)
            if key not in label_cache:
                label_cache[key] = cluster_rows(w, min(c.n_clusters, w.shape[0]), c.cluster_method, seed)
            new = cti_cluster_truncate(w, b, grads[name], label_cache[key], c.max_fraction, c.keep_ratio)
            return new, {"kind": "clustered", "rank": None}
        U, S, Vh, dsigma = decomps[name]
        cap = None if c.keep_ratio is None else rank_for_budget(w.shape[0], w.shape[1], c.keep_ratio)
        new = cti_truncate(w, b, U, S, Vh, dsigma, c.max_fraction, cap)
        if isinstance(new, LowRankLinear):
            return new, {"kind": "low_rank", "rank": new.rank}
        return new, {"kind": "dense", "rank": int(cti_keep_mask(S, dsigma, c.max_fraction, cap).sum())}

    trials: list[dict[str, Any]] = []
    best, best_modules = None, None
    for c in cands:
        built = {name: build(c, name) for name in selected}
        try:
            for name, (new, _) in built.items():
                _swap(model, name, new)
            loss = _task_loss(model, batches, loss_fn)
        finally:  # the next candidate (and an error) starts from the original model
            for name, module in originals.items():
                _swap(model, name, module)
        trials.append({"candidate": asdict(c), "loss": loss,
                       "params_before": sum(_params(m) for m in originals.values()),
                       "params_after": sum(_params(new) for new, _ in built.values()),
                       "modules": {name: info for name, (_, info) in built.items()}})  # fmt: skip
        if best is None or loss < trials[best]["loss"]:
            best, best_modules = len(trials) - 1, {name: new for name, (new, _) in built.items()}
    applied = not require_improvement or trials[best]["loss"] < base_loss
    if applied:
        for name, new in best_modules.items():
            _swap(model, name, new)
    return {"samples": samples, "base_loss": base_loss, "ranking": ranking, "selected": selected,
            "trials": trials, "best": best, "applied": applied, "params_after": _params(model)}  # fmt: skip
