"""Distillation objectives on ranker scores and hidden states: binary KL, listwise KL, margin-MSE, hidden MSE/cosine.

A ranker here is a causal LM scored through its Yes/No verbalizer (:mod:`recsys_slm.ranker.verbalizer`): per
(user, candidate) prompt it yields two logits ``[logit_yes, logit_no]`` (B, 2), the ranking score
``logit_diff = logit_yes − logit_no`` and ``P(yes) = sigmoid(logit_diff)``. These losses consume those tensors,
never full-vocabulary logits. All of them detach the teacher side.

References:
    Hinton et al. 2015, https://arxiv.org/abs/1503.02531
    Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
    Distillation" (Margin-MSE), https://arxiv.org/abs/2010.02666
    Sun et al. 2019 (patient KD, intermediate layers), https://arxiv.org/abs/1908.09355 ;
    Jiao et al. 2020 (TinyBERT: uniform layer mapping, learned projection), https://arxiv.org/abs/1909.10351
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recsys_slm.distill.losses import LOG_FLOOR, keep_rows, kl_rows, masked_mean, upcast_half


def _logit_diff(logits: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 2) [yes, no] logits → (B,) ``yes − no``; a (B,) tensor is taken as the difference already."""
    logits = upcast_half(logits)
    if logits.dim() == 2 and logits.shape[1] == 2:
        return logits[:, 0] - logits[:, 1]
    if logits.dim() == 1:
        return logits
    raise ValueError(
        f"{name} must be (B, 2) [yes, no] logits or (B,) logit differences, got {tuple(logits.shape)}"
    )


class BinaryKLLoss(nn.Module):
    """KL between the teacher's and the student's Bernoulli P(yes), at temperature T, times T².

    ``p = sigmoid((t_yes − t_no)/T)``, ``q = sigmoid((s_yes − s_no)/T)``,
    ``L = T² · mean_b [p log(p/q) + (1 − p) log((1 − p)/(1 − q))]``. This equals the forward KL of the
    2-way softmax over the verbalizer logits (the vocabulary restricted to {yes, no}).

    Inputs:
        ``student_logits``: (B, 2) [yes, no] verbalizer logits (``VerbalizerScorer.verbalizer_logits``) or (B,)
        logit differences. ``teacher_logits``: the same for the teacher, e.g. cached teacher scores.
        ``mask (B,)``: rows to keep.

    Args:
        temperature (float): T > 0.
        t2_scaling (bool): multiply by T².

    References:
        Hinton et al. 2015, https://arxiv.org/abs/1503.02531 ; TALLRec Yes/No verbalizer,
        https://arxiv.org/abs/2305.00447
    """

    def __init__(self, temperature: float = 1.0, t2_scaling: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.t2_scaling = t2_scaling

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        s = _logit_diff(student_logits, "student_logits") / self.temperature
        t = _logit_diff(teacher_logits.detach(), "teacher_logits") / self.temperature
        if s.shape != t.shape:
            raise ValueError(f"student and teacher give {s.shape[0]} and {t.shape[0]} rows")
        student_logp = torch.stack([F.logsigmoid(s), F.logsigmoid(-s)], dim=-1)  # log q, log(1 − q)
        teacher_logp = torch.stack([F.logsigmoid(t), F.logsigmoid(-t)], dim=-1)
        loss = masked_mean(kl_rows(teacher_logp, student_logp), keep_rows(mask, s.shape[0], s.device))
        return loss * self.temperature**2 if self.t2_scaling else loss


class ListwiseKLLoss(nn.Module):
    """KL between teacher and student softmax distributions over one user's candidate list.

    For each row b (one user, N candidates): ``p_b = softmax(teacher_scores[b]/T)``,
    ``q_b = softmax(student_scores[b]/T)`` over the unmasked candidates,
    ``L = T² · mean_b KL(p_b || q_b)``. Rows with no unmasked candidate are skipped; a row with one candidate
    contributes 0.

    Inputs:
        ``student_scores (B, N)`` and ``teacher_scores (B, N)``: ranking scores (e.g. ``logit_diff``) of the same
        N candidates per user, in the same order. ``mask (B, N)``: True for real candidates (ragged lists
        padded to N).

    Args:
        temperature (float): T > 0.
        t2_scaling (bool): multiply by T².

    References:
        Hinton et al. 2015, https://arxiv.org/abs/1503.02531 ; ListNet's top-one softmax over a list (Cao et al.
        2007), https://doi.org/10.1145/1273496.1273513 (KL = ListNet's cross-entropy minus the teacher entropy)
    """

    def __init__(self, temperature: float = 1.0, t2_scaling: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.t2_scaling = t2_scaling

    def forward(
        self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if student_scores.dim() != 2 or student_scores.shape != teacher_scores.shape:
            raise ValueError(
                f"student_scores and teacher_scores must both be (B, N), got {tuple(student_scores.shape)} and "
                f"{tuple(teacher_scores.shape)}"
            )
        teacher_scores = teacher_scores.detach()
        if mask is not None:
            if mask.shape != student_scores.shape:
                raise ValueError(f"mask must be {tuple(student_scores.shape)}, got {tuple(mask.shape)}")
            mask = mask != 0
            rows = mask.any(dim=1)
            student_scores, teacher_scores, mask = student_scores[rows], teacher_scores[rows], mask[rows]
            student_scores = student_scores.masked_fill(~mask, float("-inf"))
            teacher_scores = teacher_scores.masked_fill(~mask, float("-inf"))
        student_logp = F.log_softmax(upcast_half(student_scores) / self.temperature, dim=-1).clamp_min(
            LOG_FLOOR
        )
        teacher_logp = F.log_softmax(upcast_half(teacher_scores) / self.temperature, dim=-1).clamp_min(
            LOG_FLOOR
        )
        loss = masked_mean(kl_rows(teacher_logp, student_logp), None)
        return loss * self.temperature**2 if self.t2_scaling else loss


class MarginMSELoss(nn.Module):
    """Margin-MSE: MSE between the student's and the teacher's score margins of (positive, negative) pairs.

    ``L = mean over pairs (i, j) of [(s_i − s_j) − (t_i − t_j)]²``. Only score *differences* are matched, so the
    student may keep its own score offset and scale-free calibration is not required.

    Which pairs:
        - ``labels=None`` (triples / one positive per list): column 0 is the positive and columns 1..N−1 are
          negatives; pairs are (0, j) for every unmasked j ≥ 1. ``N = 2`` is the paper's (query, d+, d−) triple.
          A *pointwise* ranker that scores each (user, item) row separately gives this layout by stacking the
          scores of a positive row and its negative row(s) into ``(B, 2)`` (or ``(B, 1 + negatives)``).
        - ``labels (B, N)`` given (listwise input with graded or binary relevance): every ordered pair (i, j) of
          unmasked candidates of the same row with ``labels[b, i] > labels[b, j]``.

    Inputs:
        ``student_scores (B, N)``, ``teacher_scores (B, N)``: ranking scores (e.g. ``logit_diff``) of the same
        candidates. ``labels (B, N)`` optional relevance. ``mask (B, N)`` optional, True for real candidates.

    References:
        Hofstätter et al. 2020, https://arxiv.org/abs/2010.02666
    """

    def forward(
        self,
        student_scores: torch.Tensor,
        teacher_scores: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if student_scores.dim() != 2 or student_scores.shape != teacher_scores.shape:
            raise ValueError(
                f"student_scores and teacher_scores must both be (B, N), got {tuple(student_scores.shape)} and "
                f"{tuple(teacher_scores.shape)}"
            )
        if student_scores.shape[1] < 2:
            raise ValueError("margin-MSE needs at least 2 candidates per row (a positive and a negative)")
        s = upcast_half(student_scores)
        t = teacher_scores.detach().to(s.dtype)
        valid = torch.ones_like(s, dtype=torch.bool) if mask is None else (mask != 0)
        if valid.shape != s.shape:
            raise ValueError(f"mask must be {tuple(s.shape)}, got {tuple(valid.shape)}")
        if labels is None:
            margins_s = s[:, :1] - s[:, 1:]
            margins_t = t[:, :1] - t[:, 1:]
            pairs = valid[:, :1] & valid[:, 1:]
        else:
            if labels.shape != s.shape:
                raise ValueError(f"labels must be {tuple(s.shape)}, got {tuple(labels.shape)}")
            margins_s = s[:, :, None] - s[:, None, :]
            margins_t = t[:, :, None] - t[:, None, :]
            pairs = (labels[:, :, None] > labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        return masked_mean(((margins_s - margins_t) ** 2)[pairs], None)


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """Pair each student layer with a teacher layer at the same relative depth (TinyBERT's uniform mapping).

    Indices are into Hugging Face ``output_hidden_states`` tuples, where index 0 is the embedding output and
    index i the output of block i. Student block i (1..L_S) maps to teacher block ``round(i · L_T / L_S)``
    (halves rounded up), so the last student block always maps to the last teacher block. Example: 2 student and
    4 teacher blocks → ``[(1, 2), (2, 4)]``; 30 → 16 blocks maps student 16 to teacher 30.

    Returns:
        list[tuple[int, int]]: ``(student_index, teacher_index)`` pairs, one per student block.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got {num_student_layers} and {num_teacher_layers}")
    return [
        (i, (2 * i * num_teacher_layers + num_student_layers) // (2 * num_student_layers))
        for i in range(1, num_student_layers + 1)
    ]


class HiddenStateLoss(nn.Module):
    """MSE or cosine distance between a student hidden state (projected) and a teacher hidden state.

    When the widths differ, a learned ``nn.Linear(student_dim, teacher_dim, bias=False)`` maps the student state
    into the teacher's space (TinyBERT's ``W_h``); the projection is trained with the student and discarded
    afterwards. Equal widths use the identity (no parameters). Use one ``HiddenStateLoss`` per mapped layer pair
    (see :func:`uniform_layer_map`), e.g. in an ``nn.ModuleList``, and give each its own projection.

    ``kind="mse"``: ``mean over positions and dims of (W h_S − h_T)²``. ``kind="cosine"``:
    ``mean over positions of 1 − cos(W h_S, h_T)`` (scale-free; useful when the two models' hidden norms differ
    by orders of magnitude, as across families).

    Inputs:
        ``student_hidden (..., student_dim)`` and ``teacher_hidden (..., teacher_dim)`` with the same leading
        dims: e.g. (B, H) states at the scoring position (``VerbalizerScorer.last_hidden``-style gather) or
        (B, L, H) with ``mask (B, L)``. Gather the positions first; do not match padding.

    Args:
        student_dim (int): student hidden width.
        teacher_dim (int): teacher hidden width.
        kind (str): ``"mse"`` or ``"cosine"``.

    References:
        Jiao et al. 2020 (TinyBERT), https://arxiv.org/abs/1909.10351 ; Sun et al. 2019 (PKD),
        https://arxiv.org/abs/1908.09355
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: Literal["mse", "cosine"] = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
        self.kind = kind
        self.proj: nn.Module = (
            nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)
        )
        self.student_dim, self.teacher_dim = student_dim, teacher_dim

    def forward(
        self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if student_hidden.shape[-1] != self.student_dim or teacher_hidden.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"expected widths {self.student_dim} (student) and {self.teacher_dim} (teacher), got "
                f"{student_hidden.shape[-1]} and {teacher_hidden.shape[-1]}"
            )
        if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
            raise ValueError(
                f"leading dims differ: {tuple(student_hidden.shape[:-1])} vs {tuple(teacher_hidden.shape[:-1])}"
            )
        s = self.proj(student_hidden).reshape(-1, self.teacher_dim)
        t = teacher_hidden.detach().to(s.dtype).reshape(-1, self.teacher_dim)
        if self.kind == "mse":
            per_row = ((s - t) ** 2).mean(-1)
        else:
            per_row = 1.0 - F.cosine_similarity(s, t, dim=-1)
        keep = None
        if mask is not None:
            if mask.shape != student_hidden.shape[:-1]:
                raise ValueError(f"mask must be {tuple(student_hidden.shape[:-1])}, got {tuple(mask.shape)}")
            keep = (mask != 0).reshape(-1)
        return masked_mean(per_row, keep)
