"""``recsys-slm retriever prune``: structured pruning of a retriever's encoder, texts kept.

The middle stage of the retriever's distill → prune → re-distill sequence (the recipe of LinkedIn's
arXiv 2502.14305 applied to the candidate generator): the encoder of a trained or distilled retriever loses MLP
neurons (per layer, the least important by activation on calibration texts, or by weight magnitude) and/or whole
layers (the highest Block Influence kept), with :func:`recsys_slm.prune.encoder.prune_sentence_encoder`; then
``recsys-slm retriever distill --model PRUNED --teacher TEACHER`` recovers the quality.

What this adds to the library function: the calibration texts are the retriever's own — user texts and liked-item
texts of training pairs built with the texts recorded in the source's manifest (never the held-out targets) — and
the pruned copy's manifest keeps the source's ``retriever`` section (texts, split, Matryoshka ladder), so
``eval retrieval`` and ``eval system`` encode its users exactly as the source was trained to. Attention heads are
not offered: transformers 5 cannot save an encoder with pruned heads (``docs/pruning.md``, Encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recsys_slm.config import check, config_to_dict, validate_fields

# the source manifest's retriever fields that stay true after pruning (the hidden width is not pruned)
CARRIED = ("embedding_dim", "matryoshka_dims", "similarity", "split", "texts")


@dataclass
class RetrieverPruneConfig:
    """Fields:
    model (str | None): the retriever to prune: a retriever directory, a packaged encoder name or a
        sentence-transformers directory. Required.
    out (Path | None): output directory (replaced atomically). Required.
    data_dir (Path | None): prepared data for the calibration texts; default the MovieLens-100K cache.
    neurons_keep (float): fraction of each layer's MLP neurons kept, in (0, 1]. Default 0.5.
    layers_keep (float): fraction of the layers kept (rounded up), in (0, 1]. Default 1.0.
    method (str): ``activation`` (mean |activation| on the calibration texts; layers by Block Influence) or
        ``magnitude`` (weight norms, evenly spaced layers; no data). Default activation.
    calibration_pairs (int): training pairs whose user and item texts are the calibration texts. Default 256.
    seed (int): pair sampling seed. Default 0.
    device (str): auto, cpu or cuda. Default auto.
    """

    model: str | None = None
    out: Path | None = None
    data_dir: Path | None = None
    neurons_keep: float = 0.5
    layers_keep: float = 1.0
    method: Literal["activation", "magnitude"] = "activation"
    calibration_pairs: int = 256
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        validate_fields(self)
        for key in ("neurons_keep", "layers_keep"):
            v = getattr(self, key)
            check(0 < v <= 1, key, f"must be a fraction in (0, 1], got {v}")
        check(
            self.neurons_keep < 1 or self.layers_keep < 1,
            "neurons_keep",
            "with layers_keep also 1.0 nothing would be pruned",
        )
        check(self.calibration_pairs >= 1, "calibration_pairs", f"must be >= 1, got {self.calibration_pairs}")


def calibration_texts(cfg: RetrieverPruneConfig, retriever_manifest: dict[str, Any] | None) -> list[str]:
    """User texts and liked-item texts of ``cfg.calibration_pairs`` sampled training pairs (unique, in order)."""
    from recsys_slm.retriever.evaluate import resolve_texts
    from recsys_slm.retriever.texts import RetrieverTextConfig
    from recsys_slm.retriever.train import RetrieverTrainConfig, _prepare

    texts_cfg, _ = resolve_texts(RetrieverTextConfig(), {"retriever": retriever_manifest or {}})
    split = (retriever_manifest or {}).get("split") or RetrieverTrainConfig.split
    train_cfg = RetrieverTrainConfig(
        model=str(cfg.model), out=cfg.out, data_dir=cfg.data_dir, split=split,
        max_pairs=cfg.calibration_pairs, seed=cfg.seed, val_eval=False,
    )  # fmt: skip
    pairs = _prepare(train_cfg, texts_cfg)[-1]
    return list(dict.fromkeys([*pairs["anchor"].tolist(), *pairs["positive"].tolist()]))


def prune_retriever(cfg: RetrieverPruneConfig) -> dict[str, Any]:
    """Prune ``cfg.model`` into ``cfg.out``; returns the pruning report (params, layers, widths, reload check).

    Raises:
        ConfigError: ``model`` or ``out`` missing.
        FileNotFoundError: no prepared data directory (``method=activation``).
    """
    from recsys_slm.model_dir import read_manifest
    from recsys_slm.models.loading import resolve_model_path
    from recsys_slm.prune.encoder import prune_sentence_encoder

    check(cfg.model is not None, "model", "required: the retriever to prune (--model DIR)")
    check(cfg.out is not None, "out", "required: the output directory (--out DIR)")
    src = resolve_model_path(cfg.model)
    manifest = read_manifest(src) if isinstance(src, Path) else None
    section = (manifest or {}).get("retriever") or {}
    texts = calibration_texts(cfg, section) if cfg.method == "activation" else None
    carried = {k: section[k] for k in CARRIED if k in section}
    report = prune_sentence_encoder(
        src, cfg.out, neurons_keep=cfg.neurons_keep, layers_keep=cfg.layers_keep, method=cfg.method,
        calibration_texts=texts, device=None if cfg.device == "auto" else cfg.device,
        config={"retriever_prune": config_to_dict(cfg)},
        extra={"retriever": {**carried, "adaptive_layers": False, "pruned_from": str(src)}} if carried else None,
    )  # fmt: skip
    return report
