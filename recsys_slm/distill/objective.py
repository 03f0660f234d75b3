"""The per-batch distillation objective of a pointwise ranker student (what ``recsys-slm distill`` minimises).

Everything is read at the answer position (the last prompt token, where " Yes"/" No" is predicted); the
student's hidden state there, ``h (B, H)``, gives the verbalizer logits ``(B, 2)`` and, for token-level losses,
the full next-token logits ``head(h) (B, V_S)``: one row per prompt, never ``(B, L, V)``.

``loss`` (per record; the trainer sums over the batch):

* ``sft``: hard labels only, ``BCE(σ(s_S), y)`` with ``s = logit_yes − logit_no`` (rows without a human label,
  i.e. teacher-labelled transfer pairs, contribute nothing).
* ``binary_kl``: soft labels, ``T²·KL(Bern(σ(s_T/T)) ‖ Bern(σ(s_S/T)))`` (:class:`BinaryKLLoss`); Hinton et al.
  2015 on the ranker's P(yes), the LinkedIn paper's (arXiv 2502.14305) soft-label KD.
* ``token_kd``: the answer-position next-token distribution against the teacher's cached top-k
  (:func:`topk_distill_loss`, ``divergence`` = forward_kl | reverse_kl | jsd | tv, × T²). Same tokenizer only.
* ``uld``: cross-tokenizer ULD (Boizard et al. 2024): sorted-probability L1 between the student's distribution
  and the teacher's (dense rows rebuilt from the top-k, see :func:`dense_teacher_logprobs`).
* ``gold``: cross-tokenizer GOLD (TRL): the answer word (" Yes" if the target is positive, else " No") is the
  one-group completion on both sides; generalized JSD(β) on the exactly shared vocabulary + ULD on the rest.

Mixing (FMCHISEL, methods §3): for every KD loss, ``(1 − r)·BCE(σ(s_S), y) + r·KD`` with ``r = kd_weight``;
rows without a label get ``r·KD`` only. ``sft`` ignores ``kd_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from recsys_slm.config import check, validate_fields
from recsys_slm.distill.losses import topk_distill_loss
from recsys_slm.distill.ranker_losses import BinaryKLLoss

LossKind = Literal["sft", "binary_kl", "token_kd", "uld", "gold"]
TOKEN_LOSSES = ("token_kd", "uld", "gold")


@dataclass
class ObjectiveConfig:
    """``objective.*`` keys of a distillation config (see ``docs/distillation.md``).

    Fields:
        loss (str): sft | binary_kl | token_kd | uld | gold. Default "binary_kl".
        temperature (float): softmax temperature T of the KD term (student side; teacher side for binary_kl,
            the teacher's top-k were cached at the cache's temperature). Default 1.0.
        kd_weight (float): r in ``(1 − r)·CE + r·KD``, in [0, 1]. Default 1.0 (pure KD).
        divergence (str): token_kd divergence: forward_kl | reverse_kl | jsd | tv. Default "forward_kl".
        beta (float): generalized-JSD β for divergence=jsd and for gold, in [0, 1]. Default 0.5.
        t2_scaling (bool): multiply KD terms by T² (Hinton). Default True.
        hidden_weight (float): weight of the intermediate-state term (answer-position hidden states of mapped
            layer pairs; needs the teacher model and equal widths). 0 = off. Default 0.
        hidden_kind (str): "mse" or "cosine" for that term. Default "mse".
    """

    loss: LossKind = "binary_kl"
    temperature: float = 1.0
    kd_weight: float = 1.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv"] = "forward_kl"
    beta: float = 0.5
    t2_scaling: bool = True
    hidden_weight: float = 0.0
    hidden_kind: Literal["mse", "cosine"] = "mse"

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.hidden_weight >= 0, "hidden_weight", f"must be >= 0, got {self.hidden_weight}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0.0 <= self.kd_weight <= 1.0, "kd_weight", f"must be in [0, 1], got {self.kd_weight}")
        check(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")


def dense_teacher_logprobs(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, vocab_rows: int, ignore_ids: list[int] | None = None
) -> torch.Tensor:
    """Rebuild full teacher rows from a top-k cache: the k stored log-probs, the tail mass ``1 − Σ top-k``
    spread evenly over the other non-ignored ids, ignored ids at −inf.

    Args:
        topk_ids (torch.Tensor): (N, k) int ids.
        topk_logprobs (torch.Tensor): (N, k) log-probs.
        vocab_rows (int): V, the teacher's output-head width.
        ignore_ids (list[int] | None): ids that must carry no mass (filler rows).

    Returns:
        torch.Tensor: (N, V) float32 log-probs that sum to 1 per row (exactly the cached top-k on its ids).
        For ULD the sorted tail is then flat instead of the teacher's true decay: an approximation that only
        touches the smallest probabilities (document k with the result).
    """
    n, k = topk_ids.shape
    ignore = torch.as_tensor(sorted(set(ignore_ids or [])), dtype=torch.long)
    lp = topk_logprobs.float()
    tail = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)  # (N,)
    n_tail = vocab_rows - k - len(ignore)
    fill = torch.log(tail / max(1, n_tail)).clamp_min(-1e4) if n_tail > 0 else torch.full((n,), -1e4)
    out = fill[:, None].expand(n, vocab_rows).clone()
    if len(ignore):
        out[:, ignore] = float("-inf")
    out.scatter_(1, topk_ids.long(), lp)
    return out


class RankerObjective:
    """Computes the summed loss of a batch for :class:`ObjectiveConfig` (see the module docstring).

    Args:
        cfg (ObjectiveConfig): which loss.
        gold (GoldLoss | None): a ready :class:`GoldLoss` for loss=gold (built from the two tokenizers).
        teacher_vocab_rows (int): the teacher's head width (uld / gold dense rows).
        teacher_ignore_ids / student_ignore_ids (list[int]): filler ids masked on each side.
        answer_ids (tuple[tuple[int, int], tuple[int, int]]): ((student yes, student no), (teacher yes, teacher
            no)) token ids of the answer words, for gold's one-group completions.
    """

    def __init__(self, cfg: ObjectiveConfig, gold=None, teacher_vocab_rows: int = 0,
                 teacher_ignore_ids: list[int] | None = None, student_ignore_ids: list[int] | None = None,
                 answer_ids: tuple[tuple[int, int], tuple[int, int]] | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.binary_kl = BinaryKLLoss(cfg.temperature, cfg.t2_scaling)
        self.gold = gold
        self.teacher_vocab_rows = teacher_vocab_rows
        self.teacher_ignore_ids = list(teacher_ignore_ids or [])
        self.student_ignore_ids = list(student_ignore_ids or [])
        self.answer_ids = answer_ids

    def __call__(
        self,
        student_verbalizer: torch.Tensor,
        student_full: torch.Tensor | None,
        labels: torch.Tensor,
        teacher_score: torch.Tensor | None,
        topk_ids: torch.Tensor | None = None,
        topk_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss over the batch and its components (summed) for logging.

        Args:
            student_verbalizer (torch.Tensor): (B, 2) float32 [yes, no] logits.
            student_full (torch.Tensor | None): (B, V_S) answer-position logits (token-level losses only).
            labels (torch.Tensor): (B,) float, 0/1 or NaN where no human label exists.
            teacher_score (torch.Tensor | None): (B,) teacher logit_yes − logit_no (all KD losses).
            topk_ids / topk_logprobs (torch.Tensor | None): (B, k) teacher top-k (token-level losses).
        """
        cfg = self.cfg
        score = student_verbalizer[:, 0] - student_verbalizer[:, 1]
        has_label = ~torch.isnan(labels)
        ce_rows = F.binary_cross_entropy_with_logits(
            score, torch.nan_to_num(labels, nan=0.0), reduction="none"
        ) * has_label  # (B,), 0 where unlabelled
        ce_sum = ce_rows.sum()
        if cfg.loss == "sft":
            return ce_sum, {"ce": float(ce_sum.detach())}
        n = score.shape[0]
        if cfg.loss == "binary_kl":
            kd_sum = self.binary_kl(score, teacher_score) * n
        elif cfg.loss == "token_kd":
            kd_sum = topk_distill_loss(
                student_full, topk_ids, topk_logprobs, kind=cfg.divergence, temperature=cfg.temperature,
                beta=cfg.beta, t2_scaling=cfg.t2_scaling,
            ) * n  # fmt: skip
        elif cfg.loss == "uld":
            from recsys_slm.distill.cross_tokenizer import uld_distance

            teacher = dense_teacher_logprobs(topk_ids, topk_logprobs, self.teacher_vocab_rows, self.teacher_ignore_ids)
            kd_sum = uld_distance(
                student_full, teacher.to(student_full.device), None, cfg.temperature, 1.0,
                self.student_ignore_ids, self.teacher_ignore_ids,
            ) * n  # fmt: skip
        else:  # gold
            teacher = dense_teacher_logprobs(topk_ids, topk_logprobs, self.teacher_vocab_rows, self.teacher_ignore_ids)
            teacher = teacher.to(student_full.device)
            (s_yes, s_no), (t_yes, t_no) = self.answer_ids
            positive = torch.where(has_label, labels > 0.5, teacher_score > 0)
            kd_sum = student_full.new_zeros(())
            for i in range(n):
                s_id, t_id = (s_yes, t_yes) if bool(positive[i]) else (s_no, t_no)
                kd_sum = kd_sum + self.gold(
                    student_full[i : i + 1] / cfg.temperature, teacher[i : i + 1], [s_id], [t_id], [(0, 1)], [(0, 1)]
                )
        r = cfg.kd_weight
        total = (1.0 - r) * ce_sum + r * kd_sum
        return total, {"ce": float(ce_sum.detach()), "kd": float(kd_sum.detach())}
