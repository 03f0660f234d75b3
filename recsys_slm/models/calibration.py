"""Calibration passes: run a model over token-id prompts with forward hooks attached (Block Influence, activation
importance, ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


@torch.no_grad()
def calibration_forward(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int,
                        handles: Sequence, on_batch: Callable[[torch.Tensor], None]) -> int:  # fmt: skip
    """Run ``model.base_model`` over ``sequences`` in right-padded batches (eval mode, no grad), calling
    ``on_batch(mask (B, L))`` before each forward so hooks can weight real tokens; the hook ``handles`` are
    removed and the training mode restored at the end, also on error.

    Returns:
        int: the number of real (non-pad) tokens seen.
    """
    from recsys_slm.ranker.batching import collate

    was_training = model.training
    model.eval()
    count = 0
    try:
        device = next(model.parameters()).device
        for start in range(0, len(sequences), batch_size):
            ids, mask = collate(sequences[start : start + batch_size], pad_id)
            on_batch(mask.to(device))
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=position_ids.to(device))  # fmt: skip
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return count
