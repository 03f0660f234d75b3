"""Default device and dtype choices.

One place decides where models run and in which precision, so every stage (teacher training, scoring,
distillation, serving) agrees. Nothing here runs at import time: importing this module never initialises CUDA
(``torch.cuda.is_available()`` is only called inside the functions).
"""

from __future__ import annotations

import torch

# Accepted spellings for dtypes in configs and on the command line.
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def default_device() -> torch.device:
    """CUDA device 0 when CUDA is available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The working dtype for ``device`` (default: :func:`default_device`).

    bfloat16 on CUDA (when the GPU supports it), float32 everywhere else: the project's CPUs (AVX2, no native
    bf16) run bf16 matmuls about 6x slower than fp32, and fp16 on CPU is slower still.
    """
    device = resolve_device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; None or ``"auto"`` means :func:`default_device`.

    Raises:
        ValueError: ``device`` names CUDA but CUDA is not available (a clearer message than torch's later one).
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return default_device()
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} requested but CUDA is not available on this machine; use 'cpu'"
        )
    return resolved


def resolve_dtype(
    dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> torch.dtype:
    """``dtype`` as a :class:`torch.dtype`; None or ``"auto"`` means :func:`default_dtype` for ``device``.

    Args:
        dtype: a torch dtype or one of ``float32/fp32``, ``bfloat16/bf16``, ``float16/fp16``, ``auto``.
        device: the device the dtype is for (only used for ``auto``).

    Raises:
        ValueError: an unknown dtype name (the message lists the accepted ones).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype.strip().lower() == "auto":
        return default_dtype(device)
    try:
        return _DTYPE_NAMES[dtype.strip().lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(_DTYPE_NAMES)}") from None


def machine_info() -> dict:
    """CPU model, CPU count, torch threads, GPU name and torch version of this process's machine (for reports)."""
    import os
    import platform
    from pathlib import Path

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__}  # fmt: skip
