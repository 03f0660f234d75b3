"""Resumable training checkpoints for the teacher ranker.

A checkpoint directory (written atomically, so a kill mid-write leaves the previous one intact) holds:

* ``trainable.safetensors``: only the parameters with ``requires_grad`` (the frozen ones are reloaded from the
  base model), keyed by ``named_parameters()`` names;
* ``optimizer.pt``: ``optimizer.state_dict()`` (AdamW moments and step counts: tensors, numbers, tuples only,
  so it loads with ``torch.load(weights_only=True)``);
* ``rng.pt``: torch CPU (and CUDA) generator states, loaded with ``weights_only=True``;
* ``state.json``: the :class:`TrainState` (step, micro-batches consumed, best score so far, elapsed time),
  Python and NumPy RNG states, the resolved config and a fingerprint of the training data.

The learning-rate schedule is a pure function of the step (see ``train.lr_at``), so the step is its whole state.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recsys_slm.model_dir import atomic_dir, write_json_atomic

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Progress of a training run (everything a resume needs besides weights and optimizer moments).

    Attributes:
        step (int): optimizer steps completed.
        micro (int): micro-batches consumed (``step × grad_accum``); with the epoch order derived from
            ``(seed, epoch)`` it pins the data position: epoch = micro // batches_per_epoch.
        best_val_auc (float | None): best validation AUC so far (None before the first evaluation).
        best_step (int | None): the step that reached it.
        evals_since_best (int): evaluations without improvement (early stopping counter).
        elapsed_s (float): wall time so far (training + validation), summed over resumed segments.
        train_s (float): time spent in optimizer steps only (forward, backward, update), summed likewise.
    """

    step: int = 0
    micro: int = 0
    best_val_auc: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    elapsed_s: float = 0.0
    train_s: float = 0.0


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: detached CPU copy}`` of every parameter with ``requires_grad``."""
    return {
        n: p.detach().to("cpu", copy=True).contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def save_trainable(model: torch.nn.Module, path: str | Path) -> None:
    """Write the trainable parameters of ``model`` to a safetensors file."""
    save_file(trainable_tensors(model), str(path))


def load_trainable(model: torch.nn.Module, path: str | Path) -> None:
    """Copy the tensors of a :func:`save_trainable` file into ``model``'s trainable parameters.

    Raises:
        ValueError: the file's names differ from the model's trainable parameters (another freeze/LoRA setup).
    """
    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"{path} does not match this model's trainable parameters (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): was it written with another freeze_layers / lora setting?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(param.device, param.dtype))


def _rng_json() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _restore_rng_json(data: dict[str, Any]) -> None:
    version, state, gauss = data["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    extra: dict[str, Any],
) -> None:
    """Atomically (re)write the checkpoint ``directory``.

    Args:
        directory (Path): e.g. ``<out>.work/checkpoint-last``; replaced only once fully written.
        model / optimizer: the training model (its trainable parameters are saved) and its optimizer.
        state (TrainState): progress counters.
        extra (dict): JSON-safe run facts checked on resume (resolved config, data fingerprint, ...).
    """
    with atomic_dir(directory) as tmp:
        save_trainable(model, tmp / TRAINABLE_FILE)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / RNG_FILE)
        write_json_atomic(tmp / STATE_FILE, {"state": asdict(state), "rng": _rng_json(), **extra})


def read_checkpoint_info(directory: str | Path) -> dict[str, Any] | None:
    """The ``state.json`` of a complete checkpoint, or None when ``directory`` holds none."""
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_checkpoint(
    directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, dict[str, Any]]:
    """Restore trainable weights, optimizer moments and every RNG from ``directory``.

    Returns:
        tuple[TrainState, dict]: the progress counters and the full ``state.json`` content.
    """
    directory = Path(directory)
    info = json.loads((directory / STATE_FILE).read_text())
    load_trainable(model, directory / TRAINABLE_FILE)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True))
    rng = torch.load(directory / RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    _restore_rng_json(info["rng"])
    return TrainState(**info["state"]), info
