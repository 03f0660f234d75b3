"""Score-distillation losses for the two-tower retriever (sentence-transformers compatible modules).

Notation for one batch of B (user text, positive item text) pairs: student embeddings ``u_s, i_s`` (B, d_s) and
teacher embeddings ``u_t, i_t`` (B, d_t), all L2-normalised (the teacher's are normalised again here). The
in-batch similarity matrices are ``S = u_s i_sᵀ`` and ``T = u_t i_tᵀ`` (B, B): row ``b`` scores user ``b`` against
every item of the batch, its own positive on the diagonal and the other rows' positives as negatives.

* **listwise KL** — ``L = (1/B) Σ_b KL(softmax(T_b / τ_t) ‖ softmax(S_b / τ_s))``: the student matches the
  teacher's whole distribution over the in-batch candidates (not only which one is the positive).
* **in-batch margin-MSE** — ``L = mean_{b ≠ j} ((S_bb − S_bj) − (T_bb − T_bj))²``: the MarginMSE objective of
  Hofstätter et al. (``sentence_transformers`` ``MarginMSELoss``) over every in-batch negative instead of one
  mined negative.

* **logQ-corrected in-batch softmax** — ``L = −(1/B) Σ_b log softmax_j(scale · cos(u_b, i_j) − log q_j)[b]``
  with ``q_j`` the probability that item ``j`` appears as a positive (its share of the training pairs): the
  sampling-bias correction of Yi et al. (RecSys 2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus
  Item Recommendations"). In-batch negatives are drawn in proportion to popularity, so plain MNRL pushes popular
  items down (it learns a pointwise mutual information, not the full softmax); subtracting ``log q_j`` removes
  that bias, so the encoder keeps the popularity signal that a next-item Recall@K rewards.

:class:`RetrieverDistillLoss` combines them with embedding matching (``MSELoss`` / ``EmbedDistillLoss`` of
sentence-transformers, with a learnable ``Linear(d_s, d_t)`` projection when the widths differ; the projection is
part of the loss, not of the saved student) and, optionally, the in-batch contrastive loss on the true pairs, over
a Matryoshka dimension ladder for the score terms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def listwise_kl(
    student_u: Tensor, student_i: Tensor, teacher_u: Tensor, teacher_i: Tensor,
    temperature: float = 0.05, teacher_temperature: float | None = None,
) -> Tensor:  # fmt: skip
    """Mean over rows of KL(teacher ‖ student) between in-batch softmax distributions (see the module docstring).

    Args:
        student_u, student_i (Tensor (B, d_s)): student user / item embeddings (normalised by the caller).
        teacher_u, teacher_i (Tensor (B, d_t)): teacher embeddings (normalised here).
        temperature (float): τ_s, dividing the student's cosine similarities.
        teacher_temperature (float | None): τ_t; None = τ_s.
    """
    tau_t = temperature if teacher_temperature is None else teacher_temperature
    t_u = F.normalize(teacher_u.to(student_u.dtype), dim=-1)
    t_i = F.normalize(teacher_i.to(student_u.dtype), dim=-1)
    log_q = F.log_softmax(student_u @ student_i.T / temperature, dim=-1)
    log_p = F.log_softmax(t_u @ t_i.T / tau_t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def inbatch_margin_mse(student_u: Tensor, student_i: Tensor, teacher_u: Tensor, teacher_i: Tensor) -> Tensor:
    """Mean over ordered pairs b ≠ j of ((S_bb − S_bj) − (T_bb − T_bj))² (cosine similarities, no temperature)."""
    t_u = F.normalize(teacher_u.to(student_u.dtype), dim=-1)
    t_i = F.normalize(teacher_i.to(student_u.dtype), dim=-1)
    s = student_u @ student_i.T
    t = t_u @ t_i.T
    ms = s.diagonal()[:, None] - s
    mt = t.diagonal()[:, None] - t
    b = s.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    if b < 2:
        return s.sum() * 0.0
    return ((ms - mt)[off] ** 2).mean()


def logq_inbatch_ce(u: Tensor, i: Tensor, log_q: Tensor, scale: float = 20.0) -> Tensor:
    """In-batch softmax cross-entropy with the logQ sampling-bias correction (see the module docstring).

    Args:
        u, i (Tensor (B, d)): user / positive-item embeddings (normalised here); row b's positive is i[b].
        log_q (Tensor (B,)): log sampling probability of each row's positive item.
        scale (float): 1 / temperature of the cosine similarities (MNRL's ``scale``).

    Returns:
        Tensor (): mean over rows of −log softmax_j(scale · cos(u_b, i_j) − log q_j) at j = b.
    """
    logits = scale * F.normalize(u, dim=-1) @ F.normalize(i, dim=-1).T - log_q.to(u.dtype)[None, :]
    return F.cross_entropy(logits, torch.arange(len(u), device=u.device))


class LogQCorrectedMNRLoss(nn.Module):
    """MultipleNegativesRankingLoss with the logQ correction, as a sentence-transformers loss.

    Inputs: (anchor, positive) text columns; ``labels`` (B,) = log q of each row's positive item (the training
    pairs' item frequencies). Works inside ``MatryoshkaLoss`` (the embeddings come through ``embed_columns``).

    Args:
        model: the ``SentenceTransformer`` being trained.
        scale (float): 1 / temperature. Default 20.
    """

    def __init__(self, model: Any, scale: float = 20.0):
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        u, i = embed_columns(self.model, sentence_features)
        return logq_inbatch_ce(u, i, labels.to(u.device), self.scale)

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "correction": "logQ (Yi et al. 2019)"}


class ListwiseKLLoss(nn.Module):
    """Listwise KL distillation over in-batch candidates, as a sentence-transformers loss.

    Inputs: (anchor, positive) text columns; ``labels`` = teacher embeddings (B, 2, d_t) (anchor, positive), the
    EmbedDistillLoss convention for per-column teacher embeddings.

    Args:
        model: the student ``SentenceTransformer``.
        temperature (float): τ_s. Default 0.05.
        teacher_temperature (float | None): τ_t; None = τ_s.
    """

    def __init__(self, model: Any, temperature: float = 0.05, teacher_temperature: float | None = None):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        u, i = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(u, i, labels[:, 0], labels[:, 1])

    def compute_loss_from_embeddings(self, u: Tensor, i: Tensor, t_u: Tensor, t_i: Tensor) -> Tensor:
        return listwise_kl(
            F.normalize(u, dim=-1),
            F.normalize(i, dim=-1),
            t_u,
            t_i,
            self.temperature,
            self.teacher_temperature,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "teacher_temperature": self.teacher_temperature}


class RetrieverDistillLoss(nn.Module):
    """Embedding matching + score distillation (+ optional contrastive term) in one forward pass.

    The dataset gives (anchor, positive) texts and ``label`` = the pair's row in the teacher tables, so the
    (P, d_t) teacher embeddings live once in the loss instead of in every dataset row.

    Returns a dict of weighted components (the trainer sums them and logs each): ``embedding``, ``score``,
    ``contrastive``.

    Args:
        model: the student ``SentenceTransformer``.
        teacher_anchor, teacher_positive (Tensor (P, d_t)): teacher embeddings of every pair's texts.
        embedding_loss: ``mse`` (sentence-transformers ``MSELoss``), ``cosine`` (``EmbedDistillLoss``) or ``none``.
        embedding_weight (float): weight of the embedding term.
        score_loss: ``listwise_kl``, ``margin_mse`` or ``none``.
        score_weight (float): weight of the score term.
        temperature, teacher_temperature (float): listwise KL temperatures.
        label_weight (float): weight of the in-batch contrastive loss on the true pairs (MNRL form, ``scale``).
        scale (float): 1/temperature of that contrastive term.
        matryoshka_dims (Sequence[int] | None): dims at which the score and contrastive terms are applied to the
            truncated, re-normalised student embeddings (teacher at full dim). None = the student's full dim.
        matryoshka_weights (Sequence[float] | None): per-dim weights (default 1).
        log_q (Tensor (P,) | None): each pair's item log sampling probability; given, the contrastive term is
            logQ-corrected (:func:`logq_inbatch_ce`).
    """

    def __init__(
        self,
        model: Any,
        teacher_anchor: Tensor,
        teacher_positive: Tensor,
        embedding_loss: Literal["mse", "cosine", "none"] = "cosine",
        embedding_weight: float = 1.0,
        score_loss: Literal["listwise_kl", "margin_mse", "none"] = "listwise_kl",
        score_weight: float = 1.0,
        temperature: float = 0.05,
        teacher_temperature: float | None = None,
        label_weight: float = 0.0,
        scale: float = 20.0,
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
        log_q: Tensor | None = None,
    ):
        super().__init__()
        from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss, MSELoss

        self.model = model
        self.register_buffer("teacher_anchor", teacher_anchor.float(), persistent=False)
        self.register_buffer("teacher_positive", teacher_positive.float(), persistent=False)
        self.register_buffer("log_q", None if log_q is None else log_q.float(), persistent=False)
        student_dim = int(model.get_embedding_dimension())
        teacher_dim = int(teacher_anchor.shape[1])
        projection = teacher_dim if teacher_dim != student_dim else None
        self.embedding: nn.Module | None = None
        if embedding_loss == "mse":
            self.embedding = MSELoss(model, projection_dim=projection)
        elif embedding_loss == "cosine":
            self.embedding = EmbedDistillLoss(model, distance_metric="cosine", projection_dim=projection)
        self.embedding_weight = embedding_weight
        self.score_loss = score_loss
        self.score_weight = score_weight
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.label_weight = label_weight
        self.scale = scale
        dims = list(matryoshka_dims) if matryoshka_dims else [student_dim]
        if any(d > student_dim or d < 1 for d in dims):
            raise ValueError(f"matryoshka dims {dims} must lie in 1..{student_dim} (the student's dimension)")
        weights = list(matryoshka_weights) if matryoshka_weights else [1.0] * len(dims)
        if len(weights) != len(dims):
            raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dims")
        self.dims, self.weights = dims, weights

    @property
    def projection(self) -> nn.Linear | None:
        return getattr(self.embedding, "projection", None)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> dict[str, Tensor]:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        u, i = embed_columns(self.model, sentence_features)
        idx = labels.long().to(self.teacher_anchor.device)
        t_u, t_i = self.teacher_anchor[idx].to(u.device), self.teacher_positive[idx].to(u.device)
        out: dict[str, Tensor] = {}
        if self.embedding is not None and self.embedding_weight:
            out["embedding"] = self.embedding_weight * self.embedding.compute_loss_from_embeddings(
                [u, i], [t_u, t_i]
            )
        score = u.new_zeros(())
        contrastive = u.new_zeros(())
        log_q = self.log_q[idx].to(u.device) if self.log_q is not None else u.new_zeros(len(u))
        for d, w in zip(self.dims, self.weights, strict=True):
            su, si = F.normalize(u[:, :d], dim=-1), F.normalize(i[:, :d], dim=-1)
            if self.score_loss == "listwise_kl":
                score = score + w * listwise_kl(su, si, t_u, t_i, self.temperature, self.teacher_temperature)
            elif self.score_loss == "margin_mse":
                score = score + w * inbatch_margin_mse(su, si, t_u, t_i)
            if self.label_weight:
                contrastive = contrastive + w * logq_inbatch_ce(su, si, log_q, self.scale)
        if self.score_loss != "none" and self.score_weight:
            out["score"] = self.score_weight * score
        if self.label_weight:
            out["contrastive"] = self.label_weight * contrastive
        if not out:
            raise ValueError("every distillation term is off: set embedding_loss, score_loss or label_weight")
        return out

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "embedding_loss": type(self.embedding).__name__ if self.embedding is not None else None,
            "embedding_weight": self.embedding_weight,
            "score_loss": self.score_loss,
            "score_weight": self.score_weight,
            "temperature": self.temperature,
            "teacher_temperature": self.teacher_temperature,
            "label_weight": self.label_weight,
            "logq_correction": self.log_q is not None,
            "matryoshka_dims": self.dims,
        }
