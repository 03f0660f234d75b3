"""Candidate generation for ``POST /recommend``: the two-tower text retriever of :mod:`recsys_slm.retriever`.

The user text (profile + recent liked / disliked titles, exactly as the retriever was trained to read it) is
encoded by the sentence encoder (optionally truncated to a Matryoshka dimension) and searched in a FAISS index of
the catalogue; the top ``k`` items the user has not interacted with go to the LLM ranker, and the best ``n`` by
ranker score come back. The index is either a saved :class:`~recsys_slm.retriever.index.RetrievalIndex` (checked
against the encoder and dimension) or built over the catalogue when the service starts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from recsys_slm.serving.config import RetrieverServingConfig


class Recommender:
    """Retrieval stage of /recommend.

    Args:
        cfg (RetrieverServingConfig): encoder, index, texts.
        log: the service's :class:`~recsys_slm.data.schema.InteractionLog`.
        like_threshold (float): liked = ``rating > like_threshold`` (the service's).
        device (str): encoder device.
    """

    def __init__(self, cfg: RetrieverServingConfig, log, like_threshold: float, device: str = "auto"):
        from recsys_slm.model_dir import read_manifest
        from recsys_slm.models.loading import load_sentence_encoder, resolve_model_path
        from recsys_slm.retriever.evaluate import resolve_texts
        from recsys_slm.retriever.index import RetrievalIndex
        from recsys_slm.retriever.texts import RetrieverTexts

        start = time.perf_counter()
        self.cfg = cfg
        path = resolve_model_path(cfg.encoder)
        manifest = read_manifest(path) if isinstance(path, Path) else None
        texts_cfg, self.texts_source = resolve_texts(cfg.text_config(), manifest)
        self.texts = RetrieverTexts(log, texts_cfg, like_threshold)
        self.encoder = load_sentence_encoder(path, device=device, truncate_dim=cfg.dim)
        encoder_dir = path if isinstance(path, Path) else None
        if cfg.index is not None:
            self.index = RetrievalIndex.load(cfg.index, encoder_dir=encoder_dir, dim=cfg.dim)
            from recsys_slm.retriever.index import set_search_params

            set_search_params(self.index.index, cfg.nprobe, cfg.ef_search)
        else:
            items = log.items
            if "is_placeholder" in items.columns:
                items = items[~items["is_placeholder"].to_numpy(dtype=bool)]
            ids = [str(i) for i in items["item_id"]]
            vectors = self._encode(self.texts.item_texts(ids))
            dim_of = getattr(self.encoder, "get_embedding_dimension", None) or self.encoder.get_sentence_embedding_dimension
            self.index = RetrievalIndex.build(vectors, ids, cfg.factory, encoder_dir=encoder_dir, embedding_dim=dim_of(),
                                              nprobe=cfg.nprobe, ef_search=cfg.ef_search)  # fmt: skip
        self.load_seconds = time.perf_counter() - start

    def _encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                              show_progress_bar=False), dtype=np.float32)  # fmt: skip

    def retrieve(self, history: list[str], likes: list[int], user_id: str | None, k: int,
                 exclude: set[str]) -> tuple[list[str], list[float]]:  # fmt: skip
        """Top-``k`` item ids (and similarity scores) for the user, best first, skipping ``exclude``."""
        query = self._encode([self.texts.user_text(history, likes, user_id)])
        want = min(self.index.ntotal, k + len(exclude))
        scores, rows = self.index.search(query, want)
        ids, sims = [], []
        for score, row in zip(scores[0], rows[0], strict=True):
            if row < 0:
                continue
            item = self.index.item_ids[int(row)]
            if item in exclude:
                continue
            ids.append(item)
            sims.append(float(score))
            if len(ids) == k:
                break
        return ids, sims

    def describe(self) -> dict[str, Any]:
        return {
            "encoder": Path(str(self.cfg.encoder)).name,
            "dim": self.index.dim,
            "factory": self.index.factory,
            "items": self.index.ntotal,
            "texts_source": self.texts_source,
            "exclude_seen": self.cfg.exclude_seen,
            "load_seconds": round(self.load_seconds, 2),
        }
