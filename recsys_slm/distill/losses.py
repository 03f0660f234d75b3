"""Token-distribution distillation losses: forward/reverse KL, generalized JSD(β), total variation, top-k KD.

Every loss here takes logits of the **positions that matter only**, flattened to rows: ``student_logits (N, V)``
and ``teacher_logits (N, V)`` where N is the number of selected positions (answer tokens of a completion,
verbalizer positions of a ranker prompt, ...). Callers gather those positions first, from hidden states, and
apply the output head to the gathered rows only. Never build a ``(B, L, V)`` logits tensor for every position:
for a 49k-token vocabulary it dominates memory (see docs/ranker.md).

Conventions shared by all losses:

- ``p_T = softmax(teacher_logits / T)`` and ``q_S = softmax(student_logits / T)``: both models use the same
  temperature ``T`` (Hinton et al. 2015).
- With ``t2_scaling=True`` (default) the divergence is multiplied by ``T²`` so that its gradient magnitude does not
  shrink as ``1/T²`` when T is raised (Hinton et al. 2015, §2; FMCHISEL does the same; TRL's GKD does not).
- ``mask (N,)`` (bool, or numbers where non-zero means keep) selects rows; the loss is the mean of the per-row
  divergence over the kept rows (0 with a gradient path when no row is kept). Masked rows are never computed,
  so they may hold anything.
- The teacher side is always detached: no gradient reaches the teacher.
- Half-precision logits are upcast to float32; float64 stays float64.
- Log-probabilities of ids masked with ``-inf`` (e.g. filler ids) are floored at ``LOG_FLOOR`` so that a zero
  probability contributes exactly 0 and gradients stay finite.

References:
    Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531
    Agarwal et al. 2024 (GKD), "On-Policy Distillation of Language Models", https://arxiv.org/abs/2306.13649
    Gu et al. 2024 (MiniLLM, reverse KL), https://arxiv.org/abs/2306.08543
    TRL ``GKDTrainer.generalized_jsd_loss`` (huggingface/trl, ``trl/trainer/gkd_trainer.py``)
    FMCHISEL ``src/fmchisel/distillation/losses.py`` (linkedin/FMCHISEL): T² scaling, TVD, (1 − r)·CE + r·KD
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recsys_slm.config import check, validate_fields

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tv"]
LossKind = Literal["forward_kl", "reverse_kl", "jsd", "tv", "ce"]

# Finite stand-in for log(0): exp(LOG_FLOOR) == 0 exactly in float32/float64, and differences of floors stay
# finite, so 0·log 0 terms evaluate to 0 without NaN gradients.
LOG_FLOOR = -1.0e30

# Bytes per cached position for top-k teacher logits: k int32 ids + k float16 log-probs.
TOPK_BYTES_PER_ID = 4 + 2


# ------------------------------------------------------------------------------------------------ helpers
def upcast_half(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32; other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the last dim, upcast from half precision, floored at ``LOG_FLOOR``."""
    return F.log_softmax(upcast_half(logits) / temperature, dim=-1).clamp_min(LOG_FLOOR)


def keep_rows(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    """``mask (N,)`` → bool ``(N,)`` (``None`` stays ``None``). Raises ValueError on a shape mismatch."""
    if mask is None:
        return None
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape ({n},) to match the {n} logit rows, got {tuple(mask.shape)}")
    return (mask != 0).to(device)


def masked_mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values (N,)`` over rows where ``keep``; an empty selection gives 0 (still differentiable)."""
    if keep is not None:
        values = values[keep]
    if values.numel() == 0:
        return values.sum()  # 0.0 with a grad_fn when values depends on parameters
    return values.mean()


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be (N, V) with the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}; gather the positions to distil first"
        )


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise ``KL(p || q) = Σ_v p(v) (log p(v) − log q(v))`` from log-probabilities ``(N, V)`` → ``(N,)``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence_rows(
    kind: Divergence, student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Per-row divergence between two rows of log-probabilities ``(N, V)`` → ``(N,)``.

    ``kind``: ``"forward_kl"`` KL(p_T || q_S), ``"reverse_kl"`` KL(q_S || p_T), ``"jsd"`` generalized JSD(β)
    (see :func:`generalized_jsd`), ``"tv"`` ``½ Σ_v |q_S − p_T|``. The inputs may be any probability vectors
    over a common support (full vocabularies, top-k + tail buckets, shared-vocabulary buckets).
    """
    if kind == "forward_kl":
        return kl_rows(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return kl_rows(student_logp, teacher_logp)
    if kind == "tv":
        return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if beta == 0.0:  # TRL special case: exactly forward KL
            return kl_rows(teacher_logp, student_logp)
        if beta == 1.0:  # TRL special case: exactly reverse KL
            return kl_rows(student_logp, teacher_logp)
        # log M = log((1 − β) q_S + β p_T), computed in log space as TRL does
        mixture_logp = torch.logsumexp(
            torch.stack([student_logp + math.log1p(-beta), teacher_logp + math.log(beta)]), dim=0
        )
        return beta * kl_rows(teacher_logp, mixture_logp) + (1.0 - beta) * kl_rows(student_logp, mixture_logp)
    raise ValueError(f"unknown divergence {kind!r}; choose forward_kl, reverse_kl, jsd or tv")


def _distill(
    kind: Divergence,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    beta: float,
    t2_scaling: bool,
) -> torch.Tensor:
    _check_pair(student_logits, teacher_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = keep_rows(mask, student_logits.shape[0], student_logits.device)
    if keep is not None:
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
    student_logp = log_probs(student_logits, temperature)
    teacher_logp = log_probs(teacher_logits.detach(), temperature)
    loss = masked_mean(divergence_rows(kind, student_logp, teacher_logp, beta), None)
    return loss * temperature**2 if t2_scaling else loss


# ------------------------------------------------------------------------------------------------ functions
def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    t2_scaling: bool = True,
) -> torch.Tensor:
    """Forward KL ``T² · mean_n Σ_v p_T(v) log(p_T(v) / q_S(v))`` (mode-covering; supervised KD).

    This is the exact KL, including the teacher-entropy term that FMCHISEL's teacher-weighted CE drops (the
    gradient is the same; the value here is 0 when the distributions agree).

    Args:
        student_logits (torch.Tensor): (N, V) student logits at the N selected positions.
        teacher_logits (torch.Tensor): (N, V) teacher logits at the same positions (detached here).
        mask (torch.Tensor | None): (N,) rows to keep; None keeps all.
        temperature (float): T > 0 applied to both models.
        t2_scaling (bool): multiply by T².

    Returns:
        torch.Tensor: scalar loss.

    References:
        Hinton et al. 2015, https://arxiv.org/abs/1503.02531 ; GKD Eq. 3, https://arxiv.org/abs/2306.13649
    """
    return _distill("forward_kl", student_logits, teacher_logits, mask, temperature, 0.5, t2_scaling)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    t2_scaling: bool = True,
) -> torch.Tensor:
    """Reverse KL ``T² · mean_n Σ_v q_S(v) log(q_S(v) / p_T(v))`` (mode-seeking; MiniLLM's choice).

    Args: as :func:`forward_kl`.

    References:
        Gu et al. 2024 (MiniLLM), https://arxiv.org/abs/2306.08543
    """
    return _distill("reverse_kl", student_logits, teacher_logits, mask, temperature, 0.5, t2_scaling)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    t2_scaling: bool = True,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(β), written exactly as TRL's ``generalized_jsd_loss``.

    ``M = (1 − β)·q_S + β·p_T`` and ``JSD(β) = β·KL(p_T || M) + (1 − β)·KL(q_S || M)`` (GKD Eq. 1 with P = teacher,
    Q = student), times T² when ``t2_scaling``. ``β = 0.5`` is the symmetric JSD.

    Limits, as implemented (and tested):
        - ``β = 0`` exactly returns forward KL ``KL(p_T || q_S)`` and ``β = 1`` exactly returns reverse KL
          ``KL(q_S || p_T)``: the endpoints are special-cased, as in TRL and FMCHISEL.
        - The mixture formula itself tends to 0 at both ends (M → q_S as β → 0, M → p_T as β → 1); it is the
          *normalised* value that tends to the KLs: ``JSD(β)/β → KL(p_T || q_S)`` as β → 0 and
          ``JSD(β)/(1 − β) → KL(q_S || p_T)`` as β → 1. So JSD(β) is continuous in β on (0, 1) but jumps at the
          endpoints; this is the GKD/TRL convention "β = 0 → forward KL, β = 1 → reverse KL".

    Args:
        student_logits (torch.Tensor): (N, V) student logits at the selected positions.
        teacher_logits (torch.Tensor): (N, V) teacher logits (detached here).
        beta (float): interpolation weight in [0, 1].
        mask (torch.Tensor | None): (N,) rows to keep.
        temperature (float): T > 0 applied to both models.
        t2_scaling (bool): multiply by T² (TRL does not; FMCHISEL does).

    Returns:
        torch.Tensor: scalar loss.

    References:
        GKD, Agarwal et al. 2024, Eq. 1, https://arxiv.org/abs/2306.13649 ; TRL ``generalized_jsd_loss``.
    """
    return _distill("jsd", student_logits, teacher_logits, mask, temperature, beta, t2_scaling)


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    t2_scaling: bool = True,
) -> torch.Tensor:
    """Total variation distance ``T² · mean_n ½ Σ_v |q_S(v) − p_T(v)|`` (bounded in [0, 1] before T²).

    Args: as :func:`forward_kl`.

    References:
        FMCHISEL ``losses.py`` (TVD); Wen et al. 2023 "f-Divergence Minimization for Sequence-Level KD",
        https://arxiv.org/abs/2307.15190
    """
    return _distill("tv", student_logits, teacher_logits, mask, temperature, 0.5, t2_scaling)


def hard_label_ce(
    student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Cross-entropy of the student against ground-truth token ids, at temperature 1.

    Args:
        student_logits (torch.Tensor): (N, V) logits at the selected positions.
        labels (torch.Tensor): (N,) target ids; ``ignore_index`` rows are skipped.
        ignore_index (int): label value to skip.

    Returns:
        torch.Tensor: scalar mean CE over non-ignored rows (0 when every row is ignored).
    """
    if student_logits.dim() != 2 or labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"student_logits must be (N, V) and labels (N,), got {tuple(student_logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    keep = labels != ignore_index
    if not bool(keep.any()):
        return student_logits.sum() * 0.0
    return F.cross_entropy(upcast_half(student_logits[keep]), labels[keep])


def mix_losses(ce: torch.Tensor, kd: torch.Tensor, r: float) -> torch.Tensor:
    """``(1 − r)·CE + r·KD`` with the distillation ratio ``r`` in [0, 1] (FMCHISEL's ``distillation_loss_ratio``)."""
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"distillation ratio r must be in [0, 1], got {r}")
    return (1.0 - r) * ce + r * kd


# ------------------------------------------------------------------------------------------------ top-k
def topk_storage_bytes(k: int, num_positions: int = 1) -> int:
    """Bytes to cache top-k teacher logits: ``6·k`` per position (k int32 ids + k float16 log-probs).

    E.g. k = 20 over 8 answer positions = 960 bytes per example, versus ``2·V`` bytes per position for a full
    float16 row (98 KB for V = 49,152).
    """
    return TOPK_BYTES_PER_ID * k * num_positions


def topk_bucket_logprobs(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-grain both distributions onto the teacher's top-k support plus one tail bucket.

    Student: ``q_S = softmax(student_logits / T)``; buckets ``[q_S(id_1), …, q_S(id_k), 1 − Σ_i q_S(id_i)]``
    (the tail computed exactly as a logsumexp over the other ids). Teacher: the stored log-probs as they are
    (cache them at the temperature you distil at; the full teacher row is not available to re-temper), tail
    ``1 − Σ_i p_T(id_i)`` clamped at 0; if float16 rounding makes the stored top-k mass exceed 1 it is
    renormalised to 1, and when k = V (no tail) the stored top-k is renormalised to 1.

    Args:
        student_logits (torch.Tensor): (N, V).
        teacher_topk_ids (torch.Tensor): (N, k) distinct vocabulary ids (int32 or int64).
        teacher_topk_logprobs (torch.Tensor): (N, k) teacher log-probabilities of those ids (any float dtype).
        temperature (float): student temperature.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: student and teacher log-probabilities, each (N, k + 1).
    """
    n, vocab = student_logits.shape
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[0] != n:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must both be (N, k) with N = {n}"
        )
    ids = teacher_topk_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"teacher_topk_ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    student_logp = log_probs(student_logits, temperature)
    student_top = student_logp.gather(-1, ids)
    student_tail = torch.logsumexp(student_logp.scatter(-1, ids, LOG_FLOOR), dim=-1, keepdim=True)
    teacher_top = upcast_half(teacher_topk_logprobs.detach()).to(student_logp.dtype)
    if ids.shape[1] >= vocab:
        # The support is the whole vocabulary: the tail is empty on both sides, so any stored mass deficit is
        # rounding; renormalise instead of giving an empty student tail a non-zero teacher tail.
        teacher_top = teacher_top - torch.logsumexp(teacher_top, dim=-1, keepdim=True)
        teacher_tail = torch.full_like(teacher_top[:, :1], LOG_FLOOR)
    else:
        mass = teacher_top.exp().sum(-1, keepdim=True)
        teacher_top = teacher_top - mass.clamp_min(1.0).log()
        teacher_tail = (
            (1.0 - teacher_top.exp().sum(-1, keepdim=True)).clamp_min(0.0).log().clamp_min(LOG_FLOOR)
        )
    return (
        torch.cat([student_top, student_tail.clamp_min(LOG_FLOOR)], dim=-1),
        torch.cat([teacher_top.clamp_min(LOG_FLOOR), teacher_tail], dim=-1),
    )


def topk_distill_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: Divergence = "forward_kl",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    t2_scaling: bool = True,
) -> torch.Tensor:
    """A divergence between the student and a cached top-k teacher, on the k + 1 buckets of
    :func:`topk_bucket_logprobs`.

    Approximation: the teacher's distribution outside its top-k is unknown, so both distributions are merged
    into (top-k ids, everything else). For KL and TV this coarse-graining can only lower the value (data
    processing inequality): the top-k loss is a lower bound of the full-vocabulary loss, exact when the
    student's tail mass is spread like the teacher's, and exact when k = V.

    Storage: ``6·k`` bytes per cached position (:func:`topk_storage_bytes`).

    Args:
        student_logits (torch.Tensor): (N, V) student logits at the selected positions.
        teacher_topk_ids (torch.Tensor): (N, k) teacher top-k ids.
        teacher_topk_logprobs (torch.Tensor): (N, k) teacher log-probs of those ids.
        kind (str): ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"tv"``.
        mask (torch.Tensor | None): (N,) rows to keep.
        temperature (float): student temperature (and the T² factor).
        beta (float): JSD β.
        t2_scaling (bool): multiply by T².

    Returns:
        torch.Tensor: scalar loss.

    References:
        arcee-ai DistillKit (compressed top-k teacher logits); Hinton et al. 2015.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = keep_rows(mask, student_logits.shape[0], student_logits.device)
    if keep is not None:
        student_logits = student_logits[keep]
        teacher_topk_ids, teacher_topk_logprobs = teacher_topk_ids[keep], teacher_topk_logprobs[keep]
    student_logp, teacher_logp = topk_bucket_logprobs(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature
    )
    loss = masked_mean(divergence_rows(kind, student_logp, teacher_logp, beta), None)
    return loss * temperature**2 if t2_scaling else loss


# ------------------------------------------------------------------------------------------------ module
@dataclass
class DistillLossConfig:
    """Token-level distillation objective.

    Fields:
        kind (str, "forward_kl"): ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"tv"`` or ``"ce"`` (hard labels
            only, no teacher).
        temperature (float, 1.0): T applied to both models' logits for the divergence (CE always uses T = 1).
        beta (float, 0.5): JSD β in [0, 1] (0 → forward KL, 1 → reverse KL).
        ce_weight (float, 0.0): weight ``1 − r`` of the hard-label CE; the divergence gets ``r = 1 − ce_weight``.
            FMCHISEL's default r = 0.9 is ``ce_weight = 0.1``. Ignored when kind is "ce".
        t2_scaling (bool, True): multiply the divergence by T².
        ignore_index (int, -100): label value skipped by the CE term.
        version (int, 1): config schema version.
    """

    kind: LossKind = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    ce_weight: float = 0.0
    t2_scaling: bool = True
    ignore_index: int = -100
    version: int = 1

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        check(0.0 <= self.ce_weight <= 1.0, "ce_weight", f"must be in [0, 1], got {self.ce_weight}")


class DistillLoss(nn.Module):
    """``ce_weight·CE(student, labels) + (1 − ce_weight)·T²·D(p_T || q_S)`` over selected positions.

    Inputs:
        ``student_logits (N, V)``: student logits at N positions gathered by the caller (answer / verbalizer
        positions; never every position of a (B, L, V) tensor). Teacher: either ``teacher_logits (N, V)`` (same
        vocabulary) or the cached pair ``teacher_topk_ids (N, k)`` + ``teacher_topk_logprobs (N, k)``.
        ``labels (N,)``: ground-truth next-token ids (``ignore_index`` to skip), required when ``ce_weight > 0``
        or ``kind == "ce"``. ``mask (N,)``: rows to keep for both terms.

    Args:
        config (DistillLossConfig | None): the objective; default forward KL at T = 1.

    References:
        Hinton et al. 2015, https://arxiv.org/abs/1503.02531 ; GKD, https://arxiv.org/abs/2306.13649
    """

    def __init__(self, config: DistillLossConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else DistillLossConfig()

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        teacher_topk_ids: torch.Tensor | None = None,
        teacher_topk_logprobs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        need_ce = cfg.kind == "ce" or cfg.ce_weight > 0
        ce = None
        if need_ce:
            if labels is None:
                raise ValueError(f"labels are required for kind={cfg.kind!r} with ce_weight={cfg.ce_weight}")
            keep = keep_rows(mask, student_logits.shape[0], student_logits.device)
            if keep is not None:
                labels = labels.masked_fill(~keep.to(labels.device), cfg.ignore_index)
            ce = hard_label_ce(student_logits, labels, cfg.ignore_index)
        if cfg.kind == "ce":
            return ce
        if teacher_logits is not None:
            kd = _distill(
                cfg.kind, student_logits, teacher_logits, mask, cfg.temperature, cfg.beta, cfg.t2_scaling
            )
        elif teacher_topk_ids is not None and teacher_topk_logprobs is not None:
            kd = topk_distill_loss(
                student_logits, teacher_topk_ids, teacher_topk_logprobs, cfg.kind, mask, cfg.temperature,
                cfg.beta, cfg.t2_scaling,
            )  # fmt: skip
        else:
            raise ValueError(
                f"kind={cfg.kind!r} needs teacher_logits or (teacher_topk_ids, teacher_topk_logprobs)"
            )
        return kd if ce is None else mix_losses(ce, kd, 1.0 - cfg.ce_weight)
