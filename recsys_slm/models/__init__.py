"""Model registry, offline preparation of packaged models, loading, and tiny test models.

Submodules:
    packaged: :data:`PACKAGED_MODELS`, :func:`prepare_model`, :func:`list_models`, :func:`is_prepared`.
    loading: :func:`resolve_model_path`, :func:`load_causal_lm`, :func:`load_sentence_encoder`.
    tiny: :func:`build_tiny_tokenizer`, :func:`build_tiny_causal_lm`, :func:`build_tiny_encoder`.

Names are re-exported lazily so ``import recsys_slm.models`` stays cheap (no torch/transformers import until a
name that needs them is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PACKAGED_MODELS": "packaged",
    "PackagedModel": "packaged",
    "PackagedModelError": "packaged",
    "SourcePart": "packaged",
    "get_packaged_model": "packaged",
    "is_prepared": "packaged",
    "list_models": "packaged",
    "model_path": "packaged",
    "prepare_model": "packaged",
    "load_causal_lm": "loading",
    "load_sentence_encoder": "loading",
    "load_tokenizer": "loading",
    "resolve_model_path": "loading",
    "build_tiny_causal_lm": "tiny",
    "build_tiny_encoder": "tiny",
    "build_tiny_tokenizer": "tiny",
    "tiny_causal_lm_config": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
