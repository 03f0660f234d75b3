"""Training batches for the pointwise ranker: prompt encoding, length-bucketed epoch order, padding.

Epoch order is a pure function of ``(seed, epoch)``, so a resumed run recomputes exactly the batches an
uninterrupted run would see and only has to remember *how many* micro-batches it has consumed.

Length bucketing: the shuffled epoch is cut into mega-batches of ``bucket_batches × batch_size`` records, each
mega-batch is sorted by token length and cut into batches, and the batch order is shuffled again. Batches then
hold prompts of similar length (little padding) while every epoch still mixes users and items at random.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from recsys_slm.data.prompts import PromptRenderer, RenderedPrompt


@dataclass
class EncodedRecords:
    """Tokenised pointwise records.

    Attributes:
        sequences (list[list[int]]): N prompts as token ids (``tokens(prefix) + tokens(suffix)``).
        labels (np.ndarray): (N,) float32 0/1 targets.
        history_dropped (int): history items dropped over all records to fit ``prompt.max_tokens``.
    """

    sequences: list[list[int]]
    labels: np.ndarray
    history_dropped: int = 0

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64 token counts."""
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))

    def fingerprint(self) -> str:
        """A short hash of the token ids and labels; a resumed run checks it to detect changed data."""
        digest = hashlib.sha256()
        for seq, label in zip(self.sequences, self.labels, strict=True):
            digest.update(np.asarray(seq, dtype=np.int64).tobytes())
            digest.update(b"|1;" if label else b"|0;")
        return digest.hexdigest()[:16]


def encode_records(
    frame: pd.DataFrame, renderer: PromptRenderer, encode: Callable[[RenderedPrompt], list[int]]
) -> EncodedRecords:
    """Render and tokenise a pointwise task frame.

    Args:
        frame (pd.DataFrame): columns user_id, item_id, label, history_item_ids, history_labels.
        renderer (PromptRenderer): builds the prompt text.
        encode: prompt → token ids; pass ``Ranker.encode`` so training sees exactly what scoring sees.
    """
    sequences, dropped = [], 0
    for r in frame.itertuples():
        prompt = renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id, r.user_id)
        sequences.append(encode(prompt))
        dropped += prompt.history_dropped
    labels = frame["label"].to_numpy(dtype=np.float32)
    bad = ~np.isin(labels, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"pointwise labels must be 0 or 1; found {sorted(set(labels[bad].tolist()))[:5]}")
    return EncodedRecords(sequences, labels, dropped)


def epoch_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, bucket_batches: int
) -> list[np.ndarray]:
    """Record indices of every batch of one epoch, in training order.

    Args:
        lengths (np.ndarray): (N,) token counts.
        batch_size (int): records per batch (the last batch of a mega-batch may be smaller).
        seed (int): run seed; with ``epoch`` it fully determines the order.
        epoch (int): 0-based epoch number.
        bucket_batches (int): batches per length-sorted mega-batch; 0 = no bucketing (plain shuffle).

    Returns:
        list[np.ndarray]: ceil-divided batches of int64 record indices covering each record exactly once.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if bucket_batches <= 0:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    # Without this, batches inside each mega-batch would run short-to-long every time.
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_fraction(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Share of padded positions over all ``batches`` (0 = no padding)."""
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / total if total else 0.0


def collate(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into a batch (the same layout :class:`VerbalizerScorer` scores with).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask
