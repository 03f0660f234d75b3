"""``Ranker``: a causal LM + prompt renderer that scores pointwise records and candidate lists.

A prompt is tokenised as ``tokens(prefix) + tokens(suffix)`` (see :class:`~recsys_slm.data.prompts.RenderedPrompt`)
in every mode — independent, batched or shared-prefix — and in training, so all of them see identical inputs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys_slm.config import check, validate_fields
from recsys_slm.data.prompts import PromptConfig, PromptRenderer, RenderedPrompt
from recsys_slm.ranker.verbalizer import VerbalizerScorer


@dataclass
class RankerConfig:
    """Fields: batch_size (int, 16): prompts per forward; shared_prefix (bool, True): score a user's candidates
    with one prefix pass + KV-cache reuse; prompt (PromptConfig): templates and verbalizer."""

    batch_size: int = 16
    shared_prefix: bool = True
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")


@dataclass
class BatchTiming:
    """Wall time of one scoring call: ``prompts`` scored in ``seconds``."""

    prompts: int
    seconds: float


class Ranker:
    """Score (user, history, candidate) prompts with a causal LM's verbalizer probability.

    Args:
        model: a Hugging Face causal LM (eval mode).
        tokenizer: its tokenizer.
        renderer (PromptRenderer): builds prompts from item/user tables.
        config (RankerConfig): batch size, shared-prefix switch, prompt config.
    """

    def __init__(self, model, tokenizer, renderer: PromptRenderer, config: RankerConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.config = config
        self.scorer = VerbalizerScorer(
            model, tokenizer, config.prompt.yes_token, config.prompt.no_token, batch_size=config.batch_size
        )
        self.timings: list[BatchTiming] = []

    @classmethod
    def load(
        cls,
        spec: str | Path,
        config: RankerConfig,
        items: pd.DataFrame,
        users: pd.DataFrame | None = None,
        device: str | torch.device | None = None,
    ) -> Ranker:
        """Load a model (packaged name, local directory or hub id) and build its renderer."""
        from recsys_slm.models.loading import load_causal_lm

        model, tokenizer = load_causal_lm(spec, device=device)
        return cls(model, tokenizer, PromptRenderer(config.prompt, tokenizer, items, users), config)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: RenderedPrompt) -> list[int]:
        """Token ids of a rendered prompt: ``tokens(prefix) + tokens(suffix)``."""
        return self._ids(prompt.prefix) + self._ids(prompt.suffix)

    def _timed(self, n: int, fn):
        start = time.perf_counter()
        result = fn()
        self.timings.append(BatchTiming(n, time.perf_counter() - start))
        return result

    def score_prompts(self, prompts: Sequence[RenderedPrompt]) -> np.ndarray:
        """Rendered prompts → (N, 2) float32 [logit_yes, logit_no], batched (``batch_size`` per forward)."""
        sequences = [self.encode(p) for p in prompts]
        out = []
        for start in range(0, len(sequences), self.config.batch_size):
            chunk = sequences[start : start + self.config.batch_size]
            out.append(self._timed(len(chunk), lambda c=chunk: self.scorer.score_token_ids(c)))
        return torch.cat(out).numpy() if out else np.zeros((0, 2), dtype=np.float32)

    def score_pointwise(self, records: pd.DataFrame) -> pd.DataFrame:
        """Score a pointwise task frame (columns user_id, item_id, history_item_ids, history_labels).

        Returns:
            pd.DataFrame: one row per record: ``p_yes`` (P(yes) normalised over the two verbalizer tokens),
            ``logit_diff`` (logit_yes − logit_no), ``n_tokens``, ``history_kept``.
        """
        prompts = [
            self.renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id, r.user_id)
            for r in records.itertuples()
        ]
        logits = self.score_prompts(prompts)
        diff = logits[:, 0] - logits[:, 1]
        return pd.DataFrame(
            {
                "p_yes": 1.0 / (1.0 + np.exp(-diff)),
                "logit_diff": diff,
                "n_tokens": [p.n_tokens for p in prompts],
                "history_kept": [p.history_kept for p in prompts],
            },
            index=records.index,
        )

    def score_candidates(
        self,
        history_item_ids: Sequence[str],
        history_labels: Sequence[int],
        candidate_item_ids: Sequence[str],
        user_id: str | None = None,
    ) -> np.ndarray:
        """Scores (N,) = logit_yes − logit_no of each candidate for one user, in one call.

        With ``shared_prefix`` the user prefix runs once and its KV cache serves every candidate; otherwise each
        prompt is scored independently (batched). History truncation is decided per candidate (a long candidate
        text may leave room for fewer history items), so candidates are grouped by identical prefix and each
        group gets its own prefix pass.
        """
        prompts = [
            self.renderer.render(history_item_ids, history_labels, c, user_id) for c in candidate_item_ids
        ]
        if not prompts:
            return np.zeros(0, dtype=np.float32)
        if not self.config.shared_prefix:
            logits = self.score_prompts(prompts)
            return logits[:, 0] - logits[:, 1]
        scores = np.zeros(len(prompts), dtype=np.float32)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.prefix, []).append(i)
        for prefix, rows in groups.items():
            suffixes = [self._ids(prompts[i].suffix) for i in rows]
            logits = self._timed(len(rows), lambda p=prefix, s=suffixes: self.scorer.score_shared_prefix(self._ids(p), s))
            scores[rows] = (logits[:, 0] - logits[:, 1]).numpy()
        return scores

    def score_candidate_task(self, frame: pd.DataFrame) -> list[np.ndarray]:
        """Score a candidate task frame (history_item_ids, history_labels, candidate_item_ids, user_id)
        → one (N_i,) score array per row, aligned with ``candidate_item_ids``."""
        return [
            self.score_candidates(list(r.history_item_ids), list(r.history_labels), list(r.candidate_item_ids), r.user_id)
            for r in frame.itertuples()
        ]
