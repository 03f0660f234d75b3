"""On-policy distillation (GKD) and sequence-level KD of the ranker's completion.

Off-policy KD trains the student on prefixes it never produced itself; at inference it conditions on its own
outputs (exposure bias). GKD (Agarwal et al., ICLR'24, arXiv 2306.13649) fixes this by training on completions
the *student* samples: with probability λ (``student_fraction``) a micro-batch's completions are sampled from the
current student (temperature ``temperature``, up to ``max_new_tokens``), otherwise they are the data's
completion, here the answer word (" Yes" for a positive label, " No" otherwise; the teacher's sign for pairs
without a label). The teacher then scores every completion token and the student is trained towards the
teacher's next-token distribution at each of them with ``divergence`` (generalized JSD(β) by default; β = 0 is
forward KL, β = 1 reverse KL). Sequence-level KD (Kim & Rush, EMNLP'16, arXiv 1606.07947) instead uses the
teacher's greedy completions; ``divergence=ce`` trains on them with plain NLL, as in the paper.

One student forward serves both terms: prompts are left-padded to width P and completions right-padded to m,
so every row's answer position is P − 1 and completion token j is predicted at P − 1 + j. The ranker objective
reads the verbalizer at P − 1; the token term reads ``head(h)`` at the m completion positions only
(``(B, m, V)``, never the prompt positions). The teacher needs the same tokenizer (ids are compared).

Randomness (the λ coin and sampling) uses the global torch RNG, which training checkpoints save and restore, so
a resumed run draws the same completions as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from recsys_slm.config import check, validate_fields
from recsys_slm.distill.losses import divergence_rows


@dataclass
class OnPolicyConfig:
    """``on_policy.*`` keys of a distillation config.

    Fields:
        enabled (bool): add the completion token term. Default False.
        mode (str): "gkd" (student samples with probability λ, else the data's answer) or "sequence_kd"
            (the teacher's greedy completions). Default "gkd".
        student_fraction (float): λ, share of micro-batches with student-sampled completions (gkd). Default 0.5.
        max_new_tokens (int): completion length cap. Default 8.
        temperature (float): sampling temperature of the student (0 = greedy). Default 1.0.
        divergence (str): jsd | forward_kl | reverse_kl | ce (NLL of the completion tokens). Default "jsd".
        beta (float): JSD β in [0, 1]. Default 0.5.
        weight (float): weight of the token term added to the ranker objective. Default 1.0.
    """

    enabled: bool = False
    mode: Literal["gkd", "sequence_kd"] = "gkd"
    student_fraction: float = 0.5
    max_new_tokens: int = 8
    temperature: float = 1.0
    divergence: Literal["jsd", "forward_kl", "reverse_kl", "ce"] = "jsd"
    beta: float = 0.5
    weight: float = 1.0

    def __post_init__(self) -> None:
        validate_fields(self)
        check(0.0 <= self.student_fraction <= 1.0, "student_fraction", f"must be in [0, 1], got {self.student_fraction}")
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        check(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")


def layout(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int):
    """Left-pad prompts to P, right-pad completions to m → ``ids (B, P + m)``, ``mask (B, P + m)``,
    ``completion_mask (B, m)`` (1 on real completion tokens), and P."""
    width_p = max(len(p) for p in prompts)
    width_c = max(1, max(len(c) for c in completions))
    batch = len(prompts)
    ids = torch.full((batch, width_p + width_c), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    cmask = torch.zeros((batch, width_c), dtype=torch.bool)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[row, width_p - len(p) : width_p] = torch.as_tensor(p, dtype=torch.long)
        mask[row, width_p - len(p) : width_p] = 1
        if c:
            ids[row, width_p : width_p + len(c)] = torch.as_tensor(c, dtype=torch.long)
            mask[row, width_p : width_p + len(c)] = 1
            cmask[row, : len(c)] = True
    return ids, mask, cmask, width_p


def hidden_states(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) ids and mask → (B, L, H) final hidden states (positions from the mask: padding never shifts them)."""
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state


@torch.no_grad()
def sample_completions(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                       eos_ids: set[int], pad_id: int) -> list[list[int]]:  # fmt: skip
    """Sample a completion per prompt from ``model`` (greedy when ``temperature`` is 0), stopping at an EOS id
    (kept) or ``max_new_tokens``. A plain loop over full forwards: completions are a few tokens long."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        completions: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        head = model.get_output_embeddings()
        for _ in range(max_new_tokens):
            ids, mask, cmask, width_p = layout(prompts, completions, pad_id)
            hidden = hidden_states(model, ids.to(device), mask.to(device))
            lengths = torch.tensor([len(c) for c in completions], device=device)
            last = width_p - 1 + lengths  # the position predicting the next token of each row
            logits = head(hidden[torch.arange(len(prompts), device=device), last]).float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1).squeeze(-1)
            for row, token in enumerate(nxt.tolist()):
                if not done[row]:
                    completions[row].append(token)
                    done[row] = token in eos_ids
            if all(done):
                break
        return completions
    finally:
        model.train(was_training)


def completion_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, completion_ids: torch.Tensor,
                          completion_mask: torch.Tensor, cfg: OnPolicyConfig) -> torch.Tensor:  # fmt: skip
    """Per-sequence mean over completion tokens of the divergence, summed over the batch.

    Args:
        student_logits (torch.Tensor): (B, m, V) student logits at the completion positions.
        teacher_logits (torch.Tensor): (B, m, V) teacher logits there (detached).
        completion_ids (torch.Tensor): (B, m) the completion tokens (for divergence=ce).
        completion_mask (torch.Tensor): (B, m) bool, real tokens.
        cfg (OnPolicyConfig): divergence and β.

    Returns:
        torch.Tensor: scalar, Σ_b mean_{t ∈ completion_b} D_t (rows with no completion contribute 0).
    """
    b, m, v = student_logits.shape
    s = F.log_softmax(student_logits.float().reshape(b * m, v), -1)
    if cfg.divergence == "ce":
        rows = -s.gather(1, completion_ids.reshape(-1, 1).to(s.device)).squeeze(1)
    else:
        t = F.log_softmax(teacher_logits.detach().float().reshape(b * m, v), -1)
        kind = {"jsd": "jsd", "forward_kl": "forward_kl", "reverse_kl": "reverse_kl"}[cfg.divergence]
        rows = divergence_rows(kind, s, t, cfg.beta)
    rows = rows.reshape(b, m) * completion_mask.to(rows.device)
    counts = completion_mask.sum(-1).clamp(min=1).to(rows.device)
    return (rows.sum(-1) / counts).sum()
