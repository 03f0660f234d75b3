"""Cross-tokenizer distillation: ULD (sorted-probability L1) and GOLD-style span alignment with a hybrid loss.

When teacher and student use different tokenizers, their logits live on different vocabularies and their token
positions do not line up, so the losses of :mod:`recsys_slm.distill.losses` do not apply.

- **ULD** (Boizard et al.) ignores token identities: it sorts each distribution's probabilities in descending
  order, zero-pads the smaller vocabulary, and takes the L1 distance (the closed form of the Wasserstein-1
  distance the paper uses). Positions are aligned by index by the caller.
- **GOLD** (TRL) aligns positions by text: both tokenisations of the same text are cut at the (byte) offsets
  where *both* tokenizers have a token boundary (:func:`align_offsets`), each side's tokens inside a group are
  merged into one distribution (:func:`merge_group_logprobs`), then tokens whose strings exist in both
  vocabularies (:func:`shared_vocab`) are compared id to id with generalized JSD and the rest with ULD
  (:class:`GoldLoss`).

Vocabulary sizes: a model's output head may have more rows than its tokenizer has tokens (Qwen2.5: 151,936 rows
for 151,665 tokens; the 271 extra rows are never produced by encoding, and some converted tokenizers list them as
``[PAD151665]``…). Such rows are masked (logit −inf before the softmax). Fewer rows than tokens would make ids
index the wrong rows and raises :class:`ValueError` (:func:`check_vocab_size`).

References:
    Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
    https://arxiv.org/abs/2402.12030 (code: Nicolas-BZRD/llm-recipes ``models/distillation_model.py``)
    TRL GOLD ("Unlocking On-Policy Distillation for Any Model Family", Hugging Face, 2025):
    https://github.com/huggingface/trl/blob/main/trl/experimental/gold/gold_trainer.py
    (``ULDLoss._align_by_byte_offsets``, ``_merge_probabilities_with_alignment_groups``, ``_compute_hybrid_uld_loss``)
    and https://github.com/huggingface/trl/blob/main/docs/source/gold_trainer.md
    GKD generalized JSD, https://arxiv.org/abs/2306.13649
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recsys_slm.config import check, validate_fields
from recsys_slm.distill.losses import (
    LOG_FLOOR,
    divergence_rows,
    hard_label_ce,
    keep_rows,
    masked_mean,
    upcast_half,
)

Offsets = Sequence[Sequence[int]]  # per token (start, end) byte or character offsets into the text

FILLER_TOKEN = re.compile(r"^\[PAD\d+\]$")


# ------------------------------------------------------------------------------------------------ vocab sizes
def check_vocab_size(embedding_rows: int, tokenizer_len: int, name: str = "model") -> None:
    """Fail when a model's output head has fewer rows than its tokenizer has tokens.

    ``embedding_rows`` is the number of output-embedding rows (= logits width); ``tokenizer_len`` is
    ``len(tokenizer)`` (added tokens included). More rows than tokens is allowed: the extra rows are padding and
    are masked by the losses here.

    Raises:
        ValueError: ``embedding_rows < tokenizer_len`` (the message names both numbers).
    """
    if embedding_rows < tokenizer_len:
        raise ValueError(
            f"{name}: the output head has {embedding_rows} rows (vocab size) but its tokenizer has "
            f"{tokenizer_len} tokens; ids {embedding_rows}..{tokenizer_len - 1} would have no logits and every "
            "id would be misaligned if the tokenizer is not the model's own. Use the tokenizer saved with the "
            "model, or resize_token_embeddings to at least the tokenizer length"
        )


def filler_token_ids(tokenizer) -> list[int]:
    """Ids of filler vocabulary entries named like ``[PAD151665]`` (padding rows some converters list as tokens)."""
    return sorted(i for tok, i in tokenizer.get_vocab().items() if FILLER_TOKEN.match(tok))


def ignored_ids(embedding_rows: int, tokenizer, name: str = "model") -> list[int]:
    """Ids whose logits must be masked: padding rows ``len(tokenizer)..embedding_rows − 1`` plus filler tokens.

    Raises:
        ValueError: via :func:`check_vocab_size`.
    """
    check_vocab_size(embedding_rows, len(tokenizer), name)
    return sorted(set(range(len(tokenizer), embedding_rows)) | set(filler_token_ids(tokenizer)))


def mask_logits(logits: torch.Tensor, ignore_ids: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """Return ``logits (..., V)`` with the ``ignore_ids`` columns set to −inf (out of place, differentiable)."""
    if ignore_ids is None or len(ignore_ids) == 0:
        return logits
    ids = torch.as_tensor(ignore_ids, dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, ids, float("-inf"))


# ------------------------------------------------------------------------------------------------ ULD
def sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """``Σ_i |sort↓(p_S)_i − sort↓(p_T)_i|`` per row, zero-padding the narrower side: ``(N, Vs), (N, Vt) → (N,)``.

    With equal total mass this is the Wasserstein-1 distance of ULD (the paper's closed form); the inputs may also
    be unnormalised (GOLD's merged groups).
    """
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    if width == 0:
        return student_probs.new_zeros(student_probs.shape[:-1])
    s = F.pad(student_probs.sort(dim=-1, descending=True).values, (0, width - student_probs.shape[-1]))
    t = F.pad(teacher_probs.sort(dim=-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (s - t).abs().sum(-1)


def _probs(logits: torch.Tensor, ignore_ids, temperature: float) -> torch.Tensor:
    return F.softmax(mask_logits(upcast_half(logits), ignore_ids) / temperature, dim=-1)


def uld_distance(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    student_ignore_ids: Sequence[int] | None = None,
    teacher_ignore_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """ULD distillation term: ``mean_n Σ_i |sort↓(q_S,n)_i − sort↓(p_T,n)_i|``.

    Args:
        student_logits (torch.Tensor): (N, Vs) student logits at N positions.
        teacher_logits (torch.Tensor): (N, Vt) teacher logits at the positions aligned with them (ULD aligns
            answer tokens by index from the first answer token and truncates to the shorter answer). Detached.
        mask (torch.Tensor | None): (N,) rows to keep.
        student_temperature (float) / teacher_temperature (float): softmax temperatures (paper default 1).
        student_ignore_ids / teacher_ignore_ids: vocabulary ids masked to −inf before the softmax (padding
            rows, filler tokens; see :func:`ignored_ids`).

    Returns:
        torch.Tensor: scalar; the L1 sum over the (padded) vocabulary, averaged over kept positions. This is
        the per-position mean over all N rows; the paper's code averages per sequence and then over the batch,
        which differs when sequences have different lengths (call once per sequence to reproduce it).

    References:
        Boizard et al. 2024, https://arxiv.org/abs/2402.12030
    """
    if (
        student_logits.dim() != 2
        or teacher_logits.dim() != 2
        or student_logits.shape[0] != teacher_logits.shape[0]
    ):
        raise ValueError(
            f"student_logits (N, Vs) and teacher_logits (N, Vt) need the same N, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    keep = keep_rows(mask, student_logits.shape[0], student_logits.device)
    if keep is not None:
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
    q = _probs(student_logits, student_ignore_ids, student_temperature)
    p = _probs(teacher_logits.detach(), teacher_ignore_ids, teacher_temperature)
    return masked_mean(sorted_l1(q, p), None)


@dataclass
class ULDLossConfig:
    """ULD objective ``ce_weight·CE(student, labels) + distill_weight·ULD``.

    Fields:
        ce_weight (float, 1.0): weight of the student's hard-label CE (paper code ``cross_entropy_factor``).
        distill_weight (float, 1.5): weight of the sorted-L1 term (paper code ``distil_factor``).
        student_temperature (float, 1.0) / teacher_temperature (float, 1.0): softmax temperatures.
        version (int, 1): config schema version.
    """

    ce_weight: float = 1.0
    distill_weight: float = 1.5
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    version: int = 1

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.ce_weight >= 0, "ce_weight", f"must be >= 0, got {self.ce_weight}")
        check(self.distill_weight >= 0, "distill_weight", f"must be >= 0, got {self.distill_weight}")
        for key in ("student_temperature", "teacher_temperature"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")


class ULDLoss(nn.Module):
    """Universal Logit Distillation: ``λ_CE·CE(student, y) + λ_D·mean_n W1(q_S,n, p_T,n)``.

    Inputs:
        ``student_logits (N, Vs)`` and ``teacher_logits (N, Vt)``: logits at N index-aligned answer positions
        (different vocabularies allowed). ``labels (N,)``: the student's ground-truth ids (−100 to skip), needed
        when ``ce_weight > 0``. ``mask (N,)``: rows to keep.

    Args:
        config (ULDLossConfig | None): weights and temperatures (paper defaults: 1 and 1.5).
        student_ignore_ids / teacher_ignore_ids (Sequence[int] | None): ids masked before the softmax
            (:func:`ignored_ids`).

    References:
        Boizard et al. 2024, https://arxiv.org/abs/2402.12030
    """

    def __init__(
        self,
        config: ULDLossConfig | None = None,
        student_ignore_ids: Sequence[int] | None = None,
        teacher_ignore_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else ULDLossConfig()
        self.student_ignore_ids = list(student_ignore_ids or [])
        self.teacher_ignore_ids = list(teacher_ignore_ids or [])

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        loss = cfg.distill_weight * uld_distance(
            student_logits, teacher_logits, mask, cfg.student_temperature, cfg.teacher_temperature,
            self.student_ignore_ids, self.teacher_ignore_ids,
        )  # fmt: skip
        if cfg.ce_weight > 0:
            if labels is None:
                raise ValueError(f"labels are required when ce_weight={cfg.ce_weight} > 0")
            keep = keep_rows(mask, student_logits.shape[0], student_logits.device)
            if keep is not None:
                labels = labels.masked_fill(~keep.to(labels.device), -100)
            loss = loss + cfg.ce_weight * hard_label_ce(
                mask_logits(student_logits, self.student_ignore_ids), labels
            )
        return loss


# ------------------------------------------------------------------------------------------------ alignment
def encode_with_offsets(
    tokenizer, text: str, unit: Literal["byte", "char"] = "byte"
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and per-token ``(start, end)`` offsets of ``text``, without special tokens (fast tokenizers).

    ``unit="char"`` returns the tokenizer's ``offset_mapping`` (character offsets) as is. ``unit="byte"``
    (default) converts them to UTF-8 byte offsets and, for byte-level BPE tokenizers, splits a character shared
    by several byte tokens (``é`` → ``Ã`` + ``©``, both at char span (36, 37)) into each token's own bytes, as
    TRL's ``encode_with_byte_offsets`` does, so alignment can cut between them when both sides do. When the
    token's byte length does not fit the span (a normalizer changed the text), the shared span is kept and
    :func:`align_offsets` keeps those tokens together. Use the same unit for both sides.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("cross-tokenizer alignment needs a fast tokenizer (return_offsets_mapping)")
    if unit not in ("byte", "char"):
        raise ValueError(f"unit must be 'byte' or 'char', got {unit!r}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    char_offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    if unit == "char":
        return ids, char_offsets
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
    offsets = [(char_to_byte[a], char_to_byte[b]) for a, b in char_offsets]
    if _token_scheme(tokenizer) != "byte_level":
        return ids, offsets
    tokens = tokenizer.convert_ids_to_tokens(ids)
    out: list[tuple[int, int]] = []
    cursor = 0
    for i, ((start, end), token) in enumerate(zip(offsets, tokens)):
        shares_span = start < cursor or (i + 1 < len(offsets) and offsets[i + 1][0] < end)
        if shares_span:
            piece = len(normalize_token(token, "byte_level"))
            first = max(start, cursor)
            if first + piece <= end:
                start, end = first, first + piece
        out.append((start, end))
        cursor = max(cursor, end)
    return ids, out


def _cuts(offsets: Offsets) -> tuple[list[int], list[bool]]:
    """Running end offset of each token and whether the text may be cut right after it."""
    ends: list[int] = []
    run = -1
    for _, end in offsets:
        run = max(run, int(end))
        ends.append(run)
    cut = []
    for i in range(len(offsets)):
        if i == len(offsets) - 1:
            cut.append(True)
        else:
            # No cut inside a character split across several byte tokens (they share the same char span) and
            # none before a token that starts before this one ends.
            cut.append(int(offsets[i + 1][0]) >= ends[i] and ends[i + 1] > ends[i])
    return ends, cut


def align_offsets(student_offsets: Offsets, teacher_offsets: Offsets) -> list[tuple[list[int], list[int]]]:
    """Group two tokenisations of the same text into pairs of token runs that cover the same text span.

    A boundary is an offset where *both* sides may cut: right after a token whose span ends there (running
    maximum of the end offsets) and the next token starts at or after it. Tokens that share one span (with
    character offsets: a multi-byte character split into byte tokens by byte-level BPE) are never cut apart.
    Each group is the minimal pair of contiguous token runs between two consecutive common boundaries; every
    token belongs to exactly one group, in order. This is TRL GOLD's ``_align_by_byte_offsets`` walk (advance the
    side that ends earlier; close a group when both ends meet), made robust to repeated/overlapping spans.

    Args:
        student_offsets: (Ls) ``(start, end)`` offsets of the student tokens, from :func:`encode_with_offsets`
            (UTF-8 bytes by default) or ``return_offsets_mapping=True`` of a fast tokenizer (characters), without
            special tokens.
        teacher_offsets: (Lt) the same, in the same unit, for the teacher tokens of the same text.

    Returns:
        list[tuple[list[int], list[int]]]: per group, the student token indices and the teacher token indices.

    Raises:
        ValueError: the two tokenisations do not end at the same offset (they cover different text).
    """
    if len(student_offsets) == 0 or len(teacher_offsets) == 0:
        if len(student_offsets) or len(teacher_offsets):
            raise ValueError(
                f"one side has no tokens: {len(student_offsets)} student vs {len(teacher_offsets)} teacher tokens"
            )
        return []
    s_ends, s_cut = _cuts(student_offsets)
    t_ends, t_cut = _cuts(teacher_offsets)
    if s_ends[-1] != t_ends[-1]:
        raise ValueError(
            f"student tokens cover the text up to offset {s_ends[-1]} but teacher tokens up to {t_ends[-1]}; "
            "tokenise the same text on both sides"
        )
    common = {e for e, c in zip(s_ends, s_cut) if c} & {e for e, c in zip(t_ends, t_cut) if c}

    def split(ends: list[int], cut: list[bool]) -> list[list[int]]:
        groups, current = [], []
        for i, (end, can_cut) in enumerate(zip(ends, cut)):
            current.append(i)
            if can_cut and end in common:
                groups.append(current)
                current = []
        return groups

    s_groups, t_groups = split(s_ends, s_cut), split(t_ends, t_cut)
    assert len(s_groups) == len(t_groups)  # both sides close once at every common boundary
    return list(zip(s_groups, t_groups))


def merge_group_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor | Sequence[int], groups: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each group of positions into one (unnormalised) log-distribution, as GOLD's "observed" merge.

    For a group of positions ``[i, i+1, …, i+k]`` with actual tokens ``y_i … y_{i+k}``:
    ``log m(v) = log p_i(v) + Σ_{j=i+1..i+k} log p_j(y_j)``: the distribution at the group's first position
    times the product of the conditional probabilities of the tokens actually observed after it (a sum of
    log-probs). For ``v = y_i`` this is the exact chain-rule probability of the group's text; for other ``v`` it
    reuses the observed continuation (GOLD's known bias). ``m`` sums to ``c = Π_{j>i} p_j(y_j) ≤ 1``.

    Args:
        logprobs (torch.Tensor): (L, V) log-probabilities; row j is the distribution that predicts token j.
        token_ids: (L,) the tokens actually in the sequence.
        groups: position lists from :func:`align_offsets` (one side).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``merged (G, V)`` log-values and ``log_c (G,)``.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logprobs.device)
    if ids.shape != logprobs.shape[:1]:
        raise ValueError(
            f"token_ids must be ({logprobs.shape[0]},) to match the logit rows, got {tuple(ids.shape)}"
        )
    first = torch.as_tensor([g[0] for g in groups], dtype=torch.long, device=logprobs.device)
    later = [(gi, j) for gi, g in enumerate(groups) for j in g[1:]]
    log_c = logprobs.new_zeros(len(groups))
    if later:
        group_idx = torch.as_tensor([gi for gi, _ in later], dtype=torch.long, device=logprobs.device)
        pos = torch.as_tensor([j for _, j in later], dtype=torch.long, device=logprobs.device)
        log_c = log_c.index_add(0, group_idx, logprobs[pos, ids[pos]])
    return logprobs[first] + log_c[:, None], log_c


# ------------------------------------------------------------------------------------------------ vocabularies
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable stand-in character of each byte → the byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_scheme(tokenizer) -> str:
    """``"byte_level"`` (GPT-2/Llama-3/Qwen/SmolLM), ``"metaspace"`` (SentencePiece ``▁``) or ``"plain"``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return "plain"
    state = json.loads(decoder.__getstate__())
    text = json.dumps(state)
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"Metaspace"' in text or "\\u2581" in text or "▁" in text:
        return "metaspace"
    return "plain"


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def normalize_token(token: str, scheme: str) -> bytes:
    """The raw bytes a vocabulary entry stands for.

    ``byte_level``: map each character back through GPT-2's byte table (``Ġ`` → space, ``Ċ`` → newline, ``Ã©`` →
    ``é``'s two bytes). ``metaspace``: ``▁`` → space and ``<0xNN>`` byte-fallback tokens → that byte. ``plain``:
    the UTF-8 of the string as is.
    """
    if scheme == "byte_level":
        table = _byte_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token)
        return token.encode("utf-8")
    if scheme == "metaspace":
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode("utf-8")
    return token.encode("utf-8")


def _normalized_vocab(tokenizer) -> dict[tuple[str, bytes], int]:
    scheme = _token_scheme(tokenizer)
    added = tokenizer.get_added_vocab()
    out: dict[tuple[str, bytes], int] = {}
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        key = ("added", token.encode("utf-8")) if token in added else ("text", normalize_token(token, scheme))
        out.setdefault(key, idx)  # on collisions (e.g. "▁" and "<0x20>") keep the lowest id
    return out


def shared_vocab(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the vocabulary entries that stand for exactly the same bytes in both tokenizers.

    Tokens are compared after :func:`normalize_token` (so byte-level ``Ġthe`` equals SentencePiece ``▁the``);
    added/special tokens (``<|im_end|>``) match only other added tokens with the same content. When one
    tokenizer has several entries for the same bytes, the lowest id is used.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``(student_ids, teacher_ids)``, int64 of equal length, sorted by
        student id; ``student_ids[i]`` and ``teacher_ids[i]`` are the same token.
    """
    student = _normalized_vocab(student_tokenizer)
    teacher = _normalized_vocab(teacher_tokenizer)
    pairs = sorted((sid, teacher[key]) for key, sid in student.items() if key in teacher)
    s_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    t_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return s_ids, t_ids


# ------------------------------------------------------------------------------------------------ GOLD
def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x ≤ 0; x is capped at −1e−30 so x = 0 gives ≈ −69 instead of −inf (finite grads)."""
    return torch.log(-torch.expm1(x.clamp_max(-1e-30)))


@dataclass
class GoldLossConfig:
    """GOLD-style hybrid cross-tokenizer loss.

    Fields:
        beta (float, 0.5): generalized-JSD β on the shared vocabulary (0 → forward KL, 1 → reverse KL).
        student_temperature (float, 1.0) / teacher_temperature (float, 1.0): softmax temperatures.
        matched_weight (float | None, None): weight of the shared-vocabulary JSD; None = adaptive
            ``#shared / #teacher tokens`` (GOLD's default).
        unmatched_weight (float | None, None): weight of the ULD term on the rest; None = ``1 − matched_weight``.
        version (int, 1): config schema version.
    """

    beta: float = 0.5
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    matched_weight: float | None = None
    unmatched_weight: float | None = None
    version: int = 1

    def __post_init__(self) -> None:
        validate_fields(self)
        check(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        for key in ("student_temperature", "teacher_temperature"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("matched_weight", "unmatched_weight"):
            value = getattr(self, key)
            check(value is None or value >= 0, key, f"must be >= 0, got {value}")


class GoldLoss(nn.Module):
    """Cross-tokenizer distillation of one sequence: span alignment, group merging, hybrid JSD + ULD.

    Steps, for one completion text tokenised by both tokenizers:

    1. :func:`align_offsets` groups the tokens into G pairs of runs covering identical text.
    2. Per side, ``log_softmax(logits / T)`` with padding rows and filler ids masked, then
       :func:`merge_group_logprobs`: ``m_g(v) = p_first(v) · Π_{later j} p_j(y_j)`` (sum of log-probs), an
       unnormalised distribution of total mass ``c_g``.
    3. Shared vocabulary S (:func:`shared_vocab`, ignored ids removed): generalized JSD(β) between the two sides'
       distributions over the |S| + 1 buckets ``(m_g(v) for v in S, rest = 1 − Σ_{v∈S} m_g(v))``. The rest
       bucket holds the other continuations' mass and the unshared tokens' mass, so both sides are proper
       distributions and the term is a true divergence (≥ 0, 0 iff equal). *Difference from TRL*: TRL applies
       JSD to the raw unnormalised sub-vectors ``m_g[S]``, which can be negative when the two masses differ.
    4. Unshared ids U_S, U_T (the remaining non-ignored ids of each side): ULD's :func:`sorted_l1` of
       ``m_g[U_S]`` vs ``m_g[U_T]`` (unnormalised, zero-padded), as TRL.
    5. ``loss = w_m·mean_g JSD + w_u·mean_g L1`` with ``w_m = matched_weight`` or, by default,
       ``|S| / #teacher tokens`` and ``w_u = 1 − w_m`` (TRL's adaptive weights).

    Same tokenizer on both sides: every group is a single token, S is the whole vocabulary, and the loss is
    the JSD(β) of the two models (0 for identical models).

    Inputs (one sequence; loop over a batch):
        ``student_logits (Ls, Vs)``: row i is the student's distribution for completion token i (already
        shifted: taken at the position before token i). ``teacher_logits (Lt, Vt)``: the same for the teacher
        (detached). ``student_ids (Ls,)``, ``teacher_ids (Lt,)``: the completion tokens. ``student_offsets``,
        ``teacher_offsets``: their ``(start, end)`` offsets (same unit) in the same completion text
        (:func:`encode_with_offsets`). ``Vs``/``Vt`` are the output-head widths; a width below the tokenizer
        length raises ValueError.

    Args:
        student_tokenizer: the student's fast tokenizer.
        teacher_tokenizer: the teacher's fast tokenizer.
        config (GoldLossConfig | None): β, temperatures, weights.

    References:
        TRL GOLD, https://github.com/huggingface/trl/blob/main/trl/experimental/gold/gold_trainer.py ;
        ULD, https://arxiv.org/abs/2402.12030 ; GKD, https://arxiv.org/abs/2306.13649
    """

    def __init__(self, student_tokenizer, teacher_tokenizer, config: GoldLossConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else GoldLossConfig()
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self._shared = shared_vocab(student_tokenizer, teacher_tokenizer)
        self.last_matched_loss: torch.Tensor | None = None  # components of the latest call, for logging
        self.last_unmatched_loss: torch.Tensor | None = None
        self._plan_cache: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def _plan(self, student_rows: int, teacher_rows: int) -> tuple[torch.Tensor, ...]:
        """Ignored / shared / unshared id tensors for these head widths (cached)."""
        key = (student_rows, teacher_rows)
        if key not in self._plan_cache:
            s_ignore = set(ignored_ids(student_rows, self.student_tokenizer, "student"))
            t_ignore = set(ignored_ids(teacher_rows, self.teacher_tokenizer, "teacher"))
            pairs = [
                (s, t)
                for s, t in zip(self._shared[0].tolist(), self._shared[1].tolist())
                if s not in s_ignore and t not in t_ignore
            ]
            s_shared = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            t_shared = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            s_taken, t_taken = s_ignore | set(s_shared.tolist()), t_ignore | set(t_shared.tolist())
            s_rest = torch.tensor([i for i in range(student_rows) if i not in s_taken], dtype=torch.long)
            t_rest = torch.tensor([i for i in range(teacher_rows) if i not in t_taken], dtype=torch.long)
            n_teacher = teacher_rows - len(t_ignore)
            self._plan_cache[key] = (
                torch.tensor(sorted(s_ignore), dtype=torch.long),
                torch.tensor(sorted(t_ignore), dtype=torch.long),
                s_shared,
                t_shared,
                s_rest,
                t_rest,
                torch.tensor(n_teacher),
            )
        return self._plan_cache[key]

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_ids: torch.Tensor | Sequence[int],
        teacher_ids: torch.Tensor | Sequence[int],
        student_offsets: Offsets | torch.Tensor,
        teacher_offsets: Offsets | torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        if student_logits.dim() != 2 or teacher_logits.dim() != 2:
            raise ValueError("student_logits and teacher_logits must be (L, V) for one sequence")
        if isinstance(student_offsets, torch.Tensor):
            student_offsets = student_offsets.tolist()
        if isinstance(teacher_offsets, torch.Tensor):
            teacher_offsets = teacher_offsets.tolist()
        if len(student_offsets) != student_logits.shape[0] or len(teacher_offsets) != teacher_logits.shape[0]:
            raise ValueError(
                f"offsets ({len(student_offsets)} student, {len(teacher_offsets)} teacher) must match the logit "
                f"rows ({student_logits.shape[0]} student, {teacher_logits.shape[0]} teacher)"
            )
        s_ignore, t_ignore, s_shared, t_shared, s_rest, t_rest, n_teacher = self._plan(
            student_logits.shape[-1], teacher_logits.shape[-1]
        )
        device = student_logits.device
        groups = align_offsets(student_offsets, teacher_offsets)
        if not groups:
            return student_logits.sum() * 0.0

        def side_logprobs(logits: torch.Tensor, ignore: torch.Tensor, temperature: float) -> torch.Tensor:
            logits = mask_logits(upcast_half(logits), ignore.to(logits.device))
            return F.log_softmax(logits / temperature, dim=-1).clamp_min(LOG_FLOOR)

        s_logp = side_logprobs(student_logits, s_ignore, cfg.student_temperature)
        t_logp = side_logprobs(teacher_logits.detach(), t_ignore, cfg.teacher_temperature).to(s_logp.dtype)
        s_merged, s_log_c = merge_group_logprobs(s_logp, student_ids, [g[0] for g in groups])
        t_merged, t_log_c = merge_group_logprobs(t_logp, teacher_ids, [g[1] for g in groups])

        def buckets(merged: torch.Tensor, log_c: torch.Tensor, shared: torch.Tensor, rest: torch.Tensor):
            rest_logp = _log1mexp(log_c)  # mass of the other continuations
            if rest.numel():
                rest_logp = torch.logaddexp(rest_logp, torch.logsumexp(merged[:, rest.to(device)], dim=-1))
            return torch.cat([merged[:, shared.to(device)], rest_logp[:, None].clamp_min(LOG_FLOOR)], dim=-1)

        matched = masked_mean(
            divergence_rows(
                "jsd",
                buckets(s_merged, s_log_c, s_shared, s_rest),
                buckets(t_merged, t_log_c, t_shared, t_rest),
                cfg.beta,
            ),
            None,
        )
        unmatched = masked_mean(
            sorted_l1(s_merged[:, s_rest.to(device)].exp(), t_merged[:, t_rest.to(device)].exp()), None
        )
        if cfg.matched_weight is None:
            w_matched = len(t_shared) / max(1, int(n_teacher))
        else:
            w_matched = cfg.matched_weight
        w_unmatched = cfg.unmatched_weight if cfg.unmatched_weight is not None else max(0.0, 1.0 - w_matched)
        self.last_matched_loss = matched.detach()
        self.last_unmatched_loss = unmatched.detach()
        return w_matched * matched + w_unmatched * unmatched
