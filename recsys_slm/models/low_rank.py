"""A linear layer stored as two factors: ``y = up(down(x))``, ``W ≈ U·V`` with rank ``r``.

Used by SVD-LLM and Compress-to-Impress (:mod:`recsys_slm.prune.low_rank`) and by the registered
compressed model type (:mod:`recsys_slm.models.compressed`), which saves these factors as ordinary
safetensors tensors ``<name>.down.weight`` (r, in) and ``<name>.up.weight`` (out, r) (+ ``<name>.up.bias``).
A rank-r factorisation saves parameters only when ``r·(in + out) < in·out``.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``x (..., in) → up(down(x)) (..., out)``; ``down``: Linear(in, r, no bias), ``up``: Linear(r, out, bias?).

    Args:
        in_features: input width.
        out_features: output width.
        rank: inner width r (≥ 1).
        bias: whether ``up`` carries the original layer's bias.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Build from ``up (out, r)``, ``down (r, in)`` and an optional ``bias (out,)`` (copied)."""
        module = cls(down.shape[1], up.shape[0], down.shape[0], bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    def dense_weight(self) -> torch.Tensor:
        """The product ``up.weight @ down.weight`` (out, in): the dense layer this factorisation stands for."""
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
