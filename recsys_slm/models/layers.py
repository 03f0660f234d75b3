"""Where a Hugging Face causal LM keeps its decoder blocks."""

from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder block list of a Hugging Face causal LM (Llama/Qwen2/Mistral/Gemma: ``model.layers``;
    GPT-2: ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``).

    Raises:
        ValueError: the architecture keeps its blocks elsewhere.
    """
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
