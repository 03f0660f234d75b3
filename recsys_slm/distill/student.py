"""Student construction: a shallower copy of the teacher (a subset of its decoder layers), or any given model.

Depth reduction by layer selection, then distillation, is how the LinkedIn paper (arXiv 2502.14305) and
Minitron (arXiv 2407.14679) start their students: the kept blocks bring the teacher's weights, so the student
begins far closer to the teacher than a random initialisation of the same shape. Strategies (``selection``):

* ``evenly``: ``k`` indices spread evenly over ``0 … L−1``, always keeping the first and the last block
  (DistilBERT kept every other layer; the first block maps embeddings into the residual stream the rest
  reads, the last one writes what the head reads).
* ``first``: blocks ``0 … k−1`` (a truncated model; the head then reads an early residual stream).
* ``first_last``: the first ``⌈k/2⌉`` and the last ``⌊k/2⌋`` blocks (drops a contiguous middle, as Minitron's
  depth pruning does).
* ``block_influence``: ShortGPT's Block Influence (Men et al., arXiv 2403.03853),
  ``BI_i = 1 − E_{x,t}[cos(X_{i,t}, X_{i+1,t})]`` between the input and output hidden state of block i over
  calibration tokens; keep the ``k`` blocks with the highest BI (those that change the residual stream most).
* ``explicit``: the indices in ``layers``.

The result is a stock model of the same class with ``num_hidden_layers = k`` (its ``config.json`` says so), so it
loads with ``AutoModelForCausalLM.from_pretrained`` without recsys_slm. Narrowing the width (heads, MLP neurons,
hidden size) is structured pruning, built by the [prune] stage, not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from recsys_slm.config import ConfigError, check, validate_fields

Selection = Literal["evenly", "first", "first_last", "block_influence", "explicit"]


@dataclass
class StudentConfig:
    """How the student is made (``student.*`` keys of a distillation config; see ``docs/distillation.md``).

    Fields:
        init (str): "teacher_layers" (a layer subset of ``source``) or "model" (``source`` as it is).
        source (str | None): model to start from: packaged name, directory or hub id; None = the teacher.
        num_layers (int | None): blocks to keep (init=teacher_layers); None → ``layer_fraction``.
        layer_fraction (float): share of the source's blocks to keep when ``num_layers`` is None, rounded
            up. Default 1/3.
        selection (str): evenly | first | first_last | block_influence | explicit. Default "evenly".
        layers (list[int]): kept block indices for selection=explicit.
        calibration_records (int): train records whose prompts measure Block Influence. Default 64.
    """

    init: Literal["teacher_layers", "model"] = "teacher_layers"
    source: str | None = None
    num_layers: int | None = None
    layer_fraction: float = 1 / 3
    selection: Selection = "evenly"
    layers: list[int] = field(default_factory=list)
    calibration_records: int = 64

    def __post_init__(self) -> None:
        validate_fields(self)
        check(
            self.num_layers is None or self.num_layers > 0, "num_layers", f"must be > 0, got {self.num_layers}"
        )
        check(0 < self.layer_fraction <= 1, "layer_fraction", f"must be in (0, 1], got {self.layer_fraction}")
        check(self.calibration_records > 0, "calibration_records", f"must be > 0, got {self.calibration_records}")
        if self.selection == "explicit":
            check(bool(self.layers), "layers", "selection=explicit needs the block indices to keep, e.g. [0, 14, 29]")
            check(len(set(self.layers)) == len(self.layers), "layers", f"has duplicates: {self.layers}")
            check(min(self.layers) >= 0, "layers", f"indices must be >= 0, got {self.layers}")
        else:
            check(not self.layers, "layers", "is only read with selection=explicit")

    def count(self, total: int) -> int:
        """Blocks to keep out of ``total``."""
        if self.selection == "explicit":
            return len(self.layers)
        return self.num_layers if self.num_layers is not None else max(1, math.ceil(self.layer_fraction * total))


def select_layers(total: int, k: int, selection: Selection, scores: Sequence[float] | None = None,
                  explicit: Sequence[int] = ()) -> list[int]:  # fmt: skip
    """Sorted indices of the ``k`` blocks to keep out of ``total`` (see the module docstring).

    Args:
        total (int): the source's block count L.
        k (int): blocks to keep, 1 ≤ k ≤ L.
        selection (str): the strategy.
        scores (Sequence[float] | None): (L,) Block Influence per block (selection=block_influence).
        explicit (Sequence[int]): indices (selection=explicit).

    Raises:
        ConfigError: k outside [1, L], or an explicit index ≥ L (names the key).
    """
    check(1 <= k <= total, "student.num_layers", f"must be in [1, {total}] (the source has {total} blocks), got {k}")
    if selection == "explicit":
        bad = [i for i in explicit if i >= total]
        check(not bad, "student.layers", f"indices {bad} out of range: the source has {total} blocks (0..{total - 1})")
        return sorted(int(i) for i in explicit)
    if selection == "evenly":
        if k == 1:
            return [total - 1]
        return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)})
    if selection == "first":
        return list(range(k))
    if selection == "first_last":
        head = math.ceil(k / 2)
        return list(range(head)) + list(range(total - (k - head), total))
    if selection == "block_influence":
        if scores is None or len(scores) != total:
            raise ValueError(f"block_influence needs {total} scores, got {None if scores is None else len(scores)}")
        top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
        return sorted(int(i) for i in top)
    raise ConfigError(f"config key 'student.selection': unknown strategy {selection!r}")


@torch.inference_mode()
def block_influence(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int,
                    batch_size: int = 8) -> np.ndarray:  # fmt: skip
    """ShortGPT Block Influence of every decoder block over the real (non-pad) tokens of ``sequences``.

    ``BI_i = 1 − mean_{tokens} cos(X_i, X_{i+1})`` where X_i is block i's input hidden state and X_{i+1} its
    output (captured with forward hooks, so a final norm applied to HF's last ``hidden_states`` entry never
    enters).

    Returns:
        np.ndarray: (L,) float64, one score per block.
    """
    from recsys_slm.models.calibration import calibration_forward
    from recsys_slm.models.layers import decoder_layers

    layers = decoder_layers(model)
    sums = np.zeros(len(layers))
    current_mask: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, L)
            sums[index] += float((cos * current_mask["m"]).sum())

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = calibration_forward(model, sequences, pad_id, batch_size, handles,
                                lambda mask: current_mask.__setitem__("m", mask.float()))  # fmt: skip
    return 1.0 - sums / max(1, count)


def keep_layers(model: torch.nn.Module, indices: Sequence[int]) -> torch.nn.Module:
    """Keep only the decoder blocks ``indices`` (sorted, in place) and make the config agree.

    Updates ``config.num_hidden_layers``, a per-layer ``config.layer_types`` list when present (sliding vs full
    attention in Qwen2/Gemma-style configs), and each attention module's ``layer_idx`` (the KV cache is indexed
    by it), so generation with a cache and ``save_pretrained``/``from_pretrained`` round-trip unchanged.
    """
    from recsys_slm.models.layers import decoder_layers

    layers = decoder_layers(model)
    indices = sorted(int(i) for i in indices)
    kept = torch.nn.ModuleList([layers[i] for i in indices])
    parent = model.base_model
    for name in ("layers", "h", "blocks"):
        if getattr(parent, name, None) is layers:
            setattr(parent, name, kept)
            break
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [layer_types[i] for i in indices]
    config.num_hidden_layers = len(indices)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return model


def build_student(cfg: StudentConfig, teacher_spec: str, calibration: Sequence[Sequence[int]] | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.nn.Module, Any, dict]:  # fmt: skip
    """Load ``cfg.source`` (default the teacher) and, for init=teacher_layers, keep the selected blocks.

    Args:
        cfg (StudentConfig): the student config.
        teacher_spec (str): the teacher (used when ``cfg.source`` is None).
        calibration: token-id sequences for Block Influence (selection=block_influence only).
        device: where to load.

    Returns:
        tuple: (fp32 model, tokenizer, lineage dict for the manifest: source, init, selection, kept layers,
        source layer count, Block Influence scores if computed, parameter counts before and after).
    """
    from recsys_slm.models.layers import decoder_layers
    from recsys_slm.models.loading import load_causal_lm

    source = cfg.source or teacher_spec
    model, tokenizer = load_causal_lm(source, device=device, dtype=torch.float32)
    params_before = sum(p.numel() for p in model.parameters())
    lineage: dict[str, Any] = {"source": str(source), "init": cfg.init, "source_params": params_before}
    if cfg.init == "teacher_layers":
        total = len(decoder_layers(model))
        scores = None
        if cfg.selection == "block_influence":
            if not calibration:
                raise ValueError("selection=block_influence needs calibration prompts (none were given)")
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            scores = block_influence(model, calibration, pad)
        indices = select_layers(total, cfg.count(total), cfg.selection, scores, cfg.layers)
        keep_layers(model, indices)
        lineage.update(
            selection=cfg.selection,
            kept_layers=indices,
            source_layers=total,
            block_influence=None if scores is None else [round(float(s), 6) for s in scores],
        )
    lineage["params"] = sum(p.numel() for p in model.parameters())
    return model, tokenizer, lineage
